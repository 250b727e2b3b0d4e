"""EmbeddingCollection: outputs and SparseGrads against a dense nn.Embedding-style oracle,
for dynamic (merged or not) and fixed-size tables."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import VOCAB, bags_kjt, densify, fixed_collection, random_bags, seed

from recstack.core import JaggedTensor, KeyedJaggedTensor, kernels
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, Initializer, TableConfig
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.sequence import PaddedSequence

DIM = 8

# ---------------------------------------------------------------------------------- inputs


def tables_and_features() -> tuple[list[TableConfig], list[FeatureConfig]]:
    """Three dim-8 tables (merged into one physical table) and one dim-4 table."""
    tables = [
        TableConfig("item", dim=DIM, initializer=Initializer.normal(std=0.5)),
        TableConfig("user", dim=DIM, initializer=Initializer.uniform(-1.0, 1.0)),
        TableConfig("shop", dim=DIM, initializer=Initializer.truncated_normal(std=0.3)),
        TableConfig("cat", dim=4, initializer=Initializer.xavier_uniform()),
    ]
    features = [
        FeatureConfig("clicks", "item", pooling="sum"),
        FeatureConfig("carts", "item", pooling="mean"),
        FeatureConfig("uid", "user", pooling="sum"),
        FeatureConfig("shops", "shop", pooling="sum", weighted=True),
        FeatureConfig("shops_mean", "shop", pooling="mean", weighted=True),
        FeatureConfig("hist", "item", pooling="none"),
        FeatureConfig("hist_pad", "shop", pooling="none", max_len=3),
        FeatureConfig("cats", "cat", pooling="mean"),
    ]
    return tables, features


def random_batch(gen: torch.Generator, batch: int, device: torch.device) -> KeyedJaggedTensor:
    _, features = tables_and_features()
    bags = {f.name: random_bags(gen, batch, 5, 12) for f in features}
    weights = {
        name: [torch.rand(len(b), generator=gen).add(0.5).tolist() for b in bb]
        for name, bb in bags.items()
    }
    return bags_kjt(bags, device, weights)


# ---------------------------------------------------------------------------------- oracle


def oracle(
    ec: EmbeddingCollection, kjt: KeyedJaggedTensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs from dense fp32 ``nn.Embedding``-style tables (one per physical table).

    Returns ``(outputs, dense tables)``; the tables require grad, so a loss on the outputs
    gives the dense gradient to compare the SparseGrads with.
    """
    dense = {
        name: p.values.to_dense().to(torch.float32).clone().requires_grad_(True)
        for name, p in ec.physical_tables.items()
    }
    configs = {f.name: f for f in ec._features}
    out: dict[str, torch.Tensor] = {}
    for name in kjt:
        if name not in configs:
            continue
        f = configs[name]
        jt = kjt[name]
        rows = ec.find_rows(f.table, jt.values)
        assert bool((rows >= 0).all()), "training forward inserts every id"
        table = dense[ec.physical_table_of(f.table)]
        per_id = torch.nn.functional.embedding(rows, table)
        if f.weighted:
            per_id = per_id * jt.weights[:, None]
        offs = jt.offsets.tolist()
        if f.pooling == "none":
            seq = JaggedTensor(per_id, jt.offsets)
            padded = None if f.max_len is None else seq.to_padded(f.max_len, truncate=f.truncate)
            out[name] = seq.values if padded is None else padded
            continue
        bags = []
        for b in range(len(offs) - 1):
            s = per_id[offs[b] : offs[b + 1]].sum(0)
            if f.pooling == "mean" and offs[b + 1] > offs[b]:
                s = s / (offs[b + 1] - offs[b])
            bags.append(s)
        out[name] = torch.stack(bags) if bags else per_id.new_zeros((0, table.shape[1]))
    return out, dense


