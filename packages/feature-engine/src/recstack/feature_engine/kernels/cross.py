"""Feature cross: the hashed Cartesian product of 2 to 4 sparse features, row by row.

Input is the feature engine's working buffer: ``F`` sparse features over a batch of ``B``
rows, key-major (row ``r = f * B + b`` of feature ``f`` is
``values[row_offsets[r]:row_offsets[r + 1]]``). Cross ``c`` names 2 to 4 distinct features
(``components[c]``, unused slots ``-1`` last) and a seed. Its output row ``b`` has one item
per combination of its component rows' items, the last component varying fastest; an empty
component row gives an empty output row. Each item is a fold of a two-word XXH64::

    h = XXH64(LE(v0) || LE(v1), seed);  h = XXH64(LE(h) || LE(v_j), seed) for j >= 2

where ``LE`` is the 8 little-endian bytes of an int64 and XXH64 is the published function
(https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) on exactly 16 bytes.
Hashes are uint64 bit patterns carried in int64 tensors, like :mod:`recstack.core`'s.

Launch plan (Triton path): output row lengths (gather each component row's length, product
over components) and their offsets are a few vectorized torch ops; one host sync reads the
total item count together with the input checks; then one kernel over the output items.
Each program finds the output rows of its tile's first and last items with two scalar
binary searches over the output offsets, and each item then searches only that narrow
range, splits its local index over the component lengths and hashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import (
    PRIME64_1,
    PRIME64_4,
    PRIME64_5,
    xxh64_avalanche,
    xxh64_step8,
)
from recstack.core.kernels.host import as_int64
from recstack.feature_engine.kernels.host import check_tensor

__all__ = [
    "MAX_CROSS_COMPONENTS",
    "CrossTables",
    "cross",
    "cross_checked",
    "cross_reference",
    "cross_tables",
    "xxh64_pair_reference",
]

#: A cross combines at most this many features (the width of ``components``).
MAX_CROSS_COMPONENTS = 4

_MASK64 = (1 << 64) - 1
_BLOCK = 512
_LEN_BLOCK = 1024  # output rows per program of the lengths kernel
_NUM_WARPS = 4
# Total output items must stay well inside int64 (offsets, allocation sizes).
_MAX_ITEMS = 1 << 62
# Items per step of the torch reference (bounds its temporaries; see cross_reference).
_REF_CHUNK_CPU = 1 << 18
_REF_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------


def _pair_hash(a: torch.Tensor, b: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    # XXH64 short-input path for 16 bytes: acc = seed + PRIME64_5 + 16, two 8-byte lanes.
    acc = seed + as_int64(PRIME64_5 + 16)
    return xxh64_avalanche(xxh64_step8(xxh64_step8(acc, a), b))


def xxh64_pair_reference(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    """XXH64 of the 16 bytes ``LE(a) || LE(b)`` per element, with ``seed`` (torch, any device).

    ``a`` and ``b`` are int64 tensors of one shape (broadcasting allowed; other integer
    dtypes are widened to int64 first, as ``Tensor.to`` does); ``seed`` is an int
    in ``[-2**63, 2**64)`` taken modulo ``2**64``. Returns the uint64 hashes' bit patterns
    as int64.

    Examples:
        >>> import struct, torch, xxhash
        >>> h = xxh64_pair_reference(torch.tensor([1]), torch.tensor([2]), seed=7)
        >>> h.item() & (2**64 - 1) == xxhash.xxh64_intdigest(struct.pack("<QQ", 1, 2), 7)
        True
    """
    for name, t in (("a", a), ("b", b)):
        integer = isinstance(t, torch.Tensor) and not (
            t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool
        )
        if not integer:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"xxh64_pair_reference: {name} must be an integer tensor, got {got}")
    # Narrower integer ids hash as their int64 value (sign- or zero-extended, like .to()).
    a, b = a.to(torch.int64), b.to(torch.int64)
    if a.device != b.device:
        raise ValueError(f"xxh64_pair_reference: a is on {a.device} but b is on {b.device}")
    value = check_int(seed, "xxh64_pair_reference: seed", minimum=-(1 << 63), maximum=_MASK64)
    return _pair_hash(a, b, as_int64(value))


def _empty_plan(dev: torch.device, n_crosses: int) -> tuple:
    """The plan of crosses without output rows (no crosses, or ``B == 0``)."""
    lengths = torch.zeros(0, dtype=torch.int64, device=dev)
    return lengths, torch.zeros(1, dtype=torch.int64, device=dev), 0, [0] * n_crosses


def _too_many_items() -> ValueError:
    return ValueError(f"cross: the crosses would produce 2**62 or more items (limit {_MAX_ITEMS})")


def _plan(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    components: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """Output row lengths ``[C*B]``, output offsets ``[C*B + 1]``, the item total and the
    items of each cross.

    One host sync reads the totals together with the checks that need the device: offsets
    inside ``values`` and non-decreasing, and a total that fits.
    """
    dev = values.device
    n_crosses = components.shape[0]
    n_out = n_crosses * batch_size
    if n_out == 0:
        return _empty_plan(dev, n_crosses)
    row_len = row_offsets[1:] - row_offsets[:-1]
    used = components >= 0
    comp_len = row_len.view(-1, batch_size)[components.clamp(min=0)]  # [C, slots, B]
    comp_len = torch.where(used[:, :, None], comp_len, 1)
    out_len = comp_len.prod(dim=1).view(-1)
    out_off = torch.zeros(n_out + 1, dtype=torch.int64, device=dev)
    torch.cumsum(out_len, 0, out=out_off[1:])
    bad_offsets = (row_offsets[0] < 0) | (row_offsets[-1] > values.numel()) | (row_len < 0).any()
    # Products and sums in float64 cannot wrap, so they tell an overflowed int64 total.
    too_many = comp_len.double().prod(dim=1).sum() >= _MAX_ITEMS
    flags = torch.cat(
        [
            torch.stack([out_off[-1], bad_offsets.to(torch.int64), too_many.to(torch.int64)]),
            out_off[batch_size::batch_size] - out_off[:-1:batch_size],
        ]
    )
    total, bad, overflow, *per_cross = flags.tolist()
    if bad:
        raise ValueError(
            f"cross: row_offsets must be non-decreasing within [0, {values.numel()}] "
            f"(values has {values.numel()} items); got first={int(row_offsets[0])}, "
            f"last={int(row_offsets[-1])}"
        )
    if overflow:
        raise _too_many_items()
    return out_len, out_off, int(total), per_cross


def _plan_trusted(
    row_offsets: torch.Tensor, batch_size: int, components: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """:func:`_plan` for offsets the caller built (Triton path): one lengths kernel, one
    cumsum, one host sync for the total, the per-cross totals and the overflow flags."""
    dev = row_offsets.device
    n_crosses = components.shape[0]
    n_out = n_crosses * batch_size
    if n_out == 0:
        return _empty_plan(dev, n_crosses)
    n_blocks = triton.cdiv(n_out, _LEN_BLOCK)
    lengths = torch.empty(n_out + n_blocks, dtype=torch.int64, device=dev)
    out_off = torch.empty(n_out + n_blocks + 1, dtype=torch.int64, device=dev)
    kernels.record_launch("cross_lengths")
    _cross_lengths_kernel[(n_blocks,)](
        row_offsets,
        components,
        lengths,
        out_off,
        n_out,
        batch_size,
        float(_MAX_ITEMS // n_out),
        BLOCK=_LEN_BLOCK,
        num_warps=_NUM_WARPS,
    )
    # The flags after the lengths share the cumsum: their count is the last entry's excess.
    torch.cumsum(lengths, 0, out=out_off[1:])
    per_cross = out_off[batch_size : n_out + 1 : batch_size] - out_off[:n_out:batch_size]
    total, end, *counts = torch.cat([out_off[n_out : n_out + 1], out_off[-1:], per_cross]).tolist()
    if end != total:
        raise _too_many_items()
    return lengths[:n_out], out_off[: n_out + 1], total, counts


def cross_reference(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    components: torch.Tensor,
    seeds: torch.Tensor,
    *,
    max_components: int = MAX_CROSS_COMPONENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`cross` on validated inputs (all on ``values``' device).

    Vectorized over items; the Python loops are over the component slots and over chunks
    of items: the hash fold needs a dozen item-sized temporaries, and chunks keep them
    cache-sized on the CPU instead of allocating (and page-faulting) a dozen buffers of the
    whole output. ``max_components`` (the most used slots of any cross) lets it skip slots
    no cross uses.
    """
    dev = values.device
    out_len, out_off, total, _ = _plan(values, row_offsets, batch_size, components)
    out = torch.empty(total, dtype=torch.int64, device=dev)
    if total == 0:
        return out, out_len
    nslots = min(max_components, components.shape[1])
    comps = components[:, :nslots]
    used = comps >= 0
    feat = comps.clamp(min=0)
    starts = row_offsets[:-1].view(-1, batch_size)
    lens = (row_offsets[1:] - row_offsets[:-1]).view(-1, batch_size)
    # Per output row r = c*B + b and slot j: the component row's start and length.
    row_start = starts[feat].permute(0, 2, 1).reshape(-1, nslots)
    row_len = torch.where(used[:, None, :], lens[feat].permute(0, 2, 1), 1).reshape(-1, nslots)
    chunk = _REF_CHUNK_CPU if dev.type == "cpu" else _REF_CHUNK
    for lo in range(0, total, chunk):
        item = torch.arange(lo, min(lo + chunk, total), device=dev)
        # The output row of each item: the last row starting at or before it (empty rows
        # share their start with the next row, so they are never picked).
        row = torch.searchsorted(out_off, item, right=True) - 1
        local = item - out_off[row]
        cross_id = torch.div(row, batch_size, rounding_mode="floor")
        item_used = used[cross_id]
        picked: list[torch.Tensor] = [local] * nslots
        for j in reversed(range(nslots)):  # the last component varies fastest
            length = row_len[row, j]
            pos = row_start[row, j] + local % length
            local = local // length
            # Unused slots point at feature 0's row, which may be empty: read item 0 instead.
            picked[j] = values[torch.where(item_used[:, j], pos, 0)]
        seed = seeds[cross_id]
        h = _pair_hash(picked[0], picked[1], seed)
        for j in range(2, nslots):
            h = torch.where(item_used[:, j], _pair_hash(h, picked[j], seed), h)
        out[lo : lo + chunk] = h
    return out, out_len


