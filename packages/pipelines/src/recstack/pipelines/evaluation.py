"""Evaluating a model: every task's exact metrics over a whole evaluation set, and the
mean of every loss the model computes itself."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import JaggedTensor, hash64
from recstack.pipelines.metrics import MetricCollection
from recstack.pipelines.metrics.gather import gather_world
from recstack.pipelines.stream import BatchStream
from recstack.pipelines.tasks import Task, batch_rows, predictions_of

__all__ = ["TaskMetrics", "evaluate_model", "group_ids", "task_metrics", "update_metrics"]


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


class TaskMetrics:
    """What an evaluation of the tasks accumulates: a :class:`MetricCollection` of the
    tasks with labels, and for each loss task (``output="loss"``) the sum of its values
    weighted by their batches' rows.

    :meth:`compute` reports each loss task as ``"<task>/loss"``, the row-weighted mean of
    its value over the batches seen. With ``torch.distributed`` initialized (more than one
    rank, as the collection gathers), the sums and rows are summed over the default group
    first, so every rank reports the same value; :meth:`compute` is then a collective.

    Args:
        tasks: the tasks.

    Attributes:
        tasks: the tasks, in order.
        collection: the metrics of the tasks that are not loss tasks (``None`` when every
            task is one).
        rows: the rows of the batches added on this rank.
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks: tuple[Task, ...] = tuple(tasks)
        per_task = {t.name: tuple(t.metrics) for t in self.tasks if not t.is_loss}
        self.collection: MetricCollection | None = MetricCollection(per_task) if per_task else None
        self.rows = 0
        self._loss_names = [t.name for t in self.tasks if t.is_loss]
        self._loss_sums: dict[str, torch.Tensor] = {}

    @property
    def distributed(self) -> bool:
        """Whether :meth:`compute` is a collective (every rank must call it)."""
        return gather_world(None) > 1

    def add_losses(self, preds: Mapping[str, torch.Tensor], rows: int) -> None:
        """Add one batch's loss values, each weighted by the batch's rows; no host sync.

        Args:
            preds: the model's outputs by task name (:func:`predictions_of`), holding
                every loss task's value.
            rows: the batch's rows.
        """
        for name in self._loss_names:
            term = preds[name].detach().double().reshape(()) * rows
            old = self._loss_sums.get(name)
            self._loss_sums[name] = term if old is None else old + term
        self.rows += rows

    def loss_means(self) -> dict[str, float]:
        """Each loss task's row-weighted mean value, keyed ``"<task>/loss"`` (``nan``
        without rows; a collective when :attr:`distributed`)."""
        if not self._loss_names:
            return {}
        distributed = self.distributed
        # NCCL moves only CUDA memory, the others host memory (as the metrics' gather).
        on_cuda = distributed and dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else None
        sums = torch.zeros(len(self._loss_names) + 1, dtype=torch.float64, device=device)
        for i, name in enumerate(self._loss_names):
            if name in self._loss_sums:
                sums[i] = self._loss_sums[name].to(sums.device)
        sums[-1] = self.rows
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        *totals, rows = sums.tolist()
        return {
            f"{name}/loss": total / rows if rows else float("nan")
            for name, total in zip(self._loss_names, totals, strict=True)
        }

    def compute(self) -> dict[str, float]:
        """Every task's results in task order: ``"<task>/<metric>"`` as
        :meth:`MetricCollection.compute` gives them, ``"<task>/loss"`` for a loss task
        (a collective when :attr:`distributed`)."""
        losses = self.loss_means()
        out: dict[str, float] = {}
        for t in self.tasks:
            if t.is_loss:
                out[f"{t.name}/loss"] = losses[f"{t.name}/loss"]
                continue
            assert self.collection is not None
            for key, value in self.collection[t.name].compute().items():
                out[f"{t.name}/{key}"] = value
        return out

    def undefined(self) -> dict[str, float]:
        """Every key :meth:`compute` gives (bar GAUC's group counts) as ``nan``: the
        results of no rows, computed without a collective."""
        return {
            key: float("nan")
            for t in self.tasks
            for key in ([f"{t.name}/loss"] if t.is_loss else [f"{t.name}/{m}" for m in t.metrics])
        }


def task_metrics(tasks: Sequence[Task]) -> TaskMetrics:
    """An empty :class:`TaskMetrics` of every task: the metrics of the tasks with labels,
    the mean value of the loss tasks.

    Args:
        tasks: the tasks.
    """
    return TaskMetrics(tasks)


def update_metrics(
    metrics: TaskMetrics,
    inputs: Mapping[str, Any],
    preds: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
) -> int:
    """Add one batch's predictions (the model's outputs by task) to ``metrics``, with the
    labels and GAUC groups from ``inputs``, and the loss tasks' values; return the batch's
    rows (:func:`~recstack.pipelines.tasks.batch_rows`).

    Args:
        metrics: what :func:`task_metrics` built for ``tasks``.
        inputs: the batch the model was given.
        preds: the model's outputs by task name (:func:`predictions_of`).
        tasks: the tasks.

    Raises:
        KeyError: a task's label column is not a tensor in the batch (named).
    """
    labelled = [t for t in tasks if not t.is_loss]
    labels = {}
    for t in labelled:
        label = inputs.get(t.label)
        if not isinstance(label, torch.Tensor):
            raise KeyError(
                f"task {t.name!r}: label column {t.label!r} is not a tensor in the batch"
            )
        labels[t.name] = label.reshape(-1)
    rows = batch_rows(preds, inputs, tasks)
    if metrics.collection is not None:
        probs = {t.name: t.probability(preds[t.name]) for t in labelled}
        groups = {t.name: group_ids(inputs.get(t.group), t.group) for t in labelled if t.group}
        metrics.collection.update(probs, labels, groups or None)
    metrics.add_losses(preds, rows)
    return rows


def evaluate_model(
    model: nn.Module,
    data: Iterable[Any],
    tasks: Sequence[Task],
    *,
    device: torch.device | None = None,
    features: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    max_batches: int | None = None,
    all_have_batch: Callable[[bool], bool] | None = None,
) -> dict[str, float]:
    """Run ``model`` in eval mode under ``torch.no_grad()`` over ``data`` and return the
    tasks' metrics, ``{"<task>/<metric>": value, ..., "samples": rows}`` (over every rank,
    with ``torch.distributed`` initialized); a loss task
    (``output="loss"``) gives ``"<task>/loss"``, its mean value weighted by the batches'
    rows.

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
        all_have_batch: for a model whose forward is a collective (sharded tables):
            called before each batch with whether this rank has one; the evaluation ends
            when it returns ``False`` (some rank has none), on every rank at once.
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
            batches = iter(stream)
            for i in itertools.count():
                batch = (
                    None if max_batches is not None and i >= max_batches else next(batches, None)
                )
                if all_have_batch is not None and not all_have_batch(batch is not None):
                    break
                if batch is None:
                    break
                inputs = features(batch) if features is not None else batch
                with autocast() if autocast is not None else contextlib.nullcontext():
                    outputs = model(inputs)
                preds = predictions_of(outputs, tasks)
                rows += update_metrics(metrics, inputs, preds, tasks)
    finally:
        model.train(was_training)
    # Across ranks every rank joins the collectives, also one that read no rows.
    out = metrics.compute() if rows or metrics.distributed else metrics.undefined()
    if metrics.distributed:
        total = torch.tensor([rows], dtype=torch.float64, device=_group_device())
        dist.all_reduce(total)
        rows = int(total.item())
    out["samples"] = float(rows)
    return out


def _group_device() -> torch.device:
    """Where the default group's collectives take tensors (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
