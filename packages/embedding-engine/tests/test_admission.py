"""Admission: the count-min sketch and EmbeddingCollection's min_count filter."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import kjt

from recstack.embedding_engine.admission import CountMinSketch, admission_mask
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import Admission, FeatureConfig, TableConfig
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.physical import build_physical_tables

DIM = 4


def ids(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def initial(ec: EmbeddingCollection, table: str, keys: list[int], device) -> torch.Tensor:
    cfg = next(t for p in ec.physical_tables.values() for t in p.tables if t.name == table)
    return init_rows(ids(keys, device), DIM, cfg.initializer, seed=cfg.init_seed)


# --------------------------------------------------------------------------------- sketch


@pytest.mark.parametrize("slots", [1, 4, 16, 1 << 12])
def test_sketch_never_undercounts(device, slots) -> None:
    gen = torch.Generator().manual_seed(slots)
    cap = 50
    sketch = CountMinSketch(slots, cap, device=device)
    truth: dict[int, int] = {}
    for n in (0, 1, 37, 200):
        batch = torch.randint(-(2**40), 2**40, (max(n // 4, 1),), generator=gen)
        batch = batch[torch.randint(0, batch.numel(), (n,), generator=gen)]  # duplicates
        keys, counts = torch.unique(batch, return_counts=True)
        est = sketch.add(keys.to(device), counts.to(device)).cpu()
        for k, c in zip(keys.tolist(), counts.tolist(), strict=True):
            truth[k] = truth.get(k, 0) + c
        want = torch.tensor([min(truth[k], cap) for k in keys.tolist()], dtype=torch.int64)
        assert bool((est >= want).all())
        assert bool((est <= cap).all())
    every = torch.tensor(list(truth), dtype=torch.int64)
    est = sketch.estimate(every.to(device)).cpu()
    want = torch.tensor([min(truth[k], cap) for k in truth], dtype=torch.int64)
    assert bool((est >= want).all())
    if slots <= 4:  # one counter per row: every key reads the (capped) total
        assert bool((est > want).any())  # overcounting, as a sketch may
    if slots == 1 << 12:
        assert torch.equal(est, want)  # ~50 keys in 4 x 1024 counters: no full collision


def test_sketch_repeated_keys_and_saturation(device) -> None:
    sketch = CountMinSketch(1 << 10, 3, device=device)
    assert sketch.depth == 4 and sketch.width == 256
    assert sketch.add(ids([5, 5, 9], device), ids([1, 1, 2], device)).tolist() == [2, 2, 2]
    assert sketch.add(ids([5, 9], device), ids([10, 1], device)).tolist() == [3, 3]
    assert sketch.counters.dtype == torch.int32 and int(sketch.counters.max()) == 3
    assert sketch.add(ids([], device), ids([], device)).numel() == 0
    assert sketch.estimate(ids([], device)).numel() == 0
    with pytest.raises(ValueError, match="counter_slots"):
        CountMinSketch(0, 2)


@pytest.mark.gpu
def test_sketch_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 1000, (300,), generator=gen)
    counts = torch.randint(1, 4, (300,), generator=gen)
    cpu, gpu = CountMinSketch(256, 9), CountMinSketch(256, 9, device="cuda")
    a = cpu.add(keys, counts)
    b = gpu.add(keys.cuda(), counts.cuda()).cpu()
    assert torch.equal(a, b)
    assert torch.equal(cpu.counters, gpu.counters.cpu())


# ---------------------------------------------------------------------------- collection


def admission_ec(device, min_count: int = 3, **table: object) -> EmbeddingCollection:
    return EmbeddingCollection(
        [TableConfig("t", dim=DIM, admission=Admission(min_count=min_count), **table)],  # type: ignore[arg-type]
        [FeatureConfig("f", "t", pooling="sum")],
        device=device,
    )


def test_admitted_on_the_min_count_th_sighting(backend, device) -> None:
    ec = admission_ec(device, min_count=3)
    for step in range(2):
        out = ec(kjt(device, f=[5]))["f"]
        assert ec.find_rows("t", ids([5], device)).tolist() == [-1], step
        torch.testing.assert_close(out[0], initial(ec, "t", [5], device)[0])
        assert len(ec.physical_tables["t"].hash_table) == 0
    ec(kjt(device, f=[5]))  # third sighting
    assert ec.find_rows("t", ids([5], device)).tolist() == [0]
    # Occurrences inside one batch count: 7 x3 is admitted at once, 8 x2 then 8 x1.
    ec(kjt(device, f=[7, 7, 7, 8, 8]))
    assert (ec.find_rows("t", ids([7, 8], device)) >= 0).tolist() == [True, False]
    ec(kjt(device, f=[8]))
    assert (ec.find_rows("t", ids([8], device)) >= 0).tolist() == [True]
    # Eval never counts.
    ec.eval()
    for _ in range(4):
        ec(kjt(device, f=[11]))
    ec.train()
    ec(kjt(device, f=[11]))
    assert ec.find_rows("t", ids([11], device)).tolist() == [-1]


def test_not_admitted_read_default_and_get_no_grad(backend, device) -> None:
    ec = admission_ec(device, min_count=2)
    ec(kjt(device, f=[3]))  # 3 is now at count 1
    out = ec(kjt(device, f=[7, 7, 9, 3]))["f"]  # 7 admitted (x2), 3 admitted, 9 not
    rows = ec.find_rows("t", ids([7, 3, 9], device)).tolist()
    assert rows[2] == -1 and rows[0] >= 0 and rows[1] >= 0
    phys = ec.physical_tables["t"]
    expect = (
        2 * phys.values.gather_rows(ids([rows[0]], device))[0]
        + phys.values.gather_rows(ids([rows[1]], device))[0]
        + initial(ec, "t", [9], device)[0]
    )
    torch.testing.assert_close(out[0], expect)
    (out * 3.0).sum().backward()
    grad = ec.sparse_grads()["t"]
    assert grad.rows.tolist() == sorted([rows[0], rows[1]])
    by_row = dict(zip(grad.rows.tolist(), grad.values.cpu(), strict=True))
    torch.testing.assert_close(by_row[rows[0]], torch.full((DIM,), 6.0))
    torch.testing.assert_close(by_row[rows[1]], torch.full((DIM,), 3.0))
    assert phys.meta.counts[rows[0]].item() == 2


def test_nothing_admitted_gives_no_grad_rows(device) -> None:
    ec = admission_ec(device, min_count=5, eval_default="zeros")
    out = ec(kjt(device, f=[1, 2]))["f"]
    torch.testing.assert_close(out, torch.zeros(1, DIM, device=device))
    out.sum().backward()
    assert ec.sparse_grads()["t"].rows.numel() == 0
    ec(kjt(device, f=[]))  # empty batch
    assert len(ec.physical_tables["t"].hash_table) == 0


def test_merged_tables_count_separately(backend, device) -> None:
    ec = EmbeddingCollection(
        [TableConfig("a", dim=DIM, admission=Admission(min_count=2)), TableConfig("b", dim=DIM)],
        [FeatureConfig("fa", "a"), FeatureConfig("fb", "b")],
        device=device,
    )
    assert list(ec.physical_tables) == ["a+b"]
    ec(kjt(device, fa=[1], fb=[1, 4, 4]))
    assert ec.find_rows("a", ids([1], device)).tolist() == [-1]
    assert bool((ec.find_rows("b", ids([1, 4], device)) >= 0).all())
    ec(kjt(device, fa=[4], fb=[]))  # b's sightings of 4 do not count for a
    assert ec.find_rows("a", ids([4], device)).tolist() == [-1]
    ec(kjt(device, fa=[1, 4], fb=[]))
    assert bool((ec.find_rows("a", ids([1, 4], device)) >= 0).all())
    assert (ec.num_ids("a"), ec.num_ids("b")) == (2, 2)


def test_admission_mask_counts_only_ids_without_a_row(device) -> None:
    tables = [
        TableConfig("a", dim=DIM, admission=Admission(min_count=2, counter_slots=64)),
        TableConfig("b", dim=DIM),  # merged, no admission: every id admitted
    ]
    phys = build_physical_tables(tables, device)[0]["a+b"]
    phys.hash_table.find_or_insert(ids([9], device), 0)  # id 9 of table a holds a row
    unique = ids([1, 2, 9, 1], device)
    tags = torch.tensor([0, 0, 0, 1], dtype=torch.int32, device=device)
    hits = ids([1, 2, 5, 1], device)
    assert admission_mask(phys, unique, tags, hits).tolist() == [False, True, True, True]
    # Id 9 was not counted (it has a row); id 1 of table a reaches 2 now.
    assert phys.sketches[0].estimate(ids([9, 1, 2], device)).tolist() == [0, 1, 2]
    assert admission_mask(phys, unique, tags, hits).tolist() == [True, True, True, True]
