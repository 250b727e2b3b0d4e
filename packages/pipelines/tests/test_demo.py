"""The demo and the recstack command line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from recstack.core import kernels
from recstack.pipelines.cli import main
from recstack.pipelines.demo import DemoConfig, run_demo
from recstack.saver import load_for_inference


@pytest.mark.slow
def test_demo_trains_saves_reloads_and_exports(tmp_path: Path) -> None:
    out = io.StringIO()
    config = DemoConfig(
        eval_every=10, train_rows=8_000, eval_rows=2_000, batch_size=256, device="cpu"
    )
    with kernels.use_backend("torch"):  # the kernels have their own tests
        result = run_demo(config, tmp_path, progress=False, stream=out)
    assert result.reloaded_auc == result.auc
    assert 0.5 < result.auc < result.best_auc + 0.02
    assert result.steps == 8_000 // 256
    text = out.getvalue()
    assert "best possible AUC" in text and f"{result.auc:.4f}" in text
    serving = load_for_inference(result.serving)
    assert any(name.endswith(".item") for name in serving.tables)
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "log.jsonl").is_file()


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
