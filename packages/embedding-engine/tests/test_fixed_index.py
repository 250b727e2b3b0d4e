"""FixedIndex: a fixed-size table's id -> row map (row = id), with the hash table's read API."""

from __future__ import annotations

import pytest
import torch

from recstack.embedding_engine.fixed_index import FixedIndex


def test_sizes_and_device(device) -> None:
    index = FixedIndex(6, device)
    assert len(index) == index.size == index.capacity == index.num_rows_allocated == 6
    assert index.device.type == device.type and index.nbytes == 0
    assert repr(index).startswith("FixedIndex(size=6")
    assert index.move_to_("cpu") is index and index.device == torch.device("cpu")


def test_find_is_the_id_inside_the_range(device) -> None:
    index = FixedIndex(4, device)
    keys = torch.tensor([0, 3, 4, -1, 2**40], device=device)
    assert index.find(keys).tolist() == [0, 3, -1, -1, -1]
    assert index.find(keys, 1, check_keys=False).tolist() == [0, 3, -1, -1, -1]  # tags ignored
    assert index.find(keys[:0]).numel() == 0


def test_find_or_insert_never_inserts(device) -> None:
    index = FixedIndex(4, device)
    rows, is_new = index.find_or_insert(torch.tensor([2, 2, 0], device=device))
    assert rows.tolist() == [2, 2, 0] and not is_new.any()
    with pytest.raises(ValueError, match=r"id 4 is outside the fixed-size table's range \[0, 4\)"):
        index.find_or_insert(torch.tensor([1, 4], device=device))
    with pytest.raises(ValueError, match="cannot erase"):
        index.erase(torch.tensor([1], device=device))


def test_items_by_chunks(device) -> None:
    index = FixedIndex(5, device)
    chunks = list(index.items(chunk_size=2))
    assert [k.tolist() for k, _ in chunks] == [[0, 1], [2, 3], [4]]
    assert all(torch.equal(k, r) for k, r in chunks)
    tagged = list(index.tagged_items(chunk_size=10))
    assert len(tagged) == 1 and tagged[0][0].tolist() == [0, 1, 2, 3, 4]
    assert not tagged[0][1].any()
    with pytest.raises(ValueError, match="FixedIndex.items: chunk_size must be an int >= 1"):
        list(index.items(chunk_size=0))
