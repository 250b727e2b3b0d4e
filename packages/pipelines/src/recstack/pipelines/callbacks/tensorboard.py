"""TensorBoard scalars (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recstack.pipelines.callbacks.base import Callback

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(Callback):
    """Write the training logs (``train/loss``, ``train/lr``, ...) and evaluation metrics
    (``eval/<task>/<metric>``) as TensorBoard scalars under ``log_dir``.

    Args:
        log_dir: the run's directory (``tensorboard --logdir`` its parent).

    Raises:
        ImportError: ``tensorboard`` is not installed (``pip install
            'recstack-pipelines[tensorboard]'``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install "
                "'recstack-pipelines[tensorboard]'"
            ) from err
        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(str(self.log_dir))

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        for key, value in logs.items():
            if key not in ("step", "epoch") and (key != "samples" or "loss" in logs):
                self._writer.add_scalar(f"train/{key}", value, step)

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(f"eval/{key}", value, step)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._writer.flush()
        self._writer.close()
