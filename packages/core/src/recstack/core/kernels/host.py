"""Host-side launch arithmetic shared by every package's kernel launchers.

Tile shapes, warp counts and the int64 form of 64-bit constants are computed on the host
before a launch; each package used to carry its own copy of these few lines. Device-side
(``@triton.jit``) helpers live in :mod:`recstack.core.kernels.device`.
"""

from __future__ import annotations

__all__ = ["as_int64", "next_pow2", "prev_pow2", "warps_for_rows"]

_MASK64 = (1 << 64) - 1


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (``1`` for ``x <= 1``): a block size covering ``x``.

    Examples:
        >>> next_pow2(0), next_pow2(1), next_pow2(5), next_pow2(64)
        (1, 1, 8, 64)
    """
    return 1 << max(0, int(x) - 1).bit_length()


def prev_pow2(x: int) -> int:
    """The largest power of two ``<= x`` (``1`` for ``x <= 1``): a block size fitting in ``x``.

    Examples:
        >>> prev_pow2(0), prev_pow2(1), prev_pow2(5), prev_pow2(64)
        (1, 1, 4, 64)
    """
    return 1 << (max(1, int(x)).bit_length() - 1)


def as_int64(v: int) -> int:
    """The int64 whose two's complement bit pattern is ``v mod 2**64``.

    Kernels take 64-bit unsigned constants (hash primes, seeds) as int64 arguments, since
    Triton and torch type an int argument by its range and have no uint64 tensors
    everywhere.

    Examples:
        >>> as_int64(2**64 - 1), as_int64(2**63), as_int64(5)
        (-1, -9223372036854775808, 5)
    """
    v = int(v) & _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def warps_for_rows(block_rows: int, *, rows_per_warp: int, default: int, most: int = 8) -> int:
    """Warps for a tile of ``block_rows`` rows: ``default``, raised to one warp per
    ``rows_per_warp`` rows, at most ``most``.

    A warp that scans more rows than the register file holds spills (the sm_90 compile check
    reports it); each kernel states the rows a warp can take without spilling.

    Examples:
        >>> warps_for_rows(256, rows_per_warp=128, default=4), warps_for_rows(
        ...     4096, rows_per_warp=128, default=4
        ... )
        (4, 8)
    """
    return min(most, max(default, block_rows // rows_per_warp))
