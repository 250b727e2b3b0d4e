"""sort_ids with tags: one sort groups the (id, logical table) pairs of a merged table.

(Untagged sorting is tested with the backward that reads it, in test_lookup_grad.py.)
"""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import seed

from recstack.embedding_engine.dedup import sort_ids
from recstack.embedding_engine.merged import batch_tags


def pairs_unique(ids: torch.Tensor, tags: torch.Tensor) -> list[tuple[int, int]]:
    return sorted(set(zip(ids.tolist(), tags.tolist(), strict=True)))


@pytest.mark.parametrize("n", [1, 3, 200])
def test_tagged_sort_groups_pairs(device, n) -> None:
    gen = torch.Generator().manual_seed(seed("tagged", n))
    ids = torch.randint(-3, 4, (n,), generator=gen)  # many repeats across tables
    sizes = [n // 3, n - 2 * (n // 3), n // 3]
    bt = batch_tags([1, 0, 2], sizes, device)
    s = sort_ids(ids.to(device), tags=bt.tags, tag_order=bt.order)
    assert s.unique_tags is not None
    got = list(zip(s.unique.tolist(), s.unique_tags.tolist(), strict=True))
    assert got == pairs_unique(ids, bt.tags.cpu())  # by id, then tag
    # inverse maps every position to its pair; counts count each pair's positions.
    assert s.unique[s.inverse].tolist() == ids.tolist()
    assert s.unique_tags[s.inverse].tolist() == bt.tags.tolist()
    assert int(s.counts.sum()) == n and bool((s.counts > 0).all())
    # order groups each pair's positions contiguously, labels non-decreasing.
    assert s.sorted_seg.tolist() == s.inverse[s.order].tolist()
    assert bool((s.sorted_seg[1:] >= s.sorted_seg[:-1]).all())


def test_same_id_under_two_tags_is_two_entries(device) -> None:
    ids = torch.tensor([7, 7, 7, 3], device=device)
    tags = torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=device)  # ascending
    s = sort_ids(ids, tags=tags)
    assert s.unique.tolist() == [3, 7, 7] and s.unique_tags.tolist() == [1, 0, 1]
    assert s.counts.tolist() == [1, 2, 1] and s.inverse.tolist() == [1, 1, 2, 0]


def test_tagged_empty_and_bad_tags(device) -> None:
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    s = sort_ids(empty, tags=empty.to(torch.int32))
    assert s.num_unique == 0 and s.unique_tags is not None and s.unique_tags.numel() == 0
    with pytest.raises(ValueError, match="tags must be 1-D like ids"):
        sort_ids(torch.tensor([1, 2], device=device), tags=torch.tensor([0], device=device))
