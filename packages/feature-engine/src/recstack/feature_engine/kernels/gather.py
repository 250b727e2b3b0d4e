"""Gather raw batch columns into one key-major jagged int64 buffer, in one launch.

The Feature Engine's first level turns each feature node's raw column (integer ids, floats to
bucketize, or byte strings to hash) into ids, and lays every node out as one *segment* of a
key-major jagged buffer over a batch of ``B`` rows: row ``r = s * B + b`` of the result holds
``values[row_offsets[r]:row_offsets[r + 1]]``. ``gather_inputs`` does all of it, for any
number of segments, with one Triton launch plus one small pinned host-to-device upload.

Item semantics per segment kind:

* ``SEG_IDS``: ids copied as int64 (int32 sign-extends, uint8 zero-extends, as ``Tensor.to``);
* ``SEG_FLOAT``: ``torch.bucketize(float64(x), boundaries[start:start + count], right=right)``,
  NaN -> ``count`` (exactly
  :func:`~recstack.feature_engine.kernels.bucketize_float.bucketize_float`);
* ``SEG_STRING``: XXH64 of each string's bytes with the segment's seed, equal to
  :func:`recstack.core.kernels.hash.xxh64_bytes` (the uint64 as an int64 bit pattern).

Segment ``s``'s items fill ``values[base_s:base_s + count_s]`` in segment order; every
``count_s`` is known on the host (``items.numel()``, or the number of strings), so nothing
waits on the device.

Kernel layout: the host builds one int64 table (see :func:`_plan_launch`) holding the prefix
sums of every work item's tile count, then one 16-entry record per segment (its kind, data
pointers, dtype code, output base, count, seed, boundary slice, ...). A segment has two work
items: its value tiles (``_BLOCK`` ids/floats or ``_SBLOCK`` strings per tile) and its row
tiles (``_BLOCK`` entries of the output ``row_offsets``). Each program finds its work item
with one scalar binary search over the tile prefix sums (as
:func:`~recstack.feature_engine.kernels.concat.concat_1d` does) and branches on the kind,
which is uniform per program. The last segment's row work also writes the final entry ``N``;
with ``B == 0`` it is the only entry, so a launch always has at least one tile.
"""

from __future__ import annotations

import array
import functools
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import check_seed, xxh64_bytes_reference
from recstack.core.kernels.host import as_int64
from recstack.feature_engine.kernels.concat import CONCAT_DTYPES
from recstack.feature_engine.kernels.host import cached

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_xxh64_bytes
    from recstack.feature_engine.kernels.device import bucket_of, last_le, load_as

__all__ = [
    "SEG_FLOAT",
    "SEG_IDS",
    "SEG_STRING",
    "GatherPlan",
    "InputSegment",
    "SegmentKind",
    "gather_inputs",
    "gather_inputs_reference",
]


class SegmentKind(IntEnum):
    """What a segment's items are, and so how they become ids (see the module docstring)."""

    IDS = 0
    FLOAT = 1
    STRING = 2


SEG_IDS, SEG_FLOAT, SEG_STRING = SegmentKind

_ITEM_DTYPES: tuple[tuple[torch.dtype, ...], ...] = (
    (torch.int64, torch.int32, torch.uint8),
    (torch.float32, torch.float64),
    (torch.uint8,),
)
_MASK64 = (1 << 64) - 1

_BLOCK = 1024  # ids / floats / row_offsets entries per tile
_SBLOCK = 128  # strings per tile (each lane hashes a whole string)
_NUM_WARPS = 4

# One record of _NF int64 fields per segment, after the tile prefix sums (padded to _NF so
# each record sits in one 128-byte line).
_NF = 16
_F_KIND = 0
_F_DTYPE = 1  # CONCAT_DTYPES code of the items
_F_ITEMS = 2  # items data pointer
_F_SOFF = 3  # string_offsets data pointer (SEG_STRING)
_F_ROFF = 4  # row_offsets data pointer, 0 when None
_F_BASE = 5  # first values index of the segment
_F_COUNT = 6  # number of items (ids, floats or strings)
_F_SEED = 7  # int64 bit pattern of the uint64 seed (SEG_STRING)
_F_BPTR = 8  # address of boundaries[bound_start] (SEG_FLOAT)
_F_BCOUNT = 9
_F_RIGHT = 10
_F_STEPS = 11  # binary-search steps over bound_count + 1 answers
_F_NROWS = 12  # row_offsets entries this segment writes: B, or B + 1 for the last one


