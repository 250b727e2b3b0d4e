"""Physical tables: how logical tables are grouped, their storage and the books they keep."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import VOCAB, fixed_collection

from recstack.embedding_engine.config import Admission, TableConfig
from recstack.embedding_engine.fixed_index import FixedIndex
from recstack.embedding_engine.hash_table import HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.physical import (
    DEFAULT_PAGE_ROWS,
    PhysicalTable,
    TableLocation,
    build_physical_tables,
)

DIM = 4


def tables() -> list[TableConfig]:
    return [
        TableConfig("item", dim=DIM),
        TableConfig("user", dim=DIM, admission=Admission(min_count=2, counter_slots=64)),
        TableConfig("cat", dim=DIM, fixed_size=8),
        TableConfig("half", dim=DIM, dtype=torch.float16),
        TableConfig("wide", dim=8, capacity=5000),
        TableConfig("shop", dim=DIM),
    ]


def test_merged_grouping_by_dim_and_dtype(device) -> None:
    physical, located = build_physical_tables(tables(), device)
    assert {name: p.table_names for name, p in physical.items()} == {
        "item+user+shop": ("item", "user", "shop"),
        "cat": ("cat",),
        "half": ("half",),
        "wide": ("wide",),
    }
    assert located["shop"] == TableLocation("item+user+shop", 2)
    assert located["cat"] == TableLocation("cat", 0)
    merged = physical["item+user+shop"]
    assert merged.tag_bits == 2 and isinstance(merged.hash_table, HashTable)
    assert merged.hash_table.num_tags == 3 and set(merged.sketches) == {1}
    assert merged.values.page_rows == DEFAULT_PAGE_ROWS and merged.values.num_rows == 0
    assert merged.id_counts == [0, 0, 0] and merged.removal_logs == {}
    assert physical["half"].dtype == torch.float16
    # A capacity hint sizes the hash table ahead of the rows.
    assert physical["wide"].hash_table.capacity >= 5000 / 0.75


def test_unmerged_grouping_gives_every_table_its_own(device) -> None:
    physical, located = build_physical_tables(tables(), device, merge_tables=False, page_rows=16)
    assert list(physical) == ["item", "user", "cat", "half", "wide", "shop"]
    assert all(loc.index == 0 for loc in located.values())
    assert all(p.tag_bits == 0 for p in physical.values())
    assert physical["item"].values.page_rows == 16
    assert physical["user"].sketches[0].counters.numel() == 64


def test_fixed_table_is_own_physical_table_and_initialized(device) -> None:
    ec = fixed_collection(device)
    assert ec.table_groups == {"cat": ("cat",), "item": ("item",)}
    phys = ec.physical_tables["cat"]
    assert phys.is_fixed_size and phys.fixed_size == VOCAB
    assert isinstance(phys.hash_table, FixedIndex)
    assert phys.values.num_rows == VOCAB and ec.num_ids("cat") == VOCAB
    cfg = phys.tables[0]
    ids = torch.arange(VOCAB, device=device)
    expected = init_rows(ids, DIM, cfg.initializer, seed=cfg.init_seed, dtype=torch.float32)
    assert torch.equal(phys.values.to_dense(), expected)
    # deterministic: a second collection starts with the same rows
    again = fixed_collection(device).physical_tables["cat"].values.to_dense()
    assert torch.equal(again, expected)
    assert torch.equal(ec.find_rows("cat", torch.tensor([3, 0, 9], device=device)).cpu(),
                       torch.tensor([3, 0, 9]))  # fmt: skip


def test_id_range_and_check_ids(device) -> None:
    physical, _ = build_physical_tables(tables(), device)
    fixed, merged = physical["cat"], physical["item+user+shop"]
    ids = torch.tensor([-1, 0, 7, 8], device=device)
    assert fixed.bad_ids(ids).tolist() == [True, False, False, True]
    assert not merged.bad_ids(ids).any() and merged.id_range() == "any int64"
    merged.check_ids(ids, "feature 'f'", "item")  # any int64 is an id
    fixed.check_ids(ids[1:3], "feature 'f'", "cat")
    match = r"feature 'f' \(table 'cat'\): id -1 is out of range.*\[0, 8\)"
    with pytest.raises(ValueError, match=match):
        fixed.check_ids(ids, "feature 'f'", "cat")


def test_books_of_a_merged_table(device) -> None:
    physical, _ = build_physical_tables(tables(), device)
    phys = physical["item+user+shop"]
    keys = torch.tensor([5, 6, 5, 7], device=device)
    tags = torch.tensor([0, 0, 2, 2], device=device)
    rows, _ = phys.hash_table.find_or_insert(keys, tags)
    assert phys.num_ids(0) == 0  # counts follow inserts reported to the table
    phys.recount_ids()
    assert [phys.num_ids(i) for i in range(3)] == [2, 0, 2]
    ids, entry_tags, entry_rows = phys.entries()
    assert entry_rows.tolist() == [0, 1, 2, 3] and entry_tags.tolist() == tags.tolist()
    assert ids.tolist() == keys.tolist()
    table_ids, table_rows = phys.table_entries(2)
    assert table_ids.tolist() == [5, 7] and table_rows.tolist() == rows[2:].tolist()
    # Erasing logs the ids only once a log was started.
    assert phys.erase(0, torch.tensor([6], device=device)) == 1
    assert phys.removed_ids(0).numel() == 0
    phys.start_removal_log(2)
    assert phys.erase(2, torch.tensor([7, 5], device=device)) == 2
    assert phys.removed_ids(2).tolist() == [5, 7]
    assert [phys.num_ids(i) for i in range(3)] == [1, 0, 0]
    phys.add_ids(1, 3)
    assert phys.num_ids(1) == 3
    assert phys.erase(1, torch.zeros(0, dtype=torch.int64, device=device)) == 0


def test_a_table_of_one_counts_its_hash_table(device) -> None:
    physical, _ = build_physical_tables([TableConfig("t", dim=DIM)], device)
    phys = physical["t"]
    assert isinstance(phys, PhysicalTable) and phys.id_bits == 64
    phys.hash_table.find_or_insert(torch.tensor([1, 2, 3], device=device))
    assert phys.num_ids(0) == 3
    ids, tags, rows = phys.entries()
    assert ids.tolist() == [1, 2, 3] and rows.tolist() == [0, 1, 2] and not tags.any()
    empty = build_physical_tables([TableConfig("e", dim=DIM)], device)[0]["e"]
    assert [x.numel() for x in empty.entries()] == [0, 0, 0]
