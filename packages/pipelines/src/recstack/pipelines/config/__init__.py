"""recstack.pipelines.config: run configuration files and the ``recstack train`` /
``recstack eval`` commands.

A YAML or TOML file describes one run: its data, features, embedding tables, model,
tasks, optimizers, schedule, trainer settings, stages, checkpoints, logging and online
learning. :func:`load_config` reads and checks it into a :class:`RunConfig` (every error
names the file and the full key path, with a did-you-mean for unknown keys);
:func:`build_run` builds the readers, feature engine, model, optimizers, checkpointer,
callbacks and Trainer from it; :func:`train_command` and :func:`eval_command` are what
the command line runs. See docs/pipelines/config.md.
"""

from recstack.pipelines.config.builder import (
    DataSources,
    Run,
    build_data,
    build_model,
    build_run,
    run_device,
)
from recstack.pipelines.config.commands import (
    CheckpointEvaluation,
    eval_command,
    evaluate_checkpoint,
    format_table,
    resolve_checkpoint,
    train,
    train_command,
)
from recstack.pipelines.config.data_sections import (
    DataConfig,
    ReaderConfig,
    StreamConfig,
    SyntheticData,
)
from recstack.pipelines.config.errors import ConfigError
from recstack.pipelines.config.loader import load_config, parse_config, read_document
from recstack.pipelines.config.model_sections import FeaturesConfig, ModelConfig
from recstack.pipelines.config.optim_sections import (
    OptimizerConfig,
    OptimizersConfig,
    ScheduleConfig,
)
from recstack.pipelines.config.overrides import Override, apply_overrides, parse_override
from recstack.pipelines.config.registry import (
    DENSE_OPTIMIZERS,
    MODELS,
    SPARSE_OPTIMIZERS,
    TORCH_SCHEDULERS,
)
from recstack.pipelines.config.schedule import build_scheduler, lr_factor
from recstack.pipelines.config.schema import RunConfig
from recstack.pipelines.config.train_sections import (
    CheckpointConfig,
    EarlyStoppingConfig,
    LoggingConfig,
    OnlineConfig,
    StageConfig,
    TrainerConfig,
)

__all__ = [
    "DENSE_OPTIMIZERS",
    "MODELS",
    "SPARSE_OPTIMIZERS",
    "TORCH_SCHEDULERS",
    "CheckpointConfig",
    "CheckpointEvaluation",
    "ConfigError",
    "DataConfig",
    "DataSources",
    "EarlyStoppingConfig",
    "FeaturesConfig",
    "LoggingConfig",
    "ModelConfig",
    "OnlineConfig",
    "OptimizerConfig",
    "OptimizersConfig",
    "Override",
    "ReaderConfig",
    "Run",
    "RunConfig",
    "ScheduleConfig",
    "StageConfig",
    "StreamConfig",
    "SyntheticData",
    "TrainerConfig",
    "apply_overrides",
    "build_data",
    "build_model",
    "build_run",
    "build_scheduler",
    "eval_command",
    "evaluate_checkpoint",
    "format_table",
    "load_config",
    "lr_factor",
    "parse_config",
    "parse_override",
    "read_document",
    "resolve_checkpoint",
    "run_device",
    "train",
    "train_command",
]
