"""The errors a checkpoint that cannot be found, written or loaded raises."""

from __future__ import annotations

__all__ = ["CheckpointError", "NotACheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, of an unknown version, or does not fit
    the objects it is loaded into. The message names the file, table or tensor; a load
    that raises it has changed nothing."""


class NotACheckpointError(CheckpointError):
    """The path is neither a checkpoint directory nor a checkpointer root (or is missing)."""
