"""Drop, or keep only, listed ids in every row of every feature of a key-major jagged buffer.

Input is the feature engine's working buffer (see
:mod:`~recstack.feature_engine.kernels.row_buffer`): ``F`` sparse features over ``B`` rows,
row ``r = f * B + b`` being ``values[row_offsets[r]:row_offsets[r + 1]]``. Each feature
has a sorted id list and a mode: :data:`FILTER_NONE` leaves it alone, :data:`FILTER_DROP`
drops its listed ids, :data:`FILTER_KEEP_ONLY` keeps only them; order is kept. One call
filters every feature whatever ``F`` is.

Launch plan (Triton path): one kernel counts every row's kept ids (and, when the offsets
are checked, writes one "bad offsets" flag per program); ``torch.cumsum`` turns the counts
into the output offsets; one host sync reads the output size together with the offset
check; then one kernel writes the kept ids. So 2 Triton launches, one cumsum and 1 host
sync.

Both kernels run one program per block of ``R`` consecutive rows (``R`` a power of two): a
block's input ids are the contiguous span ``values[row_offsets[r0]:row_offsets[r1]]`` and
its output ids the contiguous span ``out[out_off[r0]:out_off[r1]]``. A block whose features
are all untouched keeps its lengths without reading an id, and its write is a straight
copy of its input span. Otherwise both kernels walk the input span in chunks of ids
(coalesced loads): each id finds its row by a binary search over the block's ``R + 1`` row
offsets and is looked up in its feature's sorted list. The count kernel sums the kept ids
per row with a histogram over local row indices (``2 R`` bins, which sets its cost per id,
so filter blocks are small); the write kernel stores kept ids at the block's output start
plus an exclusive prefix sum of the keep flags. Both kernels take the same decisions
through the same code, so every block writes exactly the ids it counted.

The three tables (``set_ids``, ``set_offsets``, ``mode``) are validated on the host once
per tensor version and cached; keep them on the CPU or on ``values``' device. With
``check_offsets=False`` bad row offsets give unspecified output but never an out-of-bounds
read or write (row lengths are clamped to ``[0, len(values)]`` and reads masked).
"""

from __future__ import annotations

from enum import IntEnum

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.feature_engine.kernels import host, row_buffer

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.feature_engine.kernels import device

__all__ = [
    "FILTER_DROP",
    "FILTER_KEEP_ONLY",
    "FILTER_NONE",
    "FilterMode",
    "filter_rows",
    "filter_rows_reference",
]


class FilterMode(IntEnum):
    """What :func:`filter_rows` does to a feature's rows (its ``mode`` entry)."""

    NONE = 0  # leave the rows as they are
    DROP = 1  # drop the listed ids
    KEEP_ONLY = 2  # keep only the listed ids


FILTER_NONE, FILTER_DROP, FILTER_KEEP_ONLY = FilterMode

# Block sizes (powers of two; read at call time, so tests can shrink them).
_ROWS = 128  # rows per program of both kernels
_BLOCK = 512  # ids per chunk of both kernels (4x that for a plain copy)
_NUM_WARPS = 4


def _tables_check(
    set_ids: torch.Tensor, set_offsets: torch.Tensor, mode: torch.Tensor, op: str
) -> int:
    """Validate the per-feature id lists and modes; return the longest list's length."""
    ids = set_ids.detach().cpu()
    off = set_offsets.detach().cpu()
    md = mode.detach().cpu()
    m = ids.numel()
    bad = (md < FILTER_NONE) | (md > FILTER_KEEP_ONLY)
    if bad.any():
        (f,) = host.first_true(bad)
        raise ValueError(
            f"{op}: mode[{f}] = {int(md[f])} (feature {f}): mode must be 0 (untouched), "
            "1 (drop the listed ids) or 2 (keep only the listed ids)"
        )
    counts = off[1:] - off[:-1]
    bad = counts < 0
    if bad.any():
        (f,) = host.first_true(bad)
        raise ValueError(
            f"{op}: set_offsets[{f}] = {int(off[f])} > set_offsets[{f + 1}] = {int(off[f + 1])}: "
            f"feature {f}'s id list would have a negative length"
        )
    if int(off[0]) < 0 or int(off[-1]) > m:
        raise ValueError(
            f"{op}: set_offsets must lie within [0, len(set_ids)={m}], got first={int(off[0])}, "
            f"last={int(off[-1])}"
        )
    if m > 1:
        # Non-increases before each index: a list [s, e) is strictly increasing iff none
        # lies inside it.
        steps = torch.zeros(m, dtype=torch.int64)
        torch.cumsum((ids[1:] <= ids[:-1]).to(torch.int64), 0, out=steps[1:])
        long = counts >= 2
        start = torch.where(long, off[:-1], 0)
        end = torch.where(long, off[1:] - 1, 0)
        bad = long & (steps[end] != steps[start])
        if bad.any():
            (f,) = host.first_true(bad)
            s, e = int(off[f]), int(off[f + 1])
            i = s + host.first_true(ids[s + 1 : e] <= ids[s : e - 1])[0]
            raise ValueError(
                f"{op}: feature {f}'s id list set_ids[{s}:{e}] must be strictly increasing "
                f"(set_ids[{i}] = {int(ids[i])} >= set_ids[{i + 1}] = {int(ids[i + 1])})"
            )
    return int(counts.max()) if counts.numel() else 0


