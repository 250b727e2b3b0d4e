"""The reference models: shapes and dtypes, masks, gradients to dense parameters and
embedding rows, learning, read-only evaluation, bf16 autocast and config errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import yaml

from recstack.core import KeyedJaggedTensor, SparseGrad, kernels
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.pipelines.models import (
    DIN,
    DLRM,
    ESMM,
    DeepFM,
    DeepFMConfig,
    DINConfig,
    DLRMConfig,
    EmbeddingModel,
    ESMMConfig,
    MMoE,
    MMoEConfig,
    ModelConfigError,
    TargetAttention,
    fm_interaction,
    sequence_mask,
)
from recstack.pipelines.tasks import Task, compute_losses, predictions_of
from recstack.sparse_optim import SparseAdam


@pytest.fixture(autouse=True)
def small_cpu_setup():
    # The models are under test, not the kernels (their own tests check each Triton kernel
    # against its torch reference); the interpreter would make every step seconds long.
    # Tensors this small gain nothing from intra-op threads, which only wait on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kernels.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


MAX_LEN = 4
DENSE = 3
KEYS = ["item_id", "hist", "user_id", "category"]
TABLES = [TableConfig("item", dim=8), TableConfig("user", dim=8), TableConfig("cat", dim=4)]
FEATURES = [
    FeatureConfig("item_id", "item"),
    FeatureConfig("hist", "item", pooling="none", max_len=MAX_LEN),  # shares the item table
    FeatureConfig("user_id", "user"),
    FeatureConfig("category", "cat", pooling="mean"),
]
Row = dict[str, list[int]]


def make_batch(rows: Sequence[Row], seed: int = 0) -> dict[str, Any]:
    """A batch dict as the feature engine gives it, with labels for every model."""
    values = [i for k in KEYS for r in rows for i in r[k]]
    lengths = [len(r[k]) for k in KEYS for r in rows]
    kjt = KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=torch.int64), torch.tensor(lengths))
    gen = torch.Generator().manual_seed(seed)
    item = torch.tensor([r["item_id"][0] for r in rows])
    user = torch.tensor([r["user_id"][0] for r in rows])
    in_history = torch.tensor([float(r["item_id"][0] in r["hist"]) for r in rows])
    click = (item % 2 == 0).float()
    return {
        "sparse": kjt,
        "dense": torch.randn(len(rows), DENSE, generator=gen),
        "label": in_history,  # DIN's signal: the candidate is in the history
        "click": click,
        "conversion": click * (user % 2 == 0).float(),
        "liked": (user % 3 == 0).float(),
    }


# Row 0 has an empty history, row 1 a history longer than MAX_LEN.
ROWS: list[Row] = [
    {"item_id": [10], "hist": [], "user_id": [1], "category": [5, 6]},
    {"item_id": [11], "hist": [11, 12, 13, 14, 15, 16, 17], "user_id": [2], "category": []},
    {"item_id": [12], "hist": [20, 12], "user_id": [3], "category": [7]},
]


def synthetic_rows(n: int, seed: int) -> list[Row]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        hist = torch.randint(0, 20, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen)
        item = int(torch.randint(0, 20, (1,), generator=gen))
        rows.append(
            {
                "item_id": [item],
                "hist": hist.tolist(),
                "user_id": [int(torch.randint(0, 12, (1,), generator=gen))],
                "category": [item % 5],
            }
        )
    return rows


# ---------------------------------------------------------------------- the models


def din(softmax: bool = False) -> DIN:
    config = DINConfig(
        item_feature="item_id",
        history_feature="hist",
        other_features=["user_id", "category"],
        dense_dim=DENSE,
        attention_hidden=[16],
        softmax=softmax,
        mlp_hidden=[32, 16],
    )
    return DIN(config, TABLES, FEATURES)


MODELS: dict[str, tuple[Callable[[], EmbeddingModel], list[Task]]] = {
    "din": (din, [Task("label")]),
    "din-softmax": (lambda: din(softmax=True), [Task("label")]),
    "deepfm": (
        lambda: DeepFM(
            DeepFMConfig(["item_id", "user_id"], dense_dim=DENSE, deep_hidden=[32, 16]),
            TABLES,
            FEATURES,
        ),
        [Task("click", label="click")],
    ),
    "dlrm": (
        lambda: DLRM(
            DLRMConfig(
                ["item_id", "user_id"], dense_dim=DENSE, bottom_hidden=[16], top_hidden=[32]
            ),
            TABLES,
            FEATURES,
        ),
        [Task("click", label="click")],
    ),
    "mmoe": (
        lambda: MMoE(
            MMoEConfig(
                tasks=["click", "liked"],
                sparse_features=["item_id", "user_id", "category"],
                dense_dim=DENSE,
                num_experts=3,
                expert_hidden=[16],
                tower_hidden=[8],
            ),
            TABLES,
            FEATURES,
        ),
        [Task("click", label="click"), Task("liked", label="liked")],
    ),
    "esmm": (
        lambda: ESMM(
            ESMMConfig(["item_id", "user_id", "category"], dense_dim=DENSE, tower_hidden=[16]),
            TABLES,
            FEATURES,
        ),
        [
            Task("ctr", label="click", output="probability"),
            Task("ctcvr", label="conversion", output="probability"),
        ],
    ),
}


@pytest.fixture(params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, EmbeddingModel, list[Task]]:
    torch.manual_seed(0)
    make, tasks = MODELS[request.param]
    return request.param, make(), tasks


def as_dict(out: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"": out}


def check_outputs(name: str, out: Any, batch: int) -> None:
    for key, value in as_dict(out).items():
        assert value.shape == (batch,), (name, key)
        assert value.dtype == torch.float32, (name, key)
        assert torch.isfinite(value).all(), (name, key)
    if name == "esmm":
        assert set(out) == {"ctr", "ctcvr", "cvr"}
        assert ((out["ctr"] >= 0) & (out["ctr"] <= 1)).all()
        assert torch.allclose(out["ctcvr"], out["ctr"] * out["cvr"])
    if name == "mmoe":
        assert set(out) == {"click", "liked"}


def sparse_step(model: EmbeddingModel, opt: SparseAdam) -> None:
    ec = model.embeddings
    grads = {ec.physical_tables[n].values: g for n, g in ec.sparse_grads().items()}
    opt.step(grads=grads)


class DenseAdam:
    """Adam for the dense parameters. torch.optim's first optimizer imports torch._dynamo,
    seconds of a fast test's budget."""

    def __init__(self, params: Any, lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.lr, self.t = lr, 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for p, (m, v) in zip(self.params, self.moments, strict=True):
            if p.grad is not None:
                m.lerp_(p.grad, 0.1)
                v.lerp_(p.grad.square(), 0.001)
                v_hat = v / (1 - 0.999**self.t)
                p -= self.lr * m / (1 - 0.9**self.t) / (v_hat.sqrt() + 1e-8)
                p.grad = None


# ---------------------------------------------------------------------- forward


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


# ---------------------------------------------------------------------- DIN's mask


def test_sequence_mask_comes_from_the_lengths() -> None:
    kjt = make_batch(ROWS)["sparse"]
    expected = [[False] * 4, [True] * 4, [True, True, False, False]]
    assert sequence_mask(kjt, "hist", MAX_LEN).tolist() == expected
    assert sequence_mask(kjt, "hist", 1).tolist() == [[False], [True], [True]]


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


# ---------------------------------------------------------------------- pieces


def test_fm_interaction_is_the_sum_over_pairs() -> None:
    v = torch.randn(2, 3, 4)
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i in range(3) for j in range(i + 1, 3))
    assert torch.allclose(fm_interaction(v), pairs, atol=1e-5)


