"""EmbeddingCollection.memory_stats(): bytes per table, equal to the tensors' own sizes."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import kjt

from recstack.core import PagedTensor
from recstack.embedding_engine import (
    Admission,
    EmbeddingCollection,
    FeatureConfig,
    MemoryStats,
    TableConfig,
    TableMemory,
)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def paged(store: PagedTensor) -> int:
    return nbytes(*store.pages, store.page_table)


def collection() -> EmbeddingCollection:
    return EmbeddingCollection(
        [
            TableConfig("item", dim=4),
            TableConfig("user", dim=4, admission=Admission(min_count=2, counter_slots=64)),
            TableConfig("tag", dim=2, fixed_size=5),
            TableConfig("q", dim=8, dtype=torch.bfloat16),
        ],
        [
            FeatureConfig("items", "item"),
            FeatureConfig("uid", "user"),
            FeatureConfig("tags", "tag"),
            FeatureConfig("qs", "q"),
        ],
        page_rows=4,
    )


def expected(ec: EmbeddingCollection, name: str) -> dict[str, int]:
    """What every field should be, from the tensors themselves (private ones included)."""
    p = ec.physical_tables[name]
    ht = p.hash_table
    return {
        "rows": p.values.num_rows,
        "values": paged(p.values),
        "hash_slots": nbytes(ht._slots, ht._free) if not p.is_fixed_size else 0,
        "metadata": nbytes(p.meta._last_seen, p.meta._counts, p.meta._dirty),
        "optimizer_slots": sum(paged(c.store) for c in p.values.companions.values()),
        "admission": nbytes(*(s.counters for s in p.sketches.values())),
    }


def check(ec: EmbeddingCollection) -> MemoryStats:
    stats = ec.memory_stats()
    assert isinstance(stats, MemoryStats) and stats.device == ec.device
    assert [t.name for t in stats] == list(ec.physical_tables) and len(stats) == 3
    for name in ec.physical_tables:
        t = stats[name]
        assert isinstance(t, TableMemory) and t.tables == ec.physical_tables[name].table_names
        want = expected(ec, name)
        got = {k: getattr(t, k) for k in want}
        assert got == want, name
        assert t.total == sum(v for k, v in want.items() if k != "rows")
    for field in ("rows", "values", "hash_slots", "metadata", "optimizer_slots", "admission"):
        assert getattr(stats, field) == sum(getattr(t, field) for t in stats), field
    assert stats.total == sum(t.total for t in stats)
    return stats


def test_new_collection() -> None:
    ec = collection()
    stats = check(ec)
    assert stats["item+user"].rows == 0 and stats["item+user"].values == 0  # no page yet
    assert stats["item+user"].admission == 64 * 4  # int32 counters
    tag = stats["tag"]  # a fixed table: its 5 rows exist, in two 4-row pages
    assert (tag.rows, tag.values, tag.hash_slots) == (5, 2 * 4 * 2 * 4 + 2 * 8, 0)
    assert stats["q"].admission == 0 and stats["q"].optimizer_slots == 0


@pytest.mark.parametrize("n_ids", [1, 9])
def test_after_training_with_optimizer_slots(n_ids: int) -> None:
    ec = collection()
    values = ec.physical_tables["item+user"].values
    values.add_companion("exp_avg", PagedTensor(4, page_rows=4, name="m"))
    values.add_companion("acc", PagedTensor(1, page_rows=4, name="a"), init=0.1)
    for _ in range(2):
        ids = list(range(n_ids))
        out = ec(kjt(ec.device, items=ids, uid=[7], tags=[1], qs=ids))
        sum(v.float().sum() for v in out.values()).backward()
        ec.sparse_grads()
    stats = check(ec)
    big = stats["item+user"]
    assert big.rows == n_ids + 1  # the items and user 7 (admitted on its second sighting)
    pages = -(-big.rows // 4)
    assert big.values == pages * 4 * 4 * 4 + pages * 8
    assert big.optimizer_slots == pages * 4 * (4 + 1) * 4 + 2 * pages * 8
    assert stats["q"].values == pages_of(n_ids) * 4 * 8 * 2 + pages_of(n_ids) * 8  # bf16


def pages_of(rows: int) -> int:
    return -(-rows // 4)


def test_str_is_a_table() -> None:
    ec = collection()
    ec(kjt(ec.device, items=[1, 2], uid=[], tags=[0], qs=[3]))
    text = str(ec.memory_stats())
    lines = text.splitlines()
    assert lines[0] == "EmbeddingCollection memory on cpu"
    assert lines[1].split() == [
        "table", "rows", "values", "hash_slots", "metadata", "optimizer_slots", "admission",
        "total",
    ]  # fmt: skip
    assert [ln.split()[0] for ln in lines[3:]] == ["item+user", "tag", "q", "total"]
    assert lines[3].split()[1] == "2" and "KiB" in lines[3]
    assert lines[-1].split()[1] == "8"  # 2 items + 5 tags + 1 q


def test_unknown_table_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no physical table 'item'.*'item\\+user'"):
        collection().memory_stats()["item"]
