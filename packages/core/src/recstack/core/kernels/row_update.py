"""Apply a :class:`~recstack.core.row_update.RowUpdate` to table rows, and the checks that
gate it.

* :func:`apply_row_update`: one launch reads each touched weight row, its gradient and its
  state once, runs the update's tile function, writes each once. The weight and the slots
  are addressed through their page tables (core's ``tl_row_pointers``); a bf16/fp16 weight
  is rounded once on the way back (``tl_to_table_dtype``).
* ``tl_apply_row_update``: the same for one tile whose gradient sums are already in
  registers, so a kernel that has just reduced them (the embedding engine's fused backward)
  updates the rows without writing the gradient out. ``tl_update_rows`` and
  ``tl_check_rows`` update and check a block of gradient rows, for this module's kernels
  and :mod:`~recstack.core.kernels.row_update_many`'s.
* :func:`check_rows`: row bounds and NaN/Inf of a gradient, into a two-int *gate* on the
  device (``[any row out of range, any value non-finite]``). Update launches given the gate
  write nothing when it is set, so a step is checked and applied without the host waiting
  in between; the caller reads the gate once, after queueing everything, to raise or count.

A kernel takes an update as two named-tuple arguments (Triton passes a tuple as its fields,
so they cost nothing over separate arguments): :class:`RowUpdateArgs`, the weight's and the
slots' page tables (:class:`PageTable`) and the scalars, and, as a constexpr,
:class:`RowUpdateConsts`, the tile function and the update's constexpr choices.
:func:`row_update_args` makes both.

Bytes moved by :func:`apply_row_update` (``U`` rows, ``D`` = dim, ``E`` = weight element
bytes, ``S`` = full-width state slots): ``U * 8`` (rows) ``+ U * D * 4`` (gradient)
``+ 2 * U * D * E`` (weight) ``+ 2 * U * D * 4 * S`` (state), plus ``2 * U * 4`` per one-wide
slot. :func:`check_rows` reads the rows and the gradient once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import KIND_FP32, TABLE_KINDS
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.paged import PagedTensor
from recstack.core.row_update import RowUpdate

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_row_pointers, tl_to_table_dtype

__all__ = [
    "ROW_UPDATE_DEFAULTS",
    "PageTable",
    "RowUpdateArgs",
    "RowUpdateConsts",
    "apply_row_update",
    "check_rows",
    "new_gate",
    "row_tile",
    "row_update_args",
    "tl_apply_row_update",
    "tl_check_rows",
    "tl_runtime_row_update_args",
    "tl_update_rows",
]

#: Tile defaults of :func:`apply_row_update`: ``tile_elems`` is the target rows x columns of
#: one program (H200 sweep, 1M rows x 64: 8-32 rows on 2-8 warps all reach 94% MBU).
ROW_UPDATE_DEFAULTS: dict[str, int] = {"tile_elems": 1024, "max_block_d": 128, "num_warps": 4}


class PageTable(NamedTuple):
    """A :class:`~recstack.core.paged.PagedTensor`'s rows as a kernel addresses them.

    Attributes:
        pointers: the int64 ``[pages]`` tensor of page data pointers (in a kernel, its
            pointer).
        shift: row ``r`` lives in page ``r >> shift``...
        mask: ...at row ``r & mask`` of that page.
        width: elements a row.
    """

    pointers: Any
    shift: int
    mask: int
    width: int

    @classmethod
    def of(cls, table: PagedTensor) -> PageTable:
        """``table``'s page table and row width."""
        return cls(table.page_table, table.page_shift, table.page_mask, table.dim)


class RowUpdateArgs(NamedTuple):
    """The runtime kernel argument of a :class:`~recstack.core.row_update.RowUpdate` of one
    table.

    Attributes:
        weight: the table's rows (``weight.width`` is the row width, ``dim``).
        slots: the three state slots' rows; a missing slot repeats ``weight`` (the tile
            function never touches it).
        lr: the step's learning rate.
        params: the update's six fp32 scalars, missing ones 0.
    """

    weight: PageTable
    slots: tuple[PageTable, PageTable, PageTable]
    lr: float
    params: tuple[float, float, float, float, float, float]


