"""The saver with the rest of RecStack: a run checkpointed and resumed trains exactly as
one never interrupted (tables, every optimizer slot, admission counts, the data reader's
position, random generators), tables reshard, and a delta chain replays evictions."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from recstack.columnio import ColumnReader, SyntheticCTRConfig, write_synthetic_ctr
from recstack.core import KeyedJaggedTensor, owner
from recstack.embedding_engine import (
    Admission,
    EmbeddingCollection,
    FeatureConfig,
    TableConfig,
)
from recstack.saver import Checkpointer, PerRank
from recstack.sparse_optim import SparseAdam

FEATURES = ["sparse_0", "sparse_1", "sparse_2"]
TABLES = [
    TableConfig("a", dim=4),
    TableConfig("b", dim=4, admission=Admission(min_count=2, counter_slots=4096)),
    TableConfig("c", dim=8),
]


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(
            TABLES,
            [
                FeatureConfig("sparse_0", "a"),
                FeatureConfig("sparse_1", "b"),
                FeatureConfig("sparse_2", "c"),
            ],  # fmt: skip
        )
        self.tower = torch.nn.Sequential(
            torch.nn.Linear(16 + 2, 8),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(8, 1),
        )

    def forward(self, batch: dict) -> torch.Tensor:
        n = batch["label"].shape[0]
        ids = torch.cat([batch[f] % 997 for f in FEATURES])
        kjt = KeyedJaggedTensor(FEATURES, ids, lengths=torch.ones(3 * n, dtype=torch.int64))
        out = self.ec(kjt)
        dense = torch.stack([batch["dense_0"], batch["dense_1"]], 1)
        x = torch.cat([out["sparse_0"], out["sparse_1"], out["sparse_2"], dense], 1)
        return self.tower(x).squeeze(1)


class Run:
    """Model, sparse and dense optimizers and a shuffled reader, as a trainer holds them."""

    def __init__(self, data: Path) -> None:
        torch.manual_seed(0)
        self.model = Model()
        tables = [p.values for p in self.model.ec.physical_tables.values()]
        self.sparse = SparseAdam(tables, lr=0.05, step_count="per_row")
        self.dense = torch.optim.AdamW(self.model.tower.parameters(), lr=0.01)
        self.reader = ColumnReader(data, [*FEATURES, "dense_0", "dense_1", "label"], 32,
                                   shuffle=True, seed=5)  # fmt: skip
        self.batches = iter(self.reader)

    def step(self) -> None:
        batch = next(self.batches)
        logits = self.model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        loss.backward()
        ec = self.model.ec
        grads = ec.sparse_grads()
        self.sparse.step(grads={ec.physical_tables[k].values: g for k, g in grads.items()})
        self.dense.step()
        self.dense.zero_grad()
        if ec.step % 4 == 0:
            ec.evict(older_than_step=ec.step - 6)

    def objects(self) -> dict:
        return {"model": self.model, "sparse": self.sparse, "dense": self.dense,
                "reader": PerRank(self.reader)}  # fmt: skip

    def snapshot(self) -> dict:
        rows = {}
        for name, state in self.model.ec.keyed_states().items():
            for keys, slots in state.export_chunks(1 << 20):
                for i, k in enumerate(keys.tolist()):
                    rows[(name, k)] = {s: v[i].tolist() for s, v in slots.items()}
        dense = {
            k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in self.model.state_dict().items()
        }
        return {
            "rows": rows,
            "dense": dense,
            "sparse_step": self.sparse.state_dict()["state"][0]["step"],
        }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ctr") / "d"
    write_synthetic_ctr(path, SyntheticCTRConfig(num_rows=1200), rows_per_file=500,
                        row_group_size=100)  # fmt: skip
    return path


def same(a: dict, b: dict) -> None:
    assert a["rows"].keys() == b["rows"].keys()
    assert a["rows"] == b["rows"]
    for k, v in a["dense"].items():
        assert torch.equal(v, b["dense"][k]) if isinstance(v, torch.Tensor) else v == b["dense"][k]
    assert a["sparse_step"] == b["sparse_step"]


@pytest.mark.parametrize("blocking", [True, False])
def test_a_resumed_run_equals_an_uninterrupted_one(
    data: Path, tmp_path: Path, blocking: bool
) -> None:
    straight = Run(data)
    for _ in range(14):
        straight.step()
    expect = straight.snapshot()

    first = Run(data)
    for _ in range(8):
        first.step()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(8, blocking=blocking, **first.objects())
    ckpt.wait()
    del first  # the process dies; a new one starts from the checkpoint
    resumed = Run(data)
    report = Checkpointer(tmp_path).load(**resumed.objects())
    assert not report.problems()
    resumed.batches = iter(resumed.reader)
    for _ in range(6):
        resumed.step()
    same(resumed.snapshot(), expect)


def test_optimizer_state_travels_with_its_keys(data: Path, tmp_path: Path) -> None:
    run = Run(data)
    for _ in range(5):
        run.step()
    Checkpointer(tmp_path).save(5, **run.objects())
    slots = {}
    for phys in run.model.ec.physical_tables.values():
        assert set(phys.values.companions) == {"exp_avg", "exp_avg_sq", "row_step"}
    for name, state in run.model.ec.keyed_states().items():
        for keys, chunk in state.export_chunks(1 << 20):
            assert {"values", "exp_avg", "exp_avg_sq", "row_step", "last_seen", "hit_count"} <= set(
                chunk
            )
            for i, k in enumerate(keys.tolist()):
                slots[(name, k)] = chunk["exp_avg"][i].tolist()
    # Unmerged tables on the loading side: rows differ, keys and state do not.
    model = Model()
    model.ec = EmbeddingCollection(
        TABLES, [FeatureConfig(f, t) for f, t in zip(FEATURES, "abc", strict=True)],
        merge_tables=False,
    )  # fmt: skip
    sparse = SparseAdam([p.values for p in model.ec.physical_tables.values()], lr=0.05,
                        step_count="per_row")  # fmt: skip
    # The optimizer's own state is per parameter (two merged tables were saved, three are
    # loaded): only the tables' rows come back, their slots with them.
    Checkpointer(tmp_path).load(model=model, sparse=sparse, include=["model*"], strict=False)
    got = {}
    for name, state in model.ec.keyed_states().items():
        for keys, chunk in state.export_chunks(1 << 20):
            for i, k in enumerate(keys.tolist()):
                got[(name, k)] = chunk["exp_avg"][i].tolist()
    assert got == slots


def test_a_checkpoint_reshards_across_ranks_with_its_optimizer_state(
    data: Path, tmp_path: Path
) -> None:
    run = Run(data)
    for _ in range(5):
        run.step()
    Checkpointer(tmp_path).save(5, **run.objects())
    before = run.snapshot()["rows"]
    union = {}
    for r in range(3):
        rank = Run(data)
        rank.reader = ColumnReader(data, [*FEATURES, "dense_0", "dense_1", "label"], 32,
                                   shuffle=True, seed=5, rank=r, world_size=3)  # fmt: skip
        Checkpointer(tmp_path, rank=r, world_size=3).load(
            model=rank.model, sparse=rank.sparse, dense=rank.dense, exclude=["reader"], strict=False
        )
        for (table, k), row in rank.snapshot()["rows"].items():
            assert int(owner(torch.tensor([k]), 3)[0]) == r
            union[(table, k)] = row
    assert union == before


def test_a_delta_chain_replays_evictions(data: Path, tmp_path: Path) -> None:
    run = Run(data)
    ckpt = Checkpointer(tmp_path)
    for _ in range(3):
        run.step()
    ckpt.save(3, **run.objects())
    for step in (6, 9, 12):
        for _ in range(3):
            run.step()
        ckpt.save(step, delta=True, **run.objects())
    Checkpointer(tmp_path / "full").save(12, **run.objects())
    a, b = Run(data), Run(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpointer(tmp_path).load(**a.objects())
    Checkpointer(tmp_path / "full").load(**b.objects())
    same(a.snapshot(), b.snapshot())
    same(a.snapshot(), run.snapshot())


@pytest.mark.gpu
@pytest.mark.parametrize("blocking", [True, False])
def test_gpu_tables_round_trip_with_their_optimizer_state(tmp_path: Path, blocking: bool) -> None:
    dev = torch.device("cuda")

    def build() -> tuple[EmbeddingCollection, SparseAdam, torch.nn.Linear, torch.optim.Optimizer]:
        torch.manual_seed(0)
        features = [FeatureConfig(f, t) for f, t in zip(FEATURES, "abc", strict=True)]
        ec = EmbeddingCollection(TABLES, features, device=dev)
        sparse = SparseAdam([p.values for p in ec.physical_tables.values()], lr=0.05,
                            step_count="per_row")  # fmt: skip
        tower = torch.nn.Linear(16, 1, device=dev)
        return ec, sparse, tower, torch.optim.Adam(tower.parameters(), lr=0.01)

    def train(ec, sparse, tower, dense, steps: int, seed: int) -> None:
        gen = torch.Generator(device=dev).manual_seed(seed)
        for _ in range(steps):
            ids = torch.randint(0, 5000, (3 * 256,), device=dev, generator=gen)
            kjt = KeyedJaggedTensor(FEATURES, ids, lengths=torch.ones_like(ids))
            out = ec(kjt)
            tower(torch.cat([out[f] for f in FEATURES], 1)).square().mean().backward()
            grads = ec.sparse_grads()
            sparse.step(grads={ec.physical_tables[k].values: g for k, g in grads.items()})
            dense.step()
            dense.zero_grad()

    def rows(ec: EmbeddingCollection) -> dict:
        out = {}
        for name, state in ec.keyed_states().items():
            for keys, slots in state.export_chunks(1 << 20):
                for s, v in slots.items():
                    out[(name, s)] = dict(zip(keys.tolist(), v.cpu().tolist(), strict=True))
        return out

    ec, sparse, tower, dense = build()
    train(ec, sparse, tower, dense, 4, seed=1)
    ckpt = Checkpointer(tmp_path, part_bytes=64 << 10)
    ckpt.save(4, blocking=blocking, ec=ec, sparse=sparse, tower=tower, dense=dense)
    train(ec, sparse, tower, dense, 3, seed=2)  # goes on while an async save writes
    ckpt.wait()
    expect = rows(ec)
    ec2, sparse2, tower2, dense2 = build()
    Checkpointer(tmp_path).load(ec=ec2, sparse=sparse2, tower=tower2, dense=dense2)
    train(ec2, sparse2, tower2, dense2, 3, seed=2)
    assert rows(ec2) == expect
    assert torch.equal(tower2.weight, tower.weight)
