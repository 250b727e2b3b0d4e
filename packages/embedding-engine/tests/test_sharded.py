"""ShardedEmbeddingCollection: with 2 and 3 gloo ranks, each on its share of the batch, the
pooled outputs and, after SparseAdam steps, every id's row equal one process's
EmbeddingCollection on the whole batch (ids on several ranks, a rank's empty features,
tables of two widths); with one rank it is an EmbeddingCollection; clear errors.

Run as a script (``python test_sharded.py RANK WORLD INIT_FILE OUT``) this file is one gloo
rank of those runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.embedding_engine.sharded import ShardedEmbeddingCollection
from recstack.sparse_optim import SparseAdam

THIS = Path(__file__)
TABLES = [TableConfig("item", dim=6), TableConfig("user", dim=3), TableConfig("cat", dim=6)]
FEATURES = [
    FeatureConfig("item", "item", pooling="sum"),
    FeatureConfig("hist", "item", pooling="mean"),
    FeatureConfig("user", "user", pooling="sum"),
    FeatureConfig("cat", "cat", pooling="mean"),
]
BATCH, STEPS, VOCAB = 12, 3, 30
_CAPTURE = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}


def _rows(step: int) -> list[dict[str, list[int]]]:
    """The global batch of a step: ragged bags, empty ones, ids shared across rows."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(BATCH):
        row = {}
        for f in FEATURES:
            n = int(torch.randint(0, 4, (1,), generator=g))
            row[f.name] = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append(row)
    return out


def _kjt(rows: list[dict[str, list[int]]]) -> KeyedJaggedTensor:
    keys = [f.name for f in FEATURES]
    values = [i for k in keys for r in rows for i in r[k]]
    lengths = [len(r[k]) for k in keys for r in rows]
    return KeyedJaggedTensor(
        keys, torch.tensor(values, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
    )


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    dims = {t.name: t.dim for t in TABLES}
    return {f.name: torch.randn(BATCH, dims[f.table], generator=g) for f in FEATURES}


def _train(ec, share: slice) -> dict[str, torch.Tensor]:
    """STEPS steps of SparseAdam on ``share`` of every global batch; the first outputs."""
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    weights = _weights()
    first = {}
    for step in range(STEPS):
        out = ec(_kjt(_rows(step)[share]))
        if step == 0:
            first = {k: v.detach().clone() for k, v in out.items()}
        loss = sum((v * weights[k][share]).sum() for k, v in out.items())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return first


def _table_rows(ec: EmbeddingCollection) -> dict[str, torch.Tensor]:
    """Every id's row (NaN where the collection holds no row for the id), by table."""
    out = {}
    ids = torch.arange(VOCAB)
    for t in TABLES:
        rows = ec.find_rows(t.name, ids)
        values = ec.physical_tables[ec.physical_table_of(t.name)].values
        table = torch.full((VOCAB, t.dim), float("nan"))
        found = rows >= 0
        table[found] = values.gather_rows(rows[found]).float()
        out[t.name] = table
    return out


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    ec = ShardedEmbeddingCollection(TABLES, FEATURES)
    first = _train(ec, slice(rank, None, world))
    tensors = {f"out.{k}": v for k, v in first.items()}
    tensors.update({f"table.{k}": v for k, v in _table_rows(ec.shard).items()})
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_like_one_process_on_the_whole_batch(tmp_path: Path, world: int) -> None:
    args = [str(world), str(tmp_path / "init"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, str(THIS), str(r), *args], env=env, **_CAPTURE)
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(ranks):
        assert p.returncode == 0, f"rank {r}:\n{logs[r][-4000:]}"
    single = EmbeddingCollection(TABLES, FEATURES)
    first = _train(single, slice(None))
    expected = _table_rows(single)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for r, got in enumerate(ranks):
        for name, value in first.items():
            torch.testing.assert_close(got[f"out.{name}"], value[r::world], msg=name)
    for t in TABLES:
        held = [got[f"table.{t.name}"] for got in ranks]
        present = [~h.isnan().any(dim=1) for h in held]
        # Each id lives on exactly one rank: its owner.
        assert torch.equal(sum(p.int() for p in present), (~expected[t.name].isnan().any(1)).int())
        merged = torch.where(
            torch.stack(present).any(0)[:, None], sum(h.nan_to_num() for h in held), float("nan")
        )
        torch.testing.assert_close(merged, expected[t.name], equal_nan=True, msg=t.name)


@pytest.fixture
def one_rank():
    init = os.path.join(tempfile.mkdtemp(), "init")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_is_an_embedding_collection(one_rank) -> None:
    sharded = ShardedEmbeddingCollection(TABLES, FEATURES)
    single = EmbeddingCollection(TABLES, FEATURES)
    first = _train(sharded, slice(None))
    expected = _train(single, slice(None))
    for name, value in expected.items():
        assert torch.equal(first[name], value), name
    for name, table in _table_rows(single).items():
        torch.testing.assert_close(_table_rows(sharded.shard)[name], table, equal_nan=True)


def test_unpooled_features_and_bad_batches_are_refused(one_rank) -> None:
    seq = [*FEATURES[:1], FeatureConfig("hist", "item", pooling="none", max_len=4)]
    with pytest.raises(ValueError, match=r"feature 'hist' has pooling 'none'"):
        ShardedEmbeddingCollection(TABLES[:1], seq)
    ec = ShardedEmbeddingCollection(TABLES, FEATURES)
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        ec({"item": torch.tensor([1])})
    partial = KeyedJaggedTensor(["item"], torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"the batch has no feature \['hist', 'user', 'cat'\]"):
        ec(partial)


def test_it_needs_a_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed"):
        ShardedEmbeddingCollection(TABLES, FEATURES)


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
