"""The table gradient of one lookup, pooled bags and sequence rows at once, reduced by row.

A physical table's lookup reads ``N`` ids: the first ``n_pooled`` are pooled into bags (bag
``bag_of[j]`` of ``K * B``, scaled by ``bag_scale[bag]`` and the id's weight), the rest are
sequence ids with one output row each. The gradient of the row behind id ``j`` is

* ``grad_pooled[b, k] * bag_scale[bag] * weight[j]`` for a pooled id (``bag = k * B + b``);
* ``grad_sequence[j - n_pooled]`` for a sequence id,

and :func:`lookup_grad_sums` sums those by row without building the per-id ``[N, dim]``
gradient. Its input is the *sorted* form of the ids that the forward already made while
deduplicating them (:func:`~recstack.embedding_engine.dedup.sort_ids`):

* ``order``: a permutation of ``[0, N)`` listing the ids grouped by row;
* ``sorted_seg[i]``: the segment label of sorted position ``i``; each label's positions form
  one contiguous run (labels need not increase along it);
* ``seg_dest``: the output row of each label (``None``: the label itself), so labels in key
  order can land in row order and the result is a coalesced ``SparseGrad`` at once.

Kernel: each program takes ``BLOCK_N`` sorted positions x ``BLOCK_D`` columns, reads each
id's gradient row on the fly (one masked load from the pooled gradient, one from the
sequence gradient; a masked lane moves no bytes), runs a segmented inclusive scan down the
tile (core's ``tl_segmented_add``) and writes each segment's sum from its last lane. A segment
wholly inside the tile is *stored*; only a segment crossing a tile boundary ``atomic_add``-s
its partial, into a row a tiny pre-kernel zeroed, so a hot row repeated 100k times costs one
atomic per tile it spans, never one per id. No launch ever waits on the host.

Bytes moved (``D`` = dim, fp32 gradients, ``N`` ids, ``U`` rows): per id the sorted label
(4 B) and position (8 B), its bag (one 32-byte sector: ``bag_of`` is read in id order through
the permutation) and one ``D * 4``-byte gradient row; per row ``D * 4`` bytes written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.host import next_pow2, prev_pow2, warps_for_rows

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_segmented_add
    from recstack.core.kernels.launch import FastKernel

__all__ = [
    "GRAD_DEFAULTS",
    "LookupGradKinds",
    "LookupGrads",
    "lookup_grad_sums",
    "lookup_grad_sums_reference",
    "lookup_grad_warps",
    "lookup_grads",
    "tl_tile_grad_sums",
    "zero_crossing_rows",
]

#: Kernel tile defaults: ``tile_elems`` is the target ``BLOCK_N * BLOCK_D``.
GRAD_DEFAULTS: dict[str, int] = {"tile_elems": 2048, "max_block_d": 256, "num_warps": 1}


def lookup_grad_warps(block_n: int) -> int:
    """Warps of the gradient-sum kernel on a ``block_n``-row tile: the default, but at
    least one per 128 rows.

    A warp scanning more than 128 rows spills registers on sm_90 (core's compile check:
    a 512 x 4 tile on one warp spills 424 bytes a thread, on two or more none), which only
    narrow tables (dim 8 or less) reach at the default tile size.

    Args:
        block_n: the tile's rows (sorted ids).
    """
    return warps_for_rows(block_n, rows_per_warp=128, default=GRAD_DEFAULTS["num_warps"])


class LookupGrads(NamedTuple):
    """A lookup's gradient rows and the sorted ids they are reduced by, as one kernel
    argument (see :func:`lookup_grad_sums` for the meaning of each).

    Attributes:
        sorted_seg: int32/int64 ``[N]`` segment label of each sorted position.
        order: int64 ``[N]`` id at each sorted position.
        min_seg: the lowest label that gets a gradient.
        grad_pooled: ``[B, K, dim]`` gradient of the pooled output.
        stride_b: its batch stride.
        stride_k: its feature stride.
        bag_of: int64 ``[n_pooled]`` bag of each pooled id.
        bag_scale: fp32 ``[K * B]`` scale of each bag.
        weights: float ``[n_pooled]`` per-id weights.
        batch_size: ``B``.
        n_pooled: ids below it are pooled, the rest sequence ids.
        grad_sequence: ``[N - n_pooled, dim]`` gradient of the sequence rows.
        seq_stride: its row stride.

    A part the lookup lacks (see :class:`LookupGradKinds`) holds any tensor, never read.
    """

    sorted_seg: Any
    order: Any
    min_seg: int
    grad_pooled: Any
    stride_b: int
    stride_k: int
    bag_of: Any
    bag_scale: Any
    weights: Any
    batch_size: int
    n_pooled: int
    grad_sequence: Any
    seq_stride: int


class LookupGradKinds(NamedTuple):
    """Which parts of a :class:`LookupGrads` a kernel reads (its constexpr argument).

    Attributes:
        has_pooled: pooled ids with a gradient.
        has_seq: sequence ids with a gradient.
        has_weights: per-id weights of the pooled ids.
    """

    has_pooled: bool
    has_seq: bool
    has_weights: bool


def _parts(
    n: int, n_pooled: int, grad_pooled: torch.Tensor | None, grad_sequence: torch.Tensor | None
) -> tuple[bool, bool]:
    """Whether pooled ids, and sequence ids, have a gradient."""
    return grad_pooled is not None and n_pooled > 0, grad_sequence is not None and n > n_pooled


def lookup_grads(
    op: str,
    order: torch.Tensor,
    sorted_seg: torch.Tensor,
    dim: int,
    spare: torch.Tensor,
    *,
    grad_pooled: torch.Tensor | None,
    bag_of: torch.Tensor | None,
    bag_scale: torch.Tensor | None,
    weights: torch.Tensor | None,
    batch_size: int,
    n_pooled: int,
    grad_sequence: torch.Tensor | None,
    min_seg: int,
) -> tuple[LookupGrads, LookupGradKinds] | None:
    """The kernel arguments of a lookup's gradient (``None`` when no id has one).

    Args:
        op: the caller, for errors.
        order: as for :func:`lookup_grad_sums`.
        sorted_seg: as for :func:`lookup_grad_sums`.
        dim: the row width.
        spare: an fp32 tensor on the device, passed for the parts the lookup lacks.
        grad_pooled: as for :func:`lookup_grad_sums` (made unit-column-stride here).
        bag_of: as for :func:`lookup_grad_sums`.
        bag_scale: as for :func:`lookup_grad_sums`.
        weights: as for :func:`lookup_grad_sums`.
        batch_size: as for :func:`lookup_grad_sums`.
        n_pooled: as for :func:`lookup_grad_sums`.
        grad_sequence: as for :func:`lookup_grad_sums` (made unit-column-stride here).
        min_seg: as for :func:`lookup_grad_sums`.

    Raises:
        ValueError: more than ``2**31 - 1`` bags (the kernels divide bags in 32 bits).
    """
    has_pooled, has_seq = _parts(order.numel(), n_pooled, grad_pooled, grad_sequence)
    if not (has_pooled or has_seq):
        return None
    pooled, stride_b, stride_k = spare, 0, 0
    if has_pooled:
        assert grad_pooled is not None and bag_of is not None and bag_scale is not None
        if grad_pooled.stride(2) != 1 and dim > 1:
            grad_pooled = grad_pooled.contiguous()
        if bag_scale.numel() > 2**31 - 1:
            raise ValueError(f"{op}: {bag_scale.numel()} bags exceed 2**31 - 1")
        pooled, stride_b, stride_k = grad_pooled, grad_pooled.stride(0), grad_pooled.stride(1)
    seq, seq_stride = spare, 0
    if has_seq:
        assert grad_sequence is not None
        if grad_sequence.stride(1) != 1 and dim > 1:
            grad_sequence = grad_sequence.contiguous()
        seq, seq_stride = grad_sequence, grad_sequence.stride(0)
    has_weights = has_pooled and weights is not None
    grads = LookupGrads(
        sorted_seg,
        order,
        min_seg,
        pooled,
        stride_b,
        stride_k,
        bag_of if has_pooled else order,
        bag_scale if has_pooled else spare,
        weights if has_weights else spare,
        batch_size,
        n_pooled,
        seq,
        seq_stride,
    )
    return grads, LookupGradKinds(has_pooled, has_seq, has_weights)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _zero_crossing_kernel(
        seg_ptr,
        dest_ptr,
        out_ptr,
        n,
        dim,
        out_stride,
        HAS_DEST: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Tile boundary t sits between sorted positions t * BLOCK_N - 1 and t * BLOCK_N; a
        # segment spanning it is written with atomics, so its row must start at zero.
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T) + 1
        pos = t * BLOCK_N
        t_ok = pos < n
        left = tl.load(seg_ptr + pos - 1, mask=t_ok, other=-1).to(tl.int64)
        right = tl.load(seg_ptr + pos, mask=t_ok, other=-1).to(tl.int64)
        cross = t_ok & (left == right) & (right >= 0)
        row = right
        if HAS_DEST:
            row = tl.load(dest_ptr + right, mask=cross, other=0)
        zeros = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            tl.store(
                out_ptr + row[:, None] * out_stride + cols[None, :],
                zeros,
                mask=cross[:, None] & (cols < dim)[None, :],
            )

    @triton.jit
    def tl_tile_grad_sums(grads, n, cols, col_ok, KINDS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):  # fmt: skip
        """This program's tile of sorted ids: the segmented sums of their gradient rows.

        Args:
            grads: the :class:`LookupGrads`.
            n: sorted positions at or past ``n`` are not read.
            cols: ``[BLOCK_D]`` column indices; ``col_ok`` those inside the row.
            col_ok: bool ``[BLOCK_D]``.
            KINDS: the :class:`LookupGradKinds` (constexpr).
            BLOCK_N: sorted positions a tile (constexpr).
            BLOCK_D: columns a tile (constexpr).

        Returns:
            ``(sums, seg, is_last, shared)``: the segmented inclusive sums of the tile's
            per-id gradients, each position's label, which positions end their segment
            inside the tile, and which of those segments cross a tile boundary.
        """
        seg_ptr = grads.sorted_seg
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK_N)
        first = pid * BLOCK_N
        i = first + lane
        valid = i < n
        seg = tl.load(seg_ptr + i, mask=valid, other=-1).to(tl.int64)
        prev = tl.load(seg_ptr + i - 1, mask=valid & (i > 0), other=-1).to(tl.int64)
        nxt = tl.load(seg_ptr + i + 1, mask=(i + 1) < n, other=-1).to(tl.int64)
        # Segments equal to the entry just before / after the tile cross its boundary.
        before = tl.load(seg_ptr + first - 1, mask=(first > 0) & (first < n), other=-2).to(tl.int64)
        after = tl.load(seg_ptr + first + BLOCK_N, mask=first + BLOCK_N < n, other=-2).to(tl.int64)
        # Labels below min_seg (ids without a row) read nothing and get no gradient.
        live = valid & (seg >= grads.min_seg)
        src = tl.load(grads.order + i, mask=live, other=0).to(tl.int64)
        g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        n_pooled = grads.n_pooled
        if KINDS.has_pooled:
            pool = live & (src < n_pooled)
            bag = tl.load(grads.bag_of + src, mask=pool, other=0).to(tl.int32)
            scale = tl.load(grads.bag_scale + bag, mask=pool, other=0.0)
            if KINDS.has_weights:
                w = tl.load(grads.weights + src, mask=pool, other=0.0)
                scale = scale * w.to(tl.float32)
            # K * B < 2**31 (checked by the launcher): a 32-bit division, not a 64-bit one.
            k = bag // grads.batch_size
            b = bag - k * grads.batch_size
            at = b.to(tl.int64) * grads.stride_b + k.to(tl.int64) * grads.stride_k
            x = tl.load(
                grads.grad_pooled + at[:, None] + cols[None, :],
                mask=pool[:, None] & col_ok[None, :],
                other=0.0,
            )
            g += x.to(tl.float32) * scale[:, None]
        if KINDS.has_seq:
            sq = live & (src >= n_pooled)
            x = tl.load(
                grads.grad_sequence
                + ((src - n_pooled) * grads.seq_stride)[:, None]
                + cols[None, :],
                mask=sq[:, None] & col_ok[None, :],
                other=0.0,
            )
            g += x.to(tl.float32)
        is_start = (seg != prev).to(tl.int32)
        flags = tl.broadcast_to(is_start[:, None], (BLOCK_N, BLOCK_D))
        sums, _ = tl.associative_scan((g, flags), axis=0, combine_fn=tl_segmented_add)
        # The last lane of a segment inside the tile carries the tile's sum of it.
        is_last = live & ((seg != nxt) | (lane == BLOCK_N - 1))
        shared = (seg == before) | (seg == after)
        return sums, seg, is_last, shared

    @triton.jit(do_not_specialize=["n"])
    def _grad_sum_kernel(
        grads,
        dest_ptr,
        out_ptr,
        n,
        dim,
        out_stride,
        KINDS: tl.constexpr,
        HAS_DEST: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        sums, seg, is_last, shared = tl_tile_grad_sums(
            grads, n, cols, col_ok, KINDS, BLOCK_N, BLOCK_D
        )
        row = seg
        if HAS_DEST:
            row = tl.load(dest_ptr + seg, mask=is_last, other=0)
        dst = out_ptr + row[:, None] * out_stride + cols[None, :]
        tl.store(dst, sums, mask=(is_last & ~shared)[:, None] & col_ok[None, :])
        tl.atomic_add(dst, sums, mask=(is_last & shared)[:, None] & col_ok[None, :], sem="relaxed")

    # Launched without Triton's per-call binding (core's FastKernel): a backward's launches
    # cost host time that small batches feel.
    _ZERO_CROSSING = FastKernel(_zero_crossing_kernel)
    _GRAD_SUM = FastKernel(_grad_sum_kernel)


def zero_crossing_rows(
    sorted_seg: torch.Tensor,
    dest: torch.Tensor,
    out: torch.Tensor,
    n: int,
    num_tiles: int,
    block_n: int,
    block_d: int,
    has_dest: bool,
) -> None:
    """Zero the rows of ``out`` that segments crossing a tile boundary sum into (one launch).

    A segment wholly inside a ``block_n``-position tile is stored; one crossing a boundary
    adds its partials with atomics, so its row must start at zero. Only those rows are
    written, so ``out`` need not be zero-filled.

    Args:
        sorted_seg: int32/int64 ``[n]`` segment label of each sorted position.
        dest: int64 ``[U]`` output row of each label (used with ``has_dest``).
        out: fp32 ``[U, dim]`` rows (unit column stride).
        n: the sorted positions.
        num_tiles: ``cdiv(n, block_n)``, at least 2 (one tile crosses no boundary).
        block_n: the tile's positions.
        block_d: the sum kernels' column tile (this launch takes at most 128 columns).
        has_dest: rows are ``dest[label]`` rather than the labels themselves.
    """
    block_t = 64
    _ZERO_CROSSING(
        (triton.cdiv(num_tiles - 1, block_t),),
        sorted_seg, dest, out, n, out.shape[1], out.stride(0),
        has_dest, block_n, block_t, min(block_d, 128),
        num_warps=4,
    )  # fmt: skip


def _per_id_grads(
    n: int,
    dim: int,
    device: torch.device,
    grad_pooled: torch.Tensor | None,
    bag_of: torch.Tensor | None,
    bag_scale: torch.Tensor | None,
    weights: torch.Tensor | None,
    batch_size: int,
    n_pooled: int,
    grad_sequence: torch.Tensor | None,
) -> torch.Tensor:
    """``[N, dim]`` fp32: each id's gradient contribution (the reference materializes it)."""
    contrib = torch.zeros((n, dim), dtype=torch.float32, device=device)
    if grad_pooled is not None and n_pooled:
        assert bag_of is not None and bag_scale is not None
        num_keys = grad_pooled.shape[1]
        per_bag = grad_pooled.to(torch.float32).transpose(0, 1).reshape(num_keys * batch_size, dim)
        scale = bag_scale.index_select(0, bag_of)
        if weights is not None:
            scale = scale * weights.to(torch.float32)
        contrib[:n_pooled] = per_bag.index_select(0, bag_of) * scale[:, None]
    if grad_sequence is not None and n > n_pooled:
        contrib[n_pooled:] = grad_sequence.to(torch.float32)
    return contrib


