"""Worker processes of the saver's multi-process tests (run as scripts, not collected).

``python mp_worker.py reshard save|load ROOT RANK WORLD OUT``: one gloo rank saving its
share of a table, or loading one and writing what it got to OUT (JSON).
``python mp_worker.py loop ROOT MODE``: save ever newer checkpoints until killed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from toy_table import ToyTable, filled  # noqa: E402

from recstack.core import owner  # noqa: E402
from recstack.saver import Checkpointer  # noqa: E402

ALL_KEYS = list(range(0, 500, 3)) + [2**50 + 1, -99]


def reshard(action: str, root: Path, rank: int, world: int, out: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/.init-{action}-{world}", rank=rank, world_size=world
    )
    try:
        ckpt = Checkpointer(root)
        assert (ckpt.rank, ckpt.world_size) == (rank, world)
        if action == "save":
            full = filled("t", ALL_KEYS, seed=1)
            mine = ToyTable("t")
            keys = torch.tensor(ALL_KEYS)
            for k in keys[owner(keys, world) == rank].tolist():
                mine.rows[k] = full.rows[k]
            ckpt.save(1, emb=mine, model=torch.nn.Linear(2, 2))
        else:
            mine = ToyTable("t")
            ckpt.load(emb=mine, model=torch.nn.Linear(2, 2))
            out.write_text(json.dumps({str(k): v for k, v in mine.as_dict().items()}))
    finally:
        dist.destroy_process_group()


def loop(root: Path, mode: str) -> None:
    """Checkpoint ``n`` holds a table whose every value is ``n``: whatever step a load
    finds, its contents say whether it is whole."""
    ckpt = Checkpointer(root, part_bytes=1 << 20, threads=2)
    table = ToyTable("t", dim=32)
    keys = torch.arange(60_000)
    step = 1
    while True:
        value = torch.full((32,), float(step))
        table.rows = {k: {"values": value, "m": value} for k in keys.tolist()}
        ckpt.save(step, blocking=(mode == "blocking"), emb=table, extras={"step": step})
        if step == 1:
            ckpt.wait()  # the parent kills only once a checkpoint is complete
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    if sys.argv[1] == "reshard":
        reshard(
            sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
        )
    else:
        loop(Path(sys.argv[2]), sys.argv[3])
