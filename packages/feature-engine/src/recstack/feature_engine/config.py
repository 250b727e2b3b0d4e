"""Feature graph config files: YAML, JSON or TOML in, ``list[Feature]`` out (and back).

Every format holds the same structure::

    version: 1                  # optional; only 1 is supported
    defaults:                   # optional: params merged into every op of that name
      Hash: {seed: 7}           # (params written in the op itself win)
    features:
      - name: user
        source: user_id         # optional, defaults to the name
        ops: [{op: Hash, buckets: 1000000}]
      - name: age_bucket
        source: age
        ops: [{op: Bucketize, boundaries: [18, 25, 35, 50, 65]}]

An op entry is exactly what :meth:`Op.to_dict` gives: ``{op: <Name>, **params}``. In TOML
the features are ``[[features]]`` tables and ops inline tables
(``ops = [{op = "Hash", buckets = 1000000}]``); TOML has no null, so optional params
are left out. YAML needs PyYAML (``pip install recstack-feature-engine[yaml]``) and is
read with ``yaml.safe_load`` only; JSON and TOML use the standard library.

Everything a config can get wrong is a :class:`FeatureConfigError` (a
:class:`FeatureError`, so a ``ValueError``) whose message names the file, the feature
(its name, or its index when it has none) and the op index. Checks that need the whole
graph (unknown sources, cycles) belong to the engine; a ``Cross`` naming its own feature
is caught here.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

from recstack.feature_engine.feature import Feature, FeatureError, output_names
from recstack.feature_engine.ops import OPS, Cross, Op, OpError, op_from_dict

__all__ = [
    "ConfigFormat",
    "FeatureConfigError",
    "dump_features",
    "dumps_features",
    "load_features",
    "loads_features",
]

#: The config formats.
ConfigFormat = Literal["yaml", "json", "toml"]
#: Config formats by file extension.
EXTENSIONS: dict[str, ConfigFormat] = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".toml": "toml",
}
_FORMATS: tuple[ConfigFormat, ...] = get_args(ConfigFormat)
_TOP_KEYS = ("version", "features", "defaults")
_FEATURE_KEYS = ("name", "source", "ops")
_ALIASES = {"Mask": "FilterIds"}
_VERSION = 1
_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class FeatureConfigError(FeatureError):
    """A feature config is invalid: the message says where (file, feature, op) and what.

    Attributes:
        file: the config file, when loading from one.
        feature: the feature's name, when it has a valid one.
        index: the feature's position in ``features``.
        op_index: the op's position in the feature's ``ops``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        feature: str | None = None,
        index: int | None = None,
        op_index: int | None = None,
        op: str | None = None,
    ) -> None:
        where = []
        if feature is not None:
            where.append(
                f"feature {feature!r}" + (f" (features[{index}])" if index is not None else "")
            )
        elif index is not None:
            where.append(f"features[{index}]")
        if op_index is not None:
            where.append(f"op {op_index}" + (f" ({op})" if op else ""))
        text = f"{', '.join(where)}: {message}" if where else message
        super().__init__(f"{file}: {text}" if file is not None else text)
        self.file = file
        self.feature = feature
        self.index = index
        self.op_index = op_index


# --------------------------------------------------------------------------- public API


def load_features(
    source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    format: ConfigFormat | None = None,
) -> list[Feature]:
    """Features from a config file, a parsed config mapping, or a list of feature dicts.

    Args:
        source: a path (``str`` or ``PathLike``; the format comes from its extension:
            ``.yaml``/``.yml``/``.json``/``.toml``), the top-level mapping of a config
            (``{"features": [...], ...}``), or a plain list of feature entries.
        format: ``"yaml"``, ``"json"`` or ``"toml"``, overriding the extension.

    Raises:
        FeatureConfigError: the config is invalid (the message names file, feature, op).
        ImportError: a YAML file and PyYAML is not installed.
    """
    if isinstance(source, (str, os.PathLike)):
        file = str(os.fspath(source))
        fmt = _format_of(file, format)
        try:
            text = Path(file).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise FeatureConfigError(f"is not UTF-8 text ({e})", file=file) from e
        return _parse_document(_parse_text(text, fmt, file), file)
    if format is not None:
        raise TypeError("format= applies to files only; pass a path or use loads_features()")
    if isinstance(source, Mapping):
        return _parse_document(source, None)
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        return _parse_features(source, {}, None)
    raise TypeError(
        "load_features takes a path, a config mapping or a list of feature dicts, "
        f"got {type(source).__name__}"
    )


