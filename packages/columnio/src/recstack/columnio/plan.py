"""The read plan: which rows each reader yields, in what order, for every epoch.

Everything here is a pure function of the file metadata and ``(seed, epoch, rank,
world_size)``, so every rank computes the same global plan without talking to the others,
and a restarted reader recomputes exactly the order it was in. Permutations come from
``recstack.core.mix64`` (a fixed, documented function) rather than a random generator
whose stream could change between torch versions.

Sharding: the epoch's units (row groups, stripes, record batches) are laid end to end in
(shuffled) order and rank ``r`` of ``W`` takes the rows ``[r*N//W, (r+1)*N//W)``. Ranks get
row counts that differ by at most one whatever the unit sizes; a unit that straddles two
ranks is read by both, each keeping its part.

Shuffling: unit order is shuffled per epoch, then the rank's stream is cut into windows
of ``shuffle_buffer`` rows and each window is permuted. A window is bounded memory and
its permutation is recomputable, which is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recstack.columnio.host_hash import host_mix64

__all__ = [
    "Segment",
    "UnitRef",
    "epoch_units",
    "permutation",
    "rank_rows",
    "seed_key",
    "segments",
    "window_order",
]

_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class UnitRef:
    """Unit ``unit`` of file ``file`` (indices into the reader's file list), ``rows`` long."""

    file: int
    unit: int
    rows: int


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one unit."""

    file: int
    unit: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _fmix(k: int) -> int:
    k &= _M64
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def seed_key(*parts: int) -> int:
    """A 64-bit key from small ints (seed, epoch, ...), as a signed value for int64 tensors.

    Every shuffle of ColumnIO derives its keys here, so the same ``parts`` give the same
    order on every rank and after a restart.

    Args:
        *parts: the ints that pick the key (seed, epoch, rank, a tag...).
    """
    k = 0x5EED_C0FF_EE00_0001
    for p in parts:
        k = _fmix(k ^ _fmix(int(p) + 0x9E3779B97F4A7C15))
    return k - (1 << 64) if k >= 1 << 63 else k


def permutation(n: int, *parts: int) -> torch.Tensor:
    """A permutation of ``range(n)`` determined by ``parts`` (int64 tensor).

    Args:
        n: how many items to permute.
        *parts: the ints that pick the permutation (see :func:`seed_key`).
    """
    if n <= 1:
        return torch.arange(n, dtype=torch.int64)
    idx = torch.arange(n, dtype=torch.int64)
    keys = host_mix64(idx ^ seed_key(*parts))
    return torch.argsort(keys, stable=True)


def epoch_units(units: Sequence[UnitRef], *, shuffle: bool, seed: int, epoch: int) -> list[UnitRef]:
    """The epoch's units in reading order (file order unless ``shuffle``); empty units dropped."""
    live = [u for u in units if u.rows > 0]
    if not shuffle:
        return live
    order = permutation(len(live), seed, epoch, 0x756E6974).tolist()  # "unit"
    return [live[i] for i in order]


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global row range ``[lo, hi)`` of ``rank``: sizes differ by at most one row."""
    return total * rank // world_size, total * (rank + 1) // world_size


def segments(units: Sequence[UnitRef], lo: int, hi: int) -> list[Segment]:
    """The unit pieces covering rows ``[lo, hi)`` of ``units`` laid end to end."""
    out: list[Segment] = []
    pos = 0
    for u in units:
        a, b = max(lo, pos), min(hi, pos + u.rows)
        if a < b:
            out.append(Segment(u.file, u.unit, a - pos, b - pos))
        pos += u.rows
        if pos >= hi:
            break
    return out


def window_order(size: int, seed: int, epoch: int, rank: int, window: int) -> torch.Tensor:
    """The order in which a shuffle window's ``size`` rows are yielded."""
    return permutation(size, seed, epoch, rank, window, 0x77696E64)  # "wind"
