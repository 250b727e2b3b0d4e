"""The embedding engine and the sparse optimizers composed (neither imports the other)."""

from __future__ import annotations

import torch

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.sparse_optim import SparseAdam


def batch(ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        ["f"], torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64)
    )


def test_training_moves_rows_toward_targets() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05)
    ids = [3, 10**12, 7]
    target = torch.ones(3, 4)
    losses = []
    for _ in range(30):
        loss = ((ec(batch(ids))["f"] - target) ** 2).sum()
        loss.backward()
        opt.step(grads={values: ec.sparse_grads()["t"]})
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]


def test_rows_reused_after_eviction_get_fresh_optimizer_state() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, step_count="per_row")
    for _ in range(3):
        ec(batch([1, 2]))["f"].sum().backward()
        opt.step(grads={values: ec.sparse_grads()["t"]})
    row = int(ec.find_rows("t", torch.tensor([1]))[0])
    state = opt.state[values]
    assert float(state["row_step"].to_dense()[row, 0]) == 3.0
    assert ec.evict(min_count=10) == {"t": 2}
    ec(batch([99]))  # a new id takes a freed row
    new_row = int(ec.find_rows("t", torch.tensor([99]))[0])
    assert new_row in (0, 1)
    assert float(state["row_step"].to_dense()[new_row, 0]) == 0.0
    assert torch.all(state["exp_avg"].to_dense()[new_row] == 0)
    assert torch.all(state["exp_avg_sq"].to_dense()[new_row] == 0)
