"""Physical tables: the storage logical tables share, and how a collection groups them.

:func:`build_physical_tables` groups an :class:`~recstack.embedding_engine.collection.
EmbeddingCollection`'s logical tables into *physical tables*: dynamic tables of equal
``(dim, dtype)`` share one :class:`~recstack.embedding_engine.hash_table.HashTable` and one
:class:`~recstack.core.PagedTensor` of rows (``merge_tables=True``), every other table gets
its own. A merged table's entries are ``(id, tag)`` pairs, the tag being the logical
table's index among the physical table's tables in config order
(:mod:`recstack.embedding_engine.merged`), so ids keep the full int64 range and never
collide. A fixed-size table is always its own physical table: it indexes rows by id
(:class:`~recstack.embedding_engine.fixed_index.FixedIndex`), so it cannot share a key space,
and its ``fixed_size`` rows are made and initialized up front. A table with an
``hbm_budget`` is its own physical table too, with :class:`~recstack.embedding_engine.tiers.
RowTiers` between its hash table's rows and its value store's slots.

A :class:`PhysicalTable` also keeps the books of its logical tables: how many ids each holds
and, once a delta checkpoint has marked a table, the ids erased from it since.

Examples:
    >>> import torch
    >>> from recstack.embedding_engine.config import TableConfig
    >>> tables = [TableConfig("item", dim=4), TableConfig("user", dim=4),
    ...           TableConfig("cat", dim=4, fixed_size=8)]
    >>> physical, located = build_physical_tables(tables, torch.device("cpu"))
    >>> {name: p.table_names for name, p in physical.items()}
    {'item+user': ('item', 'user'), 'cat': ('cat',)}
    >>> located["user"]
    TableLocation(physical='item+user', index=1)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from recstack.core import PagedTensor
from recstack.embedding_engine.admission import CountMinSketch
from recstack.embedding_engine.config import TableConfig
from recstack.embedding_engine.eviction import RowMetadata
from recstack.embedding_engine.fixed_index import FixedIndex
from recstack.embedding_engine.hash_table import HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows_into
from recstack.embedding_engine.tiers import RowTiers, tier_page_rows

__all__ = ["DEFAULT_PAGE_ROWS", "PhysicalTable", "TableLocation", "build_physical_tables"]

#: Rows per page of a physical table's value store (see :class:`~recstack.core.PagedTensor`).
DEFAULT_PAGE_ROWS = 65536
_DEFAULT_SLOTS = 1024
_MAX_LOAD = 0.75


class TableLocation(NamedTuple):
    """Where a logical table lives.

    Attributes:
        physical: the name of the physical table holding it.
        index: its index among that physical table's tables (its tag in a merged table).
    """

    physical: str
    index: int


@dataclass
class PhysicalTable:
    """The storage of one or more dynamic tables with the same ``(dim, dtype)``, or of one
    fixed-size table.

    Attributes:
        name: the logical table names joined by ``"+"`` (table names are identifiers, so
            the join is unambiguous), e.g. ``"item+user"``.
        tables: the logical tables, in config order; ``tables[t]`` has table index ``t``.
        dim, dtype: the row width and dtype.
        tag_bits: bits the hash table keeps beside each key for its logical table index
            (0 for one table); they narrow the row range, never the ids.
        hash_table: key -> row (a :class:`FixedIndex`, row = id, for a fixed-size table).
        values: the rows (``values.num_rows == hash_table.num_rows_allocated``).
        meta: last-seen step and hit count of every row (``meta.num_rows`` covers them).
        sketches: admission counters by logical table index (tables with admission only).
        fixed_size: the row count of a fixed-size table, ``None`` for a dynamic one.
        id_counts: ids each logical table holds, by table index (kept for merged tables;
            a table of one reads ``len(hash_table)``, see :meth:`num_ids`).
        removal_logs: by table index, the ids erased since a delta checkpoint marked the
            table (:meth:`start_removal_log`); tables never marked keep none.
        tiers: for a table with an ``hbm_budget``, the map from the hash table's rows to
            the value store's slots in GPU and host memory; ``None``: row = slot.
    """

    name: str
    tables: tuple[TableConfig, ...]
    dim: int
    dtype: torch.dtype
    tag_bits: int
    hash_table: HashTable | FixedIndex
    values: PagedTensor
    meta: RowMetadata = field(default_factory=RowMetadata)
    sketches: dict[int, CountMinSketch] = field(default_factory=dict)
    fixed_size: int | None = None
    id_counts: list[int] = field(default_factory=list)
    removal_logs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    tiers: RowTiers | None = None
    # New ids per logical table counted on the device by training steps, folded into
    # id_counts when read: a step's inserts then cost no host sync.
    _pending_counts: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id_counts:
            self.id_counts = [0] * len(self.tables)

    @property
    def is_fixed_size(self) -> bool:
        """True for a fixed-size table (row = id, no hash table)."""
        return self.fixed_size is not None

    @property
    def table_names(self) -> tuple[str, ...]:
        """Names of the logical tables it holds."""
        return tuple(t.name for t in self.tables)

    @property
    def id_bits(self) -> int:
        """64: a dynamic table, merged or not, takes any int64 id (the table index is kept
        beside the id, not in its bits). Fixed-size tables check :meth:`id_range`."""
        return 64

    def id_range(self) -> str:
        """The valid ids, in words (for errors and docs)."""
        if self.fixed_size is not None:
            return f"[0, {self.fixed_size})"
        return "any int64"

    def bad_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of ids out of range: outside ``[0, fixed_size)`` for a fixed-size
        table; none for a dynamic one.

        Args:
            ids: int64 ids.
        """
        if self.fixed_size is not None:
            return (ids < 0) | (ids >= self.fixed_size)
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)

    def check_ids(self, ids: torch.Tensor, where: str, table: str) -> None:
        """Raise for the first id of logical table ``table`` out of range (one sync).

        Args:
            ids: int64 ids.
            where: what read them, for the message (``"feature 'hist'"``).
            table: the logical table they belong to.

        Raises:
            ValueError: an id outside a fixed-size table's range (a dynamic table takes
                any int64, so it never raises).
        """
        if not ids.numel() or not bool(self.bad_ids(ids).any()):
            return
        bad = int(ids[self.bad_ids(ids)][0])
        raise ValueError(
            f"EmbeddingCollection: {where} (table {table!r}): id {bad} is out of range; "
            f"table {table!r} is a fixed-size table whose ids must lie in {self.id_range()} "
            "(ids are never wrapped)"
        )

    def physical(self, rows: torch.Tensor) -> torch.Tensor:
        """The value-store slots of hash-table ``rows`` (``-1`` stays; the same rows but
        in a tiered table)."""
        return rows if self.tiers is None else self.tiers.physical(rows)

    def grow(self, n_rows: int) -> None:
        """Make the value store, its companions, the row metadata and the tier map cover
        ``n_rows`` rows (the hash table's ``num_rows_allocated``)."""
        self.values.ensure_rows(n_rows)
        self.meta.ensure_rows(n_rows)
        if self.tiers is not None:
            self.tiers.ensure_rows(n_rows)

    # ------------------------------------------------------------------------------------
    # Entries and the books kept per logical table
    # ------------------------------------------------------------------------------------

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, table indices, rows)`` of every entry, by ascending row."""
        ht = self.hash_table
        chunk = next(ht.tagged_items(chunk_size=max(len(ht), 1)), None)
        if chunk is None:
            empty = torch.zeros(0, dtype=torch.int64, device=ht.device)
            return empty, empty, empty
        return chunk

    def table_entries(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, rows)`` of logical table ``index``, by ascending row.

        Args:
            index: the logical table's index.
        """
        ids, tags, rows = self.entries()
        if len(self.tables) > 1:
            mine = tags == index
            ids, rows = ids[mine], rows[mine]
        return ids, rows

    def num_ids(self, index: int) -> int:
        """How many ids logical table ``index`` holds.

        Args:
            index: the logical table's index.
        """
        if len(self.tables) == 1:
            return len(self.hash_table)
        self._settle_counts()
        return self.id_counts[index]

    def add_id_counts(self, counts: torch.Tensor) -> None:
        """Count new ids of every logical table at once, without a host sync.

        Args:
            counts: int64 ``[len(tables)]`` new ids by table index (a ``bincount`` of the
                new ids' tags), on any device; read back when the counts are next read.
        """
        if self._pending_counts is None:
            self._pending_counts = counts.to(torch.int64)
        else:
            self._pending_counts += counts

    def _settle_counts(self) -> None:
        if self._pending_counts is not None:
            pending, self._pending_counts = self._pending_counts.tolist(), None
            self.id_counts = [a + b for a, b in zip(self.id_counts, pending, strict=True)]

    def add_ids(self, index: int, count: int) -> None:
        """Count ``count`` ids newly inserted into logical table ``index``.

        Args:
            index: the logical table's index.
            count: how many new ids it got.
        """
        self._settle_counts()
        self.id_counts[index] += count

    def recount_ids(self) -> None:
        """Recount :attr:`id_counts` from the hash table (after keys were inserted directly)."""
        if len(self.tables) > 1:
            tags = self.entries()[1]
            self._pending_counts = None
            self.id_counts = torch.bincount(tags, minlength=len(self.tables)).tolist()

    def erase(self, index: int, ids: torch.Tensor) -> int:
        """Erase held ``ids`` of logical table ``index``; returns how many were erased.

        Their rows go to the hash table's free list; the ids are counted out and logged
        as removed when the table keeps a removal log.

        Args:
            index: the logical table's index.
            ids: int64 ids the table holds.
        """
        if not ids.numel():
            return 0
        n = self.hash_table.erase(ids, index)
        if len(self.tables) > 1:
            self._settle_counts()
            self.id_counts[index] -= n
        log = self.removal_logs.get(index)
        if log is not None:
            log.append(ids)
        return n

    def start_removal_log(self, index: int) -> None:
        """Start (or restart) logging the ids erased from logical table ``index``.

        Args:
            index: the logical table's index.
        """
        self.removal_logs[index] = []

    def removed_ids(self, index: int) -> torch.Tensor:
        """int64 ids erased from logical table ``index`` since its log started (sorted,
        each once; empty when it keeps no log).

        Args:
            index: the logical table's index.
        """
        log = self.removal_logs.get(index) or []
        if not log:
            return torch.empty(0, dtype=torch.int64, device=self.hash_table.device)
        return torch.unique(torch.cat(log))


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------


