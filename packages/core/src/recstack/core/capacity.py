"""Capacity layouts: jagged values kept at a size known without reading the device.

Turning padded rows into jagged ones shrinks ``B * L`` slots to ``sum(lengths)`` items, and
that size lives on the device: allocating exactly it costs a host sync. A capacity layout
keeps all ``B * L`` slots instead and moves them, in one gather, so that the items come
first (in row order) and the padding slots after them. ``offsets`` describe the items as
usual and ``offsets[-1] <= len(values)``; ``values[offsets[-1]:]`` is unused padding. Every
helper here is a fixed sequence of tensor ops whose output sizes depend only on shapes.
"""

from __future__ import annotations

import torch

__all__ = ["count_mask", "items_first_index", "padded_item_mask"]


def padded_item_mask(lengths: torch.Tensor, width: int, side: str) -> torch.Tensor:
    """Bool ``[B, width]``: True at the slots of a padded tensor that hold an item.

    Args:
        lengths: int64 ``[B]`` row lengths, already within ``[0, width]``.
        width: the padded width ``L``.
        side: where the padding is: ``"right"`` (items first) or ``"left"`` (items last).
    """
    cols = torch.arange(width, dtype=torch.int64, device=lengths.device).unsqueeze(0)
    if side == "right":
        return cols < lengths.unsqueeze(1)
    return cols >= (width - lengths).unsqueeze(1)


def count_mask(capacity: int, count: torch.Tensor) -> torch.Tensor:
    """Bool ``[capacity]``: True at the first ``count`` slots (``count`` a device scalar).

    Args:
        capacity: the buffer's static size.
        count: 0-d int64 tensor, how many leading slots hold items.
    """
    return torch.arange(capacity, dtype=torch.int64, device=count.device) < count


def items_first_index(valid: torch.Tensor) -> torch.Tensor:
    """Gather index that moves the True slots of ``valid`` first, then the False ones.

    Both groups keep their order, so ``buffer.index_select(0, index)`` packs the items of
    a row-major padded buffer key-major and row by row, with the padding after them. The
    index is a permutation of ``range(len(valid))``, built with a cumulative sum and one
    scatter: no sort and no host sync.

    Args:
        valid: bool ``[C]``, True where a slot holds an item.
    """
    n = valid.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=valid.device)
    seen = torch.cumsum(valid.to(torch.int64), 0)  # items at or before each slot
    slot = torch.arange(n, dtype=torch.int64, device=valid.device)
    total = seen[-1:]
    # An item goes to its rank among items; a padding slot goes after all items, in order.
    dest = torch.where(valid, seen - 1, total + slot - seen)
    return torch.empty_like(slot).scatter_(0, dest, slot)
