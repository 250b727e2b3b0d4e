"""Admission filter: a count-min sketch of how often not-yet-admitted ids were seen.

An id of a table with ``Admission(min_count=k)`` becomes a row only once it has been seen
``k`` times in training forwards (occurrences inside one batch count). Until then the
collection reads it from the table's eval default and gives it no gradient. Counting every
candidate id exactly would need a second full hash table; :class:`CountMinSketch` uses a
fixed ``counter_slots`` int32 counters instead: ``depth`` rows of ``width`` counters, each
row indexed by an independent hash of the key (core ``mix64`` of the key xor a per-row
seed), the estimate being the minimum over rows. A collision only adds, so the estimate
never undercounts: an id may be admitted early, never late.

Counters saturate at ``min_count`` (nothing above it changes a decision), so they never
overflow. The sketch never forgets: an id admitted, evicted and seen again is admitted at
once (its counters are still full), which is the usual behaviour of a frequency filter.

A physical table keeps one sketch per logical table with admission
(:attr:`~recstack.embedding_engine.physical.PhysicalTable.sketches`); :func:`admission_mask`
counts a batch's ids without a row in them and says which get one.

Everything is vectorized torch on the keys' device (CPU or CUDA): no per-id Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recstack.core.hashing import mix64

if TYPE_CHECKING:
    from recstack.embedding_engine.physical import PhysicalTable

__all__ = ["DEFAULT_DEPTH", "CountMinSketch", "admission_mask"]

#: Hash rows of a sketch (fewer when ``counter_slots`` is smaller).
DEFAULT_DEPTH = 4

# Odd 64-bit constants (golden ratio multiples), as signed int64: per-row hash seeds.
_SEEDS = [
    v - 2**64 if v >= 2**63 else v
    for v in ((0x9E3779B97F4A7C15 * (2 * i + 1)) & (2**64 - 1) for i in range(8))
]


class CountMinSketch:
    """Saturating count-min sketch of int64 keys.

    Args:
        counter_slots: total int32 counters (split into ``depth`` rows of
            ``counter_slots // depth``).
        cap: counters saturate here (the admission threshold).
        device: where the counters live.
        depth: hash rows (at most 8, at most ``counter_slots``).

    Examples:
        >>> import torch
        >>> s = CountMinSketch(64, cap=3)
        >>> s.add(torch.tensor([5, 9]), torch.tensor([1, 2])).tolist()
        [1, 2]
        >>> s.add(torch.tensor([5, 9]), torch.tensor([1, 4])).tolist()
        [2, 3]
    """

    def __init__(
        self,
        counter_slots: int,
        cap: int,
        device: torch.device | str = "cpu",
        *,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        if counter_slots < 1 or cap < 1:
            raise ValueError(
                f"CountMinSketch: counter_slots and cap must be >= 1, got {counter_slots}, {cap}"
            )
        self._depth = max(1, min(depth, len(_SEEDS), counter_slots))
        self._width = counter_slots // self._depth
        self._cap = cap
        self._device = torch.device(device)
        self._counters = torch.zeros(
            (self._depth, self._width), dtype=torch.int32, device=self._device
        )

    @property
    def depth(self) -> int:
        """Hash rows."""
        return self._depth

    @property
    def width(self) -> int:
        """Counters per hash row."""
        return self._width

    @property
    def counters(self) -> torch.Tensor:
        """The int32 ``[depth, width]`` counters (for state export)."""
        return self._counters

    def move_to_(self, device: torch.device | str) -> CountMinSketch:
        """Move the counters to ``device``, in place.

        Args:
            device: where the counters go.

        Returns:
            ``self``.
        """
        self._counters = self._counters.to(device)
        self._device = self._counters.device
        return self

    def _buckets(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 ``[depth, n]`` counter index of each key in each row."""
        seeds = torch.tensor(_SEEDS[: self._depth], dtype=torch.int64, device=keys.device)
        h = mix64((keys.unsqueeze(0) ^ seeds.unsqueeze(1)).reshape(-1))
        return torch.remainder(h, self._width).reshape(self._depth, -1)

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 count estimate of each key (>= its true count, capped), read-only."""
        if not keys.numel():
            return torch.zeros(0, dtype=torch.int64, device=keys.device)
        idx = self._buckets(keys.reshape(-1).to(torch.int64))
        return self._counters.gather(1, idx).amin(0).to(torch.int64)

    def add(self, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add ``counts[i]`` sightings of ``keys[i]``; return the estimates after the add.

        ``keys`` may repeat (their counts add up). Returns int64, ``keys``' length.
        """
        keys = keys.reshape(-1).to(torch.int64)
        if not keys.numel():
            return torch.zeros(0, dtype=torch.int64, device=keys.device)
        counts = counts.reshape(-1).to(torch.int64).clamp(max=self._cap)
        idx = self._buckets(keys)
        # Flatten the rows into one counter space; sum per touched counter (sort-based, so
        # exact and deterministic on any device), then saturate and write back.
        flat = idx + torch.arange(self._depth, device=keys.device).unsqueeze(1) * self._width
        flat = flat.reshape(-1)
        slots, inverse = torch.unique(flat, return_inverse=True)
        sums = torch.zeros(slots.numel(), dtype=torch.int64, device=keys.device)
        sums.index_add_(0, inverse, counts.repeat(self._depth))
        view = self._counters.view(-1)
        new = (view[slots].to(torch.int64) + sums).clamp_(max=self._cap)
        view[slots] = new.to(torch.int32)
        return new[inverse].reshape(self._depth, -1).amin(0)


def admission_mask(
    phys: PhysicalTable, unique: torch.Tensor, tags: torch.Tensor | None, hits: torch.Tensor
) -> torch.Tensor:
    """Bool mask of a batch's unique entries that have or get a row, counting the others.

    An entry without a row is counted in its logical table's sketch (``hits`` times) and
    admitted once its count reaches the table's ``Admission(min_count=)``.

    Args:
        phys: the physical table (its sketches, hash table and table configs).
        unique: int64 ``[U]`` distinct ids of the batch.
        tags: their logical table indices in a merged table, ``None`` for a table of one.
        hits: int64 ``[U]`` occurrences of each in the batch.
    """
    admit = torch.ones(unique.shape, dtype=torch.bool, device=unique.device)
    absent = phys.hash_table.find(unique, tags, check_keys=False) < 0
    for t, sketch in phys.sketches.items():
        mine = absent & (tags == t) if tags is not None else absent
        counts = sketch.add(unique[mine], hits[mine])
        admit[mine] = counts >= phys.tables[t].admission.min_count
    return admit
