"""Names, result types and the warning shared by every metric."""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "GAUCResult",
    "GAUCWeighting",
    "MetricName",
    "UndefinedMetricWarning",
]

MetricName = Literal["auc", "gauc", "logloss", "calibration", "ne"]
"""A metric ``BinaryMetrics`` and ``MetricCollection`` compute."""

METRIC_NAMES: tuple[MetricName, ...] = get_args(MetricName)
"""Every metric name ``BinaryMetrics`` and ``MetricCollection`` understand."""

DEFAULT_METRICS: tuple[MetricName, ...] = ("auc", "logloss", "calibration", "ne")
"""The metrics evaluated when none are named (GAUC needs a group column, so it is opt-in)."""

GAUCWeighting = Literal["impressions", "clicks", "uniform"]
"""How GAUC weights each group's AUC: ``"impressions"`` (the group's total sample weight,
i.e. its number of rows without weights), ``"clicks"`` (its positive weight) or
``"uniform"`` (every group counts once)."""


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the data it was given (no examples, only one class, no
    positives) and was returned as ``nan``; scikit-learn warns the same way."""


class GAUCResult(NamedTuple):
    """The result of :func:`gauc`.

    Attributes:
        value: the weighted mean of the per-group AUCs (``nan`` when no group has both
            classes).
        groups: the number of distinct groups seen.
        skipped_groups: groups left out because they hold a single class (or no weight).
    """

    value: float
    groups: int
    skipped_groups: int
