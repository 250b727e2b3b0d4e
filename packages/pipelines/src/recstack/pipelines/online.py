"""Online learning: train over a stream cut into windows, with progressive validation."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recstack.core.checks import check_int
from recstack.pipelines.evaluation import TaskMetrics, task_metrics, update_metrics
from recstack.pipelines.signals import StopSignals
from recstack.pipelines.stream import BatchStream
from recstack.pipelines.tasks import predictions_of

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["OnlineResult", "WindowReport", "run_online"]


@dataclass
class WindowReport:
    """One window of an online run.

    Attributes:
        window: the window's index (from the stream's ``EndOfWindow``).
        rows: rows trained on in it.
        step: the optimizer step at its end.
        metrics: progressive-validation metrics: every row predicted by the model as it
            was just before training on that row's batch; a loss task (``output="loss"``)
            gives ``"<task>/loss"``, its value's mean weighted by the batches' rows.
        checkpoint: the checkpoint written at its end (``None`` without a checkpointer).
        delta: whether that checkpoint is a delta.
    """

    window: int
    rows: int
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None = None
    delta: bool = False


@dataclass
class OnlineResult:
    """What :func:`run_online` did.

    Attributes:
        windows: a report per window completed in this call.
        step: optimizer steps in total.
        resumed_from: the checkpoint step the run resumed from, or ``None``.
        stopped_by: ``"SIGTERM"``, ``"SIGINT"``, ``"callback"``, ``"max_windows"`` or
            ``None`` when the stream ended.
        seconds: wall time of this call.
    """

    windows: list[WindowReport] = field(default_factory=list)
    step: int = 0
    resumed_from: int | None = None
    stopped_by: str | None = None
    seconds: float = 0.0


def run_online(
    trainer: Trainer,
    *,
    full_every: int = 10,
    max_windows: int | None = None,
    resume: bool = True,
) -> OnlineResult:
    """Train ``trainer`` over its training stream window by window.

    Each batch is first predicted with the model in eval mode (progressive validation:
    the model has not trained on it yet), then trained on. At each ``EndOfWindow`` the
    window's metrics are computed and passed to the callbacks' ``on_eval_end`` (with a
    ``"window"`` entry), and a checkpoint is written: a delta of the rows changed in the
    window (plus the dense state), or a full checkpoint for the first window and every
    ``full_every``-th one. A restarted run resumes after the last complete window; a
    window cut short by a crash is trained again from its start.

    Args:
        trainer: a trainer built on a ``StreamingReader`` (or any iterable yielding
            batches and end-of-window markers with an int ``window`` attribute).
        full_every: write a full checkpoint every this many windows (deltas between).
        max_windows: stop after this many windows in this call.
        resume: continue from the checkpointer's latest checkpoint when there is one.
    """
    check_int(full_every, "run_online: full_every", minimum=1)
    t0 = time.perf_counter()
    trainer.train_stream = BatchStream(trainer.train_stream.source, trainer.device, markers=True)
    result = OnlineResult(resumed_from=trainer.restore() if resume else None)
    trainer._position.apply(trainer.stage)  # noqa: SLF001 - the restored data position
    state = trainer.online_state
    metrics = _new_metrics(trainer)
    rows = 0
    trainer.should_stop = False
    trainer.model.train()
    with StopSignals() as signals:
        for c in trainer.callbacks:
            c.on_fit_start(trainer)
        for item in trainer.train_stream:
            if not isinstance(item, Mapping):
                window = getattr(item, "window", None)
                if window is None:
                    continue
                report = _end_window(trainer, int(window), rows, metrics, state, full_every)
                result.windows.append(report)
                metrics, rows = _new_metrics(trainer), 0
                if max_windows is not None and len(result.windows) >= max_windows:
                    result.stopped_by = "max_windows"
                    break
            else:
                rows += _predict_then_train(trainer, dict(item), metrics)
            if signals.received is not None:
                result.stopped_by = signals.received.name
                break
            if trainer.should_stop:
                result.stopped_by = "callback"
                break
        if trainer.checkpointer is not None:
            trainer.checkpointer.wait()
        for c in trainer.callbacks:
            c.on_fit_end(trainer)
    result.step = trainer.step
    result.seconds = time.perf_counter() - t0
    return result


def _new_metrics(trainer: Trainer) -> TaskMetrics:
    return task_metrics(trainer.tasks)


def _predict_then_train(trainer: Trainer, batch: dict[str, Any], metrics: TaskMetrics) -> int:
    inputs = trainer._inputs(batch)  # noqa: SLF001 - once: the training step reuses it
    model = trainer.model
    model.eval()
    with torch.no_grad(), trainer._autocast():  # noqa: SLF001
        preds = predictions_of(model(inputs), trainer.tasks)
    model.train()
    rows = update_metrics(metrics, inputs, preds, trainer.tasks)
    trainer._train_step([inputs], featurized=True)  # noqa: SLF001
    trainer._after_step()  # noqa: SLF001
    return rows


def _end_window(
    trainer: Trainer,
    window: int,
    rows: int,
    metrics: TaskMetrics,
    state: dict[str, Any],
    full_every: int,
) -> WindowReport:
    # Across ranks every rank joins the collectives, also one whose window was empty.
    values = metrics.compute() if rows or metrics.distributed else {}
    values = {**values, "window": float(window), "samples": float(rows)}
    trainer.last_metrics = {**values, "step": trainer.step}
    for c in trainer.callbacks:
        c.on_eval_end(trainer, trainer.step, values)
    report = WindowReport(window, rows, trainer.step, values)
    state["windows"] = int(state.get("windows", 0)) + 1
    state["last_window"] = window
    ckpt = trainer.checkpointer
    if ckpt is not None:
        done = state["windows"]
        full = (
            state.get("last_full") is None or (done - 1) % full_every == 0 or ckpt.latest() is None
        )
        if ckpt.latest() == trainer.step:
            report.checkpoint = ckpt.path(trainer.step)  # an empty window: nothing new
        else:
            report.checkpoint = trainer.save_checkpoint(delta=not full)
            report.delta = not full
            if full:
                state["last_full"] = trainer.step
    return report
