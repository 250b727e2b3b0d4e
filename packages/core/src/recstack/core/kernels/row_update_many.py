"""Check and apply the row updates of many tables in two launches, not two per table.

An optimizer step over ``P`` tables runs, per table, :func:`~recstack.core.kernels.
row_update.check_rows` and :func:`~recstack.core.kernels.row_update.apply_row_update`: ``2P``
launches, each costing the host more time than a small table's update costs the GPU.
:func:`check_and_apply_row_updates` queues the same work as one check launch and one update
launch per *class* of tables (tables whose updates share the tile function, its constexpr
choices, the row width, the weight and gradient dtypes and the tiling): every check before
any update, so one gate holds back the whole step. A typical model (every table fp32 of one
width, one optimizer) is one class.

What differs between the tables of a class travels in a small descriptor buffer that one
host-to-device copy puts on the GPU: each table's rows, gradient, row count (or its
device-side count, for padded gradients), page tables, and the update's scalars (a global
Adam step count makes them differ per table). Each program finds its table by comparing
its program id with the tables' first program ids.

Results are those of the per-table launches, bit for bit (same tile function, same fp32
scalars, same order of operations within a row).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.kernels.row_update import (
    ROW_UPDATE_DEFAULTS,
    PageTable,
    RowUpdateArgs,
    RowUpdateConsts,
    apply_row_update,
    check_rows,
    row_tile,
)
from recstack.core.paged import PagedTensor
from recstack.core.row_update import RowUpdate

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_float_ptr
    from recstack.core.kernels.row_update import tl_check_rows, tl_update_rows

__all__ = ["RowJob", "check_and_apply_row_updates"]

# Descriptor fields of one table (int64 each).
_ROWS, _GRAD, _N, _COUNT, _NUM_ROWS = 0, 1, 2, 3, 4
_W = 5  # w_table, w_shift, w_mask; then the three slots' (table, shift, mask)
_FIELDS = 17
_SCALARS = 7  # lr, p1 .. p6 (fp32)
_NO_PARAMS = (0.0,) * 6


class RowJob(NamedTuple):
    """One table's part of a step.

    Attributes:
        update: the table's update (its slots row-aligned with ``table``).
        table: the weight.
        rows: int ``[n]`` unique rows (checked against ``num_rows``).
        grad: float ``[n, dim]`` summed gradient rows.
        num_rows: rows must lie in ``[0, num_rows)``.
        count: int64 ``[1]`` on the device: only the first ``count`` rows are real (a
            padded gradient, from ``coalesce_rows_padded``); ``None``: all ``n``.
    """

    update: RowUpdate
    table: PagedTensor
    rows: torch.Tensor
    grad: torch.Tensor
    num_rows: int
    count: torch.Tensor | None = None


if HAS_TRITON:

    @triton.jit
    def _job_of(first_ptr, NUM_P2: tl.constexpr):
        # The table a program works for: the last one whose first program is not after it
        # (a table with no programs shares its first program with the next one).
        pid = tl.program_id(0)
        firsts = tl.load(first_ptr + tl.arange(0, NUM_P2))
        j = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
        first = tl.load(first_ptr + j)
        return j, (pid - first).to(tl.int64)

    @triton.jit
    def _i64_ptr(addr, ALIGNED: tl.constexpr):
        p = addr.to(tl.pointer_type(tl.int64))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _job(desc_ptr, first_ptr, G_KIND: tl.constexpr, IN_ALIGNED: tl.constexpr,
             NUM_P2: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        # This program's job: its index, descriptor, rows, gradient, real row count (its
        # device-side count when padded) and the positions of the rows it works on.
        j, tile = _job_of(first_ptr, NUM_P2)
        d = desc_ptr + j * 17
        # Loaded pointers carry no alignment: the hint (IN_ALIGNED, set only when every
        # job's rows and gradient are aligned) lets the row loads vectorize.
        rows_ptr = _i64_ptr(tl.load(d + 0), IN_ALIGNED)
        grad_ptr = tl_float_ptr(tl.load(d + 1), G_KIND, IN_ALIGNED)
        n = tl.minimum(tl.load(_i64_ptr(tl.load(d + 3), False)), tl.load(d + 2))
        return j, d, rows_ptr, grad_ptr, n, tile * BLOCK_R + tl.arange(0, BLOCK_R)

    @triton.jit
    def _check_many_kernel(
        desc_ptr,
        first_ptr,
        gate_ptr,
        dim,
        G_KIND: tl.constexpr,
        IN_ALIGNED: tl.constexpr,
        NUM_P2: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        _, d, rows_ptr, grad_ptr, n, r = _job(
            desc_ptr, first_ptr, G_KIND, IN_ALIGNED, NUM_P2, BLOCK_R
        )
        tl_check_rows(r, grad_ptr, dim, n, dim, rows_ptr, tl.load(d + 4), gate_ptr, True,
                      BLOCK_R, BLOCK_D)  # fmt: skip

    @triton.jit
    def _pages_at(d, width):
        # A PageTable from the descriptor fields at ``d``: page pointers, shift, mask.
        return PageTable(_i64_ptr(tl.load(d), False), tl.load(d + 1), tl.load(d + 2), width)

    @triton.jit
    def _update_many_kernel(
        desc_ptr,
        first_ptr,
        scalar_ptr,
        gate_ptr,
        dim,
        slot_widths,
        UPDATE: tl.constexpr,
        G_KIND: tl.constexpr,
        IN_ALIGNED: tl.constexpr,
        NUM_P2: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        j, d, rows_ptr, grad_ptr, n, r = _job(
            desc_ptr, first_ptr, G_KIND, IN_ALIGNED, NUM_P2, BLOCK_R
        )
        # A set gate (a bad row or value anywhere in the step) means: write nothing.
        n = tl.where((tl.load(gate_ptr) | tl.load(gate_ptr + 1)) == 0, n, 0)
        sc = scalar_ptr + j * 7
        update = RowUpdateArgs(
            _pages_at(d + 5, dim),
            (
                _pages_at(d + 8, slot_widths[0]),
                _pages_at(d + 11, slot_widths[1]),
                _pages_at(d + 14, slot_widths[2]),
            ),
            tl.load(sc),
            (tl.load(sc + 1), tl.load(sc + 2), tl.load(sc + 3), tl.load(sc + 4),
             tl.load(sc + 5), tl.load(sc + 6)),
        )  # fmt: skip
        tl_update_rows(r, rows_ptr, grad_ptr, dim, n, update, UPDATE, BLOCK_D)

    _CHECK_MANY = FastKernel(_check_many_kernel)
    _UPDATE_MANY = FastKernel(_update_many_kernel)


class _Staging:
    """Pinned host buffers for descriptors, each reused once its copy to the GPU is done
    (allocating pinned memory every step costs more than the step's launches)."""

    def __init__(self) -> None:
        self._used: list[tuple[torch.Tensor, Any]] = []

    def upload(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        """Copy ``host`` (int64, CPU) into ``dev`` (CUDA) without waiting for the GPU."""
        n = host.numel()
        buf = event = None
        for i, (b, e) in enumerate(self._used):
            if b.numel() >= n and e.query():
                buf, event = b, e
                del self._used[i]
                break
        if buf is None or event is None:
            buf = torch.empty(max(n, 1024), dtype=torch.int64, pin_memory=True)
            event = torch.cuda.Event()
        buf[:n].copy_(host)
        dev.copy_(buf[:n], non_blocking=True)
        event.record(torch.cuda.current_stream(dev.device))
        self._used.append((buf, event))
        if len(self._used) > 16:
            self._used.pop(0)  # dropped, not reused: its copy may still be pending


_STAGING: dict[torch.device, _Staging] = {}


class _JobClass(NamedTuple):
    """The jobs one pair of launches serves, and what the launches share."""

    dim: int
    g_kind: int
    in_aligned: bool
    check_tile: tuple[int, int]
    update_tile: tuple[int, int]
    update: RowUpdate  # the first job's: its tile function and constexprs stand for all
    consts: RowUpdateConsts  # the same, as the update kernel takes them


def check_and_apply_row_updates(jobs: Sequence[RowJob], gate: torch.Tensor, **tile: int) -> None:
    """Check every job's rows and gradient into ``gate``, then apply every job's update
    (writing nothing when the gate is set), in one check and one update launch per class of
    compatible jobs. Never waits for the GPU.

    Equivalent to :func:`~recstack.core.kernels.row_update.check_rows` of every job, then
    :func:`~recstack.core.kernels.row_update.apply_row_update` of every job, which is what
    runs on the torch path (CPU tensors) and for a single job.

    Args:
        jobs: the tables' updates, all on ``gate``'s device; each table at most once.
        gate: from :func:`~recstack.core.kernels.row_update.new_gate`.
        tile: ``tile_elems``, ``max_block_d``, ``num_warps`` override
            :data:`~recstack.core.kernels.row_update.ROW_UPDATE_DEFAULTS` for the updates.

    Raises:
        ValueError: a job's gradient does not match its rows and table, a job is on
            another device than the gate, or a table is in two jobs.
    """
    for job in jobs:
        n = job.rows.numel()
        if job.grad.shape != (n, job.table.dim):
            raise ValueError(
                f"check_and_apply_row_updates ({job.update.name}): gradient "
                f"{tuple(job.grad.shape)} for {n} rows of table {job.table.name!r} of width "
                f"{job.table.dim}"
            )
        if job.grad.device != gate.device or job.rows.device != gate.device:
            raise ValueError(
                f"check_and_apply_row_updates ({job.update.name}): table {job.table.name!r}'s "
                f"gradient is on {job.grad.device}, the gate on {gate.device}"
            )
    if len({id(j.table) for j in jobs}) != len(jobs):
        names = [j.table.name for j in jobs]
        twice = sorted({n for n in names if names.count(n) > 1}) or names
        raise ValueError(
            f"check_and_apply_row_updates: a table is in more than one job ({twice}); sum "
            "its gradients into one job"
        )
    live = [j for j in jobs if j.rows.numel()]
    tensors = [gate] + [t for j in live for t in (j.rows, j.grad)]
    if len(live) < 2 or not use_triton(*tensors, op="check_and_apply_row_updates"):
        for j in live:
            check_rows(gate, j.grad, j.rows, j.num_rows, j.count)
        for j in live:
            apply_row_update(j.update, j.table, j.rows, j.grad, gate, j.count, **tile)
        return
    cfg = {**ROW_UPDATE_DEFAULTS, **tile}
    classes: dict[tuple[Any, ...], tuple[_JobClass, list[RowJob]]] = {}
    alone: list[RowJob] = []
    for j in live:
        key = _key_of(j)
        if key is None:
            alone.append(j)
        elif key in classes:
            classes[key][1].append(j)
        else:
            classes[key] = (_describe(j, key, cfg), [j])
    keep: list[torch.Tensor] = []  # converted rows and gradients, alive past the launches
    packed = [(c, _pack(c, members, gate.device, keep)) for c, members in classes.values()]
    # Every check before any update: one gate holds back the whole step.
    for j in alone:
        check_rows(gate, j.grad, j.rows, j.num_rows, j.count)
    for c, (desc, firsts, _, _, grids, num_p2) in packed:
        record_launch("check_rows_many")
        _CHECK_MANY(
            (grids[0],), desc, firsts[0], gate, c.dim, c.g_kind, c.in_aligned, num_p2,
            *c.check_tile,
            num_warps=4,
        )  # fmt: skip
    for c, (desc, firsts, scalars, widths, grids, num_p2) in packed:
        record_launch("row_update_many")
        _UPDATE_MANY(
            (grids[1],), desc, firsts[1], scalars, gate, c.dim, widths, c.consts, c.g_kind,
            c.in_aligned, num_p2, *c.update_tile, num_warps=cfg["num_warps"],
        )  # fmt: skip
    for j in alone:
        apply_row_update(j.update, j.table, j.rows, j.grad, gate, j.count, **tile)


def _key_of(job: RowJob) -> tuple[Any, ...] | None:
    """What jobs launched together must share; ``None``: the job launches alone. (Per
    step and table: kept to plain attribute reads, no per-item generators.)"""
    g_kind = TABLE_KINDS.get(job.grad.dtype)
    if g_kind is None:
        return None
    u, table = job.update, job.table
    slots = u.slots
    return (
        table.dim,
        g_kind,
        TABLE_KINDS[table.dtype],
        table._pages_aligned,
        all([s._pages_aligned for s in slots]),
        job.rows.data_ptr() % 16 == 0 and job.grad.data_ptr() % 16 == 0,
        id(u.tile_fn),
        u.variant,
        tuple(u.flags),
        u.whole_rows,
        tuple([s.dim for s in slots]),
    )


def _describe(job: RowJob, key: tuple[Any, ...], cfg: dict[str, int]) -> _JobClass:
    """The launch settings of the class of ``job`` (its ``key``)."""
    dim = job.table.dim
    check_d = min(next_pow2(max(dim, 1)), 128)
    u = job.update
    flags = [bool(f) for f in u.flags] + [False] * (3 - len(u.flags))
    return _JobClass(
        dim=dim,
        g_kind=key[1],
        in_aligned=key[5],
        check_tile=(max(1, 4096 // check_d), check_d),
        update_tile=row_tile(u, dim, cfg["tile_elems"], cfg["max_block_d"]),
        update=u,
        consts=RowUpdateConsts(u.tile_fn, int(u.variant), tuple(flags), key[2], key[3], key[4]),  # type: ignore[arg-type]
    )


def _pack(
    c: _JobClass, members: list[RowJob], device: torch.device, keep: list[torch.Tensor]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, tuple[int, ...],
           tuple[int, int], int]:  # fmt: skip
    """One class's descriptors on ``device``: ``(descriptors, (check firsts, update
    firsts), scalars, slot widths, (check grid, update grid), NUM_P2)``."""
    p = len(members)
    num_p2 = next_pow2(p)
    n_desc, n_scalar = p * _FIELDS, -(-p * _SCALARS // 2)
    dev = torch.empty(n_desc + 2 * num_p2 + n_scalar, dtype=torch.int64, device=device)
    base = dev.data_ptr()
    fields: list[int] = []
    scalars: list[float] = []
    check_firsts: list[int] = []
    update_firsts: list[int] = []
    check_rows_per, update_rows_per = c.check_tile[0], c.update_tile[0]
    check_grid = update_grid = 0
    for i, j in enumerate(members):
        rows, grad = j.rows, j.grad
        if rows.dtype != torch.int64 or not rows.is_contiguous():
            rows = rows.to(torch.int64).contiguous()
            keep.append(rows)
        if not grad.is_contiguous():
            grad = grad.contiguous()
            keep.append(grad)
        n = rows.numel()
        # No device-side count: point at the job's own row count in the descriptors.
        count = j.count.data_ptr() if j.count is not None else base + (i * _FIELDS + _N) * 8
        t, u = j.table, j.update
        # Missing slots point at the weight; the tile function never touches them.
        s0, s1, s2 = (*u.slots, t, t, t)[:3]
        fields += (
            rows.data_ptr(), grad.data_ptr(), n, count, j.num_rows,
            t.page_table.data_ptr(), t.page_shift, t.page_mask,
            s0.page_table.data_ptr(), s0.page_shift, s0.page_mask,
            s1.page_table.data_ptr(), s1.page_shift, s1.page_mask,
            s2.page_table.data_ptr(), s2.page_shift, s2.page_mask,
        )  # fmt: skip
        scalars.append(u.lr)
        scalars += u.params
        scalars += _NO_PARAMS[len(u.params) :]
        check_firsts.append(check_grid)
        update_firsts.append(update_grid)
        check_grid += -(-n // check_rows_per)
        update_grid += -(-n // update_rows_per)
    pad = [1 << 62] * (num_p2 - p)  # past every program: never chosen
    scalars += [0.0] * (2 * n_scalar - len(scalars))
    # Packed by the array module (a Python list to a tensor costs more per element).
    packed = bytearray(array("q", fields + check_firsts + pad + update_firsts + pad))
    packed += array("f", scalars).tobytes()
    host = torch.frombuffer(packed, dtype=torch.int64)
    if device.type == "cuda":
        _STAGING.setdefault(device, _Staging()).upload(host, dev)
    else:
        dev.copy_(host)
    grids = (check_grid, update_grid)
    a, b = n_desc, n_desc + num_p2
    widths = tuple([s.dim for s in c.update.slots] + [c.dim] * (3 - len(c.update.slots)))
    return (
        dev[:n_desc],
        (dev[a:b], dev[b : b + num_p2]),
        dev[b + num_p2 :].view(torch.float32),
        widths,
        grids,
        num_p2,
    )
