"""Reading a run configuration: YAML or TOML by extension, ``--set`` overrides, the keys
readers inherit, then the checked :class:`RunConfig`."""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from recstack.pipelines.config.data_sections import EVAL_INHERITS
from recstack.pipelines.config.errors import ConfigError
from recstack.pipelines.config.fields import Where, describe_value, parse_dataclass
from recstack.pipelines.config.overrides import Override, apply_overrides
from recstack.pipelines.config.schema import RunConfig

__all__ = ["EXTENSIONS", "load_config", "parse_config", "read_document"]

#: Configuration formats by file extension.
EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed configuration file (plain values, nothing checked yet).

    Args:
        path: a ``.yaml``/``.yml`` or ``.toml`` file.

    Raises:
        ConfigError: an unknown extension, an unreadable file, a syntax error (with its
            line), a key given twice, or a top level that is not a mapping.
    """
    file = os.fspath(path)
    fmt = EXTENSIONS.get(Path(file).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format from the extension; name it {', '.join(EXTENSIONS)}",
            file=file,
        )
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read it: {e}", file=file) from None
    doc = _parse_toml(text, file) if fmt == "toml" else _parse_yaml(text, file)
    if doc is None:
        raise ConfigError("is empty", file=file)
    if not isinstance(doc, dict):
        raise ConfigError(f"the top level must be a mapping, got {describe_value(doc)}", file=file)
    return doc


def _parse_toml(text: str, file: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=file) from None


def _parse_yaml(text: str, file: str) -> Any:
    import yaml  # a runtime dependency only where YAML files are read

    try:
        _check_duplicate_keys(yaml, yaml.compose(text, Loader=yaml.SafeLoader), file)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {problem}", file=file) from None


def _check_duplicate_keys(yaml: Any, root: Any, file: str) -> None:
    """PyYAML keeps the last of a repeated key silently; a config file means one."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    prior = first.setdefault(key.value, key)
                    if prior is not key:
                        raise ConfigError(
                            f"key {key.value!r} is given twice (lines "
                            f"{prior.start_mark.line + 1} and {key.start_mark.line + 1})",
                            file=file,
                        )
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _inherit(doc: MutableMapping[str, Any]) -> None:
    """Fill in reader keys a section leaves out: ``data.eval`` from ``data.train``
    (:data:`EVAL_INHERITS`), a stage's ``train``/``eval`` from ``data.train``/``data.eval``."""
    data = doc.get("data")
    if not isinstance(data, Mapping):
        return
    train, evaluation = data.get("train"), data.get("eval")
    train = train if isinstance(train, Mapping) else None
    from_train = {k: v for k, v in (train or {}).items() if k in EVAL_INHERITS}
    if isinstance(evaluation, Mapping):
        evaluation = {**from_train, **evaluation}
        data["eval"] = evaluation
    for stage in doc.get("stages") or ():
        if not isinstance(stage, MutableMapping):
            continue
        if isinstance(stage.get("train"), Mapping) and train is not None:
            stage["train"] = {**train, **stage["train"]}
        if isinstance(stage.get("eval"), Mapping):
            base = evaluation if isinstance(evaluation, Mapping) else from_train
            stage["eval"] = {**base, **stage["eval"]}


def parse_config(
    document: Mapping[str, Any],
    *,
    file: str | None = None,
    overrides: Iterable[str | Override] | None = (),
) -> RunConfig:
    """A checked :class:`RunConfig` from a parsed document.

    Args:
        document: the configuration as plain values (not changed).
        file: the file it came from, for error messages.
        overrides: ``key.path=value`` overrides applied first (``None``: none).

    Raises:
        ConfigError: anything invalid, naming the file and the full key path.
    """
    doc = copy.deepcopy(dict(document))
    try:
        applied = apply_overrides(doc, overrides or ())
    except ConfigError as e:
        raise ConfigError(e.reason, file=file) from None
    _inherit(doc)
    try:
        config = parse_dataclass(RunConfig, doc, "", Where(file))
    except ConfigError as e:
        note = next((o for o in reversed(applied) if _covers(o.key, e.key)), None)
        if note is None:
            raise
        raise ConfigError(f"{e.reason} (from --set {note.text})", file=file, key=e.key) from None
    object.__setattr__(config, "file", file)
    return config


def _covers(key: str, error_key: str | None) -> bool:
    if error_key is None:
        return False
    return error_key == key or error_key.startswith((key + ".", key + "["))


def load_config(
    path: str | os.PathLike[str], overrides: Iterable[str | Override] | None = ()
) -> RunConfig:
    """Read and check a run configuration file.

    Args:
        path: a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file.
        overrides: ``key.path=value`` strings (``--set``), applied in order; each value
            is parsed as YAML (``3`` an int, ``[a, b]`` a list, ``null`` ``None``);
            ``None``: none.

    Raises:
        ConfigError: anything invalid, naming the file and the full key path.
    """
    return parse_config(read_document(path), file=os.fspath(path), overrides=overrides)
