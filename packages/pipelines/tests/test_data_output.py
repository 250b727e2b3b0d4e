"""recstack.pipelines.data.output: a conversion's directory appears whole or not at all,
and replaces only a previous conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
from convert_testdata import CRITEO_TEXT, ROW_A, ROW_B, leftovers, rows_of

from recstack.pipelines.data import (
    ConvertError,
    convert_criteo,
)


def test_destination_is_replaced_only_when_safe(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    dst = tmp_path / "out"
    dst.mkdir()  # an empty directory is fine
    convert_criteo(src, dst)
    with pytest.raises(ConvertError, match="not empty"):
        convert_criteo(src, dst)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\n")
    with pytest.raises(ConvertError, match="line 1"):
        convert_criteo(bad, dst, overwrite=True)
    assert rows_of(dst) == [ROW_A, ROW_B, ROW_A]  # the failed run left the old output
    convert_criteo(src, dst, overwrite=True, rows_per_file=1)
    assert sorted(p.name for p in dst.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="refusing"):
        convert_criteo(src, dst, overwrite=True)
    with pytest.raises(ConvertError, match="not a directory"):
        convert_criteo(src, dst / "notes.txt")
    assert leftovers(tmp_path) == []
