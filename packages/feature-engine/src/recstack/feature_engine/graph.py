"""Compiling a list of features into an execution plan, with every check done up front.

The plan is a list of *nodes*. A node has one input (a batch column, another node's output,
or a cross of nodes) and a list of *steps*: runs of elementwise ops merged into one
``program`` step, and the structural steps (truncate, pad, filter, fill) between them.
Nodes are grouped into levels by dependency; the engine runs each level's steps in rounds,
one fused launch per step type per round, whatever the number of features.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from recstack.core.kernels.host import as_int64
from recstack.feature_engine import ops
from recstack.feature_engine.feature import Feature, FeatureError, output_names
from recstack.feature_engine.kernels.dense_program import (
    DOP_CLIP,
    DOP_FILL_NAN,
    DOP_LOG1P,
    DOP_NORMALIZE,
)
from recstack.feature_engine.kernels.sparse_program import OP_BUCKETIZE, OP_HASH, OP_MOD, OP_UMOD

__all__ = [
    "COLUMN_KINDS",
    "BucketizeFloats",
    "ColumnKind",
    "DenseNode",
    "FromColumn",
    "FromCross",
    "FromNode",
    "HashStrings",
    "Node",
    "Plan",
    "Step",
    "StepKind",
    "compile_plan",
    "schema_of",
]

#: What a batch column can be, as a schema names it.
ColumnKind = Literal["int", "float", "int_list", "float_list", "string", "string_list"]
#: The column kinds, in order.
COLUMN_KINDS: tuple[ColumnKind, ...] = get_args(ColumnKind)
#: What a step does to a node's ids: an elementwise ``program``, or a structural step.
StepKind = Literal["program", "truncate", "pad", "filter", "fill"]

_INF = float("inf")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def schema_of(batch: Mapping[str, Any]) -> dict[str, ColumnKind]:
    """The schema (column -> kind) of a batch, for ``FeatureEngine(schema=...)``.

    Keys of a :class:`~recstack.core.KeyedJaggedTensor` in the batch count as ``int_list``
    columns.
    """
    import torch

    from recstack.core import JaggedTensor, KeyedJaggedTensor

    out: dict[str, ColumnKind] = {}
    for name, v in batch.items():
        if isinstance(v, KeyedJaggedTensor):
            for key in v:
                out[key] = "int_list"
        elif isinstance(v, JaggedTensor):
            if v.is_nested:
                out[name] = "string_list"
            elif v.values.dtype == torch.uint8:
                out[name] = "string"
            else:
                out[name] = "float_list" if v.values.dtype.is_floating_point else "int_list"
        elif isinstance(v, torch.Tensor) and v.dim() == 1:
            out[name] = "float" if v.dtype.is_floating_point else "int"
    return out


@dataclass
class Step:
    """One unit of work on a node's ids."""

    kind: StepKind
    params: Any


class FromColumn(NamedTuple):
    """A node's input: a batch column."""

    column: str
    kind: ColumnKind


class FromNode(NamedTuple):
    """A node's input: another node's output."""

    node: str


class FromCross(NamedTuple):
    """A node's input: the hashed per-row cartesian product of other nodes' outputs."""

    nodes: tuple[str, ...]
    seed: int  # the uint64 seed's int64 bit pattern


class HashStrings(NamedTuple):
    """A string column's strings, hashed as the column is read."""

    seed: int  # the uint64 seed's int64 bit pattern


class BucketizeFloats(NamedTuple):
    """A float column, through its dense ops, bucketized as the column is read."""

    boundaries: tuple[float, ...]  # compared in float64
    right: bool
    prepare: tuple[tuple[int, float, float], ...]  # dense program slots run first


@dataclass
class Node:
    """A sparse feature (or a hidden intermediate one) in the plan."""

    name: str
    emit: bool
    input: FromColumn | FromNode | FromCross
    on_read: HashStrings | BucketizeFloats | None = None  # for a FromColumn input
    steps: list[Step] = field(default_factory=list)
    level: int = 0


