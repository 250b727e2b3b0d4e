"""recstack.pipelines.data.criteo: exact values, compressed and several inputs, parts and
row groups, bad lines named by file and line (or skipped), bad options."""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from convert_testdata import (
    CATS_A,
    CATS_B,
    CRITEO_TEXT,
    INTS_A,
    INTS_B,
    ROW_A,
    ROW_B,
    criteo_line,
    expected_criteo,
    leftovers,
    random_criteo_lines,
    rows_of,
)

from recstack.columnio import Column, ColumnReader
from recstack.pipelines.data import (
    CRITEO_CATEGORICAL,
    ConvertError,
    convert_criteo,
    criteo_schema,
)


def test_criteo_values_are_exact(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    report = convert_criteo(src, tmp_path / "out")
    assert rows_of(tmp_path / "out") == [ROW_A, ROW_B, ROW_A]
    assert pq.read_schema(report.files[0]).remove_metadata() == criteo_schema()
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (3, 3, 0)
    assert report.files == [str(tmp_path / "out" / "part-00000.parquet")]
    assert report.bytes_written == (tmp_path / "out" / "part-00000.parquet").stat().st_size
    assert report.bytes_read == src.stat().st_size
    assert report.seconds > 0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("suffix", "compress"), [(".gz", gzip.compress), (".bz2", bz2.compress)])
def test_criteo_reads_compressed_input(
    tmp_path: Path, suffix: str, compress: Callable[[bytes], bytes]
) -> None:
    lines = random_criteo_lines(3000)
    src = tmp_path / f"day_0{suffix}"
    src.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    report = convert_criteo(src, tmp_path / "out", block_size=4096)
    assert rows_of(tmp_path / "out") == expected_criteo(lines)
    assert report.bytes_read == src.stat().st_size


def test_criteo_categorical_strings(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    convert_criteo(src, tmp_path / "out", categorical="string")
    first = rows_of(tmp_path / "out")[0]
    assert [first[c] for c in CRITEO_CATEGORICAL[:4]] == ["68fd1e64", None, "0000000a", "FFFFFFFF"]
    assert first["I9"] == 12345678901


def test_criteo_without_label(tmp_path: Path) -> None:
    src = tmp_path / "test.txt"
    src.write_text("\t".join(INTS_A + CATS_A) + "\n")
    convert_criteo(src, tmp_path / "out", has_label=False)
    assert rows_of(tmp_path / "out") == [{k: v for k, v in ROW_A.items() if k != "label"}]


def test_criteo_parts_row_groups_and_several_sources(tmp_path: Path) -> None:
    lines = random_criteo_lines(10, seed=3)
    (tmp_path / "day_0").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "day_1").write_text("\n".join(lines[6:]) + "\n")
    report = convert_criteo(
        [tmp_path / "day_0", tmp_path / "day_1"],
        tmp_path / "out",
        rows_per_file=4,
        row_group_size=3,
    )
    groups = [
        [
            pq.ParquetFile(f).metadata.row_group(i).num_rows
            for i in range(pq.ParquetFile(f).num_row_groups)
        ]
        for f in report.files
    ]
    assert groups == [[3, 1], [3, 1], [2]]
    assert [Path(f).name for f in report.files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert rows_of(tmp_path / "out") == expected_criteo(lines)


def test_criteo_empty_input_writes_an_empty_file(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text("")
    report = convert_criteo(src, tmp_path / "out")
    assert report.rows_written == 0 and len(report.files) == 1
    table = pq.read_table(report.files[0])
    assert table.num_rows == 0 and table.schema.remove_metadata() == criteo_schema()


def test_criteo_reads_back_with_column_reader(tmp_path: Path) -> None:
    lines = random_criteo_lines(50, seed=5)
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines) + "\n")
    convert_criteo(src, tmp_path / "out", rows_per_file=20)
    expected = expected_criteo(lines)
    columns = [Column("label"), *(Column(n, default=-1) for n in ["I1", "C1"])]
    with ColumnReader(tmp_path / "out", columns, batch_size=50) as reader:
        (batch,) = list(reader)
    assert batch["label"].dtype == torch.float32
    assert batch["label"].tolist() == [r["label"] for r in expected]
    assert batch["I1"].dtype == torch.int64
    assert batch["I1"].tolist() == [-1 if r["I1"] is None else r["I1"] for r in expected]
    assert batch["C1"].tolist() == [-1 if r["C1"] is None else r["C1"] for r in expected]


BAD_CRITEO = [
    ("1\t2\t3", "expected 40 fields separated by '\\t', found 3"),
    (criteo_line("2", INTS_B, CATS_B), "label '2' is not 0 or 1"),
    (criteo_line("1", ["x1", *INTS_B[1:]], CATS_B), "I1 'x1' is not an integer"),
    (criteo_line("1", INTS_B, [*CATS_B[:3], "zz", *CATS_B[4:]]), "C4 'zz' is not a hex number"),
    (criteo_line("1", INTS_B, ["1" * 17, *CATS_B[1:]]), "C1 '11111111111111111' is not a hex"),
    (criteo_line("1", INTS_B, ["8000000000000000", *CATS_B[1:]]), "C1 '8000000000000000' is not"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CRITEO)
def test_criteo_bad_line_names_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    src = tmp_path / "train.txt"
    good = criteo_line("0", INTS_A, CATS_A)
    src.write_text("\n".join([good, "", bad, good]) + "\n")
    with pytest.raises(ConvertError, match="line 3") as info:
        convert_criteo(src, tmp_path / "out")
    assert info.value.path == str(src) and info.value.line == 3
    assert str(info.value).startswith(f"{src}, line 3: {message}")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_criteo_bad_lines_deep_in_a_file(tmp_path: Path) -> None:
    # Small blocks, so the bad lines lie many blocks after the fast reader started.
    lines = random_criteo_lines(2000, seed=7)
    text = list(lines)
    text[1499] = "1\t2"
    text[1799] = criteo_line("1", ["1.5", *INTS_B[1:]], CATS_B)
    src = tmp_path / "train.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))
    with pytest.raises(ConvertError) as info:
        convert_criteo(src, tmp_path / "out", block_size=2048)
    assert info.value.line == 1500
    report = convert_criteo(src, tmp_path / "out", block_size=2048, on_error="skip")
    kept = lines[:1499] + lines[1500:1799] + lines[1800:]
    assert rows_of(tmp_path / "out") == expected_criteo(kept)
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (2000, 1998, 2)
    assert report.skipped_examples == [
        f"{src}, line 1500: expected 40 fields separated by '\\t', found 2",
        f"{src}, line 1800: I1 '1.5' is not an integer",
    ]
    assert "2 bad rows skipped" in report.summary()


def test_criteo_rejects_bad_options(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    with pytest.raises(ValueError, match="rows_per_file"):
        convert_criteo(src, tmp_path / "out", rows_per_file=0)
    with pytest.raises(ValueError, match="categorical"):
        convert_criteo(src, tmp_path / "out", categorical="hex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        convert_criteo(src, tmp_path / "out", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConvertError, match="is not a file"):
        convert_criteo(tmp_path / "missing.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
