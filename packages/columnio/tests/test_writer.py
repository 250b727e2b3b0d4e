"""write_parquet / batch_to_table: conversions, row groups, schema checks, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.writer import batch_to_table, write_parquet
from recstack.core import JaggedTensor, KeyedJaggedTensor


def _random_table(rng: np.random.Generator, rows: int) -> pa.Table:
    lengths = rng.integers(0, 5, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "x": pa.array(rng.standard_normal(rows).astype(np.float32)),
            "id": pa.array(rng.integers(0, 1000, rows)),
            "seq": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 9, offsets[-1]))),
        }
    )


def _hidden_files(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.startswith(".")]


# ---------------------------------------------------------------------------- Arrow inputs


@pytest.mark.parametrize("rows", [0, 1, 37])
def test_table_round_trip(tmp_path, rows):
    table = _random_table(np.random.default_rng(rows), rows)
    path = tmp_path / "t.parquet"
    assert write_parquet(table, path) == rows
    back = pq.read_table(path)
    assert back.num_rows == rows
    assert back.equals(table)
    assert _hidden_files(tmp_path) == []


def test_record_batch_and_reader(tmp_path):
    table = _random_table(np.random.default_rng(1), 20)
    batch = table.to_batches()[0]
    assert write_parquet(batch, tmp_path / "b.parquet") == 20
    assert pq.read_table(tmp_path / "b.parquet").equals(table)
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=6))
    assert write_parquet(reader, tmp_path / "r.parquet") == 20
    assert pq.read_table(tmp_path / "r.parquet").equals(table)


def test_ragged_inputs_make_full_row_groups(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [1, 0, 7, 13, 2, 30, 5]
    tables = [_random_table(rng, n) for n in sizes]
    path = tmp_path / "rg.parquet"
    assert write_parquet(iter(tables), path, row_group_size=10) == sum(sizes)
    meta = pq.ParquetFile(path).metadata
    got = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert got == [10, 10, 10, 10, 10, 8]
    assert pq.read_table(path).equals(pa.concat_tables(tables))


def test_row_group_size_one(tmp_path):
    table = _random_table(np.random.default_rng(3), 3)
    write_parquet(table, tmp_path / "one.parquet", row_group_size=1)
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 3


def test_empty_input_needs_a_schema(tmp_path):
    path = tmp_path / "e.parquet"
    with pytest.raises(ColumnIOError, match="no schema"):
        write_parquet([], path)
    assert not path.exists()
    assert _hidden_files(tmp_path) == []
    schema = pa.schema([("a", pa.int64()), ("s", pa.string())])
    assert write_parquet([], path, schema=schema) == 0
    back = pq.read_table(path)
    assert back.num_rows == 0 and back.schema.equals(schema)
    # An empty reader states its schema itself.
    reader = pa.RecordBatchReader.from_batches(schema, [])
    assert write_parquet(reader, tmp_path / "r.parquet") == 0
    assert pq.read_schema(tmp_path / "r.parquet").equals(schema)


def test_schema_mismatch_names_the_column(tmp_path):
    rng = np.random.default_rng(4)
    a = _random_table(rng, 5)
    with pytest.raises(ColumnIOError, match="'id'") as err:
        write_parquet([a, a.drop_columns(["id"])], tmp_path / "m.parquet")
    assert err.value.column == "id"
    with pytest.raises(ColumnIOError, match="'extra'"):
        write_parquet([a, a.append_column("extra", pa.array(range(5)))], tmp_path / "m.parquet")
    retyped = a.set_column(1, "id", a.column("id").cast(pa.int32()))
    with pytest.raises(ColumnIOError, match="int32") as err:
        write_parquet([a, retyped], tmp_path / "m.parquet")
    assert err.value.column == "id"
    reordered = a.select(["id", "x", "seq"])
    with pytest.raises(ColumnIOError, match="order"):
        write_parquet([a, reordered], tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()
    assert _hidden_files(tmp_path) == []


def test_explicit_schema_nullability_and_metadata(tmp_path):
    schema = pa.schema([pa.field("a", pa.int64(), nullable=False)], metadata={b"k": b"v"})
    table = pa.table({"a": [1, 2, 3]})  # nullable field, no metadata
    path = tmp_path / "s.parquet"
    write_parquet(table, path, schema=schema, metadata={"extra": "1"})
    read = pq.read_schema(path)
    assert read.field("a").nullable is False
    assert read.metadata[b"k"] == b"v" and read.metadata[b"extra"] == b"1"
    with pytest.raises(ColumnIOError, match="nulls"):
        write_parquet(pa.table({"a": [1, None]}), tmp_path / "n.parquet", schema=schema)


def test_compression_option(tmp_path):
    table = _random_table(np.random.default_rng(5), 50)
    write_parquet(table, tmp_path / "z.parquet", compression="zstd")
    meta = pq.ParquetFile(tmp_path / "z.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_table(tmp_path / "z.parquet").equals(table)


def test_bad_arguments(tmp_path):
    table = _random_table(np.random.default_rng(6), 3)
    with pytest.raises(ValueError, match="row_group_size"):
        write_parquet(table, tmp_path / "a.parquet", row_group_size=0)
    with pytest.raises(ColumnIOError, match="directory"):
        write_parquet(table, tmp_path)
    with pytest.raises(ColumnIOError, match="cannot write a int"):
        write_parquet(5, tmp_path / "a.parquet")
    with pytest.raises(ColumnIOError, match="item 1"):
        write_parquet([table, "nope"], tmp_path / "a.parquet")


# ---------------------------------------------------------------------------- atomicity


def test_target_appears_only_when_complete(tmp_path):
    path = tmp_path / "sub" / "data.parquet"
    rng = np.random.default_rng(7)
    seen = []

    def tables():
        for _ in range(3):
            yield _random_table(rng, 4)
            # Mid-write: only a hidden file exists beside the target.
            seen.append((path.exists(), _hidden_files(path.parent)))

    assert write_parquet(tables(), path, row_group_size=2) == 12
    assert all(not exists for exists, _ in seen)
    assert all(len(hidden) == 1 and hidden[0].startswith(".data.parquet.") for _, hidden in seen)
    assert path.exists() and _hidden_files(path.parent) == []


def test_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "data.parquet"
    old = _random_table(np.random.default_rng(8), 5)
    write_parquet(old, path)

    def failing():
        yield _random_table(np.random.default_rng(9), 4)
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        write_parquet(failing(), path)
    assert pq.read_table(path).equals(old)
    assert _hidden_files(tmp_path) == []


def test_overwrites_existing_file(tmp_path):
    path = tmp_path / "data.parquet"
    write_parquet(_random_table(np.random.default_rng(10), 5), path)
    new = _random_table(np.random.default_rng(11), 2)
    write_parquet(new, path, fsync=False)
    assert pq.read_table(path).equals(new)


def test_uri_and_filesystem(tmp_path):
    table = _random_table(np.random.default_rng(12), 9)
    uri = (tmp_path / "u.parquet").as_uri()
    assert write_parquet(table, uri) == 9
    assert pq.read_table(tmp_path / "u.parquet").equals(table)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert write_parquet(table, "deep/f.parquet", filesystem=fs) == 9
    assert pq.read_table(tmp_path / "deep" / "f.parquet").equals(table)
    assert _hidden_files(tmp_path / "deep") == []


# ---------------------------------------------------------------------------- tensor batches


@pytest.mark.parametrize("rows", [0, 1, 11])
def test_tensor_batch_columns(tmp_path, rows):
    g = torch.Generator().manual_seed(rows)
    lengths = torch.randint(0, 4, (rows,), generator=g)
    words = ["", "a", "héllo", "日本"]
    strs = [words[i % 4] for i in range(rows)]
    batch = {
        "f32": torch.randn(rows, generator=g),
        "f16": torch.randn(rows, generator=g).half(),
        "i64": torch.randint(-(2**40), 2**40, (rows,), generator=g),
        "i32": torch.randint(-100, 100, (rows,), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (rows,), generator=g, dtype=torch.uint8),
        "flag": torch.rand(rows, generator=g) > 0.5,
        "emb": torch.randn(rows, 3, generator=g),
        "cube": torch.randn(rows, 2, 3, generator=g),
        "seq": JaggedTensor.from_lengths(torch.randint(0, 99, (int(lengths.sum()),)), lengths),
        "name": JaggedTensor.from_strings(strs),
        "raw": JaggedTensor.from_strings(strs),
    }
    table = batch_to_table(batch, strings=["name"])
    assert table.num_rows == rows
    types = {f.name: f.type for f in table.schema}
    assert types["f32"] == pa.float32() and types["f16"] == pa.float16()
    assert types["i64"] == pa.int64() and types["i32"] == pa.int32()
    assert types["u8"] == pa.uint8() and types["flag"] == pa.bool_()
    assert types["emb"] == pa.list_(pa.float32(), 3)
    assert types["cube"] == pa.list_(pa.list_(pa.float32(), 3), 2)
    assert types["seq"] == pa.list_(pa.int64())
    assert types["name"] == pa.string() and types["raw"] == pa.list_(pa.uint8())

    path = tmp_path / "b.parquet"
    assert write_parquet(batch, path, strings=["name"]) == rows
    back = pq.read_table(path)
    assert back.equals(table)
    assert back.column("name").to_pylist() == strs
    assert back.column("raw").to_pylist() == [list(s.encode()) for s in strs]
    assert back.column("seq").to_pylist() == batch["seq"].to_list()
    assert back.column("flag").to_pylist() == batch["flag"].tolist()
    np.testing.assert_array_equal(
        np.array(back.column("cube").to_pylist(), dtype=np.float32).reshape(rows, 2, 3),
        batch["cube"].numpy(),
    )
    np.testing.assert_array_equal(back.column("i64").to_numpy(), batch["i64"].numpy())


def test_iterable_of_batches_and_kjt(tmp_path):
    g = torch.Generator().manual_seed(13)
    batches = []
    for rows in (3, 1, 5):
        lengths = torch.randint(0, 3, (2 * rows,), generator=g)
        kjt = KeyedJaggedTensor(
            ["a", "b"], torch.randint(0, 50, (int(lengths.sum()),), generator=g), lengths
        )
        batches.append({"label": torch.rand(rows, generator=g), "ids": kjt})
    path = tmp_path / "k.parquet"
    assert write_parquet(batches, path, row_group_size=4) == 9
    back = pq.read_table(path)
    assert back.column_names == ["label", "a", "b"]
    expected_a = [row for b in batches for row in b["ids"]["a"].to_list()]
    expected_b = [row for b in batches for row in b["ids"]["b"].to_list()]
    assert back.column("a").to_pylist() == expected_a
    assert back.column("b").to_pylist() == expected_b


def test_nested_jagged_columns():
    nested = JaggedTensor.from_string_lists([["ab", "c"], [], ["d"]])
    table = batch_to_table({"tags": nested}, strings=["tags"])
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.column("tags").to_pylist() == [["ab", "c"], [], ["d"]]
    vecs = JaggedTensor.from_lengths(torch.arange(6.0).reshape(3, 2), torch.tensor([2, 1]))
    assert batch_to_table({"v": vecs}).column("v").to_pylist() == [
        [[0.0, 1.0], [2.0, 3.0]],
        [[4.0, 5.0]],
    ]


def test_batch_errors_name_the_column(tmp_path):
    ok = torch.zeros(3)
    cases = [
        ({"a": ok, "b": torch.zeros(4)}, "b", "rows"),
        ({"a": torch.zeros(3, dtype=torch.bfloat16)}, "a", "bfloat16"),
        ({"a": torch.tensor(1.0)}, "a", "0-d"),
        ({"a": [1, 2, 3]}, "a", "unsupported"),
        (
            {"w": JaggedTensor(torch.zeros(2), torch.tensor([0, 2]), torch.ones(2))},
            "w",
            "weights",
        ),
        ({"j": JaggedTensor(torch.zeros(2), torch.tensor([0, 3]))}, "j", "invalid"),
        ({"j": JaggedTensor(torch.zeros(3), torch.tensor([1, 3]))}, "j", "offsets"),
        (
            {
                "s": JaggedTensor.from_lengths(
                    torch.tensor([0xFF], dtype=torch.uint8), torch.tensor([1])
                )
            },
            "s",
            "string",
        ),
        ({"s": JaggedTensor.from_lengths(torch.tensor([1, 2]), torch.tensor([2]))}, "s", "uint8"),
        ({"s": ok}, "s", "plain tensor"),
    ]
    for batch, column, message in cases:
        with pytest.raises(ColumnIOError, match=message) as err:
            batch_to_table(batch, strings=["s"] if "s" in batch else ())
        assert err.value.column == column, (batch, err.value)
    with pytest.raises(ColumnIOError, match="not in the batch"):
        batch_to_table({"a": ok}, strings=["missing"])
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1]), torch.tensor([1, 0, 0]))
    with pytest.raises(ColumnIOError, match="twice") as err:
        batch_to_table({"a": ok, "k": kjt})
    assert err.value.column == "a"
    # Mismatch between dict batches is named too, and nothing is left behind.
    with pytest.raises(ColumnIOError) as err:
        write_parquet([{"a": ok}, {"a": ok.long()}], tmp_path / "x.parquet")
    assert err.value.column == "a"
    assert os.listdir(tmp_path) == []


@pytest.mark.gpu
def test_cuda_tensors_are_written(tmp_path):
    batch = {
        "x": torch.arange(4.0, device="cuda"),
        "s": JaggedTensor.from_lengths(
            torch.arange(3, device="cuda"), torch.tensor([1, 0, 2, 0], device="cuda")
        ),
    }
    assert write_parquet(batch, tmp_path / "g.parquet") == 4
    back = pq.read_table(tmp_path / "g.parquet")
    assert back.column("x").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    assert back.column("s").to_pylist() == [[0], [], [1, 2], []]
