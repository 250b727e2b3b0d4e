"""The Trainer: data -> features -> model -> loss -> backward -> sparse and dense steps,
with evaluation, checkpoints, exact resume and callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import distributed as rdist
from recstack.core.checks import check_int
from recstack.embedding_engine import EmbeddingCollection, ShardedEmbeddingCollection
from recstack.pipelines.callbacks.base import Callback
from recstack.pipelines.choices import check_choice
from recstack.pipelines.dense_parallel import DenseParallel, data_parallel, shard_dense
from recstack.pipelines.evaluation import evaluate_model
from recstack.pipelines.id_prefetch import IdPrefetch
from recstack.pipelines.online import OnlineResult, run_online
from recstack.pipelines.rank_agreement import RankAgreement
from recstack.pipelines.signals import StopSignals
from recstack.pipelines.stages import Stage, frozen_parameters
from recstack.pipelines.stream import BatchStream
from recstack.pipelines.tasks import Task, batch_rows, compute_losses, predictions_of
from recstack.saver import Checkpointer, PerRank

__all__ = ["FitResult", "Precision", "Trainer"]

#: The dense side's autocast: ``"auto"`` (bf16 on a GPU that has it, else none), ``"bf16"``,
#: ``"fp16"`` or ``"fp32"`` (none).
Precision = Literal["auto", "bf16", "fp16", "fp32"]
#: ``"ids"``: each step sends the next batch's ids to their owners during its backward;
#: ``"semi-sync"``: it also looks the next batch up before its own sparse update.
Pipeline = Literal["off", "ids", "semi-sync"]
_STATE = "recstack.pipelines.Trainer"


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        step: optimizer steps taken in total (also before a resume).
        epoch: completed epochs.
        samples: training rows seen in total.
        resumed_from: the checkpoint step the run resumed from, or ``None``.
        stopped_by: why it ended early: ``"SIGTERM"``, ``"SIGINT"``, ``"callback"``,
            ``"another rank"`` (under ``torchrun``: a signal or callback on another rank)
            (a callback set ``should_stop``), or ``None`` when it ran to the end.
        metrics: the last evaluation's metrics (``{}`` without evaluation).
        checkpoint: the directory of the last checkpoint written, or ``None``.
        seconds: wall time of this call.
    """

    step: int
    epoch: int
    samples: int
    resumed_from: int | None = None
    stopped_by: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0


def _positive_or_none(value: int | None, name: str) -> int | None:
    return None if value is None else check_int(value, f"Trainer: {name}", minimum=1)


