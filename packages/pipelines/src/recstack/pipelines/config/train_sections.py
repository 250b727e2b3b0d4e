"""The training side of a run: ``trainer``, ``stages``, ``checkpoint``, ``logging``,
``early_stopping`` and ``online``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recstack.pipelines.callbacks.early_stopping import Mode
from recstack.pipelines.config.data_sections import ReaderConfig
from recstack.pipelines.config.errors import Invalid
from recstack.pipelines.config.fields import Where, at_least, parse_value
from recstack.pipelines.dense_parallel import DenseParallel
from recstack.pipelines.trainer import Pipeline, Precision

__all__ = [
    "CheckpointConfig",
    "EarlyStoppingConfig",
    "LoggingConfig",
    "OnlineConfig",
    "StageConfig",
    "TrainerConfig",
]


@dataclass(frozen=True)
class TrainerConfig:
    """The :class:`~recstack.pipelines.Trainer`'s keyword arguments that are plain
    values (the ``trainer`` section); see the Trainer for each.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None``: CUDA when available.
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"`` for the dense side.
        epochs: passes over the training data.
        max_steps: stop after this many optimizer steps.
        grad_accumulation: batches per optimizer step.
        clip_grad_norm: clip the dense gradients' global norm to this.
        eval_every: evaluate every this many steps (and at the end).
        eval_batches: evaluate on at most this many batches.
        checkpoint_every: write a checkpoint every this many steps (or
            ``checkpoint.every``).
        async_checkpoints: write periodic checkpoints in the background (or
            ``checkpoint.async``).
        evict_every: run eviction every this many steps.
        evict_older_than: evict ids not seen in the last this many steps.
        evict_min_count: evict ids seen fewer than this many times.
        log_every: read the loss back every this many steps.
        rank_timeout: under torchrun, seconds a rank waits for the others before a step.
        pipeline: ``"ids"``: send the next batch's ids to their owners during each step;
            ``"semi-sync"``: also look it up before the step's sparse update.
        dense_parallel: under torchrun, ``"ddp"`` or ``"fsdp"`` (FSDP2) for the dense side.
    """

    device: str | None = None
    precision: Precision = "auto"
    epochs: int = 1
    max_steps: int | None = None
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    checkpoint_every: int | None = None
    async_checkpoints: bool | None = None
    evict_every: int | None = None
    evict_older_than: int | None = None
    evict_min_count: int | None = None
    log_every: int = 50
    rank_timeout: float = 1800.0
    pipeline: Pipeline = "off"
    dense_parallel: DenseParallel = "ddp"

    def __post_init__(self) -> None:
        at_least(
            self,
            1,
            "epochs",
            "max_steps",
            "grad_accumulation",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "evict_every",
            "evict_older_than",
            "evict_min_count",
            "log_every",
        )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise Invalid(f"must be > 0, got {self.clip_grad_norm}", "clip_grad_norm")
        if not self.rank_timeout > 0:
            raise Invalid(f"must be > 0 seconds, got {self.rank_timeout}", "rank_timeout")
        if self.evict_every and not (self.evict_older_than or self.evict_min_count):
            raise Invalid("needs evict_older_than and/or evict_min_count", "evict_every")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise Invalid(str(e), "device") from None


def _names(value: object, path: str, where: Where) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return parse_value(tuple[str, ...], value, path, where)


@dataclass(frozen=True)
class StageConfig:
    """One stage of a multi-stage run (an item of ``stages``); see
    :class:`~recstack.pipelines.Stage`.

    Args:
        name: the stage's name.
        train: its training reader; keys it leaves out come from ``data.train``.
        eval: its evaluation reader; keys it leaves out come from ``data.eval``
            (``None``: the run's evaluation data).
        epochs: passes over its training data.
        max_steps: end the stage after this many steps.
        dense_lr: the dense LR from this stage on.
        sparse_lr: the sparse LR from this stage on.
        freeze: glob patterns of parameter names not trained in this stage.
        train_embeddings: ``false`` freezes every embedding table.
    """

    name: str
    train: ReaderConfig | None = None
    eval: ReaderConfig | None = None
    epochs: int = 1
    max_steps: int | None = None
    dense_lr: float | None = None
    sparse_lr: float | None = None
    freeze: tuple[str, ...] = field(default=(), metadata={"parse": _names})
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("must be a non-empty string", "name")
        at_least(self, 1, "epochs", "max_steps")
        for key in ("dense_lr", "sparse_lr"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise Invalid(f"must be >= 0, got {value}", key)


@dataclass(frozen=True)
class CheckpointConfig:
    """The :class:`~recstack.saver.Checkpointer` (the ``checkpoint`` section).

    Args:
        dir: the checkpointer's root directory.
        keep_last: keep only the newest this many checkpoints (``None``: all).
        every: write a checkpoint every this many steps (the trainer's
            ``checkpoint_every``).
        async_: write periodic checkpoints in the background (key ``async``; the
            trainer's ``async_checkpoints``).
        part_bytes: about how many bytes of a table go in one part file.
        dense_file_bytes: the dense state's file size.
        threads: writer/reader threads (``None``: the CPU count, at most 16).
        max_in_flight: chunks a blocking save holds at once.
        rng: save and restore the random generator states.
        durable: fsync every file before the checkpoint counts as complete.
        progress: show a progress line (``None``: when stderr is a terminal).
    """

    dir: str
    keep_last: int | None = None
    every: int | None = None
    async_: bool | None = field(default=None, metadata={"key": "async"})
    part_bytes: int = 128 << 20
    dense_file_bytes: int = 1 << 30
    threads: int | None = None
    max_in_flight: int | None = None
    rng: bool = True
    durable: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        at_least(
            self,
            1,
            "keep_last",
            "every",
            "part_bytes",
            "dense_file_bytes",
            "threads",
            "max_in_flight",
        )


@dataclass(frozen=True)
class LoggingConfig:
    """Where training reports go (the ``logging`` section).

    Args:
        jsonl: a JSON-lines log file (:class:`~recstack.pipelines.JSONLLogger`).
        jsonl_every_step: log every step, not only those with a loss.
        tensorboard: a TensorBoard log directory
            (:class:`~recstack.pipelines.TensorBoardLogger`).
        plot: a PNG of the training curves (:class:`~recstack.pipelines.PlotCurves`).
        plot_metrics: the evaluation metrics plotted (``None``: all).
        progress: show a progress bar (``None``: when stderr is a terminal).
    """

    jsonl: str | None = None
    jsonl_every_step: bool = False
    tensorboard: str | None = None
    plot: str | None = None
    plot_metrics: tuple[str, ...] | None = None
    progress: bool | None = None


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when an evaluation metric stops improving (the ``early_stopping`` section,
    :class:`~recstack.pipelines.EarlyStopping`).

    Args:
        monitor: the metric (``"ctr/auc"``).
        mode: ``"max"`` or ``"min"``.
        patience: evaluations without improvement before stopping.
        min_delta: the smallest change that counts as an improvement.
    """

    monitor: str
    mode: Mode = "max"
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        at_least(self, 1, "patience")


@dataclass(frozen=True)
class OnlineConfig:
    """Online learning (the ``online`` section; with ``data.stream``).

    Args:
        full_every: a full checkpoint every this many windows, deltas between.
        max_windows: stop after this many windows (``None``: when the stream ends).
    """

    full_every: int = 10
    max_windows: int | None = None

    def __post_init__(self) -> None:
        at_least(self, 1, "full_every", "max_windows")