def test_dlrm_interacts_the_bottom_output_with_every_embedding() -> None:
    torch.manual_seed(0)
    model = MODELS["dlrm"][0]()
    assert model.pairs.shape == (2, 3)  # [z, item, user]: 3 pairs
    no_dense = DLRM(DLRMConfig(["item_id", "user_id"], top_hidden=[8]), TABLES, FEATURES)
    batch = make_batch(ROWS)
    del batch["dense"]
    assert no_dense(batch).shape == (3,)
    with pytest.raises(KeyError, match="dense_dim=3"):
        model(batch)


# ---------------------------------------------------------------------- configs


def test_config_from_yaml_round_trips() -> None:
    text = """
    item_feature: item_id
    history_feature: hist
    other_features: [user_id]
    attention_hidden: [16, 8]
    softmax: true
    mlp_activation: PReLU
    """
    model = DIN.from_config(
        yaml.safe_load(text), [t.to_dict() for t in TABLES], [f.to_dict() for f in FEATURES]
    )
    assert model.config.attention_hidden == (16, 8) and model.config.mlp_activation == "prelu"
    assert DINConfig(**model.config.to_dict()) == model.config
    assert model(make_batch(ROWS)).shape == (3,)


def test_ready_made_collection_is_used() -> None:
    ec = EmbeddingCollection(TABLES, FEATURES, merge_tables=False)
    model = DeepFM.from_config(
        {"sparse_features": ["item_id", "user_id"]}, features=FEATURES, embeddings=ec
    )
    assert model.embeddings is ec
    assert [m for m in model.modules() if isinstance(m, EmbeddingCollection)] == [ec]
    assert model(make_batch(ROWS)).shape == (3,)
    with pytest.raises(ModelConfigError, match="table 'user' .*dim 16"):
        DeepFM(
            DeepFMConfig(["item_id"]),
            [TableConfig("user", dim=16)],
            FEATURES,
            embeddings=ec,
        )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: DIN(DINConfig("item_id", "nope"), TABLES, FEATURES),
            "history_feature: no feature 'nope'",
        ),
        (
            lambda: DIN(DINConfig("hist", "item_id"), TABLES, FEATURES),
            "item_feature: feature 'hist' has pooling 'none'",
        ),
        (
            lambda: DIN(DINConfig("item_id", "user_id"), TABLES, FEATURES),
            "feature 'user_id' has pooling 'sum'; .*padded sequence",
        ),
        (
            lambda: DIN(DINConfig("category", "hist"), TABLES, FEATURES),
            "dim 4 but history_feature 'hist' has dim 8",
        ),
        (
            lambda: DeepFM(DeepFMConfig(["item_id", "category"]), TABLES, FEATURES),
            "sparse_features: .*one embedding dim",
        ),
        (lambda: DLRM(DLRMConfig(["item_id"]), TABLES, FEATURES), "at least two vectors"),
        (
            lambda: MMoE(MMoEConfig(["a"], ["hist"]), TABLES, FEATURES),
            r"sparse_features\[0\]: feature 'hist'",
        ),
        (lambda: ESMMConfig(["item_id"], ctcvr_task="ctr"), "more than once"),
        (
            lambda: DeepFMConfig(["item_id"], activation="swish"),
            "DeepFMConfig.activation must be one of",
        ),
        (lambda: DeepFMConfig(["item_id"], dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (
            lambda: DINConfig("item_id", "hist", mlp_hidden=[0]),
            r"mlp_hidden\[0\] must be an int >= 1",
        ),
        (
            lambda: DIN.from_config({"item_feature": "item_id"}, TABLES, FEATURES),
            "missing required field.*history_feature",
        ),
        (
            lambda: DIN.from_config(
                {"item_feature": "i", "history_feature": "h", "x": 1}, TABLES, FEATURES
            ),
            r"unknown field\(s\) \['x'\]",
        ),
        (lambda: DIN(DINConfig("item_id", "hist"), TABLES), "features="),
        (lambda: DIN({"item_feature": "item_id"}, TABLES, FEATURES), "use from_config"),
    ],
)
def test_config_errors_name_the_field_and_feature(build: Callable[[], object], match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        build()


def test_forward_errors_name_the_input() -> None:
    model = din()
    batch = make_batch(ROWS)
    with pytest.raises(ValueError, match=r"inputs\['dense'\] must be \[B, dense_dim\] = \[3, 3\]"):
        model({**batch, "dense": torch.zeros(3, 2)})
    with pytest.raises(TypeError, match=r"inputs\['sparse'\] must be the KeyedJaggedTensor"):
        model({"dense": batch["dense"]})


# ---------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_bf16_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    make, tasks = MODELS[name]
    on_cpu = make()
    with kernels.use_backend("auto"):  # the Triton kernels, as in training
        model = type(on_cpu)(on_cpu.config, TABLES, FEATURES, device="cuda")
        assert all(p.is_cuda for p in model.parameters())
        batch = {k: v.to("cuda") for k, v in make_batch(ROWS).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
            loss, _ = compute_losses(predictions_of(out, tasks), batch, tasks)
        check_outputs(name, out, len(ROWS))
        loss.backward()
        assert model.embeddings.sparse_grads()
        model.eval()
        with torch.no_grad():
            check_outputs(name, model(batch), len(ROWS))
