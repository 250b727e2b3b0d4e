"""The saver across processes: gloo ranks reshard N -> M, and a writer killed with SIGKILL
at random instants always leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from toy_table import ToyTable, filled

from recstack.core import owner
from recstack.saver import Checkpointer

WORKER = Path(__file__).with_name("mp_worker.py")
pytestmark = pytest.mark.slow


def spawn(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_ranks(action: str, root: Path, world: int, out: Path) -> None:
    procs = [spawn("reshard", action, root, r, world, out / f"{r}.json") for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]


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


@pytest.mark.parametrize("mode", ["blocking", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_writer_killed_at_any_instant_leaves_the_last_checkpoint(
    tmp_path: Path, mode: str, seed: int
) -> None:
    proc = spawn("loop", tmp_path, mode)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first checkpoint is complete
        assert first.strip() == "1", proc.stderr.read() if proc.stderr else ""
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a partial checkpoint is ignored with a warning
        ckpt = Checkpointer(tmp_path)
        step = ckpt.latest()
        assert step is not None and step >= 1
        table, extras = ToyTable("t", dim=32), {}
        ckpt.load(emb=table, extras=extras)
    assert extras == {"step": step} and len(table.rows) == 60_000
    values = torch.stack([r["values"] for r in table.rows.values()])
    assert bool((values == float(step)).all())
