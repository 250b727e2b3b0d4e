"""LookupPlanner: which features read which physical table, and each batch's lookup plan."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import bags_kjt

from recstack.core import JaggedTensor
from recstack.embedding_engine.autograd import lookup_forward
from recstack.embedding_engine.config import FeatureConfig, Initializer, TableConfig
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM
from recstack.embedding_engine.physical import build_physical_tables
from recstack.embedding_engine.planner import (
    FeatureRead,
    LookupPlanner,
    compact_table,
    sequence_output,
)
from recstack.embedding_engine.sequence import PaddedSequence
from recstack.embedding_engine.sparse_grads import SparseGradStore

DIM = 4
TABLES = [
    TableConfig("a", dim=DIM, initializer=Initializer.normal(std=0.5)),
    TableConfig("b", dim=DIM, eval_default="zeros"),
    TableConfig("c", dim=2),
]
FEATURES = [
    FeatureConfig("seq_b", "b", pooling="none"),
    FeatureConfig("mean_a", "a", pooling="mean"),
    FeatureConfig("sum_b", "b", pooling="sum", weighted=True),
    FeatureConfig("tile_a", "a", pooling="tile", max_len=2),
    FeatureConfig("sum_c", "c"),
]


def setup(device: torch.device):
    physical, located = build_physical_tables(TABLES, device)
    planner = LookupPlanner(physical, located, FEATURES, device)
    return physical, planner


def batch(device: torch.device, **bags: list[list[int]]):
    names = [f.name for f in FEATURES]
    full = {n: bags.get(n, [[], []]) for n in names}
    weights = {n: [[1.0] * len(bag) for bag in full[n]] for n in names}
    return bags_kjt(full, device, weights)


def test_features_grouped_by_physical_table(device) -> None:
    _, planner = setup(device)
    reads = planner.reads
    assert list(reads) == ["a+b", "c"]
    ab = reads["a+b"]
    assert [f.config.name for f in ab.pooled] == ["mean_a", "sum_b"]
    assert [f.config.name for f in ab.sequence] == ["seq_b", "tile_a"]
    assert ab.features == ab.pooled + ab.sequence
    assert ab.pooled[1] == FeatureRead(FEATURES[2], 1) and ab.pooled[1].table_index == 1
    assert ab.modes.tolist() == [MODE_MEAN, MODE_SUM]
    assert reads["c"].sequence == [] and reads["c"].modes.tolist() == [MODE_SUM]


def test_training_plan_inserts_and_keeps_the_sort(device) -> None:
    physical, planner = setup(device)
    phys, grads = physical["a+b"], SparseGradStore()
    kjt = batch(device, mean_a=[[1, 2], [2]], seq_b=[[2], []], tile_a=[[1], [3, 1]])
    jts = planner.batch_features("a+b", kjt)
    assert list(jts) == ["mean_a", "sum_b", "seq_b", "tile_a"]
    plan = planner.plan(phys, jts, 2, training=True, step=4, grads=grads)
    assert plan.table is phys.values and plan.name == "a+b" and plan.batch_size == 2
    assert len(phys.hash_table) == 4  # a's 1, 2, 3 and b's 2
    assert plan.row_sort is not None and plan.row_sort.num_segments == 4
    assert plan.pooled_offsets.tolist() == [0, 2, 3, 3, 3] and plan.weights is not None
    assert plan.pooled_rows.numel() == 3 and plan.sequence_rows.numel() == 4
    assert plan.sink == grads.add and plan.updater is None
    assert bool((phys.meta.last_seen == 4).all())
    pooled, seq = lookup_forward(plan)
    out = planner.outputs("a+b", jts, pooled, seq, 2, DIM)
    assert list(out) == ["mean_a", "sum_b", "seq_b", "tile_a"]
    assert out["mean_a"].shape == (2, DIM) and out["tile_a"].shape == (2, 2 * DIM)
    assert isinstance(out["seq_b"], JaggedTensor) and out["seq_b"].values.shape == (1, DIM)


def test_eval_plan_reads_held_rows_or_a_compact_table(device) -> None:
    physical, planner = setup(device)
    phys, grads = physical["a+b"], SparseGradStore()
    seen = batch(device, mean_a=[[1], [2]])
    planner.plan(phys, planner.batch_features("a+b", seen), 2, training=True, step=0, grads=grads)
    held = planner.plan(
        phys, planner.batch_features("a+b", seen), 2, training=False, step=1, grads=grads
    )
    assert held.table is phys.values and held.row_sort is None
    assert held.pooled_rows.tolist() == [0, 1]
    unseen = batch(device, mean_a=[[1, 7], []], seq_b=[[7], []])
    plan = planner.plan(
        phys, planner.batch_features("a+b", unseen), 2, training=False, step=1, grads=grads
    )
    assert plan.table is not phys.values and plan.table.num_rows == 3  # (1,a) (7,a) (7,b)
    assert len(phys.hash_table) == 2  # eval inserts nothing
    pooled, seq = lookup_forward(plan)
    a = TABLES[0]
    want_7 = init_rows(torch.tensor([7], device=device), DIM, a.initializer, seed=a.init_seed)
    row_1 = phys.values.gather_rows(torch.tensor([0], device=device))
    torch.testing.assert_close(pooled[0, 0], ((row_1 + want_7) / 2)[0])
    assert not seq.any()  # b's eval default is zeros


def test_compact_table_fills_the_eval_defaults(device) -> None:
    physical, _ = setup(device)
    phys = physical["a+b"]
    unique = torch.tensor([3, 3, 5], device=device)
    tags = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
    table = compact_table(phys, unique, tags, torch.full((3,), -1, device=device))
    a = TABLES[0]
    want = init_rows(unique[:1], DIM, a.initializer, seed=a.init_seed)
    assert torch.equal(table.gather_rows(torch.tensor([0], device=device)), want)
    assert not table.gather_rows(torch.tensor([1, 2], device=device)).any()


def test_weighted_feature_needs_weights(device) -> None:
    physical, planner = setup(device)
    kjt = bags_kjt({f.name: [[1]] for f in FEATURES}, device)  # no weights
    jts = planner.batch_features("a+b", kjt)
    with pytest.raises(ValueError, match="'sum_b' is weighted but the KeyedJaggedTensor"):
        planner.plan(physical["a+b"], jts, 1, training=True, step=0, grads=SparseGradStore())


def test_sequence_output_shapes() -> None:
    rows = JaggedTensor(torch.ones(3, DIM), torch.tensor([0, 3, 3]))
    assert sequence_output(FEATURES[0], rows, 2, DIM) is rows
    tile = sequence_output(FEATURES[3], rows, 2, DIM)
    assert isinstance(tile, torch.Tensor) and tile.shape == (2, 2 * DIM)
    padded = FeatureConfig("p", "a", pooling="none", max_len=2, with_lengths=True)
    seq = sequence_output(padded, rows, 2, DIM)
    assert isinstance(seq, PaddedSequence) and seq.lengths.tolist() == [2, 0]
