"""Which rank owns an id: ``owner(keys, world_size)`` and ``ShardSpec``.

Embedding all-to-all and checkpoint resharding both route ids with this one function, so a
checkpoint written by N ranks loads on M ranks: each rank keeps the keys whose
``owner(key, M) == rank``. The mapping is part of RecStack's on-disk contract and will not
change across releases (``tests/test_sharding.py`` pins it with golden values).

The rule::

    h     = hash64(key, seed=SHARD_SEED)          # XXH64 of the key's 8 LE bytes, as uint64
    owner = ((h >> 32) * world_size) >> 32        # multiply-high of the top 32 bits

It is uniform for any key pattern (sequential ids, multiples of ``world_size``, ids with
structured low bits), uses no division, and reads only the hash's high bits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from recstack.core.hashing import ids_as_int64
from recstack.core.kernels import hash as _k
from recstack.core.kernels.partition import partition_by_owner

__all__ = ["SHARD_SEED", "ShardSpec", "owner", "owner_partition"]

SHARD_SEED: int = 0x72732D7368617264
"""XXH64 seed used for sharding: the ASCII bytes of ``"rs-shard"`` read big-endian.

Why a separate, seeded function: hash tables pick slots from ``mix64(key)``. Were the rank
also taken from ``mix64(key)``, the bits that choose the rank would be fixed (or constrained)
for every key on a rank, and a table whose slot index draws on those same bits (a
power-of-two table with a modulo-style owner, or multiply-high slot selection with this
owner rule) would see each rank's keys cluster into about ``1 / world_size`` of its slots,
with long probe chains. XXH64 under this fixed seed is unrelated to fmix64, so the slot
hash stays uniform within each rank whatever bits a table uses.
"""


def owner(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank in ``[0, world_size)`` that owns each key, as an int64 tensor of ``keys``' shape.

    Keys are integer ids (any integer dtype, converted to int64). One fused kernel launch
    on CUDA.

    Examples:
        >>> import torch
        >>> from recstack.core.sharding import owner
        >>> ranks = owner(torch.arange(10), world_size=4)
        >>> bool(((ranks >= 0) & (ranks < 4)).all())
        True
    """
    world_size = _k.check_world_size(world_size, "owner")
    return _k.shard_owner(ids_as_int64(keys, "owner"), SHARD_SEED, world_size)


def owner_partition(
    keys: torch.Tensor, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys grouped by owner, for an all-to-all: ``(owners, order, counts)``.

    ``owners`` is :func:`owner` of each key; ``order`` a permutation with ``keys[order]``
    grouped by owner in rank order (keys of one owner in input order); ``counts`` int64
    ``[world_size]`` how many keys each rank owns (the all-to-all's split sizes). One
    counting sort in two kernel launches on CUDA, no sort and no host sync
    (:mod:`recstack.core.kernels.partition`).

    Args:
        keys: 1-D int64 ids.
        world_size: the number of ranks.

    Examples:
        >>> import torch
        >>> owners, order, counts = owner_partition(torch.arange(10), world_size=3)
        >>> bool((owners[order].diff() >= 0).all()), int(counts.sum())
        (True, 10)
    """
    world_size = _k.check_world_size(world_size, "owner_partition")
    return partition_by_owner(ids_as_int64(keys, "owner_partition"), SHARD_SEED, world_size)


@dataclass(frozen=True)
class ShardSpec:
    """One rank's view of a sharded key space: ``world_size`` ranks, this one is ``rank``.

    Examples:
        >>> import torch
        >>> from recstack.core.sharding import ShardSpec
        >>> spec = ShardSpec(world_size=2, rank=0)
        >>> keys = torch.tensor([10, 11, 12, 13])
        >>> order, splits = spec.route(keys)
        >>> sum(splits) == keys.numel()
        True
    """

    world_size: int
    rank: int

    def __post_init__(self) -> None:
        _k.check_world_size(self.world_size, "ShardSpec")
        if isinstance(self.rank, bool) or not hasattr(self.rank, "__index__"):
            raise TypeError(f"ShardSpec: rank must be an int, got {type(self.rank).__name__}")
        if not 0 <= operator.index(self.rank) < self.world_size:
            raise ValueError(f"ShardSpec: rank must be in [0, {self.world_size}), got {self.rank}")

    def owner(self, keys: torch.Tensor) -> torch.Tensor:
        """Owner rank of each key (see :func:`owner`)."""
        return owner(keys, self.world_size)

    def owns(self, keys: torch.Tensor) -> torch.Tensor:
        """Bool mask of the keys this rank owns."""
        return owner(keys, self.world_size) == self.rank

    def route(self, keys: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Group 1-D ``keys`` by owner rank, for a variable-split all-to-all.

        Returns ``(order, send_splits)``: ``keys[order]`` lists rank 0's keys first, then
        rank 1's, ...; within a rank the keys keep their input order (stable).
        ``send_splits[r]`` is how many keys go to rank ``r``; it has ``world_size`` entries
        and costs the only host sync.
        """
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"ShardSpec.route: keys must be a 1-D tensor, got {shape}")
        _, order, splits = owner_partition(keys, self.world_size)
        return order, splits.tolist()
