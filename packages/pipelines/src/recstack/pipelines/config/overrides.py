"""``--set key.path=value`` overrides of a configuration document."""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

from recstack.pipelines.config.errors import ConfigError

__all__ = ["Override", "apply_overrides", "parse_override"]

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class Override:
    """One ``key.path=value`` override.

    Args:
        text: the override as given (``"trainer.epochs=3"``, ``"tasks[0].weight=2"``).

    Attributes:
        text: the override as given.
        path: the key path's segments (strings for keys, ints for list indices).
        key: the key path, list indices as ``[i]`` (as errors name keys).
        value: the value, parsed as a YAML scalar or flow collection (``3`` is an int,
            ``[a, b]`` a list, ``null`` is ``None``).

    Raises:
        ConfigError: no ``=``, an empty or malformed key path, or a value that is not
            valid YAML.
    """

    def __init__(self, text: str) -> None:
        import yaml

        self.text = text
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
        self.path = _segments(key.strip(), text)
        self.key = _show(self.path)
        try:
            self.value: Any = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None


def _segments(key: str, text: str) -> list[str | int]:
    out: list[str | int] = []
    for part in key.split("."):
        pos = 0
        if not part:
            raise ConfigError(f"--set {text!r}: empty key in {key!r}")
        for m in _SEGMENT.finditer(part):
            if m.start() != pos:
                break
            name, index = m.groups()
            if name is not None and pos == 0 and name.isdigit() and out:
                out.append(int(name))  # "tasks.0.weight" indexes the list like tasks[0]
            else:
                out.append(name if name is not None else int(index))
            pos = m.end()
        if pos != len(part):
            raise ConfigError(f"--set {text!r}: malformed key {key!r}")
    return out


def parse_override(text: str) -> Override:
    """Parse one ``key.path=value`` override.

    Args:
        text: the override as given on the command line.
    """
    return Override(text)


def apply_overrides(
    document: MutableMapping[str, Any], overrides: Iterable[str | Override]
) -> list[Override]:
    """Set each override's value in ``document`` (in place), creating missing mappings
    on the way; later overrides win.

    Args:
        document: the parsed configuration file.
        overrides: ``key.path=value`` strings or parsed :class:`Override` objects.

    Returns:
        The parsed overrides.

    Raises:
        ConfigError: a path through a value that is not a mapping or list, or a list
            index out of range.
    """
    done = []
    for o in overrides:
        o = o if isinstance(o, Override) else Override(o)
        node: Any = document
        for i, seg in enumerate(o.path):
            last = i == len(o.path) - 1
            where = o.path[: i + 1]
            if isinstance(node, list):
                if not isinstance(seg, int) or not 0 <= seg < len(node):
                    raise ConfigError(
                        f"--set {o.text!r}: {_show(where)} is not an item of a list of {len(node)}"
                    )
            elif isinstance(node, MutableMapping):
                if isinstance(seg, int):
                    raise ConfigError(f"--set {o.text!r}: {_show(where[:-1])} is not a list")
                if not last and node.get(seg) is None:
                    node[seg] = {}
            else:
                raise ConfigError(
                    f"--set {o.text!r}: {_show(where[:-1])} holds {node!r}, not a mapping"
                )
            if last:
                node[seg] = o.value
            else:
                node = node[seg]
        done.append(o)
    return done


def _show(path: list[str | int]) -> str:
    return "".join(
        f"[{s}]" if isinstance(s, int) else (f".{s}" if i else s) for i, s in enumerate(path)
    )
