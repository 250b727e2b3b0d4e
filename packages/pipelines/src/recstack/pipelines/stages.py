"""Multi-stage training: a list of stages run one after another on one model, each with
its own data, length, learning rates and frozen parts."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from recstack.core.checks import check_int

__all__ = ["Stage", "frozen_parameters"]


@dataclass(frozen=True)
class Stage:
    """One stage of a multi-stage run (``Trainer(..., stages=[...])``).

    The model, both optimizers (their moments included), the LR schedule and the tables
    carry over from one stage to the next; the global step keeps counting. A checkpoint
    records the stage and the position in its data, so a resumed run continues inside
    the stage it stopped in.

    Args:
        name: the stage's name (in logs and errors).
        train_data: its training batches.
        eval_data: its evaluation batches (``None``: the trainer's ``eval_data``).
        epochs: passes over ``train_data``.
        max_steps: stop the stage after this many optimizer steps (``None``: epochs).
        dense_lr: the dense optimizer's learning rate from this stage on (``None``: keep).
        sparse_lr: the sparse optimizer's learning rate from this stage on (``None``: keep).
        freeze: glob patterns over ``model.named_parameters()`` names (e.g.
            ``"tower.*"``) whose parameters are not trained in this stage.
        train_embeddings: ``False`` freezes every embedding table: lookups run as in
            evaluation (unseen ids get no row) and the sparse optimizer does not step.
    """

    name: str
    train_data: Iterable[Any]
    eval_data: Iterable[Any] | None = None
    epochs: int = 1
    max_steps: int | None = None
    dense_lr: float | None = None
    sparse_lr: float | None = None
    freeze: Sequence[str] = field(default=())
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage: name must be a non-empty string, got {self.name!r}")
        where = f"Stage {self.name!r}"
        check_int(self.epochs, f"{where}: epochs", minimum=1)
        if self.max_steps is not None:
            check_int(self.max_steps, f"{where}: max_steps", minimum=1)
        for what in ("dense_lr", "sparse_lr"):
            v = getattr(self, what)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{where}: {what} must be a number >= 0, got {v!r}")
        if isinstance(self.freeze, str):
            object.__setattr__(self, "freeze", (self.freeze,))
        object.__setattr__(self, "freeze", tuple(self.freeze))


def frozen_parameters(model: nn.Module, patterns: Sequence[str], where: str) -> set[str]:
    """The names of ``model``'s parameters matching any of ``patterns``.

    Raises:
        ValueError: a pattern that matches no parameter (a typo would otherwise train
            what was meant to be frozen), naming it.
    """
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for pat in patterns:
        hit = fnmatch.filter(names, pat)
        if not hit:
            raise ValueError(
                f"{where}: freeze pattern {pat!r} matches no parameter of the model (its "
                f"parameters: {names[:8]}{' ...' if len(names) > 8 else ''})"
            )
        out.update(hit)
    return out
