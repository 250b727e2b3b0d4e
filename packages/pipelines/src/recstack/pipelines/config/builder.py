"""From a :class:`RunConfig` to the objects of a run: readers, the feature engine, the
model and its embedding collection, optimizers, schedule, checkpointer, callbacks and the
Trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recstack.embedding_engine import sparse_parameters
from recstack.feature_engine import FeatureEngine
from recstack.pipelines.callbacks import (
    Callback,
    EarlyStopping,
    JSONLLogger,
    PlotCurves,
    TensorBoardLogger,
)
from recstack.pipelines.config.data_sections import EVAL_INHERITS, ReaderConfig
from recstack.pipelines.config.errors import ConfigError
from recstack.pipelines.config.fields import section_arguments
from recstack.pipelines.config.readers import (
    build_reader,
    build_stream,
    default_columns,
    ensure_synthetic,
)
from recstack.pipelines.config.schedule import build_scheduler
from recstack.pipelines.config.schema import RunConfig
from recstack.pipelines.launch import one_writer, rank_device
from recstack.pipelines.online import OnlineResult
from recstack.pipelines.stages import Stage
from recstack.pipelines.trainer import FitResult, Trainer
from recstack.saver import Checkpointer

__all__ = ["DataSources", "Run", "build_data", "build_model", "build_run", "run_device"]


def run_device(config: RunConfig) -> torch.device:
    """The run's device: ``trainer.device``, else CUDA when available, else CPU; under
    ``torchrun`` a CUDA device is this rank's GPU, ``cuda:LOCAL_RANK``.

    Args:
        config: the run.
    """
    name = config.trainer.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return rank_device(name)


def build_model(config: RunConfig, device: torch.device | str | None = None) -> nn.Module:
    """The model of ``config.model`` with its embedding collection, built under
    ``config.seed`` on ``device``.

    Args:
        config: the run.
        device: where it lives (default :func:`run_device`).

    Raises:
        ConfigError: the model config does not fit the embedding features (naming the
            file and ``model``).
    """
    device = run_device(config) if device is None else torch.device(device)
    torch.manual_seed(config.seed)
    cls = config.model.model_class()
    try:
        return cls(
            config.model.config,
            list(config.tables),
            list(config.embedding_features),
            device=device,
        )
    except ValueError as e:  # ModelConfigError and the collection's ConfigError
        raise ConfigError(str(e), file=config.file, key="model") from None


@dataclass
class DataSources:
    """The readers of a run.

    Attributes:
        train: the training reader (a ``ColumnReader``), or the stream (a
            ``StreamingReader``) of an online run; ``None`` with stages.
        eval: the evaluation reader, or ``None``.
        stages: each stage's ``(train, eval)`` readers (``eval`` ``None``: the run's).
    """

    train: Any = None
    eval: Any = None
    stages: list[tuple[Any, Any]] = field(default_factory=list)


def build_data(config: RunConfig, *, train: bool = True) -> DataSources:
    """The readers of ``config.data`` (and of its stages), writing the synthetic data
    set first when the config has one.

    Args:
        config: the run.
        train: build the training readers too (``False``: the evaluation reader only).
    """
    d = config.data
    train_files = eval_files = None
    if d.synthetic is not None:
        synthetic = d.synthetic
        train_files, eval_files = one_writer(lambda: ensure_synthetic(synthetic))
    columns = default_columns(config)
    out = DataSources()
    train_reader = d.train if d.train is not None else ReaderConfig()
    if d.eval is not None or eval_files:
        evaluation = d.eval if d.eval is not None else _eval_defaults(train_reader)
        out.eval = build_reader(evaluation, paths=eval_files, columns=columns, train=False)
    if not train:
        return out
    if d.stream is not None:
        out.train = build_stream(d.stream, columns=columns)
    elif config.stages is None:
        out.train = build_reader(train_reader, paths=train_files, columns=columns)
    for st in config.stages or ():
        reader = st.train if st.train is not None else train_reader
        stage_train = build_reader(reader, paths=train_files, columns=columns)
        stage_eval = None
        if st.eval is not None:
            stage_eval = build_reader(st.eval, paths=eval_files, columns=columns, train=False)
        out.stages.append((stage_train, stage_eval))
    return out


def _eval_defaults(train: ReaderConfig) -> ReaderConfig:
    return ReaderConfig(**{k: getattr(train, k) for k in EVAL_INHERITS})


@contextlib.contextmanager
def _at(config: RunConfig, key: str) -> Iterator[None]:
    """Report a value an optimizer or scheduler refuses as a ConfigError at ``key``."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e), file=config.file, key=key) from None


