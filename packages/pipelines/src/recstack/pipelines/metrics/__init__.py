"""Exact evaluation metrics for binary (click, conversion) tasks, on the data's device.

* :class:`BinaryMetrics`: AUC, GAUC, log-loss, calibration and NE of one task, fed batch by
  batch (``update`` never syncs with the host), computed over the whole evaluation set and
  gathered across ranks under ``torch.distributed``.
* :class:`MetricCollection`: one :class:`BinaryMetrics` per task of a multi-task model,
  results keyed ``"<task>/<metric>"``.
* :func:`auc`, :func:`gauc`, :func:`log_loss`, :func:`calibration`,
  :func:`normalized_entropy`: one-shot functional forms returning Python numbers.

AUC is exact (sorting, not histogram bins) and equals ``sklearn.metrics.roc_auc_score``,
tied scores included. Undefined metrics (no examples, a single class) are ``nan`` with an
:class:`UndefinedMetricWarning`, as scikit-learn does for a single class (for no examples
scikit-learn raises; here an empty evaluation window is an ordinary event, so it is ``nan``
too). Bad values (NaN predictions, labels other than 0/1, negative weights) raise a
``ValueError`` naming the task.
"""

from recstack.pipelines.metrics.accumulator import BinaryMetrics
from recstack.pipelines.metrics.collection import MetricCollection
from recstack.pipelines.metrics.functional import (
    auc,
    calibration,
    gauc,
    log_loss,
    normalized_entropy,
)
from recstack.pipelines.metrics.types import (
    DEFAULT_METRICS,
    METRIC_NAMES,
    GAUCResult,
    GAUCWeighting,
    UndefinedMetricWarning,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "BinaryMetrics",
    "GAUCResult",
    "GAUCWeighting",
    "MetricCollection",
    "UndefinedMetricWarning",
    "auc",
    "calibration",
    "gauc",
    "log_loss",
    "normalized_entropy",
]
