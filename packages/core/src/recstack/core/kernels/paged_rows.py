"""Row gather/scatter through a PagedTensor's page table.

A :class:`~recstack.core.paged.PagedTensor` keeps its rows in fixed-size pages and an int64
``page_table`` of the pages' data pointers. Row ``r`` lives in page ``r >> page_shift`` at
offset ``r & page_mask``. A wrapped plain tensor is one page with ``page_shift = 62``, so
every valid row maps to page 0 and the same kernel serves both.

Kernel layout (bandwidth-bound): each program copies a tile of ``BLOCK_R`` rows x
``BLOCK_D`` columns; the grid's second axis walks the column tiles when ``dim`` exceeds
``BLOCK_D``. Row ids and page pointers are loaded once per tile, then one 2-D masked load
and one 2-D masked store move the tile. Page pointers carry a 16-byte alignment hint (when
every page is 16-byte aligned) so the loads vectorize when ``dim`` allows.

``reduce="add"``: fp32 tables use ``tl.atomic_add`` per entry, so duplicate rows all land;
16-bit tables first coalesce duplicates with the segment-sum kernel (fp32 sums), then
read-add-write each unique row once and round once (16-bit atomics are not portable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.kernels.segment_sum import (
    coalesce_rows_reference,
    segment_sum_sorted_triton,
    sort_segments,
)

if TYPE_CHECKING:
    from recstack.core.paged import PagedTensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_row_pointers, tl_to_table_dtype

__all__ = [
    "PAGED_ROWS_DEFAULTS",
    "gather_paged_rows",
    "gather_paged_rows_reference",
    "scatter_paged_rows",
    "scatter_paged_rows_reference",
]

#: Default tile parameters of the gather/scatter kernels (override per call with keywords).
#: ``tile_elems`` is the target ``BLOCK_R * BLOCK_D``; ``max_block_d`` caps the column tile
#: (wider rows use several column tiles on the grid's second axis).
PAGED_ROWS_DEFAULTS: dict[str, int] = {"tile_elems": 4096, "max_block_d": 256, "num_warps": 4}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MODE = {"set": 0, "add_atomic": 1, "add_unique": 2}


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _paged_gather_kernel(
        page_table_ptr,
        rows_ptr,
        out_ptr,
        n,
        dim,
        out_stride,
        page_shift,
        page_mask,
        KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < n
        rows = tl.load(rows_ptr + r, mask=row_ok, other=0)
        src = tl_row_pointers(
            page_table_ptr, rows, row_ok, page_shift, page_mask, dim, KIND, ALIGNED
        )
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(src[:, None] + cols[None, :], mask=mask)
        tl.store(out_ptr + r[:, None] * out_stride + cols[None, :], x, mask=mask)

    @triton.jit(do_not_specialize=["n"])
    def _paged_scatter_kernel(
        page_table_ptr,
        rows_ptr,
        val_ptr,
        n,
        dim,
        val_stride,
        page_shift,
        page_mask,
        KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
        MODE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < n
        rows = tl.load(rows_ptr + r, mask=row_ok, other=0)
        dst = tl_row_pointers(
            page_table_ptr, rows, row_ok, page_shift, page_mask, dim, KIND, ALIGNED
        )
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        ptrs = dst[:, None] + cols[None, :]
        v = tl.load(val_ptr + r[:, None] * val_stride + cols[None, :], mask=mask)
        if MODE == 0:
            tl.store(ptrs, tl_to_table_dtype(v, KIND), mask=mask)
        elif MODE == 1:
            tl.atomic_add(ptrs, v.to(tl.float32), mask=mask, sem="relaxed")
        else:
            # Rows are unique here, so a plain read-add-write cannot race; round once.
            old = tl.load(ptrs, mask=mask).to(tl.float32)
            tl.store(ptrs, tl_to_table_dtype(old + v.to(tl.float32), KIND), mask=mask)

    # Every gather and scatter of rows goes through these: launched without Triton's
    # per-call argument binding.
    _GATHER = FastKernel(_paged_gather_kernel)
    _SCATTER = FastKernel(_paged_scatter_kernel)


def _tile(dim: int, tile_elems: int | None, max_block_d: int | None) -> tuple[int, int]:
    tile_elems = tile_elems or PAGED_ROWS_DEFAULTS["tile_elems"]
    max_block_d = max_block_d or PAGED_ROWS_DEFAULTS["max_block_d"]
    block_d = min(next_pow2(dim), next_pow2(max_block_d))
    block_r = next_pow2(max(1, tile_elems // block_d))
    return block_r, block_d


def _check_rows(table: PagedTensor, rows: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(
            f"{what} on {table.name!r}: rows must be a torch.Tensor, got {type(rows).__name__}"
        )
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise TypeError(
            f"{what} on {table.name!r}: rows must be an integer tensor, got {rows.dtype}"
        )
    if rows.dim() != 1:
        raise ValueError(
            f"{what} on {table.name!r}: rows must be 1-D, got shape {tuple(rows.shape)}"
        )
    if rows.device != table.device:
        raise ValueError(
            f"{what} on {table.name!r}: rows is on device {rows.device} but the table is on "
            f"device {table.device}"
        )
    return rows.to(torch.int64).contiguous()


def _check_bounds(table: PagedTensor, rows: torch.Tensor, what: str) -> None:
    # One reduction and one host sync for the whole batch.
    lo, hi = (int(x) for x in torch.stack(torch.aminmax(rows)).tolist())
    bad = lo if lo < 0 else hi if hi >= table.num_rows else None
    if bad is not None:
        raise IndexError(
            f"{what} on {table.name!r}: row {bad} is out of range; valid rows are "
            f"[0, {table.num_rows})"
        )


def _check_values(table: PagedTensor, values: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            f"{what} on {table.name!r}: values must be a torch.Tensor, got {type(values).__name__}"
        )
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} on {table.name!r}: values must be a float tensor, got {values.dtype}"
        )
    if tuple(values.shape) != (n, table.dim):
        raise ValueError(
            f"{what} on {table.name!r}: values must have shape {(n, table.dim)}, "
            f"got {tuple(values.shape)}"
        )
    if values.device != table.device:
        raise ValueError(
            f"{what} on {table.name!r}: values is on device {values.device} but the "
            f"table is on device {table.device}"
        )
    return values if values.stride(1) == 1 or table.dim == 1 else values.contiguous()


def _pages_by_row(table: PagedTensor, rows: torch.Tensor):
    """Yield ``(page, positions, offsets)`` for each page the rows touch (a loop over pages).

    ``positions`` index ``rows``; ``offsets`` are the rows' offsets inside ``page``.
    """
    pages = table.pages
    offsets = rows & table.page_mask
    if len(pages) == 1:
        yield pages[0], None, offsets
        return
    page_ids = rows >> table.page_shift
    order = torch.argsort(page_ids, stable=True)
    counts = torch.bincount(page_ids, minlength=len(pages)).tolist()
    start = 0
    for p, count in enumerate(counts):
        if count:
            pos = order[start : start + count]
            yield pages[p], pos, offsets.index_select(0, pos)
            start += count


def gather_paged_rows_reference(
    table: PagedTensor, rows: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`gather_paged_rows`: ``index_select`` per touched page."""
    record_launch("paged_gather_rows_reference")
    if out is None:
        out = torch.empty((rows.numel(), table.dim), dtype=table.dtype, device=table.device)
    for page, pos, offsets in _pages_by_row(table, rows):
        # A page in the host tier of a GPU table is read where it is.
        picked = page.index_select(0, offsets.to(page.device)).to(out.device)
        if pos is None:
            out.copy_(picked)
        else:
            out.index_copy_(0, pos, picked)
    return out


