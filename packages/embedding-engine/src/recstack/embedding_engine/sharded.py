"""Embedding tables sharded row-wise across the ranks of a process group.

:class:`ShardedEmbeddingCollection` takes the same table and feature configs as
:class:`~recstack.embedding_engine.collection.EmbeddingCollection` and is called the same
way, on each rank with that rank's batch. Every id lives on one rank, ``core.owner(id)``,
in that rank's own ``EmbeddingCollection`` (its shard: dynamic, collision-free tables
holding only the ids it owns). A forward:

1. deduplicates each table's ids of the local batch;
2. for each group of tables of one width, sends every unique ``(table, id)`` to its owner
   (one variable-split all-to-all of the ids and table indices);
3. each owner looks the received ids up in its shard (inserting new ones in training,
   with admission and eviction as configured) and sends the rows back (one all-to-all);
4. the rows are pooled into each feature's ``[B, dim]`` output on the requesting rank.

The backward mirrors it: each row's gradient travels back to its owner (one all-to-all per
width), where the shard's own backward turns the gradients of every requester into one
``SparseGrad`` per table; a ``recstack.sparse_optim`` optimizer over
:meth:`sparse_parameters` then steps each rank's rows locally, unchanged. With one rank the
exchanges are no-ops and the result equals an ``EmbeddingCollection``'s.

This release shards pooled features (``pooling="sum"`` or ``"mean"``, unweighted); the
other poolings are refused with a clear error. Every rank must call forward and backward
the same number of times (the exchanges are collectives), as a data-parallel Trainer does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import KeyedJaggedTensor, SparseGrad
from recstack.core.distributed import all_to_all_v
from recstack.core.sharding import owner
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, TableConfig, check_configs
from recstack.embedding_engine.parameters import EmbeddingSparseParameter

__all__ = ["ShardedEmbeddingCollection"]

_POOLED = ("sum", "mean")


def _row_feature(table: str) -> str:
    """The shard's own feature that reads one row per id of ``table``."""
    return f"{table}__rows"


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
    ) -> torch.Tensor:
        ctx.asked_splits, ctx.group = asked_splits, group
        received, _ = all_to_all_v(rows.contiguous(), back_splits, group)
        return received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        to_owners, _ = all_to_all_v(grad.contiguous(), ctx.asked_splits, ctx.group)
        return to_owners, None, None, None


