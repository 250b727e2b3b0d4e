"""FeatureEngine: a batch of raw columns in, model-ready features out, in a few launches.

Every sparse feature of a dependency level lives in one key-major buffer, like a
``KeyedJaggedTensor``: row ``f*B + b`` of feature ``f`` is
``vals[offs[f*B + b] : offs[f*B + b + 1]]``. The first level's buffer is built from the
batch columns in one launch (ids copied, floats bucketized, strings hashed, each with its
own parameters). Then every round of steps runs each step type once over the whole
buffer, with a per-feature parameter table and an identity setting for the features it
does not touch:

* the elementwise ops (Hash, Mod, Bucketize and their chains) in one program kernel;
* Truncate, Pad and FillMissing in one reshape op; FilterIds in one filter op;
* crosses in one kernel, reading their components straight from an earlier level's buffer.

So a forward pass costs a number of launches (and host syncs: one per op that changes row
lengths, one per level) that depends on the op types and the depth of the feature graph,
never on the number of features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.feature_engine.feature import Feature, FeatureError
from recstack.feature_engine.graph import (
    ColumnKind,
    FromCross,
    FromNode,
    Node,
    Plan,
    check_names,
    compile_plan,
    schema_of,
)
from recstack.feature_engine.kernels.concat import concat_1d
from recstack.feature_engine.kernels.cross import cross_checked, cross_tables
from recstack.feature_engine.kernels.dense_program import dense_program
from recstack.feature_engine.kernels.filter_rows import filter_rows
from recstack.feature_engine.kernels.reshape_rows import reshape_rows
from recstack.feature_engine.kernels.sparse_program import sparse_program
from recstack.feature_engine.tables import LevelTables, reshape_bound

__all__ = ["FeatureEngine"]

#: Which input columns the output batch keeps (see :class:`FeatureEngine`).
Passthrough = Literal["unused", "all", "none"]

# Column dtypes the first-level kernel reads directly; others are converted to the first.
_ID_DTYPES = (torch.int64, torch.int32, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float64)
_READABLE = {
    "int": _ID_DTYPES,
    "int_list": _ID_DTYPES,
    "float": _FLOAT_DTYPES,
    "float_list": _FLOAT_DTYPES,
}


@dataclass
class _Buffer:
    """One level's result: its nodes' ids, row offsets, and where each node's ids start."""

    nodes: list[Node]
    vals: torch.Tensor
    offs: torch.Tensor
    spans: list[int]
    size: int
    _lens: torch.Tensor | None = field(default=None, repr=False)

    def lens(self) -> torch.Tensor:
        if self._lens is None:
            self._lens = self.offs[1:] - self.offs[:-1]
        return self._lens

    def ids(self, a: int, b: int) -> torch.Tensor:
        return self.vals[self.spans[a] : self.spans[b]]

    def lengths(self, a: int, b: int) -> torch.Tensor:
        return self.lens()[a * self.size : b * self.size]


