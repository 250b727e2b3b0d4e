"""recstack.columnio.plan: rank shares, unit segments and the keyed permutations."""

from __future__ import annotations

import pytest
import torch

from recstack.columnio.plan import (
    Segment,
    UnitRef,
    epoch_units,
    permutation,
    rank_rows,
    seed_key,
    segments,
    window_order,
)


@pytest.mark.parametrize(("total", "world"), [(0, 3), (10, 3), (7, 7), (5, 8)])
def test_rank_rows_tile_the_rows_within_one_of_each_other(total: int, world: int) -> None:
    ranges = [rank_rows(total, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_segments_cut_units_at_the_range() -> None:
    units = [UnitRef(0, 0, 4), UnitRef(0, 1, 0), UnitRef(1, 0, 6)]
    assert segments(units, 2, 7) == [Segment(0, 0, 2, 4), Segment(1, 0, 0, 3)]
    assert segments(units, 0, 0) == []
    assert [s.rows for s in segments(units, 0, 10)] == [4, 6]


def test_seed_key_is_a_fixed_signed_64_bit_function() -> None:
    key = seed_key(1, 2, 3)
    assert key == seed_key(1, 2, 3) and -(2**63) <= key < 2**63
    assert len({seed_key(0, e) for e in range(100)}) == 100
    assert seed_key(1, 2) != seed_key(2, 1)


def test_permutations_are_deterministic_permutations() -> None:
    for n in (0, 1, 2, 37):
        p = permutation(n, 5, 6)
        assert sorted(p.tolist()) == list(range(n)) and p.dtype == torch.int64
        assert torch.equal(p, permutation(n, 5, 6))
    assert not torch.equal(permutation(50, 5, 6), permutation(50, 5, 7))
    assert not torch.equal(window_order(50, 0, 0, 0, 0), window_order(50, 0, 0, 1, 0))


def test_epoch_units_drop_empty_units_and_shuffle_per_epoch() -> None:
    units = [UnitRef(0, i, i % 3) for i in range(30)]
    live = [u for u in units if u.rows]
    assert epoch_units(units, shuffle=False, seed=0, epoch=0) == live
    first = epoch_units(units, shuffle=True, seed=0, epoch=0)
    assert sorted(first, key=lambda u: u.unit) == live and first != live
    assert first != epoch_units(units, shuffle=True, seed=0, epoch=1)
