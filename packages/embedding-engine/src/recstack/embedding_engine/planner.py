"""The per-batch lookup plan of each physical table: :class:`LookupPlanner`.

An :class:`~recstack.embedding_engine.collection.EmbeddingCollection` reads each physical
table once per batch, for all the features that read its logical tables. The planner knows
which features those are (:class:`TableReads`: pooled features first, then sequence
features, each with its logical table's index in the physical table), and for a batch
builds the :class:`~recstack.embedding_engine.autograd.LookupPlan` the lookup and its
backward run:

* the features' ids concatenated (pooled, then sequence), with their logical table index
  as tag in a merged table (:func:`~recstack.embedding_engine.merged.batch_tags`);
* in training, one sort dedups the entries (:func:`~recstack.embedding_engine.dedup.
  sort_ids`), the unique ones are found or inserted (:func:`~recstack.embedding_engine.
  insert.insert_ids`), and the sort is kept in the plan (:class:`~recstack.embedding_engine.
  autograd.RowSort`) so the backward groups the ids by row without sorting again;
* ids admission keeps out, and in eval ids without a row, read a compact per-batch table
  of the batch's unique entries (the eval default where there is no row), whose gradient
  is mapped back to the physical rows;
* the pooled features' key-major bag offsets, pooling modes and per-id weights.

:meth:`LookupPlanner.outputs` then splits the lookup's ``[B, K, dim]`` pooled buffer and
sequence rows into each feature's output (jagged, padded or tiled,
:mod:`recstack.embedding_engine.sequence`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor, PagedTensor, SparseGrad
from recstack.embedding_engine.autograd import LookupPlan, RowSort
from recstack.embedding_engine.config import FeatureConfig
from recstack.embedding_engine.dedup import SortedIds, sort_ids
from recstack.embedding_engine.feature_batch import FeatureBatch
from recstack.embedding_engine.insert import insert_ids
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM
from recstack.embedding_engine.merged import BatchTags, batch_tags
from recstack.embedding_engine.physical import PhysicalTable, TableLocation
from recstack.embedding_engine.sequence import PaddedSequence, padded_sequence
from recstack.embedding_engine.sparse_grads import SparseGradStore
from recstack.embedding_engine.table_rows import TableRows
from recstack.embedding_engine.tiers import RowTiers

__all__ = [
    "FeatureOutput",
    "FeatureRead",
    "LookupPlanner",
    "TableReads",
    "compact_table",
    "sequence_output",
]

#: What a feature's lookup gives: pooled ``[B, dim]`` or tiled ``[B, max_len * dim]`` rows,
#: jagged sequence rows, a padded sequence (with its lengths when asked), or a jagged
#: sequence's rows left in the table (``gather=False``).
FeatureOutput = torch.Tensor | JaggedTensor | PaddedSequence | TableRows


class FeatureRead(NamedTuple):
    """A feature and the logical table it reads.

    Attributes:
        config: the feature's config.
        table_index: its logical table's index in the physical table (its tag there).
    """

    config: FeatureConfig
    table_index: int


@dataclass
class TableReads:
    """The features that read one physical table, in the order its lookup outputs them.

    Attributes:
        pooled: the pooled (``"sum"``/``"mean"``) features, in config order.
        sequence: the sequence (``"none"``/``"tile"``) features, in config order.
        modes: int64 ``[len(pooled)]`` pooling modes (``MODE_SUM``/``MODE_MEAN``), on the
            table's device.
    """

    pooled: list[FeatureRead]
    sequence: list[FeatureRead]
    modes: torch.Tensor

    @property
    def features(self) -> list[FeatureRead]:
        """Pooled features, then sequence features: the order of the lookup's ids."""
        return self.pooled + self.sequence