def _callbacks(config: RunConfig) -> list[Callback]:
    log = config.logging
    out: list[Callback] = []
    if log.jsonl is not None:
        out.append(JSONLLogger(log.jsonl, every_step=log.jsonl_every_step))
    if log.tensorboard is not None:
        out.append(TensorBoardLogger(log.tensorboard))
    if log.plot is not None:
        metrics = list(log.plot_metrics) if log.plot_metrics is not None else None
        out.append(PlotCurves(log.plot, metrics))
    es = config.early_stopping
    if es is not None:
        out.append(EarlyStopping(es.monitor, es.mode, es.patience, es.min_delta))
    return out


def _checkpointer(config: RunConfig) -> Checkpointer | None:
    c = config.checkpoint
    if c is None:
        return None
    # every and async are the trainer's checkpoint_every and async_checkpoints.
    return Checkpointer(c.dir, **section_arguments(c, exclude=("dir", "every", "async_")))


@dataclass
class Run:
    """Everything :func:`build_run` built; :meth:`fit` trains.

    Attributes:
        config: the configuration.
        model: the model (its collection is ``model.embeddings``).
        trainer: the Trainer.
        features: the feature engine, or ``None``.
        data: the readers.
        sparse_optimizer: the embedding rows' optimizer, or ``None``.
        dense_optimizer: the dense parameters' optimizer, or ``None``.
        lr_scheduler: the dense LR schedule, or ``None``.
        checkpointer: the checkpointer, or ``None``.
        callbacks: the callbacks given to the Trainer.
    """

    config: RunConfig
    model: nn.Module
    trainer: Trainer
    features: FeatureEngine | None
    data: DataSources
    sparse_optimizer: Any = None
    dense_optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    checkpointer: Checkpointer | None = None
    callbacks: list[Callback] = field(default_factory=list)

    def fit(self, *, resume: bool = True) -> FitResult | OnlineResult:
        """Train: ``Trainer.fit_online`` for a stream, else ``Trainer.fit``.

        Args:
            resume: continue from the checkpointer's latest checkpoint.
        """
        if self.config.is_online:
            online = self.config.online
            full_every = online.full_every if online is not None else 10
            max_windows = online.max_windows if online is not None else None
            return self.trainer.fit_online(
                full_every=full_every, max_windows=max_windows, resume=resume
            )
        return self.trainer.fit(resume=resume)

    def close(self) -> None:
        """Wait for a checkpoint in flight and stop the checkpointer's threads."""
        if self.checkpointer is not None:
            self.checkpointer.close()


def build_run(config: RunConfig) -> Run:
    """Build every object of the run ``config`` describes, as ``recstack demo`` wires
    them by hand: readers (and the synthetic data set), the feature engine, the model,
    the sparse optimizer over its tables' rows, the dense optimizer over its parameters,
    the schedule, the checkpointer, the callbacks and the Trainer (with its stages).

    Args:
        config: a checked configuration (:func:`load_config`).

    Raises:
        ConfigError: the model does not fit its embedding features.
    """
    device = run_device(config)
    engine = config.features.engine() if config.features is not None else None
    model = build_model(config, device)
    opt, t = config.optimizers, config.trainer
    sparse = dense = scheduler = None
    if opt.sparse is not None:
        with _at(config, "optimizers.sparse"):
            sparse = opt.sparse.build(list(sparse_parameters(model)))
    if opt.dense is not None:
        with _at(config, "optimizers.dense"):
            dense = opt.dense.build([p for p in model.parameters() if p.requires_grad])
    if config.schedule is not None and dense is not None:
        with _at(config, "schedule"):
            scheduler = build_scheduler(config.schedule, dense, t.max_steps)
    data = build_data(config)  # after the checks above: a bad config writes no data
    checkpointer = _checkpointer(config)
    callbacks = _callbacks(config)
    ck = config.checkpoint
    every = t.checkpoint_every if t.checkpoint_every is not None else (ck.every if ck else None)
    async_ = t.async_checkpoints
    if async_ is None:
        async_ = bool(ck.async_) if ck is not None and ck.async_ is not None else False
    stages = None
    if config.stages is not None:
        stages = [
            Stage(
                st.name,
                train_data=train,
                eval_data=evaluation,
                **section_arguments(st, exclude=("name", "train", "eval")),
            )
            for st, (train, evaluation) in zip(config.stages, data.stages, strict=True)
        ]
    trainer = Trainer(
        model,
        data.train,
        data.eval,
        stages=stages,
        features=engine,
        tasks=config.task_list,
        sparse_optimizer=sparse,
        dense_optimizer=dense,
        lr_scheduler=scheduler,
        checkpointer=checkpointer,
        device=device,
        checkpoint_every=every,
        async_checkpoints=async_,
        callbacks=callbacks,
        progress=config.logging.progress,
        **section_arguments(t, exclude=("device", "checkpoint_every", "async_checkpoints")),
    )
    return Run(
        config=config,
        model=model,
        trainer=trainer,
        features=engine,
        data=data,
        sparse_optimizer=sparse,
        dense_optimizer=dense,
        lr_scheduler=scheduler,
        checkpointer=checkpointer,
        callbacks=callbacks,
    )
