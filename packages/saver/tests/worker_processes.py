"""The saver's worker script (mp_worker.py) run as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("mp_worker.py")


def spawn(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_ranks(
    action: str, root: Path, world: int, out: Path, mode: str = "reshard", suffix: str = "json"
) -> None:
    procs = [spawn(mode, action, root, r, world, out / f"{r}.{suffix}") for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
