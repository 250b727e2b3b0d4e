"""recstack.pipelines.data.sequences: the history converters' driver on an empty input,
and its progress lines."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from convert_testdata import write_ml_dat

from recstack.pipelines.data import (
    convert_movielens,
    convert_taobao,
    taobao_schema,
)


def test_history_converters_handle_empty_input(tmp_path: Path) -> None:
    (tmp_path / "UserBehavior.csv").write_text("\n")
    report = convert_taobao(tmp_path, tmp_path / "out")
    assert report.rows_written == 0 and len(report.files) == 1
    assert pq.read_table(report.files[0]).schema.remove_metadata() == taobao_schema()


def test_converter_shows_progress_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_ml_dat(tmp_path / "ml")
    convert_movielens(src, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "movielens: reading" in err and "movielens: histories" in err
