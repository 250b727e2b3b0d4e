"""owner / ShardSpec: pinned id -> rank mapping, uniformity, routing."""

from __future__ import annotations

import math
import random

import pytest
import torch
import xxhash

from recstack.core.sharding import SHARD_SEED, ShardSpec, owner

# Computed once (from the xxhash package and the documented formula) and frozen: checkpoints
# written by one release must reshard identically in every later one. Never regenerate.
GOLDEN_KEYS = [
    0, 1, 2, 3, 7, 42, 1000, 123456789, 2**31 - 1, 2**31, 2**32, 2**40 + 5, 2**62,
    2**63 - 1, -1, -2, -1000, -(2**31), -(2**63), 9000000000000000001,
]  # fmt: skip
GOLDEN_OWNERS = {
    1: [0] * 20,
    2: [1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1],
    3: [1, 2, 1, 2, 1, 2, 0, 2, 2, 1, 0, 1, 1, 0, 0, 2, 0, 1, 2, 1],
    8: [5, 6, 5, 6, 5, 5, 1, 7, 6, 3, 0, 4, 3, 1, 0, 5, 2, 3, 6, 5],
    1000: [
        659, 767, 644, 808, 626, 733, 175, 892, 796, 414,
        120, 500, 424, 213, 45, 749, 330, 404, 792, 645,
    ],
}  # fmt: skip


def _owner_py(key: int, world_size: int) -> int:
    h = xxhash.xxh64_intdigest(key.to_bytes(8, "little", signed=True), SHARD_SEED)
    return ((h >> 32) * world_size) >> 32


def test_shard_seed_is_the_documented_constant():
    assert SHARD_SEED == 0x72732D7368617264 == int.from_bytes(b"rs-shard", "big")


@pytest.mark.parametrize("world_size", sorted(GOLDEN_OWNERS))
def test_owner_golden(backend, device, world_size):
    keys = torch.tensor(GOLDEN_KEYS, dtype=torch.int64, device=device)
    got = owner(keys, world_size)
    assert got.dtype == torch.int64 and got.device.type == device.type
    assert got.cpu().tolist() == GOLDEN_OWNERS[world_size]


@pytest.mark.parametrize("world_size", [1, 2, 5, 64, 1000, 2**31 - 1])
def test_owner_matches_independent_formula(backend, device, world_size):
    keys = [random.randint(-(2**63), 2**63 - 1) for _ in range(1200)] + [0, -1]
    got = owner(torch.tensor(keys, device=device), world_size).cpu().tolist()
    assert got == [_owner_py(k, world_size) for k in keys]
    assert all(0 <= r < world_size for r in got)


def test_owner_shapes_dtypes_and_empty(backend, device):
    keys = torch.randint(0, 2**31, (4, 6), dtype=torch.int32, device=device)
    got = owner(keys, 7)
    assert got.shape == keys.shape
    assert torch.equal(got, owner(keys.to(torch.int64).flatten(), 7).view(4, 6))
    assert owner(torch.empty(0, dtype=torch.int64, device=device), 3).shape == (0,)


def _chi2(counts: torch.Tensor, n: int) -> float:
    expected = n / counts.numel()
    return float(((counts.double() - expected) ** 2).sum() / expected)


@pytest.mark.parametrize("world_size", [2, 3, 8, 13, 64])
@pytest.mark.parametrize("pattern", ["sequential", "multiples"])
def test_owner_is_uniform(backend, device, world_size, pattern):
    n = 40_000
    ids = torch.arange(n, device=device)
    if pattern == "multiples":  # id % world_size would send every one of these to rank 0
        ids = ids * world_size
    counts = torch.bincount(owner(ids, world_size), minlength=world_size).cpu()
    df = world_size - 1
    # chi2 with df degrees of freedom: mean df, sd sqrt(2 df); allow ~6 sd (inputs are fixed,
    # so this is deterministic, and a biased mapping overshoots by orders of magnitude).
    assert _chi2(counts, n) < df + 6 * math.sqrt(2 * df) + 10
    assert int(counts.min()) > 0


def test_owner_errors(device):
    keys = torch.arange(4, device=device)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"owner: world_size must be an int >= 1 and "):
            owner(keys, bad)
    with pytest.raises(
        ValueError, match=r"owner: world_size must be an int >= 1 and <= 2147483647"
    ):
        owner(keys, 2**31)
    with pytest.raises(TypeError, match="world_size"):
        owner(keys, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer dtype"):
        owner(keys.float(), 2)


def test_shard_spec_validation():
    assert ShardSpec(world_size=4, rank=3).rank == 3
    for ws, rank in ((4, 4), (4, -1), (1, 1)):
        with pytest.raises(ValueError, match="rank must be in"):
            ShardSpec(world_size=ws, rank=rank)
    with pytest.raises(ValueError, match="world_size"):
        ShardSpec(world_size=0, rank=0)
    with pytest.raises(TypeError, match="rank"):
        ShardSpec(world_size=2, rank=1.0)  # type: ignore[arg-type]
    spec = ShardSpec(2, 1)
    with pytest.raises(AttributeError):
        spec.rank = 0  # type: ignore[misc]


def test_shard_spec_owner_and_owns_partition_keys(backend, device):
    keys = torch.randint(-(2**62), 2**62, (3000,), device=device)
    world = 5
    masks = [ShardSpec(world, r).owns(keys) for r in range(world)]
    assert all(m.dtype == torch.bool for m in masks)
    # Every key is owned by exactly one rank, the one owner() names.
    assert torch.equal(torch.stack(masks).sum(0), torch.ones_like(keys))
    ranks = ShardSpec(world, 0).owner(keys)
    for r, m in enumerate(masks):
        assert torch.equal(m, ranks == r)


@pytest.mark.parametrize("n", [0, 1, 777])
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_route_groups_by_owner_stably(backend, device, n, world_size):
    keys = torch.randint(-(2**40), 2**40, (n,), device=device)
    if n > 10:
        keys[5:9] = keys[0]  # duplicates must stay in input order
    order, splits = ShardSpec(world_size, 0).route(keys)
    assert isinstance(splits, list) and len(splits) == world_size
    assert all(isinstance(s, int) for s in splits) and sum(splits) == n
    assert order.dtype == torch.int64 and sorted(order.cpu().tolist()) == list(range(n))
    ranks = owner(keys, world_size)[order].cpu()
    expected_ranks = torch.repeat_interleave(torch.arange(world_size), torch.tensor(splits))
    assert torch.equal(ranks, expected_ranks)
    # Stable: within each rank, positions in the input are increasing.
    starts = [0, *torch.tensor(splits).cumsum(0).tolist()]
    o = order.cpu()
    for r in range(world_size):
        seg = o[starts[r] : starts[r + 1]]
        assert torch.all(seg[1:] > seg[:-1])


def test_route_rejects_non_1d(device):
    with pytest.raises(ValueError, match="1-D"):
        ShardSpec(2, 0).route(torch.zeros(2, 2, dtype=torch.int64, device=device))
