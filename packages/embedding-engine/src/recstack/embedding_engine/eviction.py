"""Per-row metadata of a physical table and the choice of rows to evict.

:class:`RowMetadata` keeps, for every row of a physical table's value store, the training
step that last looked it up and how many times it was looked up (every occurrence counts,
duplicates inside a batch included). The collection updates it in each training forward
with one vectorized ``index_put`` over the batch's unique rows, and resets a row's counts
when a new key takes it (a row freed by eviction and reused starts from zero). It also
flags the rows changed since the last checkpoint (:attr:`RowMetadata.dirty`), which an
incremental checkpoint writes.

Why plain int64 tensors and not :class:`~recstack.core.PagedTensor`: a PagedTensor holds
float32/bfloat16/float16 only, and a float32 step or count is exact only up to ``2**24``
(16.7M steps or hits), which long online training passes. The two int64 columns grow like
the value store (geometrically, so amortized O(1) per new row) and move with it.

:func:`stale_mask` and :func:`cap_victims` pick victims among a logical table's live rows;
:func:`evict_stale`, :func:`apply_eviction_rules` and :func:`enforce_caps` run the passes
over a collection's physical tables: they erase the victims' ids
(:meth:`~recstack.embedding_engine.physical.PhysicalTable.erase`), which puts their rows on
the hash table's free list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from recstack.embedding_engine.config import EvictionPolicy

if TYPE_CHECKING:
    from recstack.embedding_engine.physical import PhysicalTable

__all__ = [
    "RowMetadata",
    "apply_eviction_rules",
    "cap_victims",
    "enforce_caps",
    "evict_stale",
    "stale_mask",
]


class RowMetadata:
    """Last-seen step and hit count of each row, int64, on one device.

    Args:
        device: where the columns live (the physical table's device).

    Examples:
        >>> import torch
        >>> meta = RowMetadata()
        >>> meta.ensure_rows(3)
        >>> meta.touch(torch.tensor([0, 2]), 7, torch.tensor([2, 1]), torch.tensor([True, True]))
        >>> meta.last_seen.tolist(), meta.counts.tolist()
        ([7, 0, 7], [2, 0, 1])
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._device = torch.device(device)
        self._last_seen = torch.zeros(0, dtype=torch.int64, device=self._device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self._device)
        self._dirty = torch.zeros(0, dtype=torch.bool, device=self._device)
        self._num_rows = 0

    @property
    def num_rows(self) -> int:
        """Rows covered (the value store's ``num_rows``)."""
        return self._num_rows

    @property
    def last_seen(self) -> torch.Tensor:
        """int64 ``[num_rows]``: the step of each row's last training lookup (a view)."""
        return self._last_seen[: self._num_rows]

    @property
    def counts(self) -> torch.Tensor:
        """int64 ``[num_rows]``: training lookups of each row since its key got it (a view)."""
        return self._counts[: self._num_rows]

    @property
    def dirty(self) -> torch.Tensor:
        """bool ``[num_rows]``: rows looked up in training or written by an import since
        the last :meth:`mark_clean` of their rows (what a delta checkpoint writes; a view)."""
        return self._dirty[: self._num_rows]

    @property
    def nbytes(self) -> int:
        """Bytes of its columns as allocated (they grow ahead of :attr:`num_rows`)."""
        return self._last_seen.nbytes + self._counts.nbytes + self._dirty.nbytes

    def move_to_(self, device: torch.device | str) -> RowMetadata:
        """Move the columns to ``device``, in place (all copies made before any change).

        Args:
            device: where the columns go.

        Returns:
            ``self``.
        """
        moved = [t.to(device) for t in (self._last_seen, self._counts, self._dirty)]
        self._last_seen, self._counts, self._dirty = moved
        self._device = moved[0].device
        return self

    def ensure_rows(self, n: int) -> None:
        """Cover at least ``n`` rows (new rows read step 0, count 0, clean)."""
        if n <= self._num_rows:
            return
        if n > self._last_seen.numel():
            cap = max(n, 2 * self._last_seen.numel(), 16)
            for name in ("_last_seen", "_counts", "_dirty"):
                old = getattr(self, name)
                new = torch.zeros(cap, dtype=old.dtype, device=self._device)
                new[: old.numel()] = old
                setattr(self, name, new)
        self._num_rows = n

    def mark_dirty(self, rows: torch.Tensor) -> None:
        """Flag ``rows`` as changed (covered rows only)."""
        self._dirty[rows] = True

    def mark_clean(self, rows: torch.Tensor | None = None) -> None:
        """Clear the changed flag of ``rows`` (every row when ``None``)."""
        if rows is None:
            self._dirty.zero_()
        else:
            self._dirty[rows] = False

    def touch(
        self, rows: torch.Tensor, step: int, hits: torch.Tensor, is_new: torch.Tensor
    ) -> None:
        """Record a lookup of unique ``rows`` at ``step``, ``hits`` times each.

        ``is_new`` marks rows a new key just took: their count restarts at ``hits``.
        """
        if not rows.numel():
            return
        hits = hits.to(torch.int64)
        # index_fill_ takes the scalar as a kernel argument: no host-to-device copy, no sync.
        self._last_seen.index_fill_(0, rows, step)
        self._counts[rows] = torch.where(is_new, hits, self._counts[rows] + hits)
        # A row looked up in training may be updated by the optimizer step that follows.
        self._dirty.index_fill_(0, rows, True)

    def set_rows(self, rows: torch.Tensor, last_seen: torch.Tensor, counts: torch.Tensor) -> None:
        """Overwrite the metadata of ``rows`` (for state import); rows must be covered."""
        self._last_seen[rows] = last_seen.to(torch.int64)
        self._counts[rows] = counts.to(torch.int64)


def stale_mask(
    meta: RowMetadata,
    rows: torch.Tensor,
    *,
    older_than_step: int | None = None,
    min_count: int | None = None,
) -> torch.Tensor:
    """Bool mask of ``rows`` last seen before ``older_than_step`` or seen < ``min_count`` times.

    The two rules are or-ed; a rule that is ``None`` selects nothing.
    """
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if older_than_step is not None:
        mask |= meta.last_seen[rows] < older_than_step
    if min_count is not None:
        mask |= meta.counts[rows] < min_count
    return mask


def cap_victims(
    meta: RowMetadata,
    rows: torch.Tensor,
    policy: EvictionPolicy,
    excess: int,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices into ``rows`` of the ``excess`` rows a capacity cap drops.

    Args:
        meta: the physical table's metadata.
        rows: int64 ``[n]`` live rows of one logical table, in ascending order.
        policy: ``"lru"`` (smallest last-seen step first) or ``"lfu"`` (smallest hit count
            first); ``"none"`` chooses no victims and raises.
        excess: how many to drop; fewer when not enough rows are unprotected.
        protected: bool ``[n]``, rows that must stay (the current batch's).

    Ties go to the lower row first (a stable sort of rows in ascending order), so the
    choice is the same on every device.
    """
    if policy == "lru":
        score = meta.last_seen[rows]
    elif policy == "lfu":
        score = meta.counts[rows]
    else:
        raise ValueError(f"cap_victims: policy must be 'lru' or 'lfu', got {policy!r}")
    order = torch.sort(score, stable=True).indices
    if protected is not None:
        order = order[~protected[order]]
    return order[: max(excess, 0)]


# ----------------------------------------------------------------------------------------
# Eviction passes over physical tables
# ----------------------------------------------------------------------------------------


def evict_stale(
    phys: PhysicalTable,
    index: int,
    *,
    older_than_step: int | None,
    min_count: int | None,
    protect_step: int | None = None,
) -> int:
    """Erase the ids of logical table ``index`` that :func:`stale_mask` selects.

    Args:
        phys: the physical table.
        index: the logical table's index in it.
        older_than_step: evict ids last seen before this step (``None``: no such rule).
        min_count: evict ids seen fewer times (``None``: no such rule).
        protect_step: spare ids last seen at this step (the batch just looked up).

    Returns:
        How many ids were evicted.
    """
    ids, rows = phys.table_entries(index)
    mask = stale_mask(phys.meta, rows, older_than_step=older_than_step, min_count=min_count)
    if protect_step is not None:
        mask &= phys.meta.last_seen[rows] != protect_step
    return phys.erase(index, ids[mask])


def apply_eviction_rules(
    tables: Iterable[PhysicalTable], step: int, *, protect_step: int | None = None
) -> dict[str, int]:
    """Apply every logical table's ``Eviction(ttl_steps=, min_count=)`` rules.

    Args:
        tables: the physical tables.
        step: the collection's current step (``ttl_steps=n`` evicts ids last seen before
            ``step - n``).
        protect_step: spare ids last seen at this step.

    Returns:
        ``{logical table: ids evicted}`` for the tables with such rules.
    """
    out: dict[str, int] = {}
    for phys in tables:
        for index, cfg in enumerate(phys.tables):
            ev = cfg.eviction
            if ev.ttl_steps is None and ev.min_count is None:
                continue
            older = None if ev.ttl_steps is None else step - ev.ttl_steps
            out[cfg.name] = evict_stale(
                phys, index, older_than_step=older, min_count=ev.min_count,
                protect_step=protect_step,
            )  # fmt: skip
    return out


def enforce_caps(tables: Iterable[PhysicalTable], stamped: int) -> None:
    """Evict LRU/LFU ids of logical tables over their ``max_rows``, sparing the batch just
    looked up.

    Args:
        tables: the physical tables.
        stamped: the step the batch just looked up stamped on its rows.
    """
    for phys in tables:
        for index, cfg in enumerate(phys.tables):
            cap = cfg.eviction.max_rows
            if cap is None:
                continue
            excess = phys.num_ids(index) - cap
            if excess <= 0:
                continue
            ids, rows = phys.table_entries(index)
            protected = phys.meta.last_seen[rows] == stamped
            victims = cap_victims(phys.meta, rows, cfg.eviction.policy, excess, protected)
            phys.erase(index, ids[victims])
