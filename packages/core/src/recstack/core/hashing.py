"""The documented 64-bit hashes of RecStack: ``hash64`` (XXH64) and ``mix64`` (fmix64).

Hashed ids are stored in checkpoints, so these functions are part of RecStack's on-disk
contract: they are exactly the published algorithms and will not change across releases.

* ``hash64(x, seed=0)``: XXH64 (xxHash64) with ``seed``. An integer id is hashed as its
  8 little-endian two's complement bytes; a string (a row of a uint8 ``JaggedTensor``) as
  its bytes. For a fixed seed XXH64 of a fixed-length 8-byte input is a bijection on 64 bits,
  so distinct integer ids never collide.
* ``mix64(x)``: MurmurHash3's 64-bit finalizer ``fmix64``, a cheap seedless bijection on
  64 bits that hash tables use to pick slots.

Both return int64 tensors holding the uint64 result's bit pattern (values ``>= 2**63`` read
as negative). See ``docs/core/hashing.md``.
"""

from __future__ import annotations

import torch

from recstack.core.jagged import JaggedTensor
from recstack.core.kernels import hash as _k

__all__ = ["hash64", "mix64"]


def ids_as_int64(x: object, fn: str) -> torch.Tensor:
    """Integer ids as an int64 tensor, keeping each id's value (uint64 keeps its bit pattern)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}: x must be an integer torch.Tensor"
            + (" or a uint8 JaggedTensor of strings" if fn == "hash64" else "")
            + f", got {type(x).__name__}"
        )
    if x.dtype == torch.int64:
        return x
    if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(
            f"{fn}: x must have an integer dtype, got {x.dtype}; hashing floats or bools "
            "as ids is almost always a bug (bucketize or cast them explicitly first)"
        )
    if x.dtype == getattr(torch, "uint64", None):
        # Same 8 bytes, so uint64 v and int64 v - 2**64 hash alike.
        return x.view(torch.int64)
    try:
        return x.to(torch.int64)
    except (RuntimeError, TypeError) as exc:  # e.g. quantized or unusual dtypes
        raise TypeError(f"{fn}: x has unsupported dtype {x.dtype}") from exc


def hash64(
    x: torch.Tensor | JaggedTensor, seed: int = 0, *, check_offsets: bool = True
) -> torch.Tensor:
    """XXH64 of integer ids or of strings, as int64 (the uint64 bit pattern).

    Args:
        x: an integer tensor of ids (any shape, any integer dtype; each id is converted to
            int64 and hashed as its 8 little-endian two's complement bytes), or a
            ``JaggedTensor`` whose ``values`` are uint8 bytes (row ``i`` is one string,
            usually UTF-8) whose rows are hashed as their bytes.
        seed: the XXH64 seed, an int in ``[0, 2**64)``.
        check_offsets: for strings, check that the offsets are non-decreasing and inside
            the byte buffer (one host sync) and raise a clear error otherwise. Pass
            ``False`` only for offsets known valid (e.g. built by RecStack itself): invalid
            offsets then read out of bounds.

    Returns:
        For ids: an int64 tensor of ``x``'s shape on ``x``'s device. For strings: an int64
        tensor ``[B]``. Each value is ``xxhash.xxh64_intdigest(bytes, seed)`` reinterpreted as
        signed int64.

    Raises:
        TypeError: float/bool ids, string values that are not uint8, a non-int seed.
        ValueError: a seed outside ``[0, 2**64)``, malformed offsets.

    Distinct integer ids never collide under one seed: XXH64 of an 8-byte input is a
    bijection on 64-bit values.

    Examples:
        >>> import torch, xxhash
        >>> from recstack.core.hashing import hash64
        >>> h = hash64(torch.tensor([7, -1]), seed=3)
        >>> h[0].item() & (2**64 - 1) == xxhash.xxh64_intdigest((7).to_bytes(8, "little"), 3)
        True
    """
    if isinstance(x, JaggedTensor):
        values, offsets = x.values, x.offsets
        if isinstance(values, torch.Tensor) and values.dtype != torch.uint8:
            raise TypeError(
                f"hash64: a JaggedTensor is hashed as strings and its values must be uint8 "
                f"bytes, got {values.dtype}; to hash the integer ids of a jagged feature, "
                "pass its .values tensor"
            )
        return _k.xxh64_bytes(values, offsets, _k.check_seed(seed), check_offsets=check_offsets)
    ids = ids_as_int64(x, "hash64")
    return _k.xxh64_int(ids, _k.check_seed(seed))


def mix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 ``fmix64`` of each id's 64-bit pattern, as int64.

    ``k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53;
    k ^= k >> 33`` (logical shifts, arithmetic modulo 2**64). A bijection on 64 bits without
    a seed; ``mix64(0) == 0``. Integer dtypes are converted to int64 first.

    Examples:
        >>> import torch
        >>> from recstack.core.hashing import mix64
        >>> mix64(torch.tensor([0, 1])).tolist()[0]
        0
    """
    return _k.fmix64(ids_as_int64(x, "mix64"))
