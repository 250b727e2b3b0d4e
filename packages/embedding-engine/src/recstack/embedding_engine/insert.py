"""A training forward's inserts: new ids get rows, initialized from the logical id.

:func:`insert_ids` takes a batch's unique entries of one dynamic physical table (ids, with
their logical table indices in a merged table), lets admission decide which may have a row
(:func:`~recstack.embedding_engine.admission.admission_mask`), finds or inserts those in the
hash table, grows the value store and the row metadata to the rows handed out, stamps the
rows' last-seen step and hits, and initializes the rows new ids took
(:func:`init_new_rows`).

A new row is initialized from the *logical* id with its logical table's initializer and
seed (:func:`~recstack.embedding_engine.kernels.init_rows.init_rows_into`), so merged and
unmerged collections start with bit-identical rows, and a row an evicted id freed starts
afresh (announced through ``PagedTensor.rows_reset``, so a sparse optimizer's state of that
row restarts too).
"""

from __future__ import annotations

import torch

from recstack.embedding_engine.admission import admission_mask
from recstack.embedding_engine.kernels.init_rows import init_rows_into
from recstack.embedding_engine.kernels.init_rows_tagged import init_rows_tagged
from recstack.embedding_engine.physical import PhysicalTable

__all__ = ["init_new_rows", "insert_ids"]


def insert_ids(
    phys: PhysicalTable,
    unique: torch.Tensor,
    tags: torch.Tensor | None,
    hits: torch.Tensor,
    step: int,
) -> tuple[torch.Tensor, bool]:
    """Rows of a batch's unique entries, inserting and initializing the new admitted ones.

    Args:
        phys: a dynamic physical table.
        unique: int64 ``[U]`` distinct ids.
        tags: their logical table indices in a merged table, ``None`` for a table of one.
        hits: int64 ``[U]`` occurrences of each in the batch.
        step: the training step stamped on the rows.

    Returns:
        ``(rows, partial)``: ``rows`` int64 ``[U]``, the hash table's rows (a tiered
        table's value slots are ``phys.physical(rows)``), -1 for ids admission keeps out;
        ``partial`` whether there are any.
    """
    if not unique.numel():
        return unique, False
    admit = admission_mask(phys, unique, tags, hits) if phys.sketches else None
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
        is_new = torch.zeros(0, dtype=torch.bool, device=unique.device)
    n_new = len(phys.hash_table) - held  # known on the host: no sync to find the new rows
    phys.grow(phys.hash_table.num_rows_allocated)
    phys.meta.touch(rows_a, step, hits_a, is_new)
    if phys.tiers is not None:
        # The hit rate counts rows the table held before: new ones have nowhere to be yet.
        phys.tiers.count(torch.where(is_new, -1, rows_a))
    if n_new:
        new = torch.nonzero_static(is_new, size=n_new).squeeze(1)
        new_tags = None if tags_a is None else tags_a.index_select(0, new)
        new_slots = phys.physical(rows_a.index_select(0, new))
        init_new_rows(phys, new_slots, keys_a.index_select(0, new), new_tags)
    if admit is None:
        return rows_a, False
    rows = torch.full_like(unique, -1)
    rows[admit] = rows_a
    return rows, True


def init_new_rows(
    phys: PhysicalTable,
    new_rows: torch.Tensor,
    new_ids: torch.Tensor,
    tags: torch.Tensor | None,
) -> None:
    """Initialize rows new ids took (fresh or freed by eviction), count the ids, and
    announce the rows (``PagedTensor.rows_reset``) to whoever keeps state per row.

    Args:
        phys: the physical table.
        new_rows: int64 value-store slots the new ids took.
        new_ids: the new ids (logical ids).
        tags: their logical table indices, ``None`` for a physical table of one.
    """
    if tags is None:
        (cfg,) = phys.tables
        init_rows_into(
            phys.values, new_rows, new_ids, cfg.initializer, seed=cfg.init_seed, check_bounds=False
        )
    else:
        # Every logical table's new rows in one launch, counted on the device: no host sync.
        # (bincount on CUDA reads the largest tag back to size its output.)
        ones = torch.ones(tags.numel(), dtype=torch.int64, device=tags.device)
        counts = torch.zeros(len(phys.tables), dtype=torch.int64, device=tags.device)
        phys.add_id_counts(counts.index_add_(0, tags.long(), ones))
        values = init_rows_tagged(
            new_ids,
            tags,
            phys.dim,
            [cfg.initializer for cfg in phys.tables],
            [cfg.init_seed for cfg in phys.tables],
            dtype=phys.values.dtype,
        )
        phys.values.scatter_rows(new_rows, values, check_bounds=False)
    # State kept per row elsewhere (a sparse optimizer's moments) starts afresh too.
    phys.values.rows_reset(new_rows)
