"""export_checkpoint and ``recstack-saver export``: a checkpoint's files (full, a delta
chain, written by several ranks) give the serving export export_for_serving writes from
the live objects at that step, bit for bit; bad input is refused before anything is
written."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from toy_optimizer import SGD
from toy_table import ToyTable, evolve, filled

from recstack.core import owner
from recstack.saver import (
    Checkpointer,
    CheckpointError,
    PerRank,
    export_checkpoint,
    export_for_serving,
    load_for_inference,
)
from recstack.saver import read as read_module
from recstack.saver.cli import export_command, main
from recstack.saver.convert import find_chain
from recstack.saver.errors import NotACheckpointError
from recstack.saver.manifest import MANIFEST, read_manifest
from recstack.saver.replay import chain_files, replay_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class Sparse(nn.Module):
    """A submodule holding a table, as an embedding collection does."""

    def __init__(self, table: ToyTable) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("calls", torch.tensor(3))

    def keyed_states(self) -> dict[str, ToyTable]:
        return {"item": self.table}


class Model(nn.Module):
    def __init__(self, table: ToyTable) -> None:
        super().__init__()
        self.sparse = Sparse(table)
        self.tower = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def build(seed: int = 0) -> tuple[Model, ToyTable]:
    torch.manual_seed(seed)
    model = Model(filled("item", range(0, 90, 3), seed=seed))
    model.tower[1].running_mean.add_(0.5)
    model.tower[1].num_batches_tracked.add_(7)
    return model, filled("user", range(40), seed=seed + 1)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is bit for bit (NaN and -0.0 included)."""
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def assert_same_export(got: Path, want: Path) -> None:
    """Same tables (keys, rows bit for bit, dtype), dense tensors, step and metadata."""
    a, b = load_for_inference(got), load_for_inference(want)
    assert (a.step, a.dtype) == (b.step, b.dtype)
    assert list(a.tables) == list(b.tables)
    for name, table in a.tables.items():
        other = b.tables[name]
        assert torch.equal(table.keys, other.keys), name
        assert table.values.dtype == other.values.dtype == a.dtype
        assert table.values.shape == other.values.shape, name
        assert torch.equal(bits(table.values), bits(other.values)), name
    assert a.dense_names == b.dense_names
    for name in a.dense_names:
        sa, sb = a.dense_state_dict(name), b.dense_state_dict(name)
        assert list(sa) == list(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(bits(sa[key]), bits(sb[key])), key
    ma, mb = read_manifest(got), read_manifest(want)
    assert ma["kind"] == mb["kind"] == "serving"
    assert ma["extra"] == mb["extra"] and ma["step"] == mb["step"]
    for name in ma["tables"]:
        ta, tb = ma["tables"][name], mb["tables"][name]
        assert ta["metadata"] == tb["metadata"] and ta["slots"] == tb["slots"], name
    assert ma["dense"]["trees"] == mb["dense"]["trees"]
    assert ma["dense"]["info"] == mb["dense"]["info"]


def save_full(root: Path, step: int = 10, **kw: Any) -> tuple[Model, ToyTable]:
    model, user = build()
    reader = {"offset": 5}
    with Checkpointer(root, progress=False, **kw) as ckpt:
        ckpt.save(
            step,
            model=model,
            user=user,
            opt=SGD(model.tower.parameters()),
            reader=PerRank(reader),
            extras={"epoch": 1},
        )
    return model, user


# ---------------------------------------------------------------------------- full


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_checkpoint_equals_the_live_export(tmp_path: Path, dtype: torch.dtype) -> None:
    # Small parts on both sides: many checkpoint parts, re-chunked into other sizes.
    model, user = save_full(tmp_path / "ckpts", part_bytes=300)
    out = export_checkpoint(
        tmp_path / "ckpts" / "step-000000000010", tmp_path / "out", dtype=dtype, part_bytes=500
    )
    live = export_for_serving(tmp_path / "live", dtype=dtype, step=10, model=model, user=user)
    assert_same_export(out, live)
    served = load_for_inference(out)
    assert list(served.tables) == ["model.sparse.item", "user"]
    assert served.dense_names == ["model"]  # no optimizer, dict or per-rank state
    state = served.dense_state_dict("model")
    assert state["tower.1.num_batches_tracked"].dtype == torch.int64  # not cast
    assert state["sparse.calls"].dtype == torch.int64
    assert state["tower.0.weight"].dtype == dtype
    expected = torch.stack([user.rows[k]["values"] for k in range(40)]).to(dtype)
    assert torch.equal(served.tables["user"](torch.arange(40)), expected)
    manifest = read_manifest(out)
    assert manifest["world_size"] == 1 and manifest["extra"]["dtype"] == str(dtype)[6:]
    assert set(manifest["tables"]["user"]["slots"]) == {"values"}


def test_parts_are_rechunked_to_part_bytes(tmp_path: Path) -> None:
    save_full(tmp_path / "ckpts", part_bytes=1000)
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "out", part_bytes=200)
    manifest = read_manifest(out)
    counts = []
    for part in manifest["tables"]["user"]["ranks"][0]["parts"]:
        header = json.loads((out / part).read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
        counts.append(header["keys"]["shape"][0])
    # 200 bytes hold 8 rows of an 8-byte id and 4 float32 values.
    assert counts == [8, 8, 8, 8, 8]


def test_a_table_streams_part_by_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, user = save_full(tmp_path / "ckpts", part_bytes=300)  # 7 rows a part
    files = chain_files(find_chain(tmp_path / "ckpts"), "user")
    parts = files[0][1]
    assert len(parts) == 6
    reads: list[str] = []
    real = read_module.read_checked

    def counted(f: Any, *, crc: bool = True) -> dict[str, torch.Tensor]:
        reads.append(f.path.name)
        return real(f, crc=crc)

    monkeypatch.setattr(read_module, "read_checked", counted)
    with ThreadPoolExecutor(2) as pool:
        chunks = replay_rows(files, pool, slots=("values",), ahead=2)
        keys, slots = next(chunks)
        assert len(reads) <= 3  # the part converted and 2 read ahead, not the table
        assert set(slots) == {"values"} and keys.numel() == 7
        rest = list(chunks)
    assert sorted(reads) == sorted(f.path.name for f in parts)
    got = torch.cat([keys, *(k for k, _ in rest)])
    assert got.tolist() == sorted(user.rows)


def test_an_empty_table(tmp_path: Path) -> None:
    model, _ = build()
    empty = ToyTable("empty")
    with Checkpointer(tmp_path / "ckpts", progress=False) as ckpt:
        ckpt.save(3, model=model, empty=empty)
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "out")
    live = export_for_serving(tmp_path / "live", step=3, model=model, empty=empty)
    assert_same_export(out, live)
    table = load_for_inference(out).tables["empty"]
    assert len(table) == 0 and table.dim == 4