def lookup_grad_sums_reference(
    order: torch.Tensor,
    sorted_seg: torch.Tensor,
    num_segments: int,
    seg_dest: torch.Tensor | None,
    dim: int,
    *,
    grad_pooled: torch.Tensor | None = None,
    bag_of: torch.Tensor | None = None,
    bag_scale: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 0,
    n_pooled: int = 0,
    grad_sequence: torch.Tensor | None = None,
    min_seg: int = 0,
) -> torch.Tensor:
    """Torch reference of :func:`lookup_grad_sums` (per-id gradients + ``index_add_``)."""
    record_launch("lookup_grad_sums_reference")
    n, device = order.numel(), order.device
    values = torch.zeros((num_segments, dim), dtype=torch.float32, device=device)
    if not n:
        return values
    contrib = _per_id_grads(
        n, dim, device, grad_pooled, bag_of, bag_scale, weights, batch_size, n_pooled,
        grad_sequence,
    )  # fmt: skip
    seg = sorted_seg.to(torch.int64)
    live = seg >= min_seg
    labels = seg[live]
    dest = labels if seg_dest is None else seg_dest.index_select(0, labels)
    values.index_add_(0, dest, contrib.index_select(0, order[live]))
    return values


def lookup_grad_sums(
    order: torch.Tensor,
    sorted_seg: torch.Tensor,
    num_segments: int,
    seg_dest: torch.Tensor | None,
    dim: int,
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
) -> torch.Tensor:
    """fp32 ``[num_segments, dim]``: the summed gradient of each segment's ids, at its row.

    Inputs are trusted (the callers built them); nothing here syncs with the device.

    Args:
        order: int64 ``[N]`` permutation of the ids grouping them by segment.
        sorted_seg: int32/int64 ``[N]``: segment label of each sorted position, each label's
            positions contiguous; labels below ``min_seg`` get no gradient.
        num_segments: ``U``, labels are in ``[0, U)`` (those ``>= min_seg`` all occur).
        seg_dest: int64 ``[U]``, a permutation: the output row of each label; ``None`` for
            the label itself.
        dim: the row width.
        grad_pooled: ``[B, K, dim]`` gradient of the pooled output (unit column stride), or
            ``None`` (pooled ids then contribute zeros).
        bag_of: int64 ``[n_pooled]``: the bag ``k * B + b`` of each pooled id.
        bag_scale: fp32 ``[K * B]``: ``1`` or ``1 / length`` (mean) per bag.
        weights: float ``[n_pooled]`` per-id weights, or ``None``.
        batch_size: ``B``.
        n_pooled: ids ``[0, n_pooled)`` are pooled, the rest sequence ids.
        grad_sequence: ``[N - n_pooled, dim]`` gradient of the sequence rows, or ``None``.
        min_seg: the lowest label that gets a gradient.
        tile_elems: target ``BLOCK_N * BLOCK_D`` of one program.
        max_block_d: the column tile cap.
        num_warps: warps per program.

    Rows whose ids all have a ``None`` gradient are zeros; rows of labels below ``min_seg``
    are left unwritten (uninitialized on the Triton path).
    """
    n, device = order.numel(), order.device
    tensors = [t for t in (order, sorted_seg, grad_pooled, grad_sequence) if t is not None]
    if not any(_parts(n, n_pooled, grad_pooled, grad_sequence)):
        return torch.zeros((num_segments, dim), dtype=torch.float32, device=device)
    if not use_triton(*tensors, op="lookup_grad_sums"):
        return lookup_grad_sums_reference(
            order, sorted_seg, num_segments, seg_dest, dim,
            grad_pooled=grad_pooled, bag_of=bag_of, bag_scale=bag_scale, weights=weights,
            batch_size=batch_size, n_pooled=n_pooled, grad_sequence=grad_sequence,
            min_seg=min_seg,
        )  # fmt: skip
    # Not zero-filled: every segment wholly inside a tile is stored; the pre-kernel zeroes
    # only the rows of segments that cross a tile boundary (written with atomics).
    values = torch.empty((num_segments, dim), dtype=torch.float32, device=device)
    found = lookup_grads(
        "lookup_grad_sums", order, sorted_seg, dim, values,
        grad_pooled=grad_pooled, bag_of=bag_of, bag_scale=bag_scale, weights=weights,
        batch_size=batch_size, n_pooled=n_pooled, grad_sequence=grad_sequence,
        min_seg=min_seg,
    )  # fmt: skip
    assert found is not None
    grads, kinds = found
    tile_elems = prev_pow2(tile_elems or GRAD_DEFAULTS["tile_elems"])
    max_block_d = max_block_d or GRAD_DEFAULTS["max_block_d"]
    block_d = min(next_pow2(dim), next_pow2(max_block_d))
    block_n = max(2, tile_elems // block_d)
    num_tiles = triton.cdiv(n, block_n)
    dest = seg_dest if seg_dest is not None else order
    if num_tiles > 1:
        zero_crossing_rows(
            sorted_seg, dest, values, n, num_tiles, block_n, block_d, seg_dest is not None
        )
        record_launch("lookup_grad_sums_zero")
    _GRAD_SUM(
        (num_tiles, triton.cdiv(dim, block_d)),
        grads,
        dest,
        values,
        n,
        dim,
        values.stride(0),
        kinds,
        seg_dest is not None,  # HAS_DEST
        block_n,  # BLOCK_N
        block_d,  # BLOCK_D
        num_warps=num_warps or lookup_grad_warps(block_n),
    )
    record_launch("lookup_grad_sums")
    return values
