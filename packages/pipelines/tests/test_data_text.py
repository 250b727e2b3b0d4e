"""recstack.pipelines.data.text: good files never take the slower line-numbered reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from convert_testdata import (
    CRITEO_TEXT,
    ROW_A,
    ROW_B,
    random_criteo_lines,
    rows_of,
    taobao_rows,
    write_taobao,
)

from recstack.pipelines.data import (
    convert_criteo,
    convert_taobao,
)


def test_good_files_never_take_the_line_numbered_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recstack.pipelines.data import text

    calls: list[str] = []
    exact = text._exact_blocks

    def counting(path: Path, *args: Any) -> Any:
        calls.append(path.name)
        return exact(path, *args)

    monkeypatch.setattr(text, "_exact_blocks", counting)
    src = tmp_path / "train.txt"
    src.write_text("\n".join(random_criteo_lines(500)) + "\n")
    convert_criteo(src, tmp_path / "a", block_size=4096)
    write_taobao(tmp_path / "UserBehavior.csv", taobao_rows(100, seed=1))
    convert_taobao(tmp_path, tmp_path / "b")
    assert calls == []
    (tmp_path / "bad.txt").write_text(CRITEO_TEXT + "\n1\t2\n")
    report = convert_criteo(tmp_path / "bad.txt", tmp_path / "c", on_error="skip")
    assert calls == ["bad.txt"]
    assert rows_of(tmp_path / "c") == [ROW_A, ROW_B, ROW_A]  # CRLF read alike by both readers
    assert report.skipped_examples == [
        f"{tmp_path / 'bad.txt'}, line 5: expected 40 fields separated by '\\t', found 2"
    ]
