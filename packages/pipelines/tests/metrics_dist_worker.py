"""One gloo rank of the metrics' multi-process test (run as a script, not collected).

``python metrics_dist_worker.py RANK WORLD INIT_FILE OUT``: for each case, every rank
rebuilds the same global data from a fixed seed, feeds only its own share (in uneven
batches) to the metrics, and records what ``compute()`` returned (or the error it raised);
OUT gets ``{case: result}`` as JSON. One launch runs every case: starting processes is the
slow part.

Cases: ``"ok"`` (rank 1 sends float32 predictions without weights, the others float64
with weights; users span ranks), ``"empty_rank"`` (the last rank feeds nothing) and
``"nan"`` (one NaN prediction on the last rank: every rank must raise, none may hang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from recstack.pipelines.metrics import BinaryMetrics, MetricCollection

ROWS = 2_003
CASES = ("ok", "empty_rank", "nan")
METRICS = ("auc", "gauc", "logloss", "calibration", "ne")


def make_data() -> dict[str, torch.Tensor]:
    """The global evaluation set: quantized predictions (ties, exact in float32), labels,
    users (some with one class) and weights."""
    g = torch.Generator().manual_seed(1234)
    preds = torch.randint(0, 64, (ROWS,), generator=g).double() / 64
    labels = (torch.rand(ROWS, generator=g, dtype=torch.float64) < preds).long()
    groups = torch.randint(0, 150, (ROWS,), generator=g)
    weights = torch.rand(ROWS, generator=g, dtype=torch.float64) + 0.5
    return {"preds": preds, "labels": labels, "groups": groups, "weights": weights}


def shares(case: str, world: int) -> list[tuple[int, int]]:
    """Each rank's [start, stop) rows: uneven, the last rank empty in ``"empty_rank"``."""
    cuts = [0, *(ROWS * r // (world + 1) for r in range(1, world)), ROWS]
    if case == "empty_rank":
        cuts[-2] = ROWS
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def global_weights(case: str, world: int) -> torch.Tensor:
    """The weights the gathered set must hold: rank 1 sends none in ``"ok"`` (so 1)."""
    w = make_data()["weights"].clone()
    if case == "ok" and world > 1:
        start, stop = shares(case, world)[1]
        w[start:stop] = 1.0
    return w


def run_case(case: str, rank: int, world: int) -> dict:
    """This rank's share of ``case`` through the metrics; what compute() returned."""
    data = make_data()
    start, stop = shares(case, world)[rank]
    p = data["preds"][start:stop]
    y = data["labels"][start:stop]
    grp = data["groups"][start:stop]
    w = data["weights"][start:stop]
    if case == "nan" and rank == world - 1:
        p = p.clone()
        p[3] = float("nan")
    send_weights = not (case == "ok" and rank == 1)
    if case == "ok" and rank == 1:
        p = p.float()
    single = BinaryMetrics(METRICS, name="ctr")
    multi = MetricCollection(["a", "b"], METRICS)
    for lo in range(0, p.numel(), 333):
        sl = slice(lo, lo + 333)
        ws = w[sl] if send_weights else None
        single.update(p[sl], y[sl], groups=grp[sl], weights=ws)
        two = torch.stack([p[sl], p[sl]], dim=1)
        multi.update(two, {"a": y[sl], "b": y[sl]}, groups=grp[sl], weights=ws)
    try:
        return {"single": single.compute(), "multi": multi.compute()}
    except ValueError as e:
        return {"error": str(e)}


def main(rank: int, world: int, init_file: str, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out.write_text(json.dumps({case: run_case(case, rank, world) for case in CASES}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out = sys.argv[1:]
    main(int(rank), int(world), init_file, Path(out))
