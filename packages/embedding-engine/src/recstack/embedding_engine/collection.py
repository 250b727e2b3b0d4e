"""``EmbeddingCollection``: many features over dynamic hash embedding tables, one module.

Dynamic tables with the same ``(dim, dtype)`` are merged into one *physical table*: one
:class:`~recstack.embedding_engine.hash_table.HashTable` and one
:class:`~recstack.core.PagedTensor` of rows, so a forward costs a few launches per physical
table whatever the number of features (dedup, find_or_insert, one pooled lookup for all
pooled features, one gather for all sequence features).

**Hash keys and the id range.** Every dynamic table, merged or not, takes any int64 id:
nothing is reserved, narrowed, wrapped or folded (so hashed ids, e.g. the feature engine's
``Hash()`` without buckets, go straight in). Id ``x`` of logical table ``t`` (its index
among the ``T`` tables of its physical table, in config order) is the hash-table entry
``(x, t)``: the hash table keeps ``t`` beside the key, in spare high bits of its slot's row
word, and compares it on every probe, so one id of two merged tables makes two entries and
never collides (:mod:`recstack.embedding_engine.merged`). The tag bits cost row range, not
id range: a physical table of ``T`` tables numbers its rows below ``2**(62 - b)``,
``b = (T - 1).bit_length()``. Fixed-size tables take ids in ``[0, fixed_size)``.

Merging never changes values: a new row is initialized from the *logical* id with the
logical table's initializer and seed (:func:`~recstack.embedding_engine.kernels.init_rows.
init_rows_into`), so merged and unmerged collections give bit-identical initial rows.

**Training vs eval.** In training mode a forward inserts unseen ids (find_or_insert, the
value store grown to ``num_rows_allocated``, new rows initialized). In eval mode it is
read-only: unknown ids read their initializer row (``eval_default="initializer"``, computed,
not inserted) or zeros (``eval_default="zeros"``); zeros count in a mean's denominator.

**Gradients.** Rows are not ``nn.Parameter``s and no dense table gradient is ever built. In
training mode with grad enabled the outputs require grad (through a zero-size anchor, see
:mod:`recstack.embedding_engine.autograd`), and ``backward`` stores one coalesced fp32
:class:`~recstack.core.SparseGrad` per physical table: :meth:`EmbeddingCollection.sparse_grads`.
A sparse optimizer built from :meth:`EmbeddingCollection.sparse_parameters` (core
``SparseParameter``\\ s, :mod:`recstack.embedding_engine.parameters`) reads them in ``step()``
and clears them in ``zero_grad()``. Several backwards before the next training forward
(``retain_graph``, or several forwards' outputs in one loss) accumulate. A training forward
drops the stored gradients, and refuses to start (``RuntimeError``) while some were neither
read (:meth:`~EmbeddingCollection.sparse_grads`, an optimizer step) nor cleared
(:meth:`~EmbeddingCollection.zero_grad_sparse`, the optimizer's ``zero_grad()``): it may evict
ids and give their rows to new ids, so stored gradients cannot carry over it, and dropping
unread ones would silently lose a micro-batch. To sum micro-batches, call the optimizer's
``accumulate()`` after each backward. Eval forwards leave the stored gradients alone.

**Steps and row metadata.** :attr:`EmbeddingCollection.step` is the training step the
next training forward stamps on the rows it looks up; every training forward (grad enabled
or not) advances it by one afterwards, and :meth:`EmbeddingCollection.set_step` sets it
(e.g. to the trainer's global step after a restore). Each row keeps its last-seen step and
hit count (every occurrence counts) in :attr:`PhysicalTable.meta`
(:class:`~recstack.embedding_engine.eviction.RowMetadata`); a row a new key takes restarts
at that key's hits.

**Eviction.** :meth:`EmbeddingCollection.evict` erases ids last seen before a step or seen
fewer than a count of times; their rows go to the hash table's free list and the next new
ids take them, re-initialized from the new id. A table with ``Eviction(policy, max_rows)``
is capped after every training forward: while it holds more than ``max_rows`` ids, the
least recently (``"lru"``) or least frequently (``"lfu"``) seen ids go, ties to the lower
row, never an id of the current batch (a batch with more than ``max_rows`` new ids leaves
the table over the cap until the next forward). ``Eviction(ttl_steps=, min_count=)`` rules
run in :meth:`EmbeddingCollection.maybe_evict` (call it every N steps, or before a
checkpoint), and inside the training forward every ``evict_every`` steps when the
constructor got ``evict_every`` (scanning all rows costs ``O(rows)``, so not every step by
default). Evict after the optimizer step: the stored SparseGrads index rows, and an id
evicted before its gradient is applied would have it applied to a freed (or reused) row.

**Admission.** A table with ``Admission(min_count=k)`` counts the training sightings of ids
without a row in a count-min sketch (:mod:`recstack.embedding_engine.admission`); an id
gets a row in the forward in which its count reaches ``k`` (occurrences in that batch
included). Until then it reads the eval default (initializer row or zeros, not inserted)
and gets no gradient. A batch with such ids reads its rows through a compact per-batch
table (one gather of its unique rows) and maps the gradient back to the physical rows.

**Fixed-size tables.** ``TableConfig(fixed_size=N)`` is a small vocabulary with the same
API: ids must lie in ``[0, N)`` (an id outside raises a ValueError naming the feature, the
table and the range; ids are never wrapped) and index rows directly (row = id), with no hash
table (:class:`FixedIndex` stands in its place). Its ``N`` rows are created up front and
initialized like a dynamic table's rows (:func:`~recstack.embedding_engine.kernels.init_rows.
init_rows_into` from ids ``0..N-1``, so values are the same pure function of id and seed).
A fixed table is never merged: it is its own physical table, named after it, whatever
``merge_tables`` says. Eval reads the same rows; the gradient is its physical table's
SparseGrad as for dynamic tables; row metadata (last-seen step, hits) is kept too. It has
no eviction, admission or capacity (rejected by :class:`~recstack.embedding_engine.config.
TableConfig`), and :meth:`EmbeddingCollection.evict` skips it.

**Padded sequences and tile pooling.** ``pooling="none"`` with ``max_len`` outputs a
``[B, max_len, dim]`` tensor: a bag's kept ids first, then zeros. A longer bag is cut at the
end the feature's ``truncate`` names, as the feature engine's ``Truncate``: ``"left"`` (the
default) keeps its last ``max_len`` ids, the most recent behaviours; ``"right"`` its first.
``with_lengths=True`` adds each row's id count (:mod:`recstack.embedding_engine.sequence`).
``pooling="tile"`` outputs that padded sequence reshaped to ``[B, max_len * dim]``: position
``j`` of a bag occupies columns ``[j * dim, (j + 1) * dim)``. Both share the sequence
features' lookup and gradient path.

Example:
    >>> import torch
    >>> from recstack.core import KeyedJaggedTensor
    >>> from recstack.embedding_engine.config import FeatureConfig, TableConfig
    >>> ec = EmbeddingCollection(
    ...     [TableConfig("item", dim=4), TableConfig("user", dim=4)],
    ...     [FeatureConfig("clicks", "item", pooling="mean"),
    ...      FeatureConfig("hist", "item", pooling="none"),
    ...      FeatureConfig("uid", "user")],
    ... )
    >>> list(ec.physical_tables)
    ['item+user']
    >>> kjt = KeyedJaggedTensor(
    ...     ["clicks", "hist", "uid"], torch.tensor([1, 2, 3, 1, 9, 7]),
    ...     lengths=torch.tensor([2, 0, 1, 2, 1, 0]))
    >>> out = ec(kjt)
    >>> out["clicks"].shape, out["hist"].values.shape, out["uid"].requires_grad
    (torch.Size([2, 4]), torch.Size([3, 4]), True)
    >>> (out["clicks"].sum() + out["hist"].values.sum() + out["uid"].sum()).backward()
    >>> ec.sparse_grads()["item+user"].rows.tolist()  # item ids 1, 2, 3, 9 and user id 7
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from recstack.core import (
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedState,
    PagedTensor,
    RowUpdater,
    SparseGrad,
)
from recstack.core.kernels.row_update import apply_row_update, check_rows, new_gate
from recstack.embedding_engine.admission import CountMinSketch
from recstack.embedding_engine.autograd import (
    EmbeddingLookupFunction,
    LookupPlan,
    RowSort,
    lookup_forward,
    merge_sparse_grads,
)
from recstack.embedding_engine.config import FeatureConfig, TableConfig, check_configs
from recstack.embedding_engine.dedup import SortedIds, sort_ids
from recstack.embedding_engine.device import move_collection_, target_device
from recstack.embedding_engine.eviction import RowMetadata, cap_victims, stale_mask
from recstack.embedding_engine.hash_table import HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows, init_rows_into
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM
from recstack.embedding_engine.memory import MemoryStats, collection_memory
from recstack.embedding_engine.merged import BatchTags, batch_tags
from recstack.embedding_engine.parameters import EmbeddingSparseParameter
from recstack.embedding_engine.sequence import PaddedSequence, padded_sequence
from recstack.embedding_engine.state import collection_table_states

__all__ = ["DEFAULT_PAGE_ROWS", "EmbeddingCollection", "FixedIndex", "PhysicalTable"]

#: Rows per page of a physical table's value store (see :class:`~recstack.core.PagedTensor`).
DEFAULT_PAGE_ROWS = 65536
_DEFAULT_SLOTS = 1024
_MAX_LOAD = 0.75


class FixedIndex:
    """The id -> row map of a fixed-size table: row = id, all ``size`` rows always present.

    It stands where a dynamic physical table has its
    :class:`~recstack.embedding_engine.hash_table.HashTable` and offers the same read API
    (``len``, :meth:`find`, :meth:`find_or_insert` of present ids, :meth:`items`,
    :meth:`tagged_items`, :attr:`num_rows_allocated`, :attr:`device`), so code written
    against the hash table (state export/import) works unchanged. It never inserts or
    erases. It holds one table: tags are accepted and ignored (all 0).

    Args:
        size: the number of rows (ids ``[0, size)``).
        device: where its tensors are made.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self._size = int(size)
        self._device = torch.empty(0, device=device).device

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """The number of rows, ``fixed_size``."""
        return self._size

    @property
    def capacity(self) -> int:
        """Same as :attr:`size`."""
        return self._size

    @property
    def num_rows_allocated(self) -> int:
        """Same as :attr:`size`: every row exists from the start."""
        return self._size

    @property
    def device(self) -> torch.device:
        """Where its tensors are made."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of device tensors it holds: none (row = id)."""
        return 0

    def move_to_(self, device: torch.device | str) -> FixedIndex:
        """Make its tensors on ``device`` from now on (it holds none); returns ``self``.

        Args:
            device: the new device.
        """
        self._device = torch.empty(0, device=device).device
        return self

    def __repr__(self) -> str:
        return f"FixedIndex(size={self._size}, device={self._device})"

    def find(
        self,
        keys: torch.Tensor,
        tags: torch.Tensor | int | None = None,
        *,
        check_keys: bool = True,
    ) -> torch.Tensor:
        """Rows of int64 ``keys``: the key itself, ``-1`` outside ``[0, size)``."""
        del tags, check_keys  # one table; every int64 is a valid query
        keys = keys.to(torch.int64)
        inside = (keys >= 0) & (keys < self._size)
        return torch.where(inside, keys, torch.full_like(keys, -1))

    def find_or_insert(
        self, keys: torch.Tensor, tags: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, is_new)``: rows of ``keys`` (all present, so ``is_new`` is all False).

        Raises:
            ValueError: a key outside ``[0, size)`` (a fixed table cannot grow).
        """
        rows = self.find(keys)
        if rows.numel() and bool((rows < 0).any()):
            bad = int(keys.reshape(-1)[(rows < 0).reshape(-1)][0])
            raise ValueError(
                f"FixedIndex: id {bad} is outside the fixed-size table's range [0, {self._size})"
            )
        return rows, torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)

    def erase(self, keys: torch.Tensor, tags: torch.Tensor | int | None = None) -> int:
        """Always raises: a fixed-size table keeps all its rows."""
        raise ValueError("FixedIndex: a fixed-size table cannot erase ids (it has no eviction)")

    def items(self, chunk_size: int = 1 << 20) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(keys, rows)`` chunks by ascending row (here keys == rows)."""
        if chunk_size < 1:
            raise ValueError(f"FixedIndex.items: chunk_size must be >= 1, got {chunk_size}")
        for start in range(0, self._size, chunk_size):
            stop = min(start + chunk_size, self._size)
            r = torch.arange(start, stop, dtype=torch.int64, device=self._device)
            yield r, r.clone()

    def tagged_items(
        self, chunk_size: int = 1 << 20
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(keys, tags, rows)`` chunks by ascending row (tags all 0)."""
        for keys, rows in self.items(chunk_size):
            yield keys, torch.zeros_like(keys), rows


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
        table; none for a dynamic one."""
        if self.fixed_size is not None:
            return (ids < 0) | (ids >= self.fixed_size)
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)


