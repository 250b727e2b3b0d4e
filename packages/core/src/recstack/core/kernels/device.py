"""Device-side (``@triton.jit``) helpers shared by the kernels of every RecStack package.

Kernels in core, the feature engine and the embedding engine build on the same few device
functions; they live here, documented, so no package reaches into another's private names.
Triton inlines every call, so a helper costs nothing over writing its lines in place.
Host-side launch arithmetic (block sizes, warps, int64 constants) is in
:mod:`recstack.core.kernels.host`.

* 64-bit hashing steps (``tl_rotl64``, the XXH64 ``tl_xxh64_*`` rounds and avalanche) on
  uint64 values, from the xxHash specification
  (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md). The whole hashes built
  from them are :mod:`recstack.core.kernels.hash`'s ``tl_xxh64_u64``, ``tl_xxh64_bytes``
  and ``tl_fmix64``.
* Row tables (:class:`~recstack.core.paged.PagedTensor` pages): ``tl_float_ptr`` and
  ``tl_row_pointers`` find a row through a page table; ``tl_to_table_dtype`` rounds fp32 to
  a table's dtype. A table's element type travels as a *kind*: :data:`TABLE_KINDS`.
* Segmented sums: ``tl_segmented_add`` is the combine function of a segmented inclusive
  scan (``tl.associative_scan`` over ``(value, is_segment_start)`` pairs).
"""

from __future__ import annotations

import torch

from recstack.core.kernels import HAS_TRITON

__all__ = [
    "KIND_BF16",
    "KIND_FP16",
    "KIND_FP32",
    "PRIME64_1",
    "PRIME64_2",
    "PRIME64_3",
    "PRIME64_4",
    "PRIME64_5",
    "TABLE_KINDS",
    "tl_float_ptr",
    "tl_rotl64",
    "tl_row_pointers",
    "tl_segmented_add",
    "tl_to_table_dtype",
    "tl_xxh64_avalanche",
    "tl_xxh64_merge",
    "tl_xxh64_round",
    "tl_xxh64_round0",
    "tl_xxh64_step1",
    "tl_xxh64_step4",
    "tl_xxh64_step8",
]

# XXH64 primes, from the xxHash specification.
PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME64_4 = 0x85EBCA77C2B2AE63
PRIME64_5 = 0x27D4EB2F165667C5

#: Table element kinds, as kernels take them (a constexpr): fp32, bf16, fp16.
KIND_FP32, KIND_BF16, KIND_FP16 = 0, 1, 2
#: The kind of each table dtype (a table of another dtype has no kernel).
TABLE_KINDS: dict[torch.dtype, int] = {
    torch.float32: KIND_FP32,
    torch.bfloat16: KIND_BF16,
    torch.float16: KIND_FP16,
}

# Without Triton every ``tl_*`` helper is None (only torch references run then).
tl_rotl64 = tl_xxh64_round = tl_xxh64_round0 = tl_xxh64_merge = None
tl_xxh64_step8 = tl_xxh64_step4 = tl_xxh64_step1 = tl_xxh64_avalanche = None
tl_float_ptr = tl_row_pointers = tl_to_table_dtype = tl_segmented_add = None

