"""EmbeddingCollection: fixed-size tables and pooling="tile" against dense oracles."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import KeyedJaggedTensor, SparseGrad
from recstack.embedding_engine.collection import EmbeddingCollection, FixedIndex
from recstack.embedding_engine.config import (
    Admission,
    ConfigError,
    Eviction,
    FeatureConfig,
    Initializer,
    TableConfig,
)
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.state import (
    collection_state_metadata,
    export_collection_chunks,
    import_collection_chunk,
)

DIM = 4
VOCAB = 10


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_kjt(bags: dict[str, list[list[int]]], device: torch.device) -> KeyedJaggedTensor:
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64, device=device),
        lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
        stride=len(next(iter(bags.values()))),
    )


def random_bags(gen: torch.Generator, batch: int, max_len: int, vocab: int) -> list[list[int]]:
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
    if batch > 1:
        lengths[0], lengths[1] = 0, 1
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def densify(grad: SparseGrad, num_rows: int, dim: int) -> torch.Tensor:
    assert grad.is_coalesced
    dense = torch.zeros((num_rows, dim), dtype=torch.float32, device=grad.rows.device)
    dense[grad.rows] = grad.values.to(torch.float32)
    return dense


def fixed_collection(device: torch.device, **kw) -> EmbeddingCollection:
    tables = [
        TableConfig("cat", dim=DIM, fixed_size=VOCAB, initializer=Initializer.normal(std=0.5)),
        TableConfig("item", dim=DIM),  # same (dim, dtype): would merge if it were dynamic
    ]
    features = [
        FeatureConfig("c_sum", "cat", pooling="sum"),
        FeatureConfig("c_mean", "cat", pooling="mean"),
        FeatureConfig("c_seq", "cat", pooling="none"),
        FeatureConfig("c_tile", "cat", pooling="tile", max_len=3),
        FeatureConfig("items", "item", pooling="sum"),
    ]
    return EmbeddingCollection(tables, features, device=device, **kw)


def dense_oracle(
    ec: EmbeddingCollection, kjt: KeyedJaggedTensor
) -> tuple[torch.nn.Embedding, dict[str, torch.Tensor]]:
    """nn.Embedding with the fixed table's rows, outputs computed densely."""
    phys = ec.physical_tables["cat"]
    emb = torch.nn.Embedding(VOCAB, DIM, device=ec.device)
    with torch.no_grad():
        emb.weight.copy_(phys.values.to_dense())
    out: dict[str, torch.Tensor] = {}
    batch = kjt.stride()
    for name in ("c_sum", "c_mean", "c_seq", "c_tile"):
        jt = kjt[name]
        rows = emb(jt.values)
        if name == "c_seq":
            out[name] = rows
            continue
        bags = []
        for b in range(batch):
            r = rows[int(jt.offsets[b]) : int(jt.offsets[b + 1])]
            if name == "c_tile":
                r = r[-3:]  # truncate="left", the default: the last (most recent) 3 ids
                r = torch.cat([r, r.new_zeros(max(0, 3 - r.shape[0]), DIM)])
                bags.append(r.reshape(-1))
            elif r.shape[0] == 0:
                bags.append(r.new_zeros(DIM))
            else:
                bags.append(r.sum(0) / (r.shape[0] if name == "c_mean" else 1))
        out[name] = torch.stack(bags) if bags else rows.new_zeros(0, DIM)
    return emb, out


