"""How a merged physical table tells its logical tables' ids apart: a tag beside the id.

:class:`~recstack.embedding_engine.collection.EmbeddingCollection` merges dynamic tables of
equal ``(dim, dtype)`` into one physical table (one hash table, one value store). An entry
of that hash table is an ``(id, tag)`` pair, the tag being the logical table's index in the
physical table (config order): the hash table keeps it in spare high bits of the slot's row
word (:mod:`recstack.embedding_engine.kernels.hash_table`) and compares it on every probe.
So:

* every int64 id is valid in every dynamic table, merged or not (the two whose bit patterns
  mark free and erased slots included: they are stored remapped, losslessly);
* the same id in two merged tables is two entries with two rows: no collision, no folding;
* the hash table's rows stay below ``2**(62 - tag_bits)`` (``2**61`` rows for two tables,
  ``2**60`` for up to four, ...): far beyond any device's memory.

A forward concatenates a physical table's features' ids; :func:`batch_tags` gives each id its
tag and the permutation :func:`~recstack.embedding_engine.dedup.sort_ids` needs to group
equal ``(id, tag)`` pairs with one sort. Both come from the features' sizes, which the host
knows: nothing syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchTags", "batch_tags"]


@dataclass(frozen=True)
class BatchTags:
    """The tags of a batch's concatenated ids.

    Attributes:
        tags: int32 ``[N]``: the logical table index of each id.
        order: int64 ``[N]``: the positions listed by ascending tag, stably, or ``None``
            when the tags already ascend (features concatenated in table order).
    """

    tags: torch.Tensor
    order: torch.Tensor | None


def batch_tags(indices: Sequence[int], sizes: Sequence[int], device: torch.device) -> BatchTags:
    """Tags of ids concatenated from blocks: block ``i`` holds ``sizes[i]`` ids of logical
    table ``indices[i]``.

    Examples:
        >>> bt = batch_tags([1, 0, 1], [2, 1, 1], torch.device("cpu"))
        >>> bt.tags.tolist(), bt.order.tolist()
        ([1, 1, 0, 1], [2, 0, 1, 3])
    """
    total = sum(sizes)
    ascending = all(indices[i] <= indices[i + 1] for i in range(len(indices) - 1))
    if not indices or total == 0:
        tags = torch.zeros(total, dtype=torch.int32, device=device)
        order = None if ascending else torch.zeros(total, dtype=torch.int64, device=device)
        return BatchTags(tags, order)
    # One small copy and a repeat or two, not a kernel per block: a merged table may be read
    # by dozens of features.
    rows = [list(indices), list(sizes)]
    if not ascending:
        # Blocks by ascending tag (stably); block i's positions move by a constant.
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        blocks = sorted(range(len(indices)), key=lambda i: (indices[i], i))
        moved, at = [], 0
        for i in blocks:
            moved.append(starts[i] - at)
            at += sizes[i]
        rows += [moved, [sizes[i] for i in blocks]]
    spec = torch.tensor(rows, dtype=torch.int64).to(device)
    tags = torch.repeat_interleave(spec[0].to(torch.int32), spec[1], output_size=total)
    if ascending:
        return BatchTags(tags, None)
    shift = torch.repeat_interleave(spec[2], spec[3], output_size=total)
    order = torch.arange(total, dtype=torch.int64, device=device) + shift
    return BatchTags(tags, order)
