"""Segment sums over sorted row ids: the fused pass behind ``SparseGrad.coalesce``.

``coalesce_rows(rows, values)`` sums the value rows that share a row id and returns the
sorted unique ids with their sums. It sorts the ids once (``torch.sort``), turns the sorted
ids into segment ids (a cumulative sum of "differs from the previous id" flags), then one
Triton kernel reduces the segments:

* each program takes a tile of ``BLOCK_N`` sorted entries x ``BLOCK_D`` columns and reads
  the value rows through the sort permutation, so ``values`` is never permuted in memory;
* it runs a segmented inclusive scan (``tl.associative_scan`` over ``(value, is_start)``)
  down the tile, so the last entry of each segment inside the tile holds that segment's
  partial sum;
* only those last entries atomically add (fp32) into the zero-initialised output row.

A hot id repeated 100k times (Zipf traffic) therefore costs one atomic per tile it spans,
not one per occurrence, and no program walks a long segment on its own.

``coalesce_rows_padded`` does the same without a host sync: its outputs keep the input's
length and carry the number of unique rows as a device tensor, which the row-update
kernels read. ``segment_sum_sorted`` is the reusable middle step (the embedding backward
calls it with its own segment ids), ``segment_sum_sorted_triton`` its kernel path alone;
``coalesce_rows_reference`` / ``segment_sum_sorted_reference`` are the torch references
(``torch.unique`` + ``index_add_``).
"""

from __future__ import annotations

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.host import next_pow2, warps_for_rows
from recstack.core.kernels.launch import FastKernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_segmented_add

__all__ = [
    "SEGMENT_SUM_DEFAULTS",
    "coalesce_rows",
    "coalesce_rows_padded",
    "coalesce_rows_reference",
    "segment_sum_sorted",
    "segment_sum_sorted_reference",
    "segment_sum_sorted_triton",
    "segment_sum_warps",
    "sort_segments",
]

#: Default tile parameters of the segment-sum kernel (override per call with keywords).
#: ``tile_elems`` is the target ``BLOCK_N * BLOCK_D``; ``max_block_d`` caps the column tile.
SEGMENT_SUM_DEFAULTS: dict[str, int] = {"tile_elems": 4096, "max_block_d": 256, "num_warps": 4}