def as_tensor(x: torch.Tensor | JaggedTensor) -> torch.Tensor:
    return x.values if isinstance(x, JaggedTensor) else x


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_sparse_grads_match_dense_oracle(backend, device, batch) -> None:
    gen = torch.Generator().manual_seed(seed("fwd", batch, backend))
    tables, features = tables_and_features()
    ec = EmbeddingCollection(tables, features, device=device, page_rows=4)
    assert ec.table_groups == {"item+user+shop": ("item", "user", "shop"), "cat": ("cat",)}
    kjt = random_batch(gen, batch, device)
    out = ec(kjt)
    assert list(out) == [f.name for f in features]
    expected, dense = oracle(ec, kjt)
    for name, want in expected.items():
        got = as_tensor(out[name])
        assert got.requires_grad, name
        torch.testing.assert_close(got, want.detach(), msg=name)
    assert out["clicks"].shape == (batch, DIM)
    assert out["cats"].shape == (batch, 4)
    assert out["hist_pad"].shape == (batch, 3, DIM)
    assert isinstance(out["hist"], JaggedTensor)

    # One loss over every output, with random output gradients.
    grads = {n: torch.randn(as_tensor(o).shape, generator=gen).to(device) for n, o in out.items()}
    (sum((as_tensor(out[n]) * g).sum() for n, g in grads.items())).backward()
    (sum((expected[n] * g).sum() for n, g in grads.items())).backward()
    sparse = ec.sparse_grads()
    assert set(sparse) == set(ec.physical_tables)
    for name, p in ec.physical_tables.items():
        want = dense[name].grad
        got = densify(sparse[name], p.values.num_rows, p.dim)
        torch.testing.assert_close(got, want, msg=name)
        # Exactly the rows this batch touched (every row here was inserted by it).
        assert sparse[name].rows.tolist() == list(range(p.values.num_rows))


@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted", "none", "padded"])
def test_each_pooling_grad_alone(backend, device, pooling) -> None:
    gen = torch.Generator().manual_seed(seed("one", pooling, backend))
    feature = {
        "sum": FeatureConfig("f", "t", pooling="sum"),
        "mean": FeatureConfig("f", "t", pooling="mean"),
        "weighted": FeatureConfig("f", "t", pooling="mean", weighted=True),
        "none": FeatureConfig("f", "t", pooling="none"),
        "padded": FeatureConfig("f", "t", pooling="none", max_len=2),
    }[pooling]
    ec = EmbeddingCollection([TableConfig("t", dim=DIM)], [feature], device=device)
    bags = {"f": random_bags(gen, 6, 4, 5, lo=-2)}  # negative ids: fine in a lone table
    weights = {"f": [[0.5 + i for i in range(len(b))] for b in bags["f"]]}
    kjt = bags_kjt(bags, device, weights)
    out = as_tensor(ec(kjt)["f"])
    expected, dense = oracle(ec, kjt)
    torch.testing.assert_close(out, expected["f"].detach())
    g = torch.randn(out.shape, generator=gen).to(device)
    (out * g).sum().backward()
    (expected["f"] * g).sum().backward()
    p = ec.physical_tables["t"]
    got = densify(ec.sparse_grads()["t"], p.values.num_rows, DIM)
    torch.testing.assert_close(got, dense["t"].grad)


def test_merged_equals_unmerged_and_initial_rows(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("merge", backend))
    tables, features = tables_and_features()
    merged = EmbeddingCollection(tables, features, device=device, page_rows=4)
    alone = EmbeddingCollection(tables, features, device=device, merge_tables=False)
    assert set(alone.physical_tables) == {"item", "user", "shop", "cat"}
    kjt = random_batch(gen, 4, device)
    out_m, out_a = merged(kjt), alone(kjt)
    for name in out_m:
        torch.testing.assert_close(as_tensor(out_m[name]), as_tensor(out_a[name]), msg=name)
    # Initial rows are the logical table's init_rows of the logical id, merged or not.
    for t in tables:
        ids = torch.arange(12, device=device)
        want = init_rows(ids, t.dim, t.initializer, seed=t.init_seed, dtype=t.dtype)
        for ec in (merged, alone):
            rows = ec.find_rows(t.name, ids)
            seen = rows >= 0
            p = ec.physical_tables[ec.physical_table_of(t.name)]
            assert torch.equal(p.values.gather_rows(rows[seen]), want[seen]), t.name


