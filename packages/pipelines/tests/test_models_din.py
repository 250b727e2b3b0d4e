"""recstack.pipelines.models.din: DIN's attention sees each row's valid history only; the
fused attention op and the unfused module give the same model and load each other's
checkpoints."""

from __future__ import annotations

import pytest
import torch
from backends import BACKENDS, DEVICE
from model_testdata import (
    DENSE,
    FEATURES,
    MAX_LEN,
    ROWS,
    TABLES,
    din,
    make_batch,
    synthetic_rows,
)
from model_testdata import (
    JAGGED_FEATURES as JAGGED,
)

from recstack.core import kernels
from recstack.embedding_engine import FeatureConfig
from recstack.pipelines.models import DIN, DINConfig, ModelConfigError, TargetAttention
from recstack.pipelines.ops import FusedTargetAttention
from recstack.sparse_optim import SparseAdam


@pytest.mark.parametrize("softmax", [False, True])
def test_din_output_ignores_ids_past_each_rows_length(softmax: bool) -> None:
    torch.manual_seed(0)
    model = din(softmax)
    other = [dict(r) for r in ROWS]
    # Older ids than the last MAX_LEN: cut by the collection (it keeps the most recent).
    other[1] = {**ROWS[1], "hist": [40, 41, 42] + ROWS[1]["hist"][-MAX_LEN:]}
    model(make_batch(other))  # training mode: the other ids get rows too
    model.eval()
    with torch.no_grad():
        a, b = model(make_batch(ROWS)), model(make_batch(other))
    assert torch.equal(a, b)
    # The history matters at all: a different valid prefix changes the output.
    changed = [dict(r) for r in ROWS]
    changed[2] = {**ROWS[2], "hist": [21, 22]}
    with torch.no_grad():
        assert not torch.equal(a, model(make_batch(changed)))


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_masks_padding(softmax: bool) -> None:
    torch.manual_seed(0)
    att = TargetAttention(dim=4, hidden=[8], activation="prelu", softmax=softmax)
    query, keys = torch.randn(3, 4), torch.randn(3, 5, 4)
    lengths = torch.tensor([0, 5, 2])
    mask = torch.arange(5) < lengths.unsqueeze(1)
    garbage = torch.where(mask.unsqueeze(-1), keys, torch.randn(3, 5, 4) * 100)
    out = att(query, keys, mask)
    assert torch.allclose(att(query, garbage, mask), out, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(4))  # an empty history attends to nothing
    # Row by row on the valid prefix only: the padding takes no share of the weights.
    for b in (1, 2):
        n = int(lengths[b])
        alone = att(query[b : b + 1], keys[b : b + 1, :n], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(alone[0], out[b], atol=1e-6)


def build(device: torch.device | str = "cpu", **changes: object) -> DIN:
    fields = {
        "item_feature": "item_id",
        "history_feature": "hist",
        "other_features": ["user_id", "category"],
        "dense_dim": DENSE,
        "attention_hidden": [16, 8],
        "mlp_hidden": [32, 16],
        **changes,
    }
    return DIN(DINConfig(**fields), TABLES, FEATURES, device=device)


def test_the_fused_attention_runs_where_the_kernels_support_it() -> None:
    assert DINConfig("item_id", "hist").fused_attention is True
    assert isinstance(build().attention, FusedTargetAttention)
    assert isinstance(build(attention_activation="ReLU").attention, FusedTargetAttention)
    for changes in (
        {"fused_attention": False},
        {"attention_activation": "prelu"},  # learns parameters: not fused
        {"attention_activation": "dice"},
        {"attention_hidden": [8, 8, 8]},  # the kernels take one or two hidden layers
        {"attention_hidden": [300]},  # wider than the kernels take
    ):
        assert type(build(**changes).attention) is TargetAttention, changes
    with pytest.raises(ModelConfigError, match="fused_attention"):
        DINConfig("item_id", "hist", fused_attention=1)
    fields = {"item_feature": "item_id", "history_feature": "hist", "fused_attention": False}
    model = DIN.from_config(fields, TABLES, FEATURES)  # as a config file gives it
    assert model.config.fused_attention is False and type(model.attention) is TargetAttention


@pytest.mark.parametrize("hidden", [[16], [16, 8]], ids=["1layer", "2layers"])
def test_checkpoints_load_with_the_attention_fused_or_not(hidden: list[int]) -> None:
    torch.manual_seed(0)
    fused = build(attention_hidden=hidden)
    unfused = build(attention_hidden=hidden, fused_attention=False)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    unfused.load_state_dict(fused.state_dict())
    fused.load_state_dict(unfused.state_dict())
    for a, b in zip(fused.attention.parameters(), unfused.attention.parameters(), strict=True):
        assert torch.equal(a, b)


def _step(model: DIN, batch: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Logits, dense gradients and the embedding rows' (coalesced) sparse gradients."""
    logits = model(batch)
    (logits * weight).sum().backward()
    dense = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    sparse = {name: g.coalesce() for name, g in model.embeddings.sparse_grads().items()}
    return logits.detach(), dense, sparse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_fused_and_unfused_attention_give_the_same_model(softmax: bool, backend: str) -> None:
    torch.manual_seed(0)
    unfused = build(DEVICE, softmax=softmax, fused_attention=False)
    # Empty, truncated and ragged histories.
    batch = make_batch(ROWS + synthetic_rows(6, seed=3), device=DEVICE)
    unfused(batch)  # training mode: the batch's ids get rows
    unfused.embeddings.zero_grad_sparse()
    fused = build(DEVICE, softmax=softmax)
    fused.load_state_dict(unfused.state_dict())
    weight = torch.randn(len(ROWS) + 6, device=DEVICE)

    expected = _step(unfused, batch, weight)
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        got = _step(fused, batch, weight)
    if backend == "triton":
        assert launches["target_attention_fwd"] == 1 and launches["target_attention_bwd"] == 1
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        assert torch.equal(got[2][name].rows, grad.rows), name
        torch.testing.assert_close(got[2][name].values, grad.values, rtol=1e-5, atol=1e-5)


# The same features with the history jagged (no padding) or padded past its longest row.
LONGEST = 8
PADDED = [
    FeatureConfig("hist", "item", pooling="none", max_len=LONGEST) if f.name == "hist" else f
    for f in FEATURES
]


def _jagged_and_padded(fused: bool, softmax: bool, batch: dict) -> tuple[DIN, DIN]:
    torch.manual_seed(0)
    fields = {
        "item_feature": "item_id",
        "history_feature": "hist",
        "other_features": ["user_id", "category"],
        "dense_dim": DENSE,
        "attention_hidden": [16, 8],
        "mlp_hidden": [32, 16],
        "mlp_activation": "relu",  # no batch statistics: the two models see one batch each
        "softmax": softmax,
        "fused_attention": fused,
    }
    padded = DIN(DINConfig(**fields), TABLES, PADDED, device=DEVICE)
    padded(batch)  # training mode: the batch's ids get rows
    padded.embeddings.zero_grad_sparse()
    jagged = DIN(DINConfig(**fields), TABLES, JAGGED, device=DEVICE)
    jagged.load_state_dict(padded.state_dict())
    assert jagged.max_len is None and padded.max_len == LONGEST
    return jagged, padded


def _assert_same_step(got: tuple, expected: tuple) -> None:
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        assert torch.equal(got[2][name].rows, grad.rows), name
        torch.testing.assert_close(got[2][name].values, grad.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_a_jagged_history_gives_the_padded_models_logits_and_gradients(
    softmax: bool, fused: bool, backend: str
) -> None:
    # ROWS: an empty history and one of 7 ids, the longest; then ragged ones, empty too.
    batch = make_batch(ROWS + synthetic_rows(5, seed=4), device=DEVICE)
    jagged, padded = _jagged_and_padded(fused, softmax, batch)
    assert isinstance(jagged.attention, FusedTargetAttention if fused else TargetAttention)
    weight = torch.randn(len(ROWS) + 5, device=DEVICE)
    with kernels.use_backend(backend):
        expected = _step(padded, batch, weight)
        with kernels.count_launches() as launches:
            got = _step(jagged, batch, weight)
    if fused and backend == "triton":
        assert launches["target_attention_fwd"] == 1 and launches["target_attention_bwd"] == 1
    _assert_same_step(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_a_batch_of_empty_jagged_histories_attends_to_nothing(fused: bool, backend: str) -> None:
    rows = [{**r, "hist": []} for r in ROWS]
    batch = make_batch(rows, device=DEVICE)
    jagged, padded = _jagged_and_padded(fused, False, batch)
    weight = torch.randn(len(rows), device=DEVICE)
    with kernels.use_backend(backend):
        expected = _step(padded, batch, weight)
        got = _step(jagged, batch, weight)
    _assert_same_step(got, expected)
    # The attention layers take no share of the logits: their gradient is zero.
    assert all(not g.any() for n, g in got[1].items() if n.startswith("attention."))


def test_history_feature_errors_name_both_layouts() -> None:
    fields = {"item_feature": "item_id", "history_feature": "user_id"}
    with pytest.raises(
        ModelConfigError,
        match=r"DINConfig\.history_feature: feature 'user_id' has pooling 'sum'; this field "
        r"needs a jagged or padded sequence: pooling='none', without or with max_len",
    ):
        DIN.from_config(fields, TABLES, JAGGED)
    with pytest.raises(ModelConfigError, match="feature 'hist' has dim 8"):
        DIN.from_config({"item_feature": "category", "history_feature": "hist"}, TABLES, JAGGED)


# The history left in its table: the attention reads each id's row itself.
IN_TABLE = [
    FeatureConfig("hist", "item", pooling="none", gather=False) if f.name == "hist" else f
    for f in FEATURES
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_rows_read_from_the_table_give_the_gathered_models_step(
    softmax: bool, fused: bool, backend: str
) -> None:
    batch = make_batch(ROWS + synthetic_rows(5, seed=7), device=DEVICE)
    jagged, _ = _jagged_and_padded(fused, softmax, batch)
    in_table = DIN(jagged.config, TABLES, IN_TABLE, device=DEVICE)
    in_table.load_state_dict(jagged.state_dict())
    in_table(batch)  # the batch's ids get rows, the same as the jagged model's
    in_table.embeddings.zero_grad_sparse()
    weight = torch.randn(len(ROWS) + 5, device=DEVICE)
    with kernels.use_backend(backend):
        expected = _step(jagged, batch, weight)
        got = _step(in_table, batch, weight)
    _assert_same_step(got, expected)
    for model in (jagged, in_table):
        model.embeddings.zero_grad_sparse()
    # Three steps with a sparse optimizer keep the two tables equal.
    for model in (jagged, in_table):
        opt = SparseAdam(model.embeddings.sparse_parameters(), lr=0.05)
        for step in range(3):
            with kernels.use_backend(backend):
                batch = make_batch(synthetic_rows(6, seed=20 + step), device=DEVICE)
                (model(batch) * weight[:6]).sum().backward()
            opt.step()
            opt.zero_grad()
    # The rows of every item id, after the same updates, are the same.
    ids = torch.arange(40, device=DEVICE)
    tables = []
    for model in (jagged, in_table):
        ec = model.embeddings
        rows = ec.find_rows("item", ids)
        values = ec.physical_tables[ec.physical_table_of("item")].values
        found = rows >= 0
        tables.append((found, values.gather_rows(rows[found])))
    assert torch.equal(tables[0][0], tables[1][0])
    torch.testing.assert_close(tables[1][1], tables[0][1], rtol=1e-5, atol=1e-6)
