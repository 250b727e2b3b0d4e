"""Checks shared by the model configs: each field's type and range, and parsing from the
plain mappings a YAML/TOML file gives (lists become tuples, unknown keys are errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from recstack.pipelines.models.layers import ACTIVATIONS

__all__ = ["ModelConfigError", "config_from_mapping", "config_to_dict"]

C = TypeVar("C")


class ModelConfigError(ValueError):
    """An invalid model config, or one that does not fit its embedding collection; the
    message names the config field and the feature."""


def name_field(owner: str, field: str, value: object) -> str:
    """``value`` as a feature or task name: a non-empty string.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
    """
    if not isinstance(value, str) or not value:
        raise ModelConfigError(f"{owner}.{field} must be a non-empty string, got {value!r}")
    return value


def names_field(owner: str, field: str, value: object, *, min_len: int = 0) -> tuple[str, ...]:
    """``value`` as a tuple of distinct names (a list from YAML is accepted).

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
        min_len: the fewest names allowed.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ModelConfigError(
            f"{owner}.{field} must be a list of names, got {type(value).__name__}"
        )
    out = tuple(name_field(owner, f"{field}[{i}]", v) for i, v in enumerate(value))
    if len(out) < min_len:
        raise ModelConfigError(f"{owner}.{field} needs at least {min_len} name(s), got {list(out)}")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise ModelConfigError(f"{owner}.{field} lists {dupes} more than once")
    return out


def int_field(owner: str, field: str, value: object, low: int) -> int:
    """``value`` as an int ``>= low`` (a bool is refused).

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
        low: the smallest value allowed.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModelConfigError(f"{owner}.{field} must be an int >= {low}, got {value!r}")
    return value


def sizes_field(owner: str, field: str, value: object, *, min_len: int = 0) -> tuple[int, ...]:
    """``value`` as a tuple of layer widths, each ``>= 1``.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
        min_len: the fewest layers allowed.
    """
    if not isinstance(value, (list, tuple)):
        raise ModelConfigError(
            f"{owner}.{field} must be a list of layer sizes, got {type(value).__name__}"
        )
    out = tuple(int_field(owner, f"{field}[{i}]", v, 1) for i, v in enumerate(value))
    if len(out) < min_len:
        raise ModelConfigError(
            f"{owner}.{field} needs at least {min_len} layer(s), got {list(out)}"
        )
    return out


def dropout_field(owner: str, field: str, value: object) -> float:
    """``value`` as a dropout probability in ``[0, 1)``.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelConfigError(f"{owner}.{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def bool_field(owner: str, field: str, value: object) -> bool:
    """``value`` as a bool (``0``/``1`` are refused: YAML says ``true``/``false``).

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
    """
    if not isinstance(value, bool):
        raise ModelConfigError(f"{owner}.{field} must be true or false, got {value!r}")
    return value


def activation_field(owner: str, field: str, value: object) -> str:
    """``value`` as one of :data:`~recstack.pipelines.models.layers.ACTIVATIONS`.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
    """
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise ModelConfigError(f"{owner}.{field} must be one of {list(ACTIVATIONS)}, got {value!r}")
    return value.lower()


def task_names(owner: str, field: str, value: object) -> tuple[str, ...]:
    """Task names, which key modules of the model and so may not contain a dot.

    Args:
        owner: the config class's name, for errors.
        field: the field's name, for errors.
        value: the field's value.
    """
    names = names_field(owner, field, value, min_len=1)
    for name in names:
        if "." in name:
            raise ModelConfigError(f"{owner}.{field}: task name {name!r} may not contain '.'")
    return names


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
