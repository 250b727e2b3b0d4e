"""Run configuration files: loading, validation errors, YAML/TOML, --set overrides, the
builder, and `recstack train` / `recstack eval` end to end."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from recstack.columnio import ColumnReader, StreamingReader
from recstack.core import kernels
from recstack.pipelines import Trainer
from recstack.pipelines.callbacks.jsonl import read_jsonl
from recstack.pipelines.config import (
    ConfigError,
    RunConfig,
    TrainerConfig,
    build_model,
    build_run,
    build_scheduler,
    eval_command,
    evaluate_checkpoint,
    format_table,
    load_config,
    lr_factor,
    parse_config,
    parse_override,
    read_document,
    train_command,
)
from recstack.pipelines.config.readers import SYNTHETIC_MARKER
from recstack.pipelines.models import DIN, DLRM, DeepFM
from recstack.sparse_optim import RowWiseAdagrad, SparseAdagrad, SparseAdam

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "configs" / "demo_din.yaml"
CRITEO = ROOT / "examples" / "configs" / "criteo_dlrm.yaml"
# The demo, shrunk: 3 files of 1000 rows (2 train, 1 evaluates), 8 steps of 250 rows.
TINY = [
    "data.synthetic.dataset.num_rows=3000",
    "data.synthetic.rows_per_file=1000",
    "data.train.batch_size=250",
    "trainer.device=cpu",
    "trainer.log_every=2",
    "logging.plot=null",
]


@pytest.fixture(autouse=True)
def small_cpu_setup():
    # The runs are under test, not the kernels (their own tests check each Triton kernel
    # against its torch reference); the interpreter would make every step seconds long.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kernels.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- examples


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


def test_the_demo_config_builds_the_demo_pipeline(tmp_path: Path, monkeypatch) -> None:
    from recstack.pipelines.demo import DemoConfig, build_model

    monkeypatch.chdir(tmp_path)
    run = build_run(load_config(DEMO, TINY))
    try:
        assert isinstance(run.model, DIN)
        torch.manual_seed(0)  # as run_demo does before building
        reference = build_model(DemoConfig(), torch.device("cpu"))

        def shapes(model: torch.nn.Module) -> dict[str, Any]:
            return {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)}

        assert shapes(run.model) == shapes(reference)
        for a, b in zip(run.model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b)  # built under the same seed
        assert type(run.sparse_optimizer) is SparseAdam
        assert run.sparse_optimizer.param_groups[0]["lr"] == 0.01
        assert type(run.dense_optimizer) is torch.optim.AdamW
        assert run.dense_optimizer.param_groups[0]["lr"] == 0.002
        assert run.trainer.log_every == 2 and run.trainer.epochs == 1
        assert [t.name for t in run.trainer.tasks] == ["ctr"]
        train, evaluation = run.data.train, run.data.eval
        assert isinstance(train, ColumnReader) and isinstance(evaluation, ColumnReader)
        assert train.batch_size == 250 and evaluation.batch_size == 8192
        assert (tmp_path / "runs/demo_din/data" / SYNTHETIC_MARKER).is_file()
        assert run.checkpointer is not None and run.checkpointer.keep_last == 2
        assert [type(c).__name__ for c in run.callbacks] == ["JSONLLogger"]
    finally:
        run.close()


def test_the_criteo_config_trains_on_converter_output(tmp_path: Path, monkeypatch) -> None:
    from recstack.pipelines.data import convert_criteo

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(200):
        ints = [str(int(v)) if i % 7 else "" for v in torch.randint(-2, 50, (13,), generator=g)]
        cats = [f"{int(v):08x}" if i % 5 else "" for v in torch.randint(0, 300, (26,), generator=g)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    convert_criteo(tmp_path / "train.txt", tmp_path / "data/criteo", rows_per_file=40)
    small = [
        "data.train.batch_size=16",
        "trainer.device=cpu",
        "trainer.max_steps=3",
        "trainer.eval_every=null",
        "model.bottom_hidden=[8]",
        "model.top_hidden=[8]",
        "checkpoint.every=null",
        "logging.progress=false",
    ]
    config = load_config(CRITEO, small)
    run = build_run(config)
    try:
        result = run.fit(resume=False)
    finally:
        run.close()
    assert result.step == 3 and result.metrics["samples"] == 40
    assert 0.0 <= result.metrics["ctr/auc"] <= 1.0
    # The warmup schedule ran: 3 of 500 warmup steps.
    assert run.dense_optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 4 / 500)


# ----------------------------------------------------------------------------- validation


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def demo_doc() -> dict[str, Any]:
    return read_document(DEMO)


def load_changed(tmp_path: Path, change) -> RunConfig:
    doc = demo_doc()
    change(doc)
    return load_config(write_yaml(tmp_path / "run.yaml", doc))


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


def test_values_an_optimizer_refuses_fail_the_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_changed(tmp_path, lambda d: d["optimizers"]["sparse"].update(lr=-1))
    with pytest.raises(ConfigError, match=r"run.yaml: optimizers.sparse: SparseAdam: lr must"):
        build_run(config)
    assert not (tmp_path / "runs").exists()  # checked before any data is written


def test_a_model_that_does_not_fit_its_features_fails_the_build(tmp_path: Path) -> None:
    config = load_changed(
        tmp_path, lambda d: d["model"].update(other_features=["user", "ctx_1", "ctx_9"])
    )
    with pytest.raises(ConfigError) as info:
        build_model(config, "cpu")
    assert str(info.value).startswith(
        f"{tmp_path / 'run.yaml'}: model: DINConfig.other_features[2]: no feature 'ctx_9'"
    )


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**demo_doc(), "trainer": {"epochs": 0}}, file="x.yaml")
    e = info.value
    assert (e.file, e.key, e.reason) == ("x.yaml", "trainer.epochs", "must be >= 1, got 0")
    assert str(e) == "x.yaml: trainer.epochs: must be >= 1, got 0"


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


# ----------------------------------------------------------------------------- YAML / TOML

SMALL_YAML = """
seed: 3
data:
  train:
    paths: [data/train]
    batch_size: 64
    shuffle: epoch
    columns: [label, user, item, {name: price, default: 0.0}]
  eval: {paths: data/eval.parquet}