def build_physical_tables(
    tables: Iterable[TableConfig],
    device: torch.device,
    *,
    merge_tables: bool = True,
    page_rows: int = DEFAULT_PAGE_ROWS,
) -> tuple[dict[str, PhysicalTable], dict[str, TableLocation]]:
    """Group logical tables into physical tables and make their storage.

    Args:
        tables: the logical tables, validated (:func:`~recstack.embedding_engine.config.
            check_configs`), in config order.
        device: where the rows and hash tables live.
        merge_tables: merge dynamic tables of equal ``(dim, dtype)`` into one physical
            table; ``False`` gives every table its own.
        page_rows: rows per page of each value store (a power of two).

    Returns:
        ``(physical tables by name, in order of their first table; where each logical
        table lives, by name)``.
    """
    groups: dict[object, list[TableConfig]] = {}
    for t in tables:
        if t.fixed_size is not None or t.hbm_budget is not None:
            group: object = ("own", t.name)
        else:
            group = (t.dim, t.dtype) if merge_tables else t.name
        groups.setdefault(group, []).append(t)
    physical: dict[str, PhysicalTable] = {}
    located: dict[str, TableLocation] = {}
    for members in groups.values():
        if members[0].fixed_size is not None:
            phys = _fixed_table(members[0], device, page_rows)
        else:
            phys = _dynamic_table(members, device, page_rows)
        physical[phys.name] = phys
        for index, t in enumerate(members):
            located[t.name] = TableLocation(phys.name, index)
    return physical, located


