"""ShardedEmbeddingCollection: with 2 and 3 gloo ranks, each on its share of the batch, the
outputs (pooled, weighted, jagged, padded with lengths, tiled) and, after SparseAdam steps,
every id's row equal one process's EmbeddingCollection on the whole batch (ids on several
ranks, a rank's empty features, tables of two widths, an admission filter that counts
every rank's sightings, a rank with an empty batch); with one rank it is an
EmbeddingCollection, state dict included; clear errors.

Run as a script (``python test_sharded.py RANK WORLD INIT_FILE OUT``) this file is one gloo
rank of those runs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.embedding_engine import (
    Admission,
    EmbeddingCollection,
    FeatureConfig,
    PaddedSequence,
    TableConfig,
)
from recstack.embedding_engine.sharded import ShardedEmbeddingCollection
from recstack.sparse_optim import SparseAdam

THIS = Path(__file__)
TABLES = [
    TableConfig("item", dim=6),
    TableConfig("user", dim=3, admission=Admission(min_count=2)),
    TableConfig("cat", dim=6),
    TableConfig("tag", dim=3, fixed_size=30),  # small fixed-size: replicated by default
]
FEATURES = [
    FeatureConfig("item", "item", pooling="sum"),
    FeatureConfig("hist", "item", pooling="mean"),
    FeatureConfig("user", "user", pooling="sum"),
    FeatureConfig("cat", "cat", pooling="mean", weighted=True),
    FeatureConfig("wsum", "item", pooling="sum", weighted=True),
    FeatureConfig("seq", "item", pooling="none"),
    FeatureConfig("recent", "cat", pooling="none", max_len=2, with_lengths=True),
    FeatureConfig("tiled", "user", pooling="tile", max_len=2),
    FeatureConfig("tags", "tag", pooling="mean"),
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
    # A weight per id, a pure function of the id and the feature.
    weights = [0.5 + ((i * 7 + j) % 5) / 4 for j, k in enumerate(keys) for r in rows for i in r[k]]
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
        weights=torch.tensor(weights, dtype=torch.float32),
    )


def _dense(out: object) -> torch.Tensor:
    """An output as ``[B, ...]`` (a jagged sequence padded to 4 ids, lengths appended)."""
    if isinstance(out, JaggedTensor):
        return out.to_padded(4)
    if isinstance(out, PaddedSequence):
        return torch.cat([out.values.flatten(1), out.lengths[:, None].float()], dim=1)
    assert isinstance(out, torch.Tensor)
    return out


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    dims = {t.name: t.dim for t in TABLES}
    shapes = {"seq": (4, dims["item"]), "recent": (2 * dims["cat"] + 1,), "tiled": (2 * 3,)}
    return {
        f.name: torch.randn(BATCH, *shapes.get(f.name, (dims[f.table],)), generator=g)
        for f in FEATURES
    }


def _picks(world: int, rank: int | None) -> list[list[int]]:
    """The global rows a rank trains on at each step (``None``: what one process sees).
    With 3 ranks, the last one has an empty batch at the second step."""
    out = []
    for step in range(STEPS):
        ranks = range(world) if rank is None else [rank]
        idx = [i for r in ranks for i in range(r, BATCH, world)
               if not (world == 3 and r == 2 and step == 1)]  # fmt: skip
        out.append(sorted(idx))
    return out


def _train(ec, picks: list[list[int]], ahead: bool = False) -> dict[str, torch.Tensor]:
    """STEPS steps of SparseAdam, step ``s`` on global rows ``picks[s]``; the first
    outputs. ``ahead``: each step's ids are sent (prefetched) before the previous step's
    backward and optimizer step."""
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    weights = _weights()
    first = {}
    kjts = [_kjt([_rows(step)[i] for i in picks[step]]) for step in range(STEPS)]
    for step in range(STEPS):
        idx = picks[step]
        out = {k: _dense(v) for k, v in ec(kjts[step]).items()}
        if ahead and step + 1 < STEPS:
            ec.prefetch(kjts[step + 1])
        if step == 0:
            first = {k: v.detach().clone() for k, v in out.items()}
        loss = sum((v * weights[k][idx]).sum() for k, v in out.items())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return first


def _table_rows(ec) -> dict[str, torch.Tensor]:
    """Every id's row (NaN where the collection holds no row for the id), by table; for a
    sharded collection, its shard's rows and its replicas'."""
    out = {}
    ids = torch.arange(VOCAB)
    for t in TABLES:
        local = ec
        if isinstance(ec, ShardedEmbeddingCollection):
            local = ec.replicas if t.name in ec.replicated else ec.shard
        rows = local.find_rows(t.name, ids)
        values = local.physical_tables[local.physical_table_of(t.name)].values
        table = torch.full((VOCAB, t.dim), float("nan"))
        found = rows >= 0
        table[found] = values.gather_rows(rows[found]).float()
        out[t.name] = table
    return out


def _budget(rows: int) -> list[TableConfig]:
    """TABLES with an ``hbm_budget`` of ``rows`` on each dynamic table (tiered)."""
    return [t if t.fixed_size else dataclasses.replace(t, hbm_budget=rows) for t in TABLES]


def _rank(rank: int, world: int, init: str, out: str, ahead: bool, tiered: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    ec = ShardedEmbeddingCollection(_budget(8) if tiered else TABLES, FEATURES)
    first = _train(ec, _picks(world, rank), ahead)
    if tiered:
        stats = ec.tier_stats()
        assert set(stats) == {"item", "user", "cat"}
        assert stats["item"].rows > stats["item"].device_rows  # part in host memory
    tensors = {f"out.{k}": v for k, v in first.items()}
    load = ec.last_load
    assert load is not None
    tensors["load.sent"] = torch.tensor(load.keys_sent)
    tensors["load.received"] = torch.tensor(load.keys_received)
    tensors["load.bytes"] = torch.tensor([load.id_bytes_sent, load.row_bytes_sent])
    assert ec.replicated == {"tag"}
    tensors.update({f"table.{k}": v for k, v in _table_rows(ec).items()})
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "ahead", "tiered"),
    [(2, False, False), (3, False, False), (3, True, False), (2, True, True)],
)
def test_ranks_train_like_one_process_on_the_whole_batch(
    tmp_path: Path, world: int, ahead: bool, tiered: bool
) -> None:
    """``ahead``: each step's ids prefetched during the previous step (a pipelined
    Trainer): the same results. ``tiered``: each shard keeps 8 rows of a table in its GPU
    tier, the rest in host memory (the prefetch promotes each owner's rows): the same."""
    args = [str(world), str(tmp_path / "init"), str(tmp_path), str(int(ahead)), str(int(tiered))]
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
    first = _train(single, _picks(world, None))
    expected = _table_rows(single)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for r, got in enumerate(ranks):
        for name, value in first.items():
            torch.testing.assert_close(got[f"out.{name}"], value[r::world], msg=name)
    # The load report: what each rank sent to another is what that one received from it.
    sent = torch.stack([got["load.sent"] for got in ranks])
    received = torch.stack([got["load.received"] for got in ranks])
    assert torch.equal(sent.t(), received)
    for r, got in enumerate(ranks):
        others = int(sent[r].sum() - sent[r, r])
        assert int(got["load.bytes"][0]) == 24 * others
    for t in TABLES:
        held = [got[f"table.{t.name}"] for got in ranks]
        if t.fixed_size is not None:  # replicated: every rank holds every row, the same
            for h in held:
                torch.testing.assert_close(h, expected[t.name], equal_nan=True, msg=t.name)
            continue
        present = [~h.isnan().any(dim=1) for h in held]
        # Each id lives on exactly one rank: its owner.
        assert torch.equal(sum(p.int() for p in present), (~expected[t.name].isnan().any(1)).int())
        merged = torch.where(
            torch.stack(present).any(0)[:, None], sum(h.nan_to_num() for h in held), float("nan")
        )
        torch.testing.assert_close(merged, expected[t.name], equal_nan=True, msg=t.name)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zipf_ids_spread_evenly_over_the_owners(world: int) -> None:
    """Each rank serves the unique ids it owns: with Zipf(1.05) traffic over 26 tables the
    busiest rank serves within 5% of the mean."""
    from recstack.core import owner

    g = torch.Generator().manual_seed(world)
    served = torch.zeros(world, dtype=torch.int64)
    for table in range(26):
        ranks = torch.rand(65536, generator=g).pow(-1.0 / 1.05)
        ids = (ranks.to(torch.int64) + table * 10**9).unique()
        served += torch.bincount(owner(ids, world), minlength=world)
    assert float(served.max()) <= 1.05 * float(served.float().mean())


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
    first = _train(sharded, _picks(1, 0))
    expected = _train(single, _picks(1, None))
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, msg=name)
    for name, table in _table_rows(single).items():
        torch.testing.assert_close(_table_rows(sharded)[name], table, equal_nan=True)
    # The module's state and its tables' names are an EmbeddingCollection's.
    assert sharded.state_dict().keys() == single.state_dict().keys() == {"_extra_state"}
    assert sharded.state_dict()["_extra_state"] == single.state_dict()["_extra_state"]
    assert sharded.keyed_states().keys() == single.keyed_states().keys()
    holder = torch.nn.Module()
    holder.ec = sharded
    assert [n for n, _ in holder.named_modules()] == ["", "ec"]  # the shard is not a submodule
    holder.eval()
    assert not sharded.shard.training
    kjt = _kjt(_rows(0))
    with torch.no_grad():
        got, want = sharded(kjt), single.eval()(kjt)
    for name in want:
        torch.testing.assert_close(_dense(got[name]), _dense(want[name]), msg=name)