class Trainer:
    """Train a model on batches from a data source, like the loops users write by hand.

    Each optimizer step reads ``grad_accumulation`` batches (moved to ``device``), runs
    ``features`` (a ``FeatureEngine``) on each, calls ``model(inputs)``, computes the
    tasks' losses, back-propagates, then steps the sparse optimizer (embedding rows) and
    the dense optimizer (the ``nn.Parameter``\\ s), and the LR schedule. The dense side
    runs under bf16 autocast on GPUs that have it (``precision="auto"``); embedding
    tables stay fp32.

    Args:
        model: an ``nn.Module`` whose ``forward(inputs)`` takes the (feature-engine
            processed) batch dict and returns logits ``[B]`` / ``[B, 1]``, or a dict of
            them by task name. Its ``EmbeddingCollection``\\ s are found by walking it.
        train_data: an iterable of batch dicts (a ``ColumnReader`` resumes exactly).
        eval_data: batches for :meth:`evaluate` (``None``: no evaluation).
        stages: run these :class:`Stage` objects one after another instead of ``train_data``
            for ``epochs`` (each brings its data, length, learning rates and frozen parts).
        features: a callable applied to each batch on the device (a ``FeatureEngine``);
            ``None`` passes batches unchanged.
        tasks: the tasks; default one task ``"label"`` trained on column ``"label"``. A
            ``Task(name, output="loss", weight=w)`` takes the scalar loss the model
            computed itself under ``name`` in its dict (a sampled softmax over a user's
            next items, say) and adds ``w * value`` to the total; it reads no label, and
            evaluation reports its mean as ``"<name>/loss"``.
        sparse_optimizer: a ``recstack.sparse_optim`` optimizer over the model's
            ``ec.sparse_parameters()`` (``None``: the tables are not trained).
        dense_optimizer: a ``torch.optim`` optimizer over the dense parameters.
        lr_scheduler: stepped after every optimizer step (torch's LR schedulers).
        checkpointer: a ``recstack.saver.Checkpointer``; checkpoints are written every
            ``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT, and
            :meth:`fit` resumes from its latest one.
        device: where the model and batches live; default CUDA when available.
        precision: ``"bf16"`` / ``"fp16"`` autocast for the dense side, ``"fp32"`` none,
            ``"auto"``: bf16 on a GPU that supports it, else fp32.
        epochs: passes over ``train_data`` (with ``stages``: each stage's own).
        max_steps: stop after this many optimizer steps (``None``: epochs decide; with
            ``stages``: each stage's own).
        grad_accumulation: batches per optimizer step (losses are averaged).
        clip_grad_norm: clip the dense gradients' global norm to this (``None``: no
            clipping).
        eval_every: evaluate every this many steps (and at the end).
        eval_batches: evaluate on at most this many batches (``None``: all).
        checkpoint_every: write a checkpoint every this many steps.
        async_checkpoints: write periodic checkpoints in the background
            (``save(blocking=False)``); the last one is always waited for.
        evict_every: run eviction every this many steps on every table that has ids
            to evict under ``evict_older_than`` / ``evict_min_count``.
        evict_older_than: evict ids not seen in the last this many steps.
        evict_min_count: evict ids seen fewer than this many times.
        log_every: read the loss back from the device every this many steps (the only
            per-step host sync).
        callbacks: :class:`Callback` objects, called in order.
        progress: show a progress bar (``None``: when stderr is a terminal).
        rank_timeout: under ``torchrun`` (several ranks), seconds a rank waits for the
            others before each step; past it, or at once when another rank's process is
            gone, :meth:`fit` raises :class:`~recstack.pipelines.rank_agreement.RankLostError`
            naming the rank and step instead of hanging. Before each step the ranks agree
            whether all have a full step of data (the epoch ends for all when one runs out:
            uneven shares never hang) and whether any was told to stop.
        pipeline: ``"ids"``: right after each step's (last) forward, take the next batch,
            run the feature step on it and send its ids to the ranks owning their rows
            (:meth:`ShardedEmbeddingCollection.prefetch
            <recstack.embedding_engine.ShardedEmbeddingCollection.prefetch>`), so that
            exchange overlaps this step's backward and optimizer step; the lookups stay
            in the next forward, so training is exactly as without it.
            ``"semi-sync"``: as ``"ids"``, and after the backward the next batch is also
            looked up (:meth:`ShardedEmbeddingCollection.lookahead
            <recstack.embedding_engine.ShardedEmbeddingCollection.lookahead>`) before
            this step's sparse update, so its rows come back while the optimizer steps;
            rows both batches touch are read one update early. ``"off"``: each
            forward sends its own ids. Only sharded tables have ids to send. Tables with
            an ``hbm_budget`` (tiered: part of their rows in host memory) get the next
            batch's ids after each forward whatever the pipeline
            (:meth:`EmbeddingCollection.prefetch
            <recstack.embedding_engine.EmbeddingCollection.prefetch>`; sharded ones
            through their own ``prefetch``, each owner promoting the rows it serves), to
            bring its rows to the GPU ahead of its forward; that changes no result either.
        dense_parallel: under ``torchrun``, how the dense parameters spread over the
            ranks: ``"ddp"`` (``DistributedDataParallel``: each rank holds them all and
            their gradients are averaged) or ``"fsdp"`` (FSDP2's ``fully_shard``: each
            rank holds ``1/W`` of every parameter, gradient and optimizer state, and
            each block is gathered for its forward and backward; see
            :mod:`recstack.pipelines.dense_parallel`). With ``"fsdp"`` the
            ``dense_optimizer`` is rebound to the sharded parameters, so make it on the
            model's parameters before the Trainer and without state; checkpoints hold
            the whole tensors either way, loadable on any number of ranks.

    Under ``torchrun`` the dense parameters train data parallel (DDP or FSDP2 averages
    their gradients) and the embedding tables must be sharded
    (:class:`~recstack.embedding_engine.ShardedEmbeddingCollection`), which then average
    their rows' gradients over the ranks too, so ``W`` ranks with batches of ``b`` rows
    train as one process with batches of ``W * b``. Each forward of a sharded collection (or
    of an FSDP2-sharded model) is a collective, so evaluation also runs the same number of
    batches on every rank: it ends on all when one rank's evaluation data runs out. Each
    step's logs then carry the tables' load report for this rank: ``exchange/keys_sent``,
    ``exchange/keys_served`` (the lookups it did as an owner) and ``exchange/bytes_sent``
    (ids, rows, gradients).

    Tables with an ``hbm_budget`` (tiered) add, on each ``log_every`` step and for this
    rank, what they did since the previous one: ``tier/<table>/hit_rate`` (the share of
    looked-up rows found in the GPU tier), ``tier/<table>/promoted`` (rows moved to it) and
    ``tier/<table>/host_bytes`` (bytes moved between the tiers, both ways).

    Evaluation puts the model in ``eval()`` mode under ``torch.no_grad()``: in training
    mode a forward inserts unseen ids into the tables and advances their step even under
    ``no_grad``, so evaluating in training mode would change the model.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Iterable[Any] | None = None,
        eval_data: Iterable[Any] | None = None,
        *,
        stages: Sequence[Stage] | None = None,
        features: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        tasks: Sequence[Task] | None = None,
        sparse_optimizer: Any = None,
        dense_optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        checkpointer: Checkpointer | None = None,
        device: torch.device | str | None = None,
        precision: Precision = "auto",
        epochs: int = 1,
        max_steps: int | None = None,
        grad_accumulation: int = 1,
        clip_grad_norm: float | None = None,
        eval_every: int | None = None,
        eval_batches: int | None = None,
        checkpoint_every: int | None = None,
        async_checkpoints: bool = False,
        evict_every: int | None = None,
        evict_older_than: int | None = None,
        evict_min_count: int | None = None,
        log_every: int = 50,
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
        rank_timeout: float = 1800.0,
        pipeline: Pipeline = "off",
        dense_parallel: DenseParallel = "ddp",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be an nn.Module, got {type(model).__name__}")
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model.to(self.device)
        self.tasks = list(tasks) if tasks is not None else [Task("label")]
        if not self.tasks:
            raise ValueError("Trainer: tasks must name at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"Trainer: task names must differ, got {names}")
        self.features = features
        self.sparse_optimizer = sparse_optimizer
        self.dense_optimizer = dense_optimizer
        self.lr_scheduler = lr_scheduler
        self.checkpointer = checkpointer
        self.precision = self._autocast_dtype(precision)
        self.epochs = check_int(epochs, "Trainer: epochs", minimum=1)
        self.max_steps = _positive_or_none(max_steps, "max_steps")
        self.grad_accumulation = check_int(
            grad_accumulation, "Trainer: grad_accumulation", minimum=1
        )
        if clip_grad_norm is not None and not (
            isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0
        ):
            raise ValueError(f"Trainer: clip_grad_norm must be > 0, got {clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        self.eval_every = _positive_or_none(eval_every, "eval_every")
        self.eval_batches = _positive_or_none(eval_batches, "eval_batches")
        self.checkpoint_every = _positive_or_none(checkpoint_every, "checkpoint_every")
        if checkpoint_every is not None and checkpointer is None:
            raise ValueError("Trainer: checkpoint_every needs a checkpointer")
        self.async_checkpoints = bool(async_checkpoints)
        self.evict_every = _positive_or_none(evict_every, "evict_every")
        self.evict_older_than = _positive_or_none(evict_older_than, "evict_older_than")
        self.evict_min_count = _positive_or_none(evict_min_count, "evict_min_count")
        if self.evict_every and not (self.evict_older_than or self.evict_min_count):
            raise ValueError("Trainer: evict_every needs evict_older_than and/or evict_min_count")
        self.log_every = check_int(log_every, "Trainer: log_every", minimum=1)
        self.callbacks = list(callbacks)
        if progress is None:
            import sys

            progress = sys.stderr.isatty()
        if progress and not any(type(c).__name__ == "ProgressBar" for c in self.callbacks):
            from recstack.pipelines.callbacks.progress import ProgressBar

            self.callbacks.insert(0, ProgressBar())
        if (train_data is None) == (stages is None):
            raise ValueError("Trainer: give either train_data or stages")
        self.stages: list[Stage] = (
            list(stages)
            if stages is not None
            else [
                Stage("train", train_data, eval_data, self.epochs, self.max_steps)  # type: ignore[arg-type]
            ]
        )
        if not self.stages:
            raise ValueError("Trainer: stages is empty")
        names = [st.name for st in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Trainer: stage names must differ, got {names}")
        self._staged = stages is not None
        self.default_eval_data = eval_data
        self.eval_data = eval_data
        self.train_stream = BatchStream(self.stages[0].train_data, self.device)
        self._position = _Position(self)
        self.stage = 0
        self.stage_start_step = 0
        self._entered: int | None = None
        self._train_embeddings = True
        self.collections: list[EmbeddingCollection | ShardedEmbeddingCollection] = [
            m
            for m in self.model.modules()
            if isinstance(m, (EmbeddingCollection, ShardedEmbeddingCollection))
        ]
        check_choice(dense_parallel, "Trainer: dense_parallel", DenseParallel)
        self.dense_parallel = dense_parallel
        self._ddp = self._data_parallel()
        self.dense_parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not (isinstance(rank_timeout, (int, float)) and rank_timeout > 0):
            raise ValueError(f"Trainer: rank_timeout must be > 0 seconds, got {rank_timeout!r}")
        self.rank_timeout = float(rank_timeout)
        check_choice(pipeline, "Trainer: pipeline", Pipeline)
        self.pipeline = pipeline
        ahead: list[EmbeddingCollection | ShardedEmbeddingCollection] = []
        if pipeline != "off":
            ahead = [c for c in self.collections if isinstance(c, ShardedEmbeddingCollection)]
        ahead += [c for c in self.collections if c.tiered_tables and c not in ahead]
        self._prefetch = IdPrefetch(ahead) if ahead or pipeline != "off" else None
        self._ranks: RankAgreement | None = None  # made by fit() on every rank
        # Each tiered table's counts at the previous log step (see _tier_logs).
        self._tier_seen: dict[str, list[int]] = {}
        self._peer_stop = False
        self.step = 0
        self.epoch = 0
        self.samples = 0
        self.should_stop = False
        self.last_metrics: dict[str, float] = {}
        self.online_state: dict[str, Any] = {}
        self._loss_sum: torch.Tensor | None = None
        self._task_sums: dict[str, torch.Tensor] = {}
        self._loss_steps = 0

    # ------------------------------------------------------------------ setup helpers
    def _autocast_dtype(self, precision: Precision) -> torch.dtype | None:
        check_choice(precision, "Trainer: precision", Precision)
        if precision == "auto":
            cuda = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def _collective_forward(self) -> bool:
        """Whether forwards are collectives: sharded tables or FSDP2-sharded dense
        parameters over several ranks."""
        if rdist.world_size() == 1:
            return False
        return self.dense_parallel == "fsdp" or any(
            isinstance(c, ShardedEmbeddingCollection) for c in self.collections
        )

    def _data_parallel(self) -> nn.Module | None:
        """Under ``torchrun`` (an initialized process group of several ranks), spread the
        dense parameters over the ranks (``dense_parallel``): a ``DistributedDataParallel``
        wrapper to call, or ``None`` when FSDP2 sharded the model in place. Every rank
        reads its share of the data; sharded tables average their rows' gradients over
        the ranks as the dense side does."""
        world = rdist.world_size()
        if world == 1:
            return None
        plain = [c for c in self.collections if isinstance(c, EmbeddingCollection)]
        if plain:
            raise ValueError(
                f"Trainer: under torchrun (world size {world}) the model's "
                "EmbeddingCollection would train apart on every rank, each rank's rows "
                "drifting from the others'. Shard its tables across the ranks: build "
                "recstack.embedding_engine.ShardedEmbeddingCollection with the same tables "
                "and features (the reference models of recstack.pipelines.models do so "
                "themselves under torchrun)."
            )
        for c in self.collections:
            assert isinstance(c, ShardedEmbeddingCollection)
            c.average_gradients = True  # as the dense side averages its gradients
        if not any(p.requires_grad for p in self.model.parameters()):
            return None
        if self.dense_parallel == "fsdp":
            shard_dense(self.model, self.collections, self.device, world, self.dense_optimizer)
            return None
        return data_parallel(self.model, self.device)

    def _forward(self, inputs: dict[str, Any]) -> Any:
        return (self._ddp or self.model)(inputs)

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.features(batch) if self.features is not None else batch

    def _step_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch's inputs: those the id prefetch already made for it, if any."""
        if self._prefetch is None:
            return self._inputs(batch)
        return self._prefetch.inputs(batch, self._inputs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters and its callbacks' state (JSON)."""
        return {
            "format": _STATE,
            "step": self.step,
            "epoch": self.epoch,
            "samples": self.samples,
            "stage": self.stage,
            "stage_name": self.stages[self.stage].name,
            "stage_start_step": self.stage_start_step,
            "metrics": self.last_metrics,
            "online": self.online_state,
            "callbacks": {
                f"{i}:{type(c).__name__}": c.state_dict() for i, c in enumerate(self.callbacks)
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Args:
            state: what :meth:`state_dict` returned (as a checkpoint holds it).
        """
        if state.get("format") != _STATE:
            raise ValueError(f"not a Trainer state (format {state.get('format')!r})")
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples = int(state["samples"])
        stage = int(state.get("stage", 0))
        if stage >= len(self.stages) or self.stages[stage].name != state.get(
            "stage_name", self.stages[stage].name if stage < len(self.stages) else None
        ):
            raise ValueError(
                f"the checkpoint is in stage {stage} ({state.get('stage_name')!r}) but this "
                f"trainer's stages are {[st.name for st in self.stages]}"
            )
        self.stage = stage
        self.stage_start_step = int(state.get("stage_start_step", 0))
        self._entered = None
        self.last_metrics = dict(state.get("metrics") or {})
        self.online_state = dict(state.get("online") or {})
        saved = state.get("callbacks") or {}
        for i, c in enumerate(self.callbacks):
            key = f"{i}:{type(c).__name__}"
            if key in saved:
                c.load_state_dict(saved[key])

    def checkpoint_objects(self, trainer_state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds, by name (for ``Checkpointer.save`` / ``load``).

        Args:
            trainer_state: the trainer's own state (:meth:`state_dict`, or an empty dict
                a load fills).
        """
        objs: dict[str, Any] = {"model": self.model, "trainer": trainer_state}
        objs["data"] = PerRank(self._position)
        if self.sparse_optimizer is not None:
            objs["sparse_optimizer"] = self.sparse_optimizer
        if self.dense_optimizer is not None:
            objs["dense_optimizer"] = self.dense_optimizer
        if self.lr_scheduler is not None:
            objs["lr_scheduler"] = self.lr_scheduler
        return objs

    def save_checkpoint(self, *, blocking: bool = True, delta: bool = False) -> Path:
        """Write a checkpoint of the current step now (``delta``: only the table rows
        changed since the previous checkpoint, see ``Checkpointer.save``).

        Args:
            blocking: ``False`` writes the files in the background (see
                ``Checkpointer.save``).
            delta: write only the rows changed since the previous checkpoint.

        Raises:
            RuntimeError: the trainer has no checkpointer.
        """
        if self.checkpointer is None:
            raise RuntimeError("Trainer.save_checkpoint: the trainer has no checkpointer")
        path = self.checkpointer.save(
            self.step,
            blocking=blocking,
            delta=delta,
            **self.checkpoint_objects(self.state_dict()),
        )
        for c in self.callbacks:
            c.on_checkpoint(self, self.step, path)
        return path

    def restore(self, step: int | None = None) -> int | None:
        """Load the checkpointer's checkpoint of ``step`` (default: the latest complete
        one) into the model, optimizers, schedule, data position, RNG and trainer.

        Args:
            step: the checkpoint's step (``None``: the latest complete one).

        Returns:
            The step restored, or ``None`` when there is no checkpoint.
        """
        if self.checkpointer is None:
            return None
        if step is None:
            step = self.checkpointer.latest()
            if step is None:
                return None
        state: dict[str, Any] = {}
        self.checkpointer.load(step, **self.checkpoint_objects(state))
        self.load_state_dict(state)
        return step

    # ------------------------------------------------------------------ training
    def fit(self, *, resume: bool = True) -> FitResult:
        """Train until ``epochs`` passes or ``max_steps`` steps, a stop signal or a
        callback's stop; return what happened.

        Args:
            resume: continue from the checkpointer's latest checkpoint when there is one.
        """
        t0 = time.perf_counter()
        resumed = self.restore() if resume else None
        result = FitResult(self.step, self.epoch, self.samples, resumed_from=resumed)
        self.should_stop = self._peer_stop = False
        self.model.train()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._ranks = RankAgreement(self.rank_timeout)
        with StopSignals() as signals:
            for c in self.callbacks:
                c.on_fit_start(self)
            while self.stage < len(self.stages):
                self._enter_stage()
                while not self._stage_done():
                    for c in self.callbacks:
                        c.on_epoch_start(self, self.epoch)
                    exhausted = self._run_epoch(signals)
                    if exhausted:
                        self.epoch += 1
                        for c in self.callbacks:
                            c.on_epoch_end(self, self.epoch - 1)
                    if signals.received is not None:
                        result.stopped_by = signals.received.name
                    elif self.should_stop:
                        result.stopped_by = "another rank" if self._peer_stop else "callback"
                    if result.stopped_by is not None or not exhausted:
                        break  # a stop, or the stage's max_steps
                if result.stopped_by is not None:
                    break
                if self.stage + 1 < len(self.stages):
                    if self.eval_data is not None and self._staged:
                        self._evaluate_and_report()  # each stage ends with an evaluation
                    self.stage += 1
                    self.epoch = 0
                    self.stage_start_step = self.step
                else:
                    break
            fresh = self.last_metrics.get("step") == self.step
            if self.eval_data is not None and result.stopped_by is None and not fresh:
                self._evaluate_and_report()
            if self.checkpointer is not None:
                self.checkpointer.wait()
                if self.checkpointer.latest() != self.step:
                    result.checkpoint = self.save_checkpoint()
                else:
                    result.checkpoint = self.checkpointer.path(self.step)
            for c in self.callbacks:
                c.on_fit_end(self)
        if self._ranks is not None:
            self._ranks.close()
            self._ranks = None
        result.step, result.epoch, result.samples = self.step, self.epoch, self.samples
        result.metrics = {k: v for k, v in self.last_metrics.items() if k != "step"}
        result.seconds = time.perf_counter() - t0
        return result

    def _stage_done(self) -> bool:
        st = self.stages[self.stage]
        if st.max_steps is not None and self.step - self.stage_start_step >= st.max_steps:
            return True
        return self.epoch >= st.epochs

    def _enter_stage(self) -> None:
        """Point the trainer at the current stage: its data (at the restored position
        when resuming inside it), evaluation data, learning rates and frozen parts."""
        if self._entered == self.stage:
            return
        st = self.stages[self.stage]
        if self._entered is not None or self.stage != 0:
            self.train_stream = BatchStream(st.train_data, self.device)
        self._position.apply(self.stage)
        self.eval_data = st.eval_data if st.eval_data is not None else self.default_eval_data
        if self._staged:
            self._apply_stage_settings(st)
        self._entered = self.stage

    def _apply_stage_settings(self, st: Stage) -> None:
        where = f"Trainer stage {st.name!r}"
        frozen = frozen_parameters(self.model, st.freeze, where)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in frozen)
        self.dense_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self._train_embeddings = st.train_embeddings
        if st.dense_lr is not None:
            if self.dense_optimizer is None:
                raise ValueError(f"{where}: dense_lr needs a dense_optimizer")
            for g in self.dense_optimizer.param_groups:
                g["lr"] = st.dense_lr
            if self.lr_scheduler is not None and hasattr(self.lr_scheduler, "base_lrs"):
                self.lr_scheduler.base_lrs = [st.dense_lr] * len(self.lr_scheduler.base_lrs)
        if st.sparse_lr is not None:
            if self.sparse_optimizer is None:
                raise ValueError(f"{where}: sparse_lr needs a sparse_optimizer")
            for g in self.sparse_optimizer.param_groups:
                g["lr"] = st.sparse_lr

    def _run_epoch(self, signals: StopSignals) -> bool:
        """Steps over the rest of the epoch; ``True`` when its data ran out."""
        batches: Iterator[Any] = iter(self.train_stream)
        if self._prefetch is not None:
            batches = self._prefetch.wrap(batches, self.train_stream.state_dict)
        limit = self.stages[self.stage].max_steps
        while True:
            if limit is not None and self.step - self.stage_start_step >= limit:
                return False
            micro = []
            for _ in range(self.grad_accumulation):
                batch = next(batches, None)
                if batch is None:
                    break
                micro.append(batch)
            if self._ranks is not None:
                got = self._ranks.agree(batches=len(micro), stop=False, step=self.step + 1)
                if got.fewest != got.most:
                    self._end_of_data_on_another_rank(len(micro), got.fewest)
                    return True
            if micro:
                self._train_step(micro)
                self._after_step()
            if len(micro) < self.grad_accumulation:
                return True
            stop = signals.received is not None or self.should_stop
            if self._ranks is not None:
                agreed = self._ranks.agree(batches=len(micro), stop=stop, step=self.step + 1)
                if agreed.any_stop and not stop:
                    self.should_stop = self._peer_stop = True
                stop = agreed.any_stop
            if stop:
                return False

    def _end_of_data_on_another_rank(self, batches: int, fewest: int) -> None:
        """The ranks have different numbers of batches for this step (one's data ran out):
        every rank ends the epoch here, so all run the same steps; a rank with batches left
        says how many it leaves untrained."""
        if batches > fewest:
            assert self._ranks is not None
            warnings.warn(
                f"Trainer rank {self._ranks.rank}: another rank's data ran out before step "
                f"{self.step + 1} ({fewest} batches there, {batches} here); every rank ends "
                "the epoch at that step, and this rank leaves its remaining batches of the "
                "epoch untrained. Give the ranks equal shares to train on all of them.",
                stacklevel=3,
            )

    def _train_step(self, micro: list[dict[str, Any]], *, featurized: bool = False) -> None:
        self.model.train()
        if not self._train_embeddings:
            for ec in self.collections:
                ec.eval()  # frozen tables: look up without inserting ids or gradients
        for c in self.callbacks:
            c.on_step_start(self, self.step + 1)
        n = len(micro)
        for i, batch in enumerate(micro):
            inputs = batch if featurized else self._step_inputs(batch)
            with self._autocast():
                outputs = self._forward(inputs)
            if self._prefetch is not None and i == n - 1 and not featurized:
                # The next batch's ids travel while this backward and step run.
                self._prefetch.send_next(self._inputs, self._ranks, self.step + 2)
            preds = predictions_of(outputs, self.tasks)
            loss, each = compute_losses(preds, inputs, self.tasks)
            (loss / n).backward()
            self._accumulate_loss(loss.detach(), each)
            self.samples += batch_rows(preds, inputs, self.tasks)
            if n > 1 and self.sparse_optimizer is not None and self._train_embeddings:
                # The next forward would refuse unread gradients: the optimizer keeps them
                # (and drops rows an eviction hands to new ids before the step).
                self.sparse_optimizer.accumulate()
        if self._looks_ahead(featurized):
            assert self.sparse_optimizer is not None and self._prefetch is not None
            if n == 1:
                self.sparse_optimizer.accumulate()  # as above: the lookahead is a forward
            with self._autocast():
                self._prefetch.look_next()
        if self.clip_grad_norm is not None and self.dense_parameters:
            torch.nn.utils.clip_grad_norm_(self.dense_parameters, self.clip_grad_norm)
        if self.sparse_optimizer is not None and self._train_embeddings:
            self.sparse_optimizer.step()
            self.sparse_optimizer.zero_grad()
        else:
            for ec in self.collections:
                ec.zero_grad_sparse()  # frozen or untrained tables: drop what backward stored
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.step += 1

    def _looks_ahead(self, featurized: bool) -> bool:
        """Whether this step looks the next batch up before its sparse update: one was
        sent ahead (sharded tables, not at the end of the data) and is trained."""
        return (
            self.pipeline == "semi-sync"
            and not featurized
            and self._prefetch is not None
            and self._prefetch.sent_ahead
            and self.sparse_optimizer is not None
            and self._train_embeddings
        )

    def _accumulate_loss(self, loss: torch.Tensor, each: Mapping[str, torch.Tensor]) -> None:
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        for k, v in each.items():
            self._task_sums[k] = v if k not in self._task_sums else self._task_sums[k] + v
        self._loss_steps += 1

    def _after_step(self) -> None:
        logs: dict[str, float] = {
            "step": float(self.step),
            "epoch": float(self.epoch),
            "samples": float(self.samples),
        }
        if self.dense_optimizer is not None:
            logs["lr"] = float(self.dense_optimizer.param_groups[0]["lr"])
        if self.step % self.log_every == 0 and self._loss_sum is not None:
            logs["loss"] = float(self._loss_sum) / self._loss_steps
            for k, v in self._task_sums.items():
                logs[f"loss/{k}"] = float(v) / self._loss_steps
            if not math.isfinite(logs["loss"]):
                warnings.warn(
                    f"Trainer: the loss is {logs['loss']} at step {self.step}", stacklevel=2
                )
            self._loss_sum, self._task_sums, self._loss_steps = None, {}, 0
            logs.update(self._tier_logs())
        logs.update(self._exchange_logs())
        if self.evict_every and self.step % self.evict_every == 0:
            self.evict()
        for c in self.callbacks:
            c.on_step_end(self, self.step, logs)
        if self.eval_every and self.step % self.eval_every == 0 and self.eval_data is not None:
            self._evaluate_and_report()
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self.save_checkpoint(blocking=not self.async_checkpoints)

    def _exchange_logs(self) -> dict[str, float]:
        """The sharded tables' load report of the step's last forward, summed over the
        model's sharded collections: what this rank sent and served (host counters, no
        sync)."""
        loads = [
            c.last_load
            for c in self.collections
            if isinstance(c, ShardedEmbeddingCollection) and c.last_load is not None
        ]
        if not loads:
            return {}
        return {
            "exchange/keys_sent": float(sum(sum(x.keys_sent) for x in loads)),
            "exchange/keys_served": float(sum(x.served for x in loads)),
            "exchange/bytes_sent": float(
                sum(x.id_bytes_sent + 2 * x.row_bytes_sent for x in loads)
            ),
        }

    def _tier_logs(self) -> dict[str, float]:
        """Each tiered table's GPU-tier hit rate, rows promoted and bytes moved between
        the tiers since the previous log step (summed over collections holding a table
        of that name). Read on log steps only: each table's counts are one host read."""
        totals: dict[str, list[int]] = {}
        for c in self.collections:
            for name, st in c.tier_stats().items():
                t = totals.setdefault(name, [0, 0, 0, 0])
                for i, v in enumerate((st.lookups, st.device_hits, st.promoted, st.host_bytes)):
                    t[i] += v
        logs: dict[str, float] = {}
        for name, now in totals.items():
            before = self._tier_seen.get(name, [0, 0, 0, 0])
            # Counts that went down were reset (reset_stats): count from zero again.
            lookups, hits, promoted, moved = (
                a - b if a >= b else a for a, b in zip(now, before, strict=True)
            )
            self._tier_seen[name] = now
            logs[f"tier/{name}/hit_rate"] = hits / lookups if lookups else 1.0
            logs[f"tier/{name}/promoted"] = float(promoted)
            logs[f"tier/{name}/host_bytes"] = float(moved)
        return logs

    def evict(self) -> dict[str, int]:
        """Run eviction on every table of the model by the trainer's rules; return the
        ids evicted per table."""
        out: dict[str, int] = {}
        for ec in self.collections:
            older = None
            if self.evict_older_than is not None:
                older = max(0, ec.step - self.evict_older_than)
            # table=None skips fixed-size tables, which never evict.
            got = ec.evict(older_than_step=older, min_count=self.evict_min_count)
            for k, v in got.items():
                out[k] = out.get(k, 0) + v
        return out

    def fit_online(
        self, *, full_every: int = 10, max_windows: int | None = None, resume: bool = True
    ) -> OnlineResult:
        """Online learning over a windowed stream (a ``StreamingReader``): progressive
        validation per window, a delta checkpoint at each window's end; see
        :func:`recstack.pipelines.online.run_online`.

        Args:
            full_every: a full checkpoint every this many windows, deltas between.
            max_windows: stop after this many windows.
            resume: continue after the last complete window of the latest checkpoint.
        """
        return run_online(self, full_every=full_every, max_windows=max_windows, resume=resume)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, data: Iterable[Any] | None = None, *, max_batches: int | None = None
    ) -> dict[str, float]:
        """Metrics of every task on ``data`` (default the trainer's ``eval_data``), with
        the model in eval mode under ``torch.no_grad()``; the mode is restored after.

        Args:
            data: the batches (``None``: the trainer's ``eval_data``).
            max_batches: read at most this many (``None``: the trainer's
                ``eval_batches``).

        Returns:
            ``{"<task>/<metric>": value}`` plus ``"samples"``.
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("Trainer.evaluate: no data (pass data or give eval_data)")
        limit = max_batches if max_batches is not None else self.eval_batches
        agreement = None
        if self._collective_forward():
            agreement = self._ranks if self._ranks is not None else RankAgreement(self.rank_timeout)
        try:
            return evaluate_model(
                self.model,
                data,
                self.tasks,
                device=self.device,
                features=self.features,
                autocast=self._autocast,
                max_batches=limit,
                all_have_batch=None if agreement is None else _all_have(agreement, self.step),
            )
        finally:
            if agreement is not None and agreement is not self._ranks:
                agreement.close()

    def _evaluate_and_report(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.last_metrics = {**metrics, "step": self.step}
        for c in self.callbacks:
            c.on_eval_end(self, self.step, metrics)
        return metrics


def _all_have(agreement: RankAgreement, step: int) -> Callable[[bool], bool]:
    """Before each evaluation batch: whether every rank has one (host-side agreement)."""

    def ask(have: bool) -> bool:
        got = agreement.agree(batches=int(have), stop=False, step=step)
        if got.fewest != got.most and have:
            warnings.warn(
                f"Trainer rank {agreement.rank}: another rank's evaluation data ran out "
                "first; with sharded tables every rank evaluates the same number of "
                "batches, so this rank's remaining ones are not evaluated. Give the ranks "
                "equal shares of the evaluation data.",
                stacklevel=4,
            )
        return got.fewest > 0

    return ask


class _Position:
    """The data position in checkpoints: the current stage's stream state. A restored
    position waits until that stage's stream exists (the trainer state, which names the
    stage, is loaded in the same call)."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        t = self._trainer
        # A batch the id prefetch holds back for the next step was read, not trained.
        held = t._prefetch.position() if t._prefetch is not None else None
        return {
            "stage": t.stage,
            "stream": held if held is not None else t.train_stream.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = dict(state)

    def apply(self, stage: int) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and int(pending.get("stage", 0)) == stage:
            self._trainer.train_stream.load_state_dict(pending["stream"])
