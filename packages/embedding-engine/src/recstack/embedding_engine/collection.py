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
hit count (every occurrence counts) in its physical table's ``meta``
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
table (:class:`~recstack.embedding_engine.fixed_index.FixedIndex` stands in its place). Its
``N`` rows are created up front and initialized like a dynamic table's rows
(:func:`~recstack.embedding_engine.kernels.init_rows.init_rows_into` from ids ``0..N-1``,
so values are the same pure function of id and seed). A fixed table is never merged: it is
its own physical table, named after it, whatever ``merge_tables`` says. Eval reads the same
rows; the gradient is its physical table's SparseGrad as for dynamic tables; row metadata
(last-seen step, hits) is kept too. It has no eviction, admission or capacity (rejected by
:class:`~recstack.embedding_engine.config.TableConfig`), and :meth:`EmbeddingCollection.evict`
skips it.

**Padded sequences and tile pooling.** ``pooling="none"`` with ``max_len`` outputs a
``[B, max_len, dim]`` tensor: a bag's kept ids first, then zeros. A longer bag is cut at the
end the feature's ``truncate`` names, as the feature engine's ``Truncate``: ``"left"`` (the
default) keeps its last ``max_len`` ids, the most recent behaviours; ``"right"`` its first.
``with_lengths=True`` adds each row's id count (:mod:`recstack.embedding_engine.sequence`).
``pooling="tile"`` outputs that padded sequence reshaped to ``[B, max_len * dim]``: position
``j`` of a bag occupies columns ``[j * dim, (j + 1) * dim)``. Both share the sequence
features' lookup and gradient path.

**Where each part lives.** The collection composes small modules:
:mod:`~recstack.embedding_engine.physical` groups the logical tables into physical tables
and makes their storage; :mod:`~recstack.embedding_engine.planner` plans each physical
table's lookup of a batch (which features read it, dedup, inserts through
:mod:`~recstack.embedding_engine.insert`, compact tables); :mod:`~recstack.embedding_engine.
autograd` runs the lookup and its sparse backward; :mod:`~recstack.embedding_engine.
sparse_grads` keeps the gradients and the fused optimizer; :mod:`~recstack.embedding_engine.
eviction` and :mod:`~recstack.embedding_engine.admission` decide which ids lose or get rows;
:mod:`~recstack.embedding_engine.state` and :mod:`~recstack.embedding_engine.device` export
and move the tables.

Examples:
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

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor, KeyedState, RowUpdater, SparseGrad
from recstack.core.checks import check_int
from recstack.embedding_engine.autograd import EmbeddingLookupFunction, lookup_forward
from recstack.embedding_engine.config import FeatureConfig, TableConfig, check_configs
from recstack.embedding_engine.device import move_tables_, target_device
from recstack.embedding_engine.eviction import apply_eviction_rules, enforce_caps, evict_stale
from recstack.embedding_engine.fixed_index import FixedIndex
from recstack.embedding_engine.memory import MemoryStats, collection_memory
from recstack.embedding_engine.parameters import EmbeddingSparseParameter
from recstack.embedding_engine.physical import (
    DEFAULT_PAGE_ROWS,
    PhysicalTable,
    TableLocation,
    build_physical_tables,
)
from recstack.embedding_engine.planner import FeatureOutput, LookupPlanner
from recstack.embedding_engine.sequence import PaddedSequence
from recstack.embedding_engine.sparse_grads import SparseGradStore
from recstack.embedding_engine.state import collection_table_states
from recstack.embedding_engine.table_rows import TableRows
from recstack.embedding_engine.tiers import TierStats