class LookupPlanner:
    """Which features read which physical table, and each batch's lookup plan.

    Args:
        physical_names: the physical tables' names, in the collection's order.
        located: where each logical table lives.
        features: the features (validated against the tables), in config order.
        device: where the tables live.
    """

    def __init__(
        self,
        physical_names: Iterable[str],
        located: Mapping[str, TableLocation],
        features: Sequence[FeatureConfig],
        device: torch.device,
    ) -> None:
        self._device = device
        pooled: dict[str, list[FeatureRead]] = {p: [] for p in physical_names}
        sequence: dict[str, list[FeatureRead]] = {p: [] for p in pooled}
        for f in features:
            where = located[f.table]
            (sequence if f.is_sequence else pooled)[where.physical].append(
                FeatureRead(f, where.index)
            )
        self._reads = {
            p: TableReads(pooled[p], sequence[p], _pooling_modes(pooled[p], device)) for p in pooled
        }

    @property
    def reads(self) -> dict[str, TableReads]:
        """The features of each physical table, by physical table name."""
        return dict(self._reads)

    def move_to_(self, device: torch.device) -> None:
        """Keep the planner's tensors on ``device`` from now on.

        Args:
            device: where the tables now live.
        """
        for reads in self._reads.values():
            reads.modes = reads.modes.to(device)
        self._device = device

    def batch_features(self, name: str, kjt: KeyedJaggedTensor) -> FeatureBatch:
        """The batch's features that read physical table ``name``, by feature name.

        Args:
            name: the physical table.
            kjt: the batch.
        """
        reads = self._reads[name]
        return FeatureBatch(kjt, [f.config.name for f in reads.features], len(reads.pooled))

    # ------------------------------------------------------------------------------------
    # Plans
    # ------------------------------------------------------------------------------------

    def plan(
        self,
        phys: PhysicalTable,
        jts: FeatureBatch,
        batch: int,
        *,
        training: bool,
        step: int,
        grads: SparseGradStore,
        id_counts: Mapping[str, torch.Tensor] | None = None,
        promote: bool = True,
    ) -> LookupPlan:
        """The lookup plan of ``phys`` for one batch; in training, inserts the new ids.

        Args:
            phys: the physical table.
            jts: the batch's features that read it (:meth:`batch_features`).
            batch: the batch size ``B``.
            training: a training forward (insert new ids, stamp rows, keep the sort for
                the backward) rather than a read-only eval lookup.
            step: the step a training forward stamps on its rows.
            grads: where the backward's gradient goes (and the fused optimizer, if any).
            id_counts: per feature, how many sightings each of its ids stands for (what
                admission and the hit counts see; default one each).
            promote: in training, move a tiered table's rows of this batch that sit in
                host memory to the GPU first (``False`` when a prefetch already did).

        Raises:
            ValueError: an id out of a fixed-size table's range, or a weighted feature
                without weights.
        """
        reads = self._reads[phys.name]
        feats = reads.features
        ids = jts.ids
        # Read to the host with the forward's first sync: no sync of its own.
        bad = self._bad_flag(phys, ids)
        keys = jts.keys
        # A merged table's entries are (id, logical table index) pairs.
        tags = None
        if len(phys.tables) > 1:
            tags = batch_tags([f.table_index for f in feats], jts.sizes, self._device)
        n_pooled = sum(jts.sizes[: len(reads.pooled)])
        sink: Callable[[str, SparseGrad], None] = grads.add
        updater = grads.updater if training else None
        row_sort = None
        check = done = None
        if training and keys.numel():
            # One sort dedups the entries and, kept in the plan, groups them for the backward.
            s = _sort_entries(keys, tags, read_with=[bad])
            _check_batch_ids(phys, feats, ids, s.read[0])
            if id_counts:
                s = _recount(s, feats, ids, id_counts)
        if phys.is_fixed_size:
            # Row = id: no hash table, no compact table (every row exists, eval included).
            table = phys.values
            rows = keys
            if training and keys.numel():
                no_new = torch.zeros(s.unique.shape, dtype=torch.bool, device=self._device)
                phys.meta.touch(s.unique, step, s.counts, no_new)
                row_sort = RowSort(s.order, s.sorted_seg, s.unique, s.num_unique)
            else:
                _check_batch_ids(phys, feats, ids, int(bad))
        elif training and keys.numel():
            rows_u, partial_rows = insert_ids(phys, s.unique, s.unique_tags, s.counts, step)
            if phys.tiers is not None:
                rows_u = _tiered_slots(phys.tiers, rows_u, step, promote)
                check = partial(phys.tiers.check_unmoved, step)
                done = partial(phys.tiers.finish, step)
            if partial_rows:
                # Not-yet-admitted ids: read a compact table, send admitted rows' grads on.
                table = compact_table(phys, s.unique, s.unique_tags, rows_u)
                rows = s.inverse
                mapped = grads.add if updater is None else partial(grads.apply_update, phys.values)
                sink = _RowMapSink(rows_u, mapped)
                row_sort = RowSort(s.order, s.sorted_seg, None, s.num_unique)
            else:
                table = phys.values
                rows = rows_u[s.inverse]
                row_sort = RowSort(s.order, s.sorted_seg, rows_u, s.num_unique, rows_sorted=False)
        elif training:
            table, rows = phys.values, keys  # no ids: nothing is read
        else:
            table, rows = self._eval_rows(phys, feats, ids, keys, tags, bad)
        offsets, weights = self._pooled_layout(reads.pooled, jts)
        deferred = tuple(not f.config.gather for f in reads.sequence)
        sizes = tuple(jts.sizes[len(reads.pooled) :]) if any(deferred) else ()
        return LookupPlan(
            name=phys.name,
            table=table,
            batch_size=batch,
            pooled_rows=rows[:n_pooled],
            pooled_offsets=offsets,
            modes=reads.modes,
            weights=weights,
            sequence_rows=rows[n_pooled:],
            sink=sink,
            row_sort=row_sort,
            # A compact table's plan hands its mapped gradient to apply_update instead.
            updater=updater if table is phys.values else None,
            one_pass=grads.one_pass,
            sequence_sizes=sizes,
            deferred=deferred if any(deferred) else (),
            check=check,
            done=done,
        )

    def outputs(
        self,
        name: str,
        jts: Mapping[str, JaggedTensor],
        pooled: torch.Tensor,
        sequence: torch.Tensor,
        batch: int,
        dim: int,
        plan: LookupPlan | None = None,
        depends_on: torch.Tensor | None = None,
    ) -> dict[str, FeatureOutput]:
        """Each feature's output from physical table ``name``'s lookup.

        Args:
            name: the physical table.
            jts: the batch's features that read it.
            pooled: ``[B, K_p, dim]``, the pooled features' bags.
            sequence: ``[N_s, dim]``, the gathered sequence features' rows, concatenated.
            batch: the batch size ``B``.
            dim: the row width.
            plan: the lookup's plan (needed when a feature's rows are deferred,
                ``gather=False``: its output is a :class:`TableRows` of the plan's rows).
            depends_on: the lookup's zero-size output that a deferred feature's consumer
                takes as an input (``None`` without gradients).
        """
        reads = self._reads[name]
        out: dict[str, FeatureOutput] = {}
        if reads.pooled:
            # One unbind, not a select per feature: each select's backward would write a
            # zero-filled [B, K_p, dim] gradient and add it to the others (K_p of each).
            for f, bag in zip(reads.pooled, pooled.unbind(1), strict=True):
                out[f.config.name] = bag
        start = at = 0
        for i, f in enumerate(reads.sequence):
            jt = jts[f.config.name]
            n = jt.values.shape[0]
            if not f.config.gather:
                assert plan is not None
                out[f.config.name] = _table_rows(plan, i, at, n, jt.offsets, depends_on)
            else:
                rows = JaggedTensor(sequence[start : start + n], jt.offsets)
                start += n
                out[f.config.name] = sequence_output(f.config, rows, batch, dim)
            at += n
        return out

    def _bad_flag(self, phys: PhysicalTable, ids: list[torch.Tensor]) -> torch.Tensor:
        """Device bool: some id is out of range (checked on the host with a later read).
        Only fixed-size tables have a range: any int64 is an id of a dynamic table."""
        flags = [phys.bad_ids(x).any() for x in ids if x.numel()] if phys.is_fixed_size else []
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        return torch.stack(flags).any()

    def _eval_rows(
        self,
        phys: PhysicalTable,
        feats: list[FeatureRead],
        ids: list[torch.Tensor],
        keys: torch.Tensor,
        tags: BatchTags | None,
        bad: torch.Tensor,
    ) -> tuple[PagedTensor, torch.Tensor]:
        """``(table, rows)`` of an eval lookup: the physical rows when every id has one (one
        find, one sync, no dedup), else a compact table of the batch's unique entries."""
        rows = phys.hash_table.find(keys, None if tags is None else tags.tags, check_keys=False)
        rows = phys.physical(rows)
        missing = (rows < 0).any() if rows.numel() else torch.zeros_like(bad)
        bad_v, missing_v = torch.stack([bad, missing]).tolist()
        _check_batch_ids(phys, feats, ids, bad_v)
        if not missing_v:
            return phys.values, rows
        s = _sort_entries(keys, tags)
        # The rows are already found: spread them to the unique entries, no second find.
        rows_u = torch.empty_like(s.unique).scatter_(0, s.inverse, rows)
        return compact_table(phys, s.unique, s.unique_tags, rows_u), s.inverse

    def _pooled_layout(
        self, pooled: list[FeatureRead], jts: FeatureBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key-major offsets ``[K_p * B + 1]`` and per-id weights of the pooled features."""
        if not pooled:
            return torch.zeros(1, dtype=torch.int64, device=self._device), None
        offsets = torch.nn.functional.pad(jts.pooled_lengths.cumsum(0), (1, 0))
        if not any(f.config.weighted for f in pooled):
            return offsets, None
        weights = []
        for f in pooled:
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


def _pooling_modes(pooled: list[FeatureRead], device: torch.device) -> torch.Tensor:
    modes = [MODE_MEAN if f.config.pooling == "mean" else MODE_SUM for f in pooled]
    return torch.tensor(modes, dtype=torch.int64, device=device)


def _check_batch_ids(
    phys: PhysicalTable, feats: list[FeatureRead], ids: list[torch.Tensor], bad: int
) -> None:
    """Raise for the first feature with an id out of range when ``bad`` (the flag read)."""
    if not bad:
        return
    for f, x in zip(feats, ids, strict=True):
        phys.check_ids(x, f"feature {f.config.name!r}", f.config.table)


def _sort_entries(
    keys: torch.Tensor, tags: BatchTags | None, read_with: Sequence[torch.Tensor] = ()
) -> SortedIds:
    """One sort of a batch's ids, grouping ``(id, table index)`` pairs in a merged table."""
    if tags is None:
        return sort_ids(keys, read_with=read_with)
    return sort_ids(keys, tags=tags.tags, tag_order=tags.order, read_with=read_with)


def _recount(
    s: SortedIds,
    feats: Sequence[FeatureRead],
    ids: Sequence[torch.Tensor],
    id_counts: Mapping[str, torch.Tensor],
) -> SortedIds:
    """``s`` with each unique entry's count the sum of its entries' given sightings."""
    each = [
        id_counts.get(f.config.name, torch.ones_like(x)).to(torch.int64)
        for f, x in zip(feats, ids, strict=True)
    ]
    counts = torch.zeros_like(s.counts).index_add_(0, s.inverse, torch.cat(each))
    return replace(s, counts=counts)


def _tiered_slots(tiers: RowTiers, rows: torch.Tensor, step: int, promote: bool) -> torch.Tensor:
    """A training batch's value slots in a tiered table, once its rows are promoted to the
    GPU tier (slots of forwards whose backward is pending stay where they are), stamped
    with the step."""
    if promote:
        tiers.promote(rows, keep_from=tiers.keep_from(step))
    return tiers.physical(rows, mark=step)


def compact_table(
    phys: PhysicalTable, unique: torch.Tensor, tags: torch.Tensor | None, rows: torch.Tensor
) -> PagedTensor:
    """``[U, dim]``: the rows of a batch's unique entries, the eval default where ``rows < 0``.

    Args:
        phys: the physical table.
        unique: int64 ``[U]`` distinct ids.
        tags: their logical table indices in a merged table, ``None`` for a table of one.
        rows: int64 ``[U]`` their rows, -1 for ids without one.
    """
    device = unique.device
    vals = torch.zeros((unique.numel(), phys.dim), dtype=phys.dtype, device=device)
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


def sequence_output(
    config: FeatureConfig, rows: JaggedTensor, batch: int, dim: int
) -> FeatureOutput:
    """A sequence feature's output from its looked-up rows: the jagged rows, or padded to
    ``max_len`` (with lengths when asked), or tiled to ``[B, max_len * dim]``.

    Args:
        config: the feature.
        rows: its ``[n_ids, dim]`` rows with the batch's offsets.
        batch: the batch size ``B``.
        dim: the row width.
    """
    if config.max_len is None:
        return rows
    if config.pooling == "tile":
        # A view of the padded copy: same gradient path as padded "none".
        padded = padded_sequence(rows, config.max_len, config.truncate)
        assert isinstance(padded, torch.Tensor)
        return padded.reshape(batch, config.output_dim(dim))
    return padded_sequence(rows, config.max_len, config.truncate, with_lengths=config.with_lengths)


def _table_rows(
    plan: LookupPlan,
    feature: int,
    start: int,
    size: int,
    offsets: torch.Tensor,
    depends_on: torch.Tensor | None,
) -> TableRows:
    """Sequence feature ``feature``'s ids as rows of the plan's table, their gradient
    going back to the plan."""
    rows = plan.sequence_rows[start : start + size]
    if depends_on is None:
        return TableRows(plan.table, rows, offsets)

    def sink(_rows: torch.Tensor, grad: torch.Tensor) -> None:
        plan.receive(feature, grad)

    return TableRows(plan.table, rows, offsets, depends_on, sink)


class _RowMapSink:
    """Maps a compact per-batch table's gradient to physical rows, dropping rows < 0."""

    def __init__(self, rows: torch.Tensor, sink: Callable[[str, SparseGrad], None]) -> None:
        self._rows = rows
        self._sink = sink

    def __call__(self, name: str, grad: SparseGrad) -> None:
        rows = self._rows[grad.rows]
        keep = rows >= 0
        self._sink(name, SparseGrad(rows[keep], grad.values[keep]).coalesce())