@dataclass(frozen=True, eq=False, slots=True)
class InputSegment:
    """One feature node's raw column, as one segment of :func:`gather_inputs`'s output.

    Attributes:
        kind: ``SEG_IDS``, ``SEG_FLOAT`` or ``SEG_STRING``.
        items: 1-D ids (int64/int32/uint8), floats (float32/float64) or string bytes (uint8).
        row_offsets: int64 ``[B + 1]``; row ``b`` holds items
            ``[row_offsets[b] - row_offsets[0], row_offsets[b + 1] - row_offsets[0])``.
            ``None``: exactly one item per row.
        string_offsets: ``SEG_STRING`` only, int64 ``[S + 1]``; string ``i`` is
            ``items[string_offsets[i]:string_offsets[i + 1]]`` (absolute positions).
        seed: ``SEG_STRING``: XXH64 seed in ``[0, 2**64)``.
        bound_start, bound_count: ``SEG_FLOAT``: the list is
            ``boundaries[bound_start:bound_start + bound_count]`` (``bound_count >= 1``).
        right: ``SEG_FLOAT``: ``torch.bucketize``'s ``right`` flag.
    """

    kind: int
    items: torch.Tensor
    row_offsets: torch.Tensor | None = None
    string_offsets: torch.Tensor | None = None
    seed: int = 0
    bound_start: int = 0
    bound_count: int = 0
    right: bool = False


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

_OP = "gather_inputs"


def _where(s: int, kind: int | None = None) -> str:
    name = f" (SEG_{SegmentKind(kind).name})" if kind is not None else ""
    return f"{_OP}: segments[{s}]{name}"


def _offsets_tensor(t: object, name: str, s: int, kind: int, dev: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_where(s, kind)}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{_where(s, kind)}: {name} must be int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{_where(s, kind)}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != dev:
        raise ValueError(
            f"{_where(s, kind)}: {name} is on {t.device} but segments[0].items is on {dev}"
        )
    return t if t.is_contiguous() else t.contiguous()


def _analyze_boundaries(b: torch.Tensor) -> tuple[int, list[int]]:
    """(index of the first NaN or -1, descents): ``descents[i]`` counts ``j < i`` with
    ``b[j + 1] <= b[j]``, so ``b[s:s + c]`` is strictly increasing iff
    ``descents[s + c - 1] == descents[s]``."""
    h = b.detach().cpu()
    nan = h.isnan().nonzero()
    m = h.numel()
    descents = torch.zeros(m, dtype=torch.int64)
    if m > 1:
        torch.cumsum((h[1:] <= h[:-1]).to(torch.int64), 0, out=descents[1:])
    return (int(nan[0, 0]) if nan.numel() else -1), descents.tolist()


def _check_boundaries(boundaries: object, dev: torch.device) -> tuple[int, list[int]]:
    if not isinstance(boundaries, torch.Tensor):
        raise TypeError(
            f"{_OP}: boundaries must be a float64 torch.Tensor, got {type(boundaries).__name__}"
        )
    if boundaries.dtype != torch.float64:
        raise TypeError(f"{_OP}: boundaries must be float64, got {boundaries.dtype}")
    if boundaries.dim() != 1:
        raise ValueError(f"{_OP}: boundaries must be 1-D, got shape {tuple(boundaries.shape)}")
    if boundaries.device != dev:
        raise ValueError(f"{_OP}: boundaries is on {boundaries.device} but the segments on {dev}")
    nan, descents = cached(_OP, (boundaries,), lambda: _analyze_boundaries(boundaries))
    if nan >= 0:
        raise ValueError(f"{_OP}: boundaries must not be NaN (at index {nan})")
    return nan, descents


class _CheckedSegment(NamedTuple):
    """A validated segment: contiguous tensors and host-known sizes."""

    kind: int
    items: torch.Tensor
    row_offsets: torch.Tensor | None
    string_offsets: torch.Tensor | None
    count: int  # items (ids, floats or strings)
    seed: int
    bound_start: int
    bound_count: int
    right: int


