"""Run a worker script as several local ranks, for the multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path


def ranks_ended(
    worker: Path,
    world: int,
    args: Callable[[int], list[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> list[tuple[int, str]]:
    """Run ``python worker RANK WORLD *args(RANK)`` for every rank at once; each rank's exit
    code and output."""
    # A rank that aborts in native code prints every thread's Python stack.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    environment.update(interpreted_kernels_off())
    if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
        # Added to the caller's path (packages run from source), not in its place.
        environment["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), *args(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, log) for p, log in zip(procs, logs, strict=True)]


def interpreted_kernels_off() -> dict[str, str]:
    """Environment for a child process of a CPU test run: under Triton's interpreter (the
    kernel tests' CPU mode) the children take core's torch path instead. The kernels are
    tested in the test process itself; interpreting them again in every rank only makes
    the multi-process tests minutes slower. On a GPU nothing changes."""
    return {"RECSTACK_KERNELS": "torch"} if os.environ.get("TRITON_INTERPRET") == "1" else {}


def run_ranks(
    worker: Path,
    world: int,
    args: Callable[[int], list[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> None:
    """Run ``python worker RANK WORLD *args(RANK)`` for every rank at once; fail with the
    end of a rank's output when it does not exit with 0."""
    for r, (code, log) in enumerate(ranks_ended(worker, world, args, env=env, timeout=timeout)):
        assert code == 0, f"rank {r}:\n{log[-4000:]}"
