"""Host-side launch arithmetic: powers of two, int64 patterns, warp counts."""

from __future__ import annotations

import pytest

from recstack.core.kernels.host import as_int64, next_pow2, prev_pow2, warps_for_rows


@pytest.mark.parametrize("x", [-3, 0, 1, 2, 3, 4, 5, 7, 8, 9, 1000, 1 << 40, (1 << 40) + 1])
def test_powers_of_two_bracket_x(x: int) -> None:
    up, down = next_pow2(x), prev_pow2(x)
    assert up & (up - 1) == 0 and down & (down - 1) == 0
    if x >= 1:
        assert down <= x <= up and up < 2 * x + 1 and down * 2 > x
    else:
        assert up == down == 1


def test_as_int64_is_the_twos_complement_pattern() -> None:
    for v in [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, 0x9E3779B185EBCA87]:
        s = as_int64(v)
        assert -(2**63) <= s < 2**63
        assert s % 2**64 == v % 2**64


def test_warps_for_rows() -> None:
    assert warps_for_rows(64, rows_per_warp=128, default=4) == 4
    assert warps_for_rows(1024, rows_per_warp=128, default=4) == 8
    assert warps_for_rows(1 << 20, rows_per_warp=128, default=4) == 8
    assert warps_for_rows(1 << 20, rows_per_warp=128, default=4, most=16) == 16
    assert warps_for_rows(0, rows_per_warp=512, default=2) == 2
