"""The model configs' fields: each declared with its check (:class:`ConfigField`), which
runs at construction (:class:`CheckedConfig`) and names the config and field in its error;
and configs from and to the plain mappings a YAML/TOML file gives (lists become tuples,
unknown keys are errors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

from recstack.core.checks import check_int
from recstack.pipelines.models.layers import ACTIVATIONS, Activation

__all__ = [
    "CheckedConfig",
    "ConfigField",
    "ModelConfigError",
    "checked",
    "config_from_mapping",
    "config_to_dict",
    "task_names",
]

C = TypeVar("C")

#: A field check: ``check(config class name, field name, value) -> value`` (normalized:
#: lists become tuples, activation names lower case), raising :class:`ModelConfigError`.
FieldCheck = Callable[[str, str, Any], Any]


class ModelConfigError(ValueError):
    """An invalid model config, or one that does not fit its embedding collection; the
    message names the config field and the feature."""


# ---------------------------------------------------------------------------- checks


def _name(owner: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ModelConfigError(f"{owner}.{field} must be a non-empty string, got {value!r}")
    return value


def _names(owner: str, field: str, value: object, *, min_len: int = 0) -> tuple[str, ...]:
    """Distinct names (a list from YAML is accepted)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ModelConfigError(
            f"{owner}.{field} must be a list of names, got {type(value).__name__}"
        )
    out = tuple(_name(owner, f"{field}[{i}]", v) for i, v in enumerate(value))
    if len(out) < min_len:
        raise ModelConfigError(f"{owner}.{field} needs at least {min_len} name(s), got {list(out)}")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise ModelConfigError(f"{owner}.{field} lists {dupes} more than once")
    return out


def _int(owner: str, field: str, value: object, *, low: int) -> int:
    try:
        return check_int(value, f"{owner}.{field}", minimum=low)
    except (TypeError, ValueError) as err:
        raise ModelConfigError(str(err)) from None


def _sizes(owner: str, field: str, value: object, *, min_len: int = 0) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ModelConfigError(
            f"{owner}.{field} must be a list of layer sizes, got {type(value).__name__}"
        )
    out = tuple(_int(owner, f"{field}[{i}]", v, low=1) for i, v in enumerate(value))
    if len(out) < min_len:
        raise ModelConfigError(
            f"{owner}.{field} needs at least {min_len} layer(s), got {list(out)}"
        )
    return out


