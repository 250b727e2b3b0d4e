"""MetricCollection: the metrics of every task of a multi-task model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from recstack.pipelines.metrics.accumulator import BinaryMetrics
from recstack.pipelines.metrics.types import DEFAULT_METRICS, GAUCWeighting, MetricName

__all__ = ["MetricCollection"]

PerTask = torch.Tensor | Mapping[str, torch.Tensor]


class MetricCollection:
    """One :class:`BinaryMetrics` per named task, updated and computed together.

    Args:
        tasks: the task names (every task gets ``metrics``), or a mapping from each task
            name to its own metric names.
        metrics: the metrics of each task when ``tasks`` is a sequence.
        gauc_weighting: how GAUC weights each group (see ``GAUCWeighting``).
        process_group: the group to gather from (default: the default group).
        gather: gather across ranks in :meth:`compute` when ``torch.distributed`` is
            initialized.
        device: the device every batch must be on (see :class:`BinaryMetrics`).

    Examples:
        >>> import torch
        >>> mc = MetricCollection({"ctr": ["auc"], "cvr": ["auc", "logloss"]})
        >>> mc.update(
        ...     torch.tensor([[0.9, 0.5], [0.2, 0.4], [0.6, 0.1]]),  # (N, tasks) in task order
        ...     {"ctr": torch.tensor([1, 0, 0]), "cvr": torch.tensor([1, 0, 1])},
        ... )
        >>> sorted(mc.compute())
        ['ctr/auc', 'cvr/auc', 'cvr/logloss']
    """

    def __init__(
        self,
        tasks: Sequence[str] | Mapping[str, Sequence[MetricName]],
        metrics: Sequence[MetricName] = DEFAULT_METRICS,
        *,
        gauc_weighting: GAUCWeighting = "impressions",
        process_group: dist.ProcessGroup | None = None,
        gather: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(tasks, str):
            raise TypeError(
                f"MetricCollection: tasks must be a sequence of names, got the string {tasks!r}"
            )
        per_task = (
            {name: tuple(m) for name, m in tasks.items()}
            if isinstance(tasks, Mapping)
            else {name: tuple(metrics) for name in tasks}
        )
        if not per_task:
            raise ValueError("MetricCollection: no tasks")
        for name in per_task:
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"MetricCollection: task names must be non-empty strings, got {name!r}"
                )
        if not isinstance(tasks, Mapping) and len(per_task) != len(tasks):
            raise ValueError(f"MetricCollection: task names repeat: {list(tasks)}")
        self.tasks: tuple[str, ...] = tuple(per_task)
        self._metrics = {
            name: BinaryMetrics(
                m,
                name=name,
                gauc_weighting=gauc_weighting,
                process_group=process_group,
                gather=gather,
                device=device,
            )
            for name, m in per_task.items()
        }

    def __getitem__(self, task: str) -> BinaryMetrics:
        """The :class:`BinaryMetrics` of ``task``.

        Args:
            task: a task name.
        """
        try:
            return self._metrics[task]
        except KeyError:
            raise KeyError(
                f"MetricCollection: no task {task!r} (tasks: {list(self.tasks)})"
            ) from None

    def reset(self) -> None:
        """Forget every batch of every task."""
        for m in self._metrics.values():
            m.reset()

    def update(
        self,
        preds: PerTask,
        labels: PerTask,
        groups: PerTask | None = None,
        weights: PerTask | None = None,
    ) -> None:
        """Add one batch to every task; no host sync.

        Args:
            preds: a mapping from task name to its predictions (extra keys are ignored),
                or one tensor of shape (N, number of tasks) with a column per task in
                task order ((N,) for a single task).
            labels: the labels, as a mapping or a tensor laid out like ``preds``.
            groups: group ids shared by every task (a tensor), or a mapping from task name
                to its own; needed by the tasks evaluating GAUC.
            weights: sample weights shared by every task (a tensor), or a mapping from task
                name to its own (a task left out weighs its rows 1).
        """
        p = self._columns(preds, "preds")
        y = self._columns(labels, "labels")
        for name in self.tasks:
            self._metrics[name].update(
                p[name], y[name], _shared(groups, name), _shared(weights, name)
            )

    def compute(self) -> dict[str, float]:
        """Every task's metrics, keyed ``"<task>/<metric>"`` (a collective when gathering).

        Returns:
            The flat dict, tasks in order, each task's metrics as
            :meth:`BinaryMetrics.compute` returns them.
        """
        out: dict[str, float] = {}
        for name in self.tasks:
            for key, value in self._metrics[name].compute().items():
                out[f"{name}/{key}"] = value
        return out

    def _columns(self, x: PerTask, what: str) -> Mapping[str, Any]:
        if isinstance(x, Mapping):
            missing = [t for t in self.tasks if t not in x]
            if missing:
                raise KeyError(f"MetricCollection: {what} has no entry for tasks {missing}")
            return x
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"MetricCollection: {what} must be a tensor or a mapping from task name to "
                f"tensor, got {type(x).__name__}"
            )
        t = len(self.tasks)
        if t == 1 and x.dim() == 1:
            return {self.tasks[0]: x}
        if x.dim() != 2 or x.shape[1] != t:
            raise ValueError(
                f"MetricCollection: {what} tensor must have shape (N, {t}), one column per "
                f"task {list(self.tasks)}, got {tuple(x.shape)}"
            )
        return {name: x[:, i] for i, name in enumerate(self.tasks)}


def _shared(x: PerTask | None, task: str) -> torch.Tensor | None:
    if isinstance(x, Mapping):
        return x.get(task)
    return x
