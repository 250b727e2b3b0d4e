"""``recstack demo``: a whole run on generated data, from Parquet files to a reloaded model.

It writes a synthetic click data set whose best possible AUC is known (ColumnIO's
generator draws every label from a known click probability), trains a DIN model with
dynamic embedding tables, sparse Adam and dense AdamW, evaluates it, saves a checkpoint,
loads the checkpoint into a freshly built model, evaluates that one too (the same AUC),
exports the model for serving, and prints the AUC against the best possible.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq
import torch

from recstack.columnio import ColumnReader, SyntheticCTRConfig, write_synthetic_ctr
from recstack.columnio.synthetic import METADATA_KEY
from recstack.embedding_engine import FeatureConfig, TableConfig
from recstack.feature_engine import Feature, FeatureEngine, Hash, Truncate
from recstack.pipelines.callbacks import JSONLLogger, PlotCurves, ProgressBar
from recstack.pipelines.models import DIN, DINConfig
from recstack.pipelines.tasks import Task
from recstack.pipelines.trainer import Trainer
from recstack.saver import Checkpointer
from recstack.sparse_optim import SparseAdam

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; the defaults finish in a few minutes on a 2-core CPU.

    Args:
        train_rows: training rows generated.
        eval_rows: evaluation rows generated (a separate file of the same data set).
        batch_size: rows per training step.
        epochs: passes over the training rows.
        eval_every: evaluate every this many steps (and at the end).
        dim: embedding width.
        history_len: behaviour-history items kept per row (the most recent).
        sparse_lr: SparseAdam's learning rate for the embedding rows.
        dense_lr: AdamW's learning rate for the dense layers.
        seed: the data's and the model's seed.
        device: ``"cpu"``, ``"cuda"``; ``None`` takes the GPU when there is one.
    """

    train_rows: int = 600_000
    eval_rows: int = 100_000
    batch_size: int = 1024
    epochs: int = 1
    eval_every: int = 150
    dim: int = 16
    history_len: int = 30
    sparse_lr: float = 0.01
    dense_lr: float = 0.002
    seed: int = 0
    device: str | None = None

    def data_config(self) -> SyntheticCTRConfig:
        """The generated data set: 4 dense columns, 4 id columns, a user id string and a
        behaviour history, click rate about 0.23."""
        return SyntheticCTRConfig(
            num_rows=self.train_rows + self.eval_rows,
            seed=self.seed,
            num_dense=4,
            num_sparse=4,
            vocab_size=20_000,
            seq_mean_len=10.0,
            seq_max_len=100,
            string_ids=1,
            string_vocab_size=5_000,
            signal_columns=2,
        )


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        auc: the trained model's AUC on the evaluation rows.
        reloaded_auc: the AUC of a fresh model loaded from the checkpoint.
        best_auc: the best AUC any model can reach on these rows (from the known click
            probabilities).
        metrics: every evaluation metric of the trained model.
        steps: optimizer steps taken.
        train_seconds: wall time of training.
        samples_per_second: training throughput.
        checkpoint: the checkpoint directory.
        serving: the exported serving directory.
        out: the demo's working directory.
    """

    auc: float
    reloaded_auc: float
    best_auc: float
    metrics: dict[str, float]
    steps: int
    train_seconds: float
    samples_per_second: float
    checkpoint: Path
    serving: Path
    out: Path


def _best_auc(path: str) -> float:
    meta = pq.read_schema(path).metadata or {}
    info = json.loads(meta[METADATA_KEY])
    return float(info["best_auc"])


def _features(config: DemoConfig) -> tuple[FeatureEngine, dict[str, str]]:
    items = [f"sparse_{i}" for i in range(4)]
    features = [
        Feature("item", "sparse_0"),
        *(Feature(f"ctx_{i}", c) for i, c in enumerate(items[1:], start=1)),
        Feature("user", "user_id", [Hash()]),  # strings -> full-range int64 ids
        Feature("history", "history", [Truncate(config.history_len)]),  # the most recent
        *(Feature(f"dense_{i}", f"dense_{i}") for i in range(4)),
    ]
    schema = {f"sparse_{i}": "int" for i in range(4)}
    schema |= {f"dense_{i}": "float" for i in range(4)}
    schema |= {"user_id": "string", "history": "int_list"}
    return FeatureEngine(features, schema), schema


def build_model(config: DemoConfig, device: torch.device) -> DIN:
    """The demo's DIN: one ``item`` table shared by the candidate and the history, one
    table per other id column, the user table; Dice MLP over the attention output."""
    d = config.dim
    tables = [TableConfig("item", dim=d), TableConfig("user", dim=d)]
    tables += [TableConfig(f"ctx_{i}", dim=d) for i in range(1, 4)]
    features = [
        FeatureConfig("item", "item"),
        FeatureConfig("history", "item", pooling="none", max_len=config.history_len),
        FeatureConfig("user", "user"),
        *(FeatureConfig(f"ctx_{i}", f"ctx_{i}") for i in range(1, 4)),
    ]
    din = DINConfig(
        item_feature="item",
        history_feature="history",
        other_features=["user", "ctx_1", "ctx_2", "ctx_3"],
        dense_dim=4,
        attention_hidden=(32, 16),
        mlp_hidden=(64, 32),
    )
    return DIN(din, tables, features, device=device)


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def run_demo(
    config: DemoConfig | None = None,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo; return its numbers.

    Args:
        config: the knobs (default :class:`DemoConfig`).
        out: the working directory for the data, checkpoints, log and plot (created;
            default a fresh temporary directory, kept after the run).
        progress: show the training progress bar (``None``: when stderr is a terminal).
        stream: where the report goes (default stdout).

    Raises:
        RuntimeError: the reloaded model's AUC differs from the trained one's.
    """
    config = config or DemoConfig()
    stream = stream or sys.stdout
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="recstack-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)

    # 1. data: the evaluation rows are the last file of the same generated data set.
    t0 = time.perf_counter()
    data_cfg = config.data_config()
    info = write_synthetic_ctr(
        root / "data", data_cfg, rows_per_file=config.eval_rows, overwrite=True
    )
    parts = [str(p) for p in info.paths]
    train_files, eval_file = parts[:-1], parts[-1]
    best = _best_auc(eval_file)
    _say(stream, f"data: {config.train_rows:,} training + {config.eval_rows:,} evaluation "
                 f"rows in {root / 'data'} ({time.perf_counter() - t0:.1f} s); click rate "
                 f"{info.positive_rate:.3f}, best possible AUC {best:.4f}")  # fmt: skip

    # 2. the pipeline: reader -> features -> DIN, sparse Adam for rows, AdamW for layers.
    engine, schema = _features(config)
    columns = sorted(schema) + ["label"]
    train = ColumnReader(
        train_files, columns, config.batch_size, shuffle="window", seed=config.seed,
        shuffle_buffer=config.train_rows, drop_last=True,  # one window: a full shuffle
    )  # fmt: skip
    evaluation = ColumnReader([eval_file], columns, 8192)
    model = build_model(config, device)
    sparse = SparseAdam(model.embeddings.sparse_parameters(), lr=config.sparse_lr)
    dense = torch.optim.AdamW(model.parameters(), lr=config.dense_lr)
    checkpointer = Checkpointer(root / "checkpoints", keep_last=2, progress=False)
    for old in checkpointer.steps():  # a demo rerun in the same directory starts over
        shutil.rmtree(checkpointer.path(old))
    callbacks: list[Any] = [JSONLLogger(root / "log.jsonl"), PlotCurves(root / "curves.png")]
    if progress or (progress is None and sys.stderr.isatty()):
        callbacks.insert(0, ProgressBar())
    trainer = Trainer(
        model, train, evaluation, features=engine, tasks=[Task("ctr", label="label")],
        sparse_optimizer=sparse, dense_optimizer=dense, checkpointer=checkpointer,
        device=device, epochs=config.epochs, log_every=10, callbacks=callbacks,
        eval_every=config.eval_every,
        progress=False,
    )  # fmt: skip
    _say(stream, f"training DIN on {device} ({config.epochs} epoch(s), batch "
                 f"{config.batch_size}, {sum(p.numel() for p in model.parameters()):,} dense "
                 "parameters, dynamic embedding tables)")  # fmt: skip
    t1 = time.perf_counter()
    result = trainer.fit(resume=False)
    seconds = time.perf_counter() - t1
    auc = result.metrics["ctr/auc"]
    assert result.checkpoint is not None

    # 3. reload the checkpoint into a model built from scratch and evaluate it again.
    fresh = build_model(config, device)
    reloaded = Trainer(
        fresh, train, evaluation, features=engine, tasks=[Task("ctr", label="label")],
        sparse_optimizer=SparseAdam(fresh.embeddings.sparse_parameters(), lr=config.sparse_lr),
        dense_optimizer=torch.optim.AdamW(fresh.parameters(), lr=config.dense_lr),
        checkpointer=checkpointer, device=device, progress=False,
    )  # fmt: skip
    reloaded.restore()
    again = reloaded.evaluate()["ctr/auc"]
    if again != auc:
        raise RuntimeError(
            f"the model reloaded from {result.checkpoint} has AUC {again}, the trained one {auc}"
        )
    shutil.rmtree(root / "serving", ignore_errors=True)  # a rerun's export replaces the last
    serving = checkpointer.export(root / "serving", step=result.step, model=model)

    rate = result.samples / seconds if seconds > 0 else float("nan")
    lines = [
        "",
        "| | |",
        "| --- | ---: |",
        f"| AUC (trained) | {auc:.4f} |",
        f"| AUC (reloaded from the checkpoint) | {again:.4f} |",
        f"| best possible AUC | {best:.4f} |",
        f"| share of the best AUC's lift over 0.5 | {(auc - 0.5) / (best - 0.5):.1%} |",
        f"| log-loss | {result.metrics['ctr/logloss']:.4f} |",
        f"| calibration (predicted / observed CTR) | {result.metrics['ctr/calibration']:.3f} |",
        f"| steps | {result.step:,} |",
        f"| training time | {seconds:.1f} s ({rate:,.0f} samples/s) |",
        "",
        f"checkpoint: {result.checkpoint}",
        f"serving export: {serving}",
        f"log: {root / 'log.jsonl'}",
    ]
    if (root / "curves.png").exists():
        lines.append(f"training curves: {root / 'curves.png'}")
    _say(stream, "\n".join(lines))
    return DemoResult(
        auc=auc,
        reloaded_auc=again,
        best_auc=best,
        metrics=dict(result.metrics),
        steps=result.step,
        train_seconds=seconds,
        samples_per_second=rate,
        checkpoint=Path(result.checkpoint),
        serving=Path(serving),
        out=root,
    )
