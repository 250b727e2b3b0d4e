"""recstack.columnio.formats: units of Parquet, ORC and Arrow IPC files, bad files, S3."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.files import FileRef
from recstack.columnio.formats import FileMeta, clear_metadata_cache, inspect_file, read_unit

FS = pafs.LocalFileSystem(use_mmap=True)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_metadata_cache()
    yield
    clear_metadata_cache()


def make_table(n: int, seed: int, *, fixed_size_list: bool = True) -> pa.Table:
    """Ragged, nullable columns of the types a recommendation dataset holds."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 6, n)
    ids = [rng.integers(-(2**62), 2**62, k).tolist() for k in lens]
    words = [[f"w{x}" for x in rng.integers(0, 1000, k)] for k in lens]
    cols = {
        "user_id": pa.array(rng.integers(-(2**62), 2**62, n), pa.int64()),
        "score": pa.array(rng.standard_normal(n)),
        "clicked": pa.array(rng.integers(0, 2, n).astype(np.int32)),
        "city": pa.array(
            [None if x % 7 == 0 else f"c{x}" for x in rng.integers(0, 100, n)], pa.string()
        ),
        "seq": pa.array(
            [None if i % 11 == 5 else v for i, v in enumerate(ids)], pa.list_(pa.int64())
        ),
        "tags": pa.array(words, pa.list_(pa.string())),
    }
    if fixed_size_list:
        cols["emb"] = pa.array(rng.standard_normal((n, 3)).tolist(), pa.list_(pa.float64(), 3))
    return pa.table(cols)


def ref(path: Path, fmt: str) -> FileRef:
    st = os.stat(path)
    return FileRef(FS, str(path), str(path), fmt, size=st.st_size, mtime_ns=st.st_mtime_ns)


def assert_rows_equal(got: pa.Table, want: pa.Table) -> None:
    """Same column names, order and values (list/fixed-size-list child names may differ)."""
    assert got.column_names == want.column_names
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name


def check_all_units(file: FileRef, source: pa.Table, unit_sizes: list[int]) -> FileMeta:
    meta = inspect_file(file)
    assert meta.unit_rows == tuple(unit_sizes)
    assert meta.num_rows == source.num_rows == sum(unit_sizes)
    assert meta.schema.names == source.column_names
    subset = [source.column_names[i] for i in (3, 0, 4)]  # a different order than the file's
    start = 0
    for unit, rows in enumerate(meta.unit_rows):
        want = source.slice(start, rows)
        full = read_unit(file, unit, source.column_names)
        assert_rows_equal(full, want)
        for field in full.schema:
            assert field.type == meta.schema.field(field.name).type
        assert_rows_equal(read_unit(file, unit, subset), want.select(subset))
        start += rows
    return meta


# ---------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------


def write_parquet(path: Path, source: pa.Table, sizes: list[int]) -> None:
    with pq.ParquetWriter(path, source.schema) as writer:
        start = 0
        for rows in sizes:  # one write_table per row group, zero-row ones included
            writer.write_table(source.slice(start, rows), row_group_size=max(rows, 1))
            start += rows


def write_ipc_file(path: Path, source: pa.Table, sizes: list[int], compression=None) -> None:
    options = ipc.IpcWriteOptions(compression=compression)
    with ipc.new_file(path, source.schema, options=options) as writer:
        start = 0
        for rows in sizes:
            for batch in source.slice(start, rows).combine_chunks().to_batches() or [
                pa.RecordBatch.from_pylist([], schema=source.schema)
            ]:
                writer.write_batch(batch)
            start += rows


def write_ipc_stream(path: Path, source: pa.Table, sizes: list[int]) -> None:
    with ipc.new_stream(path, source.schema) as writer:
        start = 0
        for rows in sizes:
            writer.write_table(source.slice(start, rows))
            start += rows


