"""Every requested metric of one whole evaluation set, read back in one host sync."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from recstack.pipelines.choices import check_choice
from recstack.pipelines.metrics.ranking import auc_terms, gauc_terms
from recstack.pipelines.metrics.types import (
    METRIC_NAMES,
    GAUCWeighting,
    MetricName,
    UndefinedMetricWarning,
)

__all__ = [
    "PROBABILITY_METRICS",
    "EvalSet",
    "check_metric_names",
    "check_weighting",
    "compute_metrics",
]

#: The metrics that need predictions in ``[0, 1]``.
PROBABILITY_METRICS = frozenset({"logloss", "calibration", "ne"})


@dataclass(frozen=True)
class EvalSet:
    """A whole evaluation set on one device, as :func:`recstack.pipelines.metrics.batch_checks.
    check_batch` normalizes it (``groups`` and ``weights`` may be ``None``)."""

    preds: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None
    weights: torch.Tensor | None


def check_metric_names(metrics: Sequence[str], where: str) -> tuple[MetricName, ...]:
    """The requested metric names as a tuple, after checking each is known and unique.

    Args:
        metrics: metric names (see :data:`METRIC_NAMES`).
        where: who is asking, for error messages.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    if not names:
        raise ValueError(f"{where}: no metrics requested (choose from {', '.join(METRIC_NAMES)})")
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(
                f"{where}: unknown metric {name!r} (choose from {', '.join(METRIC_NAMES)})"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: metric names repeat: {list(names)}")
    return cast(tuple[MetricName, ...], names)


def check_weighting(weighting: str, where: str) -> None:
    """Raise unless ``weighting`` is a :data:`GAUCWeighting`.

    Args:
        weighting: the GAUC weighting to check.
        where: who is asking, for error messages.
    """
    check_choice(weighting, f"{where}: gauc weighting", GAUCWeighting)


def compute_metrics(
    data: EvalSet,
    metrics: Sequence[MetricName],
    *,
    weighting: GAUCWeighting,
    where: str,
    stacklevel: int,
) -> dict[str, float]:
    """Compute ``metrics`` on ``data``; undefined ones are ``nan`` with one warning.

    Args:
        data: the evaluation set, values already checked.
        metrics: names from :data:`METRIC_NAMES`.
        weighting: the GAUC group weighting.
        where: who is computing, for the warning.
        stacklevel: the warning's stack level, counted from this function.
    """
    p = data.preds
    y = data.labels.to(torch.float64)
    pos_w = y if data.weights is None else data.weights * y
    neg_w = (1.0 - y) if data.weights is None else data.weights * (1.0 - y)
    del y
    terms: dict[str, torch.Tensor] = {
        "rows": torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device),
        "w_pos": pos_w.sum(),
        "w_neg": neg_w.sum(),
    }
    if "auc" in metrics:
        terms["pairs"] = auc_terms(p, pos_w, neg_w)[0]
    if "logloss" in metrics or "ne" in metrics:
        # Clipped like scikit-learn: to [eps, 1 - eps], eps of the predictions' dtype.
        eps = torch.finfo(p.dtype).eps
        clipped = p.to(torch.float64).clamp(eps, 1.0 - eps)
        terms["loss"] = -(pos_w * torch.log(clipped) + neg_w * torch.log1p(-clipped)).sum()
        del clipped
    if "calibration" in metrics:
        terms["pred_sum"] = ((pos_w + neg_w) * p.to(torch.float64)).sum()
    if "gauc" in metrics:
        if data.groups is None:
            raise ValueError(f"{where}: gauc needs groups (one integer group id per row)")
        g = gauc_terms(p, pos_w, neg_w, data.groups, weighting)
        terms.update(g_sum=g[0], g_weight=g[1], g_groups=g[2].double(), g_skipped=g[3].double())
    del pos_w, neg_w
    values = dict(zip(terms, torch.stack(list(terms.values())).tolist(), strict=True))
    return _results(values, metrics, where, stacklevel + 1)


def _entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1.0 - rate) * math.log1p(-rate))


def _results(
    v: dict[str, float], metrics: Sequence[str], where: str, stacklevel: int
) -> dict[str, float]:
    w_pos, w_neg = v["w_pos"], v["w_neg"]
    total = w_pos + w_neg
    empty = "no examples" if v["rows"] == 0 else ("all weights are 0" if total == 0 else None)
    one_class = None if w_pos > 0 and w_neg > 0 else "only one class is present in the labels"
    out: dict[str, float] = {}
    undefined: dict[str, str] = {}

    def put(name: str, reason: str | None, value: float) -> None:
        if reason is None:
            out[name] = value
        else:
            out[name] = math.nan
            undefined[name] = reason

    for name in metrics:
        if name == "auc":
            put(name, empty or one_class, v.get("pairs", 0.0) / (w_pos * w_neg or 1.0))
        elif name == "logloss":
            put(name, empty, v["loss"] / (total or 1.0))
        elif name == "calibration":
            no_pos = None if w_pos > 0 else "no positive labels, so the observed CTR is 0"
            put(name, empty or no_pos, v["pred_sum"] / (w_pos or 1.0))
        elif name == "ne":
            ok = empty is None and one_class is None
            value = v["loss"] / total / _entropy(w_pos / total) if ok else math.nan
            put(name, empty or one_class, value)
        elif name == "gauc":
            no_group = None if v["g_weight"] > 0 else "no group holds both classes"
            put(name, empty or no_group, v["g_sum"] / (v["g_weight"] or 1.0))
            out["gauc_groups"] = int(v["g_groups"])
            out["gauc_skipped_groups"] = int(v["g_skipped"])
    if undefined:
        detail = "; ".join(f"{name}: {reason}" for name, reason in undefined.items())
        warnings.warn(
            f"{where}: undefined metrics returned as nan ({detail})",
            UndefinedMetricWarning,
            stacklevel=stacklevel + 1,
        )
    return out
