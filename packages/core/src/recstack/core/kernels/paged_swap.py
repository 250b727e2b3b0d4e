"""Swap pairs of rows of a PagedTensor in place, skipping pairs marked ``-1``.

``swap_paged_rows(table, a, b)`` exchanges rows ``a[i]`` and ``b[i]`` for every ``i``
with both ``>= 0``. The pairs must be disjoint (no row in two pairs; ``a[i] == b[i]`` is a
pair left as it is). Pairs marked ``-1`` let a caller keep a fixed number of pairs, sized
on the host before it knows how many rows really move, so moving rows needs no host
sync (a tiered table's promotion, :mod:`recstack.embedding_engine.tiers`).

Kernel layout: each program takes ``BLOCK_R`` pairs x ``BLOCK_D`` columns, reads both rows
of each pair and writes each where the other was. Disjoint pairs mean no two programs
touch one row, so no atomics are needed. Rows in host pages of a GPU table are reached
through the same page table (pinned memory is mapped into the GPU's address space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.paged_rows import (
    PAGED_ROWS_DEFAULTS,
    _check_rows,
    _tile,
    gather_paged_rows_reference,
    scatter_paged_rows_reference,
)

if TYPE_CHECKING:
    from recstack.core.paged import PagedTensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_row_pointers

__all__ = ["swap_paged_rows", "swap_paged_rows_reference"]


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _paged_swap_kernel(
        page_table_ptr,
        a_ptr,
        b_ptr,
        n,
        dim,
        page_shift,
        page_mask,
        KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        inb = r < n
        a = tl.load(a_ptr + r, mask=inb, other=-1)
        b = tl.load(b_ptr + r, mask=inb, other=-1)
        ok = inb & (a >= 0) & (b >= 0)
        pa = tl_row_pointers(page_table_ptr, a, ok, page_shift, page_mask, dim, KIND, ALIGNED)
        pb = tl_row_pointers(page_table_ptr, b, ok, page_shift, page_mask, dim, KIND, ALIGNED)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (cols < dim)[None, :]
        xa = tl.load(pa[:, None] + cols[None, :], mask=mask)
        xb = tl.load(pb[:, None] + cols[None, :], mask=mask)
        tl.store(pa[:, None] + cols[None, :], xb, mask=mask)
        tl.store(pb[:, None] + cols[None, :], xa, mask=mask)


def _check(table: PagedTensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a, b = _check_rows(table, a, "swap_rows"), _check_rows(table, b, "swap_rows")
    if a.shape != b.shape:
        raise ValueError(
            f"swap_rows on {table.name!r}: a and b differ in length ({a.numel()} and {b.numel()})"
        )
    return a, b


def swap_paged_rows_reference(table: PagedTensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Torch reference of :func:`swap_paged_rows` (one host sync to drop skipped pairs)."""
    record_launch("paged_swap_rows_reference")
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    if not a.numel():
        return
    rows_a = gather_paged_rows_reference(table, a)
    rows_b = gather_paged_rows_reference(table, b)
    scatter_paged_rows_reference(table, a, rows_b)
    scatter_paged_rows_reference(table, b, rows_a)


def swap_paged_rows(table: PagedTensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange rows ``a[i]`` and ``b[i]`` of ``table`` where both are ``>= 0``.

    Args:
        table: the row store.
        a: 1-D integer rows on the table's device, below ``table.num_rows`` (not checked:
            no sync), each in one pair; ``-1`` skips a pair.
        b: the other row of each pair, as ``a``.

    One launch on the Triton path, no host sync.
    """
    a, b = _check(table, a, b)
    n = a.numel()
    if n == 0:
        return
    if not use_triton(a, op="swap_rows"):
        swap_paged_rows_reference(table, a, b)
        return
    dim = table.dim
    block_r, block_d = _tile(dim, None, None)
    grid = (triton.cdiv(n, block_r), triton.cdiv(dim, block_d))
    _paged_swap_kernel[grid](
        table.page_table,
        a,
        b,
        n,
        dim,
        table.page_shift,
        table.page_mask,
        TABLE_KINDS[table.dtype],
        table._pages_aligned,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=PAGED_ROWS_DEFAULTS["num_warps"],
    )
    record_launch("paged_swap_rows")