def scatter_paged_rows_reference(
    table: PagedTensor, rows: torch.Tensor, values: torch.Tensor, *, reduce: str = "set"
) -> None:
    """Torch reference of :func:`scatter_paged_rows`: ``index_put_``/``index_add_`` per page."""
    record_launch("paged_scatter_rows_reference")
    if reduce == "add" and table.dtype != torch.float32:
        rows, values = coalesce_rows_reference(rows, values, out_dtype=torch.float32)
    for page, pos, offsets in _pages_by_row(table, rows):
        v = values if pos is None else values.index_select(0, pos)
        v, offsets = v.to(page.device), offsets.to(page.device)
        if reduce == "set":
            page.index_put_((offsets,), v.to(table.dtype))
        elif table.dtype == torch.float32:
            page.index_add_(0, offsets, v.to(torch.float32))
        else:
            summed = page.index_select(0, offsets).to(torch.float32) + v
            page.index_copy_(0, offsets, summed.to(table.dtype))


def _launch(
    kernel: FastKernel,
    table: PagedTensor,
    rows: torch.Tensor,
    data: torch.Tensor,
    tile,
    num_warps,
    *mode: int,
) -> None:
    # FastKernel: every argument positional, in the kernel's order (MODE, the scatter's
    # reduction, sits between ALIGNED and the block sizes).
    n, dim = rows.numel(), table.dim
    block_r, block_d = _tile(dim, *tile)
    grid = (triton.cdiv(n, block_r), triton.cdiv(dim, block_d))
    kernel(
        grid,
        table.page_table,
        rows,
        data,
        n,
        dim,
        data.stride(0),
        table.page_shift,
        table.page_mask,
        TABLE_KINDS[table.dtype],
        table._pages_aligned,
        *mode,
        block_r,
        block_d,
        num_warps=num_warps or PAGED_ROWS_DEFAULTS["num_warps"],
    )


