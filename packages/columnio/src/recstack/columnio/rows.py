"""Row operations on column values (tensors and, possibly nested, JaggedTensors).

Batches are cut from decoded units with three vectorized operations: a zero-copy row
slice, a concatenation that copies each column once into a fresh (optionally pinned)
buffer, and a row gather for shuffle windows. None of them loops over rows in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from recstack.columnio.convert import ColumnValue
from recstack.core import JaggedTensor

__all__ = ["Alloc", "cat_rows", "cat_shapes", "num_rows", "slice_rows", "take_rows"]


def num_rows(v: ColumnValue) -> int:
    return len(v) if isinstance(v, JaggedTensor) else int(v.shape[0])


def slice_rows(v: ColumnValue, lo: int, hi: int) -> ColumnValue:
    """Rows ``[lo, hi)`` as a view; jagged offsets are rebased to start at 0."""
    if not isinstance(v, JaggedTensor):
        return v[lo:hi]
    offs = v.offsets[lo : hi + 1]
    a, b = int(offs[0]), int(offs[-1])
    return JaggedTensor(slice_rows(v.values, a, b), offs - a)


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def cat_shapes(parts: Sequence[ColumnValue]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What :func:`cat_rows` allocates for ``parts``, in the order it allocates it.

    Lets a caller carve every column of a batch out of one buffer before copying.
    """
    first = parts[0]
    if not isinstance(first, JaggedTensor):
        n = sum(int(p.shape[0]) for p in parts)
        return [((n, *first.shape[1:]), first.dtype)]
    rows = sum(len(p) for p in parts)
    inner = cat_shapes([p.values for p in parts])  # type: ignore[union-attr]
    return [*inner, ((rows + 1,), torch.int64)]


def cat_rows(parts: Sequence[ColumnValue], alloc: Alloc = new_tensor) -> ColumnValue:
    """Rows of every part, in order, copied once into memory from ``alloc``."""
    first = parts[0]
    if not isinstance(first, JaggedTensor):
        n = sum(int(p.shape[0]) for p in parts)
        out = alloc((n, *first.shape[1:]), first.dtype)
        if len(parts) == 1:
            out.copy_(first)
        else:
            torch.cat(list(parts), out=out)
        return out
    jparts: list[JaggedTensor] = list(parts)  # type: ignore[arg-type]
    values = cat_rows([p.values for p in jparts], alloc)
    rows = sum(len(p) for p in jparts)
    offsets = alloc((rows + 1,), torch.int64)
    offsets[0] = 0
    if len(jparts) == 1:
        offsets[1:].copy_(jparts[0].offsets[1:])
    else:
        torch.cumsum(torch.cat([p.lengths() for p in jparts]), 0, out=offsets[1:])
    return JaggedTensor(values, offsets)


def take_rows(v: ColumnValue, index: torch.Tensor) -> ColumnValue:
    """Rows ``index`` (int64, any order) gathered into new memory."""
    if not isinstance(v, JaggedTensor):
        return v.index_select(0, index)
    lengths = v.lengths().index_select(0, index)
    offsets = torch.zeros(index.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1])
    starts = v.offsets[:-1].index_select(0, index)
    # item j of output row r comes from starts[r] + (j - offsets[r])
    shift = torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total)
    items = torch.arange(total, dtype=torch.int64) + shift
    return JaggedTensor(take_rows(v.values, items), offsets)
