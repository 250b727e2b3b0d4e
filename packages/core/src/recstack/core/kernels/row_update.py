"""Apply a :class:`~recstack.core.row_update.RowUpdate` to table rows, and the checks that
gate it.

* :func:`apply_row_update`: one launch reads each touched weight row, its gradient and its
  state once, runs the update's tile function, writes each once. The weight and the slots
  are addressed through their page tables (:func:`_row_pointers`); a bf16/fp16 weight is
  rounded once on the way back (:func:`_to_table_dtype`).
* ``_apply_tile``: the same for one tile whose gradient sums are already in registers, so
  a kernel that has just reduced them (the embedding engine's fused backward) updates the
  rows without writing the gradient out.
* :func:`check_rows`: row bounds and NaN/Inf of a gradient, into a two-int *gate* on the
  device (``[any row out of range, any value non-finite]``). Update launches given the gate
  write nothing when it is set, so a step is checked and applied without the host waiting
  in between; the caller reads the gate once, after queueing everything, to raise or count.

Bytes moved by :func:`apply_row_update` (``U`` rows, ``D`` = dim, ``E`` = weight element
bytes, ``S`` = full-width state slots): ``U * 8`` (rows) ``+ U * D * 4`` (gradient)
``+ 2 * U * D * E`` (weight) ``+ 2 * U * D * 4 * S`` (state), plus ``2 * U * 4`` per one-wide
slot. :func:`check_rows` reads the rows and the gradient once.
"""

from __future__ import annotations

from typing import Any

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.launch import FastKernel
from recstack.core.kernels.paged_rows import _TABLE_KIND
from recstack.core.paged import PagedTensor
from recstack.core.row_update import RowUpdate

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.paged_rows import _row_pointers, _to_table_dtype

__all__ = [
    "ROW_UPDATE_DEFAULTS",
    "apply_row_update",
    "check_rows",
    "new_gate",
    "row_update_kwargs",
]

#: Tile defaults of :func:`apply_row_update`: ``tile_elems`` is the target rows x columns of
#: one program (H200 sweep, 1M rows x 64: 8-32 rows on 2-8 warps all reach 94% MBU).
ROW_UPDATE_DEFAULTS: dict[str, int] = {"tile_elems": 1024, "max_block_d": 128, "num_warps": 4}


