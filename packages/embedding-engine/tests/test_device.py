"""EmbeddingCollection follows module.to(device): every table's state moves, dtype casts
never reach the tables, and what cannot move is refused."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import kjt
from torch import nn

from recstack.core import PagedTensor
from recstack.embedding_engine import (
    Admission,
    DynamicEmbedding,
    EmbeddingCollection,
    Eviction,
    FeatureConfig,
    TableConfig,
)
from recstack.embedding_engine.device import move_tables_


def collection(device: torch.device | str = "cpu") -> EmbeddingCollection:
    """Every kind of state: merged dynamic tables, admission, eviction, a fixed table."""
    return EmbeddingCollection(
        [
            TableConfig("item", dim=4, eviction=Eviction("lru", max_rows=64)),
            TableConfig("user", dim=4, admission=Admission(min_count=2, counter_slots=64)),
            TableConfig("tag", dim=2, fixed_size=8),
        ],
        [
            FeatureConfig("items", "item", pooling="mean"),
            FeatureConfig("hist", "item", pooling="none", max_len=3),
            FeatureConfig("uid", "user"),
            FeatureConfig("tags", "tag"),
        ],
        device=device,
        page_rows=4,
    )


def train(ec: EmbeddingCollection, steps: int = 3) -> None:
    """A few training steps with an SGD step by hand, and an optimizer-like companion."""
    values = ec.physical_tables["item+user"].values
    if "acc" not in values.companions:
        values.add_companion("acc", PagedTensor(1, page_rows=4, device=ec.device, name="acc"))
    for s in range(steps):
        out = ec(kjt(ec.device, items=[1, 2, s], hist=[3, 4, 5, 6], uid=[7, 7], tags=[s, 5]))
        loss = sum(v.sum() for v in out.values())
        loss.backward()
        for name, g in ec.sparse_grads().items():
            table = ec.physical_tables[name].values
            table.scatter_rows(g.rows, -0.1 * g.values, reduce="add")
            if name == "item+user":
                acc = table.companions["acc"].store
                acc.scatter_rows(g.rows, g.values.square().sum(1, keepdim=True), reduce="add")


def lookups(ec: EmbeddingCollection) -> dict[str, torch.Tensor]:
    was = ec.training
    ec.eval()
    out = ec(kjt(ec.device, items=[1, 2, 99], hist=[3, 4, 5, 6], uid=[7, 8], tags=[0, 7]))
    ec.train(was)
    return {k: v.detach().cpu() for k, v in out.items()}


def state_devices(ec: EmbeddingCollection) -> set[torch.device]:
    devices = set()
    for p in ec.physical_tables.values():
        stores = [p.values, *(c.store for c in p.values.companions.values())]
        devices |= {t.device for s in stores for t in (*s.pages, s.page_table)}
        devices |= {p.hash_table.device, p.meta.last_seen.device, p.meta.counts.device}
        devices |= {p.meta.dirty.device, *(s.counters.device for s in p.sketches.values())}
    devices |= {reads.modes.device for reads in ec._planner.reads.values()}
    devices |= {g.rows.device for g in ec.sparse_grads().values()}
    return devices


def test_cpu_to_cpu_keeps_everything() -> None:
    ec = collection()
    train(ec)
    before, state = lookups(ec), snapshot(ec)
    pages = ec.physical_tables["item+user"].values.pages
    assert ec.to("cpu") is ec and ec.cpu() is ec
    assert ec.physical_tables["item+user"].values.pages == pages  # nothing copied
    assert_same(snapshot(ec), state)
    after = lookups(ec)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dtype_casts_leave_the_tables_alone() -> None:
    model = nn.Sequential(collection())
    model.append(nn.Linear(4, 1))
    ec = model[0]
    train(ec)
    before = lookups(ec)
    model.half()
    model.to(torch.bfloat16)
    model.to("cpu", torch.float16)
    assert model[1].weight.dtype == torch.float16  # the dense part is cast
    assert {p.values.dtype for p in ec.physical_tables.values()} == {torch.float32}
    acc = ec.physical_tables["item+user"].values.companions["acc"].store
    assert acc.dtype == torch.float32
    assert ec.physical_tables["item+user"].meta.counts.dtype == torch.int64
    after = lookups(ec)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["items"].dtype == torch.float32


def test_unsupported_devices_are_refused() -> None:
    ec = collection()
    train(ec)
    before = lookups(ec)
    with pytest.raises(ValueError, match="cannot move the tables.*to meta"):
        ec.to("meta")
    assert ec.device == torch.device("cpu") and state_devices(ec) == {torch.device("cpu")}
    after = lookups(ec)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_failed_move_moves_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails halfway (out of memory) leaves every part where it was."""
    ec = collection()
    phys = ec.physical_tables["item+user"]
    calls: list[tuple[str, str]] = []

    def recorder(name: str, fail: bool = False):
        def move_to_(device: torch.device):
            if fail:
                raise torch.OutOfMemoryError("no room")
            calls.append((name, str(device)))

        return move_to_

    monkeypatch.setattr(phys.values, "move_to_", recorder("values"))
    monkeypatch.setattr(phys.hash_table, "move_to_", recorder("hash_table"))
    monkeypatch.setattr(phys.meta, "move_to_", recorder("meta"))
    monkeypatch.setattr(phys.sketches[1], "move_to_", recorder("sketch", fail=True))
    # Pretend the tables are on a GPU, so moving them "to the CPU" runs the copies.
    with pytest.raises(torch.OutOfMemoryError):
        move_tables_(ec.physical_tables, torch.device("cuda", 0), torch.device("cpu"))
    assert calls == [
        ("values", "cpu"),
        ("hash_table", "cpu"),
        ("meta", "cpu"),
        ("meta", "cuda:0"),
        ("hash_table", "cuda:0"),
        ("values", "cuda:0"),
    ]
    assert ec.device == torch.device("cpu")  # the collection moves its own state last


