"""Feature: a named output computed from one source column (or feature) by a chain of ops."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recstack.feature_engine.ops import MultiHash, Op, OpError, op_from_dict

__all__ = ["Feature", "FeatureError", "output_names"]


class FeatureError(ValueError):
    """A feature (or the graph of features) is invalid; the message names the feature."""

    def __init__(self, message: str, feature: str | None = None) -> None:
        self.feature = feature
        super().__init__(f"feature {feature!r}: {message}" if feature else message)


@dataclass(frozen=True)
class Feature:
    """``name`` = ``ops`` applied in order to ``source`` (a batch column or another feature).

    For example:

        >>> from recstack.feature_engine import Feature, Hash, Truncate
        >>> Feature("hist", "click_history", [Hash(buckets=1 << 20), Truncate(50)]).name
        'hist'
    """

    name: str
    source: str
    ops: tuple[Op, ...] = ()

    def __init__(self, name: str, source: str | None = None, ops: Sequence[Op] = ()) -> None:
        if not isinstance(name, str) or not name:
            raise FeatureError(f"name must be a non-empty string, got {name!r}")
        source = name if source is None else source
        if not isinstance(source, str) or not source:
            raise FeatureError(f"source must be a column or feature name, got {source!r}", name)
        if isinstance(ops, Op):
            ops = (ops,)
        ops = tuple(ops)
        for i, op in enumerate(ops):
            if not isinstance(op, Op):
                raise FeatureError(f"op {i} is a {type(op).__name__}, not an Op", name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "ops", ops)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feature:
        if not isinstance(data, Mapping):
            raise FeatureError(f"a feature must be a mapping, got {data!r}")
        name = data.get("name")
        unknown = set(data) - {"name", "source", "ops"}
        if unknown:
            raise FeatureError(f"unknown field(s) {sorted(unknown)}", name)
        raw_ops = data.get("ops", [])
        if not isinstance(raw_ops, Sequence) or isinstance(raw_ops, (str, bytes)):
            raise FeatureError(f"ops must be a list, got {raw_ops!r}", name)
        ops = []
        for i, raw in enumerate(raw_ops):
            try:
                ops.append(op_from_dict(raw))
            except OpError as e:
                op = raw.get("op") if isinstance(raw, Mapping) else None
                label = f" ({op})" if isinstance(op, str) else ""
                raise FeatureError(f"op {i}{label}: {e}", name) from e
        return cls(name, data.get("source"), ops)


def output_names(feature: Feature) -> list[str]:
    """The names ``feature`` defines: its own and, after a MultiHash, ``name/0..k-1``."""
    names = [feature.name]
    last = feature.ops[-1] if feature.ops else None
    if isinstance(last, MultiHash):
        names += [f"{feature.name}/{k}" for k in range(last.k)]
    return names