def _dropout(owner: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelConfigError(f"{owner}.{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def _bool(owner: str, field: str, value: object) -> bool:
    # 0/1 are refused: YAML says true/false.
    if not isinstance(value, bool):
        raise ModelConfigError(f"{owner}.{field} must be true or false, got {value!r}")
    return value


def _positive(owner: str, field: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise ModelConfigError(f"{owner}.{field} must be a finite number > 0, got {value!r}")
    return float(value)


def _choice(owner: str, field: str, value: object, *, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ModelConfigError(f"{owner}.{field} must be one of {list(choices)}, got {value!r}")
    return value.lower()


def _activation(owner: str, field: str, value: object) -> str:
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise ModelConfigError(f"{owner}.{field} must be one of {list(ACTIVATIONS)}, got {value!r}")
    return value.lower()


def task_names(owner: str, field: str, value: object) -> tuple[str, ...]:
    """``value`` as distinct task names (at least one), which key modules of the model and
    so may not contain a dot.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.

    Raises:
        ModelConfigError: not a list of distinct non-empty names without dots.
    """
    names = _names(owner, field, value, min_len=1)
    for name in names:
        if "." in name:
            raise ModelConfigError(f"{owner}.{field}: task name {name!r} may not contain '.'")
    return names


# ---------------------------------------------------------------------------- fields


class ConfigField:
    """The kinds of model config fields, each a dataclass field with its check
    (``sparse_key: str = ConfigField.name("sparse")``)."""

    @staticmethod
    def name(default: str | Any = MISSING) -> Any:
        """A feature name or batch key: a non-empty string.

        Args:
            default: the default (none: required).
        """
        return checked(_name, default=default)

    @staticmethod
    def names(default: Sequence[str] | Any = MISSING, *, min_len: int = 0) -> Any:
        """A list of distinct feature names (a tuple once checked).

        Args:
            default: the default (none: required).
            min_len: the fewest names allowed.
        """
        return checked(_names, default=default, min_len=min_len)

    @staticmethod
    def tasks() -> Any:
        """A required list of task names (see :func:`task_names`)."""
        return checked(task_names)

    @staticmethod
    def count(default: int, *, low: int) -> Any:
        """An int ``>= low`` (a bool is refused).

        Args:
            default: the default.
            low: the smallest value allowed.
        """
        return checked(_int, default=default, low=low)

    @staticmethod
    def sizes(default: Sequence[int], *, min_len: int = 0) -> Any:
        """A list of layer widths, each ``>= 1`` (a tuple once checked).

        Args:
            default: the default widths.
            min_len: the fewest layers allowed.
        """
        return checked(_sizes, default=default, min_len=min_len)

    @staticmethod
    def dropout(default: float = 0.0) -> Any:
        """A dropout probability in ``[0, 1)`` (a float once checked).

        Args:
            default: the default.
        """
        return checked(_dropout, default=default)

    @staticmethod
    def positive(default: float) -> Any:
        """A finite number ``> 0`` (a float once checked).

        Args:
            default: the default.
        """
        return checked(_positive, default=default)

    @staticmethod
    def choice(default: str, choices: Sequence[str]) -> Any:
        """One of ``choices``, any case (lower case once checked).

        Args:
            default: the default.
            choices: the values allowed (lower case).
        """
        return checked(_choice, default=default, choices=tuple(choices))

    @staticmethod
    def flag(default: bool) -> Any:
        """A bool (``0``/``1`` are refused: YAML says ``true``/``false``).

        Args:
            default: the default.
        """
        return checked(_bool, default=default)

    @staticmethod
    def activation(default: Activation) -> Any:
        """One of :data:`~recstack.pipelines.models.layers.ACTIVATIONS`, any case (lower
        case once checked).

        Args:
            default: the default.
        """
        return checked(_activation, default=default)


def checked(check: Callable[..., Any], *, default: Any = MISSING, **options: Any) -> Any:
    """A dataclass field of a :class:`CheckedConfig` whose value ``check`` validates (and
    normalizes) at construction.

    Args:
        check: a :data:`FieldCheck`; its keyword ``options`` are bound first.
        default: the field's default (none: a required field).
        **options: keyword arguments of ``check`` (``min_len=1``, ``low=0``).
    """
    run = functools.partial(check, **options) if options else check
    return field(default=default, metadata={"check": run})


class CheckedConfig:
    """The base of the model configs (frozen dataclasses): at construction each field
    declared with :func:`checked` is checked and normalized in field order, then
    :meth:`check_consistency` checks what spans fields.

    Every model config has the fields below, which say where a batch holds the model's
    inputs (:class:`~recstack.pipelines.models.EmbeddingModel` reads them).

    Attributes:
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
        dense_dim: the width of the dense features (0: none).
    """

    sparse_key: str
    dense_key: str
    dense_dim: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(owner, f.name, getattr(self, f.name)))
        self.check_consistency()

    def check_consistency(self) -> None:
        """Check what spans fields (each field is checked already); none by default.

        Raises:
            ModelConfigError: fields that do not go together.
        """

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


def config_from_mapping(cls: type[C], data: object) -> C:
    """Build config class ``cls`` from a mapping (e.g. a YAML/TOML table).

    Args:
        cls: the config dataclass.
        data: its fields by name; an instance of ``cls`` is returned as it is.

    Raises:
        ModelConfigError: ``data`` is not a mapping, has unknown keys or lacks required
            ones (named), or a field is invalid.
    """
    if isinstance(data, cls):
        return data
    owner = cls.__name__
    if not isinstance(data, Mapping):
        raise ModelConfigError(f"{owner}: expected a mapping of fields, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ModelConfigError(f"{owner}: unknown field(s) {unknown}; allowed: {', '.join(known)}")
    required = [
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ModelConfigError(f"{owner}: missing required field(s) {missing}")
    return cls(**data)


def config_to_dict(config: object) -> dict[str, Any]:
    """A config's fields as plain JSON/YAML values (tuples become lists).

    Args:
        config: a model config dataclass instance.
    """
    out: dict[str, Any] = {}
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