# ---------------------------------------------------------------------------- deltas


def test_full_and_three_deltas_equal_the_live_export(tmp_path: Path) -> None:
    model, user = build()
    table = model.sparse.table
    lives = {}
    with Checkpointer(tmp_path / "ckpts", progress=False) as ckpt:
        ckpt.save(10, model=model, user=user)
        lives[10] = export_for_serving(tmp_path / "live10", step=10, model=model, user=user)
        for i, step in enumerate((20, 30, 40)):
            evolve(table, seed=i + 1)
            evolve(user, seed=i + 5)
            with torch.no_grad():
                model.tower[0].weight.mul_(1.5)
            path = ckpt.save(step, delta=True, model=model, user=user)
            assert read_manifest(path)["tables"]["user"]["ranks"][0]["removed_keys"] > 0
            lives[step] = export_for_serving(
                tmp_path / f"live{step}", step=step, model=model, user=user
            )
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "latest", part_bytes=200)
    assert_same_export(out, lives[40])
    for step in (10, 20, 30):  # any checkpoint of the chain, by step
        got = export_checkpoint(tmp_path / "ckpts", tmp_path / f"s{step}", step=step)
        assert_same_export(got, lives[step])
    served = load_for_inference(out).tables["user"]
    assert len(served) == len(user.rows)
    removed = sorted(set(range(40)) - set(user.rows))
    assert removed and not bool(served.lookup(torch.tensor(removed))[1].any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_delta_chain_in_half_precision(tmp_path: Path, dtype: torch.dtype) -> None:
    model, user = build()
    with Checkpointer(tmp_path / "ckpts", progress=False) as ckpt:
        ckpt.save(1, model=model, user=user)
        evolve(user, seed=2)
        ckpt.save(2, delta=True, model=model, user=user)
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "out", dtype=dtype)
    live = export_for_serving(tmp_path / "live", dtype=dtype, step=2, model=model, user=user)
    assert_same_export(out, live)
    fp32 = export_checkpoint(tmp_path / "ckpts", tmp_path / "fp32")
    a, b = load_for_inference(out).tables["user"], load_for_inference(fp32).tables["user"]
    assert torch.equal(a.values, b.values.to(dtype))  # the fp32 rows, rounded once


