"""The fused backward: reduce a lookup's gradient by row and apply an optimizer's update to
those rows in the same kernel, never writing the gradient out.

Same tiles as :func:`~recstack.embedding_engine.kernels.lookup_grad.lookup_grad_sums`
(``BLOCK_N`` sorted ids x ``BLOCK_D`` columns, a segmented scan, one sum per segment from
its last lane). A segment wholly inside its tile is a finished row gradient: the tile hands
it to core's ``tl_apply_row_update``, which runs the optimizer's tile function
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
from recstack.core.kernels.host import next_pow2, prev_pow2
from recstack.core.kernels.row_update import row_update_args
from recstack.embedding_engine.kernels.lookup_grad import lookup_grads, zero_crossing_rows

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.row_update import tl_apply_row_update, tl_runtime_row_update_args
    from recstack.embedding_engine.kernels.lookup_grad import tl_tile_grad_sums

__all__ = ["FUSED_GRAD_DEFAULTS", "lookup_grad_update"]

#: Tile defaults of the fused backward (``tile_elems`` is the target ``BLOCK_N * BLOCK_D``).
FUSED_GRAD_DEFAULTS: dict[str, int] = {"tile_elems": 2048, "max_block_d": 256, "num_warps": 4}


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _grad_update_kernel(
        grads,
        seg_rows_ptr,
        scratch_ptr,
        gate_ptr,
        n,
        scratch_stride,
        update,
        KINDS: tl.constexpr,
        UPDATE: tl.constexpr,
        HAS_SEG_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # A set gate (NaN/Inf in the output gradients) empties the launch: nothing written.
        n = tl.where((tl.load(gate_ptr) | tl.load(gate_ptr + 1)) == 0, n, 0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < update.weight.width
        sums, seg, is_last, shared = tl_tile_grad_sums(
            grads, n, cols, col_ok, KINDS, BLOCK_N, BLOCK_D
        )
        done = is_last & ~shared
        row = seg
        if HAS_SEG_ROWS:
            row = tl.load(seg_rows_ptr + seg, mask=done, other=0)
        tl_apply_row_update(row, done, cols, col_ok, sums, update, UPDATE)
        dst = scratch_ptr + seg[:, None] * scratch_stride + cols[None, :]
        tl.atomic_add(dst, sums, mask=(is_last & shared)[:, None] & col_ok[None, :], sem="relaxed")

    @triton.jit(do_not_specialize=["n", "min_seg"])
    def _crossing_update_kernel(
        seg_ptr,
        seg_rows_ptr,
        scratch_ptr,
        gate_ptr,
        n,
        scratch_stride,
        min_seg,
        update,
        UPDATE: tl.constexpr,
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
        dim = update.weight.width
        update = tl_runtime_row_update_args(update)
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            g = tl.load(
                scratch_ptr + label[:, None] * scratch_stride + cols[None, :],
                mask=first[:, None] & col_ok[None, :],
                other=0.0,
            )
            tl_apply_row_update(row, first, cols, col_ok, g, update, UPDATE)


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
    # Scratch rows by label; only labels of segments crossing a tile boundary are touched
    # (zeroed, then summed into), so the allocation moves no bytes of its own.
    scratch = torch.empty((max(num_segments, 1), dim), dtype=torch.float32, device=device)
    found = lookup_grads(
        "lookup_grad_update", order, sorted_seg, dim, scratch,
        grad_pooled=grad_pooled, bag_of=bag_of, bag_scale=bag_scale, weights=weights,
        batch_size=batch_size, n_pooled=n_pooled, grad_sequence=grad_sequence,
        min_seg=min_seg,
    )  # fmt: skip
    if found is None:
        return
    grads, kinds = found
    tile_elems = prev_pow2(tile_elems or FUSED_GRAD_DEFAULTS["tile_elems"])
    block_d = next_pow2(dim)
    if not update.whole_rows:
        block_d = min(block_d, next_pow2(max_block_d or FUSED_GRAD_DEFAULTS["max_block_d"]))
    block_n = max(2, tile_elems // block_d)
    num_tiles = triton.cdiv(n, block_n)
    args, consts = row_update_args(update, table)
    if num_tiles > 1:
        zero_crossing_rows(sorted_seg, order, scratch, n, num_tiles, block_n, block_d, False)
        record_launch("lookup_grad_update_zero")
    _grad_update_kernel[(num_tiles, triton.cdiv(dim, block_d))](
        grads,
        seg_rows if seg_rows is not None else order,
        scratch,
        gate,
        n,
        scratch.stride(0),
        args,
        KINDS=kinds,
        UPDATE=consts,
        HAS_SEG_ROWS=seg_rows is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps or FUSED_GRAD_DEFAULTS["num_warps"],
    )
    record_launch("lookup_grad_update")
    if num_tiles > 1:
        block_t = 16
        # Whole rows, or the columns looped inside: each crossing row is one program lane.
        cross_d = next_pow2(dim) if update.whole_rows else min(next_pow2(dim), 64)
        _crossing_update_kernel[(triton.cdiv(num_tiles - 1, block_t),)](
            sorted_seg,
            seg_rows if seg_rows is not None else order,
            scratch,
            gate,
            n,
            scratch.stride(0),
            min_seg,
            args,
            consts,
            HAS_SEG_ROWS=seg_rows is not None,
            BLOCK_N=block_n,
            BLOCK_T=block_t,
            BLOCK_D=cross_d,
            num_warps=4,
        )
        record_launch("lookup_grad_update_crossing")
