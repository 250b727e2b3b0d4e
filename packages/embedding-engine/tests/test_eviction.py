"""Row metadata and eviction of EmbeddingCollection: by step, by count, LRU/LFU caps."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import bags_kjt, fixed_collection, kjt

from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import Eviction, FeatureConfig, TableConfig
from recstack.embedding_engine.eviction import (
    RowMetadata,
    apply_eviction_rules,
    cap_victims,
    enforce_caps,
    evict_stale,
    stale_mask,
)
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.physical import build_physical_tables

DIM = 4


def one_table(device: torch.device, **eviction: object) -> EmbeddingCollection:
    ev = Eviction(**eviction) if eviction else Eviction()  # type: ignore[arg-type]
    return EmbeddingCollection(
        [TableConfig("t", dim=DIM, eviction=ev)], [FeatureConfig("f", "t")], device=device
    )


def present(ec: EmbeddingCollection, table: str, ids: list[int], device) -> list[bool]:
    rows = ec.find_rows(table, torch.tensor(ids, dtype=torch.int64, device=device))
    return (rows >= 0).tolist()


def live_ids(ec: EmbeddingCollection, table: str, universe: range, device) -> set[int]:
    ids = list(universe)
    return {i for i, p in zip(ids, present(ec, table, ids, device), strict=True) if p}


# ------------------------------------------------------------------------------- metadata


def test_row_metadata_grows_and_resets() -> None:
    meta = RowMetadata()
    meta.ensure_rows(2)
    meta.touch(torch.tensor([0, 1]), 3, torch.tensor([2, 1]), torch.tensor([True, True]))
    meta.ensure_rows(40)  # grows past the initial capacity, keeping rows
    meta.touch(torch.tensor([1, 39]), 5, torch.tensor([4, 1]), torch.tensor([False, True]))
    assert meta.num_rows == 40
    assert meta.last_seen[[0, 1, 39]].tolist() == [3, 5, 5]
    assert meta.counts[[0, 1, 39]].tolist() == [2, 5, 1]
    meta.touch(torch.tensor([1]), 6, torch.tensor([1]), torch.tensor([True]))  # reused row
    assert meta.counts[1].item() == 1
    rows = torch.tensor([0, 1, 39])
    assert stale_mask(meta, rows, older_than_step=5).tolist() == [True, False, False]
    assert stale_mask(meta, rows, min_count=2).tolist() == [False, True, True]
    assert stale_mask(meta, rows).tolist() == [False, False, False]
    # LFU over rows 0 (2), 1 (1), 39 (1): ties to the lower row.
    assert cap_victims(meta, rows, "lfu", 2).tolist() == [1, 2]
    assert cap_victims(meta, rows, "lru", 1).tolist() == [0]
    protect = torch.tensor([True, False, False])
    # Last seen: row 0 at 3 (protected), row 39 at 5, row 1 at 6.
    assert cap_victims(meta, rows, "lru", 5, protect).tolist() == [2, 1]
    with pytest.raises(ValueError, match="policy"):
        cap_victims(meta, rows, "fifo", 1)


def test_forward_stamps_steps_and_counts(device) -> None:
    ec = one_table(device)
    assert ec.step == 0
    ec(kjt(device, f=[1, 1, 2]))
    ec.set_step(10)
    ec(kjt(device, f=[2, 3]))
    assert ec.step == 11
    phys = ec.physical_tables["t"]
    rows = ec.find_rows("t", torch.tensor([1, 2, 3], device=device))
    assert phys.meta.last_seen[rows].tolist() == [0, 10, 10]
    assert phys.meta.counts[rows].tolist() == [2, 2, 1]
    ec.eval()
    ec(kjt(device, f=[1, 9]))  # eval: no stamps, no step
    assert ec.step == 11
    assert phys.meta.counts[rows].tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="set_step"):
        ec.set_step(-1)


# ---------------------------------------------------------------------------- evict(...)


def test_evict_by_step_and_count(backend, device) -> None:
    ec = one_table(device)
    for batch in ([1, 2], [2, 3, 3], [4]):  # steps 0, 1, 2
        ec(kjt(device, f=batch))
    assert ec.evict(older_than_step=1) == {"t": 1}  # id 1 (last seen at step 0)
    assert live_ids(ec, "t", range(6), device) == {2, 3, 4}
    assert ec.evict(min_count=2) == {"t": 1}  # id 4 (seen once); 2 and 3 twice
    assert live_ids(ec, "t", range(6), device) == {2, 3}
    assert ec.num_ids("t") == 2
    # The rules are or-ed.
    ec(kjt(device, f=[5]))  # step 3
    assert ec.evict(older_than_step=2, min_count=2) == {"t": 3}
    assert live_ids(ec, "t", range(6), device) == set()
    assert ec.evict(older_than_step=100) == {"t": 0}


def test_evicted_rows_are_reused_and_reinitialized(backend, device) -> None:
    ec = one_table(device)
    ec(kjt(device, f=[10, 11, 12]))
    phys = ec.physical_tables["t"]
    phys.values.fill_(7.0)  # as if trained
    old = ec.find_rows("t", torch.tensor([10, 11, 12], device=device)).tolist()
    assert ec.evict(older_than_step=1) == {"t": 3}
    announced: list[list[int]] = []
    phys.values.on_rows_reset(lambda r: announced.append(sorted(r.tolist())))
    out = ec(kjt(device, f=[20, 11]))["f"]
    rows = ec.find_rows("t", torch.tensor([20, 11], device=device))
    # Whoever keeps state per row (a sparse optimizer) hears of the reused rows.
    assert announced == [sorted(rows.tolist())]
    assert sorted(rows.tolist()) == sorted(old[:2])  # lowest freed rows first
    cfg = phys.tables[0]
    expect = init_rows(
        torch.tensor([20, 11], device=device), DIM, cfg.initializer, seed=cfg.init_seed
    )
    torch.testing.assert_close(phys.values.gather_rows(rows), expect)
    torch.testing.assert_close(out[0], expect.sum(0))
    assert phys.meta.counts[rows].tolist() == [1, 1]  # counts restart
    assert phys.meta.last_seen[rows].tolist() == [1, 1]


def test_maybe_evict_ttl_and_min_count(device) -> None:
    ec = one_table(device, ttl_steps=2)
    for batch in ([1], [2], [3]):  # steps 0, 1, 2
        ec(kjt(device, f=batch))
    assert ec.maybe_evict() == {"t": 1}  # step 3: ids not seen at steps 1 or 2
    assert live_ids(ec, "t", range(5), device) == {2, 3}

    ec = one_table(device, min_count=2)
    ec(kjt(device, f=[1, 1, 2]))
    assert ec.maybe_evict() == {"t": 1}
    assert live_ids(ec, "t", range(3), device) == {1}


def test_evict_every_spares_the_current_batch(device) -> None:
    ec = EmbeddingCollection(
        [TableConfig("t", dim=DIM, eviction=Eviction(min_count=2))],
        [FeatureConfig("f", "t")],
        device=device,
        evict_every=1,
    )
    ec(kjt(device, f=[1, 2, 2]))
    assert live_ids(ec, "t", range(5), device) == {1, 2}  # id 1 seen once, but in the batch
    ec(kjt(device, f=[3]))
    assert live_ids(ec, "t", range(5), device) == {2, 3}
    with pytest.raises(ValueError, match="evict_every"):
        EmbeddingCollection([TableConfig("t", dim=DIM)], [FeatureConfig("f", "t")], evict_every=0)


# ------------------------------------------------------------------------------ LRU / LFU


def test_lru_cap_exact_survivors(backend, device) -> None:
    ec = one_table(device, policy="lru", max_rows=3)
    for batch in ([1], [2], [3], [1], [4]):  # last seen: 1@3 2@1 3@2 4@4
        ec(kjt(device, f=batch))
    assert live_ids(ec, "t", range(8), device) == {1, 3, 4}
    ec(kjt(device, f=[5, 6]))  # 5 ids: drop the two oldest outside the batch (3, then 1)
    assert live_ids(ec, "t", range(8), device) == {4, 5, 6}
    assert ec.num_ids("t") == 3


def test_lfu_cap_exact_survivors_and_ties(device) -> None:
    ec = one_table(device, policy="lfu", max_rows=2)
    ec(kjt(device, f=[1, 1, 1, 2, 2, 3]))  # all three in the batch: kept over the cap
    assert live_ids(ec, "t", range(6), device) == {1, 2, 3}
    ec(kjt(device, f=[4]))  # counts 1:3 2:2 3:1 (4 protected) -> drop 3, then 2
    assert live_ids(ec, "t", range(6), device) == {1, 4}

    ec = one_table(device, policy="lfu", max_rows=2)
    ec(kjt(device, f=[10, 11, 12]))  # rows 0, 1, 2, all count 1
    ec(kjt(device, f=[13]))  # ties go to the lower rows: 10 and 11
    assert live_ids(ec, "t", range(10, 14), device) == {12, 13}


def test_cap_keeps_sparse_grads_of_the_batch(device) -> None:
    ec = one_table(device, policy="lru", max_rows=1)
    ec(kjt(device, f=[1]))
    out = ec(kjt(device, f=[2, 3]))["f"]
    out.sum().backward()
    rows = ec.find_rows("t", torch.tensor([2, 3], device=device))
    assert bool((rows >= 0).all())
    grad = ec.sparse_grads()["t"]
    assert sorted(grad.rows.tolist()) == sorted(rows.tolist())
    assert present(ec, "t", [1], device) == [False]


# ----------------------------------------------------------------------- merged tables


def test_merged_tables_are_evicted_separately(backend, device) -> None:
    ec = EmbeddingCollection(
        [
            TableConfig("a", dim=DIM, eviction=Eviction("lru", max_rows=2)),
            TableConfig("b", dim=DIM),
        ],
        [FeatureConfig("fa", "a"), FeatureConfig("fb", "b")],
        device=device,
    )
    assert list(ec.physical_tables) == ["a+b"]
    ec(kjt(device, fa=[1, 2], fb=[1, 2]))
    ec(kjt(device, fa=[3], fb=[3]))  # a: 3 ids -> drop its LRU (1, tie with 2 by row)
    assert live_ids(ec, "a", range(5), device) == {2, 3}
    assert live_ids(ec, "b", range(5), device) == {1, 2, 3}
    assert (ec.num_ids("a"), ec.num_ids("b")) == (2, 3)
    assert ec.evict("b", older_than_step=1) == {"b": 2}
    assert live_ids(ec, "a", range(5), device) == {2, 3}
    assert live_ids(ec, "b", range(5), device) == {3}
    assert ec.evict(min_count=5) == {"a": 2, "b": 1}
    assert (ec.num_ids("a"), ec.num_ids("b")) == (0, 0)
    ec.recount_ids()
    assert (ec.num_ids("a"), ec.num_ids("b")) == (0, 0)


def test_evict_errors(device) -> None:
    ec = one_table(device)
    with pytest.raises(ValueError, match="older_than_step and/or min_count"):
        ec.evict()
    with pytest.raises(KeyError, match="nope"):
        ec.evict("nope", min_count=2)
    with pytest.raises(TypeError, match="older_than_step must be an int"):
        ec.evict(older_than_step=1.5)  # type: ignore[arg-type]
    assert ec.evict(min_count=2) == {"t": 0}  # empty table
    ec(kjt(device, f=[]))  # an empty batch still advances the step
    assert ec.step == 1


def test_fixed_table_step_metadata(device) -> None:
    ec = fixed_collection(device)
    ec(bags_kjt({"c_sum": [[1, 1]], "c_mean": [[1]], "c_seq": [[2]], "c_tile": [[]],
                 "items": [[4]]}, device))  # fmt: skip
    meta = ec.physical_tables["cat"].meta
    assert meta.counts[:3].tolist() == [0, 3, 1]
    assert ec.evict(older_than_step=5) == {"item": 1}  # the fixed table is skipped
    with pytest.raises(ValueError, match="'cat' is a fixed-size table"):
        ec.evict("cat", older_than_step=5)


def test_eviction_passes_over_physical_tables(device) -> None:
    tables = [
        TableConfig("a", dim=DIM, eviction=Eviction(ttl_steps=2)),
        TableConfig("b", dim=DIM, eviction=Eviction("lfu", max_rows=1)),
        TableConfig("c", dim=DIM),
    ]
    phys = build_physical_tables(tables, device)[0]["a+b+c"]
    keys = torch.tensor([1, 2, 1, 2, 1], device=device)
    tags = torch.tensor([0, 0, 1, 1, 2], device=device)
    rows, is_new = phys.hash_table.find_or_insert(keys, tags)
    phys.recount_ids()
    phys.meta.ensure_rows(phys.hash_table.num_rows_allocated)
    # Every id seen at step 0; a's 2, b's 1 (twice) and c's 1 again at step 5.
    phys.meta.touch(rows, 0, torch.ones_like(rows), is_new)
    later = rows[torch.tensor([1, 2, 4], device=device)]
    phys.meta.touch(later, 5, torch.tensor([1, 2, 1], device=device), is_new[:3] & False)
    assert apply_eviction_rules([phys], step=6, protect_step=None) == {"a": 1}
    assert phys.table_entries(0)[0].tolist() == [2]
    enforce_caps([phys], stamped=7)  # b holds 2 ids over its cap of 1: the less seen goes
    assert phys.table_entries(1)[0].tolist() == [1] and phys.num_ids(1) == 1
    assert evict_stale(phys, 2, older_than_step=None, min_count=3, protect_step=5) == 0
    assert evict_stale(phys, 2, older_than_step=None, min_count=3) == 1
    assert phys.num_ids(2) == 0
