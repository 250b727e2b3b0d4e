"""recstack.pipelines.callbacks.tensorboard: TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

from toys import make

from recstack.pipelines import TensorBoardLogger


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
