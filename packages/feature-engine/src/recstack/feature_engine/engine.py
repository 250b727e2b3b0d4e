"""FeatureEngine: a batch of raw columns in, model-ready features out, in a few launches.

Every sparse feature of a dependency level lives in one key-major buffer, like a
``KeyedJaggedTensor``: ``lens[f*B + b]`` ids of feature ``f`` in row ``b``, packed in
``vals``. Each step type then runs once over the whole buffer, with a per-feature parameter
table and an identity setting for the features it does not touch:

* the elementwise ops (Hash, Mod, Bucketize and their chains) in one program kernel;
* Truncate/Pad, FilterIds and FillMissing as a few vectorized ops each;
* crosses in one kernel; string hashing in one launch (per-row seeds); float bucketizing once.

So a forward pass costs a number of launches that depends on the op types and the depth
of the feature graph, never on the number of features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.core.kernels.hash import xxh64_bytes
from recstack.feature_engine.feature import Feature, FeatureError
from recstack.feature_engine.graph import Node, Plan, compile_plan, schema_of
from recstack.feature_engine.kernels.concat import concat_1d
from recstack.feature_engine.kernels.cross import cross
from recstack.feature_engine.kernels.program import (
    OP_BUCKETIZE,
    bucketize_float,
    dense_program,
    sparse_program,
)
from recstack.feature_engine.structural import fill_rows, filter_ids, reshape_rows

__all__ = ["FeatureEngine"]

Passthrough = Literal["unused", "all", "none"]


def _weight(node: Node) -> int:
    """A rough size of a node's ids: list columns hold many ids a row, others one."""
    if node.input[0] == "column" and node.input[2] in ("int_list", "float_list", "string_list"):
        return 16
    return 1


