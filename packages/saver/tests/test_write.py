"""recstack.saver.write: a writer killed with SIGKILL at random instants always leaves the
previous checkpoint loadable."""

from __future__ import annotations

import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from toy_table import ToyTable
from worker_processes import spawn

from recstack.saver import Checkpointer


@pytest.mark.slow
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