class RowUpdateConsts(NamedTuple):
    """The constexpr kernel argument of a :class:`~recstack.core.row_update.RowUpdate` of
    one table: what a kernel is compiled for.

    Attributes:
        tile_fn: the update's ``@triton.jit`` tile function.
        variant: its constexpr variant.
        flags: its three constexpr flags, missing ones False.
        weight_kind: the table's element kind (core's ``TABLE_KINDS``).
        weight_aligned: every page of the table is 16-byte aligned.
        slots_aligned: every page of every slot is 16-byte aligned.
    """

    tile_fn: Any
    variant: int
    flags: tuple[bool, bool, bool]
    weight_kind: int
    weight_aligned: bool
    slots_aligned: bool


def row_update_args(update: RowUpdate, table: PagedTensor) -> tuple[RowUpdateArgs, RowUpdateConsts]:
    """The two kernel arguments that apply ``update`` to ``table``'s rows: its runtime
    :class:`RowUpdateArgs` and its constexpr :class:`RowUpdateConsts`.

    Args:
        update: the step (its slots row-aligned with ``table``).
        table: the weight.
    """
    weight = PageTable.of(table)
    slots = update.slots
    # Per step and table: plain loops and tuples, no per-item generators.
    aligned = True
    for s in slots:
        aligned = aligned and s._pages_aligned
    pages = [PageTable.of(s) for s in slots] + [weight] * (3 - len(slots))
    params = [float(p) for p in update.params] + [0.0] * (6 - len(update.params))
    flags = [bool(f) for f in update.flags] + [False] * (3 - len(update.flags))
    args = RowUpdateArgs(weight, tuple(pages), float(update.lr), tuple(params))  # type: ignore[arg-type]
    consts = RowUpdateConsts(
        update.tile_fn,
        int(update.variant),
        tuple(flags),  # type: ignore[arg-type]
        TABLE_KINDS[table.dtype],
        table._pages_aligned,
        aligned,
    )
    return args, consts


