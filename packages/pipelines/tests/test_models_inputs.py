"""recstack.pipelines.models.inputs: the history mask from the batch's lengths, a
ready-made collection, and inputs errors naming the batch column."""

from __future__ import annotations

import pytest
import torch
from model_testdata import FEATURES, MAX_LEN, ROWS, TABLES, din, make_batch

from recstack.embedding_engine import EmbeddingCollection, TableConfig
from recstack.pipelines.models import (
    DeepFM,
    DeepFMConfig,
    ModelConfigError,
    sequence_mask,
)


def test_sequence_mask_comes_from_the_lengths() -> None:
    kjt = make_batch(ROWS)["sparse"]
    expected = [[False] * 4, [True] * 4, [True, True, False, False]]
    assert sequence_mask(kjt, "hist", MAX_LEN).tolist() == expected
    assert sequence_mask(kjt, "hist", 1).tolist() == [[False], [True], [True]]


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


def test_forward_errors_name_the_input() -> None:
    model = din()
    batch = make_batch(ROWS)
    with pytest.raises(ValueError, match=r"inputs\['dense'\] must be \[B, dense_dim\] = \[3, 3\]"):
        model({**batch, "dense": torch.zeros(3, 2)})
    with pytest.raises(TypeError, match=r"inputs\['sparse'\] must be the KeyedJaggedTensor"):
        model({"dense": batch["dense"]})
