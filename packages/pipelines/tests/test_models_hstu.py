"""recstack.pipelines.models.hstu: the generative ranker keeps rows independent, hides
each candidate from the history, gives the same step on the torch and Triton backends,
trains, and names what is wrong in its config."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from backends import BACKENDS, DEVICE
from model_testdata import (
    DENSE,
    FEATURES,
    ROWS,
    TABLES,
    make_batch,
    synthetic_rows,
)
from model_testdata import (
    JAGGED_FEATURES as JAGGED,
)

from recstack.core import kernels
from recstack.embedding_engine import FeatureConfig, TableConfig
from recstack.pipelines.models import HSTU, HSTUConfig, ModelConfigError
from recstack.sparse_optim import SparseAdam


def build(device: torch.device | str = "cpu", **changes: Any) -> HSTU:
    torch.manual_seed(0)
    fields: dict[str, Any] = {
        "item_feature": "item_id",
        "history_feature": "hist",
        "other_features": ["user_id", "category"],
        "dense_dim": DENSE,
        "dim": 16,
        "heads": 2,
        "layers": 2,
        "mlp_hidden": [16],
        "next_item_loss": "full",
        "vocab_size": 64,
        **changes,
    }
    return HSTU(HSTUConfig(**fields), TABLES, JAGGED, device=device)


def _ready(model: HSTU, batch: dict) -> HSTU:
    """The model after one training forward, so the batch's ids have rows."""
    model(batch)
    model.embeddings.zero_grad_sparse()
    return model.eval()


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_outputs_are_the_ranking_logits_and_the_next_item_loss(mode: str) -> None:
    model = build(next_item_loss=mode, rank_task="click", next_item_task="gen")
    out = model(make_batch(ROWS + synthetic_rows(6, seed=1)))
    assert set(out) == {"click", "gen"}
    assert out["click"].shape == (9,) and out["click"].dtype == torch.float32
    assert out["gen"].shape == () and torch.isfinite(out["gen"])
    (out["click"].sum() + out["gen"]).backward()
    # Every dense parameter takes part in the step.
    assert all(p.grad is not None for p in model.parameters())
    assert model.embeddings.sparse_grads()  # the rows get gradients too


def test_rank_only_returns_the_logits() -> None:
    model = build(next_item_loss="none")
    assert model.next_item is None
    assert model(make_batch(ROWS)).shape == (3,)


def test_each_rows_logits_do_not_depend_on_the_other_rows() -> None:
    rows = ROWS + synthetic_rows(5, seed=2)
    batch = make_batch(rows)
    model = _ready(build(), batch)
    with torch.no_grad():
        together = model(batch)["label"]
        for b, row in enumerate(rows):
            one = {**make_batch([row]), "dense": batch["dense"][b : b + 1]}
            alone = model(one)["label"]
            torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-5)


def test_history_tokens_never_see_the_candidate() -> None:
    rows = ROWS + synthetic_rows(5, seed=3)
    others = [{**r, "item_id": [(r["item_id"][0] + 7) % 20]} for r in rows]
    model = build()
    _ready(model, make_batch(rows))
    model.train()
    _ready(model, make_batch(others))
    with torch.no_grad():
        a, b = model(make_batch(rows)), model(make_batch(others))
    # The next-item loss reads the history tokens only; the ranking reads the candidate.
    assert torch.equal(a["next_item"], b["next_item"])
    assert not torch.equal(a["label"], b["label"])


def test_the_history_order_matters() -> None:
    rows = [{**ROWS[1], "hist": [11, 12, 13, 14]}]
    flipped = [{**ROWS[1], "hist": [14, 13, 12, 11]}]
    model = _ready(build(), make_batch(rows))
    with torch.no_grad():
        a, b = model(make_batch(rows)), model(make_batch(flipped))
    assert not torch.equal(a["label"], b["label"])


def test_positions_past_max_positions_share_the_last() -> None:
    rows = [{**ROWS[1], "hist": list(range(30))}]
    model = _ready(build(max_positions=3), make_batch(rows))
    with torch.no_grad():
        out = model(make_batch(rows))
    assert torch.isfinite(out["label"]).all() and torch.isfinite(out["next_item"])


def _step(model: HSTU, batch: dict, weight: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    ((out["label"] * weight).sum() + out["next_item"]).backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    sparse = model.embeddings.sparse_grads()
    model.embeddings.zero_grad_sparse()
    return out["label"].detach(), out["next_item"].detach(), dense, sparse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", ["pointwise", "softmax"])
def test_the_triton_kernels_give_the_torch_step(backend: str, attention: str) -> None:
    batch = make_batch(ROWS + synthetic_rows(6, seed=4), device=DEVICE)
    model = _ready(build(DEVICE, attention=attention), batch)
    model.train()
    weight = torch.randn(9, device=DEVICE)
    with kernels.use_backend("torch"):
        expected = _step(model, batch, weight)
    with kernels.use_backend(backend):
        got = _step(model, batch, weight)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, grad in expected[3].items():
        assert torch.equal(got[3][name].rows, grad.rows), name
        torch.testing.assert_close(got[3][name].values, grad.values, rtol=1e-4, atol=1e-5)


def test_training_lowers_both_losses() -> None:
    rows = synthetic_rows(64, seed=5)
    batch = make_batch(rows)
    model = build(next_item_loss="sampled", num_negatives=16, temperature=0.2)
    sparse = SparseAdam(model.embeddings.sparse_parameters(), lr=0.01)
    dense = torch.optim.AdamW(model.parameters(), lr=0.01)
    bce = torch.nn.BCEWithLogitsLoss()
    history = []
    for _ in range(30):
        torch.manual_seed(1)  # the same negatives every step: a fair comparison
        out = model(batch)
        rank = bce(out["label"], batch["label"])
        (rank + out["next_item"]).backward()
        sparse.step()
        sparse.zero_grad()
        dense.step()
        dense.zero_grad()
        history.append((rank.item(), out["next_item"].item()))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1]


