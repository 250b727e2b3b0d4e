"""The Trainer under torchrun-style data parallelism (two gloo processes on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toys import Toy, toy_data

from recstack.pipelines import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_train_like_one_process_on_the_whole_batches(tmp_path: Path) -> None:
    world = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(r),
                str(world),
                str(tmp_path / "init"),
                str(tmp_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r}:\n{logs[r][-4000:]}"
    torch.manual_seed(1)
    single = Toy()
    single.net[2].p = 0.0
    Trainer(
        single, toy_data(), device="cpu", progress=False, epochs=2,
        dense_optimizer=torch.optim.AdamW(single.parameters(), lr=0.05),
    ).fit()  # fmt: skip
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the replicas agree
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ckpt" / "step-000000000020" / "manifest.json").is_file()
