"""How many ranks and threads a save, load or export works with: given by the caller, or
taken from ``torch.distributed`` and the machine."""

from __future__ import annotations

import os

import torch.distributed as dist

from recstack.core.checks import check_int

__all__ = ["default_threads", "resolve_ranks"]


def default_threads() -> int:
    """Reader/writer threads when none are given: the CPU count, at most 16."""
    return min(16, os.cpu_count() or 4)


def resolve_ranks(rank: int | None, world_size: int | None, who: str) -> tuple[int, int, bool]:
    """``(rank, world_size, use the process group)``.

    Without ``rank`` and ``world_size`` they come from ``torch.distributed`` when it is
    initialized (and its collectives are used), else they are ``0`` and ``1``. Given, no
    collective runs: the ranks of a job may then run one after another in one program.

    Args:
        rank: this process's rank, or ``None``.
        world_size: the number of ranks, or ``None`` (given with ``rank`` or not at all).
        who: the caller, for messages (``"Checkpointer"``).

    Raises:
        ValueError: only one of the two given, or one out of range.
        TypeError: one that is not an int.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"{who}: give both rank and world_size, or neither")
    group = rank is None and dist.is_available() and dist.is_initialized()
    if rank is None or world_size is None:
        rank = dist.get_rank() if group else 0
        world_size = dist.get_world_size() if group else 1
    world_size = check_int(world_size, f"{who}: world_size", minimum=1)
    rank = check_int(rank, f"{who}: rank", minimum=0, maximum=world_size - 1)
    return rank, world_size, group