def test_from_a_mapping_with_names_in_any_case() -> None:
    model = HSTU.from_config(
        {"item_feature": "item_id", "history_feature": "hist", "attention": "Softmax",
         "next_item_loss": "NONE", "heads": 4},
        TABLES,
        JAGGED,
    )  # fmt: skip
    assert model.config.attention == "softmax" and model.config.next_item_loss == "none"
    assert model.width == 8  # the embedding dim, without a projection
    assert isinstance(model.input_proj, torch.nn.Identity)


@pytest.mark.parametrize(
    ("changes", "features", "message"),
    [
        ({}, FEATURES, r"feature 'hist' has max_len=4; HSTU reads a jagged sequence"),
        ({"history_feature": "user_id"}, JAGGED, r"feature 'user_id' has pooling 'sum'"),
        ({"next_item_loss": "full", "vocab_size": 0}, JAGGED, r"needs the number of items"),
        ({"next_item_task": "label"}, JAGGED, r"rank_task and next_item_task are both"),
        ({"dim": 10, "heads": 4}, JAGGED, r"HSTUConfig.dim: 10 is not a multiple of heads=4"),
        ({"dim": 0, "heads": 3}, JAGGED, r"the width 8 \(the embedding dim\) is not a multiple"),
        ({"attention": "linear"}, JAGGED, r"HSTUConfig.attention must be one of"),
        ({"temperature": 0}, JAGGED, r"HSTUConfig.temperature must be a finite number > 0"),
        ({"other_features": ["hist"]}, JAGGED, r"must name different features"),
    ],
)
def test_config_errors_name_the_field(changes: dict, features: list, message: str) -> None:
    fields: dict[str, Any] = {
        "item_feature": "item_id",
        "history_feature": "hist",
        "next_item_loss": "sampled",
        **changes,
    }
    with pytest.raises(ModelConfigError, match=message):
        HSTU(HSTUConfig(**fields), TABLES, features)


def test_item_and_history_of_different_dims_are_refused() -> None:
    tables = [*TABLES, TableConfig("wide", dim=12)]
    features = [*JAGGED[:1], FeatureConfig("hist", "wide", pooling="none"), *JAGGED[2:]]
    with pytest.raises(ModelConfigError, match=r"has dim 8 but history_feature 'hist' has dim 12"):
        HSTU(HSTUConfig("item_id", "hist"), tables, features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_on_the_gpu_under_bf16_autocast_the_kernels_give_the_torch_step(mode: str) -> None:
    torch.manual_seed(0)
    batch = make_batch(ROWS + synthetic_rows(40, seed=6), device="cuda")
    fields: dict[str, Any] = {
        "item_feature": "item_id", "history_feature": "hist",
        "other_features": ["user_id", "category"], "dense_dim": DENSE, "dim": 32,
        "heads": 2, "next_item_loss": mode, "vocab_size": 64, "num_negatives": 16,
    }  # fmt: skip
    model = HSTU(HSTUConfig(**fields), TABLES, JAGGED, device="cuda")
    model(batch)
    model.embeddings.zero_grad_sparse()
    weight = torch.randn(43, device="cuda")
    steps = {}
    for backend, bf16 in (("torch", False), ("torch", True), ("triton", True)):
        with kernels.use_backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            torch.manual_seed(1)  # the same sampled negatives
            steps[backend, bf16] = _step(model, batch, weight)
    exact, torch_bf16, got = steps["torch", False], steps["torch", True], steps["triton", True]
    torch.testing.assert_close(got[0], torch_bf16[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], torch_bf16[1], rtol=2e-2, atol=2e-2)
    # bf16 rounds the torch step and the kernels' alike (in different places): the kernels'
    # dense gradients must be no further from the fp32 step than the torch bf16 step's are.
    assert got[2].keys() == exact[2].keys()
    for name, grad in exact[2].items():
        scale = grad.abs().max().clamp(min=1e-3)
        ours = float((got[2][name] - grad).abs().max() / scale)
        theirs = float((torch_bf16[2][name] - grad).abs().max() / scale)
        assert ours <= max(2 * theirs, 2e-2), f"{name}: kernels {ours:.4f}, torch {theirs:.4f}"


def test_a_run_config_names_its_two_outputs() -> None:
    from recstack.pipelines.config.model_sections import ModelConfig

    config = HSTUConfig("item_id", "hist", rank_task="click", next_item_task="gen")
    assert ModelConfig("hstu", config).outputs() == {"click": "logits", "gen": "loss"}
    ranking_only = HSTUConfig("item_id", "hist", next_item_loss="none")
    assert ModelConfig("hstu", ranking_only).outputs() is None


def test_a_history_left_in_the_table_gives_the_same_step() -> None:
    batch = make_batch(ROWS + synthetic_rows(5, seed=8))
    gathered = _ready(build(), batch).train()
    in_table_features = [
        FeatureConfig("hist", "item", pooling="none", gather=False) if f.name == "hist" else f
        for f in JAGGED
    ]
    fields = dict(vars(gathered.config))
    in_table = HSTU(HSTUConfig(**fields), TABLES, in_table_features)
    in_table.load_state_dict(gathered.state_dict())
    _ready(in_table, batch).train()
    weight = torch.randn(8)
    expected, got = _step(gathered, batch, weight), _step(in_table, batch, weight)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for name, grad in expected[3].items():
        assert torch.equal(got[3][name].rows, grad.rows), name
        torch.testing.assert_close(got[3][name].values, grad.values)
