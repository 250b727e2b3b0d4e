"""Embedding tables sharded row-wise across the ranks of a process group.

:class:`ShardedEmbeddingCollection` takes the same table and feature configs as
:class:`~recstack.embedding_engine.collection.EmbeddingCollection` and is called the same
way, on each rank with that rank's batch. Every id lives on one rank, ``core.owner(id)``,
in that rank's own ``EmbeddingCollection`` (its shard: dynamic, collision-free tables
holding only the ids it owns). A forward:

1. deduplicates each table's ids of the local batch, counting each id's occurrences;
2. for each group of tables of one width, sends every unique ``(table, id, count)`` to
   its owner (one variable-split all-to-all);
3. each owner looks the received ids up in its shard (inserting new ones in training,
   with admission and eviction as configured; admission and hit counts see the counts,
   so they match one process's) and sends the rows back (one all-to-all);
4. the rows become each feature's output on the requesting rank, in every form an
   ``EmbeddingCollection`` gives: pooled (sum, mean, weighted), jagged or padded
   sequences (with lengths), tiled.

The backward mirrors it: each row's gradient travels back to its owner (one all-to-all per
width), where the shard's own backward turns the gradients of every requester into one
``SparseGrad`` per table; a ``recstack.sparse_optim`` optimizer over
:meth:`sparse_parameters` then steps each rank's rows locally, unchanged. With one rank the
exchanges are no-ops and the result equals an ``EmbeddingCollection``'s.

Every rank must call forward and backward the same number of times (the exchanges are
collectives), as a data-parallel Trainer does; a rank without data calls them with an
empty batch.

**State.** The shard is held outside the module tree, so the module's ``state_dict()``
and its tables' names in a checkpoint (:meth:`ShardedEmbeddingCollection.keyed_states`)
are an ``EmbeddingCollection``'s: a checkpoint written by N ranks (each its own part files)
loads on M ranks, or into an unsharded collection, and back (``recstack.saver``).

**Eviction.** Each shard evicts its own rows after the optimizer step (``evict``,
``maybe_evict``), at the same steps on every rank. A capacity cap (``Eviction(max_rows=N)``)
holds for each rank's shard: give it as the per-rank budget.

**Optimizer step counts.** A sparse optimizer steps each rank's rows locally. Per-row
counts (``SparseAdam(step_count="per_row")``) are the same whatever the sharding; a
``"global"`` count advances on each rank at the steps that touched its shard's rows, so
a table whose shard a step missed corrects its bias by a count one lower than unsharded
(never, in practice, for tables of thousands of ids or more).

**Tiered tables.** A table's ``hbm_budget`` holds for each rank's shard. Each owner
promotes the rows its forward serves; :meth:`ShardedEmbeddingCollection.prefetch` of the
next batch promotes them ahead of that forward (the Trainer calls it after each forward).

**Replicated tables.** Small fixed-size tables (by default those of at most 16M values;
``replicate=[...]`` names them) are replicated on every rank instead: looked up locally
with no exchange, and trained data parallel, every rank's gradients summed before the
optimizer applies them (:mod:`~recstack.embedding_engine.replicated`).

**Deferred features.** A feature with ``gather=False`` (rows left in the table for a
consumer's kernel to read, DIN's fused target attention) comes out gathered, as a
``JaggedTensor`` of its rows: a sharded table's rows live on their owners, not in this
rank's memory. The reference models take either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor, KeyedState, SparseGrad
from recstack.core.distributed import PendingExchange, all_to_all_v, all_to_all_v_start
from recstack.core.keyed_state import select_owned
from recstack.core.sharding import ShardSpec, owner_partition
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, TableConfig, check_configs
from recstack.embedding_engine.parameters import EmbeddingSparseParameter
from recstack.embedding_engine.planner import FeatureOutput, sequence_output
from recstack.embedding_engine.replicated import (
    ReplicaState,
    ReplicatedSparseParameter,
    replicated_tables,
)
from recstack.embedding_engine.tiers import TierStats

__all__ = ["ExchangeLoad", "ShardedEmbeddingCollection"]

_POOLED = ("sum", "mean")


@dataclass
class _IdExchange:
    """A batch whose unique ids were sent to their owners (or are on their way)."""

    kjt: KeyedJaggedTensor
    jagged: dict[str, JaggedTensor]
    unique: dict[str, torch.Tensor]
    inverse: dict[str, torch.Tensor]
    tags: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    order: torch.Tensor | None = None
    splits: list[int] | None = None
    sent: torch.Tensor | None = None
    pending: PendingExchange | None = None
    # The owner's side, once the ids arrived: kept when a prefetch needed it early.
    received: _Received | None = None


@dataclass(frozen=True)
class _Received:
    """The ``(id, tag, count)`` requests an owner received, as a batch of its shard's row
    features (each table's ids bags of one)."""

    by_table: torch.Tensor  # the order that sorts the requests by table
    ordered: torch.Tensor  # the requests in that order
    batch: KeyedJaggedTensor
    sizes: list[int]  # requests per table


# The columns of an exchange's request: the id, its table's index, its occurrences.
_ID, _TAG, _COUNT = 0, 1, 2


def _row_feature(table: str) -> str:
    """The shard's own feature that reads one row per id of ``table``."""
    return f"{table}__rows"


@dataclass(frozen=True)
class ExchangeLoad:
    """What one forward of a sharded collection exchanged, seen from this rank.

    Attributes:
        keys_sent: unique ``(table, id)`` requests this rank sent to each rank (itself
            included), by destination.
        keys_received: requests each rank sent to this rank, by source: the lookups this
            rank served as an owner.
        id_bytes_sent: bytes of the requests this rank sent to other ranks (24 a key: id,
            table, count).
        row_bytes_sent: bytes of the rows this rank sent back to other ranks (the
            backward sends as many gradient bytes the other way).
    """

    keys_sent: tuple[int, ...]
    keys_received: tuple[int, ...]
    id_bytes_sent: int
    row_bytes_sent: int

    @property
    def served(self) -> int:
        """The lookups this rank served (every rank's requests to it)."""
        return sum(self.keys_received)


class _ExchangeRows(torch.autograd.Function):
    """Rows an owner looked up, sent back to the ranks that asked for them; the backward
    sends each row's gradient to its owner."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        back_splits: list[int],
        asked_splits: list[int],
        group: dist.ProcessGroup | None,
        scale: float,
    ) -> torch.Tensor:
        ctx.asked_splits, ctx.group, ctx.scale = asked_splits, group, scale
        received, _ = all_to_all_v(rows.contiguous(), back_splits, group)
        return received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        to_owners, _ = all_to_all_v(grad.contiguous(), ctx.asked_splits, ctx.group)
        return to_owners, None, None, None, None


class ShardedEmbeddingCollection(nn.Module):
    """An :class:`~recstack.embedding_engine.collection.EmbeddingCollection` whose tables are
    sharded row-wise across the ranks of ``process_group`` (see the module docs).

    Args:
        tables: the table configs, the same on every rank.
        features: the feature configs, the same on every rank (any pooling; a
            ``gather=False`` feature comes out gathered, see the module docs).
        process_group: the ranks the tables are sharded over (``None``: the default group).
        device: where this rank's shard and outputs live (CUDA for NCCL, CPU for gloo).
        page_rows: rows per page of the shard's value stores.
        average_gradients: divide each row's gradient by the world size: the gradient
            of the mean of the ranks' losses, as ``DistributedDataParallel`` averages
            dense gradients (the ``Trainer`` sets it), so ``W`` ranks with batches of
            ``b`` rows train as one process with batches of ``W * b``. Default: the sum.
        replicate: the tables to replicate on every rank instead of sharding (fixed-size
            tables only; see :mod:`~recstack.embedding_engine.replicated`). Default: the
            fixed-size tables of at most 16M values (64 MiB in fp32).

    Raises:
        ValueError, TypeError: bad configs (as ``EmbeddingCollection``).
        RuntimeError: no initialized process group.

    Examples:
        >>> import os, tempfile, torch
        >>> import torch.distributed as dist
        >>> from recstack.core import KeyedJaggedTensor
        >>> from recstack.embedding_engine import FeatureConfig, TableConfig
        >>> init = os.path.join(tempfile.mkdtemp(), "init")
        >>> dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        >>> ec = ShardedEmbeddingCollection(
        ...     [TableConfig("item", dim=4)],
        ...     [FeatureConfig("item", "item", pooling="mean"),
        ...      FeatureConfig("hist", "item", pooling="none", max_len=3)],
        ... )
        >>> kjt = KeyedJaggedTensor(
        ...     ["item", "hist"], torch.tensor([7, 8, 7, 1, 2, 3]), torch.tensor([2, 1, 3, 0])
        ... )
        >>> out = ec(kjt)
        >>> out["item"].shape, out["hist"].shape
        (torch.Size([2, 4]), torch.Size([2, 3, 4]))
        >>> dist.destroy_process_group()
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        features: Sequence[FeatureConfig],
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        *,
        page_rows: int | None = None,
        average_gradients: bool = False,
        replicate: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedEmbeddingCollection: needs an initialized torch.distributed process "
                "group (torchrun, or torch.distributed.init_process_group)"
            )
        check_configs(tables, features)
        self.group = process_group
        self.average_gradients = bool(average_gradients)
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._features = list(features)
        self._tables = list(tables)
        self._fixed = {t.name: t.fixed_size is not None for t in self._tables}
        self._replicated = replicated_tables(self._tables, replicate)
        self._sharded = [t.name for t in self._tables if t.name not in self._replicated]
        # A sharded table's index in the shard: the tag its ids travel with.
        self._table_index = {name: i for i, name in enumerate(self._sharded)}
        used = {f.table for f in features if f.table not in self._replicated}
        self._used = [t.name for t in self._tables if t.name in used]
        # Rows travel back in one exchange per width and dtype (ids in one for all).
        self._groups: dict[tuple[int, torch.dtype], list[str]] = {}
        for t in self._tables:
            if t.name in used:
                self._groups.setdefault((t.dim, t.dtype), []).append(t.name)
        extra = {} if page_rows is None else {"page_rows": page_rows}
        sharded = [t for t in self._tables if t.name in self._table_index]
        shard = EmbeddingCollection(
            sharded,
            [FeatureConfig(_row_feature(t.name), t.name, pooling="sum") for t in sharded],
            device,
            merge_tables=True,
            **extra,
        ) if sharded else None  # fmt: skip
        replicas = None
        if self._replicated:
            replicas = EmbeddingCollection(
                [t for t in self._tables if t.name in self._replicated],
                [f for f in self._features if f.table in self._replicated],
                device,
                **extra,
            )
        # Outside the module tree (see the module docs): state dicts and checkpoint names
        # then match an unsharded collection's.
        object.__setattr__(self, "_shard", shard)
        object.__setattr__(self, "_replicas", replicas)
        self._local = [c for c in (shard, replicas) if c is not None]
        self._device = self._local[0].device
        #: What the last forward exchanged (``None`` before the first).
        self.last_load: ExchangeLoad | None = None
        self._ahead: _IdExchange | None = None
        self._looked: tuple[KeyedJaggedTensor, dict[str, FeatureOutput]] | None = None

    @property
    def shard(self) -> EmbeddingCollection | None:
        """This rank's shard: an ``EmbeddingCollection`` of the ids this rank owns of the
        sharded tables (``None`` when every table is replicated)."""
        return self._shard

    @property
    def replicas(self) -> EmbeddingCollection | None:
        """The replicated tables, whole, with the features that read them (``None`` when
        no table is replicated)."""
        return self._replicas

    @property
    def replicated(self) -> frozenset[str]:
        """The names of the replicated tables."""
        return frozenset(self._replicated)

    @property
    def tiered_tables(self) -> tuple[str, ...]:
        """The sharded tables with an ``hbm_budget`` (see
        :attr:`EmbeddingCollection.tiered_tables
        <recstack.embedding_engine.EmbeddingCollection.tiered_tables>`): those whose rows
        :meth:`prefetch` also moves to each owner's GPU tier."""
        return self._shard.tiered_tables if self._shard is not None else ()

    def tier_stats(self) -> dict[str, TierStats]:
        """What each tiered table's shard on this rank did, by table (see
        :meth:`EmbeddingCollection.tier_stats
        <recstack.embedding_engine.EmbeddingCollection.tier_stats>`)."""
        return self._shard.tier_stats() if self._shard is not None else {}

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The features a batch must carry, in config order."""
        return tuple(f.name for f in self._features)

    @property
    def device(self) -> torch.device:
        """Where this rank's shard and the outputs live."""
        return self._device

    def train(self, mode: bool = True) -> ShardedEmbeddingCollection:
        """Training or eval mode, for this module and its shard (eval inserts nothing)."""
        super().train(mode)
        for c in self._local:
            c.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> ShardedEmbeddingCollection:
        for c in self._local:
            c._apply(fn, recurse)
        self._device = self._local[0].device
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ the step
    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, FeatureOutput]:
        """Every feature's output for this rank's batch ``kjt``, as an
        ``EmbeddingCollection`` gives it.

        When :meth:`prefetch` was given this very ``kjt``, its ids are already on their
        way to their owners and the forward continues from there; when :meth:`lookahead`
        was, its outputs are returned.

        Raises:
            TypeError, ValueError: ``kjt`` is not a KeyedJaggedTensor, misses a feature,
                lives on another device, or a weighted feature has no weights.
        """
        looked, self._looked = self._looked, None
        if looked is not None and looked[0] is kjt:
            return looked[1]
        return self._finish(self._take_ahead(kjt) or self._start(kjt))

    def lookahead(self, kjt: KeyedJaggedTensor) -> None:
        """Look up a batch the next forward will read now, before the current step's
        sparse update: semi-synchronous training.

        The lookups, the rows' exchange back and the pooling run now (the exchanges
        overlap whatever follows, such as the previous step's optimizer step), and the
        forward of this very ``kjt`` returns their outputs. Rows of ids the previous step
        also trains are then read one update early; their gradients still reach the
        rows (by slot) at the next step. Store or accumulate the previous backward's
        gradients first (the sparse optimizer's ``accumulate()``): a training forward
        refuses unread ones. Every rank must look ahead at the same batches in the same
        order (a pipelined :class:`~recstack.pipelines.Trainer`,
        ``pipeline="semi-sync"``).

        Raises:
            TypeError, ValueError: as :meth:`forward`.
        """
        self._looked = None
        self._looked = (kjt, self._finish(self._take_ahead(kjt) or self._start(kjt)))

    def prefetch(self, kjt: KeyedJaggedTensor) -> None:
        """Send the ids of a batch the next forward will read to their owners now.

        The id exchange is a collective that depends on the ids alone, not on any row, so
        it can run while the previous batch's backward and optimizer step do (a
        pipelined :class:`~recstack.pipelines.Trainer`, ``pipeline="ids"``); the forward
        of this ``kjt`` then waits for it instead of starting it. The lookups happen in
        that forward, after the previous step's updates, so the results equal an
        unpipelined run's. Every rank must prefetch the same batches in the same order.
        One batch ahead: a second prefetch before the forward finishes the first one's
        exchange and replaces it.

        Tiered tables (:attr:`tiered_tables`): each owner also moves the rows it will
        serve that batch to its GPU tier now, as :meth:`EmbeddingCollection.prefetch
        <recstack.embedding_engine.EmbeddingCollection.prefetch>` does, so the forward
        finds them there. For that the exchange finishes here rather than in the forward:
        on CUDA the stream waits for it (the host goes on), with gloo the host does.

        Raises:
            TypeError, ValueError: as :meth:`forward`.
        """
        self._ahead = self._take_ahead(kjt) or self._start(kjt)
        if self.tiered_tables and self._ahead.pending is not None:
            # An owner can only promote rows whose ids it has: the exchange finishes now
            # (on CUDA the stream waits for it, not the host), then the shard moves the
            # rows it will serve to its GPU tier, while this step's backward is queued.
            (asked,), _ = self._ahead.pending.wait()
            assert self._shard is not None
            self._ahead.received = self._local_batch(asked)
            self._shard.prefetch(self._ahead.received.batch)

    def _take_ahead(self, kjt: KeyedJaggedTensor) -> _IdExchange | None:
        """The prefetched exchange of ``kjt``, if any; another batch's is finished (every
        rank started it, so every rank waits for it) and dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.kjt is kjt:
            return ahead
        if ahead.pending is not None:
            ahead.pending.wait()
        return None

    def _start(self, kjt: KeyedJaggedTensor) -> _IdExchange:
        """Check the batch, dedup each table's ids and start sending them to owners."""
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(
                f"ShardedEmbeddingCollection: expected a KeyedJaggedTensor, got "
                f"{type(kjt).__name__}"
            )
        present = set(kjt.keys())
        missing = [f.name for f in self._features if f.name not in present]
        if missing:
            raise ValueError(f"ShardedEmbeddingCollection: the batch has no feature {missing}")
        jagged = {f.name: kjt[f.name] for f in self._features}
        for f in self._features:
            if f.weighted and jagged[f.name].weights is None:
                raise ValueError(
                    f"ShardedEmbeddingCollection: feature {f.name!r} is weighted but the "
                    "batch carries no weights"
                )
        # Each table's unique ids, their occurrences, and where every id points among them.
        unique: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        inverse: dict[str, torch.Tensor] = {}
        for table in self._used:
            names = [f.name for f in self._features if f.table == table]
            ids = torch.cat([jagged[n].values.to(torch.int64) for n in names])
            if ids.device != self._device:
                raise ValueError(
                    f"ShardedEmbeddingCollection: feature {names[0]!r} is on {ids.device}, "
                    f"the collection on {self._device}"
                )
            unique[table], inverse[table], counts[table] = torch.unique(
                ids, return_inverse=True, return_counts=True
            )
        x = _IdExchange(kjt, jagged, unique, inverse)
        if not self._used:
            return x
        x.tags = torch.cat([torch.full_like(unique[t], self._table_index[t]) for t in self._used])
        ids = torch.cat([unique[t] for t in self._used])
        x.ranks, x.order, counts_per_rank = owner_partition(ids, self.world_size)
        x.splits = counts_per_rank.tolist()
        occurrences = torch.cat([counts[t] for t in self._used])
        x.sent = torch.stack([ids, x.tags, occurrences], dim=1).index_select(0, x.order)
        x.pending = all_to_all_v_start([x.sent], x.splits, self.group)
        return x

    def _finish(self, x: _IdExchange) -> dict[str, FeatureOutput]:
        """The features' outputs of a started exchange: look up, rows back, pool."""
        batch = x.kjt.stride()
        rows = self._exchange(x) if self._used else {}
        local = self._replicas(x.kjt) if self._replicas is not None else {}
        out: dict[str, FeatureOutput] = {}
        start: dict[str, int] = {}
        for f in self._features:
            if f.table in self._replicated:
                out[f.name] = local[f.name]
                continue
            jt = x.jagged[f.name]
            n = jt.values.numel()
            first = start.get(f.table, 0)
            start[f.table] = first + n
            feature_rows = rows[f.table].index_select(0, x.inverse[f.table][first : first + n])
            if f.pooling in _POOLED:
                out[f.name] = _pool(f, jt, feature_rows, batch)
            else:
                dim = feature_rows.shape[1]
                out[f.name] = sequence_output(f, JaggedTensor(feature_rows, jt.offsets), batch, dim)
        return out

    def _exchange(self, x: _IdExchange) -> dict[str, torch.Tensor]:
        """Each table's rows of its unique ids, from their owners: the ids (sent by
        :meth:`_start` in one all-to-all), one lookup in the shard (its step advances
        once), the rows back in one all-to-all per width and dtype."""
        assert x.pending is not None and x.tags is not None and x.ranks is not None
        assert x.order is not None and x.splits is not None and x.sent is not None
        (asked,), asked_splits = x.pending.wait()
        unique, tags, order, splits, sent = x.unique, x.tags, x.order, x.splits, x.sent
        looked, received_order = self._look_up(x.received or self._local_batch(asked))
        source = torch.repeat_interleave(
            torch.arange(self.world_size, device=self._device),
            torch.tensor(asked_splits, device=self._device),
        )
        sent_ranks, sent_tags = x.ranks.index_select(0, order), sent[:, _TAG]
        out: dict[str, torch.Tensor] = {}
        row_bytes = 0
        for (dim, dtype), tables in self._groups.items():
            tag_set = torch.tensor([self._table_index[t] for t in tables], device=self._device)
            # The owner's side: the group's rows, in the order they were received.
            received = torch.isin(asked[:, _TAG], tag_set)
            found = torch.cat([looked[t] for t in tables])
            found = found.index_select(0, torch.argsort(received_order[tables[0]]))
            back = torch.bincount(source[received], minlength=self.world_size).tolist()
            itemsize = torch.empty(0, dtype=dtype).element_size()
            row_bytes += (sum(back) - back[self.rank]) * dim * itemsize
            # The requester's side: they arrive in the order they were sent.
            mine = torch.isin(sent_tags, tag_set)
            asked_back = torch.bincount(sent_ranks[mine], minlength=self.world_size).tolist()
            scale = 1.0 / self.world_size if self.average_gradients else 1.0
            got = _ExchangeRows.apply(found, back, asked_back, self.group, scale)
            in_group = torch.isin(tags, tag_set)
            local = torch.cumsum(in_group, 0) - 1  # each id's place among the group's
            dest = local.index_select(0, order[mine])
            rows = torch.empty_like(got).index_copy(0, dest, got)
            first = 0
            for t in tables:
                out[t] = rows[first : first + unique[t].numel()]
                first += unique[t].numel()
        self.last_load = ExchangeLoad(
            tuple(splits),
            tuple(asked_splits),
            (sum(splits) - splits[self.rank]) * sent.shape[1] * sent.element_size(),
            row_bytes,
        )
        return out

    def _look_up(
        self, received: _Received
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The owner's side: the rows of the received ``(id, tag, count)`` requests, read
        through the shard's row features in one call, by table, and for each width and
        dtype group (keyed by its first table) the received positions of its rows."""
        r = received
        seen = dict(zip(r.batch.keys(), r.ordered[:, _COUNT].split(r.sizes), strict=True))
        looked = self._shard(r.batch, id_counts=seen)
        rows = {t: looked[_row_feature(t)][: r.sizes[self._table_index[t]]] for t in self._used}
        positions = {}
        for tables in self._groups.values():
            # Requests sorted by tag list each group's tables in order, as ``rows`` do.
            tag_set = torch.tensor([self._table_index[t] for t in tables], device=self._device)
            positions[tables[0]] = r.by_table[torch.isin(r.ordered[:, _TAG], tag_set)]
        return rows, positions

    def _local_batch(self, asked: torch.Tensor) -> _Received:
        """The received ``(id, tag, count)`` requests as a batch of the shard's row
        features."""
        # A KeyedJaggedTensor has one batch size for all keys, so each table's ids are
        # bags of one, padded with empty bags to the largest table's count.
        by_table = torch.argsort(asked[:, _TAG], stable=True)
        ordered = asked.index_select(0, by_table)
        per_table = torch.bincount(ordered[:, _TAG], minlength=len(self._sharded))
        sizes = per_table.tolist()
        widest = torch.arange(max(sizes, default=0), device=self._device)
        lengths = (widest[None, :] < per_table[:, None]).to(torch.int64).reshape(-1)
        keys = [_row_feature(t) for t in self._sharded]
        batch = KeyedJaggedTensor(keys, ordered[:, _ID].contiguous(), lengths)
        return _Received(by_table, ordered, batch, sizes)

    # ------------------------------------------------------------------ the shard's state
    def keyed_states(self) -> dict[str, KeyedState]:
        """This rank's shard of every table as a core ``KeyedState``, by table name: a
        checkpoint saves each rank's rows in its own part files, and a load keeps the ids
        each rank owns (``recstack.saver``). A fixed-size table holds a row for every id
        on every rank; it exports only the ids this rank owns (the others are never read
        or trained here), so each id is saved once."""
        states: dict[str, KeyedState] = {}
        if self._shard is not None:
            spec = ShardSpec(self.world_size, self.rank)
            for name, state in self._shard.keyed_states().items():
                states[name] = _OwnedRows(state, spec) if self._fixed[name] else state
        if self._replicas is not None:
            for name, state in self._replicas.keyed_states().items():
                states[name] = ReplicaState(state, self.rank)
        return dict(sorted(states.items()))

    def get_extra_state(self) -> dict[str, int]:
        """The step counters, as an ``EmbeddingCollection``'s (the same on every rank)."""
        return self._local[0].get_extra_state()

    def set_extra_state(self, state: object) -> None:
        """Restore :meth:`get_extra_state` output (from ``load_state_dict``)."""
        for c in self._local:
            c.set_extra_state(state)

    @property
    def step(self) -> int:
        """The step the next training forward stamps on its rows."""
        return self._local[0].step

    def evict(
        self,
        table: str | None = None,
        *,
        older_than_step: int | None = None,
        min_count: int | None = None,
    ) -> dict[str, int]:
        """Erase this rank's ids last seen before ``older_than_step`` or seen fewer than
        ``min_count`` times, as ``EmbeddingCollection.evict`` (no collective: every rank
        calls it at the same step); returns the ids erased here, by table."""
        if table is not None:
            return self._holder(table).evict(
                table, older_than_step=older_than_step, min_count=min_count
            )
        out: dict[str, int] = {}
        for c in self._local:
            out.update(c.evict(older_than_step=older_than_step, min_count=min_count))
        return out

    def maybe_evict(self) -> dict[str, int]:
        """As ``EmbeddingCollection.maybe_evict``, on this rank's shard."""
        out: dict[str, int] = {}
        for c in self._local:
            out.update(c.maybe_evict())
        return out

    def _holder(self, table: str) -> EmbeddingCollection:
        holder = self._replicas if table in self._replicated else self._shard
        if holder is None or table not in self._fixed:
            raise KeyError(f"ShardedEmbeddingCollection: unknown table {table!r}")
        return holder

    def sparse_parameters(self) -> Iterator[EmbeddingSparseParameter]:
        """This rank's shard of every sharded table and the replicated tables (whose
        gradients are every rank's, summed), for a ``recstack.sparse_optim`` optimizer."""
        if self._shard is not None:
            yield from self._shard.sparse_parameters()
        if self._replicas is not None:
            for param in self._replicas.sparse_parameters():
                yield ReplicatedSparseParameter(param, self.group, self.average_gradients)

    def sparse_grads(self) -> dict[str, SparseGrad]:
        """This rank's own sparse gradients (of its shard and its replicas, before the sum
        over ranks), by physical table."""
        out: dict[str, SparseGrad] = {}
        for c in self._local:
            out.update(c.sparse_grads())
        return out

    def zero_grad_sparse(self) -> None:
        """Drop this rank's stored sparse gradients."""
        for c in self._local:
            c.zero_grad_sparse()

    def find_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` in this rank's shard of ``table`` (-1 for ids it does not hold)."""
        return self._holder(table).find_rows(table, ids)

    def num_ids(self, table: str) -> int:
        """Ids this rank's shard of ``table`` holds."""
        return self._holder(table).num_ids(table)


class _OwnedRows:
    """A table's ``KeyedState`` that exports only the ids ``spec`` owns (a fixed-size
    table's shard holds every id's row; only the owned ones are this rank's to save)."""

    # Every method spelled out: runtime protocol checks (IncrementalKeyedState,
    # AuxiliaryState) look methods up statically.
    def __init__(self, state: Any, spec: ShardSpec) -> None:
        self._state, self._spec = state, spec

    def state_metadata(self) -> dict[str, Any]:
        return self._state.state_metadata()

    def mark_clean(self) -> None:
        self._state.mark_clean()

    def removed_keys(self) -> torch.Tensor:
        return self._state.removed_keys()

    def remove_keys(self, keys: torch.Tensor, shard: ShardSpec | None = None) -> int:
        return self._state.remove_keys(keys, shard)

    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        return self._state.auxiliary_state()

    def load_auxiliary_state(self, parts: Sequence[Any]) -> None:
        self._state.load_auxiliary_state(parts)

    def export_chunks(self, chunk_rows: int) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return self._owned(self._state.export_chunks(chunk_rows))

    def export_changed_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return self._owned(self._state.export_changed_chunks(chunk_rows))

    def import_chunk(self, keys: Any, slots: Any, metadata: Any, shard: Any = None) -> int:
        return self._state.import_chunk(keys, slots, metadata, shard)

    def _owned(
        self, chunks: Iterator[tuple[torch.Tensor, dict[str, Any]]]
    ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for keys, slots in chunks:
            keys, slots = select_owned(keys, slots, self._spec)
            if keys.numel():
                yield keys, slots


def _pool(f: FeatureConfig, jt: JaggedTensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """A pooled feature's ``[B, dim]`` output from its ids' rows, in the rows' dtype (sums
    in float32, as the collection's kernels)."""
    lengths = jt.lengths().to(torch.int64)
    bags = torch.repeat_interleave(torch.arange(batch, device=rows.device), lengths)
    values = rows.float()
    if f.weighted:
        assert jt.weights is not None
        values = values * jt.weights.float()[:, None]
    pooled = values.new_zeros((batch, rows.shape[1])).index_add(0, bags, values)
    if f.pooling == "mean":
        pooled = pooled / lengths.clamp(min=1).to(pooled.dtype)[:, None]
    return pooled.to(rows.dtype)