class FeatureEngine(nn.Module):
    """Runs a graph of :class:`Feature` definitions on batches.

    Args:
        features: the features (or config dicts of them).
        schema: ``column -> kind`` of the input batches (kinds: int, float, int_list,
            float_list, string, string_list; see :func:`schema_of`). With it every check
            happens here, at construction; without it the first batch supplies it.
        sparse_key: batch key of the output :class:`KeyedJaggedTensor` of sparse features.
        dense_key: batch key of the output ``[B, n]`` float32 tensor of dense features.
        passthrough: which input columns the output batch keeps: ``"unused"`` (those no
            feature reads), ``"all"`` or ``"none"``. A kept column named like an output
            key the engine writes (``sparse_key``, or ``dense_key`` when there are dense
            features) is refused with a :class:`FeatureError` naming it, at construction
            for the schema's columns and at the batch for others: rename the column, pick
            another key or change ``passthrough``.

    ``engine(batch)`` returns a new dict. Outputs on CPU (torch reference) and CUDA (Triton)
    are bit-identical for integer ops.
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        schema: Mapping[str, ColumnKind] | None = None,
        *,
        sparse_key: str = "sparse",
        dense_key: str = "dense",
        passthrough: Passthrough = "unused",
    ) -> None:
        super().__init__()
        self.features = [f if isinstance(f, Feature) else Feature.from_dict(f) for f in features]
        check_names(self.features)  # needs no schema: refused here even without one
        if passthrough not in get_args(Passthrough):
            allowed = ", ".join(repr(p) for p in get_args(Passthrough))
            raise ValueError(f"passthrough must be one of {allowed}, got {passthrough!r}")
        for what, key in (("sparse_key", sparse_key), ("dense_key", dense_key)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{what} must be a non-empty string, got {key!r}")
        if sparse_key == dense_key:
            raise ValueError(
                f"sparse_key and dense_key are both {sparse_key!r}: one would replace the other"
            )
        self.sparse_key, self.dense_key, self.passthrough = sparse_key, dense_key, passthrough
        self._schema = dict(schema) if schema is not None else None
        self._plan: Plan | None = None
        if schema is not None:
            self._set_plan(compile_plan(self.features, self._schema))
            for column in self._schema:
                self._check_passthrough(column)
        self._tables: dict[tuple[int, str], LevelTables] = {}
        self._dense_tables: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross: dict[tuple[int, str], Any] = {}

    def _set_plan(self, plan: Plan) -> None:
        self._plan = plan
        # Where each node's output lives: (level, index in the level).
        self._where = {n.name: (k, i) for k, ns in enumerate(plan.levels) for i, n in enumerate(ns)}
        # The emitted nodes, in level order, as maximal runs of one level's buffer (with
        # their keys), then the features an identical node computed under another name.
        self._emit_runs = [
            (k, a, b, [ns[i].name for i in range(a, b)])
            for k, ns in enumerate(plan.levels)
            for a, b in _ranges([i for i, n in enumerate(ns) if n.emit])
        ]
        for alias, node in plan.aliases.items():
            k, i = self._where[node]
            self._emit_runs.append((k, i, i + 1, [alias]))
        # The keys the output batch gets from the engine rather than from the input.
        self._outputs = {
            key: kind
            for key, kind, used in (
                (self.sparse_key, "sparse", bool(self._emit_runs)),
                (self.dense_key, "dense", bool(plan.dense)),
            )
            if used
        }

    def _passes_through(self, column: str) -> bool:
        assert self._plan is not None
        return self.passthrough == "all" or (
            self.passthrough == "unused" and column not in self._plan.columns
        )

    def _check_passthrough(self, column: str) -> None:
        """Refuse a kept input column under a key an output takes: the output would
        silently replace it."""
        if column in self._outputs and self._passes_through(column):
            kind = self._outputs[column]
            raise FeatureError(
                f"input column {column!r} would pass through (passthrough="
                f"{self.passthrough!r}) under the key {column!r}, which the engine's {kind} "
                f"output takes ({kind}_key={column!r}) and would silently replace: rename "
                f"the column, pass another {kind}_key, or passthrough='none'"
            )

    @property
    def plan(self) -> Plan | None:
        return self._plan

    def extra_repr(self) -> str:
        return f"{len(self.features)} features"

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        plan = self._plan
        if plan is None:
            self._schema = schema_of(batch)
            self._set_plan(compile_plan(self.features, self._schema))
            plan = self._plan
            assert plan is not None
        columns = self._columns(batch, plan)
        size = self._batch_size(columns)
        device = self._device(columns)
        levels: list[_Buffer] = []
        for k, nodes in enumerate(plan.levels):
            levels.append(self._run_level(k, nodes, columns, size, device, levels))
        out: dict[str, Any] = {}
        if self.passthrough != "none":
            for name, value in batch.items():
                if self._passes_through(name):
                    self._check_passthrough(name)
                    out[name] = value
        if self._emit_runs:
            out[self.sparse_key] = self._sparse_output(levels, size, device)
        if plan.dense:
            out[self.dense_key] = self._dense(plan, columns, size, device)
        return out

    def _sparse_output(self, levels: list[_Buffer], size: int, device: torch.device) -> Any:
        keys: list[str] = []
        per_key: list[int] = []
        v_parts: list[torch.Tensor] = []
        l_parts: list[torch.Tensor] = []
        for k, a, b, names in self._emit_runs:
            buf = levels[k]
            keys += names
            per_key += [buf.spans[i + 1] - buf.spans[i] for i in range(a, b)]
            v_parts.append(buf.ids(a, b))
            l_parts.append(buf.lengths(a, b))
        one = len(v_parts) == 1  # one run: the level buffer itself, no copy
        return KeyedJaggedTensor(
            keys,
            v_parts[0] if one else _cat(v_parts),
            l_parts[0] if one else _cat(l_parts),
            stride=size,
            length_per_key=per_key,
        )

    def _columns(self, batch: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
        cols: dict[str, Any] = {}
        wanted = plan.columns
        for name, v in batch.items():
            if isinstance(v, KeyedJaggedTensor):
                for key in v:
                    if key in wanted:
                        cols[key] = v[key]
            elif name in wanted:
                cols[name] = v
        if len(cols) != len(wanted):
            missing = sorted(set(wanted) - set(cols))
            raise FeatureError(f"the batch has no column(s) {missing}")
        for name, kind in wanted.items():
            if _kind_of(cols[name]) != kind:
                raise FeatureError(
                    f"column {name!r} should be {kind} (as in the schema), got "
                    f"{_describe(cols[name])}"
                )
        return cols

    @staticmethod
    def _batch_size(cols: Mapping[str, Any]) -> int:
        sizes = {
            name: (len(v) if isinstance(v, JaggedTensor) else int(v.shape[0]))
            for name, v in cols.items()
        }
        if len(set(sizes.values())) > 1:
            raise FeatureError(f"columns disagree on the batch size: {sizes}")
        return next(iter(sizes.values()), 0)

    @staticmethod
    def _device(cols: Mapping[str, Any]) -> torch.device:
        for v in cols.values():
            return v.device
        return torch.device("cpu")

    def _tables_for(self, level: int, nodes: list[Node], device: torch.device) -> LevelTables:
        key = (level, str(device))
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = LevelTables(nodes, device)
        return tables

    # ------------------------------------------------------------------ one level

    def _run_level(
        self,
        level: int,
        nodes: list[Node],
        cols: Mapping[str, Any],
        size: int,
        device: torch.device,
        levels: list[_Buffer],
    ) -> _Buffer:
        f = len(nodes)
        tables = self._tables_for(level, nodes, device)
        if level == 0:
            vals, offs, counts = self._inputs_from_columns(tables, cols, size, device)
        else:
            vals, offs, counts = self._inputs_from_nodes(level, nodes, size, device, levels)
        # Ops that change row lengths write into an upper bound of their output, tracked
        # per node on the host, so nothing waits on the device until the level ends.
        bounds = counts
        ends: list[torch.Tensor] = []
        caps: list[int] = []
        if size:  # without rows every op is the identity
            for ops in tables.rounds:
                for kind, table in ops:
                    if kind == "program":
                        # Node f's ids start at offs[f*B]: the strided view is every node's
                        # span. In place: nodes without ops in this round cost nothing.
                        vals = sparse_program(
                            vals, offs[::size], *table, check_offsets=False, out=vals
                        )
                        continue
                    if kind == "reshape":
                        params, rows = table
                        bounds = [
                            reshape_bound(b, r, size) for b, r in zip(bounds, rows, strict=True)
                        ]
                        vals, offs = reshape_rows(
                            vals, offs, size, params, check_offsets=False, capacity=sum(bounds)
                        )
                    else:
                        vals, offs = filter_rows(
                            vals, offs, size, *table, check_offsets=False, capacity=sum(bounds)
                        )
                    ends.append(offs[-1:])
                    caps.append(sum(bounds))
        # One sync per level: where every node's ids start (for slicing and the output), and
        # the true size after each bounded op.
        if size:
            got = torch.cat([offs[::size], *ends]).tolist() if ends else offs[::size].tolist()
            spans, totals = got[: f + 1], got[f + 1 :]
            for total, cap in zip(totals, caps, strict=True):
                if total > cap:  # pragma: no cover - the bounds above are exact maxima
                    raise RuntimeError(
                        f"FeatureEngine: level {level} produced {total} ids past its bound {cap}"
                    )
        else:
            spans = [0] * (f + 1)
        return _Buffer(nodes, vals, offs, spans, size)

    def _inputs_from_columns(
        self, tables: LevelTables, cols: Mapping[str, Any], size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The first level's buffer (every node's column read, hashed or bucketized at once),
        and each node's number of ids."""
        prepared = self._prepare_floats(tables.prepared, cols, size, device)
        items: list[torch.Tensor] = []
        row_offsets: list[torch.Tensor | None] = []
        string_offsets: list[torch.Tensor | None] = []
        for src in tables.sources:
            v = cols[src.column]
            kind = src.column_kind
            if kind == "string":
                items.append(v.values)
                row_offsets.append(None)
                string_offsets.append(v.offsets)
            elif kind == "string_list":
                items.append(v.values.values)
                row_offsets.append(v.offsets)
                string_offsets.append(v.values.offsets)
            else:
                jagged = kind.endswith("_list")
                x = prepared[src.prepared] if src.prepared >= 0 else (v.values if jagged else v)
                items.append(x if x.dtype in _READABLE[kind] else x.to(_READABLE[kind][0]))
                row_offsets.append(v.offsets if jagged else None)
                string_offsets.append(None)
        assert tables.gather is not None
        counts = [
            t.shape[0] if so is None else so.shape[0] - 1
            for t, so in zip(items, string_offsets, strict=True)
        ]
        return (*tables.gather(items, row_offsets, string_offsets, size), counts)

    def _prepare_floats(
        self, nodes: list[Node], cols: Mapping[str, Any], size: int, device: torch.device
    ) -> torch.Tensor | None:
        """``[n, B]`` float32: each node's column through its dense ops (one program)."""
        if not nodes:
            return None
        columns = [cols[n.input.column] for n in nodes]
        programs = [list(n.on_read.prepare) for n in nodes]
        return self._run_dense("prepare", columns, programs, size, device).t().contiguous()

    def _inputs_from_nodes(
        self,
        level: int,
        nodes: list[Node],
        size: int,
        device: torch.device,
        levels: list[_Buffer],
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """A later level's buffer (slices of earlier levels' buffers, then the crosses'
        output) and each node's number of ids."""
        v_parts: list[torch.Tensor] = []
        l_parts: list[torch.Tensor] = []
        sources = [self._where[n.input.node] for n in nodes if isinstance(n.input, FromNode)]
        counts = [levels[k].spans[i + 1] - levels[k].spans[i] for k, i in sources]
        for k, a, b in _source_runs(sources):
            v_parts.append(levels[k].ids(a, b))
            l_parts.append(levels[k].lengths(a, b))
        crosses = [n for n in nodes if isinstance(n.input, FromCross)]
        if crosses:
            # Cross nodes come after the others in the level buffer (see graph.levels).
            cv, cl, per_cross = self._crosses(level, crosses, size, device, levels)
            v_parts.append(cv)
            l_parts.append(cl)
            counts += per_cross
        if len(v_parts) == 1:
            # A slice of an earlier level is copied: this level's steps work in place.
            vals, lens = (v_parts[0].clone() if not crosses else v_parts[0]), l_parts[0]
        else:
            vals = _cat(v_parts)
            lens = _cat(l_parts)
        offs = torch.zeros(len(nodes) * size + 1, dtype=torch.int64, device=device)
        torch.cumsum(lens, 0, out=offs[1:])
        return vals, offs, counts

    def _crosses(
        self,
        level: int,
        crosses: list[Node],
        size: int,
        device: torch.device,
        levels: list[_Buffer],
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        comps = list(dict.fromkeys(c for n in crosses for c in n.input.nodes))
        homes = {self._where[c][0] for c in comps}
        key = (level, str(device))
        if key not in self._cross:
            if len(homes) == 1:
                # Every component in one level buffer: the kernel reads that buffer itself.
                index = {c: self._where[c][1] for c in comps}
            else:
                index = {c: i for i, c in enumerate(comps)}
            tables = cross_tables(
                [[index[c] for c in n.input.nodes] for n in crosses],
                [n.input.seed for n in crosses],
                device,
            )
            self._cross[key] = tables
        tables = self._cross[key]
        if len(homes) == 1:
            buf = levels[homes.pop()]
            return cross_checked(buf.vals, buf.offs, size, tables, len(buf.nodes))
        # Components spread over several levels: gather them into one buffer first.
        where = [self._where[c] for c in comps]
        vals = _cat([levels[k].ids(i, i + 1) for k, i in where])
        lens = _cat([levels[k].lengths(i, i + 1) for k, i in where])
        offs = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=device)
        torch.cumsum(lens, 0, out=offs[1:])
        return cross_checked(vals, offs, size, tables, len(comps))

    def _dense(
        self, plan: Plan, cols: Mapping[str, Any], size: int, device: torch.device
    ) -> torch.Tensor:
        columns = [cols[d.column] for d in plan.dense]
        return self._run_dense("dense", columns, [d.ops for d in plan.dense], size, device)

    def _run_dense(
        self,
        use: str,
        columns: list[torch.Tensor],
        programs: list[list[tuple[int, float, float]]],
        size: int,
        device: torch.device,
    ) -> torch.Tensor:
        """``[B, n]`` float32: the ``[B]`` columns through their dense programs, one launch.

        ``use`` keys the program tables, built on the first batch and kept per device.
        """
        x = concat_1d(columns, dtype=torch.float32)
        key = (use, str(device))
        if key not in self._dense_tables:
            self._dense_tables[key] = _dense_program_tables(programs, device)
        ops_t, params_t = self._dense_tables[key]
        return dense_program(x.view(len(columns), size), ops_t, params_t)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """int64 pieces as one tensor: ``torch.cat`` (cheapest on the host; one CUDA launch
    for up to 128 contiguous inputs of one dtype), or one pointer-table launch for more."""
    if len(parts) <= 64:
        return torch.cat(parts)
    return concat_1d(parts, dtype=torch.int64)


def _kind_of(v: Any) -> str | None:
    """The schema kind of a batch value (see :func:`schema_of`), or None."""
    if isinstance(v, JaggedTensor):
        inner = v.values
        if isinstance(inner, JaggedTensor):
            ok = not inner.is_nested and inner.values.dtype == torch.uint8
            return "string_list" if ok else None
        if inner.dim() != 1:
            return None
        if inner.dtype == torch.uint8:
            return "string"
        return "float_list" if inner.dtype.is_floating_point else "int_list"
    if isinstance(v, torch.Tensor) and v.dim() == 1:
        return "float" if v.dtype.is_floating_point else "int"
    return None


def _describe(v: Any) -> str:
    if isinstance(v, JaggedTensor):
        return f"a JaggedTensor of {_describe(v.values)}"
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__


def _dense_program_tables(
    programs: list[list[tuple[int, float, float]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (op codes, params) tables of :func:`dense_program` for per-feature op lists."""
    k = max((len(p) for p in programs), default=0) or 1
    ops = [[code for code, _, _ in p] + [0] * (k - len(p)) for p in programs]
    params = [[[a, b] for _, a, b in p] + [[0.0, 0.0]] * (k - len(p)) for p in programs]
    return (
        torch.tensor(ops, dtype=torch.int64, device=device),
        torch.tensor(params, dtype=torch.float64, device=device),
    )


def _ranges(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted node indices as maximal runs ``[a, b)``."""
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _source_runs(where: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(level, index)`` locations as maximal runs ``(level, a, b)`` of one buffer."""
    out: list[tuple[int, int, int]] = []
    for k, i in where:
        if out and out[-1][0] == k and out[-1][2] == i:
            out[-1] = (k, out[-1][1], i + 1)
        else:
            out.append((k, i, i + 1))
    return out
