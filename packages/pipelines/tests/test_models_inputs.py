"""recstack.pipelines.models.inputs: the history mask from the batch's lengths, a
ready-made collection, jagged sequences, and inputs errors naming the batch column."""

from __future__ import annotations

import pytest
import torch
from model_testdata import FEATURES, MAX_LEN, ROWS, TABLES, din, make_batch

from recstack.core import JaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.pipelines.models import (
    DIN,
    DeepFM,
    DeepFMConfig,
    ModelConfigError,
    ModelFeatures,
    sequence_lengths,
    sequence_mask,
)
from recstack.pipelines.models.inputs import jagged_output


def test_sequence_mask_comes_from_the_lengths() -> None:
    kjt = make_batch(ROWS)["sparse"]
    expected = [[False] * 4, [True] * 4, [True, True, False, False]]
    assert sequence_mask(kjt, "hist", MAX_LEN).tolist() == expected
    assert sequence_mask(kjt, "hist", 1).tolist() == [[False], [True], [True]]
    assert sequence_lengths(kjt, "hist", MAX_LEN).tolist() == [0, 4, 2]
    assert sequence_lengths(kjt, "hist", 1).tolist() == [0, 1, 1]


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


def test_sequence_accepts_a_jagged_history_only_when_asked() -> None:
    jagged = [FeatureConfig("hist", "item", pooling="none"), *FEATURES[:1]]
    features = ModelFeatures("DINConfig", TABLES, jagged)
    assert features.sequence("history_feature", "hist", allow_jagged=True) == (8, None)
    with pytest.raises(
        ModelConfigError,
        match=r"feature 'hist' has pooling 'none' and no max_len \(a jagged sequence\); this "
        r"field needs a padded sequence: pooling='none' with max_len",
    ):
        features.sequence("history_feature", "hist")
    padded = ModelFeatures("DINConfig", TABLES, FEATURES)
    assert padded.sequence("history_feature", "hist", allow_jagged=True) == (8, MAX_LEN)
    assert padded.sequence("history_feature", "hist") == (8, MAX_LEN)


def test_jagged_output_checks_the_collections_output() -> None:
    rows = JaggedTensor(torch.zeros(3, 8), torch.tensor([0, 2, 2, 3]))
    assert jagged_output("DIN", {"hist": rows}, "hist", 3, 8) is rows
    with pytest.raises(ValueError, match=r"JaggedTensor of \[N, 4\] rows with 4 offsets but the "):
        jagged_output("DIN", {"hist": rows}, "hist", 3, 4)
    with pytest.raises(ValueError, match=r"collection gave \[3, 4, 8\]; the FeatureConfigs"):
        jagged_output("DIN", {"hist": torch.zeros(3, 4, 8)}, "hist", 3, 8)
    with pytest.raises(ValueError, match="collection gave NoneType"):
        jagged_output("DIN", {}, "hist", 3, 8)


def test_a_jagged_model_on_a_padded_collection_says_so() -> None:
    # The model is told the history is jagged; the collection it is given pads it.
    ec = EmbeddingCollection(TABLES, FEATURES)
    jagged = [
        FeatureConfig("hist", "item", pooling="none") if f.name == "hist" else f for f in FEATURES
    ]
    model = DIN.from_config(
        {"item_feature": "item_id", "history_feature": "hist"}, features=jagged, embeddings=ec
    )
    with pytest.raises(ValueError, match=r"feature 'hist' should embed to a JaggedTensor"):
        model(make_batch(ROWS))
