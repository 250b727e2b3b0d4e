"""Incremental checkpoints: a base plus deltas (with removals) equals a full checkpoint,
deltas reshard, and a chain with a gap, out of order or foreign is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from toy_table import ToyTable, filled

from recstack.core import owner
from recstack.saver import Checkpointer, CheckpointError
from recstack.saver.manifest import MANIFEST, read_manifest


def evolve(table: ToyTable, seed: int) -> None:
    """One 'training window': some rows change, some keys are new, some are evicted."""
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(table.rows)
    for k in keys[::5]:
        table.put(k, torch.randn(4, generator=gen), torch.randn(4, generator=gen))
    for k in keys[1::7]:
        table.drop(k)
    for k in range(1000 + 10 * seed, 1000 + 10 * seed + 4):
        table.put(k, torch.randn(4, generator=gen))
    table.counts += seed


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


def chain(tmp_path: Path) -> Checkpointer:
    table = filled("t", range(30), seed=5)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, emb=table)
    for step in (2, 3):
        evolve(table, seed=step)
        ckpt.save(step, delta=True, emb=table)
    return ckpt


def test_a_chain_with_a_gap_is_refused_naming_it(tmp_path: Path) -> None:
    ckpt = chain(tmp_path)
    shutil.rmtree(tmp_path / "step-000000000002")
    with pytest.raises(CheckpointError, match="step-000000000003.*base step-000000000002.*gap"):
        ckpt.load(emb=ToyTable("t"))


def test_a_foreign_delta_is_refused(tmp_path: Path) -> None:
    ckpt = chain(tmp_path)
    shutil.rmtree(tmp_path / "step-000000000002")
    # Another run's checkpoint of the same step takes the base's place.
    other = Checkpointer(tmp_path)
    other.save(2, emb=filled("t", range(3), seed=9))
    with pytest.raises(CheckpointError, match="step-000000000003.*foreign delta"):
        ckpt.load(emb=ToyTable("t"))


def test_an_out_of_order_chain_is_refused(tmp_path: Path) -> None:
    chain(tmp_path)
    path = tmp_path / "step-000000000003" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["step"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="base step 2 is not before its own step 2"):
        Checkpointer(tmp_path).load(3, emb=ToyTable("t"))


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
