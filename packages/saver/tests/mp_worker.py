"""Worker processes of the saver's multi-process tests (run as scripts, not collected).

``python mp_worker.py reshard save|load ROOT RANK WORLD OUT``: one gloo rank saving its
share of a table, or loading one and writing what it got to OUT (JSON).
``python mp_worker.py fsdp save|load ROOT RANK WORLD OUT``: one gloo rank saving a model
sharded by FSDP2 and its AdamW after a step, or loading them into a new sharded pair;
writes the whole weights and moments it holds to OUT (safetensors).
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


def fsdp_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A two-layer model (first dim 5: an uneven split on 2 and 3 ranks) and its AdamW."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def whole(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).contiguous()


def fsdp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": whole(v) for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            out[f"opt.{i}.{k}"] = whole(v)
    return out


def fsdp(action: str, root: Path, rank: int, world: int, out: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{root}/.init-fsdp-{action}", rank=rank, world_size=world
    )
    try:
        model = fsdp_model(seed=0 if action == "save" else 1)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        ckpt = Checkpointer(root, progress=False)
        if action == "save":
            model(torch.arange(12.0).view(2, 6)).square().sum().backward()
            opt.step()
            ckpt.save(1, model=model, opt=opt)
        else:
            ckpt.load(model=model, opt=opt)
        save_file(fsdp_state(model, opt), str(out))
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
    if sys.argv[1] == "fsdp":
        fsdp(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
    elif sys.argv[1] == "reshard":
        reshard(
            sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
        )
    else:
        loop(Path(sys.argv[2]), sys.argv[3])
