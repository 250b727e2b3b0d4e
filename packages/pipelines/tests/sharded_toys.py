"""A toy CTR model with embedding tables, sharded or not, and its data, for the tests of
the Trainer with sharded tables."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import (
    EmbeddingCollection,
    FeatureConfig,
    ShardedEmbeddingCollection,
    TableConfig,
)
from recstack.pipelines import Trainer
from recstack.sparse_optim import SparseAdam

TABLES = [TableConfig("item", dim=4), TableConfig("user", dim=4)]
FEATURES = [
    FeatureConfig("item", "item", pooling="sum"),
    FeatureConfig("hist", "item", pooling="none", max_len=3),
    FeatureConfig("user", "user", pooling="mean"),
]
BATCH, VOCAB = 32, 50


class SparseToy(nn.Module):
    def __init__(self, *, sharded: bool, hbm_budget: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(3)
        cls = ShardedEmbeddingCollection if sharded else EmbeddingCollection
        tables = [dataclasses.replace(t, hbm_budget=hbm_budget) for t in TABLES]
        self.ec = cls(tables, FEATURES)
        self.tower = nn.Sequential(nn.Linear(4 + 12 + 4 + 1, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.ec(batch["sparse"])
        x = torch.cat(
            [out["item"], out["hist"].flatten(1), out["user"], batch["x"][:, None]], dim=1
        )
        return self.tower(x).squeeze(1)


def sparse_data(
    *, seed: int = 0, rank: int = 0, world: int = 1, batches: int = 4, disjoint: bool = False
) -> list[dict[str, Any]]:
    """Global batches of ``BATCH`` rows; rank ``rank`` of ``world`` gets rows
    ``rank::world`` of each. ``disjoint``: consecutive batches share no id (odd batches
    draw from another range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        low = VOCAB * (b % 2) if disjoint else 0
        ids = [
            [torch.randint(low, low + VOCAB, (int(torch.randint(0, 4, (1,), generator=g)),),
                           generator=g)
             for _ in FEATURES]
            for _ in range(BATCH)
        ]  # fmt: skip
        x = torch.randn(BATCH, generator=g)
        label = (torch.rand(BATCH, generator=g) < torch.sigmoid(x)).float()
        rows = list(range(rank, BATCH, world))
        values = [ids[r][k] for k in range(len(FEATURES)) for r in rows]
        kjt = KeyedJaggedTensor(
            [f.name for f in FEATURES],
            torch.cat(values),
            torch.tensor([v.numel() for v in values], dtype=torch.int64),
        )
        out.append({"sparse": kjt, "x": x[rows], "label": label[rows]})
    return out


def trainer_for(  # noqa: ANN201
    model: SparseToy,
    data,  # noqa: ANN001
    evals,  # noqa: ANN001
    checkpointer=None,  # noqa: ANN001
    pipeline="off",  # noqa: ANN001
    dense_parallel="ddp",  # noqa: ANN001
) -> Trainer:
    return Trainer(
        model,
        data,
        evals,
        sparse_optimizer=SparseAdam(model.ec.sparse_parameters(), lr=0.05, step_count="per_row"),
        dense_optimizer=torch.optim.AdamW(model.tower.parameters(), lr=0.05),
        device="cpu",
        precision="fp32",
        epochs=2,
        progress=False,
        checkpointer=checkpointer,
        pipeline=pipeline,
        dense_parallel=dense_parallel,
    )


def dense_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state as whole tensors (FSDP2 holds a slice of each on every rank)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous()
        for k, v in module.state_dict().items()
    }


def rows_of(ec: nn.Module) -> dict[str, torch.Tensor]:
    """Every id's row and Adam moments held by ``ec`` (its shard), by ``table.slot``."""
    out = {}
    for table, state in ec.keyed_states().items():
        for keys, slots in state.export_chunks(1 << 20):
            out[f"{table}.keys"] = keys
            for s in ("values", "exp_avg", "exp_avg_sq"):
                out[f"{table}.{s}"] = slots[s].float()
    return out
