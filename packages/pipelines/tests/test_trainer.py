"""Trainer: the loop, exact resume, accumulation, clipping, signals, callbacks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from toys import Toy, make, same, toy_data

from recstack.pipelines import (
    Callback,
    EarlyStopping,
    JSONLLogger,
    Task,
    Trainer,
)
from recstack.pipelines.callbacks import read_jsonl
from recstack.saver import Checkpointer


def test_training_learns_and_reports(tmp_path: Path) -> None:
    model, trainer = make(tmp_path, eval_every=10, log_every=5)
    before = trainer.evaluate()["label/auc"]
    result = trainer.fit()
    assert result.step == 30 and result.epoch == 3 and result.samples == 3 * 640
    assert result.stopped_by is None and result.resumed_from is None
    assert result.metrics["label/auc"] > max(before, 0.8)
    assert {"label/logloss", "label/calibration", "label/ne"} <= set(result.metrics)
    assert result.checkpoint == tmp_path / "step-000000000030"
    assert Checkpointer(tmp_path).latest() == 30
    assert model.training  # evaluation restored the mode


@pytest.mark.parametrize("stop_at", [1, 7, 10, 23])
def test_killed_and_resumed_equals_uninterrupted(tmp_path: Path, stop_at: int) -> None:
    full, trainer = make(tmp_path / "a", checkpoint_every=5)
    trainer.fit()
    _, first = make(tmp_path / "b", max_steps=stop_at, checkpoint_every=5)
    assert first.fit().step == stop_at
    resumed, second = make(tmp_path / "b", checkpoint_every=5)
    result = second.fit()
    assert result.resumed_from == stop_at and result.step == 30
    assert same(full, resumed)
    assert second.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()


def test_resume_from_a_periodic_checkpoint_after_a_crash(tmp_path: Path) -> None:
    class Crash(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 17:
                raise RuntimeError("boom")

    full, trainer = make(tmp_path / "a")
    trainer.fit()
    _, crashing = make(tmp_path / "b", checkpoint_every=5, callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="boom"):
        crashing.fit()
    assert Checkpointer(tmp_path / "b").latest() == 15
    resumed, again = make(tmp_path / "b", checkpoint_every=5)
    assert again.fit().resumed_from == 15
    assert same(full, resumed)


def test_sigterm_checkpoints_and_stops(tmp_path: Path) -> None:
    class Kill(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    old = signal.getsignal(signal.SIGTERM)
    _, trainer = make(tmp_path, callbacks=[Kill()])
    result = trainer.fit()
    assert result.stopped_by == "SIGTERM" and result.step == 6
    assert Checkpointer(tmp_path).latest() == 6
    assert signal.getsignal(signal.SIGTERM) == old  # handlers restored


def test_gradient_accumulation_averages_batches() -> None:
    data = toy_data(n=256, batch=64)
    merged = [
        {k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(data[::2], data[1::2], strict=True)
    ]
    big, t_big = make(None, data=merged, epochs=1)
    small, t_small = make(None, data=data, epochs=1, grad_accumulation=2)
    for m in (big, small):
        m.net[2].p = 0.0  # no dropout: the two runs see the same function
    t_big.fit()
    r = t_small.fit()
    assert r.step == 2 and r.samples == 256
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_bounds_the_update() -> None:
    model, trainer = make(None, epochs=1, max_steps=1, clip_grad_norm=1e-3)
    trainer.dense_optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer.lr_scheduler = None
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    with torch.no_grad():
        moved = torch.sqrt(
            sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before, strict=True))
        )
    assert float(moved) <= 1e-3 * (1 + 1e-4)


def test_early_stopping_and_jsonl_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    stop = EarlyStopping("label/auc", patience=1, min_delta=1.0)  # nothing improves by 1.0
    _, trainer = make(
        tmp_path / "ck", eval_every=2, log_every=1, callbacks=[stop, JSONLLogger(log)]
    )
    result = trainer.fit()
    assert result.stopped_by == "callback" and result.step == 4
    events = read_jsonl(log)
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert events[-1]["event"] == "checkpoint" and events[-1]["step"] == 4
    assert all(isinstance(e["loss"], float) for e in events if e["event"] == "train")


def test_multi_task_losses_and_metrics() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, batch):
            return {"ctr": self.a(batch["x"]), "cvr": torch.sigmoid(self.b(batch["x"]))}

    data = [dict(d, conv=d["label"].flip(0)) for d in toy_data()]
    model = Two()
    tasks = [Task("ctr"), Task("cvr", label="conv", output="probability", weight=0.5)]
    trainer = Trainer(
        model, data, data, tasks=tasks, device="cpu", progress=False, log_every=1,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
    )  # fmt: skip
    result = trainer.fit()
    assert {"ctr/auc", "cvr/auc", "ctr/logloss", "cvr/logloss"} <= set(result.metrics)
    assert result.metrics["ctr/auc"] > 0.8


def test_bad_arguments_are_named() -> None:
    model = Toy()
    with pytest.raises(ValueError, match="grad_accumulation"):
        Trainer(model, toy_data(), grad_accumulation=0, device="cpu")
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpointer"):
        Trainer(model, toy_data(), checkpoint_every=3, device="cpu")
    with pytest.raises(ValueError, match="precision"):
        Trainer(model, toy_data(), precision="int8", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'click'"):
        Trainer(
            model, toy_data(), tasks=[Task("ctr", label="click")], device="cpu", progress=False
        ).fit()