def gather_paged_rows(
    table: PagedTensor,
    rows: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    check_bounds: bool = True,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Copy ``table`` rows ``rows`` into a new (or the given ``out``) ``[len(rows), dim]``.

    ``rows`` is a 1-D integer tensor on the table's device. With ``check_bounds`` one
    ``aminmax`` + host sync raises :class:`IndexError` for rows outside
    ``[0, table.num_rows)``; callers whose rows are known valid pass ``False`` (no sync).
    ``out`` must be ``[len(rows), dim]`` of the table's dtype with unit column stride.
    ``tile_elems`` / ``max_block_d`` / ``num_warps`` tune the kernel tile.
    """
    what = "gather_rows"
    rows = _check_rows(table, rows, what)
    n = rows.numel()
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{what} on {table.name!r}: out must be a torch.Tensor")
        if tuple(out.shape) != (n, table.dim):
            raise ValueError(
                f"{what} on {table.name!r}: out must have shape {(n, table.dim)}, "
                f"got {tuple(out.shape)}"
            )
        if out.dtype != table.dtype:
            raise TypeError(
                f"{what} on {table.name!r}: out must have the table dtype "
                f"{table.dtype}, got {out.dtype}"
            )
        if out.device != table.device:
            raise ValueError(
                f"{what} on {table.name!r}: out is on device {out.device} but the table "
                f"is on device {table.device}"
            )
        if out.stride(1) != 1 and table.dim > 1:
            raise ValueError(f"{what} on {table.name!r}: out must have unit column stride")
    if n == 0:
        if out is None:
            out = torch.empty((0, table.dim), dtype=table.dtype, device=table.device)
        return out
    if check_bounds:
        _check_bounds(table, rows, what)
    if not use_triton(rows, op=what):
        return gather_paged_rows_reference(table, rows, out=out)
    if out is None:
        out = torch.empty((n, table.dim), dtype=table.dtype, device=table.device)
    _launch(_GATHER, table, rows, out, (tile_elems, max_block_d), num_warps)
    record_launch("paged_gather_rows")
    return out


def scatter_paged_rows(
    table: PagedTensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    reduce: str = "set",
    check_bounds: bool = True,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Write (``reduce="set"``) or add (``reduce="add"``) ``values`` into ``table`` rows ``rows``.

    ``values`` is ``[len(rows), dim]`` of any float dtype, cast to the table dtype on store.
    ``"add"`` sums every duplicate row (accumulating in fp32, rounding once for 16-bit
    tables); ``"set"`` with duplicate rows stores one of their values (like
    ``Tensor.index_put_``). Bounds are checked as in :func:`gather_paged_rows`.
    """
    what = "scatter_rows"
    if reduce not in ("set", "add"):
        raise ValueError(f"{what} on {table.name!r}: reduce must be 'set' or 'add', got {reduce!r}")
    rows = _check_rows(table, rows, what)
    n = rows.numel()
    values = _check_values(table, values, n, what)
    if n == 0:
        return
    if check_bounds:
        _check_bounds(table, rows, what)
    if not use_triton(rows, values, op=what):
        scatter_paged_rows_reference(table, rows, values, reduce=reduce)
        return
    tile = (tile_elems, max_block_d)
    if reduce == "set":
        mode = _MODE["set"]
    elif table.dtype == torch.float32:
        mode = _MODE["add_atomic"]
    else:
        rows, order, segment_ids = sort_segments(rows)
        values = segment_sum_sorted_triton(
            values,
            order,
            segment_ids,
            rows.numel(),
            tile_elems=tile_elems,
            max_block_d=max_block_d,
            num_warps=num_warps,
        )
        mode = _MODE["add_unique"]
    _launch(_SCATTER, table, rows, values, tile, num_warps, mode)
    record_launch("paged_scatter_rows")
