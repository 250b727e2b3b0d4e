"""Row-shaping ops over a whole key-major jagged buffer: reshape (truncate/pad/fill) and filter.

Input is the feature engine's working buffer: ``F`` sparse features over a batch of ``B``
rows, key-major (row ``r = f * B + b`` of feature ``f`` is
``values[row_offsets[r]:row_offsets[r + 1]]``). Each op takes a small per-feature table, with
an identity setting for the features it leaves alone, and rewrites every row of every feature
in a fixed number of launches whatever ``F`` is.

* :func:`reshape_rows`: keep the first or last ``keep`` ids of each row, then pad it with a
  value (before or after the ids) to a fixed length or up to a minimum length. Truncate, Pad,
  FillMissing and identity are all settings of its ``[F, 6]`` parameter table.
* :func:`filter_rows`: drop (mode 1) or keep only (mode 2) the ids listed for each feature
  (mode 0: untouched); order is kept.

Launch plan (Triton path, both ops): one kernel writes every row's new length (and, when the
offsets are checked, one "bad offsets" flag per program); ``torch.cumsum`` turns the lengths
into the output offsets; one host sync reads the output size together with the offset check;
then one kernel writes the output. So 2 Triton launches, one cumsum and 1 host sync per call.

Both output kernels (and the filter count kernel) run one program per block of ``R``
consecutive rows (``R`` a power of two): a block's input ids are the contiguous span
``values[row_offsets[r0]:row_offsets[r1]]`` and its output ids the contiguous span
``out[out_off[r0]:out_off[r1]]``, both found with two direct loads, so the grid is the
number of row blocks (host-known) and no program searches the whole buffer.

* ``reshape_rows`` walks its block's output span in chunks of items; each item finds its
  row with a binary search over the block's ``R + 1`` output offsets only (cache hits) and
  computes its source index (or its pad value). Stores are coalesced.
* ``filter_rows``: a block whose features are all untouched (mode 0) keeps its lengths
  without reading an id, and its write is a straight copy of its input span. Otherwise
  both kernels walk the input span in chunks of ids (coalesced loads): each id finds its
  row by a binary search over the block's ``R + 1`` row offsets and is looked up in its
  feature's sorted list. The count kernel sums the kept ids per row with a histogram over
  local row indices; the write kernel stores kept ids at the block's output start plus an
  exclusive prefix sum of the keep flags (a block's output is contiguous and in order).
  Both kernels take the same decisions through the same code, so every block writes
  exactly the ids it counted.

The small tables (reshape ``params``; filter ``set_ids``/``set_offsets``/``mode``) are
validated on the host once per tensor version and the result cached (as in
:mod:`~recstack.feature_engine.kernels.program`); keep them on the CPU or on ``values``'
device (a CPU table is copied to the device once per version, not per call). With
``check_offsets=False`` bad row offsets give unspecified output but never an out-of-bounds
read or write (row lengths are clamped to ``[0, len(values)]`` and reads masked).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.feature_engine.kernels.program import _cached, _nonempty, _tensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.feature_engine.kernels.concat import _last_le

__all__ = [
    "FILTER_DROP",
    "FILTER_KEEP_ONLY",
    "FILTER_NONE",
    "RESHAPE_COLUMNS",
    "RESHAPE_IDENTITY",
    "filter_rows",
    "filter_rows_reference",
    "reshape_rows",
    "reshape_rows_reference",
]

#: The columns of :func:`reshape_rows`' ``params`` table, in order.
RESHAPE_COLUMNS = ("keep", "keep_last", "pad_to", "min_len", "pad_value", "pad_left")
#: A ``params`` row that leaves a feature's rows as they are.
RESHAPE_IDENTITY = (-1, 0, -1, 0, 0, 0)

#: :func:`filter_rows` modes: leave the feature alone, drop its listed ids, keep only them.
FILTER_NONE = 0
FILTER_DROP = 1
FILTER_KEEP_ONLY = 2

# Output items must stay well inside int64 (offsets, allocation sizes).
_MAX_ITEMS = 1 << 62
_ROW_BLOCK = 1024  # rows per program of the reshape length kernel
# Row blocks (powers of two; read at call time, so tests can shrink them). A block's search
# spans R + 1 offsets (log2(R) cached loads per chunk); the filter count histogram has 2 R
# bins, which sets its cost per id, so filter blocks are smaller.
_RESHAPE_ROWS = 256  # rows per program of the reshape kernel
_RESHAPE_BLOCK = 512  # output items per chunk of the reshape kernel
_FILTER_ROWS = 128  # rows per program of the filter kernels
_FILTER_BLOCK = 512  # ids per chunk of the filter kernels (4x that for a plain copy)
_NUM_WARPS = 4


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _check_batch_size(x: object, op: str) -> int:
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"{op}: batch_size must be an int, got {type(x).__name__}")
    value = operator.index(x)
    if value < 0:
        raise ValueError(f"{op}: batch_size must be >= 0, got {value}")
    return value


def _check_buffer(
    values: object, row_offsets: object, batch_size: object, num_features: int, table: str, op: str
) -> tuple[int, int]:
    """Check the jagged buffer against ``F`` (from the table); return ``(B, F * B)``."""
    _tensor(values, "values", op, (torch.int64,), 1)
    _tensor(row_offsets, "row_offsets", op, (torch.int64,), 1)
    batch = _check_batch_size(batch_size, op)
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


def _check_table_device(t: torch.Tensor, name: str, dev: torch.device, op: str) -> None:
    if t.device != dev and t.device.type != "cpu":
        raise ValueError(f"{op}: {name} is on {t.device}; it must be on the CPU or on {dev}")


def _device_copies(tables: tuple[torch.Tensor, ...], dev: torch.device) -> tuple:
    # Cached beside the validation result: a CPU table crosses to the device once per
    # version. Tables already on the device are not kept (None): the cache must not hold them.
    return tuple(t.to(dev).contiguous() if t.device != dev else None for t in tables)


def _on_device(tables: tuple[torch.Tensor, ...], copies: tuple) -> list[torch.Tensor]:
    return [t.contiguous() if c is None else c for t, c in zip(tables, copies, strict=True)]


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _reshape_table_check(params: torch.Tensor, op: str) -> int:
    """Validate ``params``; return the largest ``pad_to``/``min_len`` (bounds the output)."""
    p = params.detach().cpu()
    keep, keep_last, pad_to, min_len, _, pad_left = p.unbind(1)

    def fail(mask: torch.Tensor, why: str) -> None:
        f = _first(mask)
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


def _filter_table_check(
    set_ids: torch.Tensor, set_offsets: torch.Tensor, mode: torch.Tensor, op: str
) -> int:
    """Validate the per-feature id lists and modes; return the longest list's length."""
    ids = set_ids.detach().cpu()
    off = set_offsets.detach().cpu()
    md = mode.detach().cpu()
    m = ids.numel()
    bad = (md < 0) | (md > 2)
    if bad.any():
        f = _first(bad)
        raise ValueError(
            f"{op}: mode[{f}] = {int(md[f])} (feature {f}): mode must be 0 (untouched), "
            "1 (drop the listed ids) or 2 (keep only the listed ids)"
        )
    counts = off[1:] - off[:-1]
    bad = counts < 0
    if bad.any():
        f = _first(bad)
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
            f = _first(bad)
            s, e = int(off[f]), int(off[f + 1])
            i = s + _first(ids[s + 1 : e] <= ids[s : e - 1])
            raise ValueError(
                f"{op}: feature {f}'s id list set_ids[{s}:{e}] must be strictly increasing "
                f"(set_ids[{i}] = {int(ids[i])} >= set_ids[{i + 1}] = {int(ids[i + 1])})"
            )
    return int(counts.max()) if counts.numel() else 0


