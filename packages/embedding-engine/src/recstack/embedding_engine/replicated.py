"""Small tables replicated on every rank of a sharded collection, trained data parallel.

A :class:`~recstack.embedding_engine.sharded.ShardedEmbeddingCollection` replicates small
fixed-size tables (by default those of at most :data:`REPLICATE_MAX_ELEMENTS` values)
instead of sharding them: every rank holds all their rows and looks its ids up locally,
with no exchange. Their rows stay identical on every rank because every rank applies the
same gradient: :class:`ReplicatedSparseParameter` hands the sparse optimizer the sum of
every rank's gradient (all ranks' rows gathered, then coalesced), divided by the world size
when the collection averages gradients. In checkpoints, :class:`ReplicaState` has rank 0
save the rows once and every rank load all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from recstack.core import ShardSpec, SparseGrad
from recstack.core.distributed import all_to_all_v_list
from recstack.embedding_engine.config import TableConfig
from recstack.embedding_engine.parameters import EmbeddingSparseParameter

__all__ = [
    "REPLICATE_MAX_ELEMENTS",
    "ReplicaState",
    "ReplicatedSparseParameter",
    "replicated_tables",
]

#: Fixed-size tables of at most this many values (``fixed_size * dim``; 64 MiB in fp32)
#: are replicated by default.
REPLICATE_MAX_ELEMENTS = 16 << 20


def replicated_tables(tables: Sequence[TableConfig], replicate: Sequence[str] | None) -> set[str]:
    """The names of the tables to replicate: ``replicate``, or by default the fixed-size
    tables of at most :data:`REPLICATE_MAX_ELEMENTS` values.

    Raises:
        ValueError: ``replicate`` names a table that does not exist or is dynamic (a
            dynamic table's ids come and go with each rank's batches, so replicas would
            hold different ids).
    """
    by_name = {t.name: t for t in tables}
    if replicate is None:
        return {
            t.name
            for t in tables
            if t.fixed_size is not None and t.fixed_size * t.dim <= REPLICATE_MAX_ELEMENTS
        }
    if isinstance(replicate, str):
        raise TypeError("replicate must be a list of table names, not a string")
    chosen = set()
    for name in replicate:
        table = by_name.get(name)
        if table is None:
            raise ValueError(f"replicate: no table {name!r} (tables: {sorted(by_name)})")
        if table.fixed_size is None:
            raise ValueError(
                f"replicate: table {name!r} is dynamic; only fixed-size tables can be "
                "replicated (a dynamic table's ids come and go with each rank's batches, so "
                "the replicas would hold different ids)"
            )
        chosen.add(name)
    return chosen


class ReplicatedSparseParameter(EmbeddingSparseParameter):
    """A replicated table's sparse parameter: its pending gradient is every rank's,
    summed (a collective: every rank's optimizer reads it at the same point).

    Args:
        param: the table's parameter in this rank's replica collection.
        group: the ranks holding replicas.
        average: divide the summed gradient by the number of ranks.
    """

    def __init__(
        self, param: EmbeddingSparseParameter, group: dist.ProcessGroup | None, average: bool
    ) -> None:
        self._collection = param._collection
        self._name = param.name
        self._table = param.table
        self._group = group
        self.average = average

    def pending_grad(self) -> SparseGrad | None:
        """Every rank's stored gradient of this table, summed over ranks and coalesced
        (``None`` when no rank has one)."""
        local = super().pending_grad()
        world = dist.get_world_size(self._group)
        device, dim = self._table.device, self._table.dim
        if local is None:
            rows = torch.zeros(0, dtype=torch.int64, device=device)
            values = torch.zeros((0, dim), dtype=torch.float32, device=device)
        else:
            rows, values = local.rows, local.values.float()
        n = rows.numel()
        # Every rank sends its rows to every rank: an all-gather of ragged sizes.
        (all_rows, all_values), _ = all_to_all_v_list(
            [rows.repeat(world), values.repeat(world, 1)], [n] * world, self._group
        )
        if not all_rows.numel():
            return None
        grad = SparseGrad(all_rows, all_values).coalesce()
        if self.average:
            grad = SparseGrad(grad.rows, grad.values / world)
        return grad


class ReplicaState:
    """A replicated table's ``KeyedState`` in a checkpoint: rank 0 exports the rows (the
    same on every rank), and every rank imports all of them, whatever rank owns a key.

    Args:
        state: the table's state in this rank's replica collection.
        rank: this rank.
    """

    # Every method spelled out: runtime protocol checks look methods up statically.
    def __init__(self, state: Any, rank: int) -> None:
        self._state, self._rank = state, rank

    def state_metadata(self) -> dict[str, Any]:
        return self._state.state_metadata()

    def export_chunks(self, chunk_rows: int) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        if self._rank == 0:
            yield from self._state.export_chunks(chunk_rows)

    def export_changed_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        if self._rank == 0:
            yield from self._state.export_changed_chunks(chunk_rows)

    def import_chunk(
        self, keys: torch.Tensor, slots: Any, metadata: Any, shard: ShardSpec | None = None
    ) -> int:
        return self._state.import_chunk(keys, slots, metadata, None)

    def mark_clean(self) -> None:
        self._state.mark_clean()

    def removed_keys(self) -> torch.Tensor:
        keys = self._state.removed_keys()
        return keys if self._rank == 0 else keys[:0]

    def remove_keys(self, keys: torch.Tensor, shard: ShardSpec | None = None) -> int:
        return self._state.remove_keys(keys, None)

    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        return self._state.auxiliary_state() if self._rank == 0 else {}

    def load_auxiliary_state(self, parts: Sequence[Any]) -> None:
        self._state.load_auxiliary_state([p for p in parts if p])