def loads_features(text: str, format: ConfigFormat) -> list[Feature]:
    """Features from config text in ``format``.

    Args:
        text: the config, as a file would hold it.
        format: ``"yaml"``, ``"json"`` or ``"toml"`` (``"yml"`` is ``"yaml"``).

    Raises:
        FeatureConfigError: the config is invalid (the message names feature and op).
    """
    fmt = _check_format(format, None)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _parse_document(_parse_text(text, fmt, None), None)


def dumps_features(features: Sequence[Feature], format: ConfigFormat) -> str:
    """Config text for ``features`` that :func:`loads_features` reads back equal.

    Writes ``version: 1`` and every feature with all its ops' params (``None`` params
    and a ``source`` equal to the name are left out). Features a load would reject
    (duplicate names, a cross with itself) are refused here, so what is written loads.
    Non-finite floats are written as JSON ``NaN``/``Infinity`` (as Python's ``json``
    does), YAML ``.nan``/``.inf`` and TOML ``nan``/``inf``; seeds above ``2**63 - 1``
    are written to TOML as plain integers, which ``tomllib`` reads but stricter
    TOML parsers may not.

    Args:
        features: the features to write.
        format: ``"yaml"``, ``"json"`` or ``"toml"``.

    Raises:
        FeatureConfigError: a feature a load would refuse.
    """
    fmt = _check_format(format, None)
    doc = _document(features)
    if fmt == "json":
        return _dump_json(doc)
    if fmt == "toml":
        return _dump_toml(doc)
    yaml = _import_yaml()
    return yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100
    )


def dump_features(
    features: Sequence[Feature],
    path: str | os.PathLike[str],
    *,
    format: ConfigFormat | None = None,
) -> None:
    """Write ``features`` to ``path``, written aside and renamed into place.

    A reader never sees half of the file.

    Args:
        features: the features to write.
        path: the config file; its extension gives the format.
        format: ``"yaml"``, ``"json"`` or ``"toml"``, overriding the extension.
    """
    file = str(os.fspath(path))
    text = dumps_features(features, _format_of(file, format))
    target = Path(file)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- formats


def _check_format(fmt: Any, file: str | None) -> ConfigFormat:
    name = fmt.lower() if isinstance(fmt, str) else fmt
    name = "yaml" if name == "yml" else name
    if name not in _FORMATS:
        raise FeatureConfigError(
            f"unknown config format {fmt!r}; use one of {list(_FORMATS)}", file=file
        )
    return name


def _format_of(file: str, fmt: str | None) -> ConfigFormat:
    if fmt is not None:
        return _check_format(fmt, file)
    ext = Path(file).suffix.lower()
    if ext not in EXTENSIONS:
        raise FeatureConfigError(
            f"cannot tell the config format from the extension {ext or '(none)'!r}; "
            f"name the file {'/'.join(EXTENSIONS)} or pass format=",
            file=file,
        )
    return EXTENSIONS[ext]


def _import_yaml() -> Any:
    try:
        import yaml
    except ImportError as e:
        raise ImportError(
            "YAML feature configs need PyYAML: pip install recstack-feature-engine[yaml] "
            "(or write the config as JSON or TOML)"
        ) from e
    return yaml


