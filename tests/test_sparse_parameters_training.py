"""Training with ``SparseAdam(ec.sparse_parameters())`` like a torch optimizer: step() and
zero_grad() find the collection's gradients (neither package imports the other)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recstack.core import KeyedJaggedTensor, SparseGrad
from recstack.embedding_engine import (
    EmbeddingCollection,
    Eviction,
    FeatureConfig,
    TableConfig,
    sparse_parameters,
)
from recstack.sparse_optim import SparseAdam, SparseSGD


def batch(ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        ["f"], torch.tensor(ids, dtype=torch.int64), lengths=torch.ones(len(ids), dtype=torch.int64)
    )


def make(**table: object) -> EmbeddingCollection:
    return EmbeddingCollection([TableConfig("t", dim=4, **table)], [FeatureConfig("f", "t")])


BATCHES = [[3, 10**12, 7], [7, 7, 1], [], [5]]


def test_torch_style_loop_equals_explicit_grads() -> None:
    ours, ref = make(), make()
    opt = SparseAdam(ours.sparse_parameters(), lr=0.05)
    values = ref.physical_tables["t"].values
    ref_opt = SparseAdam([values], lr=0.05)
    for ids in BATCHES * 2:
        (ours(batch(ids))["f"] ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
        (ref(batch(ids))["f"] ** 2).sum().backward()
        ref_opt.step(grads={values: ref.sparse_grads()["t"]})
    assert torch.equal(ours.physical_tables["t"].values.to_dense(), values.to_dense())
    assert ours.sparse_grads() == {}  # zero_grad cleared the collection's gradients
    state = opt.state_dict()["state"][0]
    assert state["step"] == ref_opt.state_dict()["state"][0]["step"] == 6  # [] is no step
    assert torch.equal(state["exp_avg"].to_dense(), ref_opt.state[values]["exp_avg"].to_dense())


def test_accumulation_over_forwards_is_refused_unless_accumulated() -> None:
    ec = make()
    opt = SparseSGD(ec.sparse_parameters(), lr=1.0)
    ec(batch([1, 2]))["f"].sum().backward()
    with pytest.raises(RuntimeError, match="accumulate"):
        ec(batch([2, 3]))
    opt.zero_grad()

    ref = make()
    values = ref.physical_tables["t"].values
    ref_opt = SparseSGD([values], lr=1.0)
    parts = []
    for ids in ([1, 2], [2, 3]):
        out = ec(batch(ids))["f"]
        if not parts:
            start = ec.physical_tables["t"].values.to_dense().clone()
        out.sum().backward()
        opt.accumulate()  # takes the micro-batch's gradient over
        ref(batch(ids))["f"].sum().backward()
        parts.append(ref.sparse_grads()["t"])
    opt.step()
    ref_opt.step(
        grads=SparseGrad(torch.cat([p.rows for p in parts]), torch.cat([p.values for p in parts]))
    )
    assert torch.equal(ec.physical_tables["t"].values.to_dense(), values.to_dense())
    row = int(ec.find_rows("t", torch.tensor([2]))[0])
    moved = ec.physical_tables["t"].values.to_dense()[row] - start[row]
    torch.testing.assert_close(moved, torch.full((4,), -2.0))  # id 2 in both micro-batches


def test_accumulated_gradient_of_an_evicted_row_skips_the_new_id() -> None:
    ec = make(eviction=Eviction("lru", max_rows=2))
    opt = SparseSGD(ec.sparse_parameters(), lr=1.0)
    for ids in ([1, 2], [3, 4]):  # the second forward's cap evicts ids 1 and 2
        ec(batch(ids))["f"].sum().backward()
        opt.accumulate()
    ec(batch([5]))["f"].sum().backward()  # id 5 takes id 1's row 0
    row = int(ec.find_rows("t", torch.tensor([5]))[0])
    assert row == 0
    start = ec.physical_tables["t"].values.to_dense()[row].clone()
    opt.step()
    assert torch.equal(ec.physical_tables["t"].values.to_dense()[row], start - 1.0)


def test_fused_backward_with_sparse_parameters() -> None:
    ec = make()
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    ec.fuse_optimizer(opt)
    for ids in BATCHES[:2]:
        ec(batch(ids))["f"].sum().backward()  # the step happens here
        opt.step()  # nothing stored for a fused table: no second step
        opt.zero_grad()
    values = ec.physical_tables["t"].values
    assert opt.state[values]["step"] == 2 and ec.sparse_grads() == {}


def test_dense_and_sparse_optimizers_side_by_side() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = make()
            self.head = nn.Linear(4, 1)

        def forward(self, ids: list[int]) -> torch.Tensor:
            return self.head(self.ec(batch(ids))["f"]).square().mean()

    torch.manual_seed(0)  # the head's initial weights: the loss's fall below depends on them
    model = Model()
    dense = torch.optim.Adam(model.parameters(), lr=0.05)
    assert len(list(model.parameters())) == 2  # the rows are not in model.parameters()
    model(BATCHES[0]).backward()
    dense.step()
    rows = model.ec.physical_tables["t"].values.to_dense().clone()
    model.ec.zero_grad_sparse()
    model(BATCHES[0]).backward()  # torch.optim alone never moves the rows
    dense.step()
    assert torch.equal(model.ec.physical_tables["t"].values.to_dense(), rows)
    dense.zero_grad()
    model.ec.zero_grad_sparse()

    sparse = SparseAdam(sparse_parameters(model), lr=0.05)
    losses = []
    for _ in range(40):
        loss = model(BATCHES[0])
        loss.backward()
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    assert not torch.equal(model.ec.physical_tables["t"].values.to_dense(), rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_optimizer_built_before_a_move_to_cuda_keeps_training() -> None:
    moved, ref = make(), make()
    opt = SparseAdam(moved.sparse_parameters(), lr=0.05)
    ref_opt = SparseAdam(ref.sparse_parameters(), lr=0.05)
    for i, ids in enumerate(BATCHES * 2):
        if i == 3:
            nn.Sequential(moved).to("cuda")
        for ec, o in ((moved, opt), (ref, ref_opt)):
            (ec(batch(ids).to(ec.device))["f"] ** 2).sum().backward()
            o.step()
            o.zero_grad()
    values = moved.physical_tables["t"].values
    assert values.device.type == "cuda"
    assert {opt.state[values][s].device.type for s in ("exp_avg", "exp_avg_sq")} == {"cuda"}
    ref_values = ref.physical_tables["t"].values
    torch.testing.assert_close(values.to_dense().cpu(), ref_values.to_dense())
    for slot in ("exp_avg", "exp_avg_sq"):
        got = opt.state[values][slot].to_dense().cpu()
        torch.testing.assert_close(got, ref_opt.state[ref_values][slot].to_dense())
