"""recstack.pipelines.config.overrides: --set KEY.PATH=VALUE parsing and application."""

from __future__ import annotations

from typing import Any

import pytest
from config_testdata import DEMO, demo_doc

from recstack.pipelines.config import (
    ConfigError,
    load_config,
    parse_config,
    parse_override,
)


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("trainer.epochs=3", ["trainer", "epochs"], 3),
        ("optimizers.dense.lr=0.5", ["optimizers", "dense", "lr"], 0.5),
        ("tasks[0].weight=2", ["tasks", 0, "weight"], 2),
        ("tasks.0.weight=2", ["tasks", 0, "weight"], 2),
        ("model.mlp_hidden=[8, 4]", ["model", "mlp_hidden"], [8, 4]),
        ("trainer.max_steps=null", ["trainer", "max_steps"], None),
        ("trainer.device=cuda:1", ["trainer", "device"], "cuda:1"),
        ("logging.progress=true", ["logging", "progress"], True),
        ("data.train.paths=a=b.parquet", ["data", "train", "paths"], "a=b.parquet"),
    ],
)
def test_override_parsing(text: str, path: list[Any], value: Any) -> None:
    o = parse_override(text)
    assert o.path == path and o.value == value


def test_overrides_apply_in_order_and_create_sections() -> None:
    config = parse_config(
        demo_doc(),
        overrides=[
            "trainer.epochs=3",
            "trainer.epochs=4",
            "tasks[0].weight=2.5",
            "model.mlp_hidden=[8, 4]",
            "early_stopping.monitor=ctr/auc",
            "data.eval.batch_size=100",
        ],
    )
    assert config.trainer.epochs == 4 and config.task_list[0].weight == 2.5
    assert config.model.config.mlp_hidden == (8, 4)
    assert config.early_stopping.monitor == "ctr/auc" and config.early_stopping.patience == 3
    assert config.data.eval.batch_size == 100
    # data.train changes reach data.eval where it does not say otherwise.
    config = parse_config(demo_doc(), overrides=["data.train.num_threads=3"])
    assert config.data.eval.num_threads == 3


def test_a_bare_off_is_the_choice_not_a_bool() -> None:
    """YAML 1.1 reads ``off`` as false; a field whose choices include "off" takes it."""
    config = parse_config(demo_doc(), overrides=["trainer.pipeline=off"])
    assert config.trainer.pipeline == "off"
    config = parse_config(demo_doc(), overrides=["trainer.pipeline=semi-sync"])
    assert config.trainer.pipeline == "semi-sync"
    with pytest.raises(ConfigError, match="trainer.pipeline"):
        parse_config(demo_doc(), overrides=["trainer.pipeline=true"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainer.epochs", "expected KEY.PATH=VALUE"),
        ("tasks[5].weight=1", "tasks[5] is not an item of a list of 1"),
        ("trainer.epochs.x=1", "trainer.epochs holds 1, not a mapping"),
        ("trainer..epochs=1", "empty key"),
        ("model.mlp_hidden=[1", "the value is not valid YAML"),
    ],
)
def test_bad_overrides(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_config(demo_doc(), file="run.yaml", overrides=[text])


def test_an_invalid_override_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["trainer.epoch=2"])
    assert str(info.value).endswith(
        "(from --set trainer.epoch=2)"
    ) and "trainer.epoch: unknown key (did you mean 'epochs'?)" in str(info.value)
