"""Tables, features, batches and small builds of every reference model, shared by the
models tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import FeatureConfig, TableConfig
from recstack.pipelines.models import (
    DIN,
    DLRM,
    ESMM,
    HSTU,
    DeepFM,
    DeepFMConfig,
    DINConfig,
    DLRMConfig,
    EmbeddingModel,
    ESMMConfig,
    HSTUConfig,
    MMoE,
    MMoEConfig,
)
from recstack.pipelines.tasks import Task
from recstack.sparse_optim import SparseAdam

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


# The history jagged: every id kept, no padding (HSTU reads it so).
JAGGED_FEATURES = [
    FeatureConfig("hist", "item", pooling="none") if f.name == "hist" else f for f in FEATURES
]


Row = dict[str, list[int]]


def make_batch(
    rows: Sequence[Row], seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """A batch dict as the feature engine gives it, with labels for every model, on
    ``device``."""
    values = [i for k in KEYS for r in rows for i in r[k]]
    lengths = [len(r[k]) for k in KEYS for r in rows]
    kjt = KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=torch.int64), torch.tensor(lengths))
    gen = torch.Generator().manual_seed(seed)
    item = torch.tensor([r["item_id"][0] for r in rows])
    user = torch.tensor([r["user_id"][0] for r in rows])
    in_history = torch.tensor([float(r["item_id"][0] in r["hist"]) for r in rows])
    click = (item % 2 == 0).float()
    batch = {
        "sparse": kjt,
        "dense": torch.randn(len(rows), DENSE, generator=gen),
        "label": in_history,  # DIN's signal: the candidate is in the history
        "click": click,
        "conversion": click * (user % 2 == 0).float(),
        "liked": (user % 3 == 0).float(),
    }
    return {name: value.to(device) for name, value in batch.items()}


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


def hstu() -> HSTU:
    config = HSTUConfig(
        item_feature="item_id",
        history_feature="hist",
        other_features=["user_id", "category"],
        dense_dim=DENSE,
        dim=16,
        heads=2,
        mlp_hidden=[16],
        num_negatives=8,
        temperature=0.2,
    )
    return HSTU(config, TABLES, JAGGED_FEATURES)


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
    "hstu": (hstu, [Task("label"), Task("next_item", output="loss", weight=0.5)]),
}

#: The features each model is built on, where not :data:`FEATURES`.
FEATURES_OF = {"hstu": JAGGED_FEATURES}


def as_dict(out: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"": out}


def check_outputs(name: str, out: Any, batch: int) -> None:
    for key, value in as_dict(out).items():
        shape = () if (name, key) == ("hstu", "next_item") else (batch,)
        assert value.shape == shape, (name, key)
        assert value.dtype == torch.float32, (name, key)
        assert torch.isfinite(value).all(), (name, key)
    if name == "esmm":
        assert set(out) == {"ctr", "ctcvr", "cvr"}
        assert ((out["ctr"] >= 0) & (out["ctr"] <= 1)).all()
        assert torch.allclose(out["ctcvr"], out["ctr"] * out["cvr"])
    if name == "mmoe":
        assert set(out) == {"click", "liked"}
    if name == "hstu":
        assert set(out) == {"label", "next_item"}


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
