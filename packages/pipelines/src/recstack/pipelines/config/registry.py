"""What a run configuration names by string: models, optimizers and LR schedulers."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch

from recstack.pipelines.models import DIN, DLRM, ESMM, HSTU, DeepFM, EmbeddingModel, MMoE
from recstack.sparse_optim import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseSGD,
)

__all__ = [
    "BUILTIN_SCHEDULES",
    "BuiltinSchedule",
    "DENSE_OPTIMIZERS",
    "MODELS",
    "SPARSE_OPTIMIZERS",
    "TORCH_SCHEDULERS",
    "constructor_arguments",
    "lookup",
]

#: ``model.type`` -> the model class (its ``config_class`` gives the other keys).
MODELS: dict[str, type[EmbeddingModel]] = {
    "din": DIN,
    "deepfm": DeepFM,
    "dlrm": DLRM,
    "mmoe": MMoE,
    "esmm": ESMM,
    "hstu": HSTU,
}

#: ``optimizers.sparse.type`` -> a ``recstack.sparse_optim`` optimizer class.
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": SparseAdam,
    "adamw": SparseAdamW,
    "adagrad": SparseAdagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "sgd": SparseSGD,
    "ftrl": SparseFTRL,
}

# LBFGS needs a closure per step and torch's SparseAdam takes torch sparse gradients:
# neither fits the Trainer's dense step.
_NOT_DENSE = {"Optimizer", "LBFGS", "SparseAdam"}

#: ``optimizers.dense.type`` -> a ``torch.optim`` class (lower-case name: ``adamw``).
DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name.lower(): cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and name not in _NOT_DENSE
}

#: A schedule built in: linear warmup, then constant, cosine or linear decay.
BuiltinSchedule = Literal["constant", "cosine", "linear"]

#: The schedules built in.
BUILTIN_SCHEDULES: tuple[str, ...] = get_args(BuiltinSchedule)

_SCHEDULER_BASES = tuple(
    c
    for c in (
        getattr(torch.optim.lr_scheduler, "LRScheduler", None),
        getattr(torch.optim.lr_scheduler, "_LRScheduler", None),
    )
    if c is not None
)
# Schedulers that wrap others or need a metric each step cannot be named in a file.
_NOT_BY_NAME = {"LRScheduler", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}

#: ``schedule.type`` -> a ``torch.optim.lr_scheduler`` class (``StepLR``, ``OneCycleLR``
#: ...), by its lower-case name.
TORCH_SCHEDULERS: dict[str, type[Any]] = {
    name.lower(): cls
    for name, cls in vars(torch.optim.lr_scheduler).items()
    if isinstance(cls, type)
    and issubclass(cls, _SCHEDULER_BASES)
    and not name.startswith("_")
    and name not in _NOT_BY_NAME
}


def lookup(registry: Mapping[str, Any], name: str) -> Any | None:
    """The entry of ``name`` in ``registry``, case-insensitively (``"AdamW"`` and
    ``"adamw"`` are one), also by class name (``"SparseAdam"``); ``None`` when absent.

    Args:
        registry: one of this module's registries.
        name: the name given.
    """
    key = name.lower()
    if key in registry:
        return registry[key]
    for cls in registry.values():
        if cls.__name__.lower() == key:
            return cls
    return None


def constructor_arguments(cls: type, skip: int = 1) -> dict[str, inspect.Parameter]:
    """The keyword arguments of ``cls(...)`` after its first ``skip`` positional ones
    (the parameters, or the optimizer of a scheduler).

    Args:
        cls: the class.
        skip: leading arguments the builder passes itself.
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + skip :]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in params if p.kind in kinds}
