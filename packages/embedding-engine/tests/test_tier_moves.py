"""The tiered table's bookkeeping kernels against their torch references: slots, counts,
stamps, and the promotion plan (claims, ranks, sampled-LRU victims, map rewrites)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels
from recstack.embedding_engine.kernels.tier_moves import (
    plan_promotion,
    plan_promotion_reference,
    tier_slots,
)


def tier_state(device, rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Maps of ``rows`` logical rows shuffled over the slots, with random scores, stamps
    and old claims."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randperm(rows, generator=g)
    owner = torch.empty_like(loc)
    owner[loc] = torch.arange(rows)
    return {
        "loc": loc.to(device),
        "owner": owner.to(device),
        "hold": torch.randint(-1, 3 << 32, (rows,), generator=g).to(device),
        "stamp": torch.randint(-1, 12, (rows,), generator=g).to(device),
        "score": torch.randint(0, 5, (rows,), generator=g).to(device),  # ties on purpose
        "counts": torch.zeros(3, dtype=torch.int64, device=device),
    }


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def wanted(device, rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randint(-1, rows, (n,), generator=g)  # repeats and -1 entries
    return x.to(device)


@pytest.mark.parametrize(
    ("rows", "n", "r", "k", "group"),
    [(50, 0, 10, 2, 4), (50, 1, 10, 2, 4), (300, 257, 64, 16, 4), (300, 700, 40, 40, 1),
     (1000, 333, 200, 20, 9), (40, 64, 8, 8, 1)],
)  # fmt: skip
def test_plan_promotion_matches_its_reference(device, rows, n, r, k, group):
    for seed in range(3):
        state = tier_state(device, rows, seed)
        want = wanted(device, rows, n, seed)
        kw = dict(device_rows=r, keep_from=9, token=3, hand=(seed * 37) % r, k=k, group=group)
        ref_state = clone(state)
        ref = plan_promotion_reference(want, **ref_state, **kw)
        with kernels.use_backend("auto"):
            got = plan_promotion(want, **state, **kw)
        for name in state:
            assert torch.equal(state[name], ref_state[name]), name
        assert torch.equal(got.victims, ref.victims)
        assert torch.equal(got.slots, ref.slots)
        assert int(got.host_rows) == int(ref.host_rows)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_plan_promotion_moves_free_host_rows_into_free_gpu_slots(device, backend):
    rows, r, k, group = 400, 100, 20, 4
    state = tier_state(device, rows, 7)
    before = clone(state)
    want = wanted(device, rows, 90, 7)
    with kernels.use_backend(backend):
        plan = plan_promotion(
            want, **state, device_rows=r, keep_from=9, token=3, hand=95, k=k, group=group
        )
    loc, owner, stamp = state["loc"].cpu(), state["owner"].cpu(), before["stamp"].cpu()
    # The maps stay inverse permutations.
    assert torch.equal(owner[loc], torch.arange(rows))
    wanted_rows = {int(x) for x in want.cpu() if x >= 0}
    old_loc = before["loc"].cpu()
    first_seen = list(dict.fromkeys(int(x) for x in want.cpu() if x >= 0))  # rank order
    host = [x for x in first_seen if old_loc[x] >= r and stamp[old_loc[x]] < 9]
    assert int(plan.host_rows) == len(host)
    victims, slots = plan.victims.cpu(), plan.slots.cpu()
    moved = victims >= 0
    assert torch.equal(moved, slots >= 0)
    assert int(moved.sum()) == int(state["counts"][2]) > 0
    assert len(set(victims[moved].tolist())) == int(moved.sum())
    old_owner = before["owner"].cpu()
    claimed = {int(old_loc[x]) for x in wanted_rows}
    for victim, slot in zip(victims[moved].tolist(), slots[moved].tolist(), strict=True):
        assert victim < r <= slot
        # The victim was neither wanted now nor in flight; the promoted row now sits there.
        assert victim not in claimed and stamp[victim] < 9
        promoted, demoted = int(old_owner[slot]), int(old_owner[victim])
        assert promoted in wanted_rows and loc[promoted] == victim and loc[demoted] == slot
    # Ranked rows past k stayed in host memory.
    assert all(loc[x] >= r for x in host[k:])
    # Every wanted slot is claimed by this promotion.
    hold = state["hold"].cpu()
    assert all(hold[int(loc[x])] >= 3 << 32 for x in wanted_rows if loc[x] >= r)


def test_plan_promotion_prefers_the_oldest_free_candidate(device):
    rows, r = 20, 8
    state = tier_state(device, rows, 1)
    state["loc"] = torch.arange(rows, device=device)
    state["owner"] = torch.arange(rows, device=device)
    state["hold"].fill_(-1)
    state["stamp"].fill_(-1)
    state["stamp"][1] = 5  # in flight: never a victim
    state["score"] = torch.tensor([9, 0, 7, 3, 9, 9, 9, 9] + [0] * 12, device=device)
    want = torch.tensor([12, 12, 0], device=device)  # row 0 is wanted: its slot stays
    plan = plan_promotion(want, **state, device_rows=r, keep_from=5, token=1, hand=0, k=2, group=4)
    # Rank 0 (row 12) looks at slots 0..3: 0 is wanted, 1 in flight, 3 scores lowest.
    assert plan.victims.tolist() == [3, -1] and plan.slots.tolist() == [12, -1]
    assert int(state["loc"][12]) == 3 and int(state["loc"][3]) == 12
    assert int(plan.host_rows) == 1


def test_plan_promotion_rejects_groups_past_the_tier(device):
    state = tier_state(device, 10, 0)
    with pytest.raises(ValueError, match="must fit the GPU tier"):
        plan_promotion(
            torch.arange(3, device=device), **state, device_rows=4, keep_from=0, token=1,
            hand=0, k=2, group=3,
        )  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 5, 1500])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_tier_slots_counts_and_stamps(device, backend, n):
    rows = 2000
    state = tier_state(device, rows, n)
    want = torch.unique(wanted(device, rows, n, n))
    ref_state = clone(state)
    with kernels.use_backend("torch"):
        ref = tier_slots(
            want, ref_state["loc"], device_rows=700, counts=ref_state["counts"],
            stamp=ref_state["stamp"], stamp_value=31,
        )  # fmt: skip
    with kernels.use_backend(backend):
        got = tier_slots(
            want, state["loc"], device_rows=700, counts=state["counts"], stamp=state["stamp"],
            stamp_value=31,
        )  # fmt: skip
        plain = tier_slots(want, state["loc"], device_rows=700)
    assert torch.equal(got, ref) and torch.equal(plain, ref)
    assert torch.equal(state["counts"], ref_state["counts"])
    assert torch.equal(state["stamp"], ref_state["stamp"])
    valid = want >= 0
    expect = torch.where(valid, state["loc"][want.clamp(min=0)], -1)
    assert torch.equal(got, expect)
    assert state["counts"][:2].tolist() == [int(valid.sum()), int((valid & (expect < 700)).sum())]
    assert bool((state["stamp"][expect[valid]] == 31).all())