def _raise_bad_offsets(row_offsets: torch.Tensor, n: int, batch_size: int, op: str) -> None:
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


def _offsets_bad(row_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Device flag (int64 scalar): ``row_offsets`` is not a non-decreasing 0..n run."""
    bad = (row_offsets[0] != 0) | (row_offsets[-1] != n)
    if row_offsets.numel() > 1:
        bad = bad | (row_offsets[1:] < row_offsets[:-1]).any()
    return bad.to(torch.int64)


def _empty_result(values: torch.Tensor, row_offsets: torch.Tensor, check: bool, op: str):
    """The output of a buffer without rows (``values`` is known empty)."""
    if check and int(row_offsets[0]) != 0:
        _raise_bad_offsets(row_offsets, 0, 1, op)
    dev = values.device
    return torch.empty(0, dtype=torch.int64, device=dev), torch.zeros(
        1, dtype=torch.int64, device=dev
    )


def _row_lengths(row_offsets: torch.Tensor, n: int) -> torch.Tensor:
    # Clamped like the kernels do, so unchecked bad offsets never index out of bounds.
    return (row_offsets[1:] - row_offsets[:-1]).clamp(0, n)


def _scan_total(
    lengths: torch.Tensor,
    out_off: torch.Tensor,
    n_rows: int,
    n_flags: int,
    overflow_check: bool,
) -> tuple[int, bool, bool]:
    """Cumsum the new lengths; read the total (+ offset flags, + overflow) in one sync.

    ``lengths`` holds ``n_rows`` lengths then ``n_flags`` 0/1 flags, so the same cumsum
    sums the flags: ``out_off[n_rows + n_flags] - out_off[n_rows]`` counts the bad ones.
    """
    torch.cumsum(lengths, 0, out=out_off[1:])
    picks = out_off[n_rows::n_flags] if n_flags else out_off[n_rows:]
    if overflow_check:
        # Float64 sums cannot wrap, so they tell an overflowed int64 total.
        over = (lengths[:n_rows].double().sum() >= _MAX_ITEMS).to(torch.int64)
        picks = torch.cat([picks, over.view(1)])
    got = picks.tolist()
    return got[0], bool(n_flags) and got[1] != got[0], overflow_check and bool(got[-1])


def _check_capacity(capacity: object, check_offsets: bool, op: str) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not hasattr(capacity, "__index__"):
        raise TypeError(f"{op}: capacity must be an int, got {type(capacity).__name__}")
    cap = operator.index(capacity)
    if not 0 <= cap < _MAX_ITEMS:
        raise ValueError(f"{op}: capacity must be in [0, 2**62), got {cap}")
    if check_offsets:
        raise ValueError(f"{op}: capacity skips the host sync, so it needs check_offsets=False")
    return cap


def _fit(
    result: tuple[torch.Tensor, torch.Tensor], capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact output of a reference, laid out in ``capacity`` entries when asked."""
    out, out_off = result
    if capacity is None:
        return out, out_off
    fitted = torch.zeros(capacity, dtype=out.dtype, device=out.device)
    k = min(capacity, out.numel())
    fitted[:k] = out[:k]
    return fitted, out_off


def _raise_overflow(op: str) -> None:
    raise ValueError(f"{op}: the output would hold 2**62 or more ids (pad_to/min_len too large)")


# ----------------------------------------------------------------------------------------
# torch references
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
    """
    if check_offsets:
        _check_offsets_now(values, row_offsets, batch_size, "reshape_rows")
    keep, _, pad_to, min_len, _, _ = params.unbind(1)
    touched = ((keep >= 0) | (pad_to >= 0) | (min_len > 0)).tolist()

    def run(v: torch.Tensor, o: torch.Tensor, fa: int, fb: int) -> tuple:
        return _reshape_reference(v, o, batch_size, params[fa:fb], check_offsets=False)

    return _runs_of_touched(values, row_offsets, batch_size, touched, run)


def _reshape_reference(
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
        return _empty_result(values, row_offsets, check_offsets, op)
    lens = _row_lengths(row_offsets, n)
    feature = torch.arange(n_rows, device=dev) // batch_size
    keep, keep_last, pad_to, min_len, pad_value, pad_left = params.index_select(0, feature).unbind(
        1
    )
    kept = torch.where(keep < 0, lens, torch.minimum(lens, keep))
    new_len = torch.where(pad_to >= 0, pad_to, torch.maximum(kept, min_len))
    out_off = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(new_len, 0, out=out_off[1:])
    flags = [out_off[-1], (new_len.double().sum() >= _MAX_ITEMS).to(torch.int64)]
    if check_offsets:
        flags.append(_offsets_bad(row_offsets, n))
    got = torch.stack(flags).tolist()
    if check_offsets and got[2]:
        _raise_bad_offsets(row_offsets, n, batch_size, op)
    if got[1]:
        _raise_overflow(op)
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


def _check_offsets_now(
    values: torch.Tensor, row_offsets: torch.Tensor, batch_size: int, op: str
) -> None:
    n = values.numel()
    if row_offsets.numel() == 1:
        if int(row_offsets[0]) != 0:
            _raise_bad_offsets(row_offsets, 0, 1, op)
        return
    if int(_offsets_bad(row_offsets, n)):
        _raise_bad_offsets(row_offsets, n, batch_size, op)


def _runs_of_touched(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    touched: list[bool],
    run: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``run(values, offsets, fa, fb)`` over each maximal run ``[fa, fb)`` of touched
    features' rows (offsets rebased to 0); the rows of untouched features are copied.

    Falls back to one run over everything when the feature boundaries are not a valid
    split of ``values`` (unchecked bad offsets: the whole-buffer code clamps them).
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
    membership with a lower-bound search in its feature's list. ``max_list_len`` bounds the
    search steps (read from ``set_offsets`` when omitted). Runs of untouched features
    (mode 0) are copied as they are. A few host syncs on CUDA.
    """
    if check_offsets:
        _check_offsets_now(values, row_offsets, batch_size, "filter_rows")
    if max_list_len is None:
        max_list_len = int((set_offsets[1:] - set_offsets[:-1]).max()) if mode.numel() else 0
    touched = (mode != 0).tolist()

    def run(v: torch.Tensor, o: torch.Tensor, fa: int, fb: int) -> tuple:
        return _filter_reference(
            v,
            o,
            batch_size,
            set_ids,
            set_offsets[fa : fb + 1],
            mode[fa:fb],
            check_offsets=False,
            max_list_len=max_list_len,
        )

    return _runs_of_touched(values, row_offsets, batch_size, touched, run)


def _filter_reference(
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
        return _empty_result(values, row_offsets, check_offsets, op)
    if max_list_len is None:
        max_list_len = int((set_offsets[1:] - set_offsets[:-1]).max()) if mode.numel() else 0
    # The row of each id: the last row starting at or before it (empty rows share their
    # start with the next row, so they are never picked).
    item = torch.arange(n, device=dev)
    row = (torch.searchsorted(row_offsets, item, right=True) - 1).clamp(0, n_rows - 1)
    feature = row // batch_size
    md = mode.index_select(0, feature)
    start = set_offsets.index_select(0, feature)
    count = torch.where(md != 0, set_offsets.index_select(0, feature + 1) - start, 0)
    listed = _listed_reference(values, set_ids, start, count, max_list_len.bit_length())
    keep = (md == 0) | ((md == 1) & ~listed) | ((md == 2) & listed)
    # Kept ids per row: a segment sum of the keep mask over each row's span.
    csum = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    torch.cumsum(keep.to(torch.int64), 0, out=csum[1:])
    bounds = row_offsets.clamp(0, n)
    new_len = (csum.index_select(0, bounds[1:]) - csum.index_select(0, bounds[:-1])).clamp(min=0)
    out_off = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(new_len, 0, out=out_off[1:])
    if check_offsets:
        total, bad = torch.stack([out_off[-1], _offsets_bad(row_offsets, n)]).tolist()
        if bad:
            _raise_bad_offsets(row_offsets, n, batch_size, op)
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
    def _offsets_flag(start, end, r, in_rows, n_rows, n_values):
        """1 if this block's rows break ``0 = row_offsets[0] <= ... <= row_offsets[-1] = N``."""
        bad = (end < start) | ((r == 0) & (start != 0)) | ((r == n_rows - 1) & (end != n_values))
        return tl.max((in_rows & bad).to(tl.int64), axis=0)

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
            flag = _offsets_flag(start, end, r, in_rows, nr, nv)
            tl.store(lengths_ptr + nr + pid, flag)

    @triton.jit
    def _block_bounds(pid, n_rows, ROWS: tl.constexpr):
        """Rows ``[r0, r1)`` of program ``pid``'s block (``r0 < r1``: grid = row blocks)."""
        r0 = pid * ROWS
        return r0, tl.minimum(r0 + ROWS, n_rows)

    @triton.jit
    def _copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, CHUNK: tl.constexpr):
        """A block whose rows keep their ids: its input span copied to its output span
        (both masked, so unchecked bad offsets never read or write out of bounds)."""
        for c in range(0, tl.maximum(o_end - o_start, 0), CHUNK):
            k = c + tl.arange(0, CHUNK)
            src = s0 + k
            v = tl.load(values_ptr + src, mask=src < s1, other=0)
            tl.store(out_ptr + o_start + k, v, mask=o_start + k < o_end)

    @triton.jit
    def _input_span(row_offsets_ptr, r0, r1, nv):
        """The block's input span, clamped into ``[0, nv]`` (bad offsets stay in bounds)."""
        s0 = tl.minimum(tl.maximum(tl.load(row_offsets_ptr + r0), 0), nv)
        s1 = tl.minimum(tl.maximum(tl.load(row_offsets_ptr + r1), s0), nv)
        return s0, s1

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
        r0, r1 = _block_bounds(pid, n_rows.to(tl.int64), ROWS)
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
            s0, s1 = _input_span(row_offsets_ptr, r0, r1, nv)
            _copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, 4 * BLOCK)
            o_end = o_start  # nothing left for the general walk below
        for c in range(o_start, o_end, BLOCK):
            e = c + tl.arange(0, BLOCK)
            valid = e < o_end
            e = tl.minimum(e, o_end - 1)  # tail lanes redo the last item; only valid lanes store
            # Only this block's offsets are searched: log2(ROWS) loads that hit the cache.
            r = _last_le(out_off_ptr, e, tl.zeros([BLOCK], dtype=tl.int64) + r0, r1 - r0)
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
        row = _last_le(row_offsets_ptr, i, tl.zeros([BLOCK], dtype=tl.int64) + r0, r1 - r0)
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
        r0, r1 = _block_bounds(pid, nr, ROWS)
        r = r0 + tl.arange(0, ROWS)
        in_rows = r < nr
        start = tl.load(row_offsets_ptr + r, mask=in_rows, other=0)
        end = tl.load(row_offsets_ptr + r + 1, mask=in_rows, other=0)
        if _block_filtered(mode_ptr, r, in_rows, bs):
            s0, s1 = _input_span(row_offsets_ptr, r0, r1, nv)
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
            flag = _offsets_flag(start, end, r, in_rows, nr, nv)
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
        r0, r1 = _block_bounds(pid, nr, ROWS)
        r = r0 + tl.arange(0, ROWS)
        s0, s1 = _input_span(row_offsets_ptr, r0, r1, nv)
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
            _copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, 4 * BLOCK)