# ---------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[5, 0, 1, 17, 3], [1], [0], [64]])
def test_parquet_row_groups(tmp_path, sizes):
    source = make_table(sum(sizes), seed=1)
    path = tmp_path / "t.parquet"
    write_parquet(path, source, sizes)
    check_all_units(ref(path, "parquet"), source, sizes)


def test_parquet_zero_row_unit_has_schema(tmp_path):
    source = make_table(4, seed=2)
    path = tmp_path / "t.parquet"
    write_parquet(path, source, [2, 0, 2])
    file = ref(path, "parquet")
    empty = read_unit(file, 1, ["seq", "user_id"])
    assert empty.num_rows == 0
    assert empty.column_names == ["seq", "user_id"]
    assert empty.schema.field("seq").type == inspect_file(file).schema.field("seq").type


def test_parquet_no_row_groups(tmp_path):
    source = make_table(0, seed=3)
    path = tmp_path / "t.parquet"
    pq.ParquetWriter(path, source.schema).close()
    file = ref(path, "parquet")
    meta = inspect_file(file)
    assert meta.unit_rows == () and meta.num_rows == 0
    assert meta.schema.names == source.column_names
    with pytest.raises(ColumnIOError, match="out of range"):
        read_unit(file, 0, ["user_id"])


def test_parquet_data_corrupt_behind_valid_footer(tmp_path):
    source = make_table(200, seed=4)
    path = tmp_path / "t.parquet"
    pq.write_table(source, path, row_group_size=100)
    raw = bytearray(path.read_bytes())
    footer_len = int.from_bytes(raw[-8:-4], "little")
    data_end = len(raw) - 8 - footer_len
    rng = np.random.default_rng(4)
    raw[4:data_end] = rng.integers(0, 256, data_end - 4, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    file = ref(path, "parquet")
    assert inspect_file(file).unit_rows == (100, 100)  # the footer is intact
    with pytest.raises(ColumnIOError, match="cannot read row group 1") as info:
        read_unit(file, 1, source.column_names)
    assert info.value.file == str(path)


# ---------------------------------------------------------------------------------------
# ORC
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("compression", "n"), [("uncompressed", 5000), ("zstd", 20000)])
def test_orc_many_stripes(tmp_path, compression, n):
    # Compressed stripes are cut at 64 KiB compression blocks, so they need more rows.
    source = make_table(n, seed=5)
    path = tmp_path / "t.orc"
    orc.write_table(source, path, stripe_size=1024, batch_size=128, compression=compression)
    file = ref(path, "orc")
    reader = orc.ORCFile(str(path))
    assert reader.nstripes >= 5  # the point: many stripes
    sizes = [reader.read_stripe(i).num_rows for i in range(reader.nstripes)]
    meta = check_all_units(file, source, sizes)
    assert len(meta.unit_rows) == reader.nstripes


@pytest.mark.parametrize("n", [0, 1])
def test_orc_empty_and_single_row(tmp_path, n):
    source = make_table(n, seed=6)
    path = tmp_path / "t.orc"
    orc.write_table(source, path)
    check_all_units(ref(path, "orc"), source, [n] if n else [])


# ---------------------------------------------------------------------------------------
# Arrow IPC
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "lz4"])
@pytest.mark.parametrize("sizes", [[4, 0, 1, 9, 2], [1], []])
def test_ipc_file_batches(tmp_path, sizes, compression):
    source = make_table(sum(sizes), seed=7)
    path = tmp_path / "t.arrow"
    write_ipc_file(path, source, sizes, compression)
    check_all_units(ref(path, "ipc"), source, sizes)


def test_feather_v2_is_ipc_file(tmp_path):
    import pyarrow.feather as feather

    source = make_table(50, seed=8)
    path = tmp_path / "t.feather"
    feather.write_feather(source, path, chunksize=20)
    check_all_units(ref(path, "ipc"), source, [20, 20, 10])