@dataclass
class DenseNode:
    """A dense float feature: a column and a program of dense ops."""

    name: str
    column: str
    ops: list[tuple[int, float, float]]


@dataclass
class Plan:
    """Every sparse node by dependency level, the dense features, and what the plan reads."""

    nodes: list[Node]
    dense: list[DenseNode]
    levels: list[list[Node]]
    columns: dict[str, ColumnKind]  # the columns the plan reads, with their kinds
    # Emitted features computed by an identical node under another name: name -> that node.
    aliases: dict[str, str] = field(default_factory=dict)


def _program_ops(op: Any, feature: str, index: int = 0) -> list[tuple[Any, ...]] | None:
    """The program opcodes of an elementwise op on int ids, or None when not elementwise.

    A Bucketize entry carries its boundaries as a fifth item; the engine lays every
    feature's boundaries out in one table and puts the offset in their place.
    """
    if isinstance(op, ops.Hash):
        out = [(OP_HASH, as_int64(op.seed), 0, 0)]
        if op.buckets is not None:
            out.append((OP_UMOD, op.buckets, 0, 0))
        return out
    if isinstance(op, ops.Mod):
        return [(OP_MOD, op.m, 0, 0)]
    if isinstance(op, ops.Bucketize):
        bounds = tuple(
            _int64(b, f"op {index} (Bucketize) boundary", feature) for b in op.boundaries
        )
        return [(OP_BUCKETIZE, -1, len(bounds), int(op.right), bounds)]
    return None


def _int64(value: int | float, what: str, feature: str) -> int:
    """``value`` as the exact int64 an op on ids compares or writes.

    Ints are taken as they are: a round trip through float64 would move those past 2**53.
    """
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinities too
            raise FeatureError(f"{what} must be an integer on integer ids, got {value!r}", feature)
        value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise FeatureError(
            f"{what} {value} is outside int64 [-2**63, 2**63 - 1], the range of ids", feature
        )
    return value


def _float64_boundaries(op: ops.Bucketize, index: int, feature: str) -> tuple[float, ...]:
    """A float column's boundaries as the float64 they are compared in."""
    out: list[float] = []
    for b in op.boundaries:
        try:
            out.append(float(b))
        except OverflowError:
            raise FeatureError(
                f"op {index} (Bucketize) boundary {b} is beyond float64, the precision a "
                "float column is bucketized in",
                feature,
            ) from None
    for k in range(1, len(out)):
        if out[k] <= out[k - 1]:
            raise FeatureError(
                f"op {index} (Bucketize) boundaries {op.boundaries[k - 1]} and "
                f"{op.boundaries[k]} are the same float64 ({out[k]!r}), the precision a "
                "float column is bucketized in",
                feature,
            )
    return tuple(out)


def _float32(value: int | float) -> float:
    """``value`` rounded to float32 (to nearest even, as the dense kernels round their
    parameters); ``inf`` where a finite value is beyond float32."""
    try:
        x = float(value)
    except OverflowError:  # an int past float64
        return math.inf if value > 0 else -math.inf
    return struct.unpack("f", struct.pack("f", x))[0]


def _dense_param(value: int | float, what: str, feature: str, *, finite: bool) -> float:
    """A dense op's parameter as its table holds it, refused where float32 (what dense ops
    compute in) would turn it into NaN or an infinity nobody wrote."""
    if isinstance(value, float) and math.isnan(value):
        raise FeatureError(f"{what} is NaN", feature)
    if isinstance(value, float) and math.isinf(value):
        if finite:
            raise FeatureError(f"{what} must be finite, got {value!r}", feature)
        return value
    if math.isinf(_float32(value)):
        raise FeatureError(
            f"{what} {value!r} is beyond float32, the precision dense ops compute in", feature
        )
    return float(value)