# FixedIndex and PhysicalTable are what ``physical_tables`` holds: importable from here too.
__all__ = ["DEFAULT_PAGE_ROWS", "EmbeddingCollection", "FixedIndex", "PhysicalTable"]


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
    * ``pooling="none"`` without ``max_len`` and with ``gather=False``: a
      :class:`~recstack.embedding_engine.table_rows.TableRows`, the table, each id's row
      and the offsets, for a consumer that reads the rows in its own kernel (the rows are
      never copied out; their gradient comes back through its sink).
    * ``pooling="tile"``: that padded tensor reshaped to ``[B, max_len * dim]``.

    ``fixed_size`` tables take ids in ``[0, fixed_size)`` as rows directly and are never
    merged (see the module docs).

    Raises:
        ConfigError: invalid configs (:func:`check_configs`).
        ValueError: ``evict_every`` is not ``None`` or an int >= 1.
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
        if evict_every is not None:
            _check_count(evict_every, "EmbeddingCollection: evict_every", minimum=1)
        self._evict_every = evict_every
        self._step = 0
        self._forwards = 0
        by_name = check_configs(tables, features)
        # A real tensor's device carries the index ("cuda" -> "cuda:0"), so the device
        # checks below compare equal for tensors the user made on the default GPU.
        self._device = torch.empty(0, device="cpu" if device is None else device).device
        self._physical, self._located = build_physical_tables(
            by_name.values(), self._device, merge_tables=merge_tables, page_rows=page_rows
        )
        self._features = list(features)
        self._planner = LookupPlanner(self._physical, self._located, features, self._device)
        self._grads = SparseGradStore()
        # A prefetch promoted the next training batch's rows: its forward needs not.
        self._prefetched = False
        for name, phys in self._physical.items():
            if phys.tiers is not None:
                # A stored gradient follows the rows a promotion moves.
                phys.values.on_rows_moved(
                    partial(self._grads.move_rows, name), holds=partial(self._grads.holds, name)
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
    def feature_names(self) -> tuple[str, ...]:
        """The features a batch must carry, in config order."""
        return tuple(f.name for f in self._features)

    @property
    def tiered_tables(self) -> tuple[str, ...]:
        """The tables with an ``hbm_budget`` (each its own physical table), in config
        order: those :meth:`prefetch` works on."""
        return tuple(n for n, p in self._physical.items() if p.tiers is not None)

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
        device = move_tables_(self._physical, self._device, target_device(fn, self._device))
        # The collection's own tensors are small: moved after the tables, they cannot fail
        # for lack of memory where the tables fit.
        self._planner.move_to_(device)
        self._grads.move_to_(device)
        self._device = device
        return super()._apply(fn, recurse)

    def physical_table_of(self, table: str) -> str:
        """The name of the physical table holding logical table ``table``."""
        return self._locate(table).physical

    def find_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows (in its physical table's values) of ``ids`` of logical table ``table``.

        Read-only: ``-1`` for ids without a row. Raises ValueError for ids out of range.
        """
        pname, index = self._locate(table)
        phys = self._physical[pname]
        ids = _as_ids(ids, f"EmbeddingCollection.find_rows({table!r})", self._device)
        phys.check_ids(ids, f"find_rows of table {table!r}", table)
        return phys.physical(phys.hash_table.find(ids, index, check_keys=False))

    def num_ids(self, table: str) -> int:
        """How many ids of logical table ``table`` have a row."""
        pname, index = self._locate(table)
        return self._physical[pname].num_ids(index)

    def recount_ids(self) -> None:
        """Recount :meth:`num_ids` from the hash tables (after keys were inserted directly)."""
        for phys in self._physical.values():
            phys.recount_ids()

    def _locate(self, table: str) -> TableLocation:
        if table not in self._located:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        return self._located[table]

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
        where = "EmbeddingCollection.load_state_dict:"
        step = _check_count(state["step"], f"{where} step", minimum=0)
        self._forwards = _check_count(state["forwards"], f"{where} forwards", minimum=0)
        self._step = step

    @property
    def step(self) -> int:
        """The step the next training forward stamps on its rows (then advances by one)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Set :attr:`step` (e.g. to the trainer's global step after a restore)."""
        self._step = _check_count(step, "EmbeddingCollection.set_step: step", minimum=0)

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
            if v is not None:
                check_int(v, f"EmbeddingCollection.evict: {what}")
        names = list(self._located) if table is None else [table]
        out: dict[str, int] = {}
        for name in names:
            pname, index = self._locate(name)
            phys = self._physical[pname]
            if phys.is_fixed_size:
                if table is None:
                    continue
                raise ValueError(
                    f"EmbeddingCollection.evict: table {name!r} is a fixed-size table; it "
                    "keeps all its rows and cannot evict"
                )
            out[name] = evict_stale(
                phys, index, older_than_step=older_than_step, min_count=min_count
            )
        return out

    def maybe_evict(self) -> dict[str, int]:
        """Apply every table's ``Eviction(ttl_steps=, min_count=)`` rules now.

        ``ttl_steps=n`` evicts ids that none of the last ``n`` training forwards saw (last
        seen before ``step - n``); ``min_count=c`` evicts ids seen fewer than ``c`` times.
        Returns ``{logical table: ids evicted}`` for the tables with such rules.
        """
        return apply_eviction_rules(self._physical.values(), self._step)

    # ------------------------------------------------------------------------------------
    # Tiered tables
    # ------------------------------------------------------------------------------------

    def prefetch(self, kjt: KeyedJaggedTensor) -> None:
        """Promote the rows ``kjt`` will read into the GPU tier of every tiered table
        (``TableConfig(hbm_budget=...)``), ahead of its training forward.

        Call it any time between training forwards (the Trainer calls it right after each
        forward): rows of training forwards whose backward has not run stay where they
        are, rows no one needs now go to host memory to make room, and the forward of
        ``kjt`` then finds its rows on the GPU and promotes none itself. Ids without a row
        yet are inserted by that forward, as always (in host memory when the GPU tier is
        full, until a later promotion moves them). Prefetching another batch than the next
        one trained only costs speed: rows that forward finds in host memory are read and
        updated there. Tables without a budget are left alone (a collection without tiered
        tables does nothing).

        Args:
            kjt: the next batch's ids (the keys this collection reads; others are ignored).

        Raises:
            TypeError, ValueError: as :meth:`forward` for a bad ``kjt``.
        """
        tiered = self.tiered_tables
        if not tiered:
            return
        self._check_kjt(kjt)
        for pname in tiered:
            phys = self._physical[pname]
            assert phys.tiers is not None
            jts = self._planner.batch_features(pname, kjt)
            if not jts.keys.numel():
                continue
            # Repeats need no dedup: the promotion claims each row once.
            rows = phys.hash_table.find(jts.keys, 0, check_keys=False)
            phys.tiers.promote(rows, keep_from=phys.tiers.keep_from(self._step))
        self._prefetched = True

    def tier_stats(self) -> dict[str, TierStats]:
        """What each tiered table did (:class:`~recstack.embedding_engine.tiers.TierStats`:
        the GPU tier's rows, its hit rate, rows promoted and bytes moved), by table."""
        return {n: p.tiers.stats() for n, p in self._physical.items() if p.tiers is not None}

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
        return self._grads.read_all()

    def zero_grad_sparse(self) -> None:
        """Drop the stored sparse gradients (every training forward drops read ones too)."""
        self._grads.clear_all()

    def _read_grad(self, name: str) -> SparseGrad | None:
        """Physical table ``name``'s stored gradient, marked read (its sparse parameter)."""
        return self._grads.read(name)

    def _clear_grad(self, name: str) -> None:
        """Drop physical table ``name``'s stored gradient (its sparse parameter)."""
        self._grads.clear(name)

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
        self._grads.updater = optimizer
        self._grads.one_pass = bool(one_pass)

    @property
    def fused_optimizer(self) -> RowUpdater | None:
        """The optimizer :meth:`fuse_optimizer` set, or ``None``."""
        return self._grads.updater

    # ------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------

    def forward(
        self, kjt: KeyedJaggedTensor, *, id_counts: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor | JaggedTensor | PaddedSequence | TableRows]:
        """Look up and pool every feature of ``kjt``; see the class docs for the outputs.

        Args:
            kjt: the batch's ids, one key per feature.
            id_counts: for ids deduplicated upstream: per feature, an integer tensor with
                one entry per id of the feature in ``kjt``, the sightings that id stands for.
                Admission and the rows' hit counts see these instead of one per id (the
                sharded collection sends each unique id to its owner once, with its count).
                Features not named count one per id. Ignored in eval.

        Raises:
            TypeError: ``kjt`` is not a KeyedJaggedTensor or its ids are not integers.
            ValueError: a feature is missing, the KJT is on another device, a weighted
                feature has no weights, an id is out of its table's range, or an
                ``id_counts`` entry names no feature or has another size than its ids.
            RuntimeError: a training forward while stored sparse gradients are unread
                (see the module docs).
        """
        self._check_kjt(kjt)
        if id_counts:
            self._check_id_counts(kjt, id_counts)
        if self.training:
            self._grads.drop_read()
        batch = kjt.stride()
        track = self.training and torch.is_grad_enabled()
        anchor = torch.empty(0, device=self._device, requires_grad=True) if track else None
        out: dict[str, FeatureOutput] = {}
        for pname, phys in self._physical.items():
            jts = self._planner.batch_features(pname, kjt)
            plan = self._planner.plan(
                phys,
                jts,
                batch,
                training=self.training,
                step=self._step,
                grads=self._grads,
                id_counts=id_counts,
                promote=not self._prefetched,
            )
            depends_on = None
            if track:
                if phys.tiers is not None and plan.done is not None:
                    phys.tiers.begin(self._step)  # its slots stay until its backward
                pooled, seq, depends_on = EmbeddingLookupFunction.apply(anchor, plan)
            else:
                pooled, seq = lookup_forward(plan)
            out.update(
                self._planner.outputs(pname, jts, pooled, seq, batch, phys.dim, plan, depends_on)
            )
        if self.training:
            self._prefetched = False
            stamped = self._step
            self._step += 1
            self._forwards += 1
            enforce_caps(self._physical.values(), stamped)
            if self._evict_every is not None and self._forwards % self._evict_every == 0:
                apply_eviction_rules(self._physical.values(), self._step, protect_step=stamped)
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

    def _check_id_counts(self, kjt: KeyedJaggedTensor, id_counts: object) -> None:
        if not isinstance(id_counts, Mapping):
            raise TypeError(
                f"EmbeddingCollection: id_counts must be a dict of tensors by feature, got "
                f"{type(id_counts).__name__}"
            )
        names = {f.name for f in self._features}
        for name, counts in id_counts.items():
            if name not in names:
                raise ValueError(f"EmbeddingCollection: id_counts names no feature {name!r}")
            n = kjt[name].values.numel()
            if (
                not isinstance(counts, torch.Tensor)
                or counts.dtype.is_floating_point
                or counts.dtype == torch.bool
                or counts.shape != (n,)
                or counts.device != self._device
            ):
                got = (
                    f"{counts.dtype} {tuple(counts.shape)} on {counts.device}"
                    if isinstance(counts, torch.Tensor)
                    else type(counts).__name__
                )
                raise ValueError(
                    f"EmbeddingCollection: id_counts[{name!r}] must be an integer tensor of "
                    f"shape ({n},) on {self._device} (one count per id), got {got}"
                )


def _check_count(value: object, name: str, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; a ValueError, whatever is wrong with it."""
    try:
        return check_int(value, name, minimum=minimum)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _as_ids(ids: object, what: str, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what}: ids must be integers, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{what}: ids are on {ids.device} but the tables on {device}")
    return ids.reshape(-1).to(torch.int64)
