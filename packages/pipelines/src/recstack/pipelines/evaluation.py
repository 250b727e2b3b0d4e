"""Evaluating a model: every task's exact metrics over a whole evaluation set."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recstack.core import JaggedTensor, hash64
from recstack.pipelines.metrics import MetricCollection
from recstack.pipelines.stream import BatchStream
from recstack.pipelines.tasks import Task, predictions_of

__all__ = ["evaluate_model", "group_ids", "task_metrics", "update_metrics"]


def group_ids(column: object, name: str) -> torch.Tensor:
    """GAUC group ids from a batch column: integer ids as they are, strings (a
    ``JaggedTensor`` of bytes) as their 64-bit hash.

    Raises:
        TypeError: a column of another kind (named).
    """
    if isinstance(column, JaggedTensor):
        return hash64(column, check_offsets=False)
    if isinstance(column, torch.Tensor) and not column.dtype.is_floating_point:
        return column.reshape(-1).long()
    kind = f"a {column.dtype} tensor" if isinstance(column, torch.Tensor) else type(column).__name__
    raise TypeError(f"group column {name!r} must hold integer ids or strings, got {kind}")


def task_metrics(tasks: Sequence[Task]) -> MetricCollection:
    """An empty :class:`MetricCollection` of every task's metrics."""
    return MetricCollection({t.name: tuple(t.metrics) for t in tasks})


def update_metrics(
    metrics: MetricCollection,
    inputs: Mapping[str, Any],
    preds: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
) -> int:
    """Add one batch's predictions (the model's outputs by task) to ``metrics``, with the
    labels and GAUC groups from ``inputs``; return the batch's rows.

    Raises:
        KeyError: a task's label column is not a tensor in the batch (named).
    """
    labels = {}
    for t in tasks:
        label = inputs.get(t.label)
        if not isinstance(label, torch.Tensor):
            raise KeyError(
                f"task {t.name!r}: label column {t.label!r} is not a tensor in the batch"
            )
        labels[t.name] = label.reshape(-1)
    probs = {t.name: t.probability(preds[t.name]) for t in tasks}
    groups = {t.name: group_ids(inputs.get(t.group), t.group) for t in tasks if t.group}
    metrics.update(probs, labels, groups or None)
    return int(next(iter(probs.values())).shape[0])


def evaluate_model(
    model: nn.Module,
    data: Iterable[Any],
    tasks: Sequence[Task],
    *,
    device: torch.device | None = None,
    features: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Run ``model`` in eval mode under ``torch.no_grad()`` over ``data`` and return the
    tasks' metrics, ``{"<task>/<metric>": value, ..., "samples": rows}``.

    A source with ``set_epoch`` (a ``ColumnReader``) is rewound to the start of epoch 0
    first, so every evaluation reads the same rows. The model's train/eval mode is
    restored afterwards.

    Args:
        model: the model (returns logits or probabilities per task, see :class:`Task`).
        data: batches (a ``BatchStream``, or any iterable of batch dicts).
        tasks: the tasks and their metrics.
        device: where batches go (default: the model's first parameter's device, else CPU).
        features: applied to each batch first (a ``FeatureEngine``).
        autocast: a factory of the autocast context for the forward (``None``: none).
        max_batches: read at most this many batches.
    """
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    if isinstance(data, BatchStream):
        source: Any = data.source
        stream = data
    else:
        source, stream = data, None
    rewind = getattr(source, "set_epoch", None)
    if callable(rewind):
        rewind(0)
    if stream is None:
        stream = BatchStream(source, device)
    metrics = task_metrics(tasks)
    was_training = model.training
    model.eval()
    rows = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(stream):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = features(batch) if features is not None else batch
                with autocast() if autocast is not None else contextlib.nullcontext():
                    outputs = model(inputs)
                preds = predictions_of(outputs, tasks)
                rows += update_metrics(metrics, inputs, preds, tasks)
    finally:
        model.train(was_training)
    out = (
        metrics.compute()
        if rows
        else {f"{t.name}/{m}": float("nan") for t in tasks for m in t.metrics}
    )
    out["samples"] = float(rows)
    return out
