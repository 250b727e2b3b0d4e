"""LevelTables: the per-level parameter tables, and the bound on a node's ids."""

from __future__ import annotations

import torch

from recstack.feature_engine import ops
from recstack.feature_engine.feature import Feature
from recstack.feature_engine.graph import compile_plan
from recstack.feature_engine.kernels.gather import SEG_FLOAT, SEG_IDS, SEG_STRING
from recstack.feature_engine.tables import LevelTables, reshape_bound


def test_reshape_bound() -> None:
    assert reshape_bound(100, [-1, 0, 5, 0, 0, 0], 8) == 40  # padded to 5 per row
    assert reshape_bound(100, [3, 1, -1, 0, 0, 0], 8) == 24  # truncated to 3 per row
    assert reshape_bound(10, [3, 1, -1, 0, 0, 0], 8) == 10  # fewer ids than that
    assert reshape_bound(10, [-1, 0, -1, 1, 7, 0], 8) == 18  # filled: one more per row


def test_rounds_and_sources_of_a_level() -> None:
    features = [
        Feature("a", "ids", [ops.Hash(buckets=10), ops.Truncate(2)]),
        Feature("b", "ids", [ops.FilterIds([1, 2])]),
        Feature("s", "text", [ops.Hash(seed=2**64 - 1)]),
        Feature("f", "x", [ops.Bucketize([0.0, 1.0], right=True)]),
    ]
    plan = compile_plan(features, {"ids": "int_list", "text": "string", "x": "float"})
    tables = LevelTables(plan.levels[0], torch.device("cpu"))
    kinds = {src.column: src.kind for src in tables.sources}
    assert kinds == {"ids": SEG_IDS, "text": SEG_STRING, "x": SEG_FLOAT}
    strings = next(src for src in tables.sources if src.kind == SEG_STRING)
    assert strings.seed == 2**64 - 1 and strings.column_kind == "string"
    assert tables.float_bounds.tolist() == [0.0, 1.0]
    assert [[kind for kind, _ in entries] for entries in tables.rounds] == [
        ["program", "filter"],
        ["reshape"],
    ]
