"""recstack.pipelines.config.loader: the example configs load, YAML and TOML give the
same config, and file errors name the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from config_testdata import CRITEO, DEMO, SMALL_TOML, SMALL_YAML

from recstack.pipelines.config import (
    ConfigError,
    load_config,
    parse_config,
)
from recstack.pipelines.models import DeepFM
from recstack.sparse_optim import RowWiseAdagrad, SparseAdagrad, SparseAdam


def test_example_configs_load() -> None:
    demo = load_config(DEMO)
    assert demo.file == str(DEMO)
    assert demo.model.type == "din" and demo.model.config.mlp_hidden == (64, 32)
    assert demo.model.config.other_features == ("user", "ctx_1", "ctx_2", "ctx_3")
    assert [t.name for t in demo.task_list] == ["ctr"]
    assert demo.optimizers.sparse.cls is SparseAdam and demo.optimizers.sparse.options == {
        "lr": 0.01
    }
    assert demo.optimizers.dense.cls is torch.optim.AdamW
    assert demo.data.synthetic.dataset.num_rows == 250_000
    assert demo.data.eval.batch_size == 8192 and demo.data.eval.shuffle is False
    assert len(demo.features.features) == 10 and demo.checkpoint.keep_last == 2
    criteo = load_config(CRITEO)
    assert criteo.model.type == "dlrm" and len(criteo.model.config.sparse_features) == 26
    assert criteo.optimizers.sparse.cls is RowWiseAdagrad
    assert [c.name for c in criteo.data.eval.columns] == [c.name for c in criteo.data.train.columns]
    assert criteo.data.train.columns[1].dtype == torch.float64
    assert criteo.checkpoint.every == 2000 and criteo.checkpoint.async_ is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  type: din\n  type: dlrm\n", "key 'type' is given twice (lines 2 and 3)"),
        ("model: [\n", "invalid YAML at line"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("", "is empty"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml: " + message.split(" (")[0]):
        load_config(path)


def test_unknown_extension_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.json: cannot tell the format"):
        load_config(tmp_path / "run.json")
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config(tmp_path / "bad.toml")


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(SMALL_YAML)
    (tmp_path / "run.toml").write_text(SMALL_TOML)
    a, b = load_config(tmp_path / "run.yaml"), load_config(tmp_path / "run.toml")
    assert a == b
    assert a.optimizers.dense.options == {"lr": 0.001, "betas": (0.9, 0.98), "weight_decay": 0.01}
    assert a.optimizers.sparse.cls is SparseAdagrad
    assert a.data.eval.paths == ("data/eval.parquet",) and a.data.eval.batch_size == 64
    assert a.tables[0].initializer.params == {"mean": 0.0, "std": 0.01}
    assert a.checkpoint.async_ is True and a.model.type == "deepfm"
    assert a.model.model_class() is DeepFM


def test_toml_errors_name_the_toml_file(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(SMALL_TOML.replace("deep_hidden", "deep_hiden"))
    with pytest.raises(ConfigError, match=r"run.toml: model.deep_hiden: unknown key \(did you"):
        load_config(tmp_path / "run.toml")


def test_config_without_a_file_name_errors_without_one() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"data": {}})
    assert str(info.value) == "tables: required key is missing"


def test_a_table_budget_makes_a_tiered_table(tmp_path: Path) -> None:
    text = SMALL_YAML.replace(
        "{name: user, dim: 8, initializer:", "{name: user, dim: 8, hbm_budget: 24GiB, initializer:"
    )
    (tmp_path / "run.yaml").write_text(text)
    config = load_config(tmp_path / "run.yaml")
    assert config.tables[0].hbm_budget == "24GiB" and config.tables[1].hbm_budget is None
    (tmp_path / "bad.yaml").write_text(text.replace("24GiB", "lots"))
    with pytest.raises(ConfigError, match="bad.yaml.*'user'.*hbm_budget 'lots' is not a size"):
        load_config(tmp_path / "bad.yaml")
