"""The parameter tables of one dependency level, built once per device and reused per batch.

A level's sparse nodes share one key-major buffer. Each round (the ``r``-th step of every
node that has one) runs at most three fused ops over the whole buffer, each with one table
row per node and an identity row for the nodes it does not touch:

* ``program``: the elementwise op chains (:func:`~.kernels.sparse_program.sparse_program`);
* ``reshape``: Truncate, Pad and FillMissing (:func:`~.kernels.reshape_rows.reshape_rows`),
  with the table's rows on the host too, to bound each node's ids;
* ``filter``: FilterIds (:func:`~.kernels.filter_rows.filter_rows`).

The first level also keeps how each node reads its batch column (:class:`Source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from recstack.feature_engine.graph import ColumnKind, FromColumn, Node
from recstack.feature_engine.kernels.gather import (
    SEG_FLOAT,
    SEG_IDS,
    SEG_STRING,
    GatherPlan,
    SegmentKind,
)
from recstack.feature_engine.kernels.sparse_program import OP_BUCKETIZE

__all__ = ["LevelTables", "RoundOp", "Source", "reshape_bound"]

#: The fused op one entry of a round runs (see the module docstring).
RoundOp = Literal["program", "reshape", "filter"]

_MASK64 = (1 << 64) - 1
# reshape_rows' identity row: keep everything, no padding, no minimum length.
_KEEP_ALL = [-1, 0, -1, 0, 0, 0]


@dataclass(frozen=True)
class Source:
    """How a first-level node reads its column: segment kind and its static parameters."""

    column: str
    column_kind: ColumnKind
    kind: SegmentKind
    seed: int = 0
    bound_start: int = 0
    bound_count: int = 0
    right: bool = False
    prepared: int = -1  # row of the dense-prepared floats, or -1


class LevelTables:
    """Every table one level needs, on one device."""

    def __init__(self, nodes: list[Node], device: torch.device) -> None:
        self.rounds: list[list[tuple[RoundOp, Any]]] = []
        depth = max((len(n.steps) for n in nodes), default=0)
        for r in range(depth):
            here = [(i, n.steps[r]) for i, n in enumerate(nodes) if len(n.steps) > r]
            ops: list[tuple[RoundOp, Any]] = []
            program = [(i, s) for i, s in here if s.kind == "program"]
            if program:
                ops.append(("program", _program_table(program, len(nodes), device)))
            shape = [(i, s) for i, s in here if s.kind in ("truncate", "pad", "fill")]
            if shape:
                ops.append(("reshape", _reshape_table(shape, len(nodes), device)))
            drop = [(i, s) for i, s in here if s.kind == "filter"]
            if drop:
                ops.append(("filter", _filter_table(drop, len(nodes), device)))
            self.rounds.append(ops)
        self.sources: list[Source] = []
        self.prepared: list[Node] = []
        self.float_bounds: torch.Tensor | None = None
        self.gather: GatherPlan | None = None
        if nodes and isinstance(nodes[0].input, FromColumn):
            self._sources(nodes, device)
            self.gather = GatherPlan(
                [src.kind for src in self.sources],
                seeds=[src.seed for src in self.sources],
                bound_starts=[src.bound_start for src in self.sources],
                bound_counts=[src.bound_count for src in self.sources],
                rights=[src.right for src in self.sources],
                boundaries=self.float_bounds,
            )

    def _sources(self, nodes: list[Node], device: torch.device) -> None:
        bounds: list[float] = []
        for n in nodes:
            column, kind = n.input
            if kind in ("string", "string_list"):
                seed = n.on_read.seed & _MASK64
                self.sources.append(Source(column, kind, SEG_STRING, seed=seed))
            elif kind in ("float", "float_list"):
                boundaries, right, pre = n.on_read
                prepared = -1
                if pre:
                    prepared = len(self.prepared)
                    self.prepared.append(n)
                self.sources.append(
                    Source(
                        column,
                        kind,
                        SEG_FLOAT,
                        bound_start=len(bounds),
                        bound_count=len(boundaries),
                        right=bool(right),
                        prepared=prepared,
                    )
                )
                bounds.extend(boundaries)
            else:
                self.sources.append(Source(column, kind, SEG_IDS))
        if bounds:
            self.float_bounds = torch.tensor(bounds, dtype=torch.float64, device=device)


def _program_table(
    picked: list[tuple[int, Any]], f: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _reshape_table(
    picked: list[tuple[int, Any]], f: int, device: torch.device
) -> tuple[torch.Tensor, list[list[int]]]:
    """``[F, 6]``: keep, keep_last, pad_to, min_len, pad_value, pad_left (and its rows)."""
    rows = [list(_KEEP_ALL) for _ in range(f)]
    for i, s in picked:
        if s.kind == "truncate":
            length, side = s.params
            rows[i] = [length, int(side == "left"), -1, 0, 0, 0]
        elif s.kind == "pad":
            length, value, side, trunc = s.params
            rows[i] = [length, int(trunc == "left"), length, 0, value, int(side == "left")]
        else:  # fill: an empty row becomes one id
            rows[i] = [-1, 0, -1, 1, s.params, 0]
    return torch.tensor(rows, dtype=torch.int64, device=device).view(f, 6), rows


def reshape_bound(bound: int, row: list[int], size: int) -> int:
    """Most ids a node can hold after a reshape row, from the most it held before."""
    keep, _, pad_to, min_len, _, _ = row
    if pad_to >= 0:
        return size * pad_to
    kept = bound if keep < 0 else min(bound, size * keep)
    return kept + size * min_len  # a row is at most max(kept, min_len) <= kept + min_len


def _filter_table(
    picked: list[tuple[int, Any]], f: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted distinct id lists per node, their offsets, and the mode (1 drop, 2 keep)."""
    lists: list[list[int]] = [[] for _ in range(f)]
    mode = [0] * f
    for i, s in picked:
        ids, keep = s.params
        lists[i] = sorted(set(int(x) for x in ids))
        mode[i] = 2 if keep else 1
    offsets = [0]
    for ids in lists:
        offsets.append(offsets[-1] + len(ids))
    flat = [x for ids in lists for x in ids]
    return (
        torch.tensor(flat, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int64, device=device),
        torch.tensor(mode, dtype=torch.int64, device=device),
    )
