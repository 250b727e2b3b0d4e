"""The LR schedule of a run: linear warmup then constant, cosine or linear decay (as a
``LambdaLR``), or a ``torch.optim.lr_scheduler`` class by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from recstack.pipelines.choices import check_choice
from recstack.pipelines.config.optim_sections import ScheduleConfig
from recstack.pipelines.config.registry import TORCH_SCHEDULERS, BuiltinSchedule

__all__ = ["build_scheduler", "lr_factor"]


def lr_factor(
    kind: BuiltinSchedule, warmup_steps: int, total_steps: int | None, min_factor: float = 0.0
) -> Callable[[int], float]:
    """The built-in schedule's LR factor of the update at (0-based) step ``s``.

    Over the first ``warmup_steps`` updates the factor rises linearly,
    ``(s + 1) / warmup_steps``, so the first update already moves; then it is 1
    (``"constant"``), or falls from 1 at the end of the warmup to ``min_factor`` at
    ``total_steps`` along a half cosine (``"cosine"``) or a line (``"linear"``) and stays
    there.

    Args:
        kind: ``"constant"``, ``"cosine"`` or ``"linear"``.
        warmup_steps: the warmup's length (0: none).
        total_steps: where the decay ends (needed for ``"cosine"``/``"linear"``).
        min_factor: the factor after the decay.
    """
    check_choice(kind, "lr_factor: kind", BuiltinSchedule)
    if kind != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"lr_factor: {kind} needs total_steps > warmup_steps ({warmup_steps})")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        assert total_steps is not None
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        if kind == "cosine":
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_factor + (1.0 - min_factor) * (1.0 - progress)

    return factor


def build_scheduler(
    config: ScheduleConfig, optimizer: torch.optim.Optimizer, max_steps: int | None
) -> Any:
    """The scheduler of ``config`` over ``optimizer``.

    Args:
        config: the ``schedule`` section.
        optimizer: the dense optimizer.
        max_steps: the trainer's ``max_steps`` (the default ``total_steps``).
    """
    if not config.builtin:
        return TORCH_SCHEDULERS[config.type](optimizer, **config.options)
    total = config.total_steps if config.total_steps is not None else max_steps
    fn = lr_factor(config.type, config.linear_warmup_steps, total, config.min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
