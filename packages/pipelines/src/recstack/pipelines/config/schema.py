"""One run's configuration: every section, and the checks that span sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from recstack.embedding_engine import FeatureConfig, TableConfig, check_configs
from recstack.pipelines.config.data_sections import DataConfig
from recstack.pipelines.config.errors import Invalid
from recstack.pipelines.config.model_sections import (
    FeaturesConfig,
    ModelConfig,
    parse_model,
    parse_tasks,
)
from recstack.pipelines.config.optim_sections import (
    OptimizersConfig,
    ScheduleConfig,
    parse_schedule,
)
from recstack.pipelines.config.train_sections import (
    CheckpointConfig,
    EarlyStoppingConfig,
    LoggingConfig,
    OnlineConfig,
    StageConfig,
    TrainerConfig,
)
from recstack.pipelines.tasks import Task

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """A whole run, as a configuration file describes it (see docs/pipelines/config.md).

    Args:
        data: where batches come from.
        tables: the embedding tables (``TableConfig`` fields each).
        embedding_features: the features the tables serve (``FeatureConfig`` fields).
        model: ``type`` and the model config's fields.
        features: the feature engine (``None``: batches go to the model as read).
        tasks: the prediction tasks (``None``: one task ``label`` on column ``label``).
        optimizers: the sparse and dense optimizers.
        schedule: the dense optimizer's LR schedule (``None``: constant).
        trainer: the Trainer's keyword arguments.
        stages: a multi-stage run (``None``: one stage on ``data.train``).
        checkpoint: the checkpointer (``None``: no checkpoints).
        logging: the log file, TensorBoard, plot and progress bar.
        early_stopping: stop when an evaluation metric stops improving.
        online: online learning settings (with ``data.stream``).
        seed: the torch seed the model is built under.
        file: the configuration file it was read from (not a key).
    """

    data: DataConfig
    tables: tuple[TableConfig, ...]
    embedding_features: tuple[FeatureConfig, ...]
    model: ModelConfig = field(metadata={"parse": parse_model})
    features: FeaturesConfig | None = None
    tasks: tuple[Task, ...] | None = field(default=None, metadata={"parse": parse_tasks})
    optimizers: OptimizersConfig = field(default_factory=OptimizersConfig)
    schedule: ScheduleConfig | None = field(default=None, metadata={"parse": parse_schedule})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stages: tuple[StageConfig, ...] | None = None
    checkpoint: CheckpointConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    early_stopping: EarlyStoppingConfig | None = None
    online: OnlineConfig | None = None
    seed: int = 0
    file: str | None = field(default=None, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        try:
            check_configs(list(self.tables), list(self.embedding_features))
        except ValueError as e:
            raise Invalid(str(e), "embedding_features") from None
        self._check_data()
        self._check_tasks()
        self._check_training()

    @property
    def is_online(self) -> bool:
        """Whether ``recstack train`` runs online learning (``data.stream``)."""
        return self.data.stream is not None

    @property
    def task_list(self) -> list[Task]:
        """The tasks (the Trainer's default when none are given)."""
        return list(self.tasks) if self.tasks is not None else [Task("label")]

    def _check_data(self) -> None:
        d = self.data
        has_train = d.train is not None or d.synthetic is not None
        if self.online is not None and d.stream is None:
            raise Invalid("online learning needs data.stream", "online")
        if d.stream is not None:
            if self.stages is not None:
                raise Invalid("stages do not apply to online learning (data.stream)", "stages")
            return
        if self.stages is None:
            if not has_train:
                raise Invalid("required key is missing (or give data.stream)", "data.train")
            return
        if not self.stages:
            raise Invalid("needs at least one stage", "stages")
        names = [s.name for s in self.stages]
        for i, st in enumerate(self.stages):
            if st.name in names[:i]:
                raise Invalid(f"stage name {st.name!r} is given twice", f"stages[{i}].name")
            if st.train is None and not has_train:
                raise Invalid(
                    "required key is missing (there is no data.train)", f"stages[{i}].train"
                )
            if st.train is not None and st.train.paths is None and d.synthetic is None:
                raise Invalid("required key is missing", f"stages[{i}].train.paths")

    def _check_tasks(self) -> None:
        outputs = self.model.outputs()
        tasks = self.task_list
        if outputs is None:
            if len(tasks) != 1:
                raise Invalid(f"the {self.model.type} model has one output; give one task", "tasks")
            return
        if self.tasks is None:
            raise Invalid(
                f"required key is missing: the {self.model.type} model has outputs "
                f"{list(outputs)}; name the tasks trained on them",
                "tasks",
            )
        one_kind = len(set(outputs.values())) == 1
        for i, task in enumerate(tasks):
            if task.name not in outputs:
                raise Invalid(
                    f"the {self.model.type} model has no output {task.name!r} (its outputs: "
                    f"{', '.join(outputs)})",
                    f"tasks[{i}].name",
                )
            kind = outputs[task.name]
            if task.output != kind:
                what = "outputs are" if one_kind else f"output {task.name!r} is"
                raise Invalid(
                    f"the {self.model.type} model's {what} {kind}: set output: {kind}",
                    f"tasks[{i}].output",
                )

    def _check_training(self) -> None:
        t, opt, ck = self.trainer, self.optimizers, self.checkpoint
        if ck is None and t.checkpoint_every is not None:
            raise Invalid("needs a checkpoint section (checkpoint.dir)", "trainer.checkpoint_every")
        if ck is not None:
            for own, theirs in (("every", "checkpoint_every"), ("async_", "async_checkpoints")):
                a, b = getattr(ck, own), getattr(t, theirs)
                if a is not None and b is not None and a != b:
                    key = own.rstrip("_")
                    raise Invalid(
                        f"{a!r} differs from trainer.{theirs}: {b!r}; give one of them",
                        f"checkpoint.{key}",
                    )
        s = self.schedule
        if s is not None:
            if opt.dense is None:
                raise Invalid("needs optimizers.dense (the schedule drives its LR)", "schedule")
            if s.type in ("cosine", "linear"):
                total = s.total_steps if s.total_steps is not None else t.max_steps
                if total is None:
                    raise Invalid(
                        f"required key is missing: the {s.type} decay needs it (or "
                        "trainer.max_steps)",
                        "schedule.total_steps",
                    )
                if total <= s.linear_warmup_steps:
                    raise Invalid(
                        f"{total} steps leave no room after {s.linear_warmup_steps} warmup steps",
                        "schedule.total_steps",
                    )
        for i, st in enumerate(self.stages or ()):
            if st.dense_lr is not None and opt.dense is None:
                raise Invalid("needs optimizers.dense", f"stages[{i}].dense_lr")
            if st.sparse_lr is not None and opt.sparse is None:
                raise Invalid("needs optimizers.sparse", f"stages[{i}].sparse_lr")
        if self.early_stopping is not None and not self.is_online and not self._has_eval():
            raise Invalid("needs evaluation data (data.eval)", "early_stopping")

    def _has_eval(self) -> bool:
        d = self.data
        synthetic = d.synthetic is not None and d.synthetic.eval_files > 0
        staged = any(st.eval is not None for st in self.stages or ())
        return d.eval is not None or synthetic or staged