class _JsonObject(dict):
    """A JSON object that remembers keys given twice (json keeps the last one silently)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    out = _JsonObject()
    duplicates = []
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    if duplicates:
        out.duplicates = tuple(duplicates)
    return out


def _reject_duplicates(mapping: Mapping[str, Any], fail: Callable[[str], NoReturn]) -> None:
    # Checked where the mapping is validated, so the error can name its feature and op.
    duplicates = getattr(mapping, "duplicates", ())
    if duplicates:
        fail(f"duplicate key(s) {list(duplicates)}: a key may be given once")


def _parse_text(text: str, fmt: str, file: str | None) -> Any:
    """The parsed document; syntax errors become FeatureConfigError with line info."""
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            raise FeatureConfigError(
                f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=file
            ) from e
    if fmt == "toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
            raise FeatureConfigError(f"invalid TOML: {e}", file=file) from e
    yaml = _import_yaml()
    try:
        # compose builds nodes only (no objects): used to find duplicate keys with lines.
        _check_yaml_keys(yaml, yaml.compose(text, Loader=yaml.SafeLoader), file)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = f"{problem} ({context})" if context else problem
        raise FeatureConfigError(f"invalid YAML{where}: {detail}", file=file) from e


def _check_yaml_keys(yaml: Any, root: Any, file: str | None) -> None:
    """Raise on a key repeated in one YAML mapping (PyYAML keeps the last silently)."""
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:  # anchors/aliases share nodes
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _YAML_MERGE_TAG:
                    first = seen.setdefault((key.tag, key.value), key)
                    if first is not key:
                        raise FeatureConfigError(
                            f"duplicate key {key.value!r} at line {key.start_mark.line + 1} "
                            f"(first at line {first.start_mark.line + 1})",
                            file=file,
                        )
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


# --------------------------------------------------------------------------- validation


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _did_you_mean(word: Any, options: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _reject_unknown(
    keys: Iterable[Any], allowed: Sequence[str], fail: Callable[[str], NoReturn], message: str
) -> None:
    """``fail`` on the keys outside ``allowed``: ``message`` gets them, a "did you mean"
    hint for the first one and the allowed keys, in that order, as its ``{}`` fields."""
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        fail(message.format(unknown, _did_you_mean(unknown[0], allowed), list(allowed)))


def _op_params(name: str) -> list[str]:
    return [f.name for f in fields(OPS[name])]


def _parse_document(doc: Any, file: str | None) -> list[Feature]:
    def fail(message: str) -> NoReturn:
        raise FeatureConfigError(message, file=file)

    if doc is None:
        fail("is empty: expected a mapping with a 'features' list")
    if not isinstance(doc, Mapping):
        fail(f"expected a mapping with a 'features' list at the top, got {_kind(doc)}")
    _reject_duplicates(doc, fail)
    _reject_unknown(doc, _TOP_KEYS, fail, "unknown top-level key(s) {}{}; allowed: {}")
    if "version" in doc:
        version = doc["version"]
        if type(version) is not int or version != _VERSION:
            fail(f"unsupported version {version!r}: only version {_VERSION} is supported")
    if "features" not in doc:
        fail("missing 'features': the list of feature entries")
    defaults = _parse_defaults(doc.get("defaults"), file)
    return _parse_features(doc["features"], defaults, file)


def _parse_defaults(raw: Any, file: str | None) -> dict[str, dict[str, Any]]:
    def fail(message: str) -> NoReturn:
        raise FeatureConfigError(f"defaults: {message}", file=file)

    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        fail(f"must map op names to params, like {{Hash: {{seed: 7}}}}, got {_kind(raw)}")
    _reject_duplicates(raw, fail)
    out: dict[str, dict[str, Any]] = {}
    for name, params in raw.items():
        if not isinstance(name, str) or _ALIASES.get(name, name) not in OPS:
            fail(f"unknown op {name!r}{_did_you_mean(name, OPS)}; known ops: {sorted(OPS)}")
        canonical = _ALIASES.get(name, name)
        if canonical in out:
            fail(f"{name} is given twice (Mask is FilterIds)")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            fail(f"{name}: params must be a mapping, got {_kind(params)}")
        _reject_duplicates(params, lambda m, name=name: fail(f"{name}: {m}"))
        allowed = _op_params(canonical)
        _reject_unknown(
            params, allowed, fail, f"{name} has no parameter(s) {{}}{{}}; it takes {{}}"
        )
        out[canonical] = dict(params)
    return out


def _parse_features(
    raw: Any, defaults: Mapping[str, Mapping[str, Any]], file: str | None
) -> list[Feature]:
    if not _is_list(raw):
        raise FeatureConfigError(
            f"'features' must be a list of feature entries, got {_kind(raw)}", file=file
        )
    features: list[Feature] = []
    # Every name a feature defines (a MultiHash adds name/0..k-1) -> where it was defined.
    first_index: dict[str, tuple[int, str]] = {}
    for i, entry in enumerate(raw):
        feature = _parse_feature(entry, i, defaults, file)
        for name in output_names(feature):
            if name not in first_index:
                first_index[name] = (i, feature.name)
                continue
            j, owner = first_index[name]
            if owner == name == feature.name:
                message = f"duplicate feature name (first defined at features[{j}])"
            elif owner == name:
                message = (
                    f"its MultiHash output {name!r} is a duplicate feature name (first "
                    f"defined at features[{j}])"
                )
            else:
                message = (
                    f"duplicate feature name {name!r}: MultiHash output of feature "
                    f"{owner!r} (features[{j}])"
                )
            raise FeatureConfigError(message, file=file, feature=feature.name, index=i)
        features.append(feature)
    return features


def _parse_feature(
    entry: Any, index: int, defaults: Mapping[str, Mapping[str, Any]], file: str | None
) -> Feature:
    name = entry.get("name") if isinstance(entry, Mapping) else None
    label = name if isinstance(name, str) and name else None

    def fail(message: str, op_index: int | None = None, op: str | None = None) -> NoReturn:
        raise FeatureConfigError(
            message, file=file, feature=label, index=index, op_index=op_index, op=op
        )

    if not isinstance(entry, Mapping):
        fail(f"a feature entry must be a mapping with name, source and ops, got {_kind(entry)}")
    _reject_duplicates(entry, fail)
    _reject_unknown(entry, _FEATURE_KEYS, fail, "unknown field(s) {}{}; a feature has {}")
    if "name" not in entry:
        fail("missing 'name'")
    if label is None:
        # YAML reads unquoted yes/no/on/1e3 as bools and numbers.
        quote = " (quote it)" if isinstance(name, (bool, int, float)) else ""
        fail(f"name must be a non-empty string, got {name!r}{quote}")
    source = entry.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        fail(f"source must be a non-empty column or feature name, got {source!r}")
    raw_ops = entry.get("ops", [])
    if not _is_list(raw_ops):
        fail(f"ops must be a list of ops like [{{op: Hash}}], got {_kind(raw_ops)}")
    ops = []
    for j, raw_op in enumerate(raw_ops):
        op = _parse_op(raw_op, defaults, lambda m, o=None, j=j: fail(m, j, o))
        if isinstance(op, Cross) and label in op.others:
            fail(f"a feature cannot cross with itself ({label!r} is in others)", j, "Cross")
        ops.append(op)
    try:
        return Feature(label, source, ops)
    except FeatureError as e:  # Feature checks the same things; kept as a safety net
        fail(str(e))


def _parse_op(
    raw: Any, defaults: Mapping[str, Mapping[str, Any]], fail: Callable[..., NoReturn]
) -> Op:
    if not isinstance(raw, Mapping):
        fail(f"an op must be a mapping like {{op: Hash, buckets: 1000}}, got {_kind(raw)}")
    label = raw.get("op") if isinstance(raw.get("op"), str) else None
    _reject_duplicates(raw, lambda m: fail(m, label))
    if "op" not in raw:
        fail(f"missing 'op' (the op's name) in {dict(raw)!r}")
    name = raw["op"]
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in OPS:
        fail(f"unknown op {name!r}{_did_you_mean(name, OPS)}; known ops: {sorted(OPS)}")
    allowed = _op_params(canonical)
    params = [k for k in raw if k != "op"]
    _reject_unknown(
        params,
        allowed,
        lambda m: fail(m, name),
        f"{name} has no parameter(s) {{}}{{}}; it takes {{}}",
    )
    merged = {**defaults.get(canonical, {}), **raw}
    try:
        return op_from_dict(merged)
    except (OpError, TypeError, ValueError, OverflowError) as e:
        from_defaults = sorted(set(merged) - set(raw))
        note = f" (with {from_defaults} from defaults)" if from_defaults else ""
        fail(f"{e}{note}", name)


# --------------------------------------------------------------------------- writing


def _op_entry(op: Op) -> dict[str, Any]:
    """``op.to_dict()`` less the ``None`` params whose default is ``None`` (TOML has no null)."""
    default = {f.name: f.default for f in fields(op)}
    return {
        k: v for k, v in op.to_dict().items() if not (v is None and default.get(k, MISSING) is None)
    }


def _document(features: Sequence[Feature]) -> dict[str, Any]:
    if isinstance(features, Feature) or not _is_list(features):
        raise TypeError(f"features must be a list of Feature, got {type(features).__name__}")
    entries = []
    for i, feature in enumerate(features):
        if not isinstance(feature, Feature):
            raise TypeError(f"features[{i}] is a {type(feature).__name__}, not a Feature")
        entry: dict[str, Any] = {"name": feature.name}
        if feature.source != feature.name:
            entry["source"] = feature.source
        entry["ops"] = [_op_entry(op) for op in feature.ops]
        entries.append(entry)
    doc = {"version": _VERSION, "features": entries}
    _parse_document(doc, None)  # the checks a load makes: what we write loads back
    return doc


def _dump_json(doc: Mapping[str, Any]) -> str:
    # One op per line: json.dumps(indent=2) would put each boundary on its own line.
    def js(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    features = doc["features"]
    lines = ["{", f'  "version": {js(doc["version"])},']
    if not features:
        lines.append('  "features": []')
    else:
        lines.append('  "features": [')
        for i, entry in enumerate(features):
            items = [f"      {js(k)}: {js(v)}" for k, v in entry.items() if k != "ops"]
            ops = entry["ops"]
            if ops:
                body = ",\n".join(f"        {js(op)}" for op in ops)
                items.append(f'      "ops": [\n{body}\n      ]')
            else:
                items.append('      "ops": []')
            comma = "," if i < len(features) - 1 else ""
            lines.append("    {\n" + ",\n".join(items) + "\n    }" + comma)
        lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


class _TomlError(ValueError):
    pass


_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # other control chars must be escaped
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _TOML_BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # Seeds go up to 2**64 - 1, past TOML's signed 64-bit integers. tomllib reads
        # integers of any size, so they are written as they are: what we write, we read.
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has '.', 'e' or both: a TOML float
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(k)} = {_toml_value(v, k)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise _TomlError(f"{key} = {value!r} has no TOML form")


def _dump_toml(doc: Mapping[str, Any]) -> str:
    lines = [f"version = {doc['version']}"]
    features = doc["features"]
    if not features:  # no [[features]] table would mean no 'features' key at all
        lines.append("features = []")
    for i, entry in enumerate(features):
        lines += ["", "[[features]]"]
        where: dict[str, Any] = {"feature": entry["name"], "index": i}
        try:
            for key, value in entry.items():
                if key != "ops":
                    lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
            if not entry["ops"]:
                lines.append("ops = []")
                continue
            lines.append("ops = [")
            for j, op in enumerate(entry["ops"]):
                where.update(op_index=j, op=op["op"])
                lines.append(f"  {_toml_value(op, 'op')},")
            lines.append("]")
        except _TomlError as e:
            raise FeatureConfigError(str(e), **where) from None
    return "\n".join(lines) + "\n"
