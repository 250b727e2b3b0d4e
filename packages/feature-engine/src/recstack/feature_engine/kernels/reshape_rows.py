"""Truncate, pad and fill every row of every feature of a key-major jagged buffer at once.

Input is the feature engine's working buffer (see
:mod:`~recstack.feature_engine.kernels.row_buffer`): ``F`` sparse features over ``B`` rows,
row ``r = f * B + b`` being ``values[row_offsets[r]:row_offsets[r + 1]]``.
:func:`reshape_rows` keeps the first or last ``keep`` ids of each row, then pads it with a
value (before or after the ids) to a fixed length or up to a minimum length. Truncate,
Pad, FillMissing and identity are all settings of its ``[F, 6]`` parameter table, so one
call rewrites every feature whatever ``F`` is.

Launch plan (Triton path): one kernel writes every row's new length (and, when the offsets
are checked, one "bad offsets" flag per program); ``torch.cumsum`` turns the lengths into
the output offsets; one host sync reads the output size together with the offset check;
then one kernel writes the output. So 2 Triton launches, one cumsum and 1 host sync.

The output kernel runs one program per block of ``R`` consecutive rows (``R`` a power of
two): a block's input ids are the contiguous span ``values[row_offsets[r0]:row_offsets[r1]]``
and its output ids the contiguous span ``out[out_off[r0]:out_off[r1]]``, both found with two
direct loads, so the grid is the number of row blocks and no program searches the whole
buffer. A block whose rows are all identity rows is one straight copy; otherwise it walks
its output span in chunks of items, each item finding its row with a binary search over
the block's ``R + 1`` output offsets only (cache hits) and computing its source index (or
its pad value). Stores are coalesced.

The ``params`` table is validated on the host once per tensor version and cached; keep it
on the CPU or on ``values``' device. With ``check_offsets=False`` bad row offsets give
unspecified output but never an out-of-bounds read or write (row lengths are clamped to
``[0, len(values)]`` and reads masked).
"""

from __future__ import annotations

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.feature_engine.kernels import host, row_buffer

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.feature_engine.kernels import device

__all__ = [
    "RESHAPE_COLUMNS",
    "RESHAPE_IDENTITY",
    "reshape_rows",
    "reshape_rows_reference",
]

#: The columns of :func:`reshape_rows`' ``params`` table, in order.
RESHAPE_COLUMNS = ("keep", "keep_last", "pad_to", "min_len", "pad_value", "pad_left")
#: A ``params`` row that leaves a feature's rows as they are.
RESHAPE_IDENTITY = (-1, 0, -1, 0, 0, 0)

# Block sizes (powers of two; read at call time, so tests can shrink them). A block's
# search spans R + 1 offsets: log2(R) cached loads per chunk.
_LENGTHS_BLOCK = 1024  # rows per program of the lengths kernel
_ROWS = 256  # rows per program of the output kernel
_BLOCK = 512  # output items per chunk of the output kernel
_NUM_WARPS = 4
_OVERFLOW = "the output would hold 2**62 or more ids (pad_to/min_len too large)"


def _table_check(params: torch.Tensor, op: str) -> int:
    """Validate ``params``; return the largest ``pad_to``/``min_len`` (bounds the output)."""
    p = params.detach().cpu()
    keep, keep_last, pad_to, min_len, _, pad_left = p.unbind(1)

    def fail(mask: torch.Tensor, why: str) -> None:
        (f,) = host.first_true(mask)
        named = ", ".join(f"{c}={v}" for c, v in zip(RESHAPE_COLUMNS, p[f].tolist(), strict=True))
        raise ValueError(f"{op}: params[{f}] (feature {f}: {named}): {why}")

    padded = pad_to >= 0
    checks = (
        (keep < -1, "keep must be >= -1 (-1 keeps every id)"),
        ((keep_last != 0) & (keep_last != 1), "keep_last must be 0 or 1"),
        ((pad_left != 0) & (pad_left != 1), "pad_left must be 0 or 1"),
        (pad_to < -1, "pad_to must be >= -1 (-1: no fixed length)"),
        (min_len < 0, "min_len must be >= 0"),
        (
            padded & ((keep < 0) | (keep > pad_to)),
            "with pad_to >= 0, keep must be in [0, pad_to] (a longer row would not fit)",
        ),
        (padded & (min_len > pad_to), "with pad_to >= 0, min_len must be <= pad_to"),
    )
    for bad, why in checks:
        if bad.any():
            fail(bad, why)
    if p.shape[0] == 0:
        return 0
    return max(int(pad_to.max()), int(min_len.max()), 0)


