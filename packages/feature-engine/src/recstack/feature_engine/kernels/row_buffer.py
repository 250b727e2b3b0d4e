"""The key-major jagged buffer that reshape_rows and filter_rows rewrite, on the host side.

The buffer holds ``F`` sparse features over a batch of ``B`` rows: row ``r = f * B + b`` of
feature ``f`` is ``values[row_offsets[r]:row_offsets[r + 1]]``. Both ops
(:mod:`~recstack.feature_engine.kernels.reshape_rows`,
:mod:`~recstack.feature_engine.kernels.filter_rows`) check it the same way, keep their small
per-feature tables on the CPU or on ``values``' device (a CPU table crosses to the device
once per version), and size their output the same way: a lengths kernel writes every row's
new length (and, when the offsets are checked, one "bad offsets" flag per program), one
``torch.cumsum`` turns them into the output offsets, and one host sync reads the output
size together with the offset check; then one kernel writes the output
(:func:`run_row_op`). With a ``capacity`` the caller sizes the output and there is no sync
at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.feature_engine.kernels.host import cached, check_tensor

__all__ = [
    "MAX_ITEMS",
    "RowRun",
    "check_buffer",
    "check_offsets_now",
    "checked_tables",
    "empty_result",
    "offsets_bad",
    "raise_bad_offsets",
    "run_row_op",
    "runs_of_touched",
]

#: Output items must stay well inside int64 (offsets, allocation sizes).
MAX_ITEMS = 1 << 62

#: ``run(values, row_offsets, fa, fb)``: an op over the rows of features ``[fa, fb)``
#: (offsets rebased to 0), returning ``(out_values, out_row_offsets)``.
RowRun = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def check_buffer(
    values: object, row_offsets: object, batch_size: object, num_features: int, table: str, op: str
) -> tuple[int, int]:
    """Check the jagged buffer against ``F`` (from the op's table); return ``(B, F * B)``.

    Args:
        values: int64 ``[N]``.
        row_offsets: int64 ``[F * B + 1]`` on ``values``' device.
        batch_size: ``B >= 0``.
        num_features: ``F``, the rows of the op's per-feature table.
        table: the table's name, for the message.
        op: the op's name, for the message.

    Raises:
        TypeError: a tensor or ``batch_size`` of the wrong type or dtype.
        ValueError: a shape that does not match ``F`` and ``B``, or values without rows.
    """
    check_tensor(values, "values", op, (torch.int64,), 1)
    check_tensor(row_offsets, "row_offsets", op, (torch.int64,), 1)
    batch = check_int(batch_size, f"{op}: batch_size", minimum=0)
    if row_offsets.device != values.device:
        raise ValueError(
            f"{op}: row_offsets is on {row_offsets.device} but values is on {values.device}"
        )
    n_rows = row_offsets.numel() - 1
    if n_rows < 0:
        raise ValueError(f"{op}: row_offsets must have F * B + 1 >= 1 entries, got an empty tensor")
    if batch == 0:
        if n_rows:
            raise ValueError(
                f"{op}: batch_size is 0 but row_offsets has {n_rows + 1} entries (expected 1)"
            )
    elif n_rows != num_features * batch:
        raise ValueError(
            f"{op}: row_offsets has {n_rows + 1} entries but {table} describes F={num_features} "
            f"features and batch_size={batch}: expected F * B + 1 = {num_features * batch + 1}"
        )
    if n_rows == 0 and values.numel():  # host-known, so checked even when offsets are trusted
        raise ValueError(f"{op}: values has {values.numel()} ids but the buffer has no rows")
    return batch, n_rows


def checked_tables(
    op: str, tables: dict[str, torch.Tensor], dev: torch.device, check: Callable[[], Any]
) -> tuple[Any, list[torch.Tensor]]:
    """``check()``'s result and the tables on ``dev``, both cached per table version.

    Args:
        op: the op's name (with ``dev``, the cache key), for messages.
        tables: the op's per-feature tables by name, each on the CPU or on ``dev``.
        dev: ``values``' device.
        check: validates the tables on the host; returns what the launch needs.

    Raises:
        ValueError: a table on another device than the CPU or ``dev``.
    """
    for name, t in tables.items():
        if t.device != dev and t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device}; it must be on the CPU or on {dev}")
    ts = tuple(tables.values())

    def analyse() -> tuple[Any, tuple[torch.Tensor | None, ...]]:
        # A CPU table crosses to the device once per version. Tables already on the device
        # are not kept (None): the cache must not hold them.
        copies = tuple(t.to(dev).contiguous() if t.device != dev else None for t in ts)
        return check(), copies

    result, copies = cached(f"{op}@{dev}", ts, analyse)
    return result, [t.contiguous() if c is None else c for t, c in zip(ts, copies, strict=True)]


def raise_bad_offsets(row_offsets: torch.Tensor, n: int, batch_size: int, op: str) -> None:
    """Raise a ``ValueError`` saying how ``row_offsets`` fails to split ``n`` ids.

    Args:
        row_offsets: int64 ``[F * B + 1]``, known bad.
        n: ``len(values)``.
        batch_size: ``B``, to name a bad row's feature and batch row.
        op: the op's name, for the message.
    """
    host = row_offsets.detach().cpu()
    detail = ""
    dec = (host[1:] < host[:-1]).nonzero()
    if dec.numel():
        r = int(dec[0, 0])
        f, b = divmod(r, batch_size)
        detail = (
            f"; row {r} (feature {f}, batch row {b}) would have a negative length "
            f"(row_offsets[{r}] = {int(host[r])} > row_offsets[{r + 1}] = {int(host[r + 1])})"
        )
    raise ValueError(
        f"{op}: row_offsets must be non-decreasing from 0 to len(values)={n}, got "
        f"first={int(host[0])}, last={int(host[-1])}{detail}"
    )


def offsets_bad(row_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Device flag (int64 scalar): ``row_offsets`` is not a non-decreasing ``0..n`` run.

    Args:
        row_offsets: int64 ``[R + 1]``, ``R >= 0``.
        n: ``len(values)``.
    """
    bad = (row_offsets[0] != 0) | (row_offsets[-1] != n)
    if row_offsets.numel() > 1:
        bad = bad | (row_offsets[1:] < row_offsets[:-1]).any()
    return bad.to(torch.int64)


def check_offsets_now(
    values: torch.Tensor, row_offsets: torch.Tensor, batch_size: int, op: str
) -> None:
    """Raise unless ``row_offsets`` splits ``values`` (one host sync): the references' check.

    Args:
        values: int64 ``[N]``.
        row_offsets: int64 ``[F * B + 1]``.
        batch_size: ``B``.
        op: the op's name, for the message.
    """
    n = values.numel()
    if row_offsets.numel() == 1:
        if int(row_offsets[0]) != 0:
            raise_bad_offsets(row_offsets, 0, 1, op)
        return
    if int(offsets_bad(row_offsets, n)):
        raise_bad_offsets(row_offsets, n, batch_size, op)


def empty_result(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    check: bool,
    op: str,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of a buffer without rows (``values`` is known empty).

    Args:
        values: int64 ``[0]``, for the device.
        row_offsets: int64 ``[1]``.
        check: whether to check that its one offset is 0 (one host sync).
        op: the op's name, for the message.
        capacity: the caller's output size, or ``None`` (see :func:`run_row_op`).
    """
    if check and int(row_offsets[0]) != 0:
        raise_bad_offsets(row_offsets, 0, 1, op)
    dev = values.device
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    return _fit_capacity((empty, torch.zeros(1, dtype=torch.int64, device=dev)), capacity)


def _check_capacity(capacity: object, check_offsets: bool, op: str) -> int | None:
    """``capacity`` checked: ``None``, or an int in ``[0, 2**62)`` with unchecked offsets.

    Args:
        capacity: the caller's output size, or ``None`` to read it back.
        check_offsets: the op's ``check_offsets`` (a capacity skips the sync the check
            needs, so the two exclude each other).
        op: the op's name, for the message.
    """
    if capacity is None:
        return None
    cap = check_int(capacity, f"{op}: capacity")
    if not 0 <= cap < MAX_ITEMS:
        raise ValueError(f"{op}: capacity must be in [0, 2**62), got {cap}")
    if check_offsets:
        raise ValueError(f"{op}: capacity skips the host sync, so it needs check_offsets=False")
    return cap


def _fit_capacity(
    result: tuple[torch.Tensor, torch.Tensor], capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact output of a reference, laid out in ``capacity`` entries when asked.

    Args:
        result: ``(out_values, out_row_offsets)``.
        capacity: the output size the caller asked for, or ``None``.
    """
    out, out_off = result
    if capacity is None:
        return out, out_off
    fitted = torch.zeros(capacity, dtype=out.dtype, device=out.device)
    k = min(capacity, out.numel())
    fitted[:k] = out[:k]
    return fitted, out_off


def _length_buffers(
    n_rows: int, rows_per_program: int, check_offsets: bool, dev: torch.device
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """The grid and buffers of a lengths kernel over ``n_rows`` rows.

    The kernel writes ``n_rows`` lengths then, when it checks offsets, one flag per
    program; ``out_off`` receives their cumulative sums after a leading 0 (which the
    kernel writes too).

    Args:
        n_rows: ``F * B >= 1``.
        rows_per_program: the kernel's rows per program.
        check_offsets: whether the kernel writes the flags.
        dev: ``values``' device.

    Returns:
        ``(n_programs, n_flags, lengths, out_off)``.
    """
    n_programs = -(-n_rows // rows_per_program)
    n_flags = n_programs if check_offsets else 0
    lengths = torch.empty(n_rows + n_flags, dtype=torch.int64, device=dev)
    out_off = torch.empty(n_rows + n_flags + 1, dtype=torch.int64, device=dev)
    return n_programs, n_flags, lengths, out_off


def _output_offsets(
    lengths: torch.Tensor,
    out_off: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    batch_size: int,
    n_flags: int,
    capacity: int | None,
    op: str,
    *,
    overflow_check: bool = False,
) -> tuple[int, torch.Tensor, bool]:
    """The output size and offsets from the new row lengths (see :func:`_length_buffers`).

    Without a ``capacity``, one host sync reads the total together with the bad-offset
    flags (they share the cumsum: ``out_off[n_rows + n_flags] - out_off[n_rows]`` counts
    them) and, when asked, an overflow flag.

    Args:
        lengths: ``n_rows`` lengths then ``n_flags`` 0/1 flags, from the lengths kernel.
        out_off: the buffer their cumsum goes to (entry 0 is already 0).
        row_offsets: the input offsets, to describe them when they are bad.
        n: ``len(values)``.
        batch_size: ``B``.
        n_flags: the number of flags after the lengths.
        capacity: the caller's output size (no sync, no checks), or ``None``.
        op: the op's name, for the message.
        overflow_check: also tell whether the int64 total wrapped (summed in float64).

    Returns:
        ``(total, out_row_offsets, overflowed)``.

    Raises:
        ValueError: the offsets were checked and are bad.
    """
    n_rows = lengths.numel() - n_flags
    torch.cumsum(lengths, 0, out=out_off[1:])
    if capacity is not None:
        return capacity, out_off[: n_rows + 1], False
    picks = out_off[n_rows::n_flags] if n_flags else out_off[n_rows:]
    if overflow_check:
        # Float64 sums cannot wrap, so they tell an overflowed int64 total.
        over = (lengths[:n_rows].double().sum() >= MAX_ITEMS).to(torch.int64)
        picks = torch.cat([picks, over.view(1)])
    got = picks.tolist()
    if n_flags and got[1] != got[0]:
        raise_bad_offsets(row_offsets, n, batch_size, op)
    return got[0], out_off[: n_rows + 1], overflow_check and bool(got[-1])


def runs_of_touched(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    touched: list[bool],
    run: RowRun,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``run`` over each maximal run ``[fa, fb)`` of touched features' rows (offsets rebased
    to 0); the rows of untouched features are copied.

    Falls back to one run over everything when the feature boundaries are not a valid
    split of ``values`` (unchecked bad offsets: the whole-buffer code clamps them).

    Args:
        values: int64 ``[N]``.
        row_offsets: int64 ``[F * B + 1]``.
        batch_size: ``B``.
        touched: per feature, whether the op changes its rows.
        run: the op over a run of features (see :data:`RowRun`).
    """
    f = len(touched)
    n = values.numel()
    if batch_size == 0 or f == 0 or all(touched):
        return run(values, row_offsets, 0, f)
    cuts = row_offsets[::batch_size].tolist()
    # Ids past the last row (spare room of a buffer sized by a bound) are not rows.
    valid = cuts[0] == 0 and cuts[-1] <= n and all(a <= b for a, b in itertools.pairwise(cuts))
    if not valid:
        return run(values, row_offsets, 0, f)
    v_parts: list[torch.Tensor] = []
    o_parts: list[torch.Tensor] = []
    base = 0
    fa = 0
    while fa < f:
        fb = fa + 1
        while fb < f and touched[fb] == touched[fa]:
            fb += 1
        a, b = cuts[fa], cuts[fb]
        sub_o = row_offsets[fa * batch_size : fb * batch_size + 1] - a
        if touched[fa]:
            v, o = run(values[a:b], sub_o, fa, fb)
        else:
            v, o = values[a:b], sub_o
        v_parts.append(v)
        o_parts.append(o[:-1] + base)
        base += v.numel()
        fa = fb
    o_parts.append(torch.full((1,), base, dtype=torch.int64, device=values.device))
    return torch.cat(v_parts), torch.cat(o_parts)


def run_row_op(
    op: str,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    n_rows: int,
    *,
    check_offsets: bool,
    capacity: object,
    rows_per_program: int,
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    count: Callable[[int, torch.Tensor, torch.Tensor], None],
    write: Callable[[torch.Tensor, torch.Tensor, int], None],
    overflow_message: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row op's launch plan: its reference off the Triton path; else a lengths kernel, one
    cumsum, one host sync for the output size (none with a ``capacity``), an output kernel.

    Args:
        op: the op's name; the reference's launch is recorded as ``{op}_reference``.
        values: int64 ``[N]``, checked and contiguous.
        row_offsets: int64 ``[F * B + 1]``, checked and contiguous.
        batch_size: ``B``.
        n_rows: ``F * B``.
        check_offsets: the op's ``check_offsets``.
        capacity: the op's ``capacity`` argument (checked here).
        reference: runs the torch reference on the whole buffer.
        count: launches the lengths kernel: ``count(n_programs, lengths, out_off)``, one
            program per ``rows_per_program`` rows, writing the lengths (and, with
            ``check_offsets``, one flag per program) and ``out_off[0] = 0``.
        rows_per_program: the lengths kernel's rows per program.
        write: launches the output kernel: ``write(out_off, out, total)``, ``out`` holding
            ``total`` ids (the output size, or the capacity).
        overflow_message: when given, the total is also checked against int64 overflow
            and this message raised, after the op's name, when it overflows.

    Returns:
        ``(out_values, out_row_offsets)``.

    Raises:
        ValueError: bad offsets (when checked), a bad capacity, or an overflow.
    """
    capacity = _check_capacity(capacity, check_offsets, op)
    if not kernels.use_triton(values, op=op):
        kernels.record_launch(f"{op}_reference")
        return _fit_capacity(reference(), capacity)
    if n_rows == 0:
        return empty_result(values, row_offsets, check_offsets, op, capacity)
    n_programs, n_flags, lengths, out_off = _length_buffers(
        n_rows, rows_per_program, check_offsets, values.device
    )
    count(n_programs, lengths, out_off)
    total, out_off, over = _output_offsets(
        lengths,
        out_off,
        row_offsets,
        values.numel(),
        batch_size,
        n_flags,
        capacity,
        op,
        overflow_check=overflow_message is not None,
    )
    if over:
        raise ValueError(f"{op}: {overflow_message}")
    out = torch.empty(total, dtype=torch.int64, device=values.device)
    if total:
        write(out_off, out, total)
    return out, out_off
