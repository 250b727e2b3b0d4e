"""XXH64 and fmix64 kernels: Triton kernels, vectorized torch references and launchers.

Three ops, each bit-exact with its published definition:

* ``xxh64_int``: XXH64 (xxHash64, https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
  of each int64 id's 8 little-endian bytes, with a seed;
* ``xxh64_bytes``: XXH64 of each row of a uint8 jagged buffer (strings as bytes), with a seed;
* ``fmix64``: MurmurHash3's 64-bit finalizer.

``shard_owner`` fuses ``xxh64_int`` with the multiply-high rank mapping used by
:mod:`recstack.core.sharding`, so routing ids costs one launch.

Values are uint64 bit patterns carried in int64 tensors (torch has no uint64 arithmetic on
every supported version). In the torch references, add and multiply wrap modulo 2**64 exactly
as unsigned arithmetic does, and logical right shift is an arithmetic shift followed by a mask.
The Triton kernels bitcast to uint64 and work unsigned. ``tl_xxh64_u64``, ``tl_xxh64_bytes``
and ``tl_fmix64`` are ``@triton.jit`` device functions other kernels (hash tables, fused
feature gathers) call so they hash identically; the XXH64 steps they are built from are in
:mod:`recstack.core.kernels.device`. :func:`lshr64`, :func:`xxh64_step8` and
:func:`xxh64_avalanche` are those steps' torch forms, for other packages' references.
"""

from __future__ import annotations

import operator

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.device import PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME64_5
from recstack.core.kernels.host import as_int64

__all__ = [
    "PRIME64_1",
    "PRIME64_2",
    "PRIME64_3",
    "PRIME64_4",
    "PRIME64_5",
    "FMIX64_C1",
    "FMIX64_C2",
    "MAX_WORLD_SIZE",
    "check_seed",
    "check_world_size",
    "fmix64",
    "fmix64_reference",
    "lshr64",
    "shard_owner",
    "shard_owner_reference",
    "xxh64_bytes",
    "xxh64_avalanche",
    "xxh64_bytes_reference",
    "xxh64_int",
    "xxh64_int_reference",
    "xxh64_step8",
]

_MASK64 = (1 << 64) - 1

# MurmurHash3 fmix64 multipliers.
FMIX64_C1 = 0xFF51AFD7ED558CCD
FMIX64_C2 = 0xC4CEB9FE1A85EC53

# World sizes are multiplied by a 32-bit hash slice in int64: keep the product below 2**63.
MAX_WORLD_SIZE = 2**31 - 1

_INT_BLOCK = 1024
_BYTES_BLOCK = 128
_BYTES_WARPS = 4

_S_P1 = as_int64(PRIME64_1)
_S_P2 = as_int64(PRIME64_2)
_S_P3 = as_int64(PRIME64_3)
_S_P4 = as_int64(PRIME64_4)
_S_P5 = as_int64(PRIME64_5)
_S_C1 = as_int64(FMIX64_C1)
_S_C2 = as_int64(FMIX64_C2)


def check_seed(seed: object, name: str = "seed") -> int:
    """Validate a hash seed (an int in ``[0, 2**64)``) and return it as a Python int."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__}")
    value = operator.index(seed)
    if not 0 <= value <= _MASK64:
        raise ValueError(f"{name} must be in [0, 2**64 - 1], got {value}")
    return value


def _check_int64(x: object, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {x.dtype}")
    return x


def check_world_size(world_size: object, op: str) -> int:
    """Validate a world size (an int in ``[1, MAX_WORLD_SIZE]``) given to ``op``."""
    return check_int(world_size, f"{op}: world_size", minimum=1, maximum=MAX_WORLD_SIZE)


# ----------------------------------------------------------------------------------------
# torch references (int64 tensors holding uint64 bit patterns)
# ----------------------------------------------------------------------------------------


def lshr64(x: torch.Tensor, r: int) -> torch.Tensor:
    """Logical right shift by ``r`` (``0 < r < 64``) of int64 tensors holding uint64 bits.

    torch's ``>>`` on int64 is arithmetic; masking off the sign-extended bits makes it
    logical.
    """
    return (x >> r) & ((1 << (64 - r)) - 1)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return (x << r) | lshr64(x, 64 - r)


def _round(acc: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    return _rotl(acc + lane * _S_P2, 31) * _S_P1


def _round0(lane: torch.Tensor) -> torch.Tensor:
    return _rotl(lane * _S_P2, 31) * _S_P1


def _merge(acc: torch.Tensor, lane_acc: torch.Tensor) -> torch.Tensor:
    return (acc ^ _round0(lane_acc)) * _S_P1 + _S_P4


def xxh64_avalanche(h: torch.Tensor) -> torch.Tensor:
    """XXH64's final avalanche of accumulators ``h`` (int64 tensors of uint64 bits)."""
    h = h ^ lshr64(h, 33)
    h = h * _S_P2
    h = h ^ lshr64(h, 29)
    h = h * _S_P3
    return h ^ lshr64(h, 32)


