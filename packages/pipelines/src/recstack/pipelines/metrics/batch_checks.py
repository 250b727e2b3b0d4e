"""Checks and normalizes one batch of metric inputs without reading device memory.

Shape, dtype and device problems are visible on the host and raise at once. Value problems
(NaN predictions, labels other than 0/1, negative weights) need the data itself, so they are
counted on the device and reported by :func:`raise_value_problems` when the caller may sync
(``compute()``, or a one-shot functional metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BAD_LABELS",
    "BAD_WEIGHTS",
    "NAN_PREDS",
    "NUM_PROBLEMS",
    "OUT_OF_RANGE_PREDS",
    "Batch",
    "check_batch",
    "raise_value_problems",
    "value_problems",
]

# Column order of the value-problem counters (a small int64 tensor on the data's device).
NAN_PREDS, OUT_OF_RANGE_PREDS, BAD_LABELS, BAD_WEIGHTS = range(4)
NUM_PROBLEMS = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Batch:
    """One batch, flattened to 1-D: predictions as float32 (float64 when given in
    float64: every float16/bfloat16/float32 value is exact in float32), labels as uint8,
    groups as int64 and weights as float64."""

    preds: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None
    weights: torch.Tensor | None
    problems: torch.Tensor  # NUM_PROBLEMS int64 counts (see value_problems)


def _as_tensor(x: Any, what: str, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{where}: {what} must be a tensor, got {type(x).__name__}") from e


def _flat(x: torch.Tensor, what: str, where: str) -> torch.Tensor:
    # (N,) or (N, 1) only: flattening a (N, T) multi-task output into one task would mix
    # tasks silently.
    if x.dim() == 1:
        return x
    if x.dim() == 2 and x.shape[1] == 1:
        return x.reshape(-1)
    raise ValueError(
        f"{where}: {what} must have shape (N,) or (N, 1), got {tuple(x.shape)} "
        "(use MetricCollection for one column per task)"
    )


def _copy_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A copy, not a view: callers may reuse their output buffers for the next batch.
    return x.to(dtype=dtype, copy=True)


def check_batch(
    preds: Any,
    labels: Any,
    groups: Any = None,
    weights: Any = None,
    *,
    where: str,
    need_groups: bool = False,
    keep_groups: bool = True,
) -> Batch:
    """Check shapes, dtypes and devices of one batch and return its normalized copy.

    Args:
        preds: predicted scores, shape (N,) or (N, 1), a floating dtype.
        labels: 0/1 labels (bool, integer or floating), same number of rows.
        groups: integer group ids (e.g. hashed user ids), or ``None``.
        weights: non-negative sample weights, or ``None``.
        where: who is checking, for error messages (``"auc"``, ``"task 'ctr'"``).
        need_groups: raise when ``groups`` is missing (GAUC is requested).
        keep_groups: keep ``groups`` in the result (``False`` drops them unchecked).
    """
    p = _flat(_as_tensor(preds, "preds", where), "preds", where)
    y = _flat(_as_tensor(labels, "labels", where), "labels", where)
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{where}: preds must be float16, bfloat16, float32 or float64, got {p.dtype}"
        )
    if y.dtype.is_complex:
        raise TypeError(f"{where}: labels must be bool, integer or floating, got {y.dtype}")
    n = p.shape[0]
    _same_rows(y, n, "labels", where)
    _same_device(y, p, "labels", where)
    g = None
    w = None
    if need_groups and groups is None:
        raise ValueError(f"{where}: gauc needs groups (one integer group id per row)")
    if groups is not None and (keep_groups or need_groups):
        g = _flat(_as_tensor(groups, "groups", where), "groups", where)
        if g.dtype.is_floating_point or g.dtype.is_complex or g.dtype == torch.bool:
            raise TypeError(
                f"{where}: groups must be integer ids, got {g.dtype} "
                "(hash string ids first, e.g. with recstack.core.hash64)"
            )
        _same_rows(g, n, "groups", where)
        _same_device(g, p, "groups", where)
        g = _copy_to(g, torch.int64)
    if weights is not None:
        w = _flat(_as_tensor(weights, "weights", where), "weights", where)
        if w.dtype.is_complex or w.dtype == torch.bool:
            raise TypeError(f"{where}: weights must be integer or floating, got {w.dtype}")
        _same_rows(w, n, "weights", where)
        _same_device(w, p, "weights", where)
    # Counted before the casts, which would turn a 0.5 or NaN label into a valid 0.
    problems = value_problems(p, y, w)
    stored = torch.float64 if p.dtype == torch.float64 else torch.float32
    return Batch(
        _copy_to(p, stored),
        _copy_to(y, torch.uint8),
        g,
        None if w is None else _copy_to(w, torch.float64),
        problems,
    )


def _same_rows(x: torch.Tensor, n: int, what: str, where: str) -> None:
    if x.shape[0] != n:
        raise ValueError(f"{where}: {n} preds but {x.shape[0]} {what}")


def _same_device(x: torch.Tensor, p: torch.Tensor, what: str, where: str) -> None:
    if x.device != p.device:
        raise ValueError(f"{where}: preds are on {p.device} but {what} on {x.device}")


def value_problems(preds: Any, labels: Any, weights: Any = None) -> torch.Tensor:
    """Count bad values of one batch on its device (no host sync).

    Args:
        preds: the batch's predictions, as given (before any cast).
        labels: the batch's labels, as given (before the cast to uint8, which would hide
            a 0.5 or a NaN label).
        weights: the batch's weights as given, or ``None``.

    Returns:
        An int64 tensor of :data:`NUM_PROBLEMS` counts: NaN predictions, predictions
        outside ``[0, 1]`` (an error only for the probability metrics), labels other than
        0 and 1, and negative or non-finite weights.
    """
    p = preds.detach().reshape(-1)
    y = labels.detach().reshape(-1)
    counts = [
        torch.isnan(p).sum(),
        ((p < 0) | (p > 1)).sum(),
        ((y != 0) & (y != 1)).sum(),
    ]
    if weights is None:
        counts.append(torch.zeros((), dtype=torch.int64, device=p.device))
    else:
        w = weights.detach().reshape(-1)
        counts.append((~torch.isfinite(w) | (w < 0)).sum())
    return torch.stack([c.to(torch.int64) for c in counts])


def raise_value_problems(counts: list[int], where: str, need_probabilities: bool) -> None:
    """Raise a clear error for the first kind of bad value counted by
    :func:`value_problems` (summed over batches and ranks).

    Args:
        counts: the :data:`NUM_PROBLEMS` counts, read back to the host.
        where: who is checking, for the message.
        need_probabilities: whether predictions must lie in ``[0, 1]`` (logloss,
            calibration and NE do; AUC and GAUC accept any real scores).
    """
    if counts[NAN_PREDS]:
        raise ValueError(f"{where}: {counts[NAN_PREDS]} predictions are NaN")
    if counts[BAD_LABELS]:
        raise ValueError(
            f"{where}: {counts[BAD_LABELS]} labels are not 0 or 1 (labels must be binary)"
        )
    if counts[BAD_WEIGHTS]:
        raise ValueError(f"{where}: {counts[BAD_WEIGHTS]} weights are negative, infinite or NaN")
    if need_probabilities and counts[OUT_OF_RANGE_PREDS]:
        raise ValueError(
            f"{where}: {counts[OUT_OF_RANGE_PREDS]} predictions are outside [0, 1]; "
            "logloss, calibration and ne need probabilities (apply torch.sigmoid to logits)"
        )