# ----------------------------------------------------------------------------- fixed tables


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


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_fixed_table_matches_dense_embedding(backend, device, batch) -> None:
    gen = torch.Generator().manual_seed(seed("fixed", backend, batch))
    ec = fixed_collection(device)
    bags = {n: random_bags(gen, batch, 4, VOCAB) for n in ("c_sum", "c_mean", "c_seq", "c_tile")}
    bags["items"] = random_bags(gen, batch, 3, 1000)
    kjt = make_kjt(bags, device)
    out = ec(kjt)
    emb, ref = dense_oracle(ec, kjt)
    torch.testing.assert_close(out["c_sum"], ref["c_sum"])
    torch.testing.assert_close(out["c_mean"], ref["c_mean"])
    torch.testing.assert_close(out["c_seq"].values, ref["c_seq"])
    torch.testing.assert_close(out["c_tile"], ref["c_tile"])
    assert out["c_tile"].shape == (batch, 3 * DIM)
    weights = {n: torch.randn(ref[n].shape, generator=gen).to(device) for n in ref}
    got = {n: out[n].values if n == "c_seq" else out[n] for n in ref}
    sum((got[n] * weights[n]).sum() for n in ref).backward()
    sum((ref[n] * weights[n]).sum() for n in ref).backward()
    grads = ec.sparse_grads()
    assert set(grads) <= {"cat", "item"}
    dense_grad = densify(grads["cat"], VOCAB, DIM) if "cat" in grads else torch.zeros(VOCAB, DIM)
    torch.testing.assert_close(dense_grad, emb.weight.grad)
    # no row beyond the fixed table ever appears in its gradient
    if "cat" in grads:
        assert bool((grads["cat"].rows < VOCAB).all())


def test_fixed_table_eval_reads_same_rows_and_updates_apply(device) -> None:
    ec = fixed_collection(device)
    kjt = make_kjt(
        {"c_sum": [[1, 2], [9]], "c_mean": [[], [0]], "c_seq": [[5], [5, 5]],
         "c_tile": [[1, 2, 3, 4], []], "items": [[7], []]},
        device,
    )  # fmt: skip
    train = ec(kjt)
    ec.eval()
    with torch.no_grad():
        evald = ec(kjt)
    for name in ("c_sum", "c_mean", "c_tile"):
        torch.testing.assert_close(evald[name], train[name].detach())
    # an optimizer step on the rows is what eval reads next
    values = ec.physical_tables["cat"].values
    values.scatter_rows(torch.tensor([1], device=device), torch.ones(1, DIM, device=device))
    with torch.no_grad():
        again = ec(kjt)
    torch.testing.assert_close(again["c_sum"][0], 1.0 + values.to_dense()[2])


def test_fixed_table_step_metadata(device) -> None:
    ec = fixed_collection(device)
    ec(make_kjt({"c_sum": [[1, 1]], "c_mean": [[1]], "c_seq": [[2]], "c_tile": [[]],
                 "items": [[4]]}, device))  # fmt: skip
    meta = ec.physical_tables["cat"].meta
    assert meta.counts[:3].tolist() == [0, 3, 1]
    assert ec.evict(older_than_step=5) == {"item": 1}  # the fixed table is skipped
    with pytest.raises(ValueError, match="'cat' is a fixed-size table"):
        ec.evict("cat", older_than_step=5)


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**40])
def test_fixed_table_out_of_range_ids_raise(device, bad) -> None:
    ec = fixed_collection(device)
    kjt = make_kjt(
        {"c_sum": [[0, bad]], "c_mean": [[]], "c_seq": [[]], "c_tile": [[]], "items": [[]]},
        device,
    )
    match = rf"feature 'c_sum' \(table 'cat'\): id {bad} is out of range.*\[0, {VOCAB}\)"
    with pytest.raises(ValueError, match=match):
        ec(kjt)
    ec.eval()
    with pytest.raises(ValueError, match=match):
        ec(kjt)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ec.find_rows("cat", torch.tensor([bad], device=device))


def test_fixed_table_configs_reject_dynamic_features() -> None:
    with pytest.raises(ConfigError, match="does not evict"):
        TableConfig("t", dim=DIM, fixed_size=4, eviction=Eviction("lru", max_rows=2))
    with pytest.raises(ConfigError, match="no admission"):
        TableConfig("t", dim=DIM, fixed_size=4, admission=Admission(min_count=2))
    with pytest.raises(ConfigError, match="capacity"):
        TableConfig("t", dim=DIM, fixed_size=4, capacity=8)


