"""recstack.pipelines: the trainer, multi-task and multi-stage runs, online learning,
metrics, reference models and the ``recstack`` command line."""

from recstack.pipelines.callbacks import (
    Callback,
    EarlyStopping,
    JSONLLogger,
    PlotCurves,
    ProgressBar,
    TensorBoardLogger,
)
from recstack.pipelines.evaluation import evaluate_model
from recstack.pipelines.metrics import (
    DEFAULT_METRICS,
    METRIC_NAMES,
    BinaryMetrics,
    GAUCResult,
    GAUCWeighting,
    MetricCollection,
    UndefinedMetricWarning,
    auc,
    calibration,
    gauc,
    log_loss,
    normalized_entropy,
)
from recstack.pipelines.online import OnlineResult, WindowReport, run_online
from recstack.pipelines.rank_agreement import RankLostError
from recstack.pipelines.stages import Stage
from recstack.pipelines.stream import BatchStream
from recstack.pipelines.tasks import Task
from recstack.pipelines.trainer import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "BatchStream",
    "BinaryMetrics",
    "Callback",
    "EarlyStopping",
    "FitResult",
    "GAUCResult",
    "GAUCWeighting",
    "JSONLLogger",
    "MetricCollection",
    "OnlineResult",
    "PlotCurves",
    "ProgressBar",
    "RankLostError",
    "Stage",
    "Task",
    "TensorBoardLogger",
    "Trainer",
    "UndefinedMetricWarning",
    "WindowReport",
    "__version__",
    "auc",
    "calibration",
    "evaluate_model",
    "gauc",
    "log_loss",
    "normalized_entropy",
    "run_online",
]
