"""Parse the plain values a YAML or TOML file gives into typed dataclasses, checking
every key and type against the dataclass's annotations.

Unknown keys are errors with a did-you-mean suggestion, missing required keys are named,
and a value of the wrong type names its key, the expected type and the value. Lists
become tuples where a field says ``tuple`` or ``Sequence``. A field's metadata may give
its key in the file (``{"key": "async"}``) or its own parser (``{"parse": fn}``); a
type may have its own parser in :data:`PARSERS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union

from recstack.pipelines.config.errors import ConfigError, Invalid

__all__ = [
    "NAMES",
    "PARSERS",
    "Where",
    "at_least",
    "check_keys",
    "child",
    "did_you_mean",
    "describe_value",
    "file_key",
    "item",
    "parse_dataclass",
    "parse_value",
    "section_arguments",
]


@dataclass(frozen=True)
class Where:
    """Where the values come from, for error messages.

    Args:
        file: the configuration file, or ``None``.
    """

    file: str | None = None

    def error(self, key: str | None, message: str) -> ConfigError:
        """A :class:`ConfigError` at ``key`` of this file.

        Args:
            key: the full key path.
            message: what is wrong.
        """
        return ConfigError(message, file=self.file, key=key or None)


#: Parsers of types that are not plain dataclasses of the schema: ``type -> fn(value,
#: key, where)``.
PARSERS: dict[type, Callable[[Any, str, Where], Any]] = {}
#: How errors name a list of values of such a type (default ``"mappings"``).
NAMES: dict[type, str] = {}

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def child(path: str, key: str) -> str:
    """The key path of ``key`` inside ``path`` (``"model"`` + ``"dim"`` -> ``"model.dim"``).

    Args:
        path: the parent's key path (``""`` for the top level).
        key: the child's key.
    """
    return f"{path}.{key}" if path else key


def item(path: str, index: int) -> str:
    """The key path of list item ``index`` of ``path`` (``"tasks[0]"``).

    Args:
        path: the list's key path.
        index: the item's index.
    """
    return f"{path}[{index}]"


def did_you_mean(word: object, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""``.

    Args:
        word: the unknown word.
        options: the known words.
    """
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_value(value: object) -> str:
    """``value`` and its kind in YAML words, for error messages: ``'two' (a string)``.

    Args:
        value: the value found.
    """
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    kinds = {bool: "a bool", int: "an int", float: "a number", str: "a string"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    return f"{value!r} ({kind})"


def file_key(field: dataclasses.Field[Any]) -> str:
    """The key of dataclass field ``field`` in a configuration file.

    Args:
        field: the field.
    """
    return field.metadata.get("key", field.name)


def check_keys(
    data: object,
    allowed: Sequence[str],
    required: Sequence[str],
    path: str,
    where: Where,
) -> Mapping[str, Any]:
    """``data`` as a mapping whose keys are all in ``allowed`` and hold ``required``.

    Args:
        data: the value found.
        allowed: the keys it may have.
        required: the keys it must have.
        path: its key path.
        where: the source, for errors.

    Raises:
        ConfigError: not a mapping, an unknown key (with a suggestion), a missing one.
    """
    if not isinstance(data, Mapping):
        raise where.error(path, f"expected a mapping of keys, got {describe_value(data)}")
    for key in data:
        if not isinstance(key, str):
            raise where.error(path, f"keys must be strings, got {key!r}")
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise where.error(
                child(path, key), f"unknown key{hint}; allowed here: {', '.join(allowed)}"
            )
    for key in required:
        if key not in data:
            raise where.error(child(path, key), "required key is missing")
    return data


def at_least(obj: object, low: int, *names: str) -> None:
    """Check that each of ``obj``'s attributes ``names`` is ``None`` or ``>= low``.

    Args:
        obj: a section being constructed.
        low: the smallest value allowed.
        *names: the attributes (keys) to check.

    Raises:
        Invalid: one is smaller, naming it.
    """
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < low:
            raise Invalid(f"must be >= {low}, got {value}", name)


def section_arguments(section: object, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A section's fields as the keyword arguments of the object it configures (a
    section's keys are that object's arguments), less ``exclude``.

    Args:
        section: a section dataclass instance.
        exclude: the fields the builder passes itself (or that are not arguments).
    """
    skip = set(exclude)
    return {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)  # type: ignore[arg-type]
        if f.name not in skip and not f.metadata.get("internal")
    }


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # annotations that name types not importable here
        return {}


def parse_dataclass(cls: type, data: object, path: str, where: Where) -> Any:
    """An instance of dataclass ``cls`` from a mapping of its fields.

    Fields with metadata ``{"internal": True}`` are not keys. Errors raised while
    constructing it are reported at ``path``: an :class:`Invalid` at its own ``key``
    below ``path``, a ``ValueError``/``TypeError`` of another class at ``path``.

    Args:
        cls: the dataclass.
        data: the mapping (from YAML/TOML).
        path: its key path.
        where: the source, for errors.

    Raises:
        ConfigError: an unknown, missing or invalid key.
    """
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    keys = {file_key(f): f for f in fields}
    required = [k for k, f in keys.items() if f.default is MISSING and f.default_factory is MISSING]
    data = check_keys(data, list(keys), required, path, where)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, f in keys.items():
        if key not in data:
            continue
        sub = child(path, key)
        parser = f.metadata.get("parse")
        if parser is not None:
            kwargs[f.name] = parser(data[key], sub, where)
        else:
            kwargs[f.name] = parse_value(hints.get(f.name, Any), data[key], sub, where)
    return construct(cls, kwargs, path, where)


def construct(cls: Callable[..., Any], kwargs: Mapping[str, Any], path: str, where: Where) -> Any:
    """``cls(**kwargs)``, its errors as :class:`ConfigError` at ``path``.

    Args:
        cls: the class.
        kwargs: its arguments.
        path: the key path of what it is built from.
        where: the source, for errors.
    """
    try:
        return cls(**kwargs)
    except Invalid as e:
        raise where.error(child(path, e.key) if e.key else path, e.message) from None
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise where.error(path, str(e)) from None


def _describe(hint: Any) -> str:
    simple = {
        int: "an int",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
        Any: "any value",
    }
    if hint in simple:
        return simple[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return f"a mapping of {_describe(args[1]) if len(args) == 2 else 'values'}"
    if dataclasses.is_dataclass(hint) or hint in PARSERS:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    simple = {int: "ints", float: "numbers", bool: "bools", str: "strings"}
    if hint in simple:
        return simple[hint]
    if hint in NAMES:
        return NAMES[hint]
    if dataclasses.is_dataclass(hint) or hint in PARSERS:
        return "mappings"
    return f"values ({_describe(hint)})"


def _known(hint: Any) -> bool:
    """Whether :func:`parse_value` can check values of ``hint``."""
    origin = typing.get_origin(hint)
    if hint in (int, float, bool, str, type(None), Any) or hint in PARSERS:
        return True
    if dataclasses.is_dataclass(hint):
        return True
    return origin in (Literal, Union, types.UnionType, list, tuple, Sequence, dict, Mapping)


def _wrong(hint: Any, value: object, path: str, where: Where) -> ConfigError:
    return where.error(path, f"expected {_describe(hint)}, got {describe_value(value)}")


def parse_value(hint: Any, value: object, path: str, where: Where) -> Any:
    """``value`` checked (and converted) against type ``hint``.

    Understood: ``int``, ``float`` (an int, or a string such as ``"1e-3"`` that YAML 1.1
    reads as a string, is accepted), ``bool``, ``str``, ``None``, ``Any``, ``Literal``,
    unions, ``list``/``tuple``/``Sequence`` (tuples for the last two), ``dict``/
    ``Mapping`` with string keys, dataclasses and the types in :data:`PARSERS`. Values
    of other types pass unchecked (the class they go to checks them).

    Args:
        hint: the expected type.
        value: the value found.
        path: its key path.
        where: the source, for errors.

    Raises:
        ConfigError: the value does not fit.
    """
    if hint is Any:
        return value
    if hint in PARSERS:
        return PARSERS[hint](value, path, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _parse_union(hint, args, value, path, where)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        # YAML 1.1 reads a bare off / on as a bool: a choice of that name is meant.
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"
        hint_text = did_you_mean(value, [a for a in args if isinstance(a, str)])
        raise where.error(
            path, f"expected {_describe(hint)}, got {describe_value(value)}{hint_text}"
        )
    if hint is type(None):
        if value is None:
            return None
        raise _wrong(hint, value, path, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(hint, value, path, where)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(hint, value, path, where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise _wrong(hint, value, path, where)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _wrong(hint, value, path, where)
    if origin in (list, tuple, Sequence):
        return _parse_list(hint, origin, args, value, path, where)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(hint, value, path, where)
        value_hint = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise where.error(path, f"keys must be strings, got {k!r}")
            out[k] = parse_value(value_hint, v, child(path, k), where)
        return out
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, path, where)  # type: ignore[arg-type]
    return value


def _parse_union(hint: Any, args: tuple[Any, ...], value: object, path: str, where: Where) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _wrong(hint, value, path, where)
    options = [a for a in args if a is not type(None) and _known(a)]
    if not options:
        return value
    if len(options) == 1:
        return parse_value(options[0], value, path, where)
    errors = []
    for option in options:
        try:
            return parse_value(option, value, path, where)
        except ConfigError as e:
            errors.append(e)
    # A mapping for the one mapping-like option: its own error says more than the union's.
    mapping_like = [
        e
        for o, e in zip(options, errors, strict=True)
        if dataclasses.is_dataclass(o) or o in PARSERS
    ]
    if isinstance(value, Mapping) and len(mapping_like) == 1:
        raise mapping_like[0]
    raise _wrong(hint, value, path, where)


def _parse_list(
    hint: Any, origin: Any, args: tuple[Any, ...], value: object, path: str, where: Where
) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _wrong(hint, value, path, where)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise where.error(
                path, f"expected {_describe(hint)}, got {len(value)} values: {list(value)!r}"
            )
        return tuple(
            parse_value(a, v, item(path, i), where)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    item_hint = args[0] if args else Any
    out = [parse_value(item_hint, v, item(path, i), where) for i, v in enumerate(value)]
    return out if origin is list else tuple(out)
