"""Built-in callbacks: progress bar, TensorBoard scalars, training-curve plot."""

from __future__ import annotations

import io
from pathlib import Path

from toys import make

from recstack.pipelines import PlotCurves, ProgressBar, TensorBoardLogger


def test_progress_bar_shows_rate_loss_and_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(refresh=0.0, stream=out)
    _, trainer = make(None, epochs=1, max_steps=6, log_every=2, callbacks=[bar], eval_every=3)
    trainer.fit()
    lines = out.getvalue().splitlines()
    assert any("6/6" in line and "it/s" in line and "samples/s" in line for line in lines)
    assert any("loss " in line and "ETA" in line for line in lines)
    assert any(line.startswith("eval @ step 3: label/auc") for line in lines)


def test_tensorboard_logger_writes_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer = make(None, epochs=1, log_every=2, eval_every=5,
                      callbacks=[TensorBoardLogger(tmp_path / "tb")])  # fmt: skip
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/label/auc"} <= tags
    assert [e.step for e in events.Scalars("eval/label/auc")] == [5, 10]


def test_plot_curves_writes_a_png_that_survives_a_resume(tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    plot = PlotCurves(png)
    _, trainer = make(tmp_path / "ck", max_steps=12, log_every=2, eval_every=4, callbacks=[plot])
    trainer.fit()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot2 = PlotCurves(png)
    _, again = make(tmp_path / "ck", max_steps=20, log_every=2, eval_every=4, callbacks=[plot2])
    again.fit()
    assert [s for s, _ in plot2.train["loss"]] == list(range(2, 21, 2))
    assert [s for s, _ in plot2.eval["label/auc"]] == [4, 8, 12, 16, 20]