def _validate(
    segments: Sequence[InputSegment],
    batch_size: object,
    boundaries: torch.Tensor | None,
    device: object,
) -> tuple[list[_CheckedSegment], int, torch.device]:
    """Check every segment on the host (no device sync) and return them validated.

    Runs every training step for every feature, so the loop stays lean: error messages are
    only formatted when raised.
    """
    if isinstance(segments, torch.Tensor | InputSegment) or not isinstance(segments, Sequence):
        raise TypeError(f"{_OP}: segments must be a sequence of InputSegment")
    bsz = check_int(batch_size, f"{_OP}: batch_size", minimum=0)
    want = torch.device(device) if device is not None else None
    if not segments:
        dev = want if want is not None else torch.device("cpu")
        if boundaries is not None:
            _check_boundaries(boundaries, boundaries.device)
        return [], bsz, dev
    first = segments[0]
    if not isinstance(first, InputSegment) or not isinstance(first.items, torch.Tensor):
        dev = None  # the loop below raises on segment 0
    else:
        dev = first.items.device
    if dev is not None and want is not None:
        same = want.type == dev.type and (want.index is None or want.index == dev.index)
        if not same:
            raise ValueError(f"{_OP}: device={want} but the segments are on {dev}")
    descents: list[int] | None = None
    out: list[_CheckedSegment] = []
    n_rows = bsz + 1
    for s, seg in enumerate(segments):
        if not isinstance(seg, InputSegment):
            raise TypeError(f"{_where(s)} must be an InputSegment, got {type(seg).__name__}")
        kind = seg.kind
        if isinstance(kind, bool) or kind not in (SEG_IDS, SEG_FLOAT, SEG_STRING):
            raise ValueError(
                f"{_where(s)}: unknown kind {kind!r}; use SEG_IDS, SEG_FLOAT or SEG_STRING"
            )
        kind = int(kind)
        items = seg.items
        if not isinstance(items, torch.Tensor):
            raise TypeError(
                f"{_where(s, kind)}: items must be a torch.Tensor, got {type(items).__name__}"
            )
        if items.dtype not in _ITEM_DTYPES[kind]:
            want_t = " or ".join(str(d) for d in _ITEM_DTYPES[kind])
            raise TypeError(f"{_where(s, kind)}: items must be {want_t}, got {items.dtype}")
        if items.dim() != 1:
            raise ValueError(
                f"{_where(s, kind)}: items must be 1-D, got shape {tuple(items.shape)}"
            )
        if items.device != dev:
            raise ValueError(
                f"{_where(s, kind)}: items is on {items.device} but segments[0] is on {dev}"
            )
        if not items.is_contiguous():
            items = items.contiguous()
        so = seg.string_offsets
        seed = 0
        if kind == SEG_STRING:
            if so is None:
                raise ValueError(f"{_where(s, kind)}: string_offsets is required for strings")
            so = _offsets_tensor(so, "string_offsets", s, kind, dev)
            count = so.shape[0] - 1
            if count < 0:
                raise ValueError(
                    f"{_where(s, kind)}: string_offsets must have S + 1 >= 1 entries, got 0"
                )
            seed = seg.seed
            if type(seed) is not int or not 0 <= seed <= _MASK64:
                seed = check_seed(seed, f"{_where(s, kind)}: seed")
        else:
            if so is not None:
                raise ValueError(
                    f"{_where(s, kind)}: string_offsets is only for SEG_STRING segments"
                )
            count = items.shape[0]
        ro = seg.row_offsets
        if ro is None:
            if count != bsz:
                raise ValueError(
                    f"{_where(s, kind)}: row_offsets is None (one item per row) but it has "
                    f"{count} items for batch_size={bsz}"
                )
        else:
            ro = _offsets_tensor(ro, "row_offsets", s, kind, dev)
            if ro.shape[0] != n_rows:
                raise ValueError(
                    f"{_where(s, kind)}: row_offsets must have shape [B + 1] = [{n_rows}], "
                    f"got {tuple(ro.shape)}"
                )
        if kind != SEG_FLOAT:
            out.append(_CheckedSegment(kind, items, ro, so, count, seed, 0, 0, 0))
            continue
        if boundaries is None:
            raise ValueError(f"{_where(s, kind)}: float segments need the boundaries tensor")
        if descents is None:
            _, descents = _check_boundaries(boundaries, dev)
        bstart = seg.bound_start
        if type(bstart) is not int:
            bstart = check_int(bstart, f"{_where(s, kind)}: bound_start")
        bcount = seg.bound_count
        if type(bcount) is not int:
            bcount = check_int(bcount, f"{_where(s, kind)}: bound_count")
        m = len(descents)
        if bcount < 1 or bstart < 0 or bstart > m - bcount:
            raise ValueError(
                f"{_where(s, kind)}: needs 0 <= bound_start and 1 <= bound_count with "
                f"bound_start + bound_count <= len(boundaries)={m}, got "
                f"bound_start={bstart}, bound_count={bcount}"
            )
        if descents[bstart + bcount - 1] != descents[bstart]:
            raise ValueError(
                f"{_where(s, kind)}: boundaries[{bstart}:{bstart + bcount}] must be strictly "
                "increasing"
            )
        right = seg.right
        if right not in (0, 1):  # bools and 0/1 ints
            raise TypeError(f"{_where(s, kind)}: right must be a bool, got {right!r}")
        out.append(_CheckedSegment(kind, items, ro, so, count, 0, bstart, bcount, int(right)))
    if boundaries is not None and descents is None:
        _check_boundaries(boundaries, dev)
    return out, bsz, dev