if HAS_TRITON:

    @triton.jit
    def _apply_tile(
        rows,
        row_ok,
        cols,
        col_ok,
        g,
        dim,
        w_table,
        w_shift,
        w_mask,
        s0_table,
        s0_shift,
        s0_mask,
        s0_width,
        s1_table,
        s1_shift,
        s1_mask,
        s1_width,
        s2_table,
        s2_shift,
        s2_mask,
        s2_width,
        lr,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        TILE_FN: tl.constexpr,
        VARIANT: tl.constexpr,
        FLAG_A: tl.constexpr,
        FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
        W_KIND: tl.constexpr,
        W_ALIGNED: tl.constexpr,
        S_ALIGNED: tl.constexpr,
    ):
        # `rows` are table rows (masked lanes hold any value); `g` the fp32 gradient tile.
        wp = _row_pointers(w_table, rows, row_ok, w_shift, w_mask, dim, W_KIND, W_ALIGNED)
        s0 = _row_pointers(s0_table, rows, row_ok, s0_shift, s0_mask, s0_width, 0, S_ALIGNED)
        s1 = _row_pointers(s1_table, rows, row_ok, s1_shift, s1_mask, s1_width, 0, S_ALIGNED)
        s2 = _row_pointers(s2_table, rows, row_ok, s2_shift, s2_mask, s2_width, 0, S_ALIGNED)
        mask = row_ok[:, None] & col_ok[None, :]
        at = wp[:, None] + cols[None, :]
        w = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        w = TILE_FN(
            w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
            VARIANT, FLAG_A, FLAG_B, FLAG_C,
        )  # fmt: skip
        tl.store(at, _to_table_dtype(w, W_KIND), mask=mask)

    @triton.jit
    def _row_update_kernel(
        rows_ptr,
        grad_ptr,
        grad_stride,
        n,
        gate_ptr,
        count_ptr,
        dim,
        w_table,
        w_shift,
        w_mask,
        s0_table,
        s0_shift,
        s0_mask,
        s0_width,
        s1_table,
        s1_shift,
        s1_mask,
        s1_width,
        s2_table,
        s2_shift,
        s2_mask,
        s2_width,
        lr,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        TILE_FN: tl.constexpr,
        VARIANT: tl.constexpr,
        FLAG_A: tl.constexpr,
        FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
        W_KIND: tl.constexpr,
        W_ALIGNED: tl.constexpr,
        S_ALIGNED: tl.constexpr,
        HAS_GATE: tl.constexpr,
        HAS_COUNT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        if HAS_COUNT:
            # Rows past the device-side count are padding (coalesce_rows_padded).
            n = tl.minimum(tl.load(count_ptr), n)
        if HAS_GATE:
            # A set gate (a bad row or value anywhere in the step) means: write nothing.
            n = tl.where((tl.load(gate_ptr) | tl.load(gate_ptr + 1)) == 0, n, 0)
        _update_block(
            r, rows_ptr, grad_ptr, grad_stride, n, dim,
            w_table, w_shift, w_mask,
            s0_table, s0_shift, s0_mask, s0_width,
            s1_table, s1_shift, s1_mask, s1_width,
            s2_table, s2_shift, s2_mask, s2_width,
            lr, p1, p2, p3, p4, p5, p6,
            TILE_FN, VARIANT, FLAG_A, FLAG_B, FLAG_C, W_KIND, W_ALIGNED, S_ALIGNED, BLOCK_D,
        )  # fmt: skip

    @triton.jit
    def _update_block(
        r, rows_ptr, grad_ptr, grad_stride, n, dim,
        w_table, w_shift, w_mask,
        s0_table, s0_shift, s0_mask, s0_width,
        s1_table, s1_shift, s1_mask, s1_width,
        s2_table, s2_shift, s2_mask, s2_width,
        lr, p1, p2, p3, p4, p5, p6,
        TILE_FN: tl.constexpr, VARIANT: tl.constexpr, FLAG_A: tl.constexpr,
        FLAG_B: tl.constexpr, FLAG_C: tl.constexpr, W_KIND: tl.constexpr,
        W_ALIGNED: tl.constexpr, S_ALIGNED: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Update the gradient rows at positions ``r`` (those below ``n``), column tile by tile.
        ok = r < n
        rows = tl.load(rows_ptr + r, mask=ok, other=0)
        gp = grad_ptr + r * grad_stride
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            g = tl.load(gp[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            _apply_tile(
                rows, ok, cols, col_ok, g.to(tl.float32), dim,
                w_table, w_shift, w_mask,
                s0_table, s0_shift, s0_mask, s0_width,
                s1_table, s1_shift, s1_mask, s1_width,
                s2_table, s2_shift, s2_mask, s2_width,
                lr, p1, p2, p3, p4, p5, p6,
                TILE_FN, VARIANT, FLAG_A, FLAG_B, FLAG_C, W_KIND, W_ALIGNED, S_ALIGNED,
            )  # fmt: skip

    @triton.jit
    def _check_kernel(
        values_ptr,
        stride,
        n,
        dim,
        rows_ptr,
        num_rows,
        gate_ptr,
        count_ptr,
        HAS_ROWS: tl.constexpr,
        HAS_COUNT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        if HAS_COUNT:
            n = tl.minimum(tl.load(count_ptr), n)
        _check_block(
            r, values_ptr, stride, n, dim, rows_ptr, num_rows, gate_ptr, HAS_ROWS, BLOCK_R, BLOCK_D
        )

    @triton.jit
    def _check_block(
        r,
        values_ptr,
        stride,
        n,
        dim,
        rows_ptr,
        num_rows,
        gate_ptr,
        HAS_ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Check the value rows (and rows) at positions ``r`` below ``n`` into the gate.
        ok = r < n
        if HAS_ROWS:
            row = tl.load(rows_ptr + r, mask=ok, other=0)
            oob = tl.max((ok & ((row < 0) | (row >= num_rows))).to(tl.int32), axis=0)
            # Atomics only when something is wrong: the common case writes nothing.
            tl.atomic_max(gate_ptr, oob, mask=oob > 0, sem="relaxed")
        bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (cols < dim)[None, :]
            x = tl.load(values_ptr + r[:, None] * stride + cols[None, :], mask=m, other=0.0)
            x = x.to(tl.float32)
            nonfinite = (x != x) | (tl.abs(x) > 3.4028234663852886e38)  # NaN, or past fp32 max
            bad = tl.maximum(bad, tl.max(nonfinite.to(tl.int32), axis=1))
        flag = tl.max(bad, axis=0)
        tl.atomic_max(gate_ptr + 1, flag, mask=flag > 0, sem="relaxed")

    _ROW_UPDATE = FastKernel(_row_update_kernel)
    _CHECK = FastKernel(_check_kernel)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def new_gate(device: torch.device | str) -> torch.Tensor:
    """A cleared gate: int32 ``[2]`` = (rows out of range, non-finite values)."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def check_rows(
    gate: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor | None = None,
    num_rows: int = 0,
    count: torch.Tensor | None = None,
) -> None:
    """Set ``gate[0]`` if a row is outside ``[0, num_rows)``, ``gate[1]`` if a value is NaN
    or Inf. Never clears a flag and never waits for the device.

    Args:
        gate: int32 ``[2]`` from :func:`new_gate` (shared by every check of one step).
        values: a float gradient, any shape (its last dimension is the row width).
        rows: int ``[len(values)]`` row indices to bound-check, or ``None``.
        num_rows: the table's row count (with ``rows``).
        count: int64 ``[1]`` on the device: only the first ``count`` value rows (and rows)
            are checked, the rest is padding (from
            :func:`~recstack.core.kernels.segment_sum.coalesce_rows_padded`). ``None``: all.
    """
    if gate.dtype != torch.int32 or gate.shape != (2,):
        raise ValueError(f"check_rows: the gate must be int32 [2], got {gate.dtype} {gate.shape}")
    if values.dim() == 0:
        values = values.reshape(1, 1)
    values = values.reshape(-1, values.shape[-1]) if values.dim() != 2 else values
    n, dim = values.shape
    if rows is not None and rows.numel() != n:
        raise ValueError(f"check_rows: {rows.numel()} rows for {n} value rows")
    if not n:
        return
    tensors = [gate, values] + ([rows] if rows is not None else [])
    if not use_triton(*tensors, op="check_rows"):
        record_launch("check_rows_reference")
        if count is not None:
            # On the CPU reading the count costs nothing.
            k = int(count.reshape(-1)[0])
            values = values[:k]
            rows = rows[:k] if rows is not None else None
        if rows is not None:
            oob = ((rows < 0) | (rows >= num_rows)).any()
            gate[0] = torch.maximum(gate[0], oob.to(torch.int32))
        if dim:
            bad = (~torch.isfinite(values)).any()
            gate[1] = torch.maximum(gate[1], bad.to(torch.int32))
        return
    if values.stride(1) != 1 and dim > 1:
        values = values.contiguous()
    block_d = min(_pow2_ceil(max(dim, 1)), 128)
    block_r = max(1, 4096 // block_d)
    record_launch("check_rows")
    _CHECK(
        (triton.cdiv(n, block_r),),
        values,
        values.stride(0),
        n,
        dim,
        rows if rows is not None else gate,
        num_rows,
        gate,
        count if count is not None else gate,
        rows is not None,
        count is not None,
        block_r,
        block_d,
        num_warps=4,
    )


_ROW_UPDATE_ARG_NAMES: tuple[str, ...] = (
    "dim", "w_table", "w_shift", "w_mask",
    "s0_table", "s0_shift", "s0_mask", "s0_width",
    "s1_table", "s1_shift", "s1_mask", "s1_width",
    "s2_table", "s2_shift", "s2_mask", "s2_width",
    "lr", "p1", "p2", "p3", "p4", "p5", "p6",
    "TILE_FN", "VARIANT", "FLAG_A", "FLAG_B", "FLAG_C", "W_KIND", "W_ALIGNED", "S_ALIGNED",
)  # fmt: skip


def _row_update_args(update: RowUpdate, table: PagedTensor) -> list[Any]:
    """``_apply_tile``'s arguments after the tile's own (``dim`` .. ``S_ALIGNED``), in order."""
    slots = update.slots
    args: list[Any] = [table.dim, table.page_table, table.page_shift, table.page_mask]
    aligned = True
    for i in range(3):
        # Missing slots point at the weight; the tile function never touches them.
        s = slots[i] if i < len(slots) else table
        args += (s.page_table, s.page_shift, s.page_mask, s.dim)
        if i < len(slots):
            aligned = aligned and s._pages_aligned
    params = update.params
    args.append(float(update.lr))
    args += (float(p) for p in params)
    args += (0.0,) * (6 - len(params))
    flags = update.flags
    args.append(update.tile_fn)
    args.append(int(update.variant))
    args += (bool(f) for f in flags)
    args += (False,) * (3 - len(flags))
    args += (_TABLE_KIND[table.dtype], table._pages_aligned, aligned)
    return args


def row_update_kwargs(update: RowUpdate, table: PagedTensor) -> dict[str, Any]:
    """The keyword arguments ``_apply_tile`` (and kernels that call it) take for ``update``
    of ``table``: page tables, slot widths, scalars and constexprs."""
    return dict(zip(_ROW_UPDATE_ARG_NAMES, _row_update_args(update, table), strict=True))


def row_tile(update: RowUpdate, dim: int, tile_elems: int, max_block_d: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` for ``update`` on rows of ``dim``: whole rows when it needs
    them, else columns capped at ``max_block_d``; about ``tile_elems`` elements a tile."""
    block_d = _pow2_ceil(max(dim, 1))
    if not update.whole_rows:
        block_d = min(block_d, _pow2_ceil(max_block_d))
    return max(1, tile_elems // block_d), block_d


def apply_row_update(
    update: RowUpdate,
    table: PagedTensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    gate: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    **tile: int,
) -> None:
    """Apply ``update`` to ``rows`` of ``table`` given their summed gradient, in one launch.

    Args:
        update: the optimizer's step (its slots row-aligned with ``table``).
        table: the weight (fp32, bf16 or fp16 rows).
        rows: int64 ``[U]`` unique rows in range (trusted; :func:`check_rows` checks them).
        grad: float ``[U, dim]`` gradient rows.
        gate: from :func:`new_gate`: when set (on the device, when the kernel runs) nothing
            is written. ``None``: no gate.
        count: int64 ``[1]`` on the device: only the first ``count`` rows are updated, the
            rest is padding (as :func:`check_rows`). ``None``: all rows.
        tile: ``tile_elems``, ``max_block_d``, ``num_warps`` override
            :data:`ROW_UPDATE_DEFAULTS`.
    """
    n, dim = rows.numel(), table.dim
    if grad.shape != (n, dim):
        raise ValueError(
            f"apply_row_update ({update.name}): gradient {tuple(grad.shape)} for {n} rows of "
            f"table {table.name!r} of width {dim}"
        )
    if not n:
        return
    if not use_triton(rows, grad, op=f"{update.name} row update"):
        record_launch("row_update_reference")
        # On the CPU a gate read costs nothing: check it here, then run the torch update.
        if count is not None:
            k = int(count.reshape(-1)[0])
            rows, grad = rows[:k], grad[:k]
        if (gate is None or not bool(gate.any())) and rows.numel():
            update.reference(rows.to(torch.int64), grad.to(torch.float32))
        return
    if grad.stride(1) != 1 and dim > 1:
        grad = grad.contiguous()
    cfg = {**ROW_UPDATE_DEFAULTS, **tile}
    block_r, block_d = row_tile(update, dim, cfg["tile_elems"], cfg["max_block_d"])
    record_launch("row_update")
    _ROW_UPDATE(
        (triton.cdiv(n, block_r),),
        rows if rows.dtype == torch.int64 else rows.to(torch.int64),
        grad,
        grad.stride(0),
        n,
        gate if gate is not None else rows,
        count if count is not None else rows,
        *_row_update_args(update, table),
        gate is not None,
        count is not None,
        block_r,
        block_d,
        num_warps=cfg["num_warps"],
    )
