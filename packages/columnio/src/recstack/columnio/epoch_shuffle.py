"""The full-epoch shuffle plan: an exact permutation of every row, in bounded memory.

A shuffle window permutes rows only among neighbours in the (unit-shuffled) stream, so a
row never travels further than one window. ``shuffle="epoch"`` uses the random-bucket
shuffle of Rao and Sandelius instead:

1. every row of the epoch draws a bucket, uniformly among ``C = ceil(N / shuffle_buffer)``,
   from a seeded hash of its global row index (its place in file and unit order);
2. each bucket's rows are put in a uniformly random order (a second seeded hash);
3. the epoch's stream is bucket 0 in that order, then bucket 1, and so on; rank ``r`` of
   ``W`` takes stream rows ``[r*N//W, (r+1)*N//W)``, as with every other mode.

Because the bucket draws are independent and uniform and each bucket is uniformly
permuted, the stream is a uniformly random permutation of all ``N`` rows: any row can come
first, and every order is reachable (within what 64-bit seeded hashing can express, as for
any seeded shuffle). Nothing here is stored per row: bucket membership is recomputed from
the hash in blocks, so the plan costs ``O(C)`` memory and a bucket ``O(rows in it)``.

The price is reading. A bucket's rows are spread over every unit, and Parquet, ORC and IPC
decode a unit (row group, stripe, record batch) as a whole, so building one bucket decodes
every unit that holds one of its rows: about every unit. A rank's share overlaps about
``ceil(C / W) + 1`` buckets, so it decodes the data that many times per epoch; holding
more rows (a larger ``shuffle_buffer``) means fewer passes. With ``shuffle_buffer`` at or
above the rows per rank, each rank decodes the data about twice.

Everything is a pure function of ``(N, shuffle_buffer, seed, epoch)``, so every rank
computes the same stream and a resumed reader rebuilds exactly the bucket it stopped in.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch

from recstack.columnio.host_hash import host_mix64
from recstack.columnio.plan import permutation, seed_key

__all__ = ["BucketPlan", "estimated_passes"]

_BUCKET_TAG = 0x6275636B  # "buck"
_ORDER_TAG = 0x6F726472  # "ordr"
# Rows hashed at a time when counting or listing a bucket: bounds the scratch memory.
_BLOCK = 1 << 20


def estimated_passes(total: int, rank_rows: int, bucket_rows: int) -> int:
    """About how many times a rank decodes its files per epoch with ``shuffle="epoch"``.

    Args:
        total: rows in the epoch, over all ranks.
        rank_rows: rows this rank yields.
        bucket_rows: the ``shuffle_buffer`` (rows per bucket).
    """
    if total == 0 or rank_rows == 0:
        return 0
    buckets = math.ceil(total / bucket_rows)
    return min(buckets, math.ceil(buckets * rank_rows / total) + 1)


@dataclass(frozen=True)
class BucketPlan:
    """Which rows form each bucket of one epoch, and where each bucket starts in the stream.

    Args:
        total: rows in the epoch (all files, all ranks).
        num_buckets: ``C``, at least 1.
        seed: the reader's shuffle seed.
        epoch: the epoch.
        ends: cumulative bucket sizes: bucket ``k`` holds stream rows
            ``[ends[k - 1], ends[k])`` (``ends[-1] == total``).
    """

    total: int
    num_buckets: int
    seed: int
    epoch: int
    ends: tuple[int, ...]

    @classmethod
    def build(cls, total: int, bucket_rows: int, seed: int, epoch: int) -> BucketPlan:
        """Count every bucket's rows (one hashing pass over ``total`` row indices).

        Args:
            total: rows in the epoch.
            bucket_rows: the target rows per bucket (``shuffle_buffer``).
            seed: the shuffle seed.
            epoch: the epoch.
        """
        num_buckets = max(1, math.ceil(total / bucket_rows))
        plan = cls(total, num_buckets, seed, epoch, ())
        counts = torch.zeros(num_buckets, dtype=torch.int64)
        for lo in range(0, total, _BLOCK):
            rows = torch.arange(lo, min(total, lo + _BLOCK), dtype=torch.int64)
            counts += torch.bincount(plan.bucket_of(rows), minlength=num_buckets)
        ends = tuple(itertools.accumulate(counts.tolist()))
        return cls(total, num_buckets, seed, epoch, ends)

    def bucket_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The bucket of each global row index (int64 tensor of the same shape).

        Args:
            rows: int64 global row indices.
        """
        key = seed_key(self.seed, self.epoch, _BUCKET_TAG)
        # remainder of a uniform 64-bit hash: bias below num_buckets / 2**64.
        return torch.remainder(host_mix64(rows ^ key), self.num_buckets)

    def start(self, bucket: int) -> int:
        """The stream position of the bucket's first row.

        Args:
            bucket: a bucket index.
        """
        return self.ends[bucket - 1] if bucket > 0 else 0

    def locate(self, position: int) -> tuple[int, int]:
        """``(bucket, row within it)`` of stream position ``position < total``.

        Args:
            position: a global stream position.
        """
        bucket = bisect.bisect_right(self.ends, position)
        return bucket, position - self.start(bucket)

    def members(self, bucket: int) -> torch.Tensor:
        """The bucket's global row indices, ascending (one hashing pass over every row).

        Args:
            bucket: a bucket index.
        """
        if self.num_buckets == 1:
            return torch.arange(self.total, dtype=torch.int64)
        parts = []
        for lo in range(0, self.total, _BLOCK):
            rows = torch.arange(lo, min(self.total, lo + _BLOCK), dtype=torch.int64)
            parts.append(rows[self.bucket_of(rows) == bucket])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def stream_rows(self, bucket: int) -> torch.Tensor:
        """The bucket's global row indices in stream order.

        Args:
            bucket: a bucket index.
        """
        members = self.members(bucket)
        order = permutation(members.numel(), self.seed, self.epoch, bucket, _ORDER_TAG)
        return members.index_select(0, order)
