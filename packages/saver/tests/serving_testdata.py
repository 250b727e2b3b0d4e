"""A model holding an embedding collection, trained on a few ids, shared by the serving
export tests."""

from __future__ import annotations

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig

TABLE = "model.ec.item"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection([TableConfig("item", dim=4)], [FeatureConfig("f", "item")])
        self.linear = nn.Linear(4, 2)


def kjt(ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        ["f"], torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64)
    )


def trained(ids: list[int]) -> Model:
    model = Model()
    model.ec(kjt(ids))  # training mode: inserts the ids
    return model


def eval_rows(model: Model, ids: list[int]) -> torch.Tensor:
    """What the collection returns in eval (one id per bag, sum pooling: the id's row)."""
    model.ec.eval()
    try:
        return model.ec(kjt(ids))["f"].detach()
    finally:
        model.ec.train()


IDS = [3, 17, 5, 1_000_003, 42]
