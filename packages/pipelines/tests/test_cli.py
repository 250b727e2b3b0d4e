"""recstack.pipelines.cli: the recstack command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from recstack.pipelines.cli import main


def test_cli_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["export"])
    assert err.value.code == 2


def test_cli_converts_and_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "day_0.tsv"
    row = ["1", *[str(i) for i in range(13)], *["68fd1e64"] * 26]
    src.write_text("\t".join(row) + "\n" + "\t".join(["0", *[""] * 39]) + "\n")
    assert main(["data", "convert", "criteo", str(src), str(tmp_path / "out")]) == 0
    assert "2 rows" in capsys.readouterr().out.replace(",", "")
    assert (
        main(["data", "convert", "criteo", str(tmp_path / "missing.tsv"), str(tmp_path / "o2")])
        == 1
    )
    assert "missing.tsv" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "serving")]) != 0
