"""recstack.embedding_engine.table_rows: a jagged sequence feature left in its table
(``gather=False``) gives the gathered feature's rows and, once its consumer hands the rows'
gradient back, the same sparse gradients and optimizer updates."""

from __future__ import annotations

import pytest
import torch

from recstack.core import KeyedJaggedTensor, PagedTensor
from recstack.embedding_engine import (
    Admission,
    ConfigError,
    EmbeddingCollection,
    FeatureConfig,
    TableConfig,
    TableRows,
)

DIM = 8


def collection(device: torch.device, deferred: bool, admission: Admission | None = None):
    item = TableConfig("item", dim=DIM, **({} if admission is None else {"admission": admission}))
    tables = [item, TableConfig("shop", dim=DIM)]
    features = [
        FeatureConfig("cand", "item"),
        FeatureConfig("hist", "item", pooling="none", gather=not deferred),
        FeatureConfig("other", "item", pooling="none"),
        FeatureConfig("shops", "shop", pooling="none", max_len=3),
    ]
    return EmbeddingCollection(tables, features, device=device)


def batch(device: torch.device, seed: int) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    keys = ["cand", "hist", "other", "shops"]
    lengths = [torch.randint(0, 6, (5,), generator=gen) for _ in keys]
    lengths[0] = torch.ones(5, dtype=torch.int64)
    lengths[1][2] = 0  # an empty history
    total = int(sum(x.sum() for x in lengths))
    values = torch.randint(0, 30, (total,), generator=gen)
    return KeyedJaggedTensor(keys, values, torch.cat(lengths)).to(device)


def loss_of(out: dict, weight: torch.Tensor) -> torch.Tensor:
    hist = out["hist"]
    rows = hist.gather().values if isinstance(hist, TableRows) else hist.values
    return (
        (out["cand"] ** 2).sum()
        + (rows * weight[: rows.shape[0]]).sum()
        + (out["other"].values ** 3).sum()
        + out["shops"].sum()
    )


def test_the_deferred_feature_is_table_rows_with_the_gathered_rows(device) -> None:
    deferred, gathered = collection(device, True), collection(device, False)
    kjt = batch(device, 0)
    a, b = deferred(kjt), gathered(kjt)
    hist = a["hist"]
    assert isinstance(hist, TableRows) and isinstance(hist.table, PagedTensor)
    assert hist.depends_on is not None and hist.grad_sink is not None
    assert torch.equal(hist.offsets, b["hist"].offsets)
    assert hist.num_ids == b["hist"].values.shape[0] and hist.dim == DIM
    torch.testing.assert_close(hist.gather().values, b["hist"].values)
    torch.testing.assert_close(a["other"].values, b["other"].values)
    deferred.zero_grad_sparse()
    gathered.zero_grad_sparse()


@pytest.mark.parametrize("admission", [None, Admission(min_count=2)], ids=["all", "admission"])
def test_gradients_and_optimizer_steps_match_the_gathered_feature(device, admission) -> None:
    deferred, gathered = collection(device, True, admission), collection(device, False, admission)
    weight = torch.randn(200, DIM, device=device)
    for step in range(3):
        kjt = batch(device, step)
        grads = []
        for ec in (deferred, gathered):
            loss_of(ec(kjt), weight).backward()
            grads.append(ec.sparse_grads())
        assert grads[0].keys() == grads[1].keys()
        for name, want in grads[1].items():
            got = grads[0][name]
            assert torch.equal(got.rows, want.rows), name
            torch.testing.assert_close(got.values, want.values, rtol=1e-6, atol=1e-6)
        for ec in (deferred, gathered):
            ec.zero_grad_sparse()


def test_an_unused_deferred_feature_gets_zero_gradients(device) -> None:
    deferred, gathered = collection(device, True), collection(device, False)
    kjt = batch(device, 5)
    for ec in (deferred, gathered):
        out = ec(kjt)
        (out["cand"].sum() + out["other"].values.sum()).backward()
    got, want = deferred.sparse_grads(), gathered.sparse_grads()
    for name in want:
        assert torch.equal(got[name].rows, want[name].rows)
        torch.testing.assert_close(got[name].values, want[name].values)


def test_eval_gives_rows_without_a_sink(device) -> None:
    ec = collection(device, True)
    kjt = batch(device, 1)
    ec(kjt)
    ec.zero_grad_sparse()
    ec.eval()
    with torch.no_grad():
        hist = ec(kjt)["hist"]
    assert hist.depends_on is None and hist.grad_sink is None
    gathered = collection(device, False)
    gathered(kjt)
    gathered.zero_grad_sparse()
    gathered.eval()
    with torch.no_grad():
        torch.testing.assert_close(hist.gather().values, gathered(kjt)["hist"].values)


def test_a_second_gradient_for_one_feature_is_refused(device) -> None:
    ec = collection(device, True)
    out = ec(batch(device, 2))
    hist = out["hist"]
    a, b = hist.gather().values, hist.gather().values
    with pytest.raises(RuntimeError, match="got two gradients in one backward"):
        (a.sum() + b.sum() + out["cand"].sum()).backward()


def test_gather_false_needs_a_jagged_sequence() -> None:
    with pytest.raises(ConfigError, match="gather=False needs a jagged sequence"):
        FeatureConfig("hist", "item", pooling="none", max_len=4, gather=False)
    with pytest.raises(ConfigError, match="gather=False needs a jagged sequence"):
        FeatureConfig("hist", "item", gather=False)
    with pytest.raises(ConfigError, match="gather must be a bool"):
        FeatureConfig("hist", "item", pooling="none", gather=0)  # type: ignore[arg-type]
