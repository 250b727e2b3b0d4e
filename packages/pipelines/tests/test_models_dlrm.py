"""recstack.pipelines.models.dlrm: the interaction of the bottom output and the
embeddings."""

from __future__ import annotations

import pytest
import torch
from model_testdata import FEATURES, MODELS, ROWS, TABLES, make_batch

from recstack.pipelines.models import (
    DLRM,
    DLRMConfig,
)


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
