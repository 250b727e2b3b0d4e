"""How much memory an ``EmbeddingCollection``'s tables hold: :func:`collection_memory`.

Every number is bytes *allocated* on the collection's device, read from the tensors
themselves, which grow ahead of the rows in use: value pages of ``page_rows`` rows, hash
slots rehashed to the next power of two, metadata columns doubled as they fill. So the
numbers are what the device holds, not ``rows * dim * itemsize``.

Examples:
    >>> import torch
    >>> from recstack.core import KeyedJaggedTensor
    >>> from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
    >>> ec = EmbeddingCollection([TableConfig("item", dim=4)], [FeatureConfig("f", "item")],
    ...                          page_rows=16)
    >>> _ = ec(KeyedJaggedTensor(["f"], torch.tensor([3, 5]), lengths=torch.tensor([2])))
    >>> stats = ec.memory_stats()
    >>> stats["item"].rows, stats["item"].values  # one 16-row page of 4 floats (+ its pointer)
    (2, 264)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recstack.core import PagedTensor

if TYPE_CHECKING:
    from recstack.embedding_engine.collection import EmbeddingCollection
    from recstack.embedding_engine.physical import PhysicalTable

__all__ = [
    "MemoryStats",
    "TableMemory",
    "collection_memory",
    "host_nbytes",
    "paged_nbytes",
    "table_memory",
]

_COLUMNS = ("values", "hash_slots", "metadata", "optimizer_slots", "admission", "total")


def paged_nbytes(store: PagedTensor) -> int:
    """Bytes of a ``PagedTensor``'s pages on its device (all allocated rows) and its page
    table; pages a tiered table keeps in host memory are :func:`host_nbytes`.

    Args:
        store: the row store.
    """
    pages = store.pages if store.device_pages is None else store.pages[: store.device_pages]
    return sum(p.nbytes for p in pages) + store.page_table.nbytes


def host_nbytes(store: PagedTensor) -> int:
    """Bytes of the pages a tiered ``PagedTensor`` keeps in host memory (0 for others).

    Args:
        store: the row store.
    """
    if store.device_pages is None:
        return 0
    return sum(p.nbytes for p in store.pages[store.device_pages :])


@dataclass(frozen=True)
class TableMemory:
    """The bytes one physical table holds.

    Attributes:
        name: the physical table (e.g. ``"item+user"``).
        tables: the logical tables it holds.
        rows: rows in use (``values.num_rows``).
        values: the value store's pages and page table.
        hash_slots: the hash table's ``(key, row)`` slots and free-row list (0 for a
            fixed-size table, whose rows are its ids).
        metadata: the row metadata (last-seen step, hit count, changed flag).
        optimizer_slots: the value store's companions (a sparse optimizer's state).
        admission: the admission filters' count-min counters.
        host: values and optimizer slots a tiered table keeps in (pinned) host memory,
            not counted in the others (0 for a table without ``hbm_budget``).
    """

    name: str
    tables: tuple[str, ...]
    rows: int
    values: int
    hash_slots: int
    metadata: int
    optimizer_slots: int
    admission: int
    host: int = 0

    @property
    def total(self) -> int:
        """All of the above but :attr:`host`: what the device holds."""
        return self.values + self.hash_slots + self.metadata + self.optimizer_slots + self.admission


@dataclass(frozen=True)
class MemoryStats:
    """The bytes every physical table of a collection holds, and their totals.

    Index it by physical table name (``stats["item+user"]``); ``str(stats)`` is a table,
    one line per physical table and one of totals, in B, KiB, MiB or GiB (with a ``host``
    column when tiered tables keep rows in host memory).

    Attributes:
        device: where the tables live.
        tables: one :class:`TableMemory` per physical table, in the collection's order.
    """

    device: torch.device
    tables: tuple[TableMemory, ...]

    def __getitem__(self, name: str) -> TableMemory:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(
            f"MemoryStats: no physical table {name!r} (it has {[t.name for t in self.tables]})"
        )

    def __iter__(self) -> Iterator[TableMemory]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def rows(self) -> int:
        """Rows in use, all tables."""
        return sum(t.rows for t in self.tables)

    @property
    def values(self) -> int:
        """Value-store bytes, all tables."""
        return sum(t.values for t in self.tables)

    @property
    def hash_slots(self) -> int:
        """Hash-table bytes, all tables."""
        return sum(t.hash_slots for t in self.tables)

    @property
    def metadata(self) -> int:
        """Row-metadata bytes, all tables."""
        return sum(t.metadata for t in self.tables)

    @property
    def optimizer_slots(self) -> int:
        """Companion (optimizer state) bytes, all tables."""
        return sum(t.optimizer_slots for t in self.tables)

    @property
    def admission(self) -> int:
        """Admission-counter bytes, all tables."""
        return sum(t.admission for t in self.tables)

    @property
    def total(self) -> int:
        """Every byte the tables hold on the device."""
        return sum(t.total for t in self.tables)

    @property
    def host(self) -> int:
        """Bytes tiered tables keep in host memory, all tables."""
        return sum(t.host for t in self.tables)

    def __str__(self) -> str:
        # Host memory gets a column only where a tiered table keeps rows there.
        cols = (*_COLUMNS, "host") if self.host else _COLUMNS
        head = ["table", "rows", *cols]
        lines = [
            [t.name, f"{t.rows:,}", *(_size(getattr(t, c)) for c in cols)] for t in self.tables
        ]
        lines.append(["total", f"{self.rows:,}", *(_size(getattr(self, c)) for c in cols)])
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

        def fmt(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        body = [fmt(r) for r in lines]
        return "\n".join([f"EmbeddingCollection memory on {self.device}", fmt(head), rule, *body])


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def table_memory(phys: PhysicalTable) -> TableMemory:
    """The bytes ``phys`` holds (see :class:`TableMemory`).

    Args:
        phys: a physical table of a collection.
    """
    companions = phys.values.companions.values()
    return TableMemory(
        name=phys.name,
        tables=phys.table_names,
        rows=phys.values.num_rows,
        values=paged_nbytes(phys.values),
        hash_slots=phys.hash_table.nbytes,
        metadata=phys.meta.nbytes,
        optimizer_slots=sum(paged_nbytes(c.store) for c in companions),
        admission=sum(s.counters.nbytes for s in phys.sketches.values()),
        host=sum(host_nbytes(s) for s in (phys.values, *(c.store for c in companions))),
    )


def collection_memory(ec: EmbeddingCollection) -> MemoryStats:
    """The bytes every physical table of ``ec`` holds (``ec.memory_stats()``).

    Args:
        ec: the collection.
    """
    return MemoryStats(ec.device, tuple(table_memory(p) for p in ec.physical_tables.values()))
