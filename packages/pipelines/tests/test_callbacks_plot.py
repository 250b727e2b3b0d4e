"""recstack.pipelines.callbacks.plot: the training-curve plot."""

from __future__ import annotations

from pathlib import Path

from toys import make

from recstack.pipelines import PlotCurves


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
