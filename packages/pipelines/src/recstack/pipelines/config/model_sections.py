"""The model side of a run: ``features`` (the feature engine), ``tables`` and
``embedding_features`` (the embedding collection), ``model`` and ``tasks``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from recstack.embedding_engine import Initializer
from recstack.feature_engine import (
    COLUMN_KINDS,
    Feature,
    FeatureEngine,
    FeatureError,
    load_features,
)
from recstack.pipelines.config.errors import Invalid
from recstack.pipelines.config.fields import (
    PARSERS,
    Where,
    check_keys,
    child,
    construct,
    did_you_mean,
    item,
    parse_dataclass,
    parse_value,
)
from recstack.pipelines.config.registry import MODELS
from recstack.pipelines.metrics import METRIC_NAMES
from recstack.pipelines.models.layers import Activation
from recstack.pipelines.tasks import Task, TaskOutput

__all__ = ["FeaturesConfig", "ModelConfig", "parse_model", "parse_tasks"]

PARSERS[Initializer] = lambda value, path, where: construct(
    Initializer.from_dict, {"data": value}, path, where
)
# Any case: the model configs take "PReLU" as "prelu".
PARSERS[Activation] = lambda value, path, where: parse_value(str, value, path, where)


def _raw(value: object, path: str, where: Where) -> object:
    return value


@dataclass(frozen=True)
class FeaturesConfig:
    """The :class:`~recstack.feature_engine.FeatureEngine` (the ``features`` section).

    Args:
        schema: ``column -> kind`` of the input batches (``int``, ``float``,
            ``int_list``, ``float_list``, ``string``, ``string_list``).
        features: the features, as entries of a feature config file (``{name, source,
            ops}``); or ``Feature`` objects.
        defaults: params merged into every op of that name (``{Hash: {seed: 7}}``).
        file: a feature config file (YAML/JSON/TOML) instead of ``features``.
        sparse_key: the batch key of the engine's KeyedJaggedTensor.
        dense_key: the batch key of its dense ``[B, n]`` tensor.
        passthrough: which input columns the output batch keeps (``"unused"``,
            ``"all"``, ``"none"``).
    """

    schema: dict[str, str]
    features: tuple[Feature, ...] | None = field(default=None, metadata={"parse": _raw})
    defaults: dict[str, dict[str, Any]] | None = None
    file: str | None = None
    sparse_key: str = "sparse"
    dense_key: str = "dense"
    passthrough: Literal["unused", "all", "none"] = "unused"

    def __post_init__(self) -> None:
        for column, kind in self.schema.items():
            if kind not in COLUMN_KINDS:
                hint = did_you_mean(kind, COLUMN_KINDS)
                raise Invalid(
                    f"unknown column kind {kind!r}{hint}; kinds: {', '.join(COLUMN_KINDS)}",
                    f"schema.{column}",
                )
        if self.features is None and self.file is None:
            raise Invalid(
                "required key is missing (a list of feature entries; or give file)", "features"
            )
        if self.features is not None and self.file is not None:
            raise Invalid("give features or file, not both", "file")
        object.__setattr__(self, "features", self._load())
        try:
            self.engine()  # checks the graph against the schema (unknown columns, cycles)
        except FeatureError as e:
            raise Invalid(str(e), "features") from None

    def _load(self) -> tuple[Feature, ...]:
        if self.file is not None:
            try:
                return tuple(load_features(self.file))
            except (FeatureError, OSError) as e:
                raise Invalid(str(e), "file") from None
        raw = self.features
        if isinstance(raw, (list, tuple)) and all(isinstance(f, Feature) for f in raw):
            return tuple(raw)
        try:
            doc: dict[str, Any] = {"features": raw}
            if self.defaults:
                doc["defaults"] = self.defaults
            return tuple(load_features(doc))
        except FeatureError as e:
            raise Invalid(str(e), "features") from None

    def engine(self) -> FeatureEngine:
        """A new :class:`~recstack.feature_engine.FeatureEngine` of these features."""
        assert self.features is not None
        return FeatureEngine(
            list(self.features),
            self.schema,
            sparse_key=self.sparse_key,
            dense_key=self.dense_key,
            passthrough=self.passthrough,
        )


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: ``type`` and that model's config.

    Args:
        type: a key of :data:`~recstack.pipelines.config.registry.MODELS`
            (``din``, ``deepfm``, ``dlrm``, ``mmoe``, ``esmm``, ``hstu``).
        config: the model's config dataclass (``DINConfig`` ...), from the section's
            other keys.
    """

    type: str
    config: Any

    def model_class(self) -> type[Any]:
        """The model class of ``type``."""
        return MODELS[self.type]

    def outputs(self) -> dict[str, TaskOutput] | None:
        """What a model that returns a dict returns under each key, in order: ``"logits"``,
        ``"probability"`` or ``"loss"`` (a scalar loss it computes itself), the
        :class:`~recstack.pipelines.Task` ``output`` a task trained on that key must
        declare; ``None`` for a model that returns one tensor of logits."""
        c = self.config
        if self.type == "esmm":
            return dict.fromkeys((c.ctr_task, c.ctcvr_task, c.cvr_output), "probability")
        if self.type == "mmoe":
            return dict.fromkeys(c.tasks, "logits")
        if self.type == "hstu" and c.next_item_loss != "none":
            return {c.rank_task: "logits", c.next_item_task: "loss"}
        return None


def parse_model(value: object, path: str, where: Where) -> ModelConfig:
    """The ``model`` section: ``type`` plus the fields of that model's config class.

    Args:
        value: the section.
        path: its key path.
        where: the source, for errors.

    Raises:
        ConfigError: an unknown type or key (with a suggestion), a missing or invalid one.
    """
    if not isinstance(value, Mapping):
        value = check_keys(value, ("type",), ("type",), path, where)  # raises
    if "type" not in value:
        raise where.error(child(path, "type"), f"required key is missing; one of {list(MODELS)}")
    kind = value["type"]
    if not isinstance(kind, str) or kind.lower() not in MODELS:
        hint = did_you_mean(kind, MODELS)
        raise where.error(
            child(path, "type"), f"unknown model {kind!r}{hint}; models: {', '.join(MODELS)}"
        )
    cls = MODELS[kind.lower()]
    rest = {k: v for k, v in value.items() if k != "type"}
    return ModelConfig(kind.lower(), parse_dataclass(cls.config_class, rest, path, where))


def _parse_task(value: object, path: str, where: Where) -> Task:
    task = parse_dataclass(Task, value, path, where)
    for i, name in enumerate(task.metrics):
        if name not in METRIC_NAMES:
            raise where.error(
                item(child(path, "metrics"), i),
                f"unknown metric {name!r}{did_you_mean(name, METRIC_NAMES)}; metrics: "
                f"{', '.join(METRIC_NAMES)}",
            )
    if "gauc" in task.metrics and task.group is None:
        raise where.error(child(path, "group"), "metric 'gauc' needs a group column")
    return task


def parse_tasks(value: object, path: str, where: Where) -> tuple[Task, ...] | None:
    """The ``tasks`` section: a list of :class:`~recstack.pipelines.Task` fields.

    Args:
        value: the section (``None``: the Trainer's default, one task ``label``).
        path: its key path.
        where: the source, for errors.
    """
    if value is None:
        return None
    items = parse_value(list[Any], value, path, where)
    if not items:
        raise where.error(path, "needs at least one task")
    tasks = tuple(_parse_task(v, item(path, i), where) for i, v in enumerate(items))
    names = [t.name for t in tasks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise where.error(item(path, i), f"task name {name!r} is given twice")
    return tasks
