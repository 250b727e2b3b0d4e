"""kernels/partition.py: grouping keys by owner rank, Triton against the torch reference
(argsort + bincount) on fresh random keys, including empty, length-1 and ragged sizes,
one owner for every key, and world sizes past the kernel's limit."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels
from recstack.core.kernels.partition import (
    MAX_TRITON_RANKS,
    partition_by_owner,
    partition_by_owner_reference,
)
from recstack.core.sharding import SHARD_SEED, owner


@pytest.mark.parametrize("n", [0, 1, 2, 37, 1000, 5003])
@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_partition_matches_the_reference(backend, device, n: int, world: int) -> None:
    keys = torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64, device=device)
    if n > 10:
        keys[:5] = keys[5]  # repeated keys stay in input order
    owners, order, counts = partition_by_owner(keys, SHARD_SEED, world)
    ref = partition_by_owner_reference(keys, SHARD_SEED, world)
    assert torch.equal(owners, ref[0])
    assert torch.equal(owners, owner(keys, world))
    assert torch.equal(order, ref[1]), "the permutation is the stable one"
    assert torch.equal(counts, ref[2])
    assert counts.dtype == torch.int64 and counts.shape == (world,)


def test_one_owner_for_every_key_and_big_worlds(backend, device) -> None:
    keys = torch.full((700,), 12345, dtype=torch.int64, device=device)
    owners, order, counts = partition_by_owner(keys, SHARD_SEED, 5)
    assert torch.equal(order.cpu(), torch.arange(700))
    assert counts.tolist().count(700) == 1 and int(counts.sum()) == 700
    big = MAX_TRITON_RANKS + 44
    keys = torch.randint(0, 10**9, (3000,), dtype=torch.int64, device=device)
    with kernels.count_launches() as launched:
        owners, order, counts = partition_by_owner(keys, SHARD_SEED, big)
    assert launched["partition_by_owner_reference"] == 1
    assert torch.equal(counts, torch.bincount(owner(keys, big), minlength=big))


def test_bad_keys_are_refused() -> None:
    with pytest.raises(TypeError, match="keys must be a 1-D int64 tensor, got torch.int32"):
        partition_by_owner(torch.zeros(3, dtype=torch.int32), SHARD_SEED, 2)
    with pytest.raises(TypeError, match=r"got torch.int64 \(2, 2\)"):
        partition_by_owner(torch.zeros(2, 2, dtype=torch.int64), SHARD_SEED, 2)
    with pytest.raises(ValueError, match="world_size"):
        partition_by_owner(torch.zeros(3, dtype=torch.int64), SHARD_SEED, 0)
