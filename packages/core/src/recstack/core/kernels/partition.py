"""Keys grouped by owner rank: the counts and the stable permutation an all-to-all needs.

``partition_by_owner(keys, seed, world_size)`` returns each key's owner (as
:func:`~recstack.core.kernels.hash.shard_owner`), the number of keys each rank owns and a
permutation ``order`` with ``keys[order]`` grouped by owner in rank order, keys of one owner
in their input order (a stable counting sort). The torch reference computes the owners,
then ``argsort(owners, stable=True)`` and ``bincount``; the Triton path is a counting sort
in two kernels and one scan, with no sort:

1. each program hashes a block of keys, stores their owners and its block's histogram
   (``counts[block, rank]``);
2. an exclusive scan over ``(rank, block)`` order gives each block's first slot for each
   rank (``torch.cumsum`` of the ``[blocks, ranks]`` histogram, a small tensor);
3. each program reads its keys' owners again and places key ``i`` at its block's first slot
   for its owner plus the number of keys of that owner before it in the block (a cumulative
   sum over the block's one-hot owner matrix).

Up to :data:`MAX_TRITON_RANKS` ranks take the kernels (the one-hot matrix is
``block x ranks``); more take the reference.
"""

from __future__ import annotations

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.hash import check_seed, check_world_size, shard_owner_reference
from recstack.core.kernels.host import as_int64, next_pow2
from recstack.core.kernels.launch import FastKernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_xxh64_u64

__all__ = [
    "MAX_TRITON_RANKS",
    "partition_by_owner",
    "partition_by_owner_reference",
]

#: The most ranks the Triton path serves (beyond, the reference's sort).
MAX_TRITON_RANKS = 256

# Elements of a program's one-hot [block, ranks] matrix, and the most keys of a block.
_TILE = 8192
_MAX_BLOCK = 1024


def partition_by_owner_reference(
    keys: torch.Tensor, seed: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(owners, order, counts)`` by ``argsort(owners, stable=True)`` and ``bincount``."""
    owners = shard_owner_reference(keys, seed, world_size)
    order = torch.argsort(owners, stable=True)
    counts = torch.bincount(owners, minlength=world_size)
    return owners, order, counts


if HAS_TRITON:

    @triton.jit(do_not_specialize=["seed", "world_size"])
    def _owner_histogram_kernel(
        keys_ptr,
        owners_ptr,
        hist_ptr,
        n,
        seed,
        world_size,
        BLOCK: tl.constexpr,
        RANKS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(keys_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        h = tl_xxh64_u64(x, seed.to(tl.int64).to(tl.uint64, bitcast=True))
        # As shard_owner: multiply-high of the hash's top 32 bits.
        owner = (((h >> 32) * world_size.to(tl.uint64)) >> 32).to(tl.int64, bitcast=True)
        tl.store(owners_ptr + offs, owner, mask=mask)
        ranks = tl.arange(0, RANKS)
        hit = (owner[:, None] == ranks[None, :]) & mask[:, None]
        counts = tl.sum(hit.to(tl.int32), axis=0)
        tl.store(hist_ptr + pid.to(tl.int64) * world_size + ranks, counts, mask=ranks < world_size)

    @triton.jit(do_not_specialize=["n"])
    def _place_kernel(
        owners_ptr, first_ptr, order_ptr, n, world_size, BLOCK: tl.constexpr, RANKS: tl.constexpr
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        owner = tl.load(owners_ptr + offs, mask=mask, other=0)
        ranks = tl.arange(0, RANKS)
        hit = ((owner[:, None] == ranks[None, :]) & mask[:, None]).to(tl.int32)
        # Keys of the same owner before this one in the block, this one included.
        seen = tl.cumsum(hit, axis=0)
        before = tl.sum(seen * hit, axis=1) - 1
        first = tl.load(first_ptr + pid.to(tl.int64) * world_size + owner, mask=mask, other=0)
        tl.store(order_ptr + first + before, offs, mask=mask)

    _HISTOGRAM = FastKernel(_owner_histogram_kernel)
    _PLACE = FastKernel(_place_kernel)


def _blocking(world_size: int) -> tuple[int, int]:
    ranks = max(2, next_pow2(world_size))
    # At most 1024 keys a block: the placing kernel's cumulative sum spills registers past
    # it (sm_90, 2 ranks and 4096 keys: 88 B a thread).
    return max(16, min(_MAX_BLOCK, _TILE // ranks)), ranks


def partition_by_owner(
    keys: torch.Tensor, seed: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group int64 ``keys`` (1-D) by owner rank (see the module docs).

    Args:
        keys: int64 ``[n]`` ids.
        seed: the owner hash's seed (``recstack.core.sharding.SHARD_SEED``).
        world_size: the number of ranks.

    Returns:
        ``(owners, order, counts)``: int64 ``[n]`` each key's owner; int64 ``[n]`` a
        permutation with ``owners[order]`` non-decreasing and keys of one owner in input
        order; int64 ``[world_size]`` the keys each rank owns. All on ``keys``' device, no
        host sync.

    Raises:
        TypeError, ValueError: ``keys`` is not a 1-D int64 tensor, or a bad seed or world
            size.

    Examples:
        >>> import torch
        >>> owners, order, counts = partition_by_owner(torch.arange(6), 0, 2)
        >>> bool((owners[order][1:] >= owners[order][:-1]).all()), int(counts.sum())
        (True, 6)
    """
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
        got = (
            f"{keys.dtype} {tuple(keys.shape)}"
            if isinstance(keys, torch.Tensor)
            else type(keys).__name__
        )
        raise TypeError(f"partition_by_owner: keys must be a 1-D int64 tensor, got {got}")
    seed = check_seed(seed)
    world_size = check_world_size(world_size, "partition_by_owner")
    if world_size > MAX_TRITON_RANKS or not use_triton(keys, op="partition_by_owner"):
        record_launch("partition_by_owner_reference")
        return partition_by_owner_reference(keys, seed, world_size)
    keys = keys.contiguous()
    n = keys.numel()
    owners = torch.empty_like(keys)
    order = torch.empty_like(keys)
    if n == 0:
        return owners, order, torch.zeros(world_size, dtype=torch.int64, device=keys.device)
    block, ranks = _blocking(world_size)
    blocks = triton.cdiv(n, block)
    hist = torch.empty((blocks, world_size), dtype=torch.int32, device=keys.device)
    record_launch("partition_by_owner")
    _HISTOGRAM(
        (blocks,),
        keys,
        owners,
        hist,
        n,
        as_int64(seed),
        world_size,
        block,
        ranks,
        num_warps=4,
    )
    # Slots in (rank, block) order: rank r's keys from block b start after every lower
    # rank's keys and rank r's keys of the blocks before b.
    by_rank = hist.t().reshape(-1).to(torch.int64)
    first = (torch.cumsum(by_rank, 0) - by_rank).reshape(world_size, blocks).t().contiguous()
    _PLACE((blocks,), owners, first, order, n, world_size, block, ranks, num_warps=4)
    return owners, order, hist.sum(0, dtype=torch.int64)