if HAS_TRITON:
    _FP32 = tl.constexpr(KIND_FP32)

    @triton.jit
    def _runtime_pages(pages):
        return PageTable(
            pages.pointers,
            tl.cast(pages.shift, tl.int64),
            tl.cast(pages.mask, tl.int64),
            tl.cast(pages.width, tl.int64),
        )

    @triton.jit
    def tl_runtime_row_update_args(update):
        """``update`` (a :class:`RowUpdateArgs`) with every integer as a runtime value.

        Triton turns an int argument equal to 1 (a dim-1 table, 2-row pages) into a
        constant; Triton 3.6 then fails to compile a loop whose body reads a tuple holding
        such a constant. Kernels call this before a loop over ``update``, and take the
        loop's bound from the argument as given (Triton 3.6's interpreter cannot use a
        cast value as a ``range`` bound).
        """
        s = update.slots
        return RowUpdateArgs(
            _runtime_pages(update.weight),
            (_runtime_pages(s[0]), _runtime_pages(s[1]), _runtime_pages(s[2])),
            update.lr,
            update.params,
        )

    @triton.jit
    def _rows_of(pages, rows, row_ok, KIND: tl.constexpr, ALIGNED: tl.constexpr):
        # Pointers to the first element of each row in a PageTable's pages.
        return tl_row_pointers(
            pages.pointers, rows, row_ok, pages.shift, pages.mask, pages.width, KIND, ALIGNED
        )

    @triton.jit
    def tl_apply_row_update(rows, row_ok, cols, col_ok, g, update, UPDATE: tl.constexpr):
        """Apply a row update to one tile of table rows whose gradient is in registers.

        Args:
            rows: int64 ``[R]`` table rows (any value where ``row_ok`` is False).
            row_ok: bool ``[R]``: the rows to update.
            cols: ``[C]`` column indices of the tile.
            col_ok: bool ``[C]``: the columns inside the row.
            g: fp32 ``[R, C]`` summed gradient of the tile.
            update: the :class:`RowUpdateArgs`.
            UPDATE: the :class:`RowUpdateConsts` (constexpr).
        """
        wp = _rows_of(update.weight, rows, row_ok, UPDATE.weight_kind, UPDATE.weight_aligned)
        s0 = _rows_of(update.slots[0], rows, row_ok, _FP32, UPDATE.slots_aligned)
        s1 = _rows_of(update.slots[1], rows, row_ok, _FP32, UPDATE.slots_aligned)
        s2 = _rows_of(update.slots[2], rows, row_ok, _FP32, UPDATE.slots_aligned)
        mask = row_ok[:, None] & col_ok[None, :]
        at = wp[:, None] + cols[None, :]
        w = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        p = update.params
        w = UPDATE.tile_fn(
            w, g, mask, row_ok, cols, s0, s1, s2, update.lr, p[0], p[1], p[2], p[3], p[4], p[5],
            UPDATE.variant, UPDATE.flags[0], UPDATE.flags[1], UPDATE.flags[2],
        )  # fmt: skip
        tl.store(at, tl_to_table_dtype(w, UPDATE.weight_kind), mask=mask)

    @triton.jit
    def tl_update_rows(
        r, rows_ptr, grad_ptr, grad_stride, n, update, UPDATE: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """Apply a row update to the gradient rows at positions ``r`` below ``n``, column
        tile by column tile.

        Args:
            r: int64 ``[R]`` positions in ``rows_ptr`` and the gradient.
            rows_ptr: int64 table row of each position.
            grad_ptr: float gradient rows, ``grad_stride`` elements apart.
            grad_stride: the gradient's row stride.
            n: positions at or past ``n`` are not updated.
            update: the :class:`RowUpdateArgs`.
            UPDATE: the :class:`RowUpdateConsts` (constexpr).
            BLOCK_D: columns of a tile (constexpr).
        """
        dim = update.weight.width
        update = tl_runtime_row_update_args(update)
        ok = r < n
        rows = tl.load(rows_ptr + r, mask=ok, other=0)
        gp = grad_ptr + r * grad_stride
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            g = tl.load(gp[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            tl_apply_row_update(rows, ok, cols, col_ok, g.to(tl.float32), update, UPDATE)

    @triton.jit(do_not_specialize=["n"])
    def _row_update_kernel(
        rows_ptr,
        grad_ptr,
        grad_stride,
        n,
        gate_ptr,
        count_ptr,
        update,
        UPDATE: tl.constexpr,
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
        tl_update_rows(r, rows_ptr, grad_ptr, grad_stride, n, update, UPDATE, BLOCK_D)

    @triton.jit(do_not_specialize=["n", "num_rows"])
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
        tl_check_rows(
            r, values_ptr, stride, n, dim, rows_ptr, num_rows, gate_ptr, HAS_ROWS, BLOCK_R, BLOCK_D
        )

    @triton.jit
    def tl_check_rows(
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
        """Check the value rows (and rows) at positions ``r`` below ``n`` into the gate.

        Args:
            r: int64 ``[BLOCK_R]`` positions.
            values_ptr: float value rows, ``stride`` elements apart, ``dim`` wide.
            stride: the values' row stride.
            n: positions at or past ``n`` are not checked.
            dim: the row width.
            rows_ptr: int64 table row of each position (with ``HAS_ROWS``).
            num_rows: rows must lie in ``[0, num_rows)``.
            gate_ptr: the int32 ``[2]`` gate: a row out of range sets ``gate[0]``, a NaN or
                Inf value ``gate[1]``.
            HAS_ROWS: check the rows too (constexpr).
            BLOCK_R: ``r``'s length (constexpr).
            BLOCK_D: columns read at once (constexpr).
        """
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
    block_d = min(next_pow2(max(dim, 1)), 128)
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


def row_tile(update: RowUpdate, dim: int, tile_elems: int, max_block_d: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` for ``update`` on rows of ``dim``: whole rows when it needs
    them, else columns capped at ``max_block_d``; about ``tile_elems`` elements a tile."""
    block_d = next_pow2(max(dim, 1))
    if not update.whole_rows:
        block_d = min(block_d, next_pow2(max_block_d))
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
        *row_update_args(update, table),
        gate is not None,
        count is not None,
        block_r,
        block_d,
        num_warps=cfg["num_warps"],
    )
