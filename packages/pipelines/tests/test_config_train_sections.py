"""recstack.pipelines.config.train_sections: the trainer section mirrors the Trainer."""

from __future__ import annotations

import inspect

from recstack.pipelines import Trainer
from recstack.pipelines.config import (
    TrainerConfig,
)


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