def _check_offsets(segs: list[_CheckedSegment]) -> None:
    """Offsets consistent with the item counts, for every segment at once (one host sync)."""
    checks: list[tuple[int, str, torch.Tensor]] = []
    for s, g in enumerate(segs):
        if g.row_offsets is not None:
            ro = g.row_offsets
            ok = (ro[1:] >= ro[:-1]).all() & (ro[-1] - ro[0] == g.count)
            checks.append((s, "ro", ok))
        if g.string_offsets is not None:
            so = g.string_offsets
            ok = (so[1:] >= so[:-1]).all() & (so[0] >= 0) & (so[-1] <= g.items.numel())
            checks.append((s, "so", ok))
    if not checks:
        return
    flags = torch.stack([c[2] for c in checks]).tolist()
    for (s, what, _), good in zip(checks, flags, strict=True):
        if good:
            continue
        g = segs[s]
        where = _where(s, g.kind)
        if what == "ro":
            raise ValueError(
                f"{where}: row_offsets must be non-decreasing with row_offsets[-1] - "
                f"row_offsets[0] == its {g.count} items; got first={int(g.row_offsets[0])}, "
                f"last={int(g.row_offsets[-1])}"
            )
        raise ValueError(
            f"{where}: string_offsets must be non-decreasing within [0, {g.items.numel()}] "
            f"(items has {g.items.numel()} bytes); got first={int(g.string_offsets[0])}, "
            f"last={int(g.string_offsets[-1])}"
        )


# ----------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------