@dataclass
class _Feature:
    config: FeatureConfig
    index: int  # logical table index within the physical table


class EmbeddingCollection(nn.Module):
    """Dynamic hash embeddings for many features: ``forward(kjt) -> {feature: output}``.

    Args:
        tables: the embedding tables (each read by at least one feature).
        features: the features; every one must be a key of the forward's
            ``KeyedJaggedTensor`` (extra keys are ignored).
        device: where rows and hash tables live (default CPU). ``module.to(device)``,
            ``.cuda()`` and ``.cpu()`` move every table's state there, in place (see
            :mod:`recstack.embedding_engine.device`); dtype casts (``model.half()``,
            ``model.to(torch.bfloat16)``) leave the tables in their configured dtype.
        merge_tables: merge dynamic tables of equal ``(dim, dtype)`` into one physical table
            (fewer launches per forward; ids keep the full int64 range and never collide,
            see the module docs).
        page_rows: rows per page of each physical table's value store (a power of two).
        evict_every: also run the ``ttl_steps``/``min_count`` eviction rules
            (:meth:`maybe_evict`) at the end of every ``evict_every``-th training forward,
            sparing the ids of that forward's batch; ``None`` (default) leaves them to
            explicit :meth:`maybe_evict` calls. Capacity caps run every training forward.

    Outputs, per feature:

    * ``pooling="sum"``/``"mean"``: a ``[B, dim]`` tensor (a view of one ``[B, K, dim]``
      buffer per physical table), in the table dtype. ``weighted`` features multiply each
      row by the KJT's weight (a weighted mean divides by the bag length); empty bags give
      zeros.
    * ``pooling="none"``: a :class:`~recstack.core.JaggedTensor` of ``[n_ids, dim]`` rows
      with the feature's offsets; with ``max_len``, a padded ``[B, max_len, dim]`` tensor
      instead (a bag's kept ids first, then zeros; a longer bag keeps its last ``max_len``
      ids with ``truncate="left"``, the default, or its first with ``"right"``; all of
      its ids are still looked up and inserted). With ``with_lengths=True`` that tensor
      comes as a :class:`~recstack.embedding_engine.sequence.PaddedSequence`
      ``(values, lengths)``, its ``.mask`` the padding mask (no host sync).
    * ``pooling="tile"``: that padded tensor reshaped to ``[B, max_len * dim]``.

    ``fixed_size`` tables take ids in ``[0, fixed_size)`` as rows directly and are never
    merged (see the module docs).

    Raises:
        ConfigError: invalid configs (:func:`check_configs`).
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        features: Sequence[FeatureConfig],
        device: torch.device | str | None = None,
        *,
        merge_tables: bool = True,
        page_rows: int = DEFAULT_PAGE_ROWS,
        evict_every: int | None = None,
    ) -> None:
        super().__init__()
        if evict_every is not None and (
            isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1
        ):
            raise ValueError(
                f"EmbeddingCollection: evict_every must be None or an int >= 1, got {evict_every!r}"
            )
        self._evict_every = evict_every
        self._step = 0
        self._forwards = 0
        by_name = check_configs(tables, features)
        # A real tensor's device carries the index ("cuda" -> "cuda:0"), so the device
        # checks below compare equal for tensors the user made on the default GPU.
        self._device = torch.empty(0, device="cpu" if device is None else device).device
        groups: dict[object, list[TableConfig]] = {}
        for t in by_name.values():
            # A fixed table indexes rows by id, so it cannot share a key space: never merged.
            if t.fixed_size is not None:
                group: object = ("fixed", t.name)
            else:
                group = (t.dim, t.dtype) if merge_tables else t.name
            groups.setdefault(group, []).append(t)
        self._physical: dict[str, PhysicalTable] = {}
        self._physical_of: dict[str, tuple[str, int]] = {}  # logical -> (physical, index)
        for members in groups.values():
            phys = self._make_physical(members, page_rows)
            self._physical[phys.name] = phys
            for i, t in enumerate(members):
                self._physical_of[t.name] = (phys.name, i)
        self._features = list(features)
        # Per physical table: its pooled features, then its sequence features.
        self._pooled: dict[str, list[_Feature]] = {p: [] for p in self._physical}
        self._sequence: dict[str, list[_Feature]] = {p: [] for p in self._physical}
        for f in features:
            pname, index = self._physical_of[f.table]
            dest = self._sequence if f.is_sequence else self._pooled
            dest[pname].append(_Feature(f, index))
        self._modes = {
            p: torch.tensor(
                [MODE_MEAN if f.config.pooling == "mean" else MODE_SUM for f in fs],
                dtype=torch.int64,
                device=self._device,
            )
            for p, fs in self._pooled.items()
        }
        # Tensors held here (and in the physical tables) move in device.move_collection_.
        self._grads: dict[str, SparseGrad] = {}
        # Physical tables whose stored gradient no one has read since a backward wrote it.
        self._unread: set[str] = set()
        self._updater: RowUpdater | None = None
        self._one_pass = False
        # Ids per logical table of each merged physical table (one table: len(hash_table)).
        self._num_ids: dict[str, list[int]] = {
            p: [0] * len(v.tables) for p, v in self._physical.items()
        }
        # Ids erased since the last change mark of their logical table (a delta
        # checkpoint's tombstones); kept only for tables a checkpoint has marked, so a run
        # that never writes deltas keeps nothing.
        self._removed: dict[str, list[torch.Tensor]] = {}

    def _make_physical(self, members: list[TableConfig], page_rows: int) -> PhysicalTable:
        if members[0].fixed_size is not None:
            return self._make_fixed(members[0], page_rows)
        name = "+".join(t.name for t in members)
        hint = sum(t.capacity or 0 for t in members)
        slots = max(_DEFAULT_SLOTS, int(hint / _MAX_LOAD) + 1)
        n = len(members)
        sketches = {
            i: CountMinSketch(t.admission.counter_slots, t.admission.min_count, device=self._device)
            for i, t in enumerate(members)
            if t.admission.enabled
        }
        return PhysicalTable(
            name=name,
            tables=tuple(members),
            dim=members[0].dim,
            dtype=members[0].dtype,
            tag_bits=0 if n == 1 else (n - 1).bit_length(),
            hash_table=HashTable(slots, self._device, max_load=_MAX_LOAD, num_tags=n),
            values=PagedTensor(
                members[0].dim,
                dtype=members[0].dtype,
                device=self._device,
                page_rows=page_rows,
                capacity=hint,
                name=name,
            ),
            meta=RowMetadata(self._device),
            sketches=sketches,
        )

    def _make_fixed(self, t: TableConfig, page_rows: int) -> PhysicalTable:
        """A fixed-size table: all ``fixed_size`` rows made and initialized now (row = id)."""
        n = t.fixed_size
        assert n is not None and t.initializer is not None and t.init_seed is not None
        # A small vocabulary needs no 64K-row page.
        page = min(page_rows, 1 << max(n - 1, 0).bit_length())
        values = PagedTensor(
            t.dim, dtype=t.dtype, device=self._device, page_rows=page, capacity=n, name=t.name
        )
        values.ensure_rows(n)
        ids = torch.arange(n, dtype=torch.int64, device=self._device)
        init_rows_into(values, ids, ids, t.initializer, seed=t.init_seed, check_bounds=False)
        meta = RowMetadata(self._device)
        meta.ensure_rows(n)
        return PhysicalTable(
            name=t.name,
            tables=(t,),
            dim=t.dim,
            dtype=t.dtype,
            tag_bits=0,
            hash_table=FixedIndex(n, self._device),
            values=values,
            meta=meta,
            fixed_size=n,
        )

    # ------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the rows and hash tables live."""
        return self._device

    @property
    def physical_tables(self) -> dict[str, PhysicalTable]:
        """Physical tables by name (e.g. ``"item+user"``), in config order."""
        return dict(self._physical)

    @property
    def table_groups(self) -> dict[str, tuple[str, ...]]:
        """The logical tables each physical table holds: ``{physical: (logical, ...)}``."""
        return {name: p.table_names for name, p in self._physical.items()}

    def memory_stats(self) -> MemoryStats:
        """Bytes each physical table holds on :attr:`device`: values, hash slots, row
        metadata, optimizer slots (the value store's companions), admission counters, and
        totals; ``print()`` it for a table. See :mod:`recstack.embedding_engine.memory`."""
        return collection_memory(self)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> EmbeddingCollection:
        # nn.Module.to()/cuda()/cpu()/half() end here. The tables are no Parameters or
        # buffers, so the base class would leave them behind: move them to where fn sends
        # a float tensor, never cast them.
        move_collection_(self, target_device(fn, self._device))
        return super()._apply(fn, recurse)

    def physical_table_of(self, table: str) -> str:
        """The name of the physical table holding logical table ``table``."""
        if table not in self._physical_of:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        return self._physical_of[table][0]

    def find_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows (in its physical table's values) of ``ids`` of logical table ``table``.

        Read-only: ``-1`` for ids without a row. Raises ValueError for ids out of range.
        """
        pname, index = self._physical_of.get(table, (None, 0))
        if pname is None:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        phys = self._physical[pname]
        ids = _as_ids(ids, f"EmbeddingCollection.find_rows({table!r})", self._device)
        if ids.numel() and bool(phys.bad_ids(ids).any()):
            _raise_bad_ids(phys, f"find_rows of table {table!r}", table, ids)
        return phys.hash_table.find(ids, index, check_keys=False)

    def num_ids(self, table: str) -> int:
        """How many ids of logical table ``table`` have a row."""
        pname, index = self._locate(table)
        phys = self._physical[pname]
        if len(phys.tables) == 1:
            return len(phys.hash_table)
        return self._num_ids[pname][index]

    def recount_ids(self) -> None:
        """Recount :meth:`num_ids` from the hash tables (after keys were inserted directly)."""
        for pname, phys in self._physical.items():
            if len(phys.tables) > 1:
                tags = self._all_entries(phys)[1]
                self._num_ids[pname] = torch.bincount(tags, minlength=len(phys.tables)).tolist()

    def _locate(self, table: str) -> tuple[str, int]:
        if table not in self._physical_of:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        return self._physical_of[table]

    # ------------------------------------------------------------------------------------
    # Steps and eviction
    # ------------------------------------------------------------------------------------

    def keyed_states(self) -> dict[str, KeyedState]:
        """Every logical table as a core ``KeyedState`` (with deltas and the admission
        counters), by table name: what a checkpoint saves of the rows (core's
        ``HasKeyedStates``). See :mod:`recstack.embedding_engine.state`."""
        return collection_table_states(self)

    def get_extra_state(self) -> dict[str, int]:
        """The training step counters, which ``state_dict()`` carries (JSON-able)."""
        return {"step": self._step, "forwards": self._forwards}

    def set_extra_state(self, state: object) -> None:
        """Restore :meth:`get_extra_state` output (from ``load_state_dict``)."""
        if not isinstance(state, dict) or set(state) != {"step", "forwards"}:
            raise ValueError(
                "EmbeddingCollection.load_state_dict: the extra state must be "
                f"{{'step': int, 'forwards': int}}, got {state!r}"
            )
        for key in ("step", "forwards"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(
                    f"EmbeddingCollection.load_state_dict: {key} must be an int >= 0, got {v!r}"
                )
        self._step, self._forwards = state["step"], state["forwards"]

    @property
    def step(self) -> int:
        """The step the next training forward stamps on its rows (then advances by one)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Set :attr:`step` (e.g. to the trainer's global step after a restore)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"EmbeddingCollection.set_step: step must be an int >= 0, got {step!r}"
            )
        self._step = step

    def evict(
        self,
        table: str | None = None,
        *,
        older_than_step: int | None = None,
        min_count: int | None = None,
    ) -> dict[str, int]:
        """Erase ids last seen before ``older_than_step`` or seen fewer than ``min_count`` times.

        Args:
            table: a logical table, or ``None`` for every table.
            older_than_step: evict ids whose last-seen step is ``< older_than_step``.
            min_count: evict ids whose hit count is ``< min_count``.

        The rules are or-ed; at least one is required. Evicted rows go to the free list and
        are re-initialized when new ids take them. Call it after the optimizer step (see the
        module docs). Fixed-size tables never evict: ``table=None`` skips them.

        Returns:
            ``{logical table: ids evicted}`` for the tables considered.

        Raises:
            ValueError: ``table`` is a fixed-size table.
        """
        if older_than_step is None and min_count is None:
            raise ValueError("EmbeddingCollection.evict: pass older_than_step and/or min_count")
        for what, v in (("older_than_step", older_than_step), ("min_count", min_count)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(
                    f"EmbeddingCollection.evict: {what} must be an int, got {type(v).__name__}"
                )
        names = list(self._physical_of) if table is None else [table]
        out: dict[str, int] = {}
        for name in names:
            pname, index = self._locate(name)
            if self._physical[pname].is_fixed_size:
                if table is None:
                    continue
                raise ValueError(
                    f"EmbeddingCollection.evict: table {name!r} is a fixed-size table; it "
                    "keeps all its rows and cannot evict"
                )
            out[name] = self._evict_stale(
                self._physical[pname], index, older_than_step, min_count, None
            )
        return out

    def maybe_evict(self) -> dict[str, int]:
        """Apply every table's ``Eviction(ttl_steps=, min_count=)`` rules now.

        ``ttl_steps=n`` evicts ids that none of the last ``n`` training forwards saw (last
        seen before ``step - n``); ``min_count=c`` evicts ids seen fewer than ``c`` times.
        Returns ``{logical table: ids evicted}`` for the tables with such rules.
        """
        return self._run_rules(protect_step=None)

    def _run_rules(self, protect_step: int | None) -> dict[str, int]:
        out: dict[str, int] = {}
        for phys in self._physical.values():
            for index, cfg in enumerate(phys.tables):
                ev = cfg.eviction
                if ev.ttl_steps is None and ev.min_count is None:
                    continue
                older = None if ev.ttl_steps is None else self._step - ev.ttl_steps
                out[cfg.name] = self._evict_stale(phys, index, older, ev.min_count, protect_step)
        return out

    def _all_entries(self, phys: PhysicalTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, table indices, rows)`` of every entry of ``phys``, by ascending row."""
        chunks = list(phys.hash_table.tagged_items(chunk_size=max(len(phys.hash_table), 1)))
        if not chunks:
            empty = torch.zeros(0, dtype=torch.int64, device=self._device)
            return empty, empty, empty
        return chunks[0]

    def _entries(self, phys: PhysicalTable, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, rows)`` of logical table ``index``, by ascending row."""
        keys, tags, rows = self._all_entries(phys)
        if len(phys.tables) > 1:
            mine = tags == index
            keys, rows = keys[mine], rows[mine]
        return keys, rows

    def _erase(self, phys: PhysicalTable, index: int, keys: torch.Tensor) -> int:
        if not keys.numel():
            return 0
        n = phys.hash_table.erase(keys, index)
        if len(phys.tables) > 1:
            self._num_ids[phys.name][index] -= n
        log = self._removed.get(phys.tables[index].name)
        if log is not None:
            log.append(keys)
        return n

    def _evict_stale(
        self,
        phys: PhysicalTable,
        index: int,
        older_than_step: int | None,
        min_count: int | None,
        protect_step: int | None,
    ) -> int:
        keys, rows = self._entries(phys, index)
        mask = stale_mask(phys.meta, rows, older_than_step=older_than_step, min_count=min_count)
        if protect_step is not None:
            mask &= phys.meta.last_seen[rows] != protect_step
        return self._erase(phys, index, keys[mask])

    def _enforce_caps(self, stamped: int) -> None:
        """Evict LRU/LFU ids of tables over ``max_rows``, sparing the batch just looked up."""
        for phys in self._physical.values():
            for index, cfg in enumerate(phys.tables):
                cap = cfg.eviction.max_rows
                if cap is None:
                    continue
                excess = self.num_ids(cfg.name) - cap
                if excess <= 0:
                    continue
                keys, rows = self._entries(phys, index)
                protected = phys.meta.last_seen[rows] == stamped
                victims = cap_victims(phys.meta, rows, cfg.eviction.policy, excess, protected)
                self._erase(phys, index, keys[victims])

    # ------------------------------------------------------------------------------------
    # Sparse gradients
    # ------------------------------------------------------------------------------------

    def sparse_parameters(self) -> Iterator[EmbeddingSparseParameter]:
        """Every physical table as a core ``SparseParameter``, for a sparse optimizer:
        ``SparseAdam(ec.sparse_parameters(), lr=...)``, then ``opt.step()`` reads the
        gradients the backward stored and ``opt.zero_grad()`` clears them.

        The rows are not ``nn.Parameter``\\ s: ``self.parameters()`` does not hold them, so
        a ``torch.optim`` optimizer over ``model.parameters()`` trains the dense weights
        only. See :mod:`recstack.embedding_engine.parameters`.
        """
        for _, param in self.named_sparse_parameters():
            yield param

    def named_sparse_parameters(self) -> Iterator[tuple[str, EmbeddingSparseParameter]]:
        """``(physical table name, sparse parameter)`` of every physical table (see
        :meth:`sparse_parameters`), e.g. for a learning rate per table."""
        for name in self._physical:
            yield name, EmbeddingSparseParameter(self, name)

    def sparse_grads(self) -> dict[str, SparseGrad]:
        """Coalesced fp32 gradients by physical table name, for a sparse optimizer.

        Rows index the physical table's ``values``. A physical table no backward reached
        since the last training forward (or :meth:`zero_grad_sparse`) has no entry. Reading
        them marks them read: the next training forward drops them (see the module docs).
        """
        self._unread.clear()
        return dict(self._grads)

    def zero_grad_sparse(self) -> None:
        """Drop the stored sparse gradients (every training forward drops read ones too)."""
        self._grads.clear()
        self._unread.clear()

    def _read_grad(self, name: str) -> SparseGrad | None:
        """Physical table ``name``'s stored gradient, marked read (its sparse parameter)."""
        self._unread.discard(name)
        return self._grads.get(name)

    def _clear_grad(self, name: str) -> None:
        """Drop physical table ``name``'s stored gradient (its sparse parameter)."""
        self._grads.pop(name, None)
        self._unread.discard(name)

    def _drop_read_grads(self) -> None:
        """A training forward's start: drop the stored gradients, none of them unread."""
        if self._unread:
            raise RuntimeError(
                "EmbeddingCollection: a training forward started while the gradients a "
                f"backward stored for physical table(s) {sorted(self._unread)} were never "
                "read; this forward would drop them (it may evict ids and give their rows "
                "to new ids, so stored gradients cannot carry over it). Step the sparse "
                "optimizer after each backward (opt.step(); opt.zero_grad()), call "
                "opt.accumulate() after each backward to sum micro-batches into one step, "
                "or drop them with ec.zero_grad_sparse()"
            )
        self._grads.clear()

    def fuse_optimizer(self, optimizer: RowUpdater | None, *, one_pass: bool = False) -> None:
        """Apply ``optimizer``'s updates inside the backward (``None``: stop doing so).

        ``optimizer`` speaks core's :class:`~recstack.core.RowUpdater` protocol (every
        ``recstack.sparse_optim`` optimizer does). For each physical table whose ``values``
        it trains, a training backward reduces the gradient by row and updates the rows and
        the optimizer's state right there (the row sums go from the reduction kernel to
        the update kernel, or with ``one_pass=True`` stay in registers of one kernel; see
        ``lookup_backward_fused``): no :class:`SparseGrad` is stored
        (:meth:`sparse_grads` has no entry for the table) and no ``optimizer.step()`` is
        needed for it. Each backward is one optimizer step of the tables it reaches;
        NaN/Inf in the output gradients writes nothing and raises or counts a skipped step
        per the optimizer's ``on_nonfinite``, checked per table. Tables the optimizer does
        not train keep their stored gradients.

        Raises:
            TypeError: ``optimizer`` does not have ``begin_row_update`` /
                ``end_row_update``.
        """
        if optimizer is not None and not isinstance(optimizer, RowUpdater):
            raise TypeError(
                "EmbeddingCollection.fuse_optimizer: the optimizer must speak core's "
                f"RowUpdater protocol (begin_row_update / end_row_update); got "
                f"{type(optimizer).__name__}"
            )
        self._updater = optimizer
        self._one_pass = bool(one_pass)

    @property
    def fused_optimizer(self) -> RowUpdater | None:
        """The optimizer :meth:`fuse_optimizer` set, or ``None``."""
        return self._updater

    def _apply_fused(self, name: str, grad: SparseGrad) -> None:
        """A materialized gradient (compact-table batches) applied by the fused optimizer."""
        updater, values = self._updater, self._physical[name].values
        update = None
        if updater is not None and grad.rows.numel():
            update = updater.begin_row_update(values)
        if update is None:
            self._sink(name, grad)
            return
        assert updater is not None
        gate = update.gate if update.gate is not None else new_gate(grad.device)
        check_rows(gate, grad.values)
        apply_row_update(update, values, grad.rows, grad.values, gate)
        updater.end_row_update(values, gate=gate)

    def _sink(self, name: str, grad: SparseGrad) -> None:
        prev = self._grads.get(name)
        self._grads[name] = grad if prev is None else merge_sparse_grads([prev, grad])
        if grad.rows.numel():  # an empty gradient is no loss to drop
            self._unread.add(name)

    # ------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------

    def forward(
        self, kjt: KeyedJaggedTensor
    ) -> dict[str, torch.Tensor | JaggedTensor | PaddedSequence]:
        """Look up and pool every feature of ``kjt``; see the class docs for the outputs.

        Raises:
            TypeError: ``kjt`` is not a KeyedJaggedTensor or its ids are not integers.
            ValueError: a feature is missing, the KJT is on another device, a weighted
                feature has no weights, or an id is out of its table's range.
            RuntimeError: a training forward while stored sparse gradients are unread
                (see the module docs).
        """
        self._check_kjt(kjt)
        if self.training:
            self._drop_read_grads()
        batch = kjt.stride()
        track = self.training and torch.is_grad_enabled()
        anchor = torch.empty(0, device=self._device, requires_grad=True) if track else None
        out: dict[str, torch.Tensor | JaggedTensor | PaddedSequence] = {}
        for pname, phys in self._physical.items():
            pooled_fs, seq_fs = self._pooled[pname], self._sequence[pname]
            jts = {f.config.name: kjt[f.config.name] for f in pooled_fs + seq_fs}
            plan = self._plan(phys, pooled_fs, seq_fs, jts, batch)
            if track:
                pooled, seq = EmbeddingLookupFunction.apply(anchor, plan)
            else:
                pooled, seq = lookup_forward(plan)
            for k, f in enumerate(pooled_fs):
                out[f.config.name] = pooled[:, k, :]
            start = 0
            for f in seq_fs:
                jt = jts[f.config.name]
                n = jt.values.shape[0]
                rows = JaggedTensor(seq[start : start + n], jt.offsets)
                start += n
                out[f.config.name] = _sequence_output(f.config, rows, batch, phys.dim)
        if self.training:
            stamped = self._step
            self._step += 1
            self._forwards += 1
            self._enforce_caps(stamped)
            if self._evict_every is not None and self._forwards % self._evict_every == 0:
                self._run_rules(protect_step=stamped)
        return {f.name: out[f.name] for f in self._features}

    def _check_kjt(self, kjt: object) -> None:
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(
                f"EmbeddingCollection: expected a KeyedJaggedTensor, got {type(kjt).__name__}"
            )
        missing = [f.name for f in self._features if f.name not in kjt]
        if missing:
            raise ValueError(
                f"EmbeddingCollection: the KeyedJaggedTensor lacks feature(s) {missing} "
                f"(it has {kjt.keys()})"
            )
        if kjt.device != self._device:
            raise ValueError(
                f"EmbeddingCollection: the KeyedJaggedTensor is on {kjt.device} but the "
                f"tables are on {self._device}"
            )
        dtype = kjt.values().dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"EmbeddingCollection: ids must be integers, got {dtype}")

    def _plan(
        self,
        phys: PhysicalTable,
        pooled_fs: list[_Feature],
        seq_fs: list[_Feature],
        jts: dict[str, JaggedTensor],
        batch: int,
    ) -> LookupPlan:
        feats = pooled_fs + seq_fs
        ids = [jts[f.config.name].values.to(torch.int64) for f in feats]
        # Read to the host with the forward's first sync: no sync of its own.
        bad = self._bad_flag(phys, ids)
        keys = torch.cat(ids)
        # A merged table's entries are (id, logical table index) pairs.
        tags = None
        if len(phys.tables) > 1:
            tags = batch_tags([f.index for f in feats], [x.numel() for x in ids], self._device)
        n_pooled = sum(x.numel() for x in ids[: len(pooled_fs)])
        sink = self._sink
        updater = self._updater if self.training else None
        row_sort = None
        if self.training and keys.numel():
            # One sort dedups the entries and, kept in the plan, groups them for the backward.
            s = _sort_entries(keys, tags, read_with=[bad])
            self._raise_bad_ids(phys, feats, ids, s.read[0])
        if phys.is_fixed_size:
            # Row = id: no hash table, no compact table (every row exists, eval included).
            table = phys.values
            rows = keys
            if self.training and keys.numel():
                no_new = torch.zeros(s.unique.shape, dtype=torch.bool, device=self._device)
                phys.meta.touch(s.unique, self._step, s.counts, no_new)
                row_sort = RowSort(s.order, s.sorted_seg, s.unique, s.num_unique)
            else:
                self._raise_bad_ids(phys, feats, ids, int(bad))
        elif self.training and keys.numel():
            rows_u, partial = self._insert(phys, s.unique, s.unique_tags, s.counts)
            if partial:
                # Not-yet-admitted ids: read a compact table, send admitted rows' grads on.
                table = self._compact_table(phys, s.unique, s.unique_tags, rows_u)
                rows = s.inverse
                sink = _RowMapSink(rows_u, self._sink if updater is None else self._apply_fused)
                row_sort = RowSort(s.order, s.sorted_seg, None, s.num_unique)
            else:
                table = phys.values
                rows = rows_u[s.inverse]
                row_sort = RowSort(s.order, s.sorted_seg, rows_u, s.num_unique, rows_sorted=False)
        elif self.training:
            table, rows = phys.values, keys  # no ids: nothing is read
        else:
            table, rows = self._eval_rows(phys, feats, ids, keys, tags, bad)
        offsets, weights = self._pooled_layout(pooled_fs, jts)
        return LookupPlan(
            name=phys.name,
            table=table,
            batch_size=batch,
            pooled_rows=rows[:n_pooled],
            pooled_offsets=offsets,
            modes=self._modes[phys.name],
            weights=weights,
            sequence_rows=rows[n_pooled:],
            sink=sink,
            row_sort=row_sort,
            # A compact table's plan hands its mapped gradient to _apply_fused instead.
            updater=updater if table is phys.values else None,
            one_pass=self._one_pass,
        )

    def _bad_flag(self, phys: PhysicalTable, ids: list[torch.Tensor]) -> torch.Tensor:
        """Device bool: some id is out of range (checked on the host with a later read).
        Only fixed-size tables have a range: any int64 is an id of a dynamic table."""
        flags = [phys.bad_ids(x).any() for x in ids if x.numel()] if phys.is_fixed_size else []
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        return torch.stack(flags).any()

    def _raise_bad_ids(
        self, phys: PhysicalTable, feats: list[_Feature], ids: list[torch.Tensor], bad: int
    ) -> None:
        """Raise for the first feature with an id out of range when ``bad`` (the flag read)."""
        if not bad:
            return
        for f, x in zip(feats, ids, strict=True):
            if x.numel() and bool(phys.bad_ids(x).any()):
                _raise_bad_ids(phys, f"feature {f.config.name!r}", f.config.table, x)

    def _eval_rows(
        self,
        phys: PhysicalTable,
        feats: list[_Feature],
        ids: list[torch.Tensor],
        keys: torch.Tensor,
        tags: BatchTags | None,
        bad: torch.Tensor,
    ) -> tuple[PagedTensor, torch.Tensor]:
        """``(table, rows)`` of an eval lookup: the physical rows when every id has one (one
        find, one sync, no dedup), else a compact table of the batch's unique entries."""
        rows = phys.hash_table.find(keys, None if tags is None else tags.tags, check_keys=False)
        missing = (rows < 0).any() if rows.numel() else torch.zeros_like(bad)
        bad_v, missing_v = torch.stack([bad, missing]).tolist()
        self._raise_bad_ids(phys, feats, ids, bad_v)
        if not missing_v:
            return phys.values, rows
        s = _sort_entries(keys, tags)
        # The rows are already found: spread them to the unique entries, no second find.
        rows_u = torch.empty_like(s.unique).scatter_(0, s.inverse, rows)
        return self._compact_table(phys, s.unique, s.unique_tags, rows_u), s.inverse

    def _insert(
        self,
        phys: PhysicalTable,
        unique: torch.Tensor,
        tags: torch.Tensor | None,
        hits: torch.Tensor,
    ) -> tuple[torch.Tensor, bool]:
        """Rows of the unique entries (ids, and their table indices in a merged table),
        inserting and initializing the new admitted ones.

        Returns ``(rows, partial)``: ``rows`` is -1 for ids admission keeps out, and
        ``partial`` says whether there are any. Stamps the rows' metadata.
        """
        if not unique.numel():
            return unique, False
        admit = self._admit(phys, unique, tags, hits) if phys.sketches else None
        if admit is not None and bool(admit.all()):
            admit = None
        keys_a, tags_a, hits_a = unique, tags, hits
        if admit is not None:
            keys_a, hits_a = unique[admit], hits[admit]
            tags_a = None if tags is None else tags[admit]
        held = len(phys.hash_table)
        if keys_a.numel():
            rows_a, is_new = phys.hash_table.find_or_insert(keys_a, tags_a)
        else:
            rows_a = keys_a
            is_new = torch.zeros(0, dtype=torch.bool, device=self._device)
        n_new = len(phys.hash_table) - held  # known on the host: no sync to find the new rows
        n_rows = phys.hash_table.num_rows_allocated
        phys.values.ensure_rows(n_rows)
        phys.meta.ensure_rows(n_rows)
        phys.meta.touch(rows_a, self._step, hits_a, is_new)
        if n_new:
            new = torch.nonzero_static(is_new, size=n_new).squeeze(1)
            new_tags = None if tags_a is None else tags_a.index_select(0, new)
            self._init_new(phys, rows_a.index_select(0, new), keys_a.index_select(0, new), new_tags)
        if admit is None:
            return rows_a, False
        rows = torch.full_like(unique, -1)
        rows[admit] = rows_a
        return rows, True

    def _admit(
        self,
        phys: PhysicalTable,
        unique: torch.Tensor,
        tags: torch.Tensor | None,
        hits: torch.Tensor,
    ) -> torch.Tensor:
        """Bool mask of the unique entries that have or get a row (counting the others)."""
        admit = torch.ones(unique.shape, dtype=torch.bool, device=self._device)
        absent = phys.hash_table.find(unique, tags, check_keys=False) < 0
        for t, sketch in phys.sketches.items():
            mine = absent & (tags == t) if tags is not None else absent
            counts = sketch.add(unique[mine], hits[mine])
            admit[mine] = counts >= phys.tables[t].admission.min_count
        return admit

    def _init_new(
        self,
        phys: PhysicalTable,
        new_rows: torch.Tensor,
        new_keys: torch.Tensor,
        tags: torch.Tensor | None,
    ) -> None:
        """Initialize rows new ids took (fresh or freed by eviction), count the ids, and
        announce the rows (`PagedTensor.rows_reset`) to whoever keeps state per row.
        ``tags``: the ids' logical table indices (``None`` for a physical table of one)."""
        logical = new_keys
        if tags is None:
            added = [new_keys.numel()]
        else:
            # One sync for the per-table counts; each table's rows are then found unsynced.
            added = torch.bincount(tags, minlength=len(phys.tables)).tolist()
            counts = self._num_ids[phys.name]
            self._num_ids[phys.name] = [a + b for a, b in zip(counts, added, strict=True)]
        for t, cfg in enumerate(phys.tables):
            if not added[t]:
                continue
            rows_t, keys_t = new_rows, logical
            if tags is not None:
                mine = torch.nonzero_static(tags == t, size=added[t]).squeeze(1)
                rows_t, keys_t = new_rows.index_select(0, mine), logical.index_select(0, mine)
            init_rows_into(
                phys.values, rows_t, keys_t, cfg.initializer, seed=cfg.init_seed, check_bounds=False
            )
        # State kept per row elsewhere (a sparse optimizer's moments) starts afresh too.
        phys.values.rows_reset(new_rows)

    def _compact_table(
        self,
        phys: PhysicalTable,
        unique: torch.Tensor,
        tags: torch.Tensor | None,
        rows: torch.Tensor,
    ) -> PagedTensor:
        """``[U, dim]``: the rows of the unique entries (ids, with their table indices in a
        merged table), the eval default where ``rows < 0``."""
        vals = torch.zeros((unique.numel(), phys.dim), dtype=phys.dtype, device=self._device)
        found = rows >= 0
        vals[found] = phys.values.gather_rows(rows[found], check_bounds=False)
        for t, cfg in enumerate(phys.tables):
            if cfg.eval_default != "initializer":
                continue  # "zeros": already zero
            need = ~found if tags is None else ~found & (tags == t)
            keys_t = unique[need]
            if keys_t.numel():
                assert cfg.initializer is not None and cfg.init_seed is not None
                vals[need] = init_rows(
                    keys_t, phys.dim, cfg.initializer, seed=cfg.init_seed, dtype=phys.dtype
                )
        return PagedTensor.wrap(vals, name=f"{phys.name}.eval")

    def _pooled_layout(
        self, pooled_fs: list[_Feature], jts: dict[str, JaggedTensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key-major offsets ``[K_p * B + 1]`` and per-id weights of the pooled features."""
        zero = torch.zeros(1, dtype=torch.int64, device=self._device)
        if not pooled_fs:
            return zero, None
        lengths = [jts[f.config.name].lengths() for f in pooled_fs]
        offsets = torch.cat([zero, torch.cat(lengths).cumsum(0)])
        if not any(f.config.weighted for f in pooled_fs):
            return offsets, None
        weights = []
        for f in pooled_fs:
            jt = jts[f.config.name]
            if not f.config.weighted:
                weights.append(torch.ones(jt.values.shape[0], device=self._device))
            elif jt.weights is None:
                raise ValueError(
                    f"EmbeddingCollection: feature {f.config.name!r} is weighted but the "
                    "KeyedJaggedTensor has no weights"
                )
            else:
                weights.append(jt.weights.to(torch.float32))
        return offsets, torch.cat(weights)


def _sequence_output(
    config: FeatureConfig, rows: JaggedTensor, batch: int, dim: int
) -> torch.Tensor | JaggedTensor | PaddedSequence:
    """A sequence feature's output from its looked-up rows (see the class docs)."""
    if config.max_len is None:
        return rows
    if config.pooling == "tile":
        # A view of the padded copy: same gradient path as padded "none".
        padded = padded_sequence(rows, config.max_len, config.truncate)
        assert isinstance(padded, torch.Tensor)
        return padded.reshape(batch, config.output_dim(dim))
    return padded_sequence(rows, config.max_len, config.truncate, with_lengths=config.with_lengths)


class _RowMapSink:
    """Maps a compact per-batch table's gradient to physical rows, dropping rows < 0."""

    def __init__(self, rows: torch.Tensor, sink: Callable[[str, SparseGrad], None]) -> None:
        self._rows = rows
        self._sink = sink

    def __call__(self, name: str, grad: SparseGrad) -> None:
        rows = self._rows[grad.rows]
        keep = rows >= 0
        self._sink(name, SparseGrad(rows[keep], grad.values[keep]).coalesce())


def _as_ids(ids: object, what: str, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what}: ids must be integers, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{what}: ids are on {ids.device} but the tables on {device}")
    return ids.reshape(-1).to(torch.int64)


def _sort_entries(
    keys: torch.Tensor, tags: BatchTags | None, read_with: Sequence[torch.Tensor] = ()
) -> SortedIds:
    """One sort of a batch's ids, grouping ``(id, table index)`` pairs in a merged table."""
    if tags is None:
        return sort_ids(keys, read_with=read_with)
    return sort_ids(keys, tags=tags.tags, tag_order=tags.order, read_with=read_with)


def _raise_bad_ids(phys: PhysicalTable, where: str, table: str, ids: torch.Tensor) -> None:
    # Only fixed-size tables have ids out of range: a dynamic table takes any int64.
    bad = int(ids[phys.bad_ids(ids)][0])
    raise ValueError(
        f"EmbeddingCollection: {where} (table {table!r}): id {bad} is out of range; "
        f"table {table!r} is a fixed-size table whose ids must lie in {phys.id_range()} "
        "(ids are never wrapped)"
    )