# ----------------------------------------------------------------------------------------
# Triton kernel (uint64 arithmetic)
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_rotl64, tl_xxh64_avalanche, tl_xxh64_round0
    from recstack.feature_engine.kernels.device import last_le

    _P1 = tl.constexpr(PRIME64_1)
    _P4 = tl.constexpr(PRIME64_4)
    _P5_16 = tl.constexpr((PRIME64_5 + 16) & _MASK64)

    @triton.jit
    def tl_xxh64_u64x2(a, b, seed):
        """XXH64 of the 16 bytes ``LE(a) || LE(b)``; ``a``, ``b`` and ``seed`` uint64."""
        acc = seed + _P5_16
        acc = tl_rotl64(acc ^ tl_xxh64_round0(a), 27) * _P1 + _P4
        acc = tl_rotl64(acc ^ tl_xxh64_round0(b), 27) * _P1 + _P4
        return tl_xxh64_avalanche(acc)

    @triton.jit(do_not_specialize=["n_out", "batch_size", "limit"])
    def _cross_lengths_kernel(
        row_offsets_ptr,
        comps_ptr,
        lengths_ptr,
        out_off_ptr,
        n_out,
        batch_size,
        limit,
        BLOCK: tl.constexpr,
    ):
        # Output row r = c*B + b holds the product of cross c's component row lengths at b.
        # A float64 product flags rows past ``limit`` (where the int64 total could wrap).
        pid = tl.program_id(0).to(tl.int64)
        n = n_out.to(tl.int64)
        bs = batch_size.to(tl.int64)
        r = pid * BLOCK + tl.arange(0, BLOCK)
        ok = r < n
        c = r // bs
        b = r - c * bs
        prod = tl.full([BLOCK], 1, dtype=tl.int64)
        prod_f = tl.full([BLOCK], 1.0, dtype=tl.float64)
        for j in tl.static_range(4):
            f = tl.load(comps_ptr + c * 4 + j, mask=ok, other=-1)
            used = ok & (f >= 0)
            rr = tl.where(used, f, 0) * bs + b
            start = tl.load(row_offsets_ptr + rr, mask=used, other=0)
            end = tl.load(row_offsets_ptr + rr + 1, mask=used, other=1)
            length = tl.where(used, end - start, 1)
            prod = prod * length
            prod_f = prod_f * length.to(tl.float64)
        tl.store(lengths_ptr + r, prod, mask=ok)
        tl.store(out_off_ptr + r, tl.zeros([BLOCK], dtype=tl.int64), mask=r == 0)
        flag = tl.max((ok & (prod_f > limit)).to(tl.int64), axis=0)
        tl.store(lengths_ptr + n + pid, flag)

    @triton.jit
    def _component(values_ptr, row_offsets_ptr, comps_ptr, c, b, B, local, J: tl.constexpr):
        """Slot ``J``'s item for each output item, and the index left for the slots before."""
        f = tl.load(comps_ptr + c * 4 + J)
        used = f >= 0
        rr = tl.where(used, f, 0) * B + b
        start = tl.load(row_offsets_ptr + rr)
        length = tl.where(used, tl.load(row_offsets_ptr + rr + 1) - start, 1)
        # An item exists only if every used component row is non-empty, so length > 0.
        v = tl.load(values_ptr + start + local % length, mask=used, other=0)
        return v.to(tl.uint64, bitcast=True), used, local // length

    @triton.jit(do_not_specialize=["total", "n_rows", "batch_size"])
    def _cross_kernel(
        values_ptr,
        row_offsets_ptr,
        comps_ptr,
        seeds_ptr,
        out_offsets_ptr,
        out_ptr,
        total,
        n_rows,
        batch_size,
        NCOMP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        total = total.to(tl.int64)
        nr = n_rows.to(tl.int64)
        B = batch_size.to(tl.int64)
        first = pid * BLOCK
        last = tl.minimum(first + BLOCK, total) - 1
        e = first + tl.arange(0, BLOCK)
        valid = e < total
        e = tl.minimum(e, last)  # tail lanes redo the last item; only valid lanes store
        # Output rows of the tile's first and last items bound every item's row, so the
        # per-item search only spans the rows this tile touches.
        r0 = last_le(out_offsets_ptr, first, first * 0, nr)
        r1 = last_le(out_offsets_ptr, last, r0, nr - r0)
        r = last_le(out_offsets_ptr, e, tl.zeros([BLOCK], dtype=tl.int64) + r0, r1 - r0 + 1)
        c = r // B
        b = r - c * B
        local = e - tl.load(out_offsets_ptr + r)
        seed = tl.load(seeds_ptr + c).to(tl.uint64, bitcast=True)
        # Split the local index over the component lengths, last component fastest.
        if NCOMP > 3:
            v3, u3, local = _component(values_ptr, row_offsets_ptr, comps_ptr, c, b, B, local, 3)
        if NCOMP > 2:
            v2, u2, local = _component(values_ptr, row_offsets_ptr, comps_ptr, c, b, B, local, 2)
        v1, u1, local = _component(values_ptr, row_offsets_ptr, comps_ptr, c, b, B, local, 1)
        v0, u0, local = _component(values_ptr, row_offsets_ptr, comps_ptr, c, b, B, local, 0)
        h = tl_xxh64_u64x2(v0, v1, seed)
        if NCOMP > 2:
            h = tl.where(u2, tl_xxh64_u64x2(h, v2, seed), h)
        if NCOMP > 3:
            h = tl.where(u3, tl_xxh64_u64x2(h, v3, seed), h)
        tl.store(out_ptr + e, h.to(tl.int64, bitcast=True), mask=valid)


# ----------------------------------------------------------------------------------------
# Validation and launcher
# ----------------------------------------------------------------------------------------


def _num_features(row_offsets: torch.Tensor, batch_size: int, num_features: int | None) -> int:
    n_rows = row_offsets.numel() - 1
    if n_rows < 0:
        raise ValueError("cross: row_offsets must have F * B + 1 entries, got an empty tensor")
    if num_features is not None:
        if n_rows != num_features * batch_size:
            raise ValueError(
                f"cross: row_offsets has {n_rows + 1} entries but num_features={num_features} "
                f"and batch_size={batch_size} need F * B + 1 = {num_features * batch_size + 1}"
            )
        return num_features
    if batch_size == 0:
        if n_rows != 0:
            raise ValueError(
                f"cross: batch_size is 0 but row_offsets has {n_rows + 1} entries (expected 1)"
            )
        return -1  # unknown: component indices are then checked for sign only
    if n_rows % batch_size:
        raise ValueError(
            f"cross: row_offsets has {n_rows + 1} entries, which is not F * B + 1 for "
            f"batch_size={batch_size}"
        )
    return n_rows // batch_size


def _check_components(components: torch.Tensor, num_features: int) -> tuple[list[list[int]], int]:
    """Validate each cross's feature list; return it padded to 4 slots, and the most used."""
    width = components.shape[1]
    if not 2 <= width <= MAX_CROSS_COMPONENTS:
        raise ValueError(
            f"cross: components must have shape [C, {MAX_CROSS_COMPONENTS}] (2 to "
            f"{MAX_CROSS_COMPONENTS} columns accepted), got {tuple(components.shape)}"
        )
    rows = components.tolist()  # one host sync when components live on the GPU
    padded: list[list[int]] = []
    most = 2
    for c, slots in enumerate(rows):
        used = [f for f in slots if f != -1]
        n_used = len(used)
        if slots[:n_used] != used:
            raise ValueError(
                f"cross: components[{c}] = {slots}: unused slots (-1) must come after the used ones"
            )
        if n_used < 2:
            raise ValueError(
                f"cross: components[{c}] = {slots} uses {n_used} feature(s); a cross needs "
                f"2 to {MAX_CROSS_COMPONENTS} (unused slots are -1)"
            )
        for f in used:
            if f < 0 or (num_features >= 0 and f >= num_features):
                bound = f"[0, {num_features})" if num_features >= 0 else "[0, F)"
                raise ValueError(
                    f"cross: components[{c}] = {slots} names feature {f}, out of range {bound}"
                )
        if len(set(used)) != n_used:
            dup = next(f for f in used if used.count(f) > 1)
            raise ValueError(
                f"cross: components[{c}] = {slots} crosses feature {dup} with itself; "
                "the features of a cross must be distinct"
            )
        padded.append(used + [-1] * (MAX_CROSS_COMPONENTS - n_used))
        most = max(most, n_used)
    return padded, most


def cross(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    components: torch.Tensor,
    seeds: torch.Tensor,
    *,
    num_features: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed feature crosses of a key-major jagged buffer -> ``(out_values, out_lengths)``.

    Args:
        values: int64 ``[N]``, the items of ``F`` features over ``B`` rows, key-major.
        row_offsets: int64 ``[F * B + 1]``; row ``f * B + b`` is
            ``values[row_offsets[f*B + b] : row_offsets[f*B + b + 1]]``.
        batch_size: ``B >= 0``.
        components: int64 ``[C, 4]`` (2 to 4 columns accepted): cross ``c``'s distinct feature
            indices, unused slots ``-1`` after the used ones. It is validated on the host, so
            keep it on the CPU to avoid a device sync (a copy moves to ``values``' device).
        seeds: int64 ``[C]``, each a uint64 seed's bit pattern (CPU or ``values``' device).
        num_features: ``F``; inferred from ``row_offsets`` when omitted, and needed to check
            component indices' upper bound when ``B == 0`` (then every output is empty).

    Returns:
        ``out_values`` int64 ``[T]`` and ``out_lengths`` int64 ``[C * B]`` key-major
        (``out_lengths[c*B + b]`` = product of cross ``c``'s component row lengths at ``b``).
        Items enumerate the Cartesian product with the last component varying fastest;
        ``h = XXH64(LE(v0)||LE(v1), seed)`` then ``h = XXH64(LE(h)||LE(v_j), seed)``.

    One host sync reads the output size (with the offset checks); the Triton path then runs
    one kernel.

    Examples:
        >>> import torch
        >>> vals = torch.tensor([1, 2, 3, 4, 5])  # F=2, B=1: feature 0 = [1, 2], 1 = [3, 4, 5]
        >>> out, lens = cross(vals, torch.tensor([0, 2, 5]), 1,
        ...                   torch.tensor([[0, 1, -1, -1]]), torch.tensor([0]))
        >>> lens.tolist(), out.shape
        ([6], torch.Size([6]))
    """
    values = check_tensor(values, "values", "cross", (torch.int64,), 1)
    row_offsets = check_tensor(row_offsets, "row_offsets", "cross", (torch.int64,), 1)
    components = check_tensor(components, "components", "cross", (torch.int64,), 2)
    seeds = check_tensor(seeds, "seeds", "cross", (torch.int64,), 1)
    batch_size = check_int(batch_size, "cross: batch_size", minimum=0)
    if num_features is not None:
        num_features = check_int(num_features, "cross: num_features", minimum=0)
    dev = values.device
    if row_offsets.device != dev:
        raise ValueError(f"cross: row_offsets is on {row_offsets.device} but values on {dev}")
    for name, t in (("components", components), ("seeds", seeds)):
        if t.device != dev and t.device.type != "cpu":
            raise ValueError(
                f"cross: {name} is on {t.device}; it must be on the CPU or values' device {dev}"
            )
    if seeds.numel() != components.shape[0]:
        raise ValueError(
            f"cross: seeds has {seeds.numel()} entries but components has "
            f"{components.shape[0]} crosses"
        )
    n_features = _num_features(row_offsets, batch_size, num_features)
    padded, most = _check_components(components, n_features)
    comps = torch.tensor(padded, dtype=torch.int64).view(-1, MAX_CROSS_COMPONENTS).to(dev)
    tables = CrossTables(comps, seeds.to(dev), most, -1)
    out, out_len, _ = _run(values, row_offsets, batch_size, tables, trusted=False)
    return out, out_len


class CrossTables(NamedTuple):
    """Validated cross parameters on the device (see :func:`cross_tables`)."""

    components: torch.Tensor  # int64 [C, 4], unused slots -1
    seeds: torch.Tensor  # int64 [C]
    max_components: int  # the most components any cross uses
    max_index: int  # the largest feature index named


def cross_tables(
    components: Sequence[Sequence[int]], seeds: Sequence[int], device: torch.device
) -> CrossTables:
    """Check a list of crosses once and lay them out on ``device`` for :func:`cross_checked`.

    ``components[c]`` lists cross ``c``'s 2 to 4 feature indices; ``seeds[c]`` is its seed
    (an int in ``[-2**63, 2**64)``, taken modulo ``2**64``). Unlike :func:`cross`, an index
    may repeat: the feature engine computes two identical features once, and a cross of
    the two then reads one buffer twice (the product of a row with itself).
    """
    if len(seeds) != len(components):
        raise ValueError(f"cross: {len(seeds)} seeds for {len(components)} crosses")
    rows = []
    for c, comp in enumerate(components):
        if not 2 <= len(comp) <= MAX_CROSS_COMPONENTS or min(comp) < 0:
            raise ValueError(
                f"cross: components[{c}] = {list(comp)}: a cross needs 2 to "
                f"{MAX_CROSS_COMPONENTS} feature indices >= 0"
            )
        rows.append([*comp, *[-1] * (MAX_CROSS_COMPONENTS - len(comp))])
    most = max((len(comp) for comp in components), default=2)
    seed_t = torch.tensor([as_int64(int(s)) for s in seeds], dtype=torch.int64)
    return CrossTables(
        torch.tensor(rows, dtype=torch.int64, device=device).view(-1, MAX_CROSS_COMPONENTS),
        seed_t.to(device),
        most,
        max((f for comp in components for f in comp), default=-1),
    )


def cross_checked(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    tables: CrossTables,
    num_features: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`cross` with parameters checked once by :func:`cross_tables` (no table upload).

    ``values``/``row_offsets`` are a key-major buffer of ``num_features`` features built by
    the caller; the component indices must be below ``num_features`` (checked on the host).
    Returns :func:`cross`'s two tensors and each cross's number of items (read in the same
    host sync as the total).
    """
    if tables.max_index >= num_features:
        raise ValueError(
            f"cross: a component index ({tables.max_index}) is out of range for "
            f"{num_features} features"
        )
    return _run(values.contiguous(), row_offsets.contiguous(), batch_size, tables, trusted=True)


def _run(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    batch_size: int,
    tables: CrossTables,
    *,
    trusted: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    comps, seeds, most, _ = tables
    dev = values.device
    values = values.contiguous()
    row_offsets = row_offsets.contiguous()
    if not kernels.use_triton(values, row_offsets, op="cross"):
        kernels.record_launch("cross_reference")
        out, out_len = cross_reference(
            values, row_offsets, batch_size, comps, seeds, max_components=most
        )
        n = comps.shape[0]
        per_cross = out_len.view(n, batch_size).sum(1).tolist() if batch_size else [0] * n
        return out, out_len, per_cross
    if trusted:
        out_len, out_off, total, per_cross = _plan_trusted(row_offsets, batch_size, comps)
    else:
        out_len, out_off, total, per_cross = _plan(values, row_offsets, batch_size, comps)
    out = torch.empty(total, dtype=torch.int64, device=dev)
    if total == 0:
        return out, out_len, per_cross
    kernels.record_launch("cross")
    _cross_kernel[(triton.cdiv(total, _BLOCK),)](
        values,
        row_offsets,
        comps,
        seeds.contiguous(),
        out_off,
        out,
        total,
        out_len.numel(),
        batch_size,
        NCOMP=most,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out, out_len, per_cross