def _dynamic_table(
    members: list[TableConfig], device: torch.device, page_rows: int
) -> PhysicalTable:
    """An empty hash table and value store for ``members``, sized by their capacity hints."""
    name = "+".join(t.name for t in members)
    hint = sum(t.capacity or 0 for t in members)
    slots = max(_DEFAULT_SLOTS, int(hint / _MAX_LOAD) + 1)
    n = len(members)
    sketches = {
        i: CountMinSketch(t.admission.counter_slots, t.admission.min_count, device=device)
        for i, t in enumerate(members)
        if t.admission.enabled
    }
    dim, dtype = members[0].dim, members[0].dtype
    budget = members[0].hbm_budget
    if budget is not None:
        page_rows = tier_page_rows(budget, dim, dtype.itemsize, page_rows)
    meta = RowMetadata(device)
    values = PagedTensor(dim, dtype=dtype, device=device, page_rows=page_rows, name=name)
    tiers = None
    if budget is not None:
        # Placed before the capacity hint is reserved: no page is made on the GPU twice.
        policy = "lfu" if members[0].eviction.policy == "lfu" else "lru"
        tiers = RowTiers(name, values, meta, budget, policy)
    values.reserve(hint)
    return PhysicalTable(
        name=name,
        tables=tuple(members),
        dim=dim,
        dtype=dtype,
        tag_bits=0 if n == 1 else (n - 1).bit_length(),
        hash_table=HashTable(slots, device, max_load=_MAX_LOAD, num_tags=n),
        values=values,
        meta=meta,
        sketches=sketches,
        tiers=tiers,
    )


def _fixed_table(t: TableConfig, device: torch.device, page_rows: int) -> PhysicalTable:
    """A fixed-size table: all ``fixed_size`` rows made and initialized now (row = id)."""
    n = t.fixed_size
    assert n is not None and t.initializer is not None and t.init_seed is not None
    # A small vocabulary needs no 64K-row page.
    page = min(page_rows, 1 << max(n - 1, 0).bit_length())
    values = PagedTensor(
        t.dim, dtype=t.dtype, device=device, page_rows=page, capacity=n, name=t.name
    )
    values.ensure_rows(n)
    ids = torch.arange(n, dtype=torch.int64, device=device)
    init_rows_into(values, ids, ids, t.initializer, seed=t.init_seed, check_bounds=False)
    meta = RowMetadata(device)
    meta.ensure_rows(n)
    return PhysicalTable(
        name=t.name,
        tables=(t,),
        dim=t.dim,
        dtype=t.dtype,
        tag_bits=0,
        hash_table=FixedIndex(n, device),
        values=values,
        meta=meta,
        fixed_size=n,
    )
