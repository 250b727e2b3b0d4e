"""BinaryMetrics: exact metrics of one binary task, accumulated batch by batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from recstack.pipelines.metrics.batch_checks import (
    NUM_PROBLEMS,
    Batch,
    check_batch,
    raise_value_problems,
)
from recstack.pipelines.metrics.compute import (
    PROBABILITY_METRICS,
    EvalSet,
    check_metric_names,
    check_weighting,
    compute_metrics,
)
from recstack.pipelines.metrics.gather import gather_eval_set, gather_world
from recstack.pipelines.metrics.types import DEFAULT_METRICS, GAUCWeighting, MetricName

__all__ = ["BinaryMetrics"]


class BinaryMetrics:
    """Exact AUC, GAUC, log-loss, calibration and NE of one binary task over a whole
    evaluation set, fed one batch at a time.

    :meth:`update` keeps each batch on its device (a copy: predictions as float32, or
    float64 when given so; labels as uint8; groups as int64; weights as float64) and never
    syncs with the host. :meth:`compute` concatenates everything, gathers it from every
    rank when ``torch.distributed`` is initialized, checks the values, and computes every
    metric on the device, reading the results back once. Memory therefore grows with the
    evaluation set (about 5 bytes a row, plus 8 for groups and 8 for weights on each
    rank after the gather); :meth:`reset` frees it.

    Args:
        metrics: names from ``METRIC_NAMES`` (default ``DEFAULT_METRICS``: everything but
            ``"gauc"``, which needs ``groups`` in every :meth:`update`).
        name: the task's name, used in errors and warnings.
        gauc_weighting: how GAUC weights each group (see ``GAUCWeighting``).
        process_group: the group to gather from (default: the default group).
        gather: gather across ranks in :meth:`compute` when ``torch.distributed`` is
            initialized; ``False`` computes this rank's metrics only.
        device: the device every batch must be on; it also holds the (empty) state of a
            rank that gets no batch. By default the first batch's device.

    Examples:
        >>> import torch
        >>> m = BinaryMetrics(["auc", "logloss"])
        >>> m.update(torch.tensor([0.1, 0.4]), torch.tensor([0, 0]))
        >>> m.update(torch.tensor([0.35, 0.8]), torch.tensor([1, 1]))
        >>> round(m.compute()["auc"], 4)
        0.75
    """

    def __init__(
        self,
        metrics: Sequence[MetricName] = DEFAULT_METRICS,
        *,
        name: str = "",
        gauc_weighting: GAUCWeighting = "impressions",
        process_group: dist.ProcessGroup | None = None,
        gather: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.name = name
        self._where = f"task {name!r}" if name else "BinaryMetrics"
        self.metrics = check_metric_names(metrics, self._where)
        check_weighting(gauc_weighting, self._where)
        self.gauc_weighting: GAUCWeighting = gauc_weighting
        self.process_group = process_group
        self.gather = gather
        self.device = None if device is None else _indexed(torch.device(device))
        self._batches: list[Batch] = []  # merged into one by compute()
        self._updates = 0
        self._device: torch.device | None = self.device

    @property
    def needs_groups(self) -> bool:
        """Whether :meth:`update` must be given ``groups`` (GAUC is requested)."""
        return "gauc" in self.metrics

    def reset(self) -> None:
        """Forget every batch (and free its memory)."""
        self._batches = []
        self._updates = 0
        self._device = self.device

    def update(
        self,
        preds: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. Shapes, dtypes and devices are checked now; values (NaN, labels
        other than 0/1, negative weights) are counted on the device and raise in
        :meth:`compute`, so this never waits for the device.

        Args:
            preds: scores, shape (N,) or (N, 1), a floating dtype; probabilities in
                ``[0, 1]`` for logloss, calibration and NE, any real score for AUC/GAUC.
            labels: 0/1 labels (bool, integer or floating), N of them.
            groups: integer group id per row (e.g. a hashed user id); required with GAUC,
                ignored otherwise.
            weights: optional non-negative sample weights; rows of batches given none
                weigh 1.
        """
        batch = check_batch(
            preds,
            labels,
            groups,
            weights,
            where=self._where,
            need_groups=self.needs_groups,
            keep_groups=self.needs_groups,
        )
        device = batch.preds.device
        if self._device is not None and device != self._device:
            raise ValueError(
                f"{self._where}: this batch is on {device} but the metrics' device is "
                f"{self._device} (set by the device argument or the first batch)"
            )
        self._device = device
        self._batches.append(batch)
        self._updates += 1

    @property
    def num_batches(self) -> int:
        """How many batches :meth:`update` has received since the last :meth:`reset`."""
        return self._updates

    def _local(self) -> tuple[EvalSet, torch.Tensor]:
        if not self._batches:
            device = self._device or _default_device(self.gather, self.process_group)
            empty = Batch(
                torch.empty(0, dtype=torch.float32, device=device),
                torch.empty(0, dtype=torch.uint8, device=device),
                torch.empty(0, dtype=torch.int64, device=device) if self.needs_groups else None,
                None,
                torch.zeros(NUM_PROBLEMS, dtype=torch.int64, device=device),
            )
            self._batches = [empty]
        if len(self._batches) > 1:
            self._batches = [_concat(self._batches)]  # later computes reuse the one copy
        b = self._batches[0]
        return EvalSet(b.preds, b.labels, b.groups, b.weights), b.problems

    def compute(self) -> dict[str, float]:
        """Every requested metric over all batches (of all ranks, when gathering).

        With ``torch.distributed`` initialized and ``gather`` on, every rank of the group
        must call this (it is a collective) and gets the same global values.

        Returns:
            ``{"auc": ..., "logloss": ..., ...}`` in the order the metrics were requested;
            GAUC adds ``"gauc_groups"`` and ``"gauc_skipped_groups"`` (ints). An undefined
            metric (no examples, a single class, no positives) is ``nan``, with one
            ``UndefinedMetricWarning`` naming it and why.

        Raises:
            ValueError: a prediction was NaN, a label not 0/1, a weight negative or not
                finite, or (for logloss, calibration, NE) a prediction outside ``[0, 1]``.
        """
        data, problems = self._local()
        if self.gather and gather_world(self.process_group) > 1:
            data, counts = gather_eval_set(data, problems, self.process_group)
        else:
            counts = problems.tolist()
        need_probabilities = not PROBABILITY_METRICS.isdisjoint(self.metrics)
        raise_value_problems(counts, self._where, need_probabilities)
        # Stack: caller -> compute -> evaluate.
        return compute_metrics(
            data, self.metrics, weighting=self.gauc_weighting, where=self._where, stacklevel=2
        )


def _indexed(device: torch.device) -> torch.device:
    # Tensors always report an index ("cuda:0"), so a bare "cuda" would never match.
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _default_device(gather: bool, group: dist.ProcessGroup | None) -> torch.device:
    # A rank that saw no batch still joins the gather; NCCL can only move CUDA memory.
    if gather and gather_world(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _concat(batches: list[Batch]) -> Batch:
    weighted = any(b.weights is not None for b in batches)

    def weights_of(b: Batch) -> torch.Tensor:
        if b.weights is not None:
            return b.weights
        return torch.ones(b.preds.numel(), dtype=torch.float64, device=b.preds.device)

    return Batch(
        torch.cat([b.preds for b in batches]),
        torch.cat([b.labels for b in batches]),
        None if batches[0].groups is None else torch.cat([b.groups for b in batches]),
        torch.cat([weights_of(b) for b in batches]) if weighted else None,
        torch.stack([b.problems for b in batches]).sum(0),
    )
