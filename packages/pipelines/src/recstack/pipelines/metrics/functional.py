"""One-shot metrics: call on a whole evaluation set, get a Python float back.

Each function checks its inputs, computes on the inputs' device and reads the result back
once. Undefined results (no examples, a single class) are ``nan`` with an
:class:`~recstack.pipelines.metrics.UndefinedMetricWarning`. These forms never gather
across ranks: use :class:`~recstack.pipelines.metrics.BinaryMetrics` for that.
"""

from __future__ import annotations

from typing import Any

from recstack.pipelines.metrics.batch_checks import check_batch, raise_value_problems
from recstack.pipelines.metrics.compute import (
    PROBABILITY_METRICS,
    EvalSet,
    check_weighting,
    compute_metrics,
)
from recstack.pipelines.metrics.types import GAUCResult, GAUCWeighting

__all__ = ["auc", "calibration", "gauc", "log_loss", "normalized_entropy"]


def _one_shot(
    metric: str,
    preds: Any,
    labels: Any,
    weights: Any,
    groups: Any = None,
    weighting: GAUCWeighting = "impressions",
) -> dict[str, float]:
    batch = check_batch(preds, labels, groups, weights, where=metric, need_groups=metric == "gauc")
    raise_value_problems(batch.problems.tolist(), metric, metric in PROBABILITY_METRICS)
    data = EvalSet(batch.preds, batch.labels, batch.groups, batch.weights)
    # Stack: caller -> public function -> _one_shot -> evaluate.
    return compute_metrics(data, (metric,), weighting=weighting, where=metric, stacklevel=3)


def auc(preds: Any, labels: Any, weights: Any = None) -> float:
    """Exact ROC AUC, equal to ``sklearn.metrics.roc_auc_score`` (tied scores count one
    half, i.e. they get their average rank).

    Args:
        preds: scores, shape (N,) or (N, 1), any floating dtype; probabilities or logits
            (only their order matters).
        labels: 0/1 labels (bool, integer or floating), N of them.
        weights: optional non-negative sample weights, N of them.

    Returns:
        The AUC; ``nan`` with an ``UndefinedMetricWarning`` when the labels hold one class
        or there are no examples.

    Raises:
        ValueError: shapes disagree, a prediction is NaN, a label is not 0/1 or a weight
            is negative or not finite.
        TypeError: an input has an unsupported dtype.

    Examples:
        >>> import torch
        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    return _one_shot("auc", preds, labels, weights)["auc"]


def gauc(
    preds: Any,
    labels: Any,
    groups: Any,
    weights: Any = None,
    weighting: GAUCWeighting = "impressions",
) -> GAUCResult:
    """Group AUC: the AUC of each group (e.g. each user), averaged with group weights.

    ``GAUC = sum_g(weight_g * AUC_g) / sum_g(weight_g)`` over the groups holding both
    classes; groups with a single class have no AUC and are skipped (and counted).

    Args:
        preds: scores, shape (N,) or (N, 1), any floating dtype.
        labels: 0/1 labels, N of them.
        groups: integer group id of each row (hash string ids first).
        weights: optional non-negative sample weights, N of them.
        weighting: ``"impressions"`` weights a group by its total sample weight (its
            number of rows without weights), ``"clicks"`` by its positive weight,
            ``"uniform"`` counts every group once.

    Returns:
        The GAUC (``nan`` with a warning when no group holds both classes), the number of
        groups and the number skipped.

    Raises:
        ValueError: bad shapes or values, or an unknown weighting.
        TypeError: an input has an unsupported dtype (groups must be integers).

    Examples:
        >>> import torch
        >>> r = gauc(torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7]), torch.tensor([0, 1, 1, 0, 1]),
        ...          groups=torch.tensor([7, 7, 8, 8, 9]))
        >>> r.value, r.groups, r.skipped_groups
        (1.0, 3, 1)
    """
    check_weighting(weighting, "gauc")
    out = _one_shot("gauc", preds, labels, weights, groups, weighting)
    return GAUCResult(out["gauc"], int(out["gauc_groups"]), int(out["gauc_skipped_groups"]))


def log_loss(preds: Any, labels: Any, weights: Any = None) -> float:
    """Mean binary cross-entropy of probabilities, like ``sklearn.metrics.log_loss``.

    Predictions are clipped to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of
    float32 (float64 for float64 predictions), as scikit-learn clips float32/float64 input.

    Args:
        preds: probabilities in ``[0, 1]``, shape (N,) or (N, 1).
        labels: 0/1 labels, N of them.
        weights: optional non-negative sample weights (a weighted mean).

    Returns:
        The log-loss in nats; ``nan`` with a warning when there are no examples (or all
        weights are 0). A single class is fine: the loss is still defined.

    Raises:
        ValueError: bad shapes or values, or a prediction outside ``[0, 1]``.
        TypeError: an input has an unsupported dtype.
    """
    return _one_shot("logloss", preds, labels, weights)["logloss"]


def calibration(preds: Any, labels: Any, weights: Any = None) -> float:
    """Mean predicted CTR over observed CTR: ``sum(w * p) / sum(w * y)``; 1 is calibrated,
    above 1 over-predicts.

    Args:
        preds: probabilities in ``[0, 1]``, shape (N,) or (N, 1).
        labels: 0/1 labels, N of them.
        weights: optional non-negative sample weights.

    Returns:
        The ratio; ``nan`` with a warning when there are no positive labels.

    Raises:
        ValueError: bad shapes or values, or a prediction outside ``[0, 1]``.
        TypeError: an input has an unsupported dtype.
    """
    return _one_shot("calibration", preds, labels, weights)["calibration"]


def normalized_entropy(preds: Any, labels: Any, weights: Any = None) -> float:
    """Normalized entropy: the log-loss divided by the entropy of the background CTR
    ``c = sum(w * y) / sum(w)``, i.e. by ``-(c log c + (1 - c) log(1 - c))``, the log-loss
    of always predicting ``c``. Below 1 beats that constant; lower is better.

    Args:
        preds: probabilities in ``[0, 1]``, shape (N,) or (N, 1).
        labels: 0/1 labels, N of them.
        weights: optional non-negative sample weights.

    Returns:
        The NE; ``nan`` with a warning when the labels hold one class (the background
        entropy is 0) or there are no examples.

    Raises:
        ValueError: bad shapes or values, or a prediction outside ``[0, 1]``.
        TypeError: an input has an unsupported dtype.
    """
    return _one_shot("ne", preds, labels, weights)["ne"]