class _Tables:
    """The per-round parameter tables of one level, built once per device."""

    def __init__(self, nodes: list[Node], device: torch.device) -> None:
        # Each round op: (kind, the node indices it touches, its table over those nodes).
        self.rounds: list[list[tuple[str, list[tuple[int, int]], Any]]] = []
        depth = max((len(n.steps) for n in nodes), default=0)
        for r in range(depth):
            here = [(i, n.steps[r]) for i, n in enumerate(nodes) if len(n.steps) > r]
            ops: list[tuple[str, list[int], Any]] = []
            for kind in ("program", "truncate", "pad", "fill", "filter"):
                picked = [(i, s) for i, s in here if s.kind == kind]
                if not picked:
                    continue
                touched = sum(_weight(nodes[i]) for i, _ in picked)
                if kind == "program" and 2 * touched >= sum(_weight(n) for n in nodes):
                    # Elementwise over most of the buffer: one launch over all of it, with
                    # all-NOP programs for the other nodes, beats cutting them out and back.
                    table = self._table(kind, picked, len(nodes), device)
                    ops.append((kind, [(0, len(nodes))], table))
                    continue
                runs = _ranges([i for i, _ in picked])
                local = [(k, s) for k, (_, s) in enumerate(picked)]
                ops.append((kind, runs, self._table(kind, local, len(picked), device)))
            self.rounds.append(ops)

    @staticmethod
    def _table(kind: str, picked: list[tuple[int, Any]], f: int, device: torch.device) -> Any:
        def full(value: int) -> list[int]:
            return [value] * f

        if kind == "program":
            k = max(len(s.params) for _, s in picked)
            prog = torch.zeros(f, k, 4, dtype=torch.int64)
            bounds: list[int] = []
            for i, s in picked:
                for j, op in enumerate(s.params):
                    if op[0] == OP_BUCKETIZE:
                        prog[i, j] = torch.tensor([OP_BUCKETIZE, len(bounds), op[2], op[3]])
                        bounds.extend(int(b) for b in op[4])
                    else:
                        prog[i, j] = torch.tensor(op[:4])
            return prog.to(device), torch.tensor(bounds, dtype=torch.int64, device=device)
        if kind in ("truncate", "pad"):
            keep, keep_last, pad_to, pad_value, pad_left = (
                full(-1),
                full(0),
                full(-1),
                full(0),
                full(0),
            )
            for i, s in picked:
                if kind == "truncate":
                    keep[i], keep_last[i] = s.params[0], int(s.params[1] == "left")
                else:
                    length, value, side, trunc = s.params
                    keep[i], keep_last[i] = length, int(trunc == "left")
                    pad_to[i], pad_value[i], pad_left[i] = length, value, int(side == "left")
            return [
                torch.tensor(t, dtype=torch.int64, device=device)
                for t in (keep, keep_last, pad_to, pad_value, pad_left)
            ]
        if kind == "fill":
            apply, value = [False] * f, full(0)
            for i, s in picked:
                apply[i], value[i] = True, s.params
            return (
                torch.tensor(apply, dtype=torch.bool, device=device),
                torch.tensor(value, dtype=torch.int64, device=device),
            )
        mode = full(0)
        ids: list[int] = []
        owner: list[int] = []
        for i, s in picked:
            mode[i] = 2 if s.params[1] else 1
            ids.extend(s.params[0])
            owner.extend([i] * len(s.params[0]))
        return (
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(owner, dtype=torch.int64, device=device),
            torch.tensor(mode, dtype=torch.int64, device=device),
        )


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
            feature reads), ``"all"`` or ``"none"``.

    ``engine(batch)`` returns a new dict. Outputs on CPU (torch reference) and CUDA (Triton)
    are bit-identical for integer ops.
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        schema: Mapping[str, str] | None = None,
        *,
        sparse_key: str = "sparse",
        dense_key: str = "dense",
        passthrough: Passthrough = "unused",
    ) -> None:
        super().__init__()
        self.features = [f if isinstance(f, Feature) else Feature.from_dict(f) for f in features]
        if passthrough not in ("unused", "all", "none"):
            raise ValueError(f"passthrough must be 'unused', 'all' or 'none', got {passthrough!r}")
        self.sparse_key, self.dense_key, self.passthrough = sparse_key, dense_key, passthrough
        self._schema = dict(schema) if schema is not None else None
        self._plan: Plan | None = None
        self._needed: set[str] = set()
        if schema is not None:
            self._set_plan(compile_plan(self.features, self._schema))
        self._tables: dict[tuple[int, str], _Tables] = {}
        self._dense_tables: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # Host tables: cross's launcher reads them on the host, so they stay on the CPU.
        self._cross_tables: dict[
            tuple[str, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]
        ] = {}

    def _set_plan(self, plan: Plan) -> None:
        self._plan = plan
        needed: set[str] = set()
        for n in plan.nodes:
            if n.input[0] == "node":
                needed.add(n.input[1])
            elif n.input[0] == "cross":
                needed.update(n.input[1])
        self._needed = needed

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
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        levels: list[tuple[list[Node], torch.Tensor, torch.Tensor, list[int]]] = []
        for k, nodes in enumerate(plan.levels):
            self._run_level(k, nodes, columns, size, device, outputs, levels)
        out: dict[str, Any] = {}
        if self.passthrough != "none":
            for name, value in batch.items():
                if self.passthrough == "all" or name not in plan.columns:
                    out[name] = value
        # Emitted nodes in level order, cut from each level buffer in contiguous runs.
        keys: list[str] = []
        per_key: list[int] = []
        v_parts: list[torch.Tensor] = []
        l_parts: list[torch.Tensor] = []
        for nodes, vals, lens, at in levels:
            for a, b in _ranges([k for k, n in enumerate(nodes) if n.emit]):
                keys += [nodes[k].name for k in range(a, b)]
                per_key += [at[k + 1] - at[k] for k in range(a, b)]
                v_parts.append(vals[at[a] : at[b]])
                l_parts.append(lens[a * size : b * size])
        if keys:
            one = len(v_parts) == 1  # one run: the level buffer itself, no copy
            out[self.sparse_key] = KeyedJaggedTensor(
                keys,
                v_parts[0] if one else concat_1d(v_parts, dtype=torch.int64, device=device),
                l_parts[0] if one else concat_1d(l_parts, dtype=torch.int64, device=device),
                stride=size,
                length_per_key=per_key,
            )
        if plan.dense:
            out[self.dense_key] = self._dense(plan, columns, size, device)
        return out

    def _columns(self, batch: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
        cols: dict[str, Any] = {}
        wanted = set(plan.columns)
        for name, v in batch.items():
            if isinstance(v, KeyedJaggedTensor):
                for key in v:
                    if key in wanted:
                        cols[key] = v[key]
            elif name in wanted:
                cols[name] = v
        missing = sorted(wanted - set(cols))
        if missing:
            raise FeatureError(f"the batch has no column(s) {missing}")
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

    def _tables_for(self, level: int, nodes: list[Node], device: torch.device) -> _Tables:
        key = (level, str(device))
        if key not in self._tables:
            self._tables[key] = _Tables(nodes, device)
        return self._tables[key]

    # ------------------------------------------------------------------ one level

    def _inputs_from_columns(
        self, nodes: list[Node], cols: Mapping[str, Any], size: int, device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per node: its first ids and its offsets (level 0 reads batch columns)."""
        rows = torch.arange(size + 1, device=device)
        values: list[torch.Tensor | None] = [None] * len(nodes)
        offsets: list[torch.Tensor] = [rows] * len(nodes)
        strings_at: list[int] = []
        floats: list[int] = []
        for i, n in enumerate(nodes):
            _, col, kind = n.input
            v = cols[col]
            if isinstance(v, JaggedTensor) and kind != "string":  # a string is one id a row
                offsets[i] = v.offsets
            if n.first is not None and n.first[0] == "hash_string":
                strings_at.append(i)
            elif n.first is not None and n.first[0] == "bucketize_float":
                floats.append(i)
            else:
                values[i] = v.values if isinstance(v, JaggedTensor) else v
        if strings_at:
            # Every (string column, seed) pair once, all in one launch with per-row seeds.
            pairs = list(dict.fromkeys((nodes[i].input[1], nodes[i].first[1]) for i in strings_at))
            strings = [cols[c] if not cols[c].is_nested else cols[c].values for c, _ in pairs]
            counts = [len(st) for st in strings]
            seeds = torch.tensor([seed for _, seed in pairs], dtype=torch.int64).repeat_interleave(
                torch.tensor(counts)
            )
            joined = _join_strings(strings, device)
            hashed = xxh64_bytes(
                joined.values, joined.offsets, check_offsets=False, seeds=seeds.to(device)
            )
            at, spans = 0, {}
            for pair, n in zip(pairs, counts, strict=True):
                spans[pair] = (at, at + n)
                at += n
            for i in strings_at:
                a, b = spans[(nodes[i].input[1], nodes[i].first[1])]
                values[i] = hashed[a:b]
        if floats:
            parts = [cols[nodes[i].input[1]] for i in floats]
            flat = [p.values if isinstance(p, JaggedTensor) else p for p in parts]
            prepared = [i for i in floats if nodes[i].first[3]]
            if prepared:
                # Dense ops before Bucketize: one dense program over those columns.
                done = self._prepare_floats([nodes[i] for i in prepared], cols, size, device)
                for k, i in enumerate(prepared):
                    flat[floats.index(i)] = done[k]
            counts = [int(t.numel()) for t in flat]
            bounds: list[float] = []
            b_off, right = [0], []
            for i in floats:
                _, boundaries, r, _ = nodes[i].first
                bounds.extend(boundaries)
                b_off.append(len(bounds))
                right.append(int(r))
            v_off = [0]
            for c in counts:
                v_off.append(v_off[-1] + c)
            ids = bucketize_float(
                concat_1d(flat, dtype=torch.float64),
                torch.tensor(v_off, dtype=torch.int64, device=device),
                torch.tensor(bounds, dtype=torch.float64, device=device),
                torch.tensor(b_off, dtype=torch.int64, device=device),
                torch.tensor(right, dtype=torch.int64, device=device),
                check_offsets=False,  # built here from host sizes
            )
            for i, a, b in zip(floats, v_off[:-1], v_off[1:], strict=True):
                values[i] = ids[a:b]
        return [v for v in values if v is not None], offsets

    def _prepare_floats(
        self, nodes: list[Node], cols: Mapping[str, Any], size: int, device: torch.device
    ) -> torch.Tensor:
        """``[n, B]`` float32: each node's column through its dense ops (one program)."""
        x = concat_1d([cols[n.input[1]] for n in nodes], dtype=torch.float32)
        key = ("prepare", tuple(n.name for n in nodes), str(device))
        if key not in self._dense_tables:
            self._dense_tables[key] = _dense_tables([list(n.first[3]) for n in nodes], device)
        ops_t, params_t = self._dense_tables[key]
        return dense_program(x.view(len(nodes), size), ops_t, params_t).t().contiguous()

    def _run_level(
        self,
        level: int,
        nodes: list[Node],
        cols: Mapping[str, Any],
        size: int,
        device: torch.device,
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        levels: list[tuple[list[Node], torch.Tensor, torch.Tensor, list[int]]],
    ) -> None:
        f = len(nodes)
        if level == 0:
            values, offsets = self._inputs_from_columns(nodes, cols, size, device)
            vals = concat_1d(values, dtype=torch.int64) if values else _empty(device)
            lens = _lengths_from_offsets(offsets, size, device)
        else:
            vals, lens = self._inputs_from_nodes(nodes, size, device, outputs)
        tables = self._tables_for(level, nodes, device)
        for ops in tables.rounds:
            for kind, runs, table in ops:
                # Only the nodes this op touches are cut out, transformed and put back: a
                # few contiguous runs (nodes with the same steps sit together).
                whole = runs == [(0, f)]
                count = sum(b - a for a, b in runs)
                at = None if whole else _spans(lens, f, size)  # one sync per cut
                sv, sl = (vals, lens) if at is None else _take_nodes(vals, lens, runs, at, size)
                if kind == "program":
                    prog, bounds = table
                    offsets = _value_offsets(sl, count, size)  # built here: valid by construction
                    sv = sparse_program(sv, offsets, prog, bounds, check_offsets=False)
                elif kind in ("truncate", "pad"):
                    sv, sl = reshape_rows(sv, sl, size, *table)
                elif kind == "fill":
                    sv, sl = fill_rows(sv, sl, size, *table)
                else:
                    sv, sl = filter_ids(sv, sl, size, *table)
                if at is not None:
                    vals, lens = _put_nodes(vals, lens, sv, sl, runs, at, f, size)
                else:
                    vals, lens = sv, sl
        at = _spans(lens, f, size)  # one sync per level: every node's span
        levels.append((nodes, vals, lens, at))
        for k, n in enumerate(nodes):
            if n.name in self._needed:
                outputs[n.name] = (vals[at[k] : at[k + 1]], lens[k * size : (k + 1) * size])

    def _inputs_from_nodes(
        self,
        nodes: list[Node],
        size: int,
        device: torch.device,
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vals_in: list[torch.Tensor] = []
        lens_in: list[torch.Tensor] = []
        crosses = [n for n in nodes if n.input[0] == "cross"]
        cross_vals = cross_lens = None
        if crosses:
            comps = list(dict.fromkeys(c for n in crosses for c in n.input[1]))
            index = {c: i for i, c in enumerate(comps)}
            cv = concat_1d([outputs[c][0] for c in comps], dtype=torch.int64)
            cl = concat_1d([outputs[c][1] for c in comps], dtype=torch.int64)
            row_offsets = torch.zeros(cl.numel() + 1, dtype=torch.int64, device=device)
            torch.cumsum(cl, 0, out=row_offsets[1:])
            key = ("cross", tuple(n.name for n in crosses))
            if key not in self._cross_tables:
                table = [
                    [index[c] for c in n.input[1]] + [-1] * (4 - len(n.input[1])) for n in crosses
                ]
                self._cross_tables[key] = (
                    torch.tensor(table, dtype=torch.int64),
                    torch.tensor([n.input[2] for n in crosses], dtype=torch.int64),
                )
            table, seeds = self._cross_tables[key]
            cross_vals, cross_lens = cross(
                cv, row_offsets, size, table, seeds, num_features=len(comps)
            )
        for n in nodes:
            if n.input[0] == "node":
                v, ln = outputs[n.input[1]]
                vals_in.append(v)
                lens_in.append(ln)
        vals = concat_1d(vals_in, dtype=torch.int64) if vals_in else _empty(device)
        lens = concat_1d(lens_in, dtype=torch.int64) if lens_in else _empty(device)
        if crosses:
            assert cross_vals is not None and cross_lens is not None
            # Cross nodes come after the others in the level buffer (see _order_level).
            vals = torch.cat([vals, cross_vals])
            lens = torch.cat([lens, cross_lens])
        return vals, lens

    def _dense(
        self, plan: Plan, cols: Mapping[str, Any], size: int, device: torch.device
    ) -> torch.Tensor:
        x = concat_1d([cols[d.column] for d in plan.dense], dtype=torch.float32)
        key = ("dense", (), str(device))
        if key not in self._dense_tables:
            self._dense_tables[key] = _dense_tables([d.ops for d in plan.dense], device)
        ops_t, params_t = self._dense_tables[key]
        return dense_program(x.view(len(plan.dense), size), ops_t, params_t)


def _dense_tables(
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


def _empty(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


def _lengths_from_offsets(
    offsets: list[torch.Tensor], size: int, device: torch.device
) -> torch.Tensor:
    """Row lengths of every node, key-major, from their offsets: three launches in all."""
    if not offsets:
        return _empty(device)
    joined = concat_1d(offsets, dtype=torch.int64)
    diffs = joined[1:] - joined[:-1]
    # Drop the differences that straddle two nodes' offset arrays: node k's rows sit at
    # k*(size+1) ... k*(size+1)+size-1, i.e. i + i // size for i in [0, F*size).
    idx = torch.arange(len(offsets) * size, device=device)
    return diffs.index_select(0, idx + idx // max(size, 1))


def _spans(lens: torch.Tensor, f: int, size: int) -> list[int]:
    """Where each node's ids start in the buffer, and the end (one host sync)."""
    if not size or not f:
        return [0] * (f + 1)
    return [0, *torch.cumsum(lens.view(f, size).sum(1), 0).tolist()]


def _ranges(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted node indices as maximal runs ``[a, b)``."""
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _take_nodes(
    vals: torch.Tensor,
    lens: torch.Tensor,
    runs: list[tuple[int, int]],
    at: list[int],
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs' ids and lengths: views for one run, one concatenation for several."""
    if len(runs) == 1:
        a, b = runs[0]
        return vals[at[a] : at[b]], lens[a * size : b * size]
    device = vals.device
    sv = concat_1d([vals[at[a] : at[b]] for a, b in runs], dtype=torch.int64, device=device)
    sl = concat_1d([lens[a * size : b * size] for a, b in runs], dtype=torch.int64, device=device)
    return sv, sl


def _put_nodes(
    vals: torch.Tensor,
    lens: torch.Tensor,
    sv: torch.Tensor,
    sl: torch.Tensor,
    runs: list[tuple[int, int]],
    at: list[int],
    f: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffer with the runs replaced by ``(sv, sl)``; ``at`` are the old spans."""
    # With one run the transformed ids go in whole; several need their own spans.
    sub_at = (
        [0, int(sv.numel())] if len(runs) == 1 else _spans(sl, sum(b - a for a, b in runs), size)
    )
    v_parts, l_parts = [], []
    done, k = 0, 0  # next untouched node, next node of the transformed buffer
    for a, b in runs:
        if done < a:
            v_parts.append(vals[at[done] : at[a]])
            l_parts.append(lens[done * size : a * size])
        n = b - a
        if len(runs) == 1:
            v_parts.append(sv)
            l_parts.append(sl)
        else:
            v_parts.append(sv[sub_at[k] : sub_at[k + n]])
            l_parts.append(sl[k * size : (k + n) * size])
        done, k = b, k + n
    if done < f:
        v_parts.append(vals[at[done] : at[f]])
        l_parts.append(lens[done * size : f * size])
    device = vals.device
    return (
        concat_1d(v_parts, dtype=torch.int64, device=device),
        concat_1d(l_parts, dtype=torch.int64, device=device),
    )


def _value_offsets(lens: torch.Tensor, f: int, size: int) -> torch.Tensor:
    out = torch.zeros(f + 1, dtype=torch.int64, device=lens.device)
    if size and f:
        torch.cumsum(lens.view(f, size).sum(1), 0, out=out[1:])
    return out


def _join_strings(strings: list[JaggedTensor], device: torch.device) -> JaggedTensor:
    """Several byte JaggedTensors as one, in a constant number of launches."""
    if len(strings) == 1:
        return strings[0]
    values = concat_1d([s.values for s in strings], dtype=torch.uint8)
    bases: list[int] = []
    at = 0
    for s in strings:
        bases.append(at)
        at += int(s.values.numel())
    joined = concat_1d([s.offsets for s in strings], dtype=torch.int64)
    sizes = [len(s) + 1 for s in strings]
    shift = torch.tensor(bases, dtype=torch.int64, device=device).repeat_interleave(
        torch.tensor(sizes, device=device)
    )
    # Keep every offset but the leading 0 of each array after the first.
    keep = torch.ones(sum(sizes), dtype=torch.bool, device=device)
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    keep[torch.tensor(starts[1:], dtype=torch.int64, device=device)] = False
    offsets = (joined + shift)[keep]
    return JaggedTensor(values, offsets)
