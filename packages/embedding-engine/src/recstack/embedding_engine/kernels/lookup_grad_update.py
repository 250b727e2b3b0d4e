"""The fused backward: reduce a lookup's gradient by row and apply an optimizer's update to
those rows in the same kernel, never writing the gradient out.

Same tiles as :func:`~recstack.embedding_engine.kernels.lookup_grad.lookup_grad_sums`
(``BLOCK_N`` sorted ids x ``BLOCK_D`` columns, a segmented scan, one sum per segment from
its last lane). A segment wholly inside its tile is a finished row gradient: the tile hands
it to core's ``_apply_tile``, which runs the optimizer's tile function
(:class:`~recstack.core.RowUpdate`) on the weight row and its state. A segment crossing a
tile boundary (a row whose ids span tiles) ``atomic_add``-s its partial sums into a scratch
row zeroed beforehand; a second, small launch applies the update to those rows once every
partial is in. Every row is updated by exactly one program.

Each launch reads the step's *gate* (core's
:func:`~recstack.core.kernels.row_update.check_rows` over the output gradients): when set,
nothing is written. Bytes moved: the backward's reads (per id its label, position, bag and
gradient row) plus the update's (per row the weight and state read and written once); the
scratch rows only for segments crossing a tile boundary.
"""

from __future__ import annotations

import torch

from recstack.core import PagedTensor, RowUpdate
from recstack.core.kernels import HAS_TRITON, record_launch
from recstack.core.kernels.row_update import row_update_kwargs
from recstack.embedding_engine.kernels.lookup_grad import _pow2_ceil, _pow2_floor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.row_update import _apply_tile
    from recstack.embedding_engine.kernels.lookup_grad import (
        _ZERO_CROSSING,
        _tile_grad_sums,
    )

__all__ = ["FUSED_GRAD_DEFAULTS", "lookup_grad_update"]

#: Tile defaults of the fused backward (``tile_elems`` is the target ``BLOCK_N * BLOCK_D``).
FUSED_GRAD_DEFAULTS: dict[str, int] = {"tile_elems": 2048, "max_block_d": 256, "num_warps": 4}


