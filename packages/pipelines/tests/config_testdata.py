"""Run configurations shared by the config tests: the example files, a small config in
YAML and TOML, and helpers that write and change them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from recstack.pipelines.config import (
    RunConfig,
    load_config,
    read_document,
)

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


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def demo_doc() -> dict[str, Any]:
    return read_document(DEMO)


def load_changed(tmp_path: Path, change) -> RunConfig:
    doc = demo_doc()
    change(doc)
    return load_config(write_yaml(tmp_path / "run.yaml", doc))


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
