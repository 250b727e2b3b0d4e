"""recstack.pipelines.config.schema: every validation error names the file, the full key
path and the problem; the docs show the example config and name every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from config_testdata import DEMO, ROOT, load_changed

from recstack.pipelines.config import (
    ConfigError,
    RunConfig,
    TrainerConfig,
)

CASES = {
    "unknown key": (
        lambda d: d["model"].update(mlp_hiden=[8]),
        "run.yaml: model.mlp_hiden: unknown key (did you mean 'mlp_hidden'?)",
    ),
    "unknown section": (
        lambda d: d.update(trainr=d.pop("trainer")),
        "run.yaml: trainr: unknown key (did you mean 'trainer'?)",
    ),
    "unknown key in a list item": (
        lambda d: d["tasks"][0].update(lable="click"),
        "run.yaml: tasks[0].lable: unknown key (did you mean 'label'?)",
    ),
    "unknown nested key": (
        lambda d: d["data"]["synthetic"]["dataset"].update(num_row=10),
        "run.yaml: data.synthetic.dataset.num_row: unknown key (did you mean 'num_rows'?)",
    ),
    "unknown optimizer argument": (
        lambda d: d["optimizers"]["dense"].update(weight_decai=0.1),
        "run.yaml: optimizers.dense.weight_decai: unknown key (did you mean 'weight_decay'?)",
    ),
    "unknown model": (
        lambda d: d["model"].update(type="dinn"),
        "run.yaml: model.type: unknown model 'dinn' (did you mean 'din'?)",
    ),
    "unknown optimizer": (
        lambda d: d["optimizers"]["sparse"].update(type="adamm"),
        "run.yaml: optimizers.sparse.type: unknown sparse optimizer 'adamm' (did you mean 'adam'?)",
    ),
    "wrong type": (
        lambda d: d["trainer"].update(epochs="two"),
        "run.yaml: trainer.epochs: expected an int, got 'two' (a string)",
    ),
    "wrong type in a list": (
        lambda d: d["model"].update(mlp_hidden=[64, "wide"]),
        "run.yaml: model.mlp_hidden[1]: expected an int, got 'wide' (a string)",
    ),
    "a mapping for a list": (
        lambda d: d.update(tables={"item": 16}),
        "run.yaml: tables: expected a list of mappings, got a mapping",
    ),
    "wrong choice": (
        lambda d: d["trainer"].update(precision="bf61"),
        "run.yaml: trainer.precision: expected one of 'auto', 'bf16', 'fp16', 'fp32', got "
        "'bf61' (a string) (did you mean 'bf16'?)",
    ),
    "a bool for an int": (
        lambda d: d["trainer"].update(log_every=True),
        "run.yaml: trainer.log_every: expected an int, got True (a bool)",
    ),
    "out of range": (
        lambda d: d["data"]["train"].update(batch_size=0),
        "run.yaml: data.train.batch_size: must be >= 1, got 0",
    ),
    "missing key": (
        lambda d: d["model"].pop("item_feature"),
        "run.yaml: model.item_feature: required key is missing",
    ),
    "missing section": (
        lambda d: d.pop("tables"),
        "run.yaml: tables: required key is missing",
    ),
    "missing key in a list item": (
        lambda d: d["tables"][0].pop("dim"),
        "run.yaml: tables[0].dim: required key is missing",
    ),
    "missing checkpoint dir": (
        lambda d: d["checkpoint"].pop("dir"),
        "run.yaml: checkpoint.dir: required key is missing",
    ),
    "bad feature op": (
        lambda d: d["features"]["features"][4]["ops"][0].update(op="Hsh"),
        "run.yaml: features.features: feature 'user' (features[4]), op 0: unknown op 'Hsh' "
        "(did you mean 'Hash'?)",
    ),
    "bad column kind": (
        lambda d: d["features"]["schema"].update(user_id="str"),
        "run.yaml: features.schema.user_id: unknown column kind 'str' (did you mean 'string'?)",
    ),
    "a table no feature reads": (
        lambda d: d["embedding_features"].pop(),
        "run.yaml: embedding_features: TableConfig 'ctx_3': no feature reads this table",
    ),
    "a task the model has not": (
        lambda d: d["tasks"].append({"name": "cvr"}),
        "run.yaml: tasks: the din model has one output; give one task",
    ),
    "conflicting checkpoint settings": (
        lambda d: (d["trainer"].update(checkpoint_every=5), d["checkpoint"].update(every=7)),
        "run.yaml: checkpoint.every: 7 differs from trainer.checkpoint_every: 5",
    ),
    "unknown schedule": (
        lambda d: d.update(schedule={"type": "cosin"}),
        "run.yaml: schedule.type: unknown schedule 'cosin' (did you mean 'cosine'?)",
    ),
    "a decay without a length": (
        lambda d: d.update(schedule={"type": "cosine"}),
        "run.yaml: schedule.total_steps: required key is missing",
    ),
    "a torch scheduler's missing argument": (
        lambda d: d.update(schedule={"type": "StepLR", "gamma": 0.5}),
        "run.yaml: schedule.step_size: required key is missing (StepLR)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_file_key_and_problem(tmp_path: Path, case: str) -> None:
    change, message = CASES[case]
    with pytest.raises(ConfigError) as info:
        load_changed(tmp_path, change)
    assert str(info.value).startswith(str(tmp_path / message.split(": ", 1)[0])), str(info.value)
    assert message.split(": ", 1)[1] in str(info.value)
    assert info.value.file == str(tmp_path / "run.yaml")


DOCS = ROOT / "docs" / "pipelines" / "config.md"


def test_the_docs_show_the_example_config_in_full() -> None:
    text = DOCS.read_text()
    start = text.index("```yaml\n", text.index("## The example in full")) + len("```yaml\n")
    assert text[start : text.index("```", start)] == DEMO.read_text()


def test_the_docs_name_every_key() -> None:
    import dataclasses

    from recstack.pipelines.config import (
        CheckpointConfig,
        DataConfig,
        EarlyStoppingConfig,
        FeaturesConfig,
        LoggingConfig,
        OnlineConfig,
        ReaderConfig,
        StageConfig,
        StreamConfig,
        SyntheticData,
    )
    from recstack.pipelines.config.fields import file_key

    text = DOCS.read_text()
    sections = [RunConfig, DataConfig, ReaderConfig, StreamConfig, SyntheticData]
    sections += [FeaturesConfig, TrainerConfig, StageConfig, CheckpointConfig, LoggingConfig]
    sections += [EarlyStoppingConfig, OnlineConfig]

    def named(key: str) -> bool:  # as `key` or with its section, `logging.key`
        return re.search(rf"`([a-z_]+\.)*{key}`", text) is not None

    missing = [
        f"{cls.__name__}.{file_key(f)}"
        for cls in sections
        for f in dataclasses.fields(cls)
        if not f.metadata.get("internal") and not named(file_key(f))
    ]
    assert missing == []
    for key in ("linear_warmup_steps", "total_steps", "min_factor"):
        assert f"`{key}`" in text
