"""recstack.pipelines.models.fields: configs from YAML and back, and config errors that
name the field and the feature."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml
from model_testdata import FEATURES, ROWS, TABLES, make_batch

from recstack.pipelines.models import (
    DIN,
    DLRM,
    DeepFM,
    DeepFMConfig,
    DINConfig,
    DLRMConfig,
    ESMMConfig,
    MMoE,
    MMoEConfig,
    ModelConfigError,
)


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