class _Builder:
    def __init__(self, features: Sequence[Feature], schema: Mapping[str, ColumnKind]) -> None:
        self.schema = dict(schema)
        for col, kind in self.schema.items():
            if kind not in COLUMN_KINDS:
                raise FeatureError(
                    f"schema: column {col!r} has unknown kind {kind!r}; the kinds are "
                    + ", ".join(repr(k) for k in COLUMN_KINDS)
                )
        self.features = {f.name: f for f in features}
        self.nodes: dict[str, Node] = {}
        self.dense: list[DenseNode] = []
        self.columns: dict[str, ColumnKind] = {}
        self.sparse_names: set[str] = set()

    def kind_of_source(self, feature: str, source: str) -> str:
        if source in self.features and source != feature:
            return "feature"
        if source in self.schema:
            self.columns[source] = self.schema[source]
            return self.schema[source]
        raise FeatureError(
            f"unknown source {source!r}: not a batch column (schema has "
            f"{sorted(self.schema)}) nor a feature",
            feature,
        )

    def build(self) -> None:
        for f in self.features.values():
            self.add(f)

    def add(self, f: Feature) -> None:
        kind = self.kind_of_source(f.name, f.source)
        chain = list(f.ops)
        dense_ops = (ops.Log1p, ops.Clip, ops.Normalize)
        if kind in ("float", "float_list") and (
            not chain or all(isinstance(o, (*dense_ops, ops.FillMissing)) for o in chain)
        ):
            if kind == "float_list":
                raise FeatureError("dense ops need a float column with one value a row", f.name)
            self.dense.append(
                DenseNode(
                    f.name, f.source, [self.dense_op(o, f.name, i) for i, o in enumerate(chain)]
                )
            )
            return
        buckets = (i for i, o in enumerate(chain) if isinstance(o, ops.Bucketize))
        first_bucketize = next(buckets, len(chain))
        for i, op in enumerate(chain):
            if isinstance(op, dense_ops) and not (
                kind in ("float", "float_list") and i < first_bucketize
            ):
                raise FeatureError(
                    f"op {i} ({type(op).__name__}) is a dense op but the feature is sparse "
                    "at that point (dense ops go on float columns, before any Bucketize)",
                    f.name,
                )
        node = Node(
            f.name, True, FromNode(f.source) if kind == "feature" else FromColumn(f.source, kind)
        )
        start = 0  # the ops the node's steps take, from chain[start] on
        if kind in ("string", "string_list"):
            if not chain or not isinstance(chain[0], ops.Hash):
                raise FeatureError("a string column needs Hash as its first op", f.name)
            node.on_read = HashStrings(as_int64(chain[0].seed))
            if chain[0].buckets is not None:
                node.steps.append(Step("program", [(OP_UMOD, chain[0].buckets, 0, 0)]))
            start = 1
        elif kind in ("float", "float_list"):
            # Dense ops may prepare the numbers (fill NaN, clip, log) before they are
            # bucketized; they run in float32, as dense features do.
            pre = 0
            while pre < len(chain) and isinstance(chain[pre], (*dense_ops, ops.FillMissing)):
                pre += 1
            if pre == len(chain) or not isinstance(chain[pre], ops.Bucketize):
                raise FeatureError(
                    "a float column becomes ids only through Bucketize, got "
                    f"{type(chain[pre]).__name__ if pre < len(chain) else 'no Bucketize'}",
                    f.name,
                )
            if pre and kind == "float_list":
                raise FeatureError("dense ops before Bucketize need a float column", f.name)
            node.on_read = BucketizeFloats(
                _float64_boundaries(chain[pre], pre, f.name),
                chain[pre].right,
                tuple(self.dense_op(o, f.name, i) for i, o in enumerate(chain[:pre])),
            )
            start = pre + 1
        self.sparse_names.add(f.name)
        self.nodes[f.name] = node
        self.add_steps(node, chain, start)

    def dense_op(self, op: Any, feature: str, index: int) -> tuple[int, float, float]:
        # The ops check their own values, but an op may have been built around them, and
        # float32 limits are the engine's: checked again here, where the feature is known.
        where = f"op {index} ({type(op).__name__})"
        if isinstance(op, ops.Log1p):
            return (DOP_LOG1P, 0.0, 0.0)
        if isinstance(op, ops.Clip):
            lo, hi = (
                inf if v is None else _dense_param(v, f"{where} {side}", feature, finite=False)
                for v, side, inf in ((op.min, "min", -_INF), (op.max, "max", _INF))
            )
            return (DOP_CLIP, lo, hi)
        if isinstance(op, ops.Normalize):
            mean = _dense_param(op.mean, f"{where} mean", feature, finite=True)
            std = _dense_param(op.std, f"{where} std", feature, finite=True)
            if not _float32(std) > 0:
                raise FeatureError(
                    f"{where} std {op.std!r} is not above 0 in float32, the precision dense "
                    "ops compute in",
                    feature,
                )
            return (DOP_NORMALIZE, mean, std)
        if isinstance(op, ops.FillMissing):
            # NaN would fill a NaN with NaN: a no-op that hides a config mistake.
            value = _dense_param(op.value, f"{where} value", feature, finite=False)
            return (DOP_FILL_NAN, value, 0.0)
        raise FeatureError(f"{type(op).__name__} does not apply to a dense float column", feature)

    def add_steps(self, node: Node, chain: list[Any], start: int = 0) -> None:
        for i in range(start, len(chain)):
            op = chain[i]
            if isinstance(op, ops.MultiHash):
                if i != len(chain) - 1:
                    raise FeatureError("MultiHash must be the last op", node.name)
                node.emit = False
                for k in range(op.k):
                    child = Node(f"{node.name}/{k}", True, FromNode(node.name))
                    child.steps.append(
                        Step("program", _program_ops(ops.Hash(op.seed + k, op.buckets), node.name))
                    )
                    self.nodes[child.name] = child
                    self.sparse_names.add(child.name)
                return
            if isinstance(op, ops.Cross):
                if node.name in op.others:
                    raise FeatureError("a cross of a feature with itself", node.name)
                if isinstance(node.input, FromNode) and not node.steps:
                    # Crossing another feature's output as it is: read it directly.
                    first = node.input.node
                    if first in op.others:
                        raise FeatureError(
                            f"crosses {first!r} with itself (it is both the source and in others)",
                            node.name,
                        )
                else:
                    # Ops before the cross make a hidden node the cross reads; its name must
                    # not take the place of a feature's (a feature may be named "x@pre").
                    hidden = f"{node.name}@pre"
                    while hidden in self.features or hidden in self.nodes:
                        hidden += "@"
                    pre = Node(hidden, False, node.input, node.on_read, node.steps)
                    self.nodes[pre.name] = pre
                    first = pre.name
                node.input = FromCross((first, *op.others), as_int64(op.seed))
                node.on_read = None
                node.steps = []
                if node.name in op.others:
                    raise FeatureError("a cross of a feature with itself", node.name)
                if op.buckets is not None:
                    node.steps.append(Step("program", [(OP_UMOD, op.buckets, 0, 0)]))
                continue
            prog = _program_ops(op, node.name, i)
            if prog is not None:
                if node.steps and node.steps[-1].kind == "program":
                    node.steps[-1].params.extend(prog)
                else:
                    node.steps.append(Step("program", list(prog)))
            elif isinstance(op, ops.Truncate):
                node.steps.append(Step("truncate", (op.max_len, op.side)))
            elif isinstance(op, ops.Pad):
                node.steps.append(Step("pad", (op.length, op.value, op.side, op.truncate)))
            elif isinstance(op, ops.FilterIds):
                node.steps.append(Step("filter", (op.ids, op.keep)))
            elif isinstance(op, ops.FillMissing):
                value = _int64(op.value, f"op {i} (FillMissing) value", node.name)
                node.steps.append(Step("fill", value))
            else:  # pragma: no cover - every op class is handled above
                raise FeatureError(f"unsupported op {type(op).__name__}", node.name)

    def deps(self, node: Node) -> list[str]:
        if isinstance(node.input, FromNode):
            return [node.input.node]
        if isinstance(node.input, FromCross):
            return list(node.input.nodes)
        return []

    def levels(self) -> list[list[Node]]:
        for node in self.nodes.values():
            for dep in self.deps(node):
                if dep not in self.nodes:
                    kind = "dense" if any(d.name == dep for d in self.dense) else "unknown"
                    raise FeatureError(
                        f"depends on {dep!r}, which is {kind}: sources and crosses need a "
                        "sparse feature",
                        node.name.split("@")[0],
                    )
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(name: str, path: list[str]) -> int:
            node = self.nodes[name]
            if state.get(name) == 2:
                return node.level
            if state.get(name) == 1:
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise FeatureError(f"the features form a cycle: {cycle}", name.split("@")[0])
            state[name] = 1
            node.level = 1 + max((visit(d, [*path, name]) for d in self.deps(node)), default=-1)
            state[name] = 2
            return node.level

        for name in list(self.nodes):
            visit(name, [])
        depth = 1 + max((n.level for n in self.nodes.values()), default=-1)
        # Within a level, crosses come last (the engine appends the cross kernel's output
        # after the other inputs), and nodes with the same steps sit together, so each
        # step touches a few contiguous ranges of the level buffer rather than scattered
        # nodes.
        return [
            sorted(
                (n for n in self.nodes.values() if n.level == k),
                key=lambda n: (isinstance(n.input, FromCross), [s.kind for s in n.steps]),
            )
            for k in range(depth)
        ]