@pytest.mark.parametrize("sizes", [[3, 0, 5], [1], []])
def test_ipc_stream_is_one_unit(tmp_path, sizes):
    source = make_table(sum(sizes), seed=9)
    path = tmp_path / "t.arrows"
    write_ipc_stream(path, source, sizes)
    check_all_units(ref(path, "ipc"), source, [sum(sizes)])


# ---------------------------------------------------------------------------------------
# Column selection and argument errors (every format)
# ---------------------------------------------------------------------------------------


@pytest.fixture(params=["parquet", "orc", "ipc"])
def small_file(request, tmp_path):
    source = make_table(30, seed=10, fixed_size_list=request.param != "orc")
    path = tmp_path / f"t.{request.param}"
    if request.param == "parquet":
        write_parquet(path, source, [10, 20])
    elif request.param == "orc":
        orc.write_table(source, path)
    else:
        write_ipc_file(path, source, [10, 20])
    return ref(path, request.param), source


def test_missing_column_is_named(small_file):
    file, source = small_file
    with pytest.raises(ColumnIOError, match="no such column") as info:
        read_unit(file, 0, ["user_id", "nope"])
    assert info.value.column == "nope" and info.value.file == file.uri
    assert "user_id" in str(info.value) and "'nope'" in str(info.value)


def test_duplicate_request_rejected(small_file):
    file, _ = small_file
    with pytest.raises(ColumnIOError, match="more than once"):
        read_unit(file, 0, ["score", "score"])


@pytest.mark.parametrize("unit", [-1, 2, 10**6])
def test_bad_unit_index(small_file, unit):
    file, _ = small_file
    n_units = len(inspect_file(file).unit_rows)
    bad = n_units if unit == 2 else unit
    with pytest.raises(ColumnIOError, match="out of range") as info:
        read_unit(file, bad, ["score"])
    assert info.value.file == file.uri


def test_unit_index_must_be_int(small_file):
    file, _ = small_file
    with pytest.raises(TypeError):
        read_unit(file, 0.0, ["score"])  # type: ignore[arg-type]
    assert read_unit(file, np.int64(0), ["score"]).num_rows == inspect_file(file).unit_rows[0]


def test_no_columns_keeps_row_count(small_file):
    file, _ = small_file
    meta = inspect_file(file)
    for unit, rows in enumerate(meta.unit_rows):
        table = read_unit(file, unit, [])
        assert table.num_columns == 0 and table.num_rows == rows


def test_single_column_only(small_file):
    file, source = small_file
    table = read_unit(file, 0, ("tags",))
    assert table.column_names == ["tags"]
    rows = inspect_file(file).unit_rows[0]
    assert table.column("tags").to_pylist() == source.column("tags").slice(0, rows).to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
def test_duplicate_file_column_is_ambiguous(tmp_path, fmt):
    table = pa.Table.from_arrays(
        [pa.array([1, 2]), pa.array([3, 4]), pa.array(["x", "y"])], ["a", "a", "b"]
    )
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        write_ipc_file(path, table, [2])
    file = ref(path, fmt)
    with pytest.raises(ColumnIOError, match="ambiguous") as info:
        read_unit(file, 0, ["b", "a"])
    assert info.value.column == "a"
    assert read_unit(file, 0, ["b"]).column("b").to_pylist() == ["x", "y"]


def test_concurrent_reads_match_sequential(small_file):
    file, source = small_file
    meta = inspect_file(file)
    subset = ["tags", "user_id", "seq"]
    jobs = [(u, cols) for u in range(len(meta.unit_rows)) for cols in (source.column_names, subset)]
    jobs = jobs * 8
    want = [read_unit(file, u, cols) for u, cols in jobs]
    clear_metadata_cache()  # also race the cold-cache path
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda job: read_unit(file, *job), jobs))
    for g, w in zip(got, want, strict=True):
        assert g.equals(w)