def test_replay_last_event_wins(tmp_path: Path) -> None:
    """Removed then re-added (in a later delta, and in the same one), changed twice, added
    then removed, removed in the last delta."""
    t = filled("t", range(10), seed=3)
    row = lambda v: torch.full((4,), float(v))  # noqa: E731
    with Checkpointer(tmp_path / "ckpts", progress=False) as ckpt:
        ckpt.save(1, emb=t)
        t.drop(1)
        t.put(2, row(20))
        t.put(100, row(100))
        ckpt.save(2, delta=True, emb=t)
        t.put(1, row(11))
        t.put(2, row(22))
        t.drop(100)
        ckpt.save(3, delta=True, emb=t)
        t.drop(3)
        t.put(4, row(44))
        t.drop(5)
        t.put(5, row(55))  # a tombstone and a row in one delta: the row stays
        assert 5 in t.removed and 5 in t.changed
        ckpt.save(4, delta=True, emb=t)
    served = load_for_inference(export_checkpoint(tmp_path / "ckpts", tmp_path / "out"))
    table = served.tables["emb"]
    assert sorted(table.keys.tolist()) == sorted(t.rows) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    values, _ = table.lookup(torch.tensor([1, 2, 4, 5]))
    assert values[:, 0].tolist() == [11.0, 22.0, 44.0, 55.0]
    assert_same_export(served.path, export_for_serving(tmp_path / "live", step=4, emb=t))


# ---------------------------------------------------------------------------- ranks


def shard(table: ToyTable, rank: int, world: int) -> ToyTable:
    mine = ToyTable(table.name)
    for k, r in table.rows.items():
        if int(owner(torch.tensor([k]), world)[0]) == rank:
            mine.rows[k] = {s: v.clone() for s, v in r.items()}
    return mine


def sync(mine: ToyTable, new: ToyTable) -> None:
    """Bring a rank's table to ``new`` through put/drop, so its changes are tracked."""
    for k in set(mine.rows) - set(new.rows):
        mine.drop(k)
    for k, r in new.rows.items():
        if k not in mine.rows or not torch.equal(mine.rows[k]["values"], r["values"]):
            mine.put(k, r["values"], r["m"])


def test_a_checkpoint_of_two_ranks_with_deltas(tmp_path: Path) -> None:
    full = filled("t", range(0, 300, 3), seed=4)
    model = nn.Linear(3, 2)
    ranks = [shard(full, r, 2) for r in range(2)]
    ckpts = [Checkpointer(tmp_path / "ckpts", rank=r, world_size=2) for r in range(2)]
    for r in range(2):
        ckpts[r].save(1, emb=ranks[r], model=model)
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "s1", dtype=torch.float16)
    for r in range(2):  # the live export of the same two ranks
        export_for_serving(
            tmp_path / "live1", dtype=torch.float16, step=1, rank=r, world_size=2,
            emb=ranks[r], model=model,
        )  # fmt: skip
    assert_same_export(out, tmp_path / "live1")
    assert read_manifest(out)["world_size"] == 1  # every rank's rows, in one rank's parts
    for step in (2, 3):
        evolve(full, seed=step)
        for r in range(2):
            sync(ranks[r], shard(full, r, 2))
            ckpts[r].save(step, delta=True, emb=ranks[r], model=model)
    for c in ckpts:
        c.close()
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "s3")
    live = export_for_serving(tmp_path / "live3", step=3, emb=full, model=model)
    assert_same_export(out, live)


# ---------------------------------------------------------------------------- selection


def test_include_and_exclude(tmp_path: Path) -> None:
    model, user = save_full(tmp_path / "ckpts")
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "a", include=["model.*"])
    served = load_for_inference(out)
    assert list(served.tables) == ["model.sparse.item"]
    assert served.dense_names == ["model"]  # dense weights are always exported
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "b", exclude=["*.item"])
    assert list(load_for_inference(out).tables) == ["user"]
    out = export_checkpoint(
        tmp_path / "ckpts", tmp_path / "c", include=["user", "model.*"], exclude=["model.*"]
    )
    assert list(load_for_inference(out).tables) == ["user"]
    with pytest.raises(ValueError, match=r"'item\*' matches no table.*'user'"):
        export_checkpoint(tmp_path / "ckpts", tmp_path / "d", include=["item*"])
    with pytest.raises(TypeError, match="list of glob patterns"):
        export_checkpoint(tmp_path / "ckpts", tmp_path / "d", include="user")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()