def check_names(features: Sequence[Feature]) -> None:
    """Refuse a name defined twice, whether as a feature or as a MultiHash output.

    Nodes and output keys are looked up by name: a second definition would silently
    replace the first.
    """
    owners: dict[str, tuple[int, str]] = {}

    def what(name: str, feature: str) -> str:
        if name == feature:
            return f"feature {feature!r}"
        return f"MultiHash output {name!r} of feature {feature!r}"

    for i, f in enumerate(features):
        for name in output_names(f):
            if name not in owners:
                owners[name] = (i, f.name)
                continue
            j, first = owners[name]
            if first == name == f.name:
                raise FeatureError(f"defined twice (features[{j}] and features[{i}])", name)
            raise FeatureError(
                f"name {name!r} is defined twice: as {what(name, first)} (features[{j}]) and "
                f"as {what(name, f.name)} (features[{i}])",
                f.name,
            )


def compile_plan(features: Sequence[Feature], schema: Mapping[str, ColumnKind]) -> Plan:
    """Check ``features`` against ``schema`` and lay out their execution."""
    check_names(features)
    b = _Builder(features, schema)
    b.build()
    levels, aliases = _dedupe(b.levels())
    nodes = [n for level in levels for n in level]
    return Plan(nodes, b.dense, levels, b.columns, aliases)


def _dedupe(levels: list[list[Node]]) -> tuple[list[list[Node]], dict[str, str]]:
    """Drop nodes that repeat an earlier node's input and steps; they read its output."""
    canon: dict[str, str] = {}
    seen: dict[str, str] = {}
    aliases: dict[str, str] = {}
    out: list[list[Node]] = []
    for level in levels:
        kept: list[Node] = []
        for n in level:
            if isinstance(n.input, FromNode):
                n.input = FromNode(canon.get(n.input.node, n.input.node))
            elif isinstance(n.input, FromCross):
                n.input = FromCross(tuple(canon.get(c, c) for c in n.input.nodes), n.input.seed)
            sig = repr((n.input, n.on_read, [(s.kind, s.params) for s in n.steps]))
            if sig in seen:
                canon[n.name] = seen[sig]
                if n.emit:
                    aliases[n.name] = seen[sig]
                continue
            seen[sig] = n.name
            kept.append(n)
        out.append(kept)
    return out, aliases
