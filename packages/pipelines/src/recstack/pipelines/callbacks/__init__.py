"""Callbacks: hooks at the usual points of a training run, and the built-in ones."""

from recstack.pipelines.callbacks.base import Callback
from recstack.pipelines.callbacks.early_stopping import EarlyStopping
from recstack.pipelines.callbacks.jsonl import JSONLLogger, read_jsonl
from recstack.pipelines.callbacks.plot import PlotCurves
from recstack.pipelines.callbacks.progress import ProgressBar
from recstack.pipelines.callbacks.tensorboard import TensorBoardLogger

__all__ = [
    "Callback",
    "EarlyStopping",
    "JSONLLogger",
    "PlotCurves",
    "ProgressBar",
    "TensorBoardLogger",
    "read_jsonl",
]
