"""Sharded tables with the saver: 4 gloo ranks train, checkpoint (each rank its own part
files), and 2 ranks resume; every id's row and Adam moments then equal one process's
trained without interruption, and one unsharded process loads the 4-rank checkpoint.
Dynamic tables (one with admission), a fixed-size table sharded and one replicated.

Run as a script (``python test_sharded_training.py PHASE RANK WORLD INIT DIR``) this file
is one gloo rank of those runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import (
    Admission,
    EmbeddingCollection,
    FeatureConfig,
    ShardedEmbeddingCollection,
    TableConfig,
)
from recstack.saver import Checkpointer
from recstack.sparse_optim import SparseAdam

THIS = Path(__file__)
BATCH, VOCAB, SAVE_AT, STEPS = 16, 40, 3, 5
TABLES = [
    TableConfig("item", dim=4),
    TableConfig("user", dim=2, admission=Admission(min_count=2, counter_slots=4096)),
    TableConfig("cat", dim=3, fixed_size=VOCAB),  # replicated: small
    TableConfig("zone", dim=2, fixed_size=VOCAB),  # sharded: left out of REPLICATED
]
REPLICATED = ["cat"]
FEATURES = [
    FeatureConfig("item", "item", pooling="sum"),
    FeatureConfig("hist", "item", pooling="none", max_len=3),
    FeatureConfig("user", "user", pooling="mean"),
    FeatureConfig("cat", "cat", pooling="sum"),
    FeatureConfig("zone", "zone", pooling="mean"),
]


class Holder(torch.nn.Module):
    """A model holding its tables as ``ec``, sharded or not: the same checkpoint names."""

    def __init__(self, ec: torch.nn.Module) -> None:
        super().__init__()
        self.ec = ec


def _batch(step: int, rows: range | list[int]) -> tuple[KeyedJaggedTensor, list[int]]:
    g = torch.Generator().manual_seed(step)
    every = [
        [torch.randint(0, VOCAB, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
         for _ in FEATURES]
        for _ in range(BATCH)
    ]  # fmt: skip
    idx = list(rows)
    values = [every[i][k] for k in range(len(FEATURES)) for i in idx]
    kjt = KeyedJaggedTensor(
        [f.name for f in FEATURES],
        torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        torch.tensor([v.numel() for v in values], dtype=torch.int64),
    )
    return kjt, idx


def _loss(out: dict, idx: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    total = torch.zeros(())
    for name in sorted(out):
        v = out[name]
        w = torch.randn(BATCH, *v.shape[1:], generator=g)[idx]
        total = total + (v * w).sum()
    return total


def _train(model: Holder, opt: SparseAdam, steps: range, rows_of) -> None:  # noqa: ANN001
    for step in steps:
        kjt, idx = _batch(step, rows_of(step))
        _loss(model.ec(kjt), idx).backward()
        opt.step()
        opt.zero_grad()
        model.ec.evict(older_than_step=model.ec.step - 2)  # the same step on every rank


def _rows(ec: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every held id's row and optimizer slots, by ``table.slot``, with the keys. A
    replicated table's row metadata counts each rank's own sightings: left out."""
    out = {}
    for table, state in ec.keyed_states().items():
        for keys, slots in state.export_chunks(1 << 20):
            out[f"{table}.keys"] = keys
            for s, v in slots.items():
                if not (table in REPLICATED and s in ("hit_count", "last_seen")):
                    out[f"{table}.{s}"] = v.float()
    return out


def _by_key(parts: list[dict[str, torch.Tensor]]) -> dict[tuple[str, int], torch.Tensor]:
    merged = {}
    for part in parts:
        for name, keys in part.items():
            if not name.endswith(".keys"):
                continue
            table = name.removesuffix(".keys")
            slots = sorted(k for k in part if k.startswith(f"{table}.") and k != name)
            row = torch.cat([part[s].reshape(keys.numel(), -1) for s in slots], dim=1)
            for i, k in enumerate(keys.tolist()):
                assert (table, k) not in merged, f"{table} id {k} is on two ranks"
                merged[(table, k)] = row[i]
    return merged


def _rank(phase: str, rank: int, world: int, init: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = Holder(ShardedEmbeddingCollection(TABLES, FEATURES, replicate=REPLICATED))
    opt = SparseAdam(model.ec.sparse_parameters(), lr=0.05, step_count="per_row")
    ckpt = Checkpointer(Path(root) / "ckpt", progress=False)
    mine = range(rank, BATCH, world)
    if phase == "train":
        _train(model, opt, range(SAVE_AT), lambda step: mine)
        ckpt.save(SAVE_AT, model=model, opt=opt)
        save_file(_rows(model.ec), str(Path(root) / f"saved-{rank}.safetensors"))
    else:
        ckpt.load(model=model, opt=opt)
        assert model.ec.step == SAVE_AT
        _train(model, opt, range(SAVE_AT, STEPS), lambda step: mine)
        save_file(_rows(model.ec), str(Path(root) / f"resumed-{rank}.safetensors"))
    dist.destroy_process_group()


def _spawn(phase: str, world: int, root: Path) -> None:
    init = root / f"init-{phase}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if env.get("TRITON_INTERPRET") == "1":
        # The kernels are tested in-process; interpreted again in four ranks they only
        # make this minutes slower. The ranks take core's torch path then (on a GPU
        # nothing changes).
        env["RECSTACK_KERNELS"] = "torch"
    procs = [
        subprocess.Popen(
            [sys.executable, str(THIS), phase, str(r), str(world), str(init), str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"{phase} rank {r}:\n{logs[r][-4000:]}"


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, row in want.items():
        torch.testing.assert_close(got[key], row, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_four_ranks_checkpoint_and_two_resume_like_one_uninterrupted_process(
    tmp_path: Path,
) -> None:
    _spawn("train", 4, tmp_path)
    _spawn("resume", 2, tmp_path)
    everything = range(BATCH)
    single = Holder(EmbeddingCollection(TABLES, FEATURES))
    opt = SparseAdam(single.ec.sparse_parameters(), lr=0.05, step_count="per_row")
    _train(single, opt, range(SAVE_AT), lambda step: everything)
    saved = _by_key([load_file(str(tmp_path / f"saved-{r}.safetensors")) for r in range(4)])
    _close(saved, _by_key([_rows(single.ec)]))
    # One unsharded process loads what 4 ranks wrote.
    loaded = Holder(EmbeddingCollection(TABLES, FEATURES))
    loaded_opt = SparseAdam(loaded.ec.sparse_parameters(), lr=0.05, step_count="per_row")
    Checkpointer(tmp_path / "ckpt").load(model=loaded, opt=loaded_opt)
    _close(_by_key([_rows(loaded.ec)]), saved)
    assert loaded.ec.step == SAVE_AT
    # Two ranks resumed from it and trained on: as one process never interrupted.
    _train(single, opt, range(SAVE_AT, STEPS), lambda step: everything)
    resumed = _by_key([load_file(str(tmp_path / f"resumed-{r}.safetensors")) for r in range(2)])
    _close(resumed, _by_key([_rows(single.ec)]))


if __name__ == "__main__":
    _rank(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
