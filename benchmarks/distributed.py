"""Sharded embedding tables: lookup + backward + SparseAdam over 1 to 4 ranks.

Workload: 26 tables (dim ``--dim``), each read by one pooled feature with ``--ids-per-row``
Zipf(1.05) ids per row (hashed with a seed per feature, as the feature engine gives them),
``--batch`` rows per rank; every rank runs ``--steps`` timed steps
of ``ShardedEmbeddingCollection`` forward, backward and ``SparseAdam.step`` after
``--warmup`` steps (the tables fill up during the warm-up). Each world size runs as that
many processes (gloo on CPU, NCCL with one GPU per rank), each on its own share of the ids.

Reported per world size: the median step time (the slowest rank's), against one process
running the same per-rank batch on its own (``ShardedEmbeddingCollection`` with one rank,
so the exchanges are no-ops): their ratio is the cost of sharding at a fixed batch per rank
(weak scaling). The notes give the bytes each rank sent per step (ids out, rows back, and
as many gradient bytes as row bytes in the backward) and the load balance: the busiest
rank's served lookups against the mean (row-wise ownership by hash should keep it within
5%). Exchanges have no copy-bandwidth roofline here, so the rows carry no MBU.

    python benchmarks/distributed.py --device cpu          # gloo: checks logic and bytes
    python benchmarks/distributed.py                        # NCCL: needs one GPU per rank
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import Report, Row, device_name, synchronize
from _results import add_json_option, report_result, save
from safetensors.torch import load_file, save_file

from recstack.core import KeyedJaggedTensor, hash64
from recstack.embedding_engine import FeatureConfig, ShardedEmbeddingCollection, TableConfig
from recstack.sparse_optim import SparseAdam

TABLES = 26


def _batch(
    rank: int, step: int, args: argparse.Namespace, device: torch.device
) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = args.batch * args.ids_per_row
    ranks = torch.rand(TABLES, n, generator=g).pow(-1.0 / 1.05)
    popularity = (ranks.to(torch.int64) - 1).clamp_(0, args.vocab - 1)
    # Each feature's ids hashed with its own seed, as the feature engine's Hash gives them:
    # the most popular ids of two features are different keys.
    ids = torch.cat([hash64(popularity[t], seed=t) for t in range(TABLES)])
    lengths = torch.full((TABLES * args.batch,), args.ids_per_row, dtype=torch.int64)
    return KeyedJaggedTensor([f"f{t}" for t in range(TABLES)], ids, lengths).to(device)


def _worker(rank: int, world: int, init: str, out: str, args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world
    )
    tables = [TableConfig(f"t{t}", dim=args.dim) for t in range(TABLES)]
    features = [FeatureConfig(f"f{t}", f"t{t}", pooling="sum") for t in range(TABLES)]
    ec = ShardedEmbeddingCollection(tables, features, device=device)
    opt = SparseAdam(ec.sparse_parameters(), lr=0.01)
    times, sent_ids, sent_rows, served = [], [], [], []
    for step in range(args.warmup + args.steps):
        kjt = _batch(rank, step, args, device)
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        pooled = ec(kjt)
        sum(v.sum() for v in pooled.values()).backward()
        opt.step()
        opt.zero_grad()
        synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        if step >= args.warmup:
            load = ec.last_load
            assert load is not None
            times.append(float(elapsed))
            sent_ids.append(load.id_bytes_sent)
            sent_rows.append(load.row_bytes_sent)
            served.append(load.served)
    save_file(
        {
            "times": torch.tensor(times, dtype=torch.float64),
            "id_bytes": torch.tensor(sent_ids, dtype=torch.float64),
            "row_bytes": torch.tensor(sent_rows, dtype=torch.float64),
            "served": torch.tensor(served, dtype=torch.float64),
        },
        str(Path(out) / f"rank{rank}.safetensors"),
    )
    dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, (world, os.path.join(tmp, "init"), tmp, args), nprocs=world)
        ranks = [load_file(os.path.join(tmp, f"rank{r}.safetensors")) for r in range(world)]
    served = torch.stack([r["served"] for r in ranks]).mean(1)
    return {
        "step_s": statistics.median(ranks[0]["times"].tolist()),
        "id_bytes": float(torch.stack([r["id_bytes"] for r in ranks]).mean()),
        "row_bytes": float(torch.stack([r["row_bytes"] for r in ranks]).mean()),
        "balance": float(served.max() / served.mean()),
        "served": float(served.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch", type=int, help="rows per rank (65,536 GPU, 8,192 CPU)")
    parser.add_argument("--ids-per-row", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=10_000_000, help="ids per table")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    add_json_option(parser)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 65536 if args.device == "cuda" else 8192
    device = torch.device(args.device)
    if device.type == "cuda" and max(args.worlds) > torch.cuda.device_count():
        parser.error(
            f"--worlds up to {max(args.worlds)} needs as many GPUs; this machine has "
            f"{torch.cuda.device_count()} (use --device cpu for gloo processes)"
        )
    backend = "NCCL" if device.type == "cuda" else "gloo"
    report = Report(
        f"Sharded tables, {TABLES} tables x dim {args.dim}, batch {args.batch:,} per rank, "
        f"Zipf(1.05), {backend}",
        device_name(device),
        0.0,
    )
    results = {w: _run(w, args) for w in args.worlds}
    base = results.get(1) or _run(1, args)
    for world, r in results.items():
        sent_mb = (r["id_bytes"] + 2 * r["row_bytes"]) / 1e6
        report.add(
            Row(
                f"{world} rank(s): lookup + backward + SparseAdam",
                r["step_s"],
                base["step_s"],
                0,
                baseline="1 rank, same batch per rank",
                notes=(
                    f"{sent_mb:.1f} MB sent per rank a step (ids {r['id_bytes'] / 1e6:.1f}, rows "
                    f"{r['row_bytes'] / 1e6:.1f}, grads as much); busiest rank serves "
                    f"{r['balance']:.3f}x the mean ({r['served']:,.0f} lookups)"
                ),
                extra={
                    "id_bytes_sent": r["id_bytes"],
                    "row_bytes_sent": r["row_bytes"],
                    "load_balance": r["balance"],
                    "served_mean": r["served"],
                },
            )
        )
    print()
    print(report.markdown())
    save(report_result(report, "distributed", device, args, mbu=False), args.json)


if __name__ == "__main__":
    main()
