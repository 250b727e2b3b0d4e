"""recstack.pipelines.demo: the demo trains, saves, reloads and exports."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from recstack.pipelines.demo import DemoConfig, run_demo
from recstack.saver import load_for_inference


@pytest.mark.slow
def test_demo_trains_saves_reloads_and_exports(tmp_path: Path) -> None:
    out = io.StringIO()
    config = DemoConfig(
        eval_every=10, train_rows=8_000, eval_rows=2_000, batch_size=256, device="cpu"
    )
    result = run_demo(config, tmp_path, progress=False, stream=out)
    assert result.reloaded_auc == result.auc
    assert 0.5 < result.auc < result.best_auc + 0.02
    assert result.steps == 8_000 // 256
    text = out.getvalue()
    assert "best possible AUC" in text and f"{result.auc:.4f}" in text
    serving = load_for_inference(result.serving)
    assert any(name.endswith(".item") for name in serving.tables)
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "log.jsonl").is_file()