# ----------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------


def reshape_rows_reference(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    params: torch.Tensor,
    *,
    check_offsets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`reshape_rows` on validated inputs (all on one device).

    Vectorized over rows and output items, over the runs of features the table touches:
    runs of identity features are copied as they are (a few host syncs on CUDA).

    Args:
        values: int64 ``[N]``.
        row_offsets: int64 ``[F * B + 1]``.
        batch_size: ``B``.
        params: int64 ``[F, 6]``, valid (see :func:`reshape_rows`).
        check_offsets: check ``row_offsets`` first (one host sync).
    """
    if check_offsets:
        row_buffer.check_offsets_now(values, row_offsets, batch_size, "reshape_rows")
    keep, _, pad_to, min_len, _, _ = params.unbind(1)
    touched = ((keep >= 0) | (pad_to >= 0) | (min_len > 0)).tolist()

    def run(v: torch.Tensor, o: torch.Tensor, fa: int, fb: int) -> tuple:
        return _reshape_all_rows(v, o, batch_size, params[fa:fb], check_offsets=False)

    return row_buffer.runs_of_touched(values, row_offsets, batch_size, touched, run)


def _reshape_all_rows(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    params: torch.Tensor,
    *,
    check_offsets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reshape_rows_reference` over every row of the buffer."""
    op = "reshape_rows"
    dev = values.device
    n = values.numel()
    n_rows = row_offsets.numel() - 1
    if n_rows == 0:
        return row_buffer.empty_result(values, row_offsets, check_offsets, op)
    # Clamped like the kernels do, so unchecked bad offsets never index out of bounds.
    lens = (row_offsets[1:] - row_offsets[:-1]).clamp(0, n)
    feature = torch.arange(n_rows, device=dev) // batch_size
    keep, keep_last, pad_to, min_len, pad_value, pad_left = params.index_select(0, feature).unbind(
        1
    )
    kept = torch.where(keep < 0, lens, torch.minimum(lens, keep))
    new_len = torch.where(pad_to >= 0, pad_to, torch.maximum(kept, min_len))
    out_off = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(new_len, 0, out=out_off[1:])
    flags = [out_off[-1], (new_len.double().sum() >= row_buffer.MAX_ITEMS).to(torch.int64)]
    if check_offsets:
        flags.append(row_buffer.offsets_bad(row_offsets, n))
    got = torch.stack(flags).tolist()
    if check_offsets and got[2]:
        row_buffer.raise_bad_offsets(row_offsets, n, batch_size, op)
    if got[1]:
        raise ValueError(f"{op}: {_OVERFLOW}")
    total = got[0]
    row = torch.repeat_interleave(torch.arange(n_rows, device=dev), new_len, output_size=total)
    kept_e = kept.index_select(0, row)
    lead = torch.where(pad_left.index_select(0, row) != 0, new_len.index_select(0, row) - kept_e, 0)
    k = torch.arange(total, device=dev) - out_off.index_select(0, row) - lead
    is_item = (k >= 0) & (k < kept_e)
    skip = torch.where(keep_last.index_select(0, row) != 0, lens.index_select(0, row) - kept_e, 0)
    src = row_offsets.index_select(0, row) + skip + k
    ok = is_item & (src >= 0) & (src < n)
    picked = values.index_select(0, torch.where(ok, src, 0)) if n else torch.zeros_like(src)
    out = torch.where(ok, picked, torch.where(is_item, 0, pad_value.index_select(0, row)))
    return out, out_off


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit(do_not_specialize=["n_rows", "batch_size", "n_values"])
    def _reshape_lengths_kernel(
        row_offsets_ptr,
        params_ptr,
        lengths_ptr,
        out_off_ptr,
        n_rows,
        batch_size,
        n_values,
        CHECK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        nr = n_rows.to(tl.int64)
        nv = n_values.to(tl.int64)
        r = pid * BLOCK + tl.arange(0, BLOCK)
        in_rows = r < nr
        start = tl.load(row_offsets_ptr + r, mask=in_rows, other=0)
        end = tl.load(row_offsets_ptr + r + 1, mask=in_rows, other=0)
        length = tl.minimum(tl.maximum(end - start, 0), nv)
        p = params_ptr + (r // batch_size.to(tl.int64)) * 6
        keep = tl.load(p, mask=in_rows, other=-1)
        pad_to = tl.load(p + 2, mask=in_rows, other=-1)
        min_len = tl.load(p + 3, mask=in_rows, other=0)
        kept = tl.where(keep < 0, length, tl.minimum(length, keep))
        new_len = tl.where(pad_to >= 0, pad_to, tl.maximum(kept, min_len))
        tl.store(lengths_ptr + r, new_len, mask=in_rows)
        tl.store(out_off_ptr + r, tl.zeros([BLOCK], dtype=tl.int64), mask=r == 0)
        if CHECK:
            flag = device.offsets_flag(start, end, r, in_rows, nr, nv)
            tl.store(lengths_ptr + nr + pid, flag)

    @triton.jit(do_not_specialize=["n_rows", "batch_size", "n_values", "n_out"])
    def _reshape_kernel(
        values_ptr,
        row_offsets_ptr,
        params_ptr,
        out_off_ptr,
        out_ptr,
        n_rows,
        batch_size,
        n_values,
        n_out,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        nv = n_values.to(tl.int64)
        bs = batch_size.to(tl.int64)
        r0, r1 = device.block_bounds(pid, n_rows.to(tl.int64), ROWS)
        # out_off is a cumsum of non-negative lengths: o_start <= o_end <= total; the output
        # holds n_out ids (the total, or a caller's capacity), never written past.
        o_start = tl.load(out_off_ptr + r0)
        o_end = tl.minimum(tl.load(out_off_ptr + r1), n_out.to(tl.int64))
        # A block of rows that all keep their ids as they are is one contiguous copy.
        rr = r0 + tl.arange(0, ROWS)
        p_rr = params_ptr + (rr // bs) * 6
        in_rr = rr < r1
        touched = (
            (tl.load(p_rr, mask=in_rr, other=-1) >= 0)
            | (tl.load(p_rr + 2, mask=in_rr, other=-1) >= 0)
            | (tl.load(p_rr + 3, mask=in_rr, other=0) > 0)
        )
        if tl.max(touched.to(tl.int32), axis=0) == 0:
            s0, s1 = device.input_span(row_offsets_ptr, r0, r1, nv)
            device.copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, 4 * BLOCK)
            o_end = o_start  # nothing left for the general walk below
        for c in range(o_start, o_end, BLOCK):
            e = c + tl.arange(0, BLOCK)
            valid = e < o_end
            e = tl.minimum(e, o_end - 1)  # tail lanes redo the last item; only valid lanes store
            # Only this block's offsets are searched: log2(ROWS) loads that hit the cache.
            r = device.last_le(out_off_ptr, e, tl.zeros([BLOCK], dtype=tl.int64) + r0, r1 - r0)
            o0 = tl.load(out_off_ptr + r)
            new_len = tl.load(out_off_ptr + r + 1) - o0
            start = tl.load(row_offsets_ptr + r)
            length = tl.minimum(tl.maximum(tl.load(row_offsets_ptr + r + 1) - start, 0), nv)
            p = params_ptr + (r // bs) * 6
            keep = tl.load(p)
            keep_last = tl.load(p + 1)
            pad_value = tl.load(p + 4)
            pad_left = tl.load(p + 5)
            kept = tl.where(keep < 0, length, tl.minimum(length, keep))
            # Position among the kept ids; outside [0, kept) it is padding.
            k = (e - o0) - tl.where(pad_left != 0, new_len - kept, 0)
            is_item = (k >= 0) & (k < kept)
            src = start + tl.where(keep_last != 0, length - kept, 0) + k
            ok = valid & is_item & (src >= 0) & (src < nv)
            v = tl.load(values_ptr + src, mask=ok, other=0)
            tl.store(out_ptr + e, tl.where(is_item, v, pad_value), mask=valid)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def reshape_rows(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    params: torch.Tensor,
    *,
    check_offsets: bool = True,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate, pad and fill every row of every feature -> ``(out_values, out_row_offsets)``.

    Args:
        values: int64 ``[N]``, the ids of ``F`` features over ``B`` rows, key-major.
        row_offsets: int64 ``[F * B + 1]``, non-decreasing from 0 to ``N``; row
            ``r = f * B + b`` is ``values[row_offsets[r]:row_offsets[r + 1]]``.
        batch_size: ``B >= 0`` (with ``B = 0``, ``F`` is ``params.shape[0]`` and
            ``row_offsets`` has 1 entry).
        params: int64 ``[F, 6]``, per feature ``(keep, keep_last, pad_to, min_len, pad_value,
            pad_left)``. A row of length ``L`` keeps ``kept = L if keep < 0 else min(L, keep)``
            ids: its first ones, or its last ones when ``keep_last = 1``. Its new length is
            ``pad_to`` if ``pad_to >= 0``, else ``max(kept, min_len)``; the missing ids are
            ``pad_value``, placed before the kept ids when ``pad_left = 1``, after otherwise.
            Rules: ``keep >= -1``, ``keep_last`` and ``pad_left`` in {0, 1}, ``pad_to >= -1``,
            ``min_len >= 0``, and with ``pad_to >= 0``: ``0 <= keep <= pad_to`` and
            ``min_len <= pad_to``. Truncate is ``keep = k``; Pad ``keep = pad_to = n``;
            FillMissing ``min_len = 1, pad_value = v``; identity is :data:`RESHAPE_IDENTITY`.
            Checked on the host once per tensor version (cached); CPU or ``values``' device.
        check_offsets: check ``row_offsets`` (folded into the one host sync). With ``False``,
            bad offsets give unspecified output but no out-of-bounds access.
        capacity: with ``check_offsets=False``, skip the host sync: ``out_values`` gets
            ``capacity`` entries, the first ``out_row_offsets[-1]`` of them the output. The
            caller guarantees the output fits (from an upper bound it tracks) and should
            check ``out_row_offsets[-1] <= capacity`` at its next sync: ids past the
            capacity are not written.

    Returns:
        ``out_values`` int64 ``[T]`` and ``out_row_offsets`` int64 ``[F * B + 1]`` (from 0 to
        ``T``), key-major like the input, on ``values``' device.

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape or offsets, or ``params[f]`` (feature ``f``) and the rule it
            breaks.

    Triton path: 2 launches (row lengths, then output items), one ``torch.cumsum`` and one
    host sync for the output size; torch path: the vectorized reference, also one sync.

    Examples:
        >>> import torch
        >>> vals = torch.tensor([1, 2, 3, 4, 5, 6])  # F=2, B=2: [1, 2, 3], [] | [4], [5, 6]
        >>> offs = torch.tensor([0, 3, 3, 4, 6])
        >>> params = torch.tensor([[2, 1, -1, 1, 0, 0],   # last 2 ids; an empty row -> [0]
        ...                        [2, 0, 2, 0, -1, 1]])  # first 2 ids, left-padded to 2
        >>> out, out_offs = reshape_rows(vals, offs, 2, params)
        >>> out.tolist(), out_offs.tolist()
        ([2, 3, 0, -1, 4, 5, 6], [0, 2, 3, 5, 7])
    """
    op = "reshape_rows"
    host.check_tensor(params, "params", op, (torch.int64,), 2)
    if params.shape[1] != len(RESHAPE_COLUMNS):
        raise ValueError(
            f"{op}: params must have shape [F, 6] (columns {', '.join(RESHAPE_COLUMNS)}), "
            f"got {tuple(params.shape)}"
        )
    num_features = params.shape[0]
    batch, n_rows = row_buffer.check_buffer(
        values, row_offsets, batch_size, num_features, "params", op
    )
    dev = values.device
    max_extra, (params,) = row_buffer.checked_tables(
        op, {"params": params}, dev, lambda: _table_check(params, op)
    )
    values, row_offsets = host.contiguous(values, row_offsets)
    n = values.numel()

    def count(n_programs: int, lengths: torch.Tensor, out_off: torch.Tensor) -> None:
        kernels.record_launch("reshape_rows_lengths")
        _reshape_lengths_kernel[(n_programs,)](
            row_offsets,
            params,
            lengths,
            out_off,
            n_rows,
            batch,
            n,
            CHECK=check_offsets,
            BLOCK=_LENGTHS_BLOCK,
            num_warps=_NUM_WARPS,
        )

    def write(out_off: torch.Tensor, out: torch.Tensor, total: int) -> None:
        kernels.record_launch("reshape_rows")
        _reshape_kernel[(triton.cdiv(n_rows, _ROWS),)](
            host.nonempty(values, torch.int64),
            row_offsets,
            params,
            out_off,
            out,
            n_rows,
            batch,
            n,
            total,
            ROWS=_ROWS,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )

    return row_buffer.run_row_op(
        op,
        values,
        row_offsets,
        batch,
        n_rows,
        check_offsets=check_offsets,
        capacity=capacity,
        reference=lambda: reshape_rows_reference(
            values, row_offsets, batch, params, check_offsets=check_offsets
        ),
        rows_per_program=_LENGTHS_BLOCK,
        count=count,
        write=write,
        # Lengths are at most L + max_extra, so only absurd pad_to/min_len overflow int64.
        overflow_message=_OVERFLOW if n + n_rows * max_extra >= row_buffer.MAX_ITEMS else None,
    )
