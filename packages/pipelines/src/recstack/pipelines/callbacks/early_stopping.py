"""Stop training when an evaluation metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from recstack.core.checks import check_int
from recstack.pipelines.callbacks.base import Callback
from recstack.pipelines.choices import check_choice

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["EarlyStopping", "Mode"]

#: Whether a larger (``"max"``, e.g. AUC) or a smaller (``"min"``, log-loss) value is better.
Mode = Literal["max", "min"]


class EarlyStopping(Callback):
    """Set ``trainer.should_stop`` after ``patience`` evaluations without improvement.

    Args:
        monitor: the evaluation metric, e.g. ``"label/auc"`` (``"<task>/<metric>"``).
        mode: ``"max"`` (AUC) or ``"min"`` (log-loss).
        patience: evaluations without improvement tolerated.
        min_delta: the least change that counts as an improvement.

    Its best value and counter are saved in checkpoints, so a resumed run stops where
    the uninterrupted one would.
    """

    def __init__(
        self,
        monitor: str,
        mode: Mode = "max",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        check_choice(mode, "EarlyStopping: mode", Mode)
        check_int(patience, "EarlyStopping: patience", minimum=1)
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stopped_at = state.get("stopped_at")

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping: no metric {self.monitor!r} in the evaluation (it has "
                f"{sorted(metrics)})"
            )
        value = float(metrics[self.monitor])
        if math.isnan(value):
            better = False
        elif self.best is None:
            better = True
        elif self.mode == "max":
            better = value > self.best + self.min_delta
        else:
            better = value < self.best - self.min_delta
        if better:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.should_stop = True
            self.stopped_at = step
