"""recstack.saver.Checkpointer: bit-exact round trips, RNG states, plain safetensors files,
partial checkpoints ignored, pruning, async saves, per-rank state, resharding N -> M
(in one process and across gloo ranks), deltas that equal a full checkpoint, and the
serving export."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from toy_table import ToyTable, evolve, filled
from worker_processes import run_ranks

from recstack.core import owner
from recstack.saver import Checkpointer, CheckpointError, PerRank
from recstack.saver.manifest import MANIFEST, read_manifest


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )
        self.norm = torch.nn.BatchNorm1d(4)  # buffers, an int64 counter among them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(self.norm(x))


def trained(seed: int, steps: int = 3) -> tuple[Model, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for _ in range(steps):
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def same_state(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b or (a != a and b != b)


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, opt, sched = trained(0)
    table = filled("t", range(0, 40, 3), seed=1)
    extras = {"epoch": 3, "loss": float("nan"), "ids": (1, 2), "by_int": {5: "x"}, "none": None}
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(7, model=model, opt=opt, sched=sched, emb=table, extras=extras)
    assert path == tmp_path / "step-000000000007" and ckpt.latest() == 7
    model2, opt2, sched2 = trained(1, steps=1)
    table2, extras2 = ToyTable("t"), {"stale": True}
    report = Checkpointer(tmp_path).load(
        model=model2, opt=opt2, sched=sched2, emb=table2, extras=extras2
    )
    assert report.step == 7 and not report.problems()
    assert "emb" in report.loaded and "model.tower.0.weight" in report.loaded
    assert same_state(model2.state_dict(), model.state_dict())
    assert same_state(opt2.state_dict(), opt.state_dict())
    assert same_state(sched2.state_dict(), sched.state_dict())
    assert table2.as_dict() == table.as_dict() and torch.equal(table2.counts, table.counts)
    assert same_state(extras2, extras)


def test_rng_states_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, extras={})
    expect = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    ckpt.load(extras={})
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1]
    ckpt.load(extras={}, rng=False)
    assert not torch.equal(torch.rand(3), expect[0])


def test_every_tensor_file_opens_with_plain_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, opt, _ = trained(0)
    table = filled("t", range(50), seed=2)
    Checkpointer(tmp_path, part_bytes=512).save(1, model=model, opt=opt, emb=table)
    files = sorted((tmp_path / "step-000000000001").rglob("*.safetensors"))
    parts = [f for f in files if "sparse" in f.parts]
    assert len(parts) > 1  # part_bytes splits the table
    keys = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                t = st.get_tensor(name)
                if f in parts and name == "keys":
                    keys += t.tolist()
    assert sorted(keys) == list(range(50))
    manifest = read_manifest(tmp_path / "step-000000000001")
    assert {str(f.relative_to(tmp_path / "step-000000000001")) for f in files} <= set(
        manifest["files"]
    )


def test_latest_skips_a_partial_checkpoint_with_a_warning(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, extras={"a": 1})
    partial = tmp_path / "step-000000000009"
    (partial / "dense").mkdir(parents=True)
    (partial / "dense" / "d00000.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="step-000000000009.*without a manifest"):
        assert ckpt.latest() == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.load(extras={}).step == 5
        ckpt.save(9, extras={"a": 2})  # the partial directory is replaced
        assert ckpt.latest() == 9


def test_a_step_is_saved_once_and_load_needs_a_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.load(extras={})
    ckpt.save(1, extras={})
    with pytest.raises(CheckpointError, match="step 1 exists already"):
        ckpt.save(1, extras={})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ckpt.save(-1, extras={})
    with pytest.raises(TypeError, match="Checkpointer.save: step must be an int, got 2.0"):
        ckpt.save(2.0, extras={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Checkpointer: part_bytes must be an int >= 1, got 0"):
        Checkpointer(tmp_path, part_bytes=0)
    with pytest.raises(TypeError, match="cannot checkpoint a int"):
        ckpt.save(2, extras=3)
    with pytest.raises(ValueError, match="checkpoint names"):
        ckpt.save(2, **{"a/b": {}})


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, extras={"step": step})
    assert ckpt.steps() == [3, 4]


@pytest.mark.parametrize("durable", [True, False])
def test_durable_decides_the_fsyncs_not_the_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    model, opt, _ = trained(0)
    table = filled("t", range(0, 40, 3), seed=1)
    ckpt = Checkpointer(tmp_path / str(durable), durable=durable)
    ckpt.save(1, model=model, opt=opt, emb=table)
    ckpt.save(2, delta=True, model=model, opt=opt, emb=table)
    assert bool(synced) is durable
    model2, opt2, _ = trained(1, steps=1)
    table2 = ToyTable("t")
    assert Checkpointer(tmp_path / str(durable)).load(model=model2, opt=opt2, emb=table2).step == 2
    assert same_state(model2.state_dict(), model.state_dict())
    assert table2.as_dict() == table.as_dict()


def test_async_save_writes_what_was_there_when_it_returned(tmp_path: Path) -> None:
    model, opt, _ = trained(0)
    table = filled("t", range(30), seed=3)
    blocking = Checkpointer(tmp_path / "a", part_bytes=400)
    blocking.save(1, model=model, opt=opt, emb=table)
    ckpt = Checkpointer(tmp_path / "b", part_bytes=400)
    ckpt.save(1, blocking=False, model=model, opt=opt, emb=table)
    before = model.tower[0].weight.detach().clone()
    # Training goes on while the files are written: none of it reaches the checkpoint.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    table.put(3, torch.ones(4))
    assert ckpt.wait() == tmp_path / "b" / "step-000000000001"
    a, b = (read_manifest(p / "step-000000000001") for p in (tmp_path / "a", tmp_path / "b"))
    assert a["files"].keys() == b["files"].keys()
    for rel in a["files"]:
        if rel.endswith(".safetensors"):
            assert a["files"][rel] == b["files"][rel], rel  # same bytes, same checksum
    fresh, fresh_table = Model(), ToyTable("t")
    ckpt.load(model=fresh, emb=fresh_table, strict=False)
    assert torch.equal(fresh.tower[0].weight, before)
    assert fresh_table.as_dict()[3] != table.as_dict()[3]


def test_a_second_save_waits_for_the_one_in_flight(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    table = filled("t", range(100), seed=4)
    ckpt.save(1, blocking=False, emb=table)
    ckpt.save(2, blocking=False, emb=table)  # joins step 1 first
    assert ckpt._thread is not None
    ckpt.wait()
    assert ckpt.steps() == [1, 2] and ckpt.wait() is None


def test_a_failed_async_save_is_reported_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, extras={"a": 1})
    table = filled("t", range(5), seed=5)
    # A rows tensor the files cannot hold: the writer thread fails.
    table.rows[2]["values"] = table.rows[2]["values"].to(torch.complex64)
    with pytest.raises(RuntimeError):
        ckpt.save(2, blocking=False, emb=table)
        ckpt.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.latest() == 1


def test_per_rank_state_goes_back_to_its_rank(tmp_path: Path) -> None:
    class Reader:
        def __init__(self, pos: int) -> None:
            self.pos = pos

        def state_dict(self) -> dict:
            return {"pos": self.pos, "buf": torch.full((2,), float(self.pos))}

        def load_state_dict(self, state: dict) -> None:
            self.pos = state["pos"]
            assert torch.equal(state["buf"], torch.full((2,), float(self.pos)))

    for r in range(2):
        Checkpointer(tmp_path, rank=r, world_size=2).save(4, reader=PerRank(Reader(10 + r)))
    for r in range(2):
        reader = Reader(0)
        Checkpointer(tmp_path, rank=r, world_size=2).load(reader=PerRank(reader))
        assert reader.pos == 10 + r
    with pytest.raises(CheckpointError, match="reader.*rank 2.*2 ranks"):
        Checkpointer(tmp_path, rank=2, world_size=3).load(reader=PerRank(Reader(0)))
    report = Checkpointer(tmp_path, rank=2, world_size=3).load(
        reader=PerRank(Reader(0)), strict=False
    )
    assert report.missing


ALL_KEYS = list(range(0, 300, 7)) + [2**40 + 5, -17]


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 3), (3, 2), (4, 1), (2, 2)])
def test_tables_reshard_from_n_writers_to_m_readers(tmp_path: Path, n: int, m: int) -> None:
    full = filled("t", ALL_KEYS, seed=6)
    keys = torch.tensor(ALL_KEYS)
    for r in range(n):
        mine = ToyTable("t")
        for k in keys[owner(keys, n) == r].tolist():
            mine.rows[k] = full.rows[k]
        mine.counts = torch.full((8,), r + 1)
        Checkpointer(tmp_path, rank=r, world_size=n).save(3, emb=mine, extras={"n": n})
    manifest = read_manifest(tmp_path / "step-000000000003")
    assert manifest["world_size"] == n and len(manifest["tables"]["emb"]["ranks"]) == n
    union: dict = {}
    for r in range(m):
        mine = ToyTable("t")
        Checkpointer(tmp_path, rank=r, world_size=m).load(emb=mine, extras={})
        assert all(int(owner(torch.tensor([k]), m)[0]) == r for k in mine.rows)
        union.update(mine.as_dict())
        # Auxiliary state: every rank gets every saved rank's parts to merge.
        assert torch.equal(mine.counts, torch.full((8,), n * (n + 1) // 2))
    assert union == full.as_dict()


@pytest.mark.slow
def test_fsdp_sharded_dense_state_is_saved_whole(tmp_path: Path) -> None:
    """A model and AdamW sharded by FSDP2 on 2 ranks: the checkpoint holds whole tensors,
    which load into 3 sharded ranks and into one plain process alike."""
    from mp_worker import fsdp_model
    from safetensors.torch import load_file

    root, saved, loaded = tmp_path / "ckpt", tmp_path / "saved", tmp_path / "loaded"
    for d in (root, saved, loaded):
        d.mkdir()
    run_ranks("save", root, 2, saved, mode="fsdp", suffix="safetensors")
    run_ranks("load", root, 3, loaded, mode="fsdp", suffix="safetensors")
    want = load_file(str(saved / "0.safetensors"))
    assert set(want) >= {"model.0.weight", "opt.0.exp_avg", "opt.3.exp_avg_sq"}
    for r in range(3):
        got = load_file(str(loaded / f"{r}.safetensors"))
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), (r, k)
    plain = fsdp_model(seed=1)
    opt = torch.optim.AdamW(plain.parameters(), lr=0.1)
    Checkpointer(root, progress=False).load(model=plain, opt=opt)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, want[f"model.{k}"]), k
    for i, p in enumerate(plain.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, want[f"opt.{i}.{k}"]), (i, k)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 3), (3, 2), (4, 1)])
def test_gloo_ranks_reshard(tmp_path: Path, n: int, m: int) -> None:
    from mp_worker import ALL_KEYS

    root, out = tmp_path / "ckpt", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    run_ranks("save", root, n, out)
    run_ranks("load", root, m, out)
    expect = filled("t", ALL_KEYS, seed=1).as_dict()
    union = {}
    for r in range(m):
        got = {int(k): tuple(v) for k, v in json.loads((out / f"{r}.json").read_text()).items()}
        assert all(int(owner(torch.tensor([k]), m)[0]) == r for k in got)
        union.update(got)
    assert union == {k: tuple(v) for k, v in expect.items()}


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    from recstack.saver.files import crc32_file

    model, opt, _ = trained(0)
    ckpt_dir = Checkpointer(tmp_path).save(2, model=model, opt=opt, emb=filled("t", [1], 0))
    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    on_disk = {
        str(p.relative_to(ckpt_dir))
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    assert on_disk == set(manifest["files"])
    for rel, info in manifest["files"].items():
        assert crc32_file(ckpt_dir / rel) == (info["bytes"], info["crc32"])
    assert manifest["version"] == 1 and manifest["world_size"] == 1 and manifest["step"] == 2


def test_base_and_three_deltas_equal_a_full_checkpoint(tmp_path: Path) -> None:
    table = filled("t", range(60), seed=0)
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(tmp_path / "chain")
    ckpt.save(10, emb=table, model=model)
    sizes = []
    for i, step in enumerate((20, 30, 40)):
        evolve(table, seed=i + 1)
        with torch.no_grad():
            model.weight.add_(1)
        path = ckpt.save(step, delta=True, emb=table, model=model)
        manifest = read_manifest(path)
        assert manifest["kind"] == "delta" and manifest["base"]["step"] == step - 10
        sizes.append(manifest["tables"]["emb"]["ranks"][0]["keys"])
        assert manifest["tables"]["emb"]["ranks"][0]["removed_keys"] > 0
    assert max(sizes) < 20  # only the changed rows
    Checkpointer(tmp_path / "full").save(40, emb=table, model=model)
    from_chain, from_full = ToyTable("t"), ToyTable("t")
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert Checkpointer(tmp_path / "chain").load(emb=from_chain, model=m1).step == 40
    Checkpointer(tmp_path / "full").load(emb=from_full, model=m2)
    assert from_chain.as_dict() == from_full.as_dict() == table.as_dict()
    assert torch.equal(from_chain.counts, table.counts)
    assert torch.equal(m1.weight, model.weight) and torch.equal(m2.weight, model.weight)


def test_a_delta_needs_a_base_and_changes_tracked(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    table = filled("t", range(5), seed=1)
    with pytest.raises(CheckpointError, match="a delta needs a base"):
        ckpt.save(1, delta=True, emb=table)

    class Plain:  # a KeyedState without change tracking
        state_metadata = table.state_metadata
        export_chunks = table.export_chunks
        import_chunk = table.import_chunk

    ckpt.save(1, emb=table)
    with pytest.raises(TypeError, match="table 'emb' does not track changes"):
        ckpt.save(2, delta=True, emb=Plain())
    with pytest.raises(CheckpointError, match="step 0 is not after its base's 1"):
        ckpt.save(0, delta=True, emb=table)


def test_a_delta_after_a_load_builds_on_the_loaded_checkpoint(tmp_path: Path) -> None:
    table = filled("t", range(20), seed=2)
    Checkpointer(tmp_path).save(5, emb=table)
    resumed = ToyTable("t")
    ckpt = Checkpointer(tmp_path)
    ckpt.load(emb=resumed)
    evolve(resumed, seed=3)
    path = ckpt.save(6, delta=True, emb=resumed)
    assert read_manifest(path)["base"]["dir"] == "step-000000000005"
    again = ToyTable("t")
    Checkpointer(tmp_path).load(emb=again)
    assert again.as_dict() == resumed.as_dict()


@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 1)])
def test_deltas_reshard(tmp_path: Path, n: int, m: int) -> None:
    full = filled("t", range(0, 200, 3), seed=4)

    def shard(table: ToyTable, r: int, world: int) -> ToyTable:
        mine = ToyTable("t")
        for k, row in table.rows.items():
            if int(owner(torch.tensor([k]), world)[0]) == r:
                mine.rows[k] = {s: v.clone() for s, v in row.items()}
        return mine

    ranks = [shard(full, r, n) for r in range(n)]
    ckpts = [Checkpointer(tmp_path, rank=r, world_size=n) for r in range(n)]
    for r in range(n):
        ckpts[r].save(1, emb=ranks[r])
    for step in (2, 3):
        evolve(full, seed=step)
        for r in range(n):
            new = shard(full, r, n)
            for k in set(ranks[r].rows) - set(new.rows):
                ranks[r].drop(k)
            for k, row in new.rows.items():
                if ranks[r].rows.get(k, {}).get("values") is None or not torch.equal(
                    ranks[r].rows[k]["values"], row["values"]
                ):
                    ranks[r].put(k, row["values"], row["m"])
            ckpts[r].save(step, delta=True, emb=ranks[r])
    union: dict = {}
    for r in range(m):
        mine = ToyTable("t")
        Checkpointer(tmp_path, rank=r, world_size=m).load(emb=mine)
        union.update(mine.as_dict())
    assert union == full.as_dict()


def test_pruning_keeps_the_bases_of_kept_deltas(tmp_path: Path) -> None:
    table = filled("t", range(10), seed=6)
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, emb=table)
    for step in (2, 3):
        evolve(table, seed=step)
        ckpt.save(step, delta=True, emb=table)
    assert ckpt.steps() == [1, 2, 3]
    ckpt.save(4, emb=table)  # a full one: the old chain can go
    assert ckpt.steps() == [4]
    loaded = ToyTable("t")
    ckpt.load(emb=loaded)
    assert loaded.as_dict() == table.as_dict()


def test_export_writes_a_serving_copy(tmp_path: Path) -> None:
    from recstack.saver import load_for_inference

    model = torch.nn.Linear(3, 2)
    table = filled("t", range(10), seed=7)
    out = Checkpointer(tmp_path / "ckpt").export(
        tmp_path / "serve", dtype=torch.bfloat16, step=12, model=model, emb=table
    )
    served = load_for_inference(out)
    assert served.step == 12 and served.dtype == torch.bfloat16
    rows, found = served.tables["emb"].lookup(torch.tensor([3, 99]))
    assert found.tolist() == [True, False]
    assert torch.equal(rows[0], table.rows[3]["values"].to(torch.bfloat16))
    assert torch.equal(served.dense_state_dict("model")["weight"], model.weight.to(torch.bfloat16))