# ----------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------


def _listed_reference(
    v: torch.Tensor, set_ids: torch.Tensor, start: torch.Tensor, count: torch.Tensor, steps: int
) -> torch.Tensor:
    """Whether each ``v`` is in ``set_ids[start:start + count]`` (sorted): a lower bound."""
    if set_ids.numel() == 0:
        return torch.zeros_like(v, dtype=torch.bool)
    last = set_ids.numel() - 1
    lo = torch.zeros_like(v)
    hi = count
    for _ in range(steps):  # over search steps, not rows: ceil(log2(longest list + 1))
        active = lo < hi
        mid = (lo + hi) >> 1
        go = set_ids.index_select(0, (start + mid).clamp(0, last)) < v
        lo = torch.where(active & go, mid + 1, lo)
        hi = torch.where(active & ~go, mid, hi)
    hit = set_ids.index_select(0, (start + lo).clamp(0, last))
    return (lo < count) & (hit == v)


def _longest_list(set_offsets: torch.Tensor, mode: torch.Tensor) -> int:
    return int((set_offsets[1:] - set_offsets[:-1]).max()) if mode.numel() else 0


def filter_rows_reference(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    set_ids: torch.Tensor,
    set_offsets: torch.Tensor,
    mode: torch.Tensor,
    *,
    check_offsets: bool = True,
    max_list_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`filter_rows` on validated inputs (all on one device).

    Vectorized over ids: each id finds its row with a search over ``row_offsets`` and its
    membership with a lower-bound search in its feature's list. Runs of untouched features
    (mode 0) are copied as they are. A few host syncs on CUDA.

    Args:
        values: int64 ``[N]``.
        row_offsets: int64 ``[F * B + 1]``.
        batch_size: ``B``.
        set_ids: int64 ``[M]``, valid lists.
        set_offsets: int64 ``[F + 1]``.
        mode: int64 ``[F]`` of :class:`FilterMode` values.
        check_offsets: check ``row_offsets`` first (one host sync).
        max_list_len: the longest list, which bounds the search steps (read from
            ``set_offsets`` when omitted).
    """
    if check_offsets:
        row_buffer.check_offsets_now(values, row_offsets, batch_size, "filter_rows")
    if max_list_len is None:
        max_list_len = _longest_list(set_offsets, mode)
    touched = (mode != FILTER_NONE).tolist()

    def run(v: torch.Tensor, o: torch.Tensor, fa: int, fb: int) -> tuple:
        return _filter_all_rows(
            v,
            o,
            batch_size,
            set_ids,
            set_offsets[fa : fb + 1],
            mode[fa:fb],
            check_offsets=False,
            max_list_len=max_list_len,
        )

    return row_buffer.runs_of_touched(values, row_offsets, batch_size, touched, run)


def _filter_all_rows(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    set_ids: torch.Tensor,
    set_offsets: torch.Tensor,
    mode: torch.Tensor,
    *,
    check_offsets: bool = True,
    max_list_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`filter_rows_reference` over every id of the buffer."""
    op = "filter_rows"
    dev = values.device
    n = values.numel()
    n_rows = row_offsets.numel() - 1
    if n_rows == 0:
        return row_buffer.empty_result(values, row_offsets, check_offsets, op)
    if max_list_len is None:
        max_list_len = _longest_list(set_offsets, mode)
    # The row of each id: the last row starting at or before it (empty rows share their
    # start with the next row, so they are never picked).
    item = torch.arange(n, device=dev)
    row = (torch.searchsorted(row_offsets, item, right=True) - 1).clamp(0, n_rows - 1)
    feature = row // batch_size
    md = mode.index_select(0, feature)
    start = set_offsets.index_select(0, feature)
    count = torch.where(md != FILTER_NONE, set_offsets.index_select(0, feature + 1) - start, 0)
    listed = _listed_reference(values, set_ids, start, count, max_list_len.bit_length())
    # DROP drops the listed ids, KEEP_ONLY the others; NONE keeps every id.
    keep = (md == FILTER_NONE) | (listed != (md == FILTER_DROP))
    # Kept ids per row: a segment sum of the keep mask over each row's span.
    csum = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    torch.cumsum(keep.to(torch.int64), 0, out=csum[1:])
    bounds = row_offsets.clamp(0, n)
    new_len = (csum.index_select(0, bounds[1:]) - csum.index_select(0, bounds[:-1])).clamp(min=0)
    out_off = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(new_len, 0, out=out_off[1:])
    if check_offsets:
        total, bad = torch.stack([out_off[-1], row_buffer.offsets_bad(row_offsets, n)]).tolist()
        if bad:
            row_buffer.raise_bad_offsets(row_offsets, n, batch_size, op)
    else:
        total = int(out_off[-1])
    # Kept ids in buffer order are the output; the rest write one spare slot past the end
    # (a scatter, not a boolean index: no second sync).
    dest = torch.where(keep, csum[:-1], total).clamp(max=total)
    out = torch.empty(total + 1, dtype=torch.int64, device=dev)
    out.scatter_(0, dest, values)
    return out[:total], out_off


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _listed(set_ids_ptr, list_start, count, v, steps):
        """Whether each ``v`` is in ``set_ids[list_start:list_start + count]`` (sorted)."""
        lo = tl.zeros_like(count)
        hi = count
        for _ in range(steps):  # lower bound: first listed id >= v
            active = lo < hi
            mid = (lo + hi) >> 1
            b = tl.load(set_ids_ptr + list_start + mid, mask=active, other=0)
            go = b < v
            lo = tl.where(active & go, mid + 1, lo)
            hi = tl.where(active & ~go, mid, hi)
        found = lo < count
        hit = tl.load(set_ids_ptr + list_start + lo, mask=found, other=0)
        return found & (hit == v)

    @triton.jit
    def _block_filtered(mode_ptr, r, in_rows, bs):
        """Whether any row of the block belongs to a filtered feature (mode != 0)."""
        md = tl.load(mode_ptr + r // bs, mask=in_rows, other=0)
        return tl.max((md != 0).to(tl.int32), axis=0) != 0

    @triton.jit
    def _filter_chunk(
        values_ptr,
        row_offsets_ptr,
        set_ids_ptr,
        set_offsets_ptr,
        mode_ptr,
        i,
        s1,
        r0,
        r1,
        bs,
        steps,
        BLOCK: tl.constexpr,
    ):
        """Ids ``i`` of a block's input span (``i < s1`` valid): value, keep flag, row.

        The count and write kernels both decide through this, so they always agree.
        """
        valid = i < s1
        # The id's row: the last block row starting at or before it (empty rows share their
        # start with the next row, so they are never picked). Bad offsets still give a row
        # in [r0, r1).
        row = device.last_le(row_offsets_ptr, i, tl.zeros([BLOCK], dtype=tl.int64) + r0, r1 - r0)
        f = row // bs
        v = tl.load(values_ptr + i, mask=valid, other=0)
        md = tl.load(mode_ptr + f, mask=valid, other=0)
        list_start = tl.load(set_offsets_ptr + f, mask=valid, other=0)
        count = tl.load(set_offsets_ptr + f + 1, mask=valid, other=0) - list_start
        listed = _listed(set_ids_ptr, list_start, tl.where(md != 0, count, 0), v, steps)
        keep = valid & ((md == 0) | ((md == 1) & ~listed) | ((md == 2) & listed))
        return v, keep, row

    @triton.jit(do_not_specialize=["n_rows", "batch_size", "n_values", "steps"])
    def _filter_count_kernel(
        values_ptr,
        row_offsets_ptr,
        set_ids_ptr,
        set_offsets_ptr,
        mode_ptr,
        lengths_ptr,
        out_off_ptr,
        n_rows,
        batch_size,
        n_values,
        steps,
        CHECK: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        nr = n_rows.to(tl.int64)
        nv = n_values.to(tl.int64)
        bs = batch_size.to(tl.int64)
        r0, r1 = device.block_bounds(pid, nr, ROWS)
        r = r0 + tl.arange(0, ROWS)
        in_rows = r < nr
        start = tl.load(row_offsets_ptr + r, mask=in_rows, other=0)
        end = tl.load(row_offsets_ptr + r + 1, mask=in_rows, other=0)
        if _block_filtered(mode_ptr, r, in_rows, bs):
            s0, s1 = device.input_span(row_offsets_ptr, r0, r1, nv)
            # Bins [0, ROWS) count each row's kept ids; dropped (and tail) ids go to bin
            # ROWS + their row, so the histogram needs no mask.
            counts = tl.zeros([2 * ROWS], dtype=tl.int64)
            for c in range(s0, s1, BLOCK):
                i = c + tl.arange(0, BLOCK)
                _, keep, row = _filter_chunk(
                    values_ptr,
                    row_offsets_ptr,
                    set_ids_ptr,
                    set_offsets_ptr,
                    mode_ptr,
                    i,
                    s1,
                    r0,
                    r1,
                    bs,
                    steps,
                    BLOCK,
                )
                local = (row - r0).to(tl.int32)
                bins = tl.where(keep, local, local + ROWS)
                counts += tl.histogram(bins, 2 * ROWS).to(tl.int64)
            j = tl.arange(0, 2 * ROWS)
            tl.store(lengths_ptr + r0 + j, counts, mask=(j < ROWS) & (r0 + j < nr))
        else:
            # Untouched rows keep their length; no id is read.
            length = tl.minimum(tl.maximum(end - start, 0), nv)
            tl.store(lengths_ptr + r, length, mask=in_rows)
        tl.store(out_off_ptr + r, tl.zeros([ROWS], dtype=tl.int64), mask=r == 0)
        if CHECK:
            flag = device.offsets_flag(start, end, r, in_rows, nr, nv)
            tl.store(lengths_ptr + nr + pid, flag)

    @triton.jit(do_not_specialize=["n_rows", "batch_size", "n_values", "steps", "n_out"])
    def _filter_kernel(
        values_ptr,
        row_offsets_ptr,
        set_ids_ptr,
        set_offsets_ptr,
        mode_ptr,
        out_off_ptr,
        out_ptr,
        n_rows,
        batch_size,
        n_values,
        steps,
        n_out,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        nr = n_rows.to(tl.int64)
        nv = n_values.to(tl.int64)
        bs = batch_size.to(tl.int64)
        r0, r1 = device.block_bounds(pid, nr, ROWS)
        r = r0 + tl.arange(0, ROWS)
        s0, s1 = device.input_span(row_offsets_ptr, r0, r1, nv)
        # The block's output span; every store stays inside it (and so inside the output of
        # n_out ids) even if unchecked bad offsets made the two kernels disagree.
        o_start = tl.load(out_off_ptr + r0)
        o_end = tl.minimum(tl.load(out_off_ptr + r1), n_out.to(tl.int64))
        if _block_filtered(mode_ptr, r, r < nr, bs):
            at = o_start
            for c in range(s0, s1, BLOCK):
                i = c + tl.arange(0, BLOCK)
                v, keep, _ = _filter_chunk(
                    values_ptr,
                    row_offsets_ptr,
                    set_ids_ptr,
                    set_offsets_ptr,
                    mode_ptr,
                    i,
                    s1,
                    r0,
                    r1,
                    bs,
                    steps,
                    BLOCK,
                )
                # A block's kept ids are its output, in order: the exclusive prefix count.
                k = keep.to(tl.int32)
                pos = at + (tl.cumsum(k, axis=0) - k).to(tl.int64)
                tl.store(out_ptr + pos, v, mask=keep & (pos < o_end))
                at += tl.sum(k, axis=0).to(tl.int64)
        else:
            # All rows untouched: the output span is a copy of the input span (in larger
            # chunks: a copy holds far fewer registers per id than the filter).
            device.copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, 4 * BLOCK)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def filter_rows(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    set_ids: torch.Tensor,
    set_offsets: torch.Tensor,
    mode: torch.Tensor,
    *,
    check_offsets: bool = True,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop or keep only listed ids, per feature, in every row -> ``(out_values, out_row_offsets)``.

    The buffer, ``check_offsets`` and ``capacity`` work as in
    :func:`~recstack.feature_engine.kernels.reshape_rows.reshape_rows`.

    Args:
        values: int64 ``[N]``, the key-major ids of ``F`` features over ``B`` rows.
        row_offsets: int64 ``[F * B + 1]``, from 0 to ``N``: row ``f * B + b``'s bounds.
        batch_size: ``B >= 0`` (with ``B = 0``, ``F`` is ``mode.numel()``).
        set_ids: int64 ``[M]``; feature ``f``'s list is
            ``set_ids[set_offsets[f]:set_offsets[f + 1]]``, strictly increasing.
        set_offsets: int64 ``[F + 1]``, non-decreasing within ``[0, M]``.
        mode: int64 ``[F]``: 0 leaves the feature untouched, 1 drops its listed ids, 2 keeps
            only its listed ids (:class:`FilterMode`). The three tables are checked on the
            host once per tensor version (cached); keep them on the CPU or on ``values``'
            device.
        check_offsets: check ``row_offsets``, in the one host sync.
        capacity: the output's size when the caller bounds it (no host sync; needs
            ``check_offsets=False``).

    Returns:
        ``out_values`` int64 ``[T]`` (kept ids in their original order) and
        ``out_row_offsets`` int64 ``[F * B + 1]`` (from 0 to ``T``), on ``values``' device.

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape or offsets, or the feature whose mode or list is bad.

    Triton path: 2 launches (count kept ids per row, then write them), one ``torch.cumsum``
    and one host sync for the output size; torch path: the vectorized reference, one sync.

    Examples:
        >>> import torch
        >>> vals = torch.tensor([5, 7, 9, 7, 1, 2])  # F=3, B=1: [5, 7, 9] | [7, 1] | [2]
        >>> out, out_offs = filter_rows(
        ...     vals, torch.tensor([0, 3, 5, 6]), 1,
        ...     set_ids=torch.tensor([7, 1, 2]), set_offsets=torch.tensor([0, 1, 2, 3]),
        ...     mode=torch.tensor([1, 2, 0]))  # drop 7 | keep only 1 | untouched
        >>> out.tolist(), out_offs.tolist()
        ([5, 9, 1, 2], [0, 2, 3, 4])
    """
    op = "filter_rows"
    host.check_tensor(set_ids, "set_ids", op, (torch.int64,), 1)
    host.check_tensor(set_offsets, "set_offsets", op, (torch.int64,), 1)
    host.check_tensor(mode, "mode", op, (torch.int64,), 1)
    num_features = mode.numel()
    if set_offsets.numel() != num_features + 1:
        raise ValueError(
            f"{op}: set_offsets must have F + 1 = {num_features + 1} entries (F = len(mode)), "
            f"got {set_offsets.numel()}"
        )
    batch, n_rows = row_buffer.check_buffer(
        values, row_offsets, batch_size, num_features, "mode", op
    )
    dev = values.device
    tables = {"set_offsets": set_offsets, "set_ids": set_ids, "mode": mode}
    max_list_len, (set_offsets, set_ids, mode) = row_buffer.checked_tables(
        op, tables, dev, lambda: _tables_check(set_ids, set_offsets, mode, op)
    )
    values, row_offsets = host.contiguous(values, row_offsets)
    n = values.numel()
    steps = max_list_len.bit_length()  # lower-bound steps over <= max_list_len + 1 answers

    def count(n_programs: int, lengths: torch.Tensor, out_off: torch.Tensor) -> None:
        kernels.record_launch("filter_rows_count")
        _filter_count_kernel[(n_programs,)](
            host.nonempty(values, torch.int64),
            row_offsets,
            host.nonempty(set_ids, torch.int64),
            set_offsets,
            mode,
            lengths,
            out_off,
            n_rows,
            batch,
            n,
            steps,
            CHECK=check_offsets,
            ROWS=_ROWS,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )

    def write(out_off: torch.Tensor, out: torch.Tensor, total: int) -> None:
        kernels.record_launch("filter_rows")
        # One program per row block, as the count kernel.
        _filter_kernel[(triton.cdiv(n_rows, _ROWS),)](
            host.nonempty(values, torch.int64),
            row_offsets,
            host.nonempty(set_ids, torch.int64),
            set_offsets,
            mode,
            out_off,
            out,
            n_rows,
            batch,
            n,
            steps,
            total,
            ROWS=_ROWS,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        return filter_rows_reference(
            values,
            row_offsets,
            batch,
            set_ids,
            set_offsets,
            mode,
            check_offsets=check_offsets,
            max_list_len=max_list_len,
        )

    return row_buffer.run_row_op(
        op,
        values,
        row_offsets,
        batch,
        n_rows,
        check_offsets=check_offsets,
        capacity=capacity,
        reference=reference,
        rows_per_program=_ROWS,
        count=count,
        write=write,
    )