def _reference(
    segs: list[_CheckedSegment], bsz: int, boundaries: torch.Tensor | None, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    parts: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    base = 0
    for g in segs:
        if g.kind == SEG_IDS:
            v = g.items.to(torch.int64)
        elif g.kind == SEG_FLOAT:
            x = g.items.to(torch.float64)
            bl = boundaries[g.bound_start : g.bound_start + g.bound_count]
            v = torch.bucketize(x, bl, right=bool(g.right))
            v = torch.where(x.isnan(), g.bound_count, v)
        else:
            v = xxh64_bytes_reference(g.items, g.string_offsets, g.seed)
        parts.append(v)
        if g.row_offsets is None:
            rows.append(torch.arange(base, base + bsz, dtype=torch.int64, device=dev))
        else:
            rows.append(g.row_offsets[:-1] - g.row_offsets[0] + base)
        base += g.count
    rows.append(torch.full((1,), base, dtype=torch.int64, device=dev))
    return torch.cat(parts), torch.cat(rows)


def gather_inputs_reference(
    segments: Sequence[InputSegment],
    batch_size: int,
    boundaries: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`gather_inputs`: per-segment torch ops and one ``torch.cat``.

    Validates like :func:`gather_inputs` (offsets unchecked) and records no launch.
    """
    segs, bsz, dev = _validate(segments, batch_size, boundaries, device)
    if not segs:
        return _empty_result(dev)
    return _reference(segs, bsz, boundaries, dev)


def _empty_result(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(0, dtype=torch.int64, device=dev),
        torch.zeros(1, dtype=torch.int64, device=dev),
    )


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    # Triton kernels only read constexpr globals.
    _K_NF = tl.constexpr(_NF)
    _K_KIND = tl.constexpr(_F_KIND)
    _K_DTYPE = tl.constexpr(_F_DTYPE)
    _K_ITEMS = tl.constexpr(_F_ITEMS)
    _K_SOFF = tl.constexpr(_F_SOFF)
    _K_ROFF = tl.constexpr(_F_ROFF)
    _K_BASE = tl.constexpr(_F_BASE)
    _K_COUNT = tl.constexpr(_F_COUNT)
    _K_SEED = tl.constexpr(_F_SEED)
    _K_BPTR = tl.constexpr(_F_BPTR)
    _K_BCOUNT = tl.constexpr(_F_BCOUNT)
    _K_RIGHT = tl.constexpr(_F_RIGHT)
    _K_STEPS = tl.constexpr(_F_STEPS)
    _K_NROWS = tl.constexpr(_F_NROWS)

    @triton.jit
    def _load_ids(addr, i, mask, code, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        x = tl.zeros([BLOCK], dtype=tl.int64)
        if code == 0:
            x = load_as(addr, i, mask, 0, ALIGNED).to(tl.int64)
        elif code == 1:
            x = load_as(addr, i, mask, 1, ALIGNED).to(tl.int64)
        else:
            x = load_as(addr, i, mask, 2, ALIGNED).to(tl.int64)
        return x

    @triton.jit
    def _bucketize(addr, i, mask, code, rec, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # The search and NaN rule of bucketize_float, in float64.
        x = tl.zeros([BLOCK], dtype=tl.float64)
        if code == 3:
            x = load_as(addr, i, mask, 3, ALIGNED).to(tl.float64)
        else:
            x = load_as(addr, i, mask, 4, ALIGNED).to(tl.float64)
        bounds = tl.load(rec + _K_BPTR).to(tl.pointer_type(tl.float64))
        count = tl.load(rec + _K_BCOUNT)
        right = tl.load(rec + _K_RIGHT) != 0
        lo = bucket_of(bounds, x, count, right, tl.load(rec + _K_STEPS))
        return tl.where(x != x, count, lo)

    @triton.jit
    def _row_tile(
        rec, rows_ptr, s, tile, batch, base, count, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
    ):
        # Entries row_offsets[s * B + b] for this tile's b; b == B (last segment only) gets
        # base + count, the total N.
        b = tile * BLOCK + tl.arange(0, BLOCK)
        mask = b < tl.load(rec + _K_NROWS)
        in_batch = b < batch
        ro_addr = tl.load(rec + _K_ROFF)
        v = base + b  # no row_offsets: one item per row
        if ro_addr != 0:
            ro = ro_addr.to(tl.pointer_type(tl.int64))
            if ALIGNED:
                ro = tl.multiple_of(ro, 16)
            v = base + (tl.load(ro + b, mask=mask & in_batch, other=0) - tl.load(ro))
        v = tl.where(in_batch, v, base + count)
        tl.store(rows_ptr + s * batch + b, v, mask=mask)

    @triton.jit
    def _string_tile(rec, vals_ptr, tile, base, count, SBLOCK: tl.constexpr):
        i = tile * SBLOCK + tl.arange(0, SBLOCK)
        active = i < count
        addr = tl.load(rec + _K_ITEMS)
        so = tl.load(rec + _K_SOFF).to(tl.pointer_type(tl.int64))
        starts = tl.load(so + i, mask=active, other=0)
        ends = tl.load(so + i + 1, mask=active, other=0)
        seed_u = tl.load(rec + _K_SEED).to(tl.uint64, bitcast=True)
        items = addr.to(tl.pointer_type(tl.uint8))
        h = tl_xxh64_bytes(items, addr & 7, starts, ends - starts, seed_u, active, SBLOCK)
        tl.store(vals_ptr + base + i, h.to(tl.int64, bitcast=True), mask=active)

    @triton.jit
    def _item_tile(
        rec, vals_ptr, tile, base, count, kind, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tile * BLOCK + tl.arange(0, BLOCK)
        mask = i < count
        addr = tl.load(rec + _K_ITEMS)
        code = tl.load(rec + _K_DTYPE)
        x = tl.zeros([BLOCK], dtype=tl.int64)
        if kind == 0:
            x = _load_ids(addr, i, mask, code, ALIGNED, BLOCK)
        else:
            x = _bucketize(addr, i, mask, code, rec, ALIGNED, BLOCK)
        tl.store(vals_ptr + base + i, x, mask=mask)

    @triton.jit(do_not_specialize=["n_segments", "rec0", "batch"])
    def _gather_kernel(
        table_ptr,
        vals_ptr,
        rows_ptr,
        n_segments,
        rec0,
        batch,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        SBLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_seg = n_segments.to(tl.int64)
        # Work items: value tiles of segments 0..F-1, then row tiles of segments 0..F-1.
        w = last_le(table_ptr, pid, pid * 0, 2 * n_seg)
        tile = pid - tl.load(table_ptr + w)
        is_rows = w >= n_seg
        s = tl.where(is_rows, w - n_seg, w)
        rec = table_ptr + rec0 + s * _K_NF
        base = tl.load(rec + _K_BASE)
        count = tl.load(rec + _K_COUNT)
        # Every branch is uniform per program: one work item, one kind per tile.
        if is_rows:
            _row_tile(rec, rows_ptr, s, tile, batch.to(tl.int64), base, count, ALIGNED, BLOCK)
        else:
            kind = tl.load(rec + _K_KIND)
            if kind == 2:
                _string_tile(rec, vals_ptr, tile, base, count, SBLOCK)
            else:
                _item_tile(rec, vals_ptr, tile, base, count, kind, ALIGNED, BLOCK)


class _StaticTable(NamedTuple):
    """The per-segment table fields that do not change from batch to batch."""

    kinds: list[int]
    template: list[int]  # the records with their static fields filled in
    bound_byte_offsets: list[int]  # where each segment's boundary slice starts, in bytes
    tile_items: list[int]  # items per value tile


def _static_table(
    kinds: Sequence[int],
    seeds: Sequence[int],
    starts: Sequence[int],
    counts: Sequence[int],
    rights: Sequence[int],
) -> _StaticTable:
    kinds = [int(k) for k in kinds]
    template = [0] * (len(kinds) * _NF)
    template[_F_KIND::_NF] = kinds
    template[_F_SEED::_NF] = [as_int64(x) for x in seeds]  # uint64 seed's bit pattern
    template[_F_BCOUNT::_NF] = [int(c) for c in counts]
    template[_F_RIGHT::_NF] = [int(r) for r in rights]
    template[_F_STEPS::_NF] = [int(c).bit_length() for c in counts]
    block = [_SBLOCK if k == SEG_STRING else _BLOCK for k in kinds]
    return _StaticTable(kinds, template, [8 * int(x) for x in starts], block)


def _plan_launch(
    static: _StaticTable,
    boundaries: torch.Tensor | None,
    items: Sequence[torch.Tensor],
    row_offsets: Sequence[torch.Tensor | None],
    string_offsets: Sequence[torch.Tensor | None],
    bsz: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the table from pointers and host-known sizes (no torch op per segment), launch.

    ``items`` must be contiguous and of :data:`CONCAT_DTYPES`; the caller checked the rest.
    """
    f = len(static.kinds)
    dev = items[0].device
    try:
        codes = [CONCAT_DTYPES[t.dtype] for t in items]
    except KeyError:
        bad = next(t.dtype for t in items if t.dtype not in CONCAT_DTYPES)
        raise TypeError(f"{_OP}: items of dtype {bad} are not supported") from None
    counts = [
        t.shape[0] if so is None else so.shape[0] - 1
        for t, so in zip(items, string_offsets, strict=True)
    ]
    rows = torch.empty(f * bsz + 1, dtype=torch.int64, device=dev)
    spare = rows.data_ptr()  # empty inputs point here: never read, but a real address
    ptrs = [t.data_ptr() if c else spare for t, c in zip(items, counts, strict=True)]
    ro_ptrs = [0 if r is None else r.data_ptr() for r in row_offsets]
    rec = static.template.copy()
    rec[_F_DTYPE::_NF] = codes
    rec[_F_ITEMS::_NF] = ptrs
    rec[_F_SOFF::_NF] = [0 if x is None else x.data_ptr() for x in string_offsets]
    rec[_F_ROFF::_NF] = ro_ptrs
    ends = list(itertools.accumulate(counts))
    rec[_F_BASE::_NF] = [e - c for e, c in zip(ends, counts, strict=True)]
    rec[_F_COUNT::_NF] = counts
    if boundaries is not None:
        b0 = boundaries.data_ptr()
        rec[_F_BPTR::_NF] = [b0 + x for x in static.bound_byte_offsets]
    rec[_F_NROWS::_NF] = [bsz] * f
    rec[(f - 1) * _NF + _F_NROWS] = bsz + 1  # the last segment also writes N
    # Work items: value tiles of segments 0..F-1, then row tiles of segments 0..F-1.
    work = [-(-c // b) for c, b in zip(counts, static.tile_items, strict=True)]
    work += [-(-bsz // _BLOCK)] * (f - 1) + [-(-(bsz + 1) // _BLOCK)]
    rec0 = -(-(2 * f + 1) // _NF) * _NF
    tiles = list(itertools.accumulate(work, initial=0))
    table = array.array("q", tiles)
    table.extend([0] * (rec0 - len(tiles)))
    table.extend(rec)
    # Strings are read word by word whatever their alignment; ids, floats and offsets are
    # vector-loaded only when every pointer is 16-byte aligned.
    read = (p for p, k in zip(ptrs, static.kinds, strict=True) if k != SEG_STRING)
    bits = functools.reduce(operator.or_, read, functools.reduce(operator.or_, ro_ptrs, 0))
    values = _launch(table, rows, f, rec0, tiles[-1], ends[-1], bsz, bits & 15 == 0)
    # ``items`` kept every input referenced until the launch was queued.
    return values, rows


def gather_inputs(
    segments: Sequence[InputSegment],
    batch_size: int,
    boundaries: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    check_offsets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather segments of raw columns into one key-major jagged int64 buffer.

    Args:
        segments: one :class:`InputSegment` per feature node, all on one device.
        batch_size: ``B``, the rows of every segment.
        boundaries: float64 ``[M]``, the boundary lists ``SEG_FLOAT`` segments slice (each
            slice non-empty, strictly increasing, no NaN anywhere; checked once per tensor
            version, so a reused table costs no device sync after the first call).
        device: the output device when there are no segments (default CPU); otherwise it
            must be the segments' device.
        check_offsets: also check every ``row_offsets`` (non-decreasing, spanning exactly the
            segment's items) and ``string_offsets`` (non-decreasing within the bytes), with
            one host sync for all segments. Unchecked bad offsets give wrong rows or hashes
            of bytes outside a string's row; item counts always come from the host.

    Returns:
        ``(values, row_offsets)``: int64 ``[N]`` (``N`` = the sum of the segments' item
        counts) and int64 ``[len(segments) * B + 1]``; row ``s * B + b`` is
        ``values[row_offsets[s * B + b]:row_offsets[s * B + b + 1]]``.

    On the Triton path this is one kernel launch whatever the number of segments, plus one
    pinned, asynchronous host-to-device copy of the table; no device sync. With no segments
    nothing is launched and ``([], [0])`` comes back. Non-contiguous inputs are copied first.

    Examples:
        >>> import torch
        >>> ids = InputSegment(SEG_IDS, torch.tensor([7, 8, 9], dtype=torch.int32),
        ...                    row_offsets=torch.tensor([0, 2, 3]))
        >>> fl = InputSegment(SEG_FLOAT, torch.tensor([0.5, 3.0]), bound_count=2)
        >>> v, ro = gather_inputs([ids, fl], 2, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> v.tolist(), ro.tolist()
        ([7, 8, 9, 0, 2], [0, 2, 3, 4, 5])
    """
    segs, bsz, dev = _validate(segments, batch_size, boundaries, device)
    if not segs:
        return _empty_result(dev)
    if check_offsets:
        _check_offsets(segs)
    first = segs[0].items
    if not kernels.use_triton(first, op=_OP):
        kernels.record_launch("gather_inputs_reference")
        return _reference(segs, bsz, boundaries, dev)
    static = _static_table(
        [g.kind for g in segs],
        [g.seed for g in segs],
        [g.bound_start for g in segs],
        [g.bound_count for g in segs],
        [g.right for g in segs],
    )
    return _plan_launch(
        static,
        boundaries,
        [g.items for g in segs],
        [g.row_offsets for g in segs],
        [g.string_offsets for g in segs],
        bsz,
    )


def _launch(
    table: array.array,
    rows: torch.Tensor,
    f: int,
    rec0: int,
    n_tiles: int,
    n: int,
    bsz: int,
    aligned: bool,
) -> torch.Tensor:
    """Upload the table and launch the gather; returns the (queued) values."""
    dev = rows.device
    values = torch.empty(n, dtype=torch.int64, device=dev)
    host = torch.frombuffer(table, dtype=torch.int64)
    # From pinned memory the upload is asynchronous; the caching host allocator keeps the
    # pinned block alive until the copy has run.
    pinned = dev.type == "cuda"
    table_dev = (host.pin_memory() if pinned else host).to(dev, non_blocking=pinned)
    kernels.record_launch(_OP)
    _gather_kernel[(n_tiles,)](
        table_dev,
        values if n else rows,
        rows,
        f,
        rec0,
        bsz,
        ALIGNED=aligned,
        BLOCK=_BLOCK,
        SBLOCK=_SBLOCK,
        num_warps=_NUM_WARPS,
    )
    return values


class GatherPlan:
    """:func:`gather_inputs` for a fixed list of segment kinds and parameters, checked once.

    A training loop calls the same gather every step with new tensors of the same kinds.
    The plan checks the static part (kinds, seeds, boundary slices) once and keeps the
    kernel table's static fields; per call it only reads each tensor's pointer, length and
    dtype and fills the table with a few vectorized numpy steps, so hundreds of segments
    cost tens of microseconds on the host.

    Args:
        kinds: one ``SEG_*`` kind per segment.
        seeds: ``SEG_STRING`` seeds in ``[0, 2**64)`` (default 0 each).
        bound_starts: ``SEG_FLOAT`` segments' first boundary index.
        bound_counts: ``SEG_FLOAT`` segments' number of boundaries.
        rights: ``SEG_FLOAT`` segments' ``torch.bucketize`` ``right`` flags.
        boundaries: float64 ``[M]`` table the slices index (kept by the plan).

    Calling ``plan(items, row_offsets, string_offsets, batch_size)`` takes per segment its
    items tensor, its row offsets (or ``None``) and its string offsets (or ``None``), with
    the meaning of :class:`InputSegment`. The tensors are trusted to match the kinds and
    each other (the caller checks them; the Feature Engine checks every column against its
    schema); dtypes outside a kind's list are rejected. Off the Triton path it runs the
    checked :func:`gather_inputs` reference.

    Examples:
        >>> import torch
        >>> plan = GatherPlan([SEG_IDS, SEG_FLOAT], bound_counts=[0, 2],
        ...                   boundaries=torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> v, ro = plan([torch.tensor([7, 8]), torch.tensor([0.5, 3.0])], [None, None],
        ...              [None, None], 2)
        >>> v.tolist(), ro.tolist()
        ([7, 8, 0, 2], [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        kinds: Sequence[int],
        *,
        seeds: Sequence[int] | None = None,
        bound_starts: Sequence[int] | None = None,
        bound_counts: Sequence[int] | None = None,
        rights: Sequence[bool] | None = None,
        boundaries: torch.Tensor | None = None,
    ) -> None:
        f = len(kinds)
        seeds = list(seeds) if seeds is not None else [0] * f
        starts = list(bound_starts) if bound_starts is not None else [0] * f
        counts = list(bound_counts) if bound_counts is not None else [0] * f
        rights = list(rights) if rights is not None else [False] * f
        if not len(seeds) == len(starts) == len(counts) == len(rights) == f:
            raise ValueError("GatherPlan: every per-segment list needs one entry per kind")
        # One checked dummy segment per kind validates the static fields the same way.
        self.segments = [
            InputSegment(
                kind,
                torch.empty(0, dtype=_ITEM_DTYPES[kind][0] if kind in (0, 1, 2) else None),
                row_offsets=torch.zeros(1, dtype=torch.int64),
                string_offsets=torch.zeros(1, dtype=torch.int64) if kind == SEG_STRING else None,
                seed=seeds[s],
                bound_start=starts[s],
                bound_count=counts[s],
                right=rights[s],
            )
            for s, kind in enumerate(kinds)
        ]
        if f:
            _validate(self.segments, 0, boundaries.cpu() if boundaries is not None else None, None)
        self.boundaries = boundaries
        self.kinds = [int(k) for k in kinds]
        self._static = _static_table(kinds, seeds, starts, counts, rights)

    def __call__(
        self,
        items: Sequence[torch.Tensor],
        row_offsets: Sequence[torch.Tensor | None],
        string_offsets: Sequence[torch.Tensor | None],
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = len(self.kinds)
        if not len(items) == len(row_offsets) == len(string_offsets) == f:
            raise ValueError(f"GatherPlan: the plan has {f} segments, got {len(items)} tensors")
        if not f or not kernels.use_triton(items[0], op=_OP):
            segments = [
                InputSegment(
                    g.kind,
                    t,
                    row_offsets=ro,
                    string_offsets=so,
                    seed=g.seed,
                    bound_start=g.bound_start,
                    bound_count=g.bound_count,
                    right=g.right,
                )
                for g, t, ro, so in zip(
                    self.segments, items, row_offsets, string_offsets, strict=True
                )
            ]
            return gather_inputs(segments, batch_size, self.boundaries)
        items = [t if t.is_contiguous() else t.contiguous() for t in items]
        return _plan_launch(
            self._static, self.boundaries, items, row_offsets, string_offsets, batch_size
        )
