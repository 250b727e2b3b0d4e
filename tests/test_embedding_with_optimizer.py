"""The embedding engine and the sparse optimizers composed (neither imports the other),
unfused (backward, then step) and fused (the backward applies the step through core)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import KeyedJaggedTensor, RowUpdater, SparseGrad
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.sparse_optim import RowWiseAdagrad, SparseAdam, SparseFTRL, SparseSGD


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


def _train(fused: bool, make_opt, steps: int = 4):
    ec = EmbeddingCollection([TableConfig("t", dim=5)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = make_opt(values)
    if fused:
        ec.fuse_optimizer(opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, 9, (12,), generator=gen).tolist()
        (ec(batch(ids))["f"] ** 2).sum().backward()
        if not fused:
            opt.step(grads={values: ec.sparse_grads()["t"]})
    return values.to_dense(), {k: v for k, v in opt.state[values].items()}


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda v: SparseAdam([v], lr=0.05),
        lambda v: SparseAdam([v], lr=0.05, step_count="per_row", tf_compat=True),
        lambda v: RowWiseAdagrad([v], lr=0.1),
        lambda v: SparseFTRL([v], lr=0.1, l1=0.01),
        lambda v: SparseSGD([v], lr=0.1, momentum=0.9),
    ],
    ids=["adam", "adam-per-row-tf", "rowwise-adagrad", "ftrl", "sgd-momentum"],
)
def test_fused_backward_equals_backward_then_step(make_opt) -> None:
    w_fused, s_fused = _train(True, make_opt)
    w_plain, s_plain = _train(False, make_opt)
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-5, atol=1e-6)
    assert s_fused["step"] == s_plain["step"] == 4
    for k, v in s_plain.items():
        if k != "step":
            torch.testing.assert_close(s_fused[k].to_dense(), v.to_dense(), rtol=1e-5, atol=1e-6)


def test_fused_backward_nonfinite_policy() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, on_nonfinite="skip")
    ec.fuse_optimizer(opt)
    (ec(batch([1, 2]))["f"].sum() * float("nan")).backward()
    assert opt.skipped_steps == 1 and opt.state[values]["step"] == 0
    opt.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="'t' holds NaN or Inf; nothing was updated"):
        (ec(batch([1, 2]))["f"].sum() * float("inf")).backward()
    # Gradients accumulated for step() cannot be mixed into a fused update.
    opt.accumulate({values: SparseGrad(torch.tensor([0]), torch.ones(1, 4))})
    with pytest.raises(RuntimeError, match="accumulate\\(\\) and the fused mode do not mix"):
        ec(batch([1]))["f"].sum().backward()


def test_sparse_optimizers_speak_the_row_updater_protocol() -> None:
    assert isinstance(SparseAdam([torch.zeros(3, 2)], lr=0.1), RowUpdater)
