"""Shared helpers of the row-update kernel tests: a momentum-SGD tile function, its torch
reference, and fresh random paged tables with their slots."""

from __future__ import annotations

import zlib

import torch

from recstack.core import PagedTensor, RowUpdate, kernels
from recstack.core.kernels.row_update import apply_row_update

if kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def tile(
        w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
        VARIANT: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
    ):  # fmt: skip
        # Momentum SGD (slot 0) plus, for VARIANT 1, a per-row count and the row's mean g.
        a0 = s0[:, None] + cols[None, :]
        buf = p1 * tl.load(a0, mask=mask, other=0.0) + g
        tl.store(a0, buf, mask=mask)
        w = w - lr * buf
        if VARIANT == 1:
            cnt = tl.load(s1, mask=row_ok, other=0.0) + 1.0
            tl.debug_barrier()  # every thread holding a row's count reads it before a store
            tl.store(s1, cnt, mask=row_ok)
            mean = tl.sum(tl.where(mask, g, 0.0), axis=1) / p2
            w = w - (p3 * mean * cnt)[:, None]
        return w
else:
    tile = None


def reference_update(
    table: PagedTensor, slots: list[PagedTensor], lr: float, momentum: float, scale: float,
    per_row: bool,
):  # fmt: skip
    def apply(rows: torch.Tensor, grad: torch.Tensor) -> None:
        w = table.gather_rows(rows).to(torch.float32)
        buf = momentum * slots[0].gather_rows(rows) + grad
        w = w - lr * buf
        slots[0].scatter_rows(rows, buf)
        if per_row:
            cnt = slots[1].gather_rows(rows) + 1
            slots[1].scatter_rows(rows, cnt)
            w = w - scale * grad.mean(dim=1, keepdim=True) * cnt
        table.scatter_rows(rows, w)

    return apply


def make_tables(dim: int, rows: int, dtype: torch.dtype, device: torch.device, gen, per_row: bool):
    table = PagedTensor(dim, dtype, device, page_rows=8, name="t")
    table.append_rows(rows)
    table.scatter_rows(
        torch.arange(rows, device=device), torch.randn(rows, dim, generator=gen).to(device)
    )
    slots = [PagedTensor(dim, torch.float32, device, page_rows=8, name="t.m")]
    slots[0].append_rows(rows)
    if per_row:
        slots.append(PagedTensor(1, torch.float32, device, page_rows=8, name="t.n"))
        slots[1].append_rows(rows)
    for s in slots:
        s.scatter_rows(torch.arange(rows, device=device), torch.zeros(rows, s.dim, device=device))
    return table, slots


def make_update(table, slots, per_row: bool, dim: int) -> RowUpdate:
    return RowUpdate(
        name="test",
        tile_fn=tile,
        reference=reference_update(table, slots, 0.1, 0.9, 0.5, per_row),
        lr=0.1,
        params=(0.9, float(dim), 0.5),
        variant=int(per_row),
        slots=tuple(slots),
        whole_rows=per_row,
    )


def run_updates(backend: str, device, seed_, dim, n_rows, table_rows, dtype, per_row, steps=3):
    gen = torch.Generator().manual_seed(seed_)
    table, slots = make_tables(dim, table_rows, dtype, device, gen, per_row)
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        for _ in range(steps):
            rows = torch.randperm(table_rows, generator=gen)[:n_rows].to(device)
            grad = torch.randn(n_rows, dim, generator=gen).to(device)
            apply_row_update(make_update(table, slots, per_row, dim), table, rows, grad)
    return table.to_dense().float().cpu(), [s.to_dense().cpu() for s in slots], launches


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())