def test_fixed_table_size_one_and_empty_batch(backend, device) -> None:
    ec = EmbeddingCollection(
        [TableConfig("one", dim=DIM, fixed_size=1)],
        [FeatureConfig("f", "one", pooling="mean"), FeatureConfig("s", "one", pooling="none")],
        device=device,
    )
    out = ec(make_kjt({"f": [[0, 0], []], "s": [[0], []]}, device))
    row = ec.physical_tables["one"].values.to_dense()[0]
    torch.testing.assert_close(out["f"], torch.stack([row, torch.zeros_like(row)]))
    (out["f"].sum() + out["s"].values.sum()).backward()
    grad = ec.sparse_grads()["one"]
    assert grad.rows.tolist() == [0]
    torch.testing.assert_close(grad.values, torch.full((1, DIM), 2.0, device=device))
    empty = ec(make_kjt({"f": [[], []], "s": [[], []]}, device))
    assert empty["f"].shape == (2, DIM) and not empty["f"].any()


def test_fixed_table_state_round_trip(device) -> None:
    src = fixed_collection(device)
    with torch.no_grad():
        src.physical_tables["cat"].values.scatter_rows(
            torch.arange(VOCAB, device=device), torch.randn(VOCAB, DIM).to(device)
        )
    src(make_kjt({"c_sum": [[3]], "c_mean": [[]], "c_seq": [[]], "c_tile": [[]],
                  "items": [[11, 12]]}, device))  # fmt: skip
    meta = collection_state_metadata(src)
    assert meta["tables"]["cat"]["num_keys"] == VOCAB
    chunks = list(export_collection_chunks(src, 4, table="cat"))
    assert [c[1].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dst = fixed_collection(device)
    for t, k, s in export_collection_chunks(src, 4):
        import_collection_chunk(dst, t, k, s, metadata=meta)
    for name in ("cat", "item"):
        torch.testing.assert_close(
            dst.physical_tables[name].values.to_dense(),
            src.physical_tables[name].values.to_dense(),
        )
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        import_collection_chunk(
            dst,
            "cat",
            torch.tensor([VOCAB], device=device),
            {"values": torch.ones(1, DIM, device=device)},
        )


# ------------------------------------------------------------------------------------- tile


@pytest.mark.parametrize("max_len", [1, 3])
def test_tile_equals_reshaped_padded(backend, device, max_len) -> None:
    gen = torch.Generator().manual_seed(seed("tile", backend, max_len))
    tables = [TableConfig("t", dim=DIM)]
    features = [
        FeatureConfig("pad", "t", pooling="none", max_len=max_len),
        FeatureConfig("tile", "t", pooling="tile", max_len=max_len),
    ]
    ec = EmbeddingCollection(tables, features, device=device)
    for batch in (0, 1, 4):
        bags = random_bags(gen, batch, 5, 30)
        out = ec(make_kjt({"pad": bags, "tile": bags}, device))
        assert out["tile"].shape == (batch, max_len * DIM) == (batch, features[1].output_dim(DIM))
        torch.testing.assert_close(out["tile"], out["pad"].reshape(batch, max_len * DIM))
        if not any(bags):
            continue  # no id was looked up; padded "none" has no graph either
        w = torch.randn(batch, max_len, DIM, generator=gen).to(device)
        out["tile"].backward(w.reshape(batch, max_len * DIM))
        g_tile = ec.sparse_grads().get("t")
        out = ec(make_kjt({"pad": bags, "tile": bags}, device))
        out["pad"].backward(w)
        g_pad = ec.sparse_grads().get("t")
        assert g_tile is not None and g_pad is not None
        assert torch.equal(g_tile.rows, g_pad.rows)
        torch.testing.assert_close(g_tile.values, g_pad.values)
