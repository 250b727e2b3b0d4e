"""recstack.pipelines.launch: each rank's GPU from torchrun's environment, and
``recstack train`` under ``torchrun`` with 2 gloo ranks: the tables sharded, the dense
side in DDP or FSDP2, the run reported once, a checkpoint with each rank's table parts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from config_testdata import DEMO, TINY
from rank_processes import interpreted_kernels_off

from recstack.pipelines.launch import distributed_run, one_writer, rank_device


def test_each_rank_gets_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rank_device("cuda") == torch.device("cuda", 1)
    assert rank_device("cuda:0") == torch.device("cuda", 0)  # given: kept
    assert rank_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(ValueError, match=r"RANK=9 must be in \[0, WORLD_SIZE=8\)"):
        rank_device("cuda")


def test_outside_torchrun_nothing_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert rank_device("cuda") == torch.device("cuda")
    with distributed_run("cpu"):
        assert not torch.distributed.is_initialized()
    calls = []
    assert one_writer(lambda: calls.append(1) or "files") == "files"
    assert calls == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("dense", ["ddp", "fsdp"])
def test_recstack_train_under_torchrun_shards_the_tables(tmp_path: Path, dense: str) -> None:
    """``trainer.dense_parallel`` picks DDP or FSDP2 for the demo's DIN tower."""
    script = Path(sys.executable).with_name("recstack")
    sets = [x for kv in [*TINY, f"trainer.dense_parallel={dense}"] for x in ("--set", kv)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(script), "train", str(DEMO), *sets,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **interpreted_kernels_off()}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("| steps | 4 |") == 1  # rank 0 reports; each rank took 4 steps of 250
    assert "| ctr/auc |" in out
    ckpt = tmp_path / "runs/demo_din/checkpoints/step-000000000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for table in manifest["tables"].values():
        assert len(table["ranks"]) == 2  # each rank wrote its own shard's parts
    held = sum(r["keys"] for t in manifest["tables"].values() for r in t["ranks"])
    assert held > 0