features:
  schema: {user: int, item: int, price: float, label: float}
  features:
    - {name: user, ops: [{op: Hash, buckets: 1000}]}
    - {name: item}
    - {name: price, ops: [{op: Log1p}]}
tables:
  - {name: user, dim: 8, initializer: {kind: normal, std: 0.01}}
  - {name: item, dim: 8, eviction: {policy: lru, max_rows: 100000}}
embedding_features:
  - {name: user, table: user}
  - {name: item, table: item, pooling: mean}
model: {type: deepfm, sparse_features: [user, item], dense_dim: 1, deep_hidden: [32, 16]}
tasks:
  - {name: click, label: label, metrics: [auc, logloss]}
optimizers:
  sparse: {type: adagrad, lr: 0.05}
  dense: {type: AdamW, lr: 1e-3, betas: [0.9, 0.98], weight_decay: 0.01}
schedule: {type: cosine, linear_warmup_steps: 10, min_factor: 0.1}
trainer: {max_steps: 100, precision: fp32, clip_grad_norm: 1.0, device: cpu}
checkpoint: {dir: ckpt, every: 50, async: true}
logging: {jsonl: log.jsonl}
"""

SMALL_TOML = """
seed = 3

[data.train]
paths = ["data/train"]
batch_size = 64
shuffle = "epoch"
columns = ["label", "user", "item", {name = "price", default = 0.0}]

[data.eval]
paths = "data/eval.parquet"

[features]
schema = {user = "int", item = "int", price = "float", label = "float"}

[[features.features]]
name = "user"
ops = [{op = "Hash", buckets = 1000}]

[[features.features]]
name = "item"

[[features.features]]
name = "price"
ops = [{op = "Log1p"}]

[[tables]]
name = "user"
dim = 8
initializer = {kind = "normal", std = 0.01}

[[tables]]
name = "item"
dim = 8
eviction = {policy = "lru", max_rows = 100000}

[[embedding_features]]
name = "user"
table = "user"

[[embedding_features]]
name = "item"
table = "item"
pooling = "mean"

[model]
type = "deepfm"
sparse_features = ["user", "item"]
dense_dim = 1
deep_hidden = [32, 16]

[[tasks]]
name = "click"
label = "label"
metrics = ["auc", "logloss"]

[optimizers.sparse]
type = "adagrad"
lr = 0.05

