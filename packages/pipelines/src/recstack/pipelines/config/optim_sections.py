"""The ``optimizers`` and ``schedule`` sections: classes by name, and their keyword
arguments checked against the class's signature."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from recstack.pipelines.config.errors import Invalid
from recstack.pipelines.config.fields import (
    Where,
    at_least,
    child,
    construct,
    did_you_mean,
    parse_value,
)
from recstack.pipelines.config.registry import (
    BUILTIN_SCHEDULES,
    DENSE_OPTIMIZERS,
    SPARSE_OPTIMIZERS,
    TORCH_SCHEDULERS,
    constructor_arguments,
    lookup,
)

__all__ = ["OptimizerConfig", "OptimizersConfig", "ScheduleConfig", "parse_schedule"]


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - annotations of a foreign class: then unchecked
        return {}


def _keyword_arguments(
    cls: type, data: Mapping[str, Any], own: tuple[str, ...], path: str, where: Where
) -> dict[str, Any]:
    """``data`` less the ``own`` keys, checked against ``cls``'s constructor (after its
    first argument): unknown keys with a suggestion, missing required ones, types."""
    params = constructor_arguments(cls)
    allowed = [*own, *params]
    hints = _hints(cls.__init__)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in own:
            continue
        if key not in params:
            raise where.error(
                child(path, key),
                f"unknown key{did_you_mean(key, allowed)}; {cls.__name__} takes: "
                f"{', '.join(allowed)}",
            )
        value = parse_value(hints.get(key, Any), value, child(path, key), where)
        out[key] = tuple(value) if isinstance(value, list) else value
    for name, p in params.items():
        if p.default is p.empty and name not in out:
            raise where.error(child(path, name), f"required key is missing ({cls.__name__})")
    return out


def _class_of(
    registry: Mapping[str, type], what: str, value: object, path: str, where: Where
) -> type:
    if not isinstance(value, Mapping):
        raise where.error(path, f"expected a mapping with a 'type' key, got {value!r}")
    if "type" not in value:
        raise where.error(child(path, "type"), f"required key is missing; one of {list(registry)}")
    name = value["type"]
    cls = lookup(registry, name) if isinstance(name, str) else None
    if cls is None:
        raise where.error(
            child(path, "type"),
            f"unknown {what} {name!r}{did_you_mean(name, registry)}; known: {', '.join(registry)}",
        )
    return cls


@dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer: its class and keyword arguments (``{type: adamw, lr: 0.001}``).

    The keys and their types are checked at load; the values' ranges by the optimizer
    when the run is built (constructing a torch optimizer imports ``torch._dynamo``,
    which a configuration check should not pay for).

    Args:
        type: the name it was given.
        cls: the optimizer class.
        options: its keyword arguments (``lr``, ``betas`` ...).
    """

    type: str
    cls: type
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Any) -> torch.optim.Optimizer:
        """The optimizer over ``params``.

        Args:
            params: its parameters.
        """
        return self.cls(params, **self.options)


def _optimizer(registry: Mapping[str, type], what: str) -> Callable[..., OptimizerConfig | None]:
    def parse(value: object, path: str, where: Where) -> OptimizerConfig | None:
        if value is None:
            return None
        cls = _class_of(registry, what, value, path, where)
        assert isinstance(value, Mapping)
        options = _keyword_arguments(cls, value, ("type",), path, where)
        return construct(
            OptimizerConfig, {"type": value["type"], "cls": cls, "options": options}, path, where
        )

    return parse


