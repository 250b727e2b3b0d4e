"""What every reference model (recstack.pipelines.models.EmbeddingModel) does: outputs of
the right shape and dtype, also for one row, none and under bf16 autocast; gradients to
the dense parameters and the embedding rows; a few steps learn; evaluation inserts no
ids; on CUDA with the Triton kernels."""

from __future__ import annotations

import pytest
import torch
from model_testdata import (
    FEATURES,
    FEATURES_OF,
    KEYS,
    MODELS,
    ROWS,
    TABLES,
    DenseAdam,
    check_outputs,
    make_batch,
    sparse_step,
    synthetic_rows,
)

from recstack.core import KeyedJaggedTensor, SparseGrad, kernels
from recstack.pipelines.models import EmbeddingModel
from recstack.pipelines.tasks import Task, compute_losses, predictions_of
from recstack.sparse_optim import SparseAdam


@pytest.fixture(params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, EmbeddingModel, list[Task]]:
    torch.manual_seed(0)
    make, tasks = MODELS[request.param]
    return request.param, make(), tasks


def test_forward_shapes_dtypes_and_single_row(case) -> None:
    name, model, tasks = case
    check_outputs(name, model(make_batch(ROWS)), len(ROWS))
    check_outputs(name, model(make_batch(ROWS[1:2])), 1)  # B=1, in training mode
    model.eval()
    with torch.no_grad():
        check_outputs(name, model(make_batch(ROWS[:1])), 1)
    preds = predictions_of(model(make_batch(ROWS)), tasks)  # the Trainer's contract
    loss, _ = compute_losses(preds, make_batch(ROWS), tasks)
    assert torch.isfinite(loss)


def test_empty_batch(case) -> None:
    name, model, _ = case
    empty = torch.zeros(0, dtype=torch.int64)
    batch = {"sparse": KeyedJaggedTensor(KEYS, empty, empty, stride=0), "dense": torch.zeros(0, 3)}
    check_outputs(name, model(batch), 0)
    model.eval()
    with torch.no_grad():
        check_outputs(name, model(batch), 0)


def test_bf16_autocast_keeps_embeddings_fp32(case) -> None:
    name, model, tasks = case
    batch = make_batch(ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss, _ = compute_losses(predictions_of(out, tasks), batch, tasks)
    check_outputs(name, out, len(ROWS))
    loss.backward()
    for table in model.embeddings.physical_tables.values():
        assert table.values.dtype == torch.float32
    assert all(g.values.dtype == torch.float32 for g in model.embeddings.sparse_grads().values())


def test_gradients_reach_dense_parameters_and_embedding_rows(case) -> None:
    name, model, tasks = case
    batch = make_batch(ROWS)
    loss, _ = compute_losses(predictions_of(model(batch), tasks), batch, tasks)
    loss.backward()
    params = dict(model.named_parameters())
    assert params and all(p.grad is not None for p in params.values()), [
        n for n, p in params.items() if p.grad is None
    ]
    assert all(bool(torch.isfinite(p.grad).all()) for p in params.values())
    assert sum(int(p.grad.count_nonzero()) for p in params.values()) > 0
    grads = model.embeddings.sparse_grads()
    assert grads, name
    for grad in grads.values():
        assert isinstance(grad, SparseGrad) and grad.rows.numel() > 0
        assert grad.values.abs().sum() > 0


def test_a_few_steps_reduce_the_loss(case) -> None:
    name, model, tasks = case
    batch = make_batch(synthetic_rows(48, seed=1))
    dense_opt = DenseAdam(model.parameters(), lr=0.01)
    tables = [t.values for t in model.embeddings.physical_tables.values()]
    sparse_opt = SparseAdam(tables, lr=0.05)
    losses = []
    for _ in range(25):
        loss, _ = compute_losses(predictions_of(model(batch), tasks), batch, tasks)
        loss.backward()
        dense_opt.step()
        sparse_step(model, sparse_opt)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], (name, losses)


def test_eval_forward_inserts_no_ids(case) -> None:
    name, model, _ = case
    model(make_batch(ROWS))
    ec = model.embeddings
    before = {t: ec.num_ids(t.name) for t in TABLES}
    fresh = [
        {"item_id": [900 + i], "hist": [950 + i, 960 + i], "user_id": [970 + i], "category": [99]}
        for i in range(2)
    ]
    model.eval()
    with torch.no_grad():
        check_outputs(name, model(make_batch(fresh)), 2)
    assert {t: ec.num_ids(t.name) for t in TABLES} == before
    assert ec.find_rows("item", torch.tensor([900, 950])).tolist() == [-1, -1]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_bf16_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    make, tasks = MODELS[name]
    on_cpu = make()
    with kernels.use_backend("auto"):  # the Triton kernels, as in training
        features = FEATURES_OF.get(name, FEATURES)
        model = type(on_cpu)(on_cpu.config, TABLES, features, device="cuda")
        assert all(p.is_cuda for p in model.parameters())
        batch = make_batch(ROWS, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
            loss, _ = compute_losses(predictions_of(out, tasks), batch, tasks)
        check_outputs(name, out, len(ROWS))
        loss.backward()
        assert model.embeddings.sparse_grads()
        model.eval()
        with torch.no_grad():
            check_outputs(name, model(batch), len(ROWS))