def segment_sum_warps(block_n: int) -> int:
    """Warps of the segment-sum kernel on a ``block_n``-row tile: the default, but at least
    one per 512 rows.

    More rows a warp spill registers on sm_90 (the compile check: a 4096 x 1 tile on 4
    warps spills 128 bytes a thread, on 8 none); only dim-1 tables reach that by default.

    Args:
        block_n: the tile's rows (sorted entries).
    """
    return warps_for_rows(block_n, rows_per_warp=512, default=SEGMENT_SUM_DEFAULTS["num_warps"])


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _segment_sum_kernel(
        val_ptr,
        order_ptr,
        seg_ptr,
        out_ptr,
        n,
        dim,
        val_stride,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        lane = tl.arange(0, BLOCK_N)
        i = pid * BLOCK_N + lane
        valid = i < n
        seg = tl.load(seg_ptr + i, mask=valid, other=-1)
        prev = tl.load(seg_ptr + i - 1, mask=valid & (i > 0), other=-1)
        nxt = tl.load(seg_ptr + i + 1, mask=(i + 1) < n, other=-1)
        src = tl.load(order_ptr + i, mask=valid, other=0)
        is_start = (seg != prev).to(tl.int32)
        # The last entry of a segment inside this tile carries the tile's partial sum.
        is_last = valid & ((seg != nxt) | (lane == BLOCK_N - 1))

        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x = tl.load(
            val_ptr + src[:, None] * val_stride + cols[None, :],
            mask=valid[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        flags = tl.broadcast_to(is_start[:, None], (BLOCK_N, BLOCK_D))
        sums, _ = tl.associative_scan((x, flags), axis=0, combine_fn=tl_segmented_add)
        tl.atomic_add(
            out_ptr + seg[:, None] * dim + cols[None, :],
            sums,
            mask=is_last[:, None] & col_ok[None, :],
            sem="relaxed",
        )

    @triton.jit(do_not_specialize=["n"])
    def _zero_rows_kernel(
        out_ptr, count_ptr, n, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
    ):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < tl.minimum(tl.load(count_ptr), n)
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (cols < dim)[None, :]
            tl.store(out_ptr + r[:, None] * dim + cols[None, :], 0.0, mask=m)

    _SEGMENT_SUM = FastKernel(_segment_sum_kernel)
    _ZERO_ROWS = FastKernel(_zero_rows_kernel)


def _check_values(values: torch.Tensor, n: int | None, what: str) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{what}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 2:
        raise ValueError(f"{what}: values must be 2-D [n, dim], got shape {tuple(values.shape)}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: values must be a float tensor, got {values.dtype}")
    if n is not None and values.shape[0] != n:
        raise ValueError(f"{what}: values has {values.shape[0]} rows but rows has {n} entries")


def _check_rows(rows: torch.Tensor, what: str, arg: str = "rows") -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{what}: {arg} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise TypeError(f"{what}: {arg} must be an integer tensor, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"{what}: {arg} must be 1-D, got shape {tuple(rows.shape)}")
    return rows.to(torch.int64)


def _check_pair(rows: torch.Tensor, values: torch.Tensor, what: str) -> torch.Tensor:
    """Validate ``rows`` (returned as int64) against ``values`` [len(rows), dim]."""
    rows = _check_rows(rows, what)
    _check_values(values, rows.numel(), what)
    if rows.device != values.device:
        raise ValueError(
            f"{what}: rows is on device {rows.device} but values is on device {values.device}"
        )
    return rows


def _segments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_rows, order, starts, segment_ids)`` of int64 ``rows``; no host sync."""
    sorted_rows, order = torch.sort(rows, stable=True)
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    if rows.numel() > 1:
        torch.ne(sorted_rows[1:], sorted_rows[:-1], out=starts[1:])
    return sorted_rows, order, starts, torch.cumsum(starts, 0) - 1


def sort_segments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort int64 ``rows`` and split them into segments of equal ids.

    Returns ``(unique_rows, order, segment_ids)``: ``order`` is the stable sort permutation
    (sorted position -> original position) and ``segment_ids[k]`` is the index in
    ``unique_rows`` of the ``k``-th sorted entry. One host sync (the number of unique ids).
    """
    sorted_rows, order, starts, segment_ids = _segments(rows)
    return sorted_rows[starts], order, segment_ids


def segment_sum_sorted_triton(
    values: torch.Tensor,
    order: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`segment_sum_sorted`'s kernel path, for callers already on it: no validation,
    no backend choice.

    Args:
        values: float ``[n, dim]`` value rows (unit column stride preferred).
        order: int64 ``[n]`` value rows in segment order.
        segment_ids: int64 ``[n]`` non-decreasing segment of each sorted entry.
        num_segments: rows of the output.
        tile_elems: target ``BLOCK_N * BLOCK_D`` (:data:`SEGMENT_SUM_DEFAULTS`).
        max_block_d: the column tile cap.
        num_warps: warps per program (``None``: :func:`segment_sum_warps`).
        count: int64 ``[1]`` on the device: only the first ``count`` output rows are
            zeroed and summed into, the rest is left unwritten; ``None``: all of them.
    """
    n, dim = order.numel(), values.shape[1]
    if count is None:
        out = torch.zeros((num_segments, dim), dtype=torch.float32, device=values.device)
    else:
        # Only the first `count` rows are summed into: zero those alone (the padding of
        # coalesce_rows_padded may be much larger than the unique rows).
        out = torch.empty((num_segments, dim), dtype=torch.float32, device=values.device)
        if num_segments and dim:
            block_d = min(next_pow2(dim), 128)
            block_r = max(1, 2048 // block_d)
            _ZERO_ROWS(
                (triton.cdiv(num_segments, block_r),), out, count, num_segments, dim,
                block_r, block_d, num_warps=4,
            )  # fmt: skip
            record_launch("zero_rows")
    if n == 0 or dim == 0:
        return out
    if values.stride(1) != 1:
        values = values.contiguous()
    tile_elems = tile_elems or SEGMENT_SUM_DEFAULTS["tile_elems"]
    max_block_d = max_block_d or SEGMENT_SUM_DEFAULTS["max_block_d"]
    block_d = min(next_pow2(dim), next_pow2(max_block_d))
    block_n = next_pow2(max(1, tile_elems // block_d))
    grid = (triton.cdiv(n, block_n), triton.cdiv(dim, block_d))
    _SEGMENT_SUM(
        grid,
        values,
        order,
        segment_ids,
        out,
        n,
        dim,
        values.stride(0),
        block_n,
        block_d,
        num_warps=num_warps or segment_sum_warps(block_n),
    )
    record_launch("segment_sum")
    return out


def segment_sum_sorted_reference(
    values: torch.Tensor,
    order: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
) -> torch.Tensor:
    """Torch reference of :func:`segment_sum_sorted` (fp32 ``index_add_``)."""
    record_launch("segment_sum_reference")
    out = torch.zeros((num_segments, values.shape[1]), dtype=torch.float32, device=values.device)
    if order.numel():
        out.index_add_(0, segment_ids, values.index_select(0, order).to(torch.float32))
    return out


def segment_sum_sorted(
    values: torch.Tensor,
    order: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Sum ``values[order[k]]`` into row ``segment_ids[k]`` of a new fp32 [num_segments, dim].

    ``order`` (int64, length n) lists the value rows in segment order and ``segment_ids``
    (int64, length n) must be non-decreasing in ``[0, num_segments)`` -- exactly what
    :func:`sort_segments` returns. Accumulation is fp32 whatever the values' dtype.
    Not validated on device (no sync): out-of-range ids are the caller's bug.

    Examples:
        >>> import torch
        >>> rows = torch.tensor([5, 1, 5])
        >>> uniq, order, seg = sort_segments(rows)
        >>> segment_sum_sorted(torch.ones(3, 2), order, seg, uniq.numel()).tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    what = "segment_sum_sorted"
    order = _check_rows(order, what, "order")
    segment_ids = _check_rows(segment_ids, what, "segment_ids")
    _check_values(values, None, what)
    if order.numel() != segment_ids.numel():
        raise ValueError(
            f"{what}: order has {order.numel()} entries but segment_ids has {segment_ids.numel()}"
        )
    if num_segments < 0:
        raise ValueError(f"{what}: num_segments must be >= 0, got {num_segments}")
    for name, t in (("order", order), ("segment_ids", segment_ids)):
        if t.device != values.device:
            raise ValueError(
                f"{what}: {name} is on device {t.device} but values is on device {values.device}"
            )
    if use_triton(values, order, segment_ids, op=what):
        return segment_sum_sorted_triton(
            values,
            order,
            segment_ids,
            num_segments,
            tile_elems=tile_elems,
            max_block_d=max_block_d,
            num_warps=num_warps,
        )
    return segment_sum_sorted_reference(values, order, segment_ids, num_segments)


def coalesce_rows_reference(
    rows: torch.Tensor, values: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`coalesce_rows`: ``torch.unique`` + fp32 ``index_add_``."""
    record_launch("coalesce_rows_reference")
    out_dtype = out_dtype or values.dtype
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = torch.zeros(
        (unique.numel(), values.shape[1]), dtype=torch.float32, device=values.device
    )
    if rows.numel():
        summed.index_add_(0, inverse, values.to(torch.float32))
    return unique, summed.to(out_dtype)


def coalesce_rows(
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum value rows that share a row id: ``(sorted unique rows, summed [u, dim])``.

    ``rows`` is a 1-D integer tensor (converted to int64) and ``values`` a float
    ``[len(rows), dim]`` tensor on the same device. Sums accumulate in fp32 and are
    returned in ``out_dtype`` (default: the values' dtype). One sort, one host sync (the
    number of unique rows) and one kernel launch.

    Examples:
        >>> import torch
        >>> uniq, summed = coalesce_rows(torch.tensor([3, 0, 3]), torch.ones(3, 1))
        >>> uniq.tolist(), summed.tolist()
        ([0, 3], [[1.0], [2.0]])
    """
    what = "coalesce_rows"
    rows = _check_pair(rows, values, what)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: out_dtype must be a float dtype, got {out_dtype}")
    out_dtype = out_dtype or values.dtype
    if not use_triton(rows, values, op=what):
        return coalesce_rows_reference(rows, values, out_dtype=out_dtype)
    unique, order, segment_ids = sort_segments(rows)
    summed = segment_sum_sorted_triton(
        values,
        order,
        segment_ids,
        unique.numel(),
        tile_elems=tile_elems,
        max_block_d=max_block_d,
        num_warps=num_warps,
    )
    return unique, summed.to(out_dtype)


def coalesce_rows_padded(
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`coalesce_rows` without its host sync: the output keeps the input's length.

    Returns ``(unique, summed, count)``: ``unique`` (int64 ``[n]``) holds the sorted unique
    rows in its first ``count`` entries and ``-1`` after them; ``summed`` (fp32 ``[n, dim]``)
    their sums, and after them anything (the Triton path leaves that memory unwritten:
    only the sums' rows are zeroed and summed into); ``count`` the number of unique rows
    as an int64 ``[1]`` tensor on the device. Core's ``check_rows`` and
    ``apply_row_update`` take ``count=`` and skip the padding on the device, so an
    optimizer step from an uncoalesced gradient queues its work without waiting for the
    GPU (``coalesce_rows`` reads the number of unique rows back to size its output).

    Examples:
        >>> import torch
        >>> uniq, summed, count = coalesce_rows_padded(torch.tensor([3, 0, 3]), torch.ones(3, 1))
        >>> uniq.tolist(), summed[:2].tolist(), count.tolist()
        ([0, 3, -1], [[1.0], [2.0]], [2])
    """
    what = "coalesce_rows_padded"
    rows = _check_pair(rows, values, what)
    n = rows.numel()
    if n == 0:
        empty = torch.zeros((0, values.shape[1]), dtype=torch.float32, device=values.device)
        return rows, empty, torch.zeros(1, dtype=torch.int64, device=rows.device)
    sorted_rows, order, _, segment_ids = _segments(rows)
    # Every entry of a segment writes the same id, so the scatter's order does not matter.
    unique = torch.full_like(sorted_rows, -1).scatter_(0, segment_ids, sorted_rows)
    count = segment_ids[-1:] + 1
    if use_triton(rows, values, op=what):
        summed = segment_sum_sorted_triton(
            values, order, segment_ids, n,
            tile_elems=tile_elems, max_block_d=max_block_d, num_warps=num_warps, count=count,
        )  # fmt: skip
    else:
        summed = segment_sum_sorted_reference(values, order, segment_ids, n)
    return unique, summed, count