if HAS_TRITON:

    @triton.jit
    def _grad_update_kernel(
        grad_ptr,
        seq_ptr,
        seg_ptr,
        order_ptr,
        bag_ptr,
        bag_scale_ptr,
        weights_ptr,
        seg_rows_ptr,
        scratch_ptr,
        gate_ptr,
        n,
        n_pooled,
        batch_size,
        grad_stride_b,
        grad_stride_k,
        seq_stride,
        scratch_stride,
        min_seg,
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
        HAS_POOLED: tl.constexpr,
        HAS_SEQ: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        HAS_SEG_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # A set gate (NaN/Inf in the output gradients) empties the launch: nothing written.
        n = tl.where((tl.load(gate_ptr) | tl.load(gate_ptr + 1)) == 0, n, 0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        sums, seg, is_last, shared = _tile_grad_sums(
            grad_ptr, seq_ptr, seg_ptr, order_ptr, bag_ptr, bag_scale_ptr, weights_ptr,
            n, n_pooled, batch_size, grad_stride_b, grad_stride_k, seq_stride, min_seg,
            cols, col_ok, HAS_POOLED, HAS_SEQ, HAS_WEIGHTS, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        done = is_last & ~shared
        row = seg
        if HAS_SEG_ROWS:
            row = tl.load(seg_rows_ptr + seg, mask=done, other=0)
        _apply_tile(
            row, done, cols, col_ok, sums, dim,
            w_table, w_shift, w_mask,
            s0_table, s0_shift, s0_mask, s0_width,
            s1_table, s1_shift, s1_mask, s1_width,
            s2_table, s2_shift, s2_mask, s2_width,
            lr, p1, p2, p3, p4, p5, p6,
            TILE_FN, VARIANT, FLAG_A, FLAG_B, FLAG_C, W_KIND, W_ALIGNED, S_ALIGNED,
        )  # fmt: skip
        dst = scratch_ptr + seg[:, None] * scratch_stride + cols[None, :]
        tl.atomic_add(dst, sums, mask=(is_last & shared)[:, None] & col_ok[None, :], sem="relaxed")

    @triton.jit
    def _crossing_update_kernel(
        seg_ptr,
        seg_rows_ptr,
        scratch_ptr,
        gate_ptr,
        n,
        scratch_stride,
        min_seg,
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
        HAS_SEG_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        n = tl.where((tl.load(gate_ptr) | tl.load(gate_ptr + 1)) == 0, n, 0)
        # Boundary t sits between sorted positions t * BLOCK_N - 1 and t * BLOCK_N. A segment
        # spanning several boundaries is applied at the first: the one whose previous
        # boundary's left position holds another label.
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T) + 1
        pos = t * BLOCK_N
        t_ok = pos < n
        left = tl.load(seg_ptr + pos - 1, mask=t_ok, other=-1).to(tl.int64)
        label = tl.load(seg_ptr + pos, mask=t_ok, other=-1).to(tl.int64)
        earlier = tl.load(seg_ptr + pos - BLOCK_N - 1, mask=t_ok & (t > 1), other=-1).to(tl.int64)
        first = t_ok & (left == label) & (label >= min_seg) & ((t == 1) | (earlier != label))
        row = label
        if HAS_SEG_ROWS:
            row = tl.load(seg_rows_ptr + label, mask=first, other=0)
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            g = tl.load(
                scratch_ptr + label[:, None] * scratch_stride + cols[None, :],
                mask=first[:, None] & col_ok[None, :],
                other=0.0,
            )
            _apply_tile(
                row, first, cols, col_ok, g, dim,
                w_table, w_shift, w_mask,
                s0_table, s0_shift, s0_mask, s0_width,
                s1_table, s1_shift, s1_mask, s1_width,
                s2_table, s2_shift, s2_mask, s2_width,
                lr, p1, p2, p3, p4, p5, p6,
                TILE_FN, VARIANT, FLAG_A, FLAG_B, FLAG_C, W_KIND, W_ALIGNED, S_ALIGNED,
            )  # fmt: skip


def lookup_grad_update(
    update: RowUpdate,
    table: PagedTensor,
    gate: torch.Tensor,
    order: torch.Tensor,
    sorted_seg: torch.Tensor,
    num_segments: int,
    seg_rows: torch.Tensor | None,
    *,
    grad_pooled: torch.Tensor | None = None,
    bag_of: torch.Tensor | None = None,
    bag_scale: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 0,
    n_pooled: int = 0,
    grad_sequence: torch.Tensor | None = None,
    min_seg: int = 0,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Reduce the lookup's gradient by row and apply ``update`` to those rows of ``table``.

    Triton only (the caller runs the reference: :func:`lookup_grad_sums` then core's
    ``apply_row_update``); inputs are trusted and nothing here syncs with the device.

    Args:
        update: the optimizer's step of ``table`` (from a core ``RowUpdater``).
        table: the physical table's values.
        gate: core's int32 ``[2]`` gate, already holding the checks of the output gradients.
        order, sorted_seg, num_segments, min_seg, grad_pooled, bag_of, bag_scale, weights,
            batch_size, n_pooled, grad_sequence: as for :func:`lookup_grad_sums`.
        seg_rows: int64 ``[U]``: the table row of each label, or ``None`` (labels are rows).
        tile_elems, max_block_d, num_warps: tile tuning (:data:`FUSED_GRAD_DEFAULTS`).
    """
    n, dim, device = order.numel(), table.dim, order.device
    has_pooled = grad_pooled is not None and n_pooled > 0
    has_seq = grad_sequence is not None and n > n_pooled
    if not (has_pooled or has_seq):
        return
    if has_pooled:
        assert grad_pooled is not None and bag_of is not None and bag_scale is not None
        if grad_pooled.stride(2) != 1 and dim > 1:
            grad_pooled = grad_pooled.contiguous()
        if bag_scale.numel() > 2**31 - 1:
            raise ValueError(f"lookup_grad_update: {bag_scale.numel()} bags exceed 2**31 - 1")
    if has_seq:
        assert grad_sequence is not None
        if grad_sequence.stride(1) != 1 and dim > 1:
            grad_sequence = grad_sequence.contiguous()
    tile_elems = _pow2_floor(tile_elems or FUSED_GRAD_DEFAULTS["tile_elems"])
    block_d = _pow2_ceil(dim)
    if not update.whole_rows:
        block_d = min(block_d, _pow2_ceil(max_block_d or FUSED_GRAD_DEFAULTS["max_block_d"]))
    block_n = max(2, tile_elems // block_d)
    num_tiles = triton.cdiv(n, block_n)
    # Scratch rows by label; only labels of segments crossing a tile boundary are touched
    # (zeroed, then summed into), so the allocation moves no bytes of its own.
    scratch = torch.empty((max(num_segments, 1), dim), dtype=torch.float32, device=device)
    kw = row_update_kwargs(update, table)
    if num_tiles > 1:
        block_t = 64
        _ZERO_CROSSING(
            (triton.cdiv(num_tiles - 1, block_t),),
            sorted_seg, order, scratch, n, dim, scratch.stride(0),
            False, block_n, block_t, min(block_d, 128),  # HAS_DEST, BLOCK_N, _T, _D
            num_warps=4,
        )  # fmt: skip
        record_launch("lookup_grad_update_zero")
    _grad_update_kernel[(num_tiles, triton.cdiv(dim, block_d))](
        grad_pooled if has_pooled else scratch,
        grad_sequence if has_seq else scratch,
        sorted_seg,
        order,
        bag_of if has_pooled else order,
        bag_scale if has_pooled else scratch,
        weights if (has_pooled and weights is not None) else scratch,
        seg_rows if seg_rows is not None else order,
        scratch,
        gate,
        n,
        n_pooled,
        batch_size,
        grad_pooled.stride(0) if has_pooled else 0,
        grad_pooled.stride(1) if has_pooled else 0,
        grad_sequence.stride(0) if has_seq else 0,
        scratch.stride(0),
        min_seg,
        **kw,
        HAS_POOLED=has_pooled,
        HAS_SEQ=has_seq,
        HAS_WEIGHTS=has_pooled and weights is not None,
        HAS_SEG_ROWS=seg_rows is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps or FUSED_GRAD_DEFAULTS["num_warps"],
    )
    record_launch("lookup_grad_update")
    if num_tiles > 1:
        block_t = 16
        # Whole rows, or the columns looped inside: each crossing row is one program lane.
        cross_d = _pow2_ceil(dim) if update.whole_rows else min(_pow2_ceil(dim), 64)
        _crossing_update_kernel[(triton.cdiv(num_tiles - 1, block_t),)](
            sorted_seg,
            seg_rows if seg_rows is not None else order,
            scratch,
            gate,
            n,
            scratch.stride(0),
            min_seg,
            **kw,
            HAS_SEG_ROWS=seg_rows is not None,
            BLOCK_N=block_n,
            BLOCK_T=block_t,
            BLOCK_D=cross_d,
            num_warps=4,
        )
        record_launch("lookup_grad_update_crossing")