def test_training_inserts_once_and_reuses_rows(backend, device) -> None:
    ec = EmbeddingCollection(
        [TableConfig("t", dim=DIM)], [FeatureConfig("f", "t", pooling="none")], device=device
    )
    first = ec(bags_kjt({"f": [[5, 7, 5], [9]]}, device))["f"].values.detach()
    p = ec.physical_tables["t"]
    assert len(p.hash_table) == 3 and p.values.num_rows == 3
    second = ec(bags_kjt({"f": [[9, 11], [7]]}, device))["f"].values.detach()
    assert len(p.hash_table) == 4 and p.values.num_rows == 4
    torch.testing.assert_close(second[0], first[3])  # id 9
    torch.testing.assert_close(second[2], first[1])  # id 7


def test_backward_accumulates_and_clears(backend, device) -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=DIM)], [FeatureConfig("f", "t")], device=device)
    kjt = bags_kjt({"f": [[1, 2], [2]]}, device)
    out = ec(kjt)["f"]
    out.sum().backward(retain_graph=True)
    once = ec.sparse_grads()["t"].values.clone()
    out.sum().backward()
    torch.testing.assert_close(ec.sparse_grads()["t"].values, 2 * once)
    torch.testing.assert_close(once, torch.tensor([[1.0] * DIM, [2.0] * DIM], device=device))
    ec.zero_grad_sparse()
    assert ec.sparse_grads() == {}
    ec(kjt)["f"].sum().backward()
    assert "t" in ec.sparse_grads()
    ec(kjt)  # a new forward clears the stored gradients
    assert ec.sparse_grads() == {}


def test_dense_tower_on_top(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("tower", backend))
    tables, features = tables_and_features()
    ec = EmbeddingCollection(tables, features, device=device)
    kjt = random_batch(gen, 3, device)
    tower = torch.nn.Linear(DIM, 1).to(device)
    out = ec(kjt)
    # Only some outputs reach the loss; the others get no (or zero) gradient.
    tower(out["clicks"] + out["uid"]).sum().add(out["cats"].sum()).backward()
    assert tower.weight.grad is not None
    expected, dense = oracle(ec, kjt)
    tower(expected["clicks"] + expected["uid"]).sum().add(expected["cats"].sum()).backward()
    for name, p in ec.physical_tables.items():
        got = densify(ec.sparse_grads()[name], p.values.num_rows, p.dim)
        torch.testing.assert_close(got, dense[name].grad, msg=name)


@pytest.mark.parametrize("eval_default", ["initializer", "zeros"])
def test_eval_is_read_only(backend, device, eval_default) -> None:
    init = Initializer.normal(std=0.2)
    tables = [
        TableConfig("a", dim=DIM, initializer=init, eval_default=eval_default),
        TableConfig("b", dim=DIM, initializer=init),  # merged with a, default "initializer"
    ]
    features = [
        FeatureConfig("fa", "a", pooling="mean"),
        FeatureConfig("fs", "a", pooling="none"),
        FeatureConfig("fb", "b", pooling="none"),
    ]
    ec = EmbeddingCollection(tables, features, device=device)
    ec(bags_kjt({"fa": [[1]], "fs": [[2]], "fb": [[3]]}, device))
    p = ec.physical_tables["a+b"]
    before = (len(p.hash_table), p.values.num_rows, p.values.to_dense().clone())
    ec.eval()
    out = ec(bags_kjt({"fa": [[1, 40]], "fs": [[2, 41]], "fb": [[3, 42]]}, device))
    assert (len(p.hash_table), p.values.num_rows) == before[:2]
    assert torch.equal(p.values.to_dense(), before[2])
    assert bool((ec.find_rows("a", torch.tensor([40, 41], device=device)) == -1).all())
    for x in out.values():
        assert not as_tensor(x).requires_grad

    def row(table: TableConfig, i: int) -> torch.Tensor:
        rows = ec.find_rows(table.name, torch.tensor([i], device=device))
        if int(rows[0]) >= 0:
            return p.values.gather_rows(rows)[0]
        if table.eval_default == "zeros":
            return torch.zeros(DIM, device=device)
        key = torch.tensor([i], device=device)
        return init_rows(key, DIM, table.initializer, seed=table.init_seed)[0]

    a, b = tables
    torch.testing.assert_close(out["fa"][0], (row(a, 1) + row(a, 40)) / 2)
    torch.testing.assert_close(out["fs"].values, torch.stack([row(a, 2), row(a, 41)]))
    torch.testing.assert_close(out["fb"].values, torch.stack([row(b, 3), row(b, 42)]))
    if eval_default == "zeros":
        assert bool((out["fs"].values[1] == 0).all())