[optimizers.dense]
type = "AdamW"
lr = 1e-3
betas = [0.9, 0.98]
weight_decay = 0.01

[schedule]
type = "cosine"
linear_warmup_steps = 10
min_factor = 0.1

[trainer]
max_steps = 100
precision = "fp32"
clip_grad_norm = 1.0
device = "cpu"

[checkpoint]
dir = "ckpt"
every = 50
async = true

[logging]
jsonl = "log.jsonl"
"""


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


# ----------------------------------------------------------------------------- --set


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


# ----------------------------------------------------------------------------- schema


def test_the_trainer_section_is_the_trainers_keyword_arguments() -> None:
    params = inspect.signature(Trainer.__init__).parameters
    objects = {"self", "model", "train_data", "eval_data", "stages", "features", "tasks"}
    objects |= {"sparse_optimizer", "dense_optimizer", "lr_scheduler", "checkpointer"}
    objects |= {"callbacks", "progress"}  # progress: logging.progress
    plain = [p for p in params if p not in objects]
    fields = list(TrainerConfig.__dataclass_fields__)
    assert fields == plain
    for name in plain:
        default = TrainerConfig.__dataclass_fields__[name].default
        assert default == params[name].default or (name, default) == ("async_checkpoints", None)


def test_builtin_schedules() -> None:
    cosine = lr_factor("cosine", 4, 14, 0.1)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(9) == pytest.approx(0.55) and cosine(14) == pytest.approx(0.1)
    assert cosine(100) == pytest.approx(0.1)
    linear = lr_factor("linear", 0, 10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(20) == 0.0
    assert lr_factor("constant", 2, None)(1) == 1.0 and lr_factor("constant", 2, None)(9) == 1.0
    config = parse_config(demo_doc(), overrides=["schedule.type=cosine", "trainer.max_steps=10"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = build_scheduler(config.schedule, opt, config.trainer.max_steps)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5)
    json.dumps(sched.state_dict())  # checkpoints keep it as JSON
    config = parse_config(demo_doc(), overrides=["schedule.type=StepLR", "schedule.step_size=2"])
    assert type(build_scheduler(config.schedule, opt, None)).__name__ == "StepLR"


def test_format_table() -> None:
    text = format_table([["auc", 0.712345], ["samples", 1000]], ["metric", "value"])
    assert text.splitlines() == [
        "| metric | value |",
        "| --- | ---: |",
        "| auc | 0.7123 |",
        "| samples | 1,000 |",
    ]


# ----------------------------------------------------------------------------- stages, online


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recstack.columnio import SyntheticCTRConfig, write_synthetic_ctr

    root = tmp_path_factory.mktemp("small")
    cfg = SyntheticCTRConfig(
        num_rows=600, num_dense=2, num_sparse=3, vocab_size=50, seq_mean_len=0, string_ids=0
    )
    write_synthetic_ctr(root, cfg, rows_per_file=200, compute_best_auc=False)
    return root


def small_doc(data: Path, ckpt: Path) -> dict[str, Any]:
    sparse = [f"sparse_{i}" for i in range(3)]
    return {
        "data": {"train": {"paths": str(data), "batch_size": 50}},
        "features": {
            "schema": {**{s: "int" for s in sparse}, "dense_0": "float", "dense_1": "float"},
            "features": [{"name": s} for s in [*sparse, "dense_0", "dense_1"]],
        },
        "tables": [{"name": s, "dim": 4} for s in sparse],
        "embedding_features": [{"name": s, "table": s} for s in sparse],
        "model": {
            "type": "dlrm",
            "sparse_features": sparse,
            "dense_dim": 2,
            "bottom_hidden": [8],
            "top_hidden": [8],
        },  # fmt: skip
        "optimizers": {"sparse": {"type": "adagrad"}, "dense": {"type": "adam", "lr": 0.01}},
        "trainer": {"device": "cpu", "log_every": 1},
        "checkpoint": {"dir": str(ckpt)},
    }


def test_stages_inherit_the_training_reader(small_data: Path, tmp_path: Path) -> None:
    doc = small_doc(small_data, tmp_path / "ck")
    doc["data"]["eval"] = {"paths": str(small_data / "part-00002.parquet")}
    doc["stages"] = [
        {"name": "warmup", "max_steps": 2, "freeze": "top.*", "train_embeddings": False},
        {"name": "main", "train": {"batch_size": 25}, "dense_lr": 0.001, "sparse_lr": 0.1},
    ]
    config = parse_config(doc)
    run = build_run(config)
    try:
        stages = run.trainer.stages
        assert [s.name for s in stages] == ["warmup", "main"]
        assert stages[0].train_data.batch_size == 50 and stages[1].train_data.batch_size == 25
        assert stages[0].freeze == ("top.*",) and not stages[0].train_embeddings
        assert stages[1].dense_lr == 0.001 and stages[1].sparse_lr == 0.1
        result = run.fit(resume=False)
    finally:
        run.close()
    assert result.step == 2 + 600 // 25 and "label/auc" in result.metrics
    assert isinstance(run.model, DLRM)


def test_online_config_runs_fit_online(small_data: Path, tmp_path: Path, capsys) -> None:
    doc = small_doc(small_data, tmp_path / "ck")
    doc["data"] = {
        "stream": {
            "source": str(small_data),
            "batch_size": 100,
            "window_files": 1,
            "poll_interval": 0.01,
            "idle_timeout": 0.3,
        },  # fmt: skip
    }
    doc["online"] = {"full_every": 2}
    write_yaml(tmp_path / "online.yaml", doc)
    assert isinstance(build_run(load_config(tmp_path / "online.yaml")).data.train, StreamingReader)
    assert train_command(tmp_path / "online.yaml", resume=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == "| window | rows | step | label/auc | label/calibration | label/logloss | label/ne |"
    )
    assert [line.split(" | ")[1:3] for line in out[2:5]] == [
        ["200", "2"],
        ["200", "4"],
        ["200", "6"],
    ]
    assert "3 window(s), 6 steps" in out[6]
    with pytest.raises(ConfigError, match="stages do not apply to online learning"):
        parse_config({**doc, "stages": [{"name": "a"}]})


# ----------------------------------------------------------------------------- commands


def test_train_then_eval_gives_the_trainers_auc(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert train_command(DEMO, TINY, resume=False) == 0
    out = capsys.readouterr().out
    assert "| steps | 8 |" in out and "| ctr/auc |" in out
    final = [r for r in read_jsonl("runs/demo_din/log.jsonl") if r["event"] == "eval"][-1]
    assert final["step"] == 8
    checkpoint = tmp_path / "runs/demo_din/checkpoints/step-000000000008"
    assert f"checkpoint: runs/demo_din/checkpoints/{checkpoint.name}" in out

    # The checkpoint reloaded into a model built from the config scores exactly the same.
    ev = evaluate_checkpoint(load_config(DEMO, TINY), checkpoint)
    assert ev.step == 8 and ev.metrics["ctr/auc"] == final["ctr/auc"]
    assert ev.metrics["ctr/logloss"] == final["ctr/logloss"]
    assert eval_command(DEMO, "runs/demo_din/checkpoints", TINY) == 0  # the root: latest
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint: {checkpoint.relative_to(tmp_path)} (step 8)")
    assert f"| ctr/auc | {final['ctr/auc']:.4f} |" in out

    # Training again resumes from the checkpoint: nothing left to do.
    assert train_command(DEMO, TINY) == 0
    assert "| resumed from step | 8 |" in capsys.readouterr().out


def test_commands_take_no_overrides_as_none(tmp_path: Path, capsys) -> None:
    (tmp_path / "run.yaml").write_text(SMALL_YAML.replace("type: deepfm", "type: dfm"))
    assert train_command(tmp_path / "run.yaml", None) == 2  # argparse's append default
    assert "model.type: unknown model 'dfm' (did you mean" in capsys.readouterr().err


def test_commands_report_errors(tmp_path: Path, capsys) -> None:
    assert train_command(DEMO, ["trainer.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {DEMO}: trainer.epoch: unknown key (did you mean 'epochs'?)")
    assert eval_command(DEMO, tmp_path / "nowhere", TINY) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_command(DEMO, tmp_path / "empty", TINY) == 1
    assert "not a checkpoint nor a root" in capsys.readouterr().err


def test_config_without_a_file_name_errors_without_one() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"data": {}})
    assert str(info.value) == "tables: required key is missing"


# ----------------------------------------------------------------------------- docs

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