# ----------------------------------------------------------------------------------------
# Public ops
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

    Example:
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
    _tensor(params, "params", op, (torch.int64,), 2)
    if params.shape[1] != len(RESHAPE_COLUMNS):
        raise ValueError(
            f"{op}: params must have shape [F, 6] (columns {', '.join(RESHAPE_COLUMNS)}), "
            f"got {tuple(params.shape)}"
        )
    batch, n_rows = _check_buffer(values, row_offsets, batch_size, params.shape[0], "params", op)
    dev = values.device
    _check_table_device(params, "params", dev, op)
    max_extra, copies = _cached(
        f"{op}@{dev}",
        (params,),
        lambda: (_reshape_table_check(params, op), _device_copies((params,), dev)),
    )
    (params,) = _on_device((params,), copies)
    values = values.contiguous()
    row_offsets = row_offsets.contiguous()
    capacity = _check_capacity(capacity, check_offsets, op)
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("reshape_rows_reference")
        out = reshape_rows_reference(
            values, row_offsets, batch, params, check_offsets=check_offsets
        )
        return _fit(out, capacity)
    n = values.numel()
    if n_rows == 0:
        return _fit(_empty_result(values, row_offsets, check_offsets, op), capacity)
    n_blocks = triton.cdiv(n_rows, _ROW_BLOCK)
    n_flags = n_blocks if check_offsets else 0
    lengths = torch.empty(n_rows + n_flags, dtype=torch.int64, device=dev)
    out_off = torch.empty(n_rows + n_flags + 1, dtype=torch.int64, device=dev)
    kernels.record_launch("reshape_rows_lengths")
    _reshape_lengths_kernel[(n_blocks,)](
        row_offsets,
        params,
        lengths,
        out_off,
        n_rows,
        batch,
        n,
        CHECK=check_offsets,
        BLOCK=_ROW_BLOCK,
        num_warps=_NUM_WARPS,
    )
    if capacity is not None:
        total = capacity
        torch.cumsum(lengths, 0, out=out_off[1:])
    else:
        # Lengths are at most L + max_extra, so only absurd pad_to/min_len overflow int64.
        total, bad, over = _scan_total(
            lengths, out_off, n_rows, n_flags, n + n_rows * max_extra >= _MAX_ITEMS
        )
        if bad:
            _raise_bad_offsets(row_offsets, n, batch, op)
        if over:
            _raise_overflow(op)
    out_off = out_off[: n_rows + 1]
    out = torch.empty(total, dtype=torch.int64, device=dev)
    if total:
        kernels.record_launch("reshape_rows")
        _reshape_kernel[(triton.cdiv(n_rows, _RESHAPE_ROWS),)](
            _nonempty(values, torch.int64),
            row_offsets,
            params,
            out_off,
            out,
            n_rows,
            batch,
            n,
            total,
            ROWS=_RESHAPE_ROWS,
            BLOCK=_RESHAPE_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return out, out_off


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

    Args:
        values: int64 ``[N]``, the ids of ``F`` features over ``B`` rows, key-major.
        row_offsets: int64 ``[F * B + 1]``, non-decreasing from 0 to ``N``; row
            ``r = f * B + b`` is ``values[row_offsets[r]:row_offsets[r + 1]]``.
        batch_size: ``B >= 0`` (with ``B = 0``, ``F`` is ``mode.numel()``).
        set_ids: int64 ``[M]``; feature ``f``'s list is
            ``set_ids[set_offsets[f]:set_offsets[f + 1]]``, strictly increasing.
        set_offsets: int64 ``[F + 1]``, non-decreasing within ``[0, M]``.
        mode: int64 ``[F]``: 0 leaves the feature untouched, 1 drops its listed ids, 2 keeps
            only its listed ids. The three tables are checked on the host once per tensor
            version (cached); keep them on the CPU or on ``values``' device.
        check_offsets: check ``row_offsets`` (folded into the one host sync). With ``False``,
            bad offsets give unspecified output but no out-of-bounds access.
        capacity: with ``check_offsets=False``, skip the host sync: ``out_values`` gets
            ``capacity`` entries, the first ``out_row_offsets[-1]`` of them the output. The
            caller guarantees the output fits (from an upper bound it tracks) and should
            check ``out_row_offsets[-1] <= capacity`` at its next sync: ids past the
            capacity are not written.

    Returns:
        ``out_values`` int64 ``[T]`` (kept ids in their original order) and
        ``out_row_offsets`` int64 ``[F * B + 1]`` (from 0 to ``T``), on ``values``' device.

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape or offsets, or the feature whose mode or list is bad.

    Triton path: 2 launches (count kept ids per row, then write them), one ``torch.cumsum``
    and one host sync for the output size; torch path: the vectorized reference, one sync.

    Example:
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
    _tensor(set_ids, "set_ids", op, (torch.int64,), 1)
    _tensor(set_offsets, "set_offsets", op, (torch.int64,), 1)
    _tensor(mode, "mode", op, (torch.int64,), 1)
    num_features = mode.numel()
    if set_offsets.numel() != num_features + 1:
        raise ValueError(
            f"{op}: set_offsets must have F + 1 = {num_features + 1} entries (F = len(mode)), "
            f"got {set_offsets.numel()}"
        )
    batch, n_rows = _check_buffer(values, row_offsets, batch_size, num_features, "mode", op)
    dev = values.device
    tables = (set_offsets, set_ids, mode)
    for name, t in zip(("set_offsets", "set_ids", "mode"), tables, strict=True):
        _check_table_device(t, name, dev, op)
    max_list_len, copies = _cached(
        f"{op}@{dev}",
        tables,
        lambda: (_filter_table_check(set_ids, set_offsets, mode, op), _device_copies(tables, dev)),
    )
    set_offsets, set_ids, mode = _on_device(tables, copies)
    values = values.contiguous()
    row_offsets = row_offsets.contiguous()
    capacity = _check_capacity(capacity, check_offsets, op)
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("filter_rows_reference")
        out = filter_rows_reference(
            values,
            row_offsets,
            batch,
            set_ids,
            set_offsets,
            mode,
            check_offsets=check_offsets,
            max_list_len=max_list_len,
        )
        return _fit(out, capacity)
    n = values.numel()
    if n_rows == 0:
        return _fit(_empty_result(values, row_offsets, check_offsets, op), capacity)
    n_blocks = triton.cdiv(n_rows, _FILTER_ROWS)
    n_flags = n_blocks if check_offsets else 0
    lengths = torch.empty(n_rows + n_flags, dtype=torch.int64, device=dev)
    out_off = torch.empty(n_rows + n_flags + 1, dtype=torch.int64, device=dev)
    steps = max_list_len.bit_length()  # lower-bound steps over <= max_list_len + 1 answers
    ids = _nonempty(set_ids, torch.int64)
    src = _nonempty(values, torch.int64)
    kernels.record_launch("filter_rows_count")
    _filter_count_kernel[(n_blocks,)](
        src,
        row_offsets,
        ids,
        set_offsets,
        mode,
        lengths,
        out_off,
        n_rows,
        batch,
        n,
        steps,
        CHECK=check_offsets,
        ROWS=_FILTER_ROWS,
        BLOCK=_FILTER_BLOCK,
        num_warps=_NUM_WARPS,
    )
    if capacity is not None:
        total = capacity
        torch.cumsum(lengths, 0, out=out_off[1:])
    else:
        total, bad, _ = _scan_total(lengths, out_off, n_rows, n_flags, False)
        if bad:
            _raise_bad_offsets(row_offsets, n, batch, op)
    out_off = out_off[: n_rows + 1]
    out = torch.empty(total, dtype=torch.int64, device=dev)
    if total:
        kernels.record_launch("filter_rows")
        _filter_kernel[(n_blocks,)](
            src,
            row_offsets,
            ids,
            set_offsets,
            mode,
            out_off,
            out,
            n_rows,
            batch,
            n,
            steps,
            total,
            ROWS=_FILTER_ROWS,
            BLOCK=_FILTER_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return out, out_off