# Ids at the edges of int64: the hash table's slot markers (-2**63, -2**63 + 1), the keys
# their remapped key words equal (-2**63 + 2, + 3), and the old merged-table limits.
EDGE_IDS = [-(2**63), -(2**63) + 1, -(2**63) + 2, -(2**63) + 3, -1, 0, 2**61, 2**62, 2**63 - 1]


def test_merged_tables_take_every_int64_id(backend, device) -> None:
    # The default (merged) collection takes any int64 id in every table, and one id of
    # three merged tables is three rows: no error, no collision, no folding.
    gen = torch.Generator().manual_seed(seed("edges", backend))
    tables = [
        TableConfig(n, dim=DIM, initializer=Initializer.normal(std=0.5)) for n in ("a", "b", "c")
    ]
    features = [
        FeatureConfig("fa", "a"),
        FeatureConfig("fb", "b", pooling="none"),
        FeatureConfig("fc", "c", pooling="mean"),
        FeatureConfig("fa_seq", "a", pooling="none", max_len=4),
    ]
    merged = EmbeddingCollection(tables, features, device=device)
    alone = EmbeddingCollection(tables, features, device=device, merge_tables=False)
    p = merged.physical_tables["a+b+c"]
    assert p.tag_bits == 2 and p.id_bits == 64 and p.id_range() == "any int64"
    hashed = torch.randint(-(2**63), 2**63 - 1, (6,), generator=gen).tolist()
    ids = EDGE_IDS + hashed
    bags = {name: [ids[: len(ids) // 2], ids[len(ids) // 2 :]] for name in ("fa", "fb", "fc")}
    bags["fa_seq"] = [ids[:3], ids[3:5]]
    kjt = bags_kjt(bags, device)
    out_m, out_a = merged(kjt), alone(kjt)
    assert len(p.hash_table) == 3 * len(ids)  # every (table, id) pair has its own row
    for t in tables:
        assert merged.num_ids(t.name) == len(ids)
        rows = merged.find_rows(t.name, torch.tensor(ids, device=device))
        assert bool((rows >= 0).all())
        # Initial rows are the logical table's init_rows of the logical id.
        want = init_rows(torch.tensor(ids, device=device), DIM, t.initializer, seed=t.init_seed)
        assert torch.equal(p.values.gather_rows(rows), want), t.name
    id_tensor = torch.tensor(ids, device=device)
    all_rows = torch.cat([merged.find_rows(t.name, id_tensor) for t in tables])
    assert torch.unique(all_rows).numel() == 3 * len(ids)
    for name in out_m:
        torch.testing.assert_close(as_tensor(out_m[name]), as_tensor(out_a[name]), msg=name)
    expected, dense = oracle(merged, kjt)
    for name, want in expected.items():
        torch.testing.assert_close(as_tensor(out_m[name]), want.detach(), msg=name)
    # Gradients reach each table's own rows.
    grads = {n: torch.randn(as_tensor(o).shape, generator=gen).to(device) for n, o in out_m.items()}
    sum((as_tensor(out_m[n]) * g).sum() for n, g in grads.items()).backward()
    sum((expected[n] * g).sum() for n, g in grads.items()).backward()
    got = densify(merged.sparse_grads()["a+b+c"], p.values.num_rows, DIM)
    torch.testing.assert_close(got, dense["a+b+c"].grad)
    # Eval reads the same rows, and unseen edge ids their initializer rows, in each table.
    merged.eval()
    alone.eval()
    unseen = [x + 1 for x in hashed[:2]] + [-(2**63) + 4]
    kjt = bags_kjt({name: [ids[:4], unseen] for name in bags}, device)
    out_m, out_a = merged(kjt), alone(kjt)
    for name in out_m:
        torch.testing.assert_close(as_tensor(out_m[name]), as_tensor(out_a[name]), msg=name)
    assert len(p.hash_table) == 3 * len(ids)
    # Eviction by table: erasing table b's ids leaves a's and c's rows.
    merged.train()
    assert merged.evict("b", min_count=5) == {"b": len(ids)}
    assert merged.num_ids("b") == 0 and merged.num_ids("a") == len(ids)
    assert bool((merged.find_rows("b", torch.tensor(ids, device=device)) == -1).all())
    assert bool((merged.find_rows("c", torch.tensor(ids, device=device)) >= 0).all())
    # A fixed-size table still checks its range.
    fixed = EmbeddingCollection(
        [TableConfig("f", dim=DIM, fixed_size=4)], [FeatureConfig("ff", "f")], device=device
    )
    with pytest.raises(ValueError, match=r"feature 'ff' \(table 'f'\): id -1 is out of range"):
        fixed(bags_kjt({"ff": [[1, -1]]}, device))


@pytest.mark.parametrize("truncate", ["left", "right"])
def test_padded_sequences_truncate_and_lengths(backend, device, truncate) -> None:
    # A bag longer than max_len keeps its last ids ("left", the default) or its first;
    # with_lengths returns each row's id count beside the padded rows; every id is still
    # inserted, and cut ids get zero gradient.
    tables = [TableConfig("t", dim=DIM), TableConfig("u", dim=DIM)]  # merged
    kw = {"pooling": "none", "max_len": 3, "truncate": truncate}
    features = [
        FeatureConfig("hist", "t", **kw, with_lengths=True),
        FeatureConfig("plain", "t", **kw),
        FeatureConfig("tile", "u", pooling="tile", max_len=3, truncate=truncate),
    ]
    ec = EmbeddingCollection(tables, features, device=device)
    bags = [[1, 2, 3, 4, 5], [], [6], [7, 8, 9], [10, 11, 12, 13]]
    kjt = bags_kjt({"hist": bags, "plain": bags, "tile": bags}, device)
    out = ec(kjt)
    seq = out["hist"]
    assert isinstance(seq, PaddedSequence) and seq.max_len == 3
    values, lengths = seq
    assert lengths.tolist() == [3, 0, 1, 3, 3] and lengths.dtype == torch.int64
    assert lengths.device == values.device and values.device.type == device.type
    assert seq.mask.tolist() == [[n > j for j in range(3)] for n in (3, 0, 1, 3, 3)]
    assert values.shape == (5, 3, DIM) and values.requires_grad
    cut = (lambda b: b[-3:]) if truncate == "left" else (lambda b: b[:3])
    p = ec.physical_tables["t+u"]
    for name, x in (("t", values), ("u", out["tile"].view(5, 3, DIM))):
        for b, bag in enumerate(bags):
            kept = cut(bag)
            if kept:
                rows = ec.find_rows(name, torch.tensor(kept, device=device))
                assert torch.equal(x[b, : len(kept)], p.values.gather_rows(rows)), (name, b)
            assert bool((x[b, len(kept) :] == 0).all())
    assert torch.equal(out["plain"], values)
    assert ec.num_ids("t") == ec.num_ids("u") == 13  # cut ids are inserted too
    # Gradient: the rows of kept positions get their output gradient, cut ids zeros.
    g = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (values * g).sum().backward()
    grad = ec.sparse_grads()["t+u"]
    dense = densify(grad, p.values.num_rows, DIM)
    for b, bag in enumerate(bags):
        kept = cut(bag)
        for i in bag:
            row = int(ec.find_rows("t", torch.tensor([i], device=device))[0])
            want = g[b, kept.index(i)] if i in kept else torch.zeros(DIM, device=device)
            torch.testing.assert_close(dense[row], want)
    # Eval gives the same layout (unseen ids read their initializer rows).
    ec.eval()
    out = ec(bags_kjt({"hist": [[1, 99]], "plain": [[]], "tile": [[]]}, device))
    assert out["hist"].lengths.tolist() == [2] and not out["hist"].values.requires_grad


def test_empty_batch_and_empty_bags(backend, device) -> None:
    tables, features = tables_and_features()
    ec = EmbeddingCollection(tables, features, device=device)
    empty = bags_kjt({f.name: [] for f in features}, device, {f.name: [] for f in features})
    out = ec(empty)
    assert out["clicks"].shape == (0, DIM) and out["cats"].shape == (0, 4)
    assert out["hist"].values.shape == (0, DIM) and len(out["hist"]) == 0
    assert out["hist_pad"].shape == (0, 3, DIM)
    sum(as_tensor(x).sum() for x in out.values()).backward()
    assert all(g.rows.numel() == 0 for g in ec.sparse_grads().values())
    # Every bag empty: zeros out, nothing inserted, empty gradients.
    bags = {f.name: [[], []] for f in features}
    out = ec(bags_kjt(bags, device, bags))
    assert bool((out["carts"] == 0).all()) and bool((out["hist_pad"] == 0).all())
    assert out["hist"].values.shape == (0, DIM) and len(out["hist"]) == 2
    sum(as_tensor(x).sum() for x in out.values()).backward()
    assert all(len(p.hash_table) == 0 for p in ec.physical_tables.values())
    assert all(g.rows.numel() == 0 for g in ec.sparse_grads().values())


def test_bf16_table(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("bf16", backend))
    t = TableConfig("t", dim=DIM, dtype=torch.bfloat16)
    ec = EmbeddingCollection([t], [FeatureConfig("f", "t", pooling="mean")], device=device)
    kjt = bags_kjt({"f": random_bags(gen, 4, 4, 6)}, device)
    out = ec(kjt)["f"]
    assert out.dtype == torch.bfloat16
    expected, dense = oracle(ec, kjt)
    torch.testing.assert_close(out.float(), expected["f"].detach(), atol=1e-2, rtol=1e-2)
    out.float().sum().backward()
    expected["f"].sum().backward()
    grad = ec.sparse_grads()["t"]
    assert grad.values.dtype == torch.float32
    torch.testing.assert_close(
        densify(grad, ec.physical_tables["t"].values.num_rows, DIM), dense["t"].grad
    )


def test_errors(device) -> None:
    t = TableConfig("t", dim=DIM)
    ec = EmbeddingCollection([t], [FeatureConfig("f", "t", weighted=True)], device=device)
    with pytest.raises(ValueError, match="'f' is weighted but the KeyedJaggedTensor has no"):
        ec(bags_kjt({"f": [[1]]}, device))
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['f'\]"):
        ec(bags_kjt({"g": [[1]]}, device))
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        ec({"f": torch.tensor([1])})
    with pytest.raises(KeyError, match="unknown table"):
        ec.find_rows("nope", torch.tensor([1]))


def test_backward_keeps_the_forward_backend(device) -> None:
    # A CUDA backward runs in autograd's device thread, where use_backend() of the calling
    # thread does not hold: the lookup carries the forward's choice over.
    import threading

    tables, features = tables_and_features()
    ec = EmbeddingCollection(tables, features, device=device)
    with kernels.use_backend("torch"):
        out = ec(random_batch(torch.Generator().manual_seed(5), 3, device))
    loss = sum(as_tensor(x).sum() for x in out.values())
    with kernels.count_launches() as launches:
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
    assert launches["lookup_grad_sums_reference"] == 2
    assert launches["lookup_grad_sums"] == 0


def test_launches_per_physical_table(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("launch", backend))
    tables, features = tables_and_features()
    ec = EmbeddingCollection(tables, features, device=device)
    kjt = random_batch(gen, 3, device)
    with kernels.count_launches() as launches:
        out = ec(kjt)
    suffix = "" if backend == "triton" else "_reference"
    # One pooled lookup per physical table (both have pooled features), whatever the
    # number of features; one gather for the sequence features of "item+user+shop".
    assert launches[f"pooled_lookup{suffix}"] == 2
    with kernels.count_launches() as launches:
        sum(as_tensor(x).sum() for x in out.values()).backward()
    assert launches[f"lookup_grad_sums{suffix}"] == 2


# ---------------------------------------------------------------------------- fixed tables

FIXED_DIM = 4


def fixed_oracle(
    ec: EmbeddingCollection, kjt: KeyedJaggedTensor
) -> tuple[torch.nn.Embedding, dict[str, torch.Tensor]]:
    """nn.Embedding with the fixed table's rows, outputs computed densely."""
    phys = ec.physical_tables["cat"]
    emb = torch.nn.Embedding(VOCAB, FIXED_DIM, device=ec.device)
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
                r = torch.cat([r, r.new_zeros(max(0, 3 - r.shape[0]), FIXED_DIM)])
                bags.append(r.reshape(-1))
            elif r.shape[0] == 0:
                bags.append(r.new_zeros(FIXED_DIM))
            else:
                bags.append(r.sum(0) / (r.shape[0] if name == "c_mean" else 1))
        out[name] = torch.stack(bags) if bags else rows.new_zeros(0, FIXED_DIM)
    return emb, out


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_fixed_table_matches_dense_embedding(backend, device, batch) -> None:
    gen = torch.Generator().manual_seed(seed("fixed", backend, batch))
    ec = fixed_collection(device)
    bags = {n: random_bags(gen, batch, 4, VOCAB) for n in ("c_sum", "c_mean", "c_seq", "c_tile")}
    bags["items"] = random_bags(gen, batch, 3, 1000)
    kjt = bags_kjt(bags, device)
    out = ec(kjt)
    emb, ref = fixed_oracle(ec, kjt)
    torch.testing.assert_close(out["c_sum"], ref["c_sum"])
    torch.testing.assert_close(out["c_mean"], ref["c_mean"])
    torch.testing.assert_close(out["c_seq"].values, ref["c_seq"])
    torch.testing.assert_close(out["c_tile"], ref["c_tile"])
    assert out["c_tile"].shape == (batch, 3 * FIXED_DIM)
    weights = {n: torch.randn(ref[n].shape, generator=gen).to(device) for n in ref}
    got = {n: out[n].values if n == "c_seq" else out[n] for n in ref}
    sum((got[n] * weights[n]).sum() for n in ref).backward()
    sum((ref[n] * weights[n]).sum() for n in ref).backward()
    grads = ec.sparse_grads()
    assert set(grads) <= {"cat", "item"}
    if "cat" in grads:
        dense_grad = densify(grads["cat"], VOCAB, FIXED_DIM)
    else:
        dense_grad = torch.zeros(VOCAB, FIXED_DIM, device=device)
    torch.testing.assert_close(dense_grad, emb.weight.grad)
    # no row beyond the fixed table ever appears in its gradient
    if "cat" in grads:
        assert bool((grads["cat"].rows < VOCAB).all())


def test_fixed_table_eval_reads_same_rows_and_updates_apply(device) -> None:
    ec = fixed_collection(device)
    kjt = bags_kjt(
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
    values.scatter_rows(torch.tensor([1], device=device), torch.ones(1, FIXED_DIM, device=device))
    with torch.no_grad():
        again = ec(kjt)
    torch.testing.assert_close(again["c_sum"][0], 1.0 + values.to_dense()[2])


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**40])
def test_fixed_table_out_of_range_ids_raise(device, bad) -> None:
    ec = fixed_collection(device)
    kjt = bags_kjt(
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


def test_fixed_table_size_one_and_empty_batch(backend, device) -> None:
    ec = EmbeddingCollection(
        [TableConfig("one", dim=FIXED_DIM, fixed_size=1)],
        [FeatureConfig("f", "one", pooling="mean"), FeatureConfig("s", "one", pooling="none")],
        device=device,
    )
    out = ec(bags_kjt({"f": [[0, 0], []], "s": [[0], []]}, device))
    row = ec.physical_tables["one"].values.to_dense()[0]
    torch.testing.assert_close(out["f"], torch.stack([row, torch.zeros_like(row)]))
    (out["f"].sum() + out["s"].values.sum()).backward()
    grad = ec.sparse_grads()["one"]
    assert grad.rows.tolist() == [0]
    torch.testing.assert_close(grad.values, torch.full((1, FIXED_DIM), 2.0, device=device))
    empty = ec(bags_kjt({"f": [[], []], "s": [[], []]}, device))
    assert empty["f"].shape == (2, FIXED_DIM) and not empty["f"].any()