@dataclass(frozen=True)
class OptimizersConfig:
    """The ``optimizers`` section.

    Args:
        sparse: the ``recstack.sparse_optim`` optimizer of the embedding rows
            (``type``: ``adam``, ``adamw``, ``adagrad``, ``rowwise_adagrad``, ``sgd``,
            ``ftrl``; ``None``: the tables are not trained).
        dense: the ``torch.optim`` optimizer of the dense parameters (``type``: a
            ``torch.optim`` class name in any case: ``adamw``, ``adam``, ``sgd`` ...).
    """

    sparse: OptimizerConfig | None = field(
        default=None, metadata={"parse": _optimizer(SPARSE_OPTIMIZERS, "sparse optimizer")}
    )
    dense: OptimizerConfig | None = field(
        default=None, metadata={"parse": _optimizer(DENSE_OPTIMIZERS, "dense optimizer")}
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """The dense optimizer's learning-rate schedule (the ``schedule`` section).

    Built in (``type``: ``constant``, ``cosine``, ``linear``): the LR factor rises
    linearly over ``linear_warmup_steps`` steps, then stays at 1 (``constant``) or decays
    to ``min_factor`` at ``total_steps`` along a half cosine (``cosine``) or a line
    (``linear``). Any other ``type`` names a ``torch.optim.lr_scheduler`` class
    (``StepLR``, ``OneCycleLR``, ...) and the other keys are its arguments.

    Args:
        type: the schedule.
        linear_warmup_steps: warmup steps (built-in schedules).
        total_steps: the step where the decay ends (``cosine``/``linear``; default
            ``trainer.max_steps``).
        min_factor: the final LR as a fraction of the base LR (``cosine``/``linear``).
        options: a torch scheduler's keyword arguments.
    """

    type: str = "constant"
    linear_warmup_steps: int = 0
    total_steps: int | None = None
    min_factor: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        at_least(self, 0, "linear_warmup_steps")
        at_least(self, 1, "total_steps")
        if not 0.0 <= self.min_factor <= 1.0:
            raise Invalid(f"must be in [0, 1], got {self.min_factor}", "min_factor")

    @property
    def builtin(self) -> bool:
        """Whether ``type`` is a built-in schedule."""
        return self.type in BUILTIN_SCHEDULES


def parse_schedule(value: object, path: str, where: Where) -> ScheduleConfig | None:
    """The ``schedule`` section (see :class:`ScheduleConfig`).

    Args:
        value: the section, or ``None``.
        path: its key path.
        where: the source, for errors.
    """
    if value is None:
        return None
    names = [*BUILTIN_SCHEDULES, *(c.__name__ for c in TORCH_SCHEDULERS.values())]
    if not isinstance(value, Mapping):
        raise where.error(path, f"expected a mapping with a 'type' key, got {value!r}")
    if "type" not in value:
        raise where.error(child(path, "type"), f"required key is missing; one of {names}")
    name = value["type"]
    if not isinstance(name, str) or (
        name.lower() not in BUILTIN_SCHEDULES and lookup(TORCH_SCHEDULERS, name) is None
    ):
        raise where.error(
            child(path, "type"),
            f"unknown schedule {name!r}{did_you_mean(name, names)}; built in: "
            f"{', '.join(BUILTIN_SCHEDULES)}, or a torch.optim.lr_scheduler class",
        )
    if name.lower() in BUILTIN_SCHEDULES:
        own = ("type", "linear_warmup_steps", "total_steps", "min_factor")
        for key in value:
            if key not in own:
                raise where.error(
                    child(path, key),
                    f"unknown key{did_you_mean(key, own)}; the built-in schedule {name!r} "
                    f"takes: {', '.join(own)}",
                )
        kwargs = {
            k: parse_value(_SCHEDULE_HINTS[k], value[k], child(path, k), where)
            for k in own[1:]
            if k in value
        }
        return construct(ScheduleConfig, {"type": name.lower(), **kwargs}, path, where)
    cls = _class_of(TORCH_SCHEDULERS, "schedule", value, path, where)
    options = _keyword_arguments(cls, value, ("type",), path, where)
    return construct(
        ScheduleConfig, {"type": cls.__name__.lower(), "options": options}, path, where
    )


_SCHEDULE_HINTS: dict[str, Any] = {
    "linear_warmup_steps": int,
    "total_steps": int | None,
    "min_factor": float,
}
