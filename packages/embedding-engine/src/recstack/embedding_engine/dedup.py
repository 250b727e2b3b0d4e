"""Deduplicate a batch's ids by sorting them once, keeping the sort for the backward.

``torch.unique(ids, return_inverse=True)`` sorts the ids and throws the sort away; the
backward then needs the ids grouped by row again and would sort a second time.
:func:`sort_ids` does the same work once and keeps both halves: the unique ids, counts and
inverse the forward needs (hash-table lookups, admission counts, metadata stamps) and the
sort permutation with its segment labels that the backward's reduction by row reads
(:func:`~recstack.embedding_engine.kernels.lookup_grad.lookup_grad_sums`).

A merged physical table's ids come with *tags* (their logical table index): an entry is an
``(id, tag)`` pair, and the same id under two tags is two entries. :func:`sort_ids` then
groups pairs with one stable sort of the ids taken in ascending-tag order (the caller's
concatenation of features usually is, or it passes that order): equal ids stay in tag order,
so equal pairs are contiguous. No id range is given up to make room for the tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SortedIds", "sort_ids"]

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SortedIds:
    """One sort of ``N`` int64 ids.

    Attributes:
        unique: ``[U]`` the distinct ids (with tags: the ids of the distinct ``(id, tag)``
            pairs), ascending (pairs by id, then tag).
        counts: int64 ``[U]``: how often each occurs.
        inverse: int64 ``[N]``: ``unique[inverse] == ids``.
        order: int64 ``[N]``: a permutation with ``ids[order]`` ascending.
        sorted_seg: ``[N]``: ``inverse[order]`` (non-decreasing), int32 when ``N < 2**31``.
        read: the values of :func:`sort_ids`'s ``read_with`` scalars, as Python ints.
        unique_tags: ``[U]`` the tags of the distinct pairs (the ``tags`` dtype), or
            ``None`` when sorted without tags.
    """

    unique: torch.Tensor
    counts: torch.Tensor
    inverse: torch.Tensor
    order: torch.Tensor
    sorted_seg: torch.Tensor
    read: tuple[int, ...] = ()
    unique_tags: torch.Tensor | None = None

    @property
    def num_unique(self) -> int:
        """``U``."""
        return self.unique.numel()


def sort_ids(
    ids: torch.Tensor,
    *,
    tags: torch.Tensor | None = None,
    tag_order: torch.Tensor | None = None,
    read_with: Sequence[torch.Tensor] = (),
) -> SortedIds:
    """Sort int64 ``ids`` (1-D) once: the unique ids, counts, inverse, order and labels.

    One ``torch.sort``, a few elementwise passes and one host sync (for ``U``), the same
    work as ``torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)``.

    Args:
        ids: 1-D int64 ids.
        tags: optional 1-D integer tags of the ids: then the distinct ``(id, tag)`` pairs
            are grouped (:attr:`SortedIds.unique_tags` holds their tags). One stable sort
            of the ids still does it, plus two gathers when ``tag_order`` is given.
        tag_order: with ``tags``, a permutation listing the positions by ascending tag,
            stably (equal tags in position order); ``None`` when ``tags`` already ascend
            (as when features are concatenated in logical-table order).
        read_with: device scalars (e.g. "some id is out of range" flags) read to the host
            in the same sync, returned in :attr:`SortedIds.read`, so a caller's checks
            cost no sync of their own.

    Examples:
        >>> s = sort_ids(torch.tensor([7, 3, 7, 5]))
        >>> s.unique.tolist(), s.counts.tolist(), s.inverse.tolist()
        ([3, 5, 7], [1, 1, 2], [2, 0, 2, 1])
        >>> s.sorted_seg.tolist()
        [0, 1, 2, 2]
        >>> t = sort_ids(torch.tensor([7, 3, 7, 7]), tags=torch.tensor([0, 0, 1, 0]),
        ...              tag_order=torch.tensor([0, 1, 3, 2]))
        >>> t.unique.tolist(), t.unique_tags.tolist(), t.inverse.tolist()
        ([3, 7, 7], [0, 0, 1], [1, 0, 2, 1])
    """
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(
            f"sort_ids: ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    n, device = ids.numel(), ids.device
    seg_dtype = torch.int32 if n <= _INT32_MAX else torch.int64
    if tags is not None and (tags.dim() != 1 or tags.numel() != n):
        raise ValueError(f"sort_ids: tags must be 1-D like ids ({n}), got {tuple(tags.shape)}")
    if n == 0:
        read = (
            tuple(torch.stack([f.to(torch.int64) for f in read_with]).tolist()) if read_with else ()
        )
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        no_tags = None if tags is None else tags[:0]
        return SortedIds(empty, empty, empty, empty, empty.to(seg_dtype), read, no_tags)
    is_start = torch.ones(n, dtype=torch.bool, device=device)
    sorted_tags = None
    if tags is None:
        sorted_ids, order = torch.sort(ids)
        torch.ne(sorted_ids[1:], sorted_ids[:-1], out=is_start[1:])
    else:
        # Stable by id over ids in ascending-tag order: each id's run lists its tags in
        # ascending order, so equal (id, tag) pairs are neighbours.
        by_tag = ids if tag_order is None else ids.index_select(0, tag_order)
        sorted_ids, order = torch.sort(by_tag, stable=True)
        if tag_order is not None:
            order = tag_order.index_select(0, order)
        sorted_tags = tags.index_select(0, order)
        torch.ne(sorted_ids[1:], sorted_ids[:-1], out=is_start[1:])
        is_start[1:] |= sorted_tags[1:] != sorted_tags[:-1]
    sorted_seg = torch.cumsum(is_start, 0, dtype=seg_dtype)
    # The one sync: U (the last label + 1) and the caller's scalars, together.
    host = torch.stack([sorted_seg[-1].to(torch.int64), *(f.to(torch.int64) for f in read_with)])
    u, *read = host.tolist()
    sorted_seg.sub_(1)
    starts = torch.nonzero_static(is_start, size=u).squeeze(1)
    unique = sorted_ids.index_select(0, starts)
    ends = torch.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    inverse = torch.empty(n, dtype=torch.int64, device=device)
    inverse.index_copy_(0, order, sorted_seg.to(torch.int64))
    unique_tags = None if sorted_tags is None else sorted_tags.index_select(0, starts)
    return SortedIds(unique, ends - starts, inverse, order, sorted_seg, tuple(read), unique_tags)