@pytest.mark.parametrize("ahead", [False, True])
def test_tiered_tables_shard_like_all_gpu_ones(one_rank, ahead: bool) -> None:
    """A tiered table's budget holds on each rank's shard; training is unchanged, with
    each next batch prefetched (``ahead``) or not."""
    tiered = ShardedEmbeddingCollection(_budget(8), FEATURES)
    full = ShardedEmbeddingCollection(_budget(10**9), FEATURES)
    assert tiered.tiered_tables == ("item", "user", "cat")
    got, want = _train(tiered, _picks(1, 0), ahead), _train(full, _picks(1, 0), ahead)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    rows, rows_full = _table_rows(tiered), _table_rows(full)
    for name, table in rows_full.items():
        torch.testing.assert_close(rows[name], table, rtol=0, atol=0, equal_nan=True)
    stats = tiered.tier_stats()
    assert stats == tiered.shard.tier_stats()
    assert stats["item"].rows > stats["item"].device_rows == 8


def test_prefetch_promotes_the_rows_each_owner_will_serve(one_rank) -> None:
    """A prefetch moves the next batch's rows that sit in host memory to the shard's GPU
    tier before that batch's forward, which then finds them there and moves nothing."""
    ec = ShardedEmbeddingCollection(
        [TableConfig("item", dim=4, hbm_budget=64)], [FeatureConfig("item", "item")]
    )
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)

    def batch(ids: torch.Tensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(["item"], ids, torch.ones_like(ids))

    for start in range(0, 512, 32):  # 512 rows, 64 of them in the GPU tier
        ec(batch(torch.arange(start, start + 32)))["item"].sum().backward()
        opt.step()
        opt.zero_grad()
    assert ec.shard is not None
    tiers = ec.shard.physical_tables["item"].tiers
    assert tiers is not None
    # find_rows gives value-store slots: those past device_rows are in host memory.
    host = torch.nonzero(ec.shard.find_rows("item", torch.arange(512)) >= 64).flatten()[:8]
    assert host.numel() == 8 and tiers.device_rows == 64
    ec.prefetch(batch(host))
    assert bool((ec.shard.find_rows("item", host) < 64).all())
    before = tiers.stats()
    ec(batch(host))
    after = tiers.stats()
    assert after.promoted == before.promoted
    assert after.device_hits - before.device_hits == after.lookups - before.lookups == 8


def test_prefetched_ids_give_the_same_training(one_rank) -> None:
    """Prefetching the next batch (also one never looked up, or twice) changes nothing."""
    plain = ShardedEmbeddingCollection(TABLES, FEATURES)
    ahead = ShardedEmbeddingCollection(TABLES, FEATURES)
    want = _train(plain, _picks(1, 0))
    got = _train(ahead, _picks(1, 0), ahead=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)
    for name, table in _table_rows(plain).items():
        torch.testing.assert_close(_table_rows(ahead)[name], table, equal_nan=True)
    stray, kjt = _kjt(_rows(0)), _kjt(_rows(1))
    ahead.prefetch(stray)
    ahead.prefetch(kjt)  # replaces the first
    ahead.eval(), plain.eval()
    with torch.no_grad():
        for batch in (kjt, stray):  # the second was not prefetched (any more)
            got_out, want_out = ahead(batch), plain(batch)
            for name in want_out:
                torch.testing.assert_close(_dense(got_out[name]), _dense(want_out[name]))
    ahead.prefetch(stray)
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        ahead.prefetch({"item": torch.tensor([1])})


def _train_semi_sync(ec, semi: bool = True) -> None:
    """STEPS steps of a loss quadratic in the rows (a linear one's gradients would not
    depend on them) where, with ``semi``, each step's batch is looked up before the
    previous step's sparse update: by ``lookahead`` (sharded) or by calling the forward
    at that point."""
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    weights, idx = _weights(), _picks(1, 0)
    kjts = [_kjt([_rows(step)[i] for i in idx[step]]) for step in range(STEPS)]
    out = ec(kjts[0])
    for step in range(STEPS):
        loss = sum(((_dense(v) * weights[k][idx[step]]) ** 2).sum() for k, v in out.items())
        loss.backward()
        if semi and step + 1 < STEPS:
            opt.accumulate()  # a forward refuses unread gradients
            if isinstance(ec, ShardedEmbeddingCollection):
                ec.lookahead(kjts[step + 1])
            out = ec(kjts[step + 1])  # sharded: the looked-up outputs
        opt.step()
        opt.zero_grad()
        if not semi and step + 1 < STEPS:
            out = ec(kjts[step + 1])


def test_lookahead_reads_the_rows_before_the_update(one_rank) -> None:
    """Semi-synchronous training: a batch looked up ahead reads the rows as they were
    before the previous step's update, as a forward called at that point does; training
    then differs from the synchronous run where consecutive batches share ids."""
    ahead = ShardedEmbeddingCollection(TABLES, FEATURES)
    single = EmbeddingCollection(TABLES, FEATURES)
    sync = ShardedEmbeddingCollection(TABLES, FEATURES)
    _train_semi_sync(ahead)
    _train_semi_sync(single)
    _train_semi_sync(sync, semi=False)
    rows, want, synced = _table_rows(ahead), _table_rows(single), _table_rows(sync)
    for name, table in want.items():
        torch.testing.assert_close(rows[name], table, equal_nan=True, msg=name)
    assert any(not torch.allclose(rows[n], synced[n], equal_nan=True) for n in rows)
    # A forward of another batch drops what was looked up; its own lookup runs.
    kjt, other = _kjt(_rows(0)), _kjt(_rows(1))
    ahead.lookahead(kjt)
    ahead.eval(), single.eval()
    with torch.no_grad():
        got, expect = ahead(other), single(other)
    for name in expect:
        torch.testing.assert_close(_dense(got[name]), _dense(expect[name]), msg=name)
    assert ahead._looked is None


def test_deferred_features_come_out_gathered(one_rank) -> None:
    deferred = [*FEATURES[:1], FeatureConfig("hist", "item", pooling="none", gather=False)]
    sharded = ShardedEmbeddingCollection(TABLES[:1], deferred)
    single = EmbeddingCollection(TABLES[:1], deferred)
    kjt = KeyedJaggedTensor(
        ["item", "hist"], torch.tensor([3, 4, 5, 3]), torch.tensor([1, 0, 2, 1])
    )
    got, want = sharded(kjt)["hist"], single(kjt)["hist"].gather()
    assert isinstance(got, JaggedTensor)
    assert torch.equal(got.offsets, want.offsets) and torch.equal(got.values, want.values)


def test_bad_batches_are_refused(one_rank) -> None:
    ec = ShardedEmbeddingCollection(TABLES, FEATURES)
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        ec({"item": torch.tensor([1])})
    partial = KeyedJaggedTensor(["item"], torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"the batch has no feature \['hist', 'user', 'cat'"):
        ec(partial)
    names = [f.name for f in FEATURES]
    unweighted = KeyedJaggedTensor(
        names, torch.tensor([1]), torch.tensor([1] + [0] * (len(names) - 1))
    )
    with pytest.raises(ValueError, match="feature 'cat' is weighted but the batch carries no"):
        ec(unweighted)


def test_it_needs_a_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed"):
        ShardedEmbeddingCollection(TABLES, FEATURES)


if __name__ == "__main__":
    _rank(*map(int, sys.argv[1:3]), *sys.argv[3:5], sys.argv[5] == "1", sys.argv[6] == "1")


@pytest.mark.gpu
def test_one_nccl_rank_on_the_gpu_is_an_embedding_collection(tmp_path: Path) -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    init = tmp_path / "init"
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        sharded = ShardedEmbeddingCollection(TABLES, FEATURES, device="cuda")
        single = EmbeddingCollection(TABLES, FEATURES, device="cuda")
        got = _train_on(sharded, "cuda")
        want = _train_on(single, "cuda")
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, msg=name)
        ids = torch.arange(VOCAB, device="cuda")
        for t in TABLES:
            a, b = sharded.find_rows(t.name, ids), single.find_rows(t.name, ids)
            assert torch.equal(a >= 0, b >= 0), t.name
    finally:
        dist.destroy_process_group()