if HAS_TRITON:
    import triton
    import triton.language as tl

    _P1 = tl.constexpr(PRIME64_1)
    _P2 = tl.constexpr(PRIME64_2)
    _P3 = tl.constexpr(PRIME64_3)
    _P4 = tl.constexpr(PRIME64_4)
    _P5 = tl.constexpr(PRIME64_5)
    _FP32 = tl.constexpr(KIND_FP32)
    _BF16 = tl.constexpr(KIND_BF16)

    @triton.jit  # type: ignore[no-redef]
    def tl_rotl64(x, r: tl.constexpr):
        """Rotate the uint64 ``x`` left by ``r`` bits (``0 < r < 64``)."""
        return (x << r) | (x >> (64 - r))

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_round(acc, lane):
        """XXH64's round: ``rotl(acc + lane * P2, 31) * P1`` (uint64)."""
        return tl_rotl64(acc + lane * _P2, 31) * _P1

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_round0(lane):
        """XXH64's round of a zero accumulator: ``rotl(lane * P2, 31) * P1`` (uint64)."""
        return tl_rotl64(lane * _P2, 31) * _P1

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_merge(acc, lane_acc):
        """XXH64's merge of one stripe accumulator into ``acc`` (uint64)."""
        return (acc ^ tl_xxh64_round0(lane_acc)) * _P1 + _P4

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_step8(acc, lane):
        """XXH64's step over one trailing 8-byte ``lane`` (a uint64, little-endian)."""
        return tl_rotl64(acc ^ tl_xxh64_round0(lane), 27) * _P1 + _P4

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_step4(acc, lane):
        """XXH64's step over one trailing 4-byte ``lane`` (a uint64 below ``2**32``)."""
        return tl_rotl64(acc ^ (lane * _P1), 23) * _P2 + _P3

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_step1(acc, byte):
        """XXH64's step over one trailing ``byte`` (a uint64 below 256)."""
        return tl_rotl64(acc ^ (byte * _P5), 11) * _P1

    @triton.jit  # type: ignore[no-redef]
    def tl_xxh64_avalanche(h):
        """XXH64's final avalanche of the accumulator ``h`` (uint64): the hash."""
        h = h ^ (h >> 33)
        h = h * _P2
        h = h ^ (h >> 29)
        h = h * _P3
        return h ^ (h >> 32)

    @triton.jit  # type: ignore[no-redef]
    def tl_float_ptr(addr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
        """int64 address(es) as pointers to the table kind ``KIND`` (:data:`TABLE_KINDS`).

        With ``ALIGNED`` (the launcher sets it only when true) the pointers carry a 16-byte
        alignment hint, so row loads vectorize: addresses loaded from memory carry none. The
        hint goes on the typed pointer (one on the int64 does not survive the cast) and
        inside this helper (Triton 3.6 drops a hint put on a jitted helper's result).
        """
        if KIND == _FP32:
            p = addr.to(tl.pointer_type(tl.float32))
        elif KIND == _BF16:
            p = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            p = addr.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit  # type: ignore[no-redef]
    def tl_row_pointers(
        page_table_ptr,
        rows,
        row_ok,
        page_shift,
        page_mask,
        dim,
        KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        """Pointers to the first element of each of ``rows`` (int64) of a paged table.

        Row ``r`` lives in page ``r >> page_shift`` (the page table ``page_table_ptr`` holds
        each page's data pointer as an int64) at row ``r & page_mask`` of it; each row is
        ``dim`` elements of kind ``KIND``. Rows where ``row_ok`` is False read no page entry
        (their pointer is meaningless). ``ALIGNED``: every page is 16-byte aligned (see
        :func:`tl_float_ptr`).
        """
        addr = tl.load(page_table_ptr + (rows >> page_shift), mask=row_ok, other=0)
        base = tl_float_ptr(addr, KIND, ALIGNED)
        return base + (rows & page_mask) * dim

    @triton.jit  # type: ignore[no-redef]
    def tl_to_table_dtype(x, KIND: tl.constexpr):
        """``x`` rounded to the table kind ``KIND``, to nearest even.

        fp32 -> bf16 rounds on the bits: Triton's interpreter truncates on
        ``.to(tl.bfloat16)``, and this keeps GPU, interpreter and torch's
        ``.to(torch.bfloat16)`` bit-identical (a NaN stays a NaN).
        """
        if KIND == _FP32:
            y = x.to(tl.float32)
        elif KIND == _BF16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(tl.float32).to(tl.float16)
        return y

    @triton.jit  # type: ignore[no-redef]
    def tl_segmented_add(v1, f1, v2, f2):
        """Combine function of a segmented sum scan over ``(value, is_start)`` pairs.

        ``(v2, f2)`` follows ``(v1, f1)``: a segment start at ``v2`` drops everything
        before it. Scanned inclusively, the last entry of each segment holds its sum.
        """
        return tl.where(f2 != 0, v2, v1 + v2), f1 | f2