def test_dynamic_embedding_reports_the_collection_device() -> None:
    emb = DynamicEmbedding(TableConfig("t", dim=2))
    assert emb.to("cpu").device == emb.collection.device == torch.device("cpu")


def snapshot(ec: EmbeddingCollection) -> dict[str, torch.Tensor]:
    """Every table's state as CPU tensors (hash entries, rows, companions, metadata, counters)."""
    out = {}
    for name, p in ec.physical_tables.items():
        keys, rows = next(p.hash_table.items(chunk_size=1 << 20), (torch.zeros(0),) * 2)
        out[f"{name}.keys"], out[f"{name}.rows"] = keys.cpu(), rows.cpu()
        out[f"{name}.values"] = p.values.to_dense().cpu()
        for c, comp in p.values.companions.items():
            out[f"{name}.{c}"] = comp.store.to_dense().cpu()
        for col in ("last_seen", "counts", "dirty"):
            out[f"{name}.{col}"] = getattr(p.meta, col).cpu()
        for t, sketch in p.sketches.items():
            out[f"{name}.sketch{t}"] = sketch.counters.cpu()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_to_cuda_round_trip() -> None:
    ec = collection()
    train(ec)
    before = lookups(ec)
    out = ec(kjt(ec.device, items=[1], hist=[], uid=[7], tags=[1]))
    sum(v.sum() for v in out.values()).backward()  # a pending gradient moves too
    grads = {k: g.values.clone() for k, g in ec.sparse_grads().items()}
    state = snapshot(ec)
    model = nn.Sequential(ec).to("cuda")
    assert model[0] is ec and ec.device.type == "cuda"
    assert {d.type for d in state_devices(ec)} == {"cuda"}
    assert_same(snapshot(ec), state)  # moved bit for bit
    assert all(torch.equal(g.values.cpu(), grads[k]) for k, g in ec.sparse_grads().items())
    on_gpu = lookups(ec)
    for k in before:  # the GPU kernels may sum in another order than the CPU path
        torch.testing.assert_close(on_gpu[k], before[k])
    train(ec)  # trains on the GPU: inserts, eviction, admission
    trained, state = lookups(ec), snapshot(ec)
    ec.cpu()
    assert state_devices(ec) == {torch.device("cpu")}
    assert_same(snapshot(ec), state)
    back = lookups(ec)
    for k in trained:
        torch.testing.assert_close(back[k], trained[k])
    emb = DynamicEmbedding(TableConfig("t", dim=2)).cuda()
    assert emb.device.type == "cuda" and emb(torch.tensor([5], device="cuda")).is_cuda