def _train_on(ec, device: str) -> dict[str, torch.Tensor]:
    """_train's steps with the batches and weights on ``device``."""
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    weights = {k: v.to(device) for k, v in _weights().items()}
    first = {}
    for step in range(STEPS):
        idx = _picks(1, None)[step]
        every = _rows(step)
        kjt = _kjt([every[i] for i in idx]).to(device)
        out = {k: _dense(v) for k, v in ec(kjt).items()}
        if step == 0:
            first = {k: v.detach().cpu() for k, v in out.items()}
        sum((v * weights[k][idx]).sum() for k, v in out.items()).backward()
        opt.step()
        opt.zero_grad()
    return first


def test_which_tables_are_replicated() -> None:
    from recstack.embedding_engine.replicated import REPLICATE_MAX_ELEMENTS, replicated_tables

    big = TableConfig("big", dim=64, fixed_size=REPLICATE_MAX_ELEMENTS // 64 + 1)
    tables = [*TABLES, big]
    assert replicated_tables(tables, None) == {"tag"}  # small fixed-size ones only
    assert replicated_tables(tables, ["big"]) == {"big"}
    assert replicated_tables(tables, []) == set()
    with pytest.raises(ValueError, match="table 'item' is dynamic; only fixed-size tables"):
        replicated_tables(tables, ["item"])
    with pytest.raises(ValueError, match=r"no table 'nope'"):
        replicated_tables(tables, ["nope"])
    with pytest.raises(TypeError, match="list of table names"):
        replicated_tables(tables, "tag")