def test_picking_the_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    save_full(root, step=10)
    save_full(root, step=20)
    (root / "step-000000000030").mkdir()  # a save that did not finish
    assert read_manifest(export_checkpoint(root, tmp_path / "a"))["step"] == 20
    assert read_manifest(export_checkpoint(root, tmp_path / "b", step=10))["step"] == 10
    path = root / "step-000000000010"
    assert read_manifest(export_checkpoint(path / MANIFEST, tmp_path / "c"))["step"] == 10
    with pytest.raises(CheckpointError, match=r"no complete checkpoint of step 30.*\[10, 20\]"):
        export_checkpoint(root, tmp_path / "x", step=30)
    with pytest.raises(CheckpointError, match="did not finish"):
        export_checkpoint(root / "step-000000000030", tmp_path / "x")
    with pytest.raises(ValueError, match="the checkpoint of step 10, not 20"):
        export_checkpoint(path, tmp_path / "x", step=20)
    with pytest.raises(NotACheckpointError, match="no such file"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(CheckpointError, match="a serving export already"):
        export_checkpoint(tmp_path / "a", tmp_path / "x")
    with pytest.raises(TypeError, match="dtype must be one of"):
        export_checkpoint(root, tmp_path / "x", dtype=torch.float64)
    assert not (tmp_path / "x").exists()


def test_rows_that_are_not_floating_point_are_refused(tmp_path: Path) -> None:
    ints = ToyTable("ids", dtype=torch.int32)
    ints.put(1, torch.ones(4))
    with Checkpointer(tmp_path / "ckpts", progress=False) as ckpt:
        ckpt.save(1, ids=ints)
    with pytest.raises(CheckpointError, match="table 'ids' has 'values' rows of dtype int32"):
        export_checkpoint(tmp_path / "ckpts", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- damage


def chain_root(tmp_path: Path) -> Path:
    model, user = build()
    root = tmp_path / "ckpts"
    with Checkpointer(root, progress=False) as ckpt:
        ckpt.save(1, model=model, user=user)
        evolve(user, seed=1)
        ckpt.save(2, delta=True, model=model, user=user)
    return root


@pytest.mark.parametrize(
    "rel",
    [
        "step-000000000001/sparse/t0001-user/r00000-p00000.safetensors",
        "step-000000000002/sparse/t0001-user/r00000-p00000.safetensors",
        "step-000000000002/sparse/t0001-user/r00000-removed.safetensors",
        "step-000000000002/dense/d00000.safetensors",
    ],
)
def test_a_corrupt_file_is_named_and_nothing_is_written(tmp_path: Path, rel: str) -> None:
    root = chain_root(tmp_path)
    f = root / rel
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f.name}: checksum mismatch"):
        export_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"{f.name}: missing"):
        export_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_broken_chain_is_refused(tmp_path: Path) -> None:
    root = chain_root(tmp_path)
    shutil.rmtree(root / "step-000000000001")
    with pytest.raises(CheckpointError, match="step-000000000002.*gap"):
        export_checkpoint(root, tmp_path / "out")


def test_the_output_directory(tmp_path: Path) -> None:
    root = chain_root(tmp_path)
    out = export_checkpoint(root, tmp_path / "out")
    with pytest.raises(CheckpointError, match="complete export already"):
        export_checkpoint(root, out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an unfinished export"):
        export_checkpoint(root, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    # What an export that failed midway left is cleared and written over.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / MANIFEST).unlink()
    (unfinished / ".writing-rank-00000.json").write_text("{}")
    assert_same_export(export_checkpoint(root, unfinished), out)
    assert not (unfinished / ".writing-rank-00000.json").exists()


# ---------------------------------------------------------------------------- command line


def test_the_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = chain_root(tmp_path)
    out = tmp_path / "out"
    argv = ["export", str(root), str(out), "--dtype", "bf16", "--exclude", "model.*"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out)
    rows = manifest["tables"]["user"]["ranks"][0]["keys"]
    assert printed.startswith(f"exported step 2 of {root} (bfloat16) into {out}: 1 table, ")
    assert f"{rows} rows, 1 module, " in printed and f"in {len(manifest['files'])} files" in printed
    assert load_for_inference(out).dtype == torch.bfloat16
    # The same again: OUT holds an export now.
    assert main(argv) == 1
    assert "recstack-saver: error: " in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert main(["export", str(root), str(tmp_path / "x"), "--include", "nothing*"]) == 2
    assert "matches no table" in capsys.readouterr().err
    assert main(["export", str(root), str(tmp_path / "x"), "--dtype", "fp64"]) == 2
    assert main(["export", str(root), str(tmp_path / "x"), "--step", "-1"]) == 2
    capsys.readouterr()
    # The function form, for other command lines.
    assert export_command(str(root), str(tmp_path / "s1"), "fp16", step=1) == 0
    assert read_manifest(tmp_path / "s1")["step"] == 1
    assert "(float16)" in capsys.readouterr().out
    assert export_command(str(root), str(tmp_path / "y"), "int8") == 2
    assert "recstack: error: dtype must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