def test_rewritten_file_gets_fresh_metadata(tmp_path):
    path = tmp_path / "t.parquet"
    first = make_table(10, seed=11)
    write_parquet(path, first, [10])
    assert inspect_file(ref(path, "parquet")).unit_rows == (10,)
    second = make_table(7, seed=12)
    write_parquet(path, second, [3, 4])
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))  # a new mtime, as a rewrite has
    file = ref(path, "parquet")
    assert inspect_file(file).unit_rows == (3, 4)
    assert_rows_equal(read_unit(file, 1, ["city"]), second.slice(3, 4).select(["city"]))


# ---------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------


def _write_good(path: Path, fmt: str) -> None:
    source = make_table(300, seed=13, fixed_size_list=fmt != "orc")
    if fmt == "parquet":
        write_parquet(path, source, [100, 200])
    elif fmt == "orc":
        orc.write_table(source, path, stripe_size=4096)
    else:
        write_ipc_file(path, source, [100, 200])


@pytest.mark.parametrize("fmt", ["parquet", "orc", "ipc"])
def test_zero_byte_file(tmp_path, fmt):
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(b"")
    for file in (ref(path, fmt), FileRef(FS, str(path), str(path), fmt)):  # size known or not
        with pytest.raises(ColumnIOError, match="empty file") as info:
            inspect_file(file)
        assert info.value.file == str(path)
        with pytest.raises(ColumnIOError, match="empty file"):
            read_unit(file, 0, ["score"])


@pytest.mark.parametrize("fmt", ["parquet", "orc", "ipc"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"t.{fmt}"
    _write_good(path, fmt)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    file = ref(path, fmt)
    with pytest.raises(ColumnIOError, match="cannot read file metadata") as info:
        inspect_file(file)
    assert info.value.file == str(path)
    assert info.value.__cause__ is not None  # pyarrow's own message is kept


@pytest.mark.parametrize("fmt", ["parquet", "orc", "ipc"])
@pytest.mark.parametrize("size", [1, 7, 5000])
def test_garbage_file(tmp_path, fmt, size):
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(ColumnIOError) as info:
        inspect_file(ref(path, fmt))
    assert info.value.file == str(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.parquet"
    file = FileRef(FS, str(path), str(path), "parquet")
    with pytest.raises(ColumnIOError, match="absent.parquet"):
        inspect_file(file)


def test_feather_v1_rejected(tmp_path):
    path = tmp_path / "t.feather"
    path.write_bytes(b"FEA1" + bytes(60) + b"FEA1")
    with pytest.raises(ColumnIOError, match="Feather v1"):
        inspect_file(ref(path, "ipc"))


# ---------------------------------------------------------------------------------------
# Remote filesystem (moto S3 on loopback): pre-buffered Parquet reads, cached footers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "orc", "ipc"])
def test_s3_files(s3_server, tmp_path, fmt):
    bucket = s3_server.make_bucket("columnio-formats")
    s3 = s3_server.filesystem()
    source = make_table(40, seed=16, fixed_size_list=fmt != "orc")
    local = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        write_parquet(local, source, [15, 0, 25])
    elif fmt == "orc":
        orc.write_table(source, local, stripe_size=1024, batch_size=8)
    else:
        write_ipc_file(local, source, [15, 0, 25])
    key = f"{bucket}/t.{fmt}"
    with s3.open_output_stream(key) as out:
        out.write(local.read_bytes())
    info = s3.get_file_info(key)
    file = FileRef(s3, key, f"s3://{key}", fmt, size=info.size, mtime_ns=info.mtime_ns)
    meta = inspect_file(file)
    assert meta.unit_rows == inspect_file(ref(local, fmt)).unit_rows
    starts = np.concatenate([[0], np.cumsum(meta.unit_rows)])
    subset = ["tags", "user_id"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        tables = list(pool.map(lambda u: read_unit(file, u, subset), range(len(meta.unit_rows))))
    for unit, table in enumerate(tables):
        want = source.slice(int(starts[unit]), meta.unit_rows[unit]).select(subset)
        assert_rows_equal(table, want)
    with pytest.raises(ColumnIOError, match="s3://columnio-formats/"):
        read_unit(file, 0, ["nope"])
