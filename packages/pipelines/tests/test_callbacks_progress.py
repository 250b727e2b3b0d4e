"""recstack.pipelines.callbacks.progress: the progress bar."""

from __future__ import annotations

import io

from toys import make

from recstack.pipelines import ProgressBar


def test_progress_bar_shows_rate_loss_and_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(refresh=0.0, stream=out)
    _, trainer = make(None, epochs=1, max_steps=6, log_every=2, callbacks=[bar], eval_every=3)
    trainer.fit()
    lines = out.getvalue().splitlines()
    assert any("6/6" in line and "it/s" in line and "samples/s" in line for line in lines)
    assert any("loss " in line and "ETA" in line for line in lines)
    assert any(line.startswith("eval @ step 3: label/auc") for line in lines)