def xxh64_step8(acc: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """XXH64's step of accumulators ``acc`` over one trailing 8-byte ``lane`` each (int64
    tensors of uint64 bits; a lane is the 8 little-endian bytes of an int64)."""
    return _rotl(acc ^ _round0(lane), 27) * _S_P1 + _S_P4


def _step4(acc: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    return _rotl(acc ^ (lane * _S_P1), 23) * _S_P2 + _S_P3


def _step1(acc: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
    return _rotl(acc ^ (byte * _S_P5), 11) * _S_P1


def xxh64_int_reference(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """XXH64 of each int64's 8 little-endian bytes (torch reference, any device)."""
    seed = check_seed(seed)
    # An 8-byte input takes the short path: acc = seed + PRIME64_5 + len, one 8-byte lane.
    acc0 = as_int64(seed + PRIME64_5 + 8)
    return xxh64_avalanche(xxh64_step8(torch.full_like(x, acc0), x))


def fmix64_reference(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 fmix64 of each int64's bit pattern (torch reference, any device)."""
    k = x ^ lshr64(x, 33)
    k = k * _S_C1
    k = k ^ lshr64(k, 33)
    k = k * _S_C2
    return k ^ lshr64(k, 33)


def _rank_of(h: torch.Tensor, world_size: int) -> torch.Tensor:
    # Multiply-high on the top 32 bits: floor(hi32 * world / 2**32), no division, no low bits.
    return (lshr64(h, 32) * world_size) >> 32


def shard_owner_reference(x: torch.Tensor, seed: int, world_size: int) -> torch.Tensor:
    """Owner rank of each id: multiply-high of ``xxh64_int(x, seed)``'s top 32 bits."""
    return _rank_of(xxh64_int_reference(x, seed), world_size)


def _read_le(
    values: torch.Tensor, pos: torch.Tensor, nbytes: int, active: torch.Tensor
) -> torch.Tensor:
    """Little-endian unsigned word of ``nbytes`` bytes at ``pos`` per row; 0 where inactive."""
    shifts = torch.arange(0, 8 * nbytes, 8, device=pos.device, dtype=torch.int64)
    idx = pos[:, None] + torch.arange(nbytes, device=pos.device, dtype=torch.int64)
    idx = torch.where(active[:, None], idx, 0)
    b = torch.where(active[:, None], values[idx].to(torch.int64), 0)
    # Bytes occupy disjoint bits, so the wrapping sum is their OR.
    return (b << shifts).sum(dim=1)


def xxh64_bytes_reference(
    values: torch.Tensor, offsets: torch.Tensor, seed: int = 0, seeds: torch.Tensor | None = None
) -> torch.Tensor:
    """XXH64 of each row ``values[offsets[i]:offsets[i+1]]`` (torch reference, any device).

    Vectorized over rows: the only Python loop is over the 32-byte stripe index, and each
    stripe step touches only the rows still that long (rows are visited longest first, so
    the rows active at stripe ``s`` are a prefix), which keeps the work proportional to the
    bytes hashed even when one row is far longer than the rest.
    """
    seed = check_seed(seed)
    dev = offsets.device
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    n = lens.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if values.numel() == 0:
        values = torch.zeros(1, dtype=torch.uint8, device=dev)

    nstripes = lens // 32
    if seeds is None:
        acc = torch.full((n,), as_int64(seed + PRIME64_5), dtype=torch.int64, device=dev)
    else:
        acc = seeds + as_int64(PRIME64_5)  # int64 adds wrap like uint64 ones
    max_stripes = int(nstripes.max())
    if max_stripes > 0:
        order = torch.argsort(nstripes, descending=True)
        o_starts = starts[order]
        # active[s] = number of rows with more than s stripes (one host sync for all of them).
        hist = torch.bincount(nstripes, minlength=max_stripes + 1)
        active_counts = (hist.flip(0).cumsum(0).flip(0)[1:]).tolist()
        n_long = active_counts[0]
        if seeds is None:
            init = (
                PRIME64_1 + PRIME64_2 + seed,
                PRIME64_2 + seed,
                seed,
                seed - PRIME64_1,
            )
            accs = [torch.full((n_long,), as_int64(v), dtype=torch.int64, device=dev) for v in init]
        else:
            long_seeds = seeds[order[:n_long]]
            accs = [
                long_seeds + as_int64((PRIME64_1 + PRIME64_2) & _MASK64),
                long_seeds + as_int64(PRIME64_2),
                long_seeds.clone(),
                long_seeds + as_int64((-PRIME64_1) & _MASK64),
            ]
        all_on = torch.ones(n_long, dtype=torch.bool, device=dev)
        for s in range(max_stripes):
            m = active_counts[s]
            base = o_starts[:m] + 32 * s
            for j in range(4):
                lane = _read_le(values, base + 8 * j, 8, all_on[:m])
                accs[j][:m] = _round(accs[j][:m], lane)
        a1, a2, a3, a4 = accs
        conv = _rotl(a1, 1) + _rotl(a2, 7) + _rotl(a3, 12) + _rotl(a4, 18)
        for a in accs:
            conv = _merge(conv, a)
        acc[order[:n_long]] = conv

    acc = acc + lens
    tail = starts + nstripes * 32
    rem = lens - nstripes * 32
    for j in range(3):
        on = rem >= 8 * (j + 1)
        acc = torch.where(on, xxh64_step8(acc, _read_le(values, tail + 8 * j, 8, on)), acc)
    pos = tail + (rem // 8) * 8
    rem = rem % 8
    on = rem >= 4
    acc = torch.where(on, _step4(acc, _read_le(values, pos, 4, on)), acc)
    pos = pos + torch.where(on, 4, 0)
    rem = rem % 4
    for k in range(3):
        on = rem > k
        acc = torch.where(on, _step1(acc, _read_le(values, pos + k, 1, on)), acc)
    return xxh64_avalanche(acc)


# ----------------------------------------------------------------------------------------
# Triton kernels (uint64 arithmetic)
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import (
        tl_rotl64,
        tl_xxh64_avalanche,
        tl_xxh64_merge,
        tl_xxh64_round,
        tl_xxh64_step1,
        tl_xxh64_step4,
        tl_xxh64_step8,
    )

    _P2 = tl.constexpr(PRIME64_2)
    _P5 = tl.constexpr(PRIME64_5)
    _P5_8 = tl.constexpr((PRIME64_5 + 8) & _MASK64)
    _P1_P2 = tl.constexpr((PRIME64_1 + PRIME64_2) & _MASK64)
    _NEG_P1 = tl.constexpr((-PRIME64_1) & _MASK64)
    _C1 = tl.constexpr(FMIX64_C1)
    _C2 = tl.constexpr(FMIX64_C2)

    @triton.jit
    def tl_xxh64_u64(x, seed):
        """XXH64 of a uint64's 8 little-endian bytes; ``x`` and ``seed`` uint64."""
        return tl_xxh64_avalanche(tl_xxh64_step8(seed + _P5_8, x))

    @triton.jit
    def tl_fmix64(k):
        """MurmurHash3 fmix64 of a uint64."""
        k = k ^ (k >> 33)
        k = k * _C1
        k = k ^ (k >> 33)
        k = k * _C2
        return k ^ (k >> 33)

    @triton.jit(do_not_specialize=["seed", "world_size"])
    def _xxh64_int_kernel(
        x_ptr, out_ptr, n, seed, world_size, OWNER: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        seed_u = seed.to(tl.int64).to(tl.uint64, bitcast=True)
        h = tl_xxh64_u64(x, seed_u)
        if OWNER:
            # hi32 < 2**32 and world_size < 2**31: the product fits, no division needed.
            out = ((h >> 32) * world_size.to(tl.uint64)) >> 32
            tl.store(out_ptr + offs, out.to(tl.int64, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, h.to(tl.int64, bitcast=True), mask=mask)

    @triton.jit(do_not_specialize=["n"])
    def _fmix64_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        tl.store(out_ptr + offs, tl_fmix64(x).to(tl.int64, bitcast=True), mask=mask)

    @triton.jit
    def _tl_word_at(words_ptr, pos, active):
        # The aligned 8-byte word holding byte ``pos``. Every byte read is inside the row, so
        # its aligned word lies inside the allocation (torch's allocators and Arrow buffers
        # are aligned and padded past whole words), even when a row starts or ends mid-word.
        return tl.load(words_ptr + (pos >> 3), mask=active, other=0)

    @triton.jit
    def _tl_join(lo, hi, misalign):
        # Little-endian bytes [misalign, misalign + 8) of the 16-byte pair (lo, hi).
        sh = (misalign * 8).to(tl.uint64)
        return tl.where(misalign == 0, lo, (lo >> sh) | (hi << (64 - sh)))

    @triton.jit
    def _tl_read_u64(words_ptr, pos, active):
        # Strings are unaligned: two aligned word loads and a funnel shift, the second load
        # only when the 8 bytes straddle a word boundary.
        misalign = pos & 7
        lo = _tl_word_at(words_ptr, pos, active)
        hi = _tl_word_at(words_ptr, pos + 8, active & (misalign != 0))
        return _tl_join(lo, hi, misalign)

    @triton.jit
    def _tl_read_u32(words_ptr, pos, active):
        misalign = pos & 7
        lo = _tl_word_at(words_ptr, pos, active)
        hi = _tl_word_at(words_ptr, pos + 8, active & (misalign > 4))
        return _tl_join(lo, hi, misalign) & 0xFFFFFFFF

    @triton.jit
    def tl_xxh64_bytes(values_ptr, misalign, starts, lens, seed_u, active, BLOCK: tl.constexpr):
        """XXH64 of ``BLOCK`` byte strings ``values[starts[i]:starts[i] + lens[i]]`` -> uint64.

        Args:
            values_ptr: ``uint8`` pointer the byte positions are relative to.
            misalign: the address of ``values_ptr`` modulo 8 (scalar).
            starts, lens: int64 ``[BLOCK]`` byte positions and lengths (garbage where inactive).
            seed_u: uint64 seed, a scalar or one per row.
            active: bool ``[BLOCK]``; inactive rows read nothing and hash as empty strings.

        Every byte read lies inside an active row, so callers need no padding of their own.
        """
        lens = tl.where(active, lens, 0)
        starts = tl.where(active, starts, 0)
        nstripes = lens // 32
        # Word reads address bytes from the 8-byte aligned address just below values_ptr.
        words_ptr = (values_ptr - misalign).to(tl.pointer_type(tl.uint64))
        wstarts = starts + misalign
        zero = tl.zeros([BLOCK], dtype=tl.uint64)
        a1 = zero + (seed_u + _P1_P2)
        a2 = zero + (seed_u + _P2)
        a3 = zero + seed_u
        a4 = zero + (seed_u + _NEG_P1)
        mis = wstarts & 7
        # Every lane walks to the block's longest string; shorter ones are masked off. A
        # 32-byte stripe spans five aligned words (four when aligned): load each once.
        for s in range(0, tl.max(nstripes, axis=0)):
            on = nstripes > s
            base = wstarts + s * 32
            w0 = _tl_word_at(words_ptr, base, on)
            w1 = _tl_word_at(words_ptr, base + 8, on)
            w2 = _tl_word_at(words_ptr, base + 16, on)
            w3 = _tl_word_at(words_ptr, base + 24, on)
            w4 = _tl_word_at(words_ptr, base + 32, on & (mis != 0))
            a1 = tl.where(on, tl_xxh64_round(a1, _tl_join(w0, w1, mis)), a1)
            a2 = tl.where(on, tl_xxh64_round(a2, _tl_join(w1, w2, mis)), a2)
            a3 = tl.where(on, tl_xxh64_round(a3, _tl_join(w2, w3, mis)), a3)
            a4 = tl.where(on, tl_xxh64_round(a4, _tl_join(w3, w4, mis)), a4)
        conv = tl_rotl64(a1, 1) + tl_rotl64(a2, 7) + tl_rotl64(a3, 12) + tl_rotl64(a4, 18)
        conv = tl_xxh64_merge(conv, a1)
        conv = tl_xxh64_merge(conv, a2)
        conv = tl_xxh64_merge(conv, a3)
        conv = tl_xxh64_merge(conv, a4)
        acc = tl.where(nstripes > 0, conv, zero + (seed_u + _P5))
        acc = acc + lens.to(tl.uint64, bitcast=True)

        tail = wstarts + nstripes * 32
        rem = lens - nstripes * 32
        for j in tl.static_range(3):
            on = rem >= 8 * (j + 1)
            lane = _tl_read_u64(words_ptr, tail + 8 * j, on)
            acc = tl.where(on, tl_xxh64_step8(acc, lane), acc)
        pos = tail + (rem // 8) * 8
        rem = rem % 8
        on4 = rem >= 4
        lane4 = _tl_read_u32(words_ptr, pos, on4)
        acc = tl.where(on4, tl_xxh64_step4(acc, lane4), acc)
        pos = pos + tl.where(on4, 4, 0) - misalign
        rem = rem % 4
        for k in tl.static_range(3):
            on1 = rem > k
            byte = tl.load(values_ptr + pos + k, mask=on1, other=0).to(tl.uint64)
            acc = tl.where(on1, tl_xxh64_step1(acc, byte), acc)
        return tl_xxh64_avalanche(acc)

    @triton.jit(do_not_specialize=["seed", "misalign"])
    def _xxh64_bytes_kernel(
        values_ptr,
        offsets_ptr,
        out_ptr,
        n,
        seed,
        misalign,
        seeds_ptr,
        BLOCK: tl.constexpr,
        PER_ROW: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_batch = rows < n
        starts = tl.load(offsets_ptr + rows, mask=in_batch, other=0)
        ends = tl.load(offsets_ptr + rows + 1, mask=in_batch, other=0)
        if PER_ROW:
            seed_u = tl.load(seeds_ptr + rows, mask=in_batch, other=0).to(tl.uint64, bitcast=True)
        else:
            seed_u = seed.to(tl.int64).to(tl.uint64, bitcast=True)
        h = tl_xxh64_bytes(values_ptr, misalign, starts, ends - starts, seed_u, in_batch, BLOCK)
        tl.store(out_ptr + rows, h.to(tl.int64, bitcast=True), mask=in_batch)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _launch_int(x: torch.Tensor, seed: int, world_size: int, owner: bool) -> torch.Tensor:
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        kernels.record_launch("shard_owner" if owner else "xxh64_int")
        grid = (triton.cdiv(n, _INT_BLOCK),)
        _xxh64_int_kernel[grid](
            flat, out, n, as_int64(seed), world_size, OWNER=owner, BLOCK=_INT_BLOCK, num_warps=4
        )
    return out.view(x.shape)


def xxh64_int(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """XXH64 of each int64 id's 8 little-endian bytes, as int64 (the uint64 bit pattern).

    Examples:
        >>> import torch, xxhash
        >>> h = xxh64_int(torch.tensor([42]), seed=7)
        >>> h.item() & (2**64 - 1) == xxhash.xxh64_intdigest((42).to_bytes(8, "little"), 7)
        True
    """
    x = _check_int64(x, "x", "xxh64_int")
    seed = check_seed(seed)
    if not kernels.use_triton(x, op="xxh64_int"):
        kernels.record_launch("xxh64_int_reference")
        return xxh64_int_reference(x, seed)
    return _launch_int(x, seed, 1, owner=False)


def shard_owner(x: torch.Tensor, seed: int, world_size: int) -> torch.Tensor:
    """Owner rank in ``[0, world_size)`` of each int64 id (see :mod:`recstack.core.sharding`)."""
    x = _check_int64(x, "keys", "shard_owner")
    seed = check_seed(seed)
    world_size = check_world_size(world_size, "shard_owner")
    if not kernels.use_triton(x, op="shard_owner"):
        kernels.record_launch("shard_owner_reference")
        return shard_owner_reference(x, seed, world_size)
    return _launch_int(x, seed, world_size, owner=True)


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 fmix64 of each int64's bit pattern, as int64.

    Examples:
        >>> import torch
        >>> fmix64(torch.tensor([0])).item()  # fmix64 fixes zero
        0
    """
    x = _check_int64(x, "x", "fmix64")
    if not kernels.use_triton(x, op="fmix64"):
        kernels.record_launch("fmix64_reference")
        return fmix64_reference(x)
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        kernels.record_launch("fmix64")
        _fmix64_kernel[(triton.cdiv(n, _INT_BLOCK),)](flat, out, n, BLOCK=_INT_BLOCK, num_warps=4)
    return out.view(x.shape)


def _check_bytes_layout(
    values: torch.Tensor, offsets: torch.Tensor, op: str, check_offsets: bool
) -> None:
    if not isinstance(values, torch.Tensor) or not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{op}: values and offsets must be torch.Tensors")
    if values.dtype != torch.uint8:
        raise TypeError(
            f"{op}: string values must be uint8 bytes (UTF-8), got {values.dtype}; "
            "to hash integer ids of a jagged feature, hash its .values tensor"
        )
    if values.dim() != 1:
        raise ValueError(f"{op}: values must be 1-D, got shape {tuple(values.shape)}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{op}: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(
            f"{op}: offsets must be 1-D with B + 1 entries, got {tuple(offsets.shape)}"
        )
    if values.device != offsets.device:
        raise ValueError(
            f"{op}: values ({values.device}) and offsets ({offsets.device}) "
            "are on different devices"
        )
    if not check_offsets:
        return
    if offsets.numel() == 1:
        bad = bool(offsets[0] < 0) or bool(offsets[0] > values.numel())
    else:
        diffs = offsets[1:] - offsets[:-1]
        # One host sync for all three checks.
        bad = bool(((offsets[0] < 0) | (offsets[-1] > values.numel()) | (diffs < 0).any()).item())
    if bad:
        raise ValueError(
            f"{op}: offsets must be non-decreasing within [0, {values.numel()}] "
            f"(values has {values.numel()} bytes); got first={int(offsets[0])}, "
            f"last={int(offsets[-1])}"
        )


def xxh64_bytes(
    values: torch.Tensor,
    offsets: torch.Tensor,
    seed: int = 0,
    *,
    check_offsets: bool = True,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """XXH64 of each row ``values[offsets[i]:offsets[i+1]]`` of a uint8 buffer -> int64 [B].

    ``seeds`` (int64 ``[B]``, each the bit pattern of a uint64 seed) gives every row its
    own seed, in the same single launch; ``seed`` is then unused.

    Examples:
        >>> import torch, xxhash
        >>> v = torch.tensor(list(b"abcde"), dtype=torch.uint8)
        >>> h = xxh64_bytes(v, torch.tensor([0, 2, 5]))
        >>> h[1].item() & (2**64 - 1) == xxhash.xxh64_intdigest(b"cde")
        True
    """
    _check_bytes_layout(values, offsets, "xxh64_bytes", check_offsets)
    seed = check_seed(seed)
    values = values.contiguous()
    offsets = offsets.contiguous()
    if seeds is not None:
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
            raise TypeError("xxh64_bytes: seeds must be an int64 tensor (uint64 bit patterns)")
        if seeds.shape != (offsets.numel() - 1,) or seeds.device != offsets.device:
            raise ValueError(
                f"xxh64_bytes: seeds must be [B] = [{offsets.numel() - 1}] on {offsets.device}, "
                f"got {tuple(seeds.shape)} on {seeds.device}"
            )
        seeds = seeds.contiguous()
    if not kernels.use_triton(values, offsets, op="xxh64_bytes"):
        kernels.record_launch("xxh64_bytes_reference")
        return xxh64_bytes_reference(values, offsets, seed, seeds)
    n = offsets.numel() - 1
    out = torch.empty(n, dtype=torch.int64, device=offsets.device)
    if n:
        kernels.record_launch("xxh64_bytes")
        if values.numel() == 0:
            # Every row is empty and no byte is read, but the kernel still needs a real buffer.
            values = torch.zeros(1, dtype=torch.uint8, device=offsets.device)
        grid = (triton.cdiv(n, _BYTES_BLOCK),)
        _xxh64_bytes_kernel[grid](
            values,
            offsets,
            out,
            n,
            as_int64(seed),
            values.data_ptr() % 8,
            seeds if seeds is not None else out,
            BLOCK=_BYTES_BLOCK,
            PER_ROW=seeds is not None,
            num_warps=_BYTES_WARPS,
        )
    return out