class ShardedEmbeddingCollection(nn.Module):
    """An :class:`~recstack.embedding_engine.collection.EmbeddingCollection` whose tables are
    sharded row-wise across the ranks of ``process_group`` (see the module docs).

    Args:
        tables: the table configs, the same on every rank.
        features: the feature configs, the same on every rank; pooled features only
            (``pooling="sum"`` or ``"mean"``, unweighted).
        process_group: the ranks the tables are sharded over (``None``: the default group).
        device: where this rank's shard and outputs live (CUDA for NCCL, CPU for gloo).
        page_rows: rows per page of the shard's value stores.

    Raises:
        ValueError, TypeError: bad configs (as ``EmbeddingCollection``), or a feature that
            is not pooled.
        RuntimeError: no initialized process group.

    Examples:
        >>> import os, tempfile, torch
        >>> import torch.distributed as dist
        >>> from recstack.core import KeyedJaggedTensor
        >>> from recstack.embedding_engine import FeatureConfig, TableConfig
        >>> init = os.path.join(tempfile.mkdtemp(), "init")
        >>> dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        >>> ec = ShardedEmbeddingCollection(
        ...     [TableConfig("item", dim=4)], [FeatureConfig("item", "item", pooling="mean")]
        ... )
        >>> kjt = KeyedJaggedTensor(["item"], torch.tensor([7, 8, 7]), torch.tensor([2, 1]))
        >>> ec(kjt)["item"].shape
        torch.Size([2, 4])
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
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedEmbeddingCollection: needs an initialized torch.distributed process "
                "group (torchrun, or torch.distributed.init_process_group)"
            )
        check_configs(tables, features)
        for f in features:
            if f.pooling not in _POOLED or f.weighted:
                raise ValueError(
                    f"ShardedEmbeddingCollection: feature {f.name!r} has pooling "
                    f"{f.pooling!r}{' (weighted)' if f.weighted else ''}; sharded tables serve "
                    "unweighted pooled features (pooling='sum' or 'mean') in this release"
                )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._features = list(features)
        self._tables = list(tables)
        self._table_index = {t.name: i for i, t in enumerate(self._tables)}
        used = {f.table for f in features}
        # One exchange per width: tables of one dim travel together.
        self._groups: dict[int, list[str]] = {}
        for t in self._tables:
            if t.name in used:
                self._groups.setdefault(t.dim, []).append(t.name)
        extra = {} if page_rows is None else {"page_rows": page_rows}
        self.shard = EmbeddingCollection(
            self._tables,
            [FeatureConfig(_row_feature(t.name), t.name, pooling="sum") for t in self._tables],
            device,
            merge_tables=True,
            **extra,
        )
        self._device = self.shard._device

    # ------------------------------------------------------------------ the step
    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Every feature's pooled ``[B, dim]`` rows for this rank's batch ``kjt``.

        Raises:
            TypeError, ValueError: ``kjt`` is not a KeyedJaggedTensor, misses a feature or
                lives on another device.
        """
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(
                f"ShardedEmbeddingCollection: expected a KeyedJaggedTensor, got "
                f"{type(kjt).__name__}"
            )
        present = set(kjt.keys())
        missing = [f.name for f in self._features if f.name not in present]
        if missing:
            raise ValueError(f"ShardedEmbeddingCollection: the batch has no feature {missing}")
        batch = kjt.stride()
        jagged = {f.name: kjt[f.name] for f in self._features}
        values = {n: jt.values for n, jt in jagged.items()}  # each exactly its feature's ids
        # Each table's unique ids, and where every value of its features points among them.
        unique: dict[str, torch.Tensor] = {}
        inverse: dict[str, torch.Tensor] = {}
        for table in {f.table for f in self._features}:
            names = [f.name for f in self._features if f.table == table]
            ids = torch.cat([values[n].to(torch.int64) for n in names])
            if ids.device != self._device:
                raise ValueError(
                    f"ShardedEmbeddingCollection: feature {names[0]!r} is on {ids.device}, "
                    f"the collection on {self._device}"
                )
            unique[table], inverse[table] = torch.unique(ids, return_inverse=True)
        rows = {}
        for tables in self._groups.values():
            rows.update(self._exchange(tables, unique))
        out: dict[str, torch.Tensor] = {}
        start: dict[str, int] = {}
        for f in self._features:
            jt = jagged[f.name]
            n = values[f.name].numel()
            first = start.get(f.table, 0)
            start[f.table] = first + n
            mine = inverse[f.table][first : first + n]
            lengths = jt.lengths().to(torch.int64)
            bags = torch.repeat_interleave(torch.arange(batch, device=self._device), lengths)
            table_rows = rows[f.table]
            pooled = table_rows.new_zeros((batch, table_rows.shape[1]))
            pooled = pooled.index_add(0, bags, table_rows.index_select(0, mine))
            if f.pooling == "mean":
                pooled = pooled / lengths.clamp(min=1).to(pooled.dtype)[:, None]
            out[f.name] = pooled
        return out

    def _exchange(
        self, tables: list[str], unique: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The rows of ``tables``' unique ids, each from its owner (one width)."""
        ids = torch.cat([unique[t] for t in tables])
        tags = torch.cat(
            [torch.full_like(unique[t], self._table_index[t]) for t in tables]
        )  # fmt: skip
        ranks = owner(ids, self.world_size)
        order = torch.argsort(ranks, stable=True)
        splits = torch.bincount(ranks, minlength=self.world_size).tolist()
        sent = torch.stack([ids.index_select(0, order), tags.index_select(0, order)], dim=1)
        asked, asked_splits = all_to_all_v(sent, splits, self.group)
        # The owner's side: one row per received id, read through the shard's row
        # features. A KeyedJaggedTensor has one batch size for all keys, so each table's
        # ids are bags of one, padded with empty bags to the largest table's count.
        by_table = torch.argsort(asked[:, 1], stable=True)
        asked_ids, asked_tags = asked[by_table, 0], asked[by_table, 1]
        per_table = torch.bincount(asked_tags, minlength=len(self._tables))
        counts = per_table.tolist()
        widest = torch.arange(max(counts, default=0), device=self._device)
        lengths = (widest[None, :] < per_table[:, None]).to(torch.int64).reshape(-1)
        keys = [_row_feature(t.name) for t in self._tables]
        local = KeyedJaggedTensor(keys, asked_ids, lengths)
        looked = self.shard(local)
        found = torch.cat([looked[_row_feature(t)][: counts[self._table_index[t]]] for t in tables])
        found = found.index_select(0, torch.argsort(by_table))  # back to the received order
        got = _ExchangeRows.apply(found, asked_splits, splits, self.group)
        rows = torch.empty_like(got).index_copy(0, order, got)  # back to ``ids``' order
        out, first = {}, 0
        for t in tables:
            out[t] = rows[first : first + unique[t].numel()]
            first += unique[t].numel()
        return out

    # ------------------------------------------------------------------ the shard's state
    def sparse_parameters(self) -> Iterator[EmbeddingSparseParameter]:
        """This rank's shard of every table, for a ``recstack.sparse_optim`` optimizer."""
        return self.shard.sparse_parameters()

    def sparse_grads(self) -> dict[str, SparseGrad]:
        """This rank's shard's sparse gradients, by physical table."""
        return self.shard.sparse_grads()

    def zero_grad_sparse(self) -> None:
        """Drop this rank's stored sparse gradients."""
        self.shard.zero_grad_sparse()

    def find_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` in this rank's shard of ``table`` (-1 for ids it does not hold)."""
        return self.shard.find_rows(table, ids)

    def num_ids(self, table: str) -> int:
        """Ids this rank's shard of ``table`` holds."""
        return self.shard.num_ids(table)
