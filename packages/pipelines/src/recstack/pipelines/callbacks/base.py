"""The callback interface: hooks the Trainer calls at the usual points of a run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["Callback"]


class Callback:
    """Subclass and override the hooks you need (all default to doing nothing).

    The hooks follow the order of a run: :meth:`on_fit_start`, then per epoch
    :meth:`on_epoch_start`, per optimizer step :meth:`on_step_start` and
    :meth:`on_step_end`, :meth:`on_eval_end` after each evaluation,
    :meth:`on_checkpoint` after each save, :meth:`on_epoch_end`, and :meth:`on_fit_end`.
    Setting ``trainer.should_stop = True`` in any hook ends :meth:`Trainer.fit` after the
    current step (with a final checkpoint, as at the normal end).

    ``logs`` at a step's end hold ``step``, ``epoch``, ``samples`` (seen so far),
    ``lr`` and, on the steps where the trainer reads them back (every
    ``log_every`` steps, so that other steps need no device-to-host sync), ``loss``
    and ``loss/<task>``: means over the steps since the previous read.
    """

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (e.g. early stopping's best value)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume restored the state)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Called when an epoch starts (or resumes)."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Called before optimizer step ``step`` (1-based) reads its batches."""

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        """Called after optimizer step ``step`` with the step's logs."""

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """Called after an evaluation with its metrics (``"<task>/auc"``, ...)."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """Called after a checkpoint of ``step`` was written (or queued, when async)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """Called when an epoch's data is exhausted."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called once when :meth:`Trainer.fit` finishes, also when stopped early."""
