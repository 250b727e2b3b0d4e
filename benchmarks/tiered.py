"""Tiered tables: training throughput with part of the rows in pinned host memory, against
the same table all in GPU memory.

Workload: one dynamic table of ``--rows`` ids at ``--dim`` (fp32) with ``SparseAdam``
state, filled before timing; each step looks up ``--batch`` bags of ``--bag`` Zipf(1.05)
ids (sum pooling), backpropagates a random linear loss and steps the optimizer. Each
``hbm_budget`` (a share of the rows, ``--budgets``) runs with promotion on demand (each
forward brings its own rows to the GPU) and with prefetch (the next batch's rows promoted
after each forward, as the Trainer does), and the baseline is the same table without a
budget, in the same run: built and timed right before each tiered table, ``--repeats``
times, with the median of each reported (a host whose speed drifts, or differs between
machines, moves both alike). Reported per run: the step time and the baseline's, the
throughput ratio, the GPU-tier hit rate (rows found on the GPU when a forward asked) and
the bytes moved between the tiers per step. A table that does not fit the card's memory is
reported as such.

    python benchmarks/tiered.py                    # GPU: 100M rows (50M below 120 GiB)
    python benchmarks/tiered.py --device cpu       # a smoke run: the logic, tiny sizes
    python benchmarks/tiered.py --rows 120000000 --budgets 0.5 --steps 300 --no-baseline
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _harness import Report, Row, copy_bandwidth, device_name, sized_for_device, synchronize
from _results import add_json_option, report_result, save

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.sparse_optim import SparseAdam

GPU = {"rows": None, "batch": 16384, "steps": 50, "warmup": 30, "fill_chunk": 1 << 23, "repeats": 3}
CPU = {"rows": 200_000, "batch": 512, "steps": 5, "warmup": 5, "fill_chunk": 1 << 16, "repeats": 1}


def zipf_ids(rows: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` ids in ``[0, rows)`` with P(rank k) ~ 1/k**1.05, ranks scattered over the ids
    by a fixed odd multiplier (so hot ids are not neighbours)."""
    # Inverse-CDF sampling of the continuous power law, rounded down: close to Zipf(1.05)
    # without a rows-long probability table.
    s = 1.05
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    top = float(rows) ** (1 - s)
    rank = ((1 - u) + u * top) ** (1 / (1 - s))
    rank = rank.clamp_(1, rows).to(torch.int64) - 1
    return ((rank * 0x9E3779B1) % rows).to(device)


def batches(args: argparse.Namespace, device: torch.device, count: int, seed: int) -> list:
    """``count`` fresh batches (a step never sees the same ids again by construction)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.full((args.batch,), args.bag, dtype=torch.int64, device=device)
    return [
        KeyedJaggedTensor(["ids"], zipf_ids(args.rows, args.batch * args.bag, gen, device), lengths)
        for _ in range(count)
    ]


def build(args: argparse.Namespace, device: torch.device, budget: int | None):
    table = TableConfig("item", dim=args.dim, capacity=args.rows, hbm_budget=budget)
    ec = EmbeddingCollection([table], [FeatureConfig("ids", "item")], device=device)
    opt = SparseAdam(ec.sparse_parameters(), lr=1e-3)
    state = ec.keyed_states()["item"]
    meta = state.state_metadata()
    gen = torch.Generator(device=device).manual_seed(1)
    for start in range(0, args.rows, args.fill_chunk):
        stop = min(args.rows, start + args.fill_chunk)
        ids = torch.arange(start, stop, device=device)
        values = torch.randn(stop - start, args.dim, generator=gen, device=device) * 0.01
        state.import_chunk(ids, {"values": values}, meta)
        del ids, values
    return ec, opt


def step(ec: EmbeddingCollection, opt: SparseAdam, kjt, weight, ahead=None) -> None:
    out = ec(kjt)["ids"]
    if ahead is not None:
        ec.prefetch(ahead)
    (out * weight).sum().backward()
    opt.step()
    opt.zero_grad()


def timed(args, device, ec, opt, data, weight, prefetch: bool) -> dict[str, float]:
    """Warm-up then timed steps on a built table, one batch of ``data`` each; the step
    time and the tier counts."""
    total = args.warmup + args.steps
    n = len(data)
    assert n >= total + 1
    for i in range(args.warmup):
        step(ec, opt, data[i], weight, data[i + 1] if prefetch else None)
    for phys in ec.physical_tables.values():
        if phys.tiers is not None:
            phys.tiers.reset_stats()
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, total):
        step(ec, opt, data[i], weight, data[i + 1] if prefetch else None)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    got = {"step_s": seconds, "hit_rate": 1.0, "host_bytes_per_step": 0.0}
    stats = ec.tier_stats().get("item")
    if stats is not None:
        got |= {
            "hit_rate": stats.hit_rate,
            "host_bytes_per_step": stats.host_bytes / args.steps,
            "device_rows": float(stats.device_rows),
            "promoted_per_step": stats.promoted / args.steps,
        }
    mem = ec.memory_stats()
    got |= {"gpu_bytes": float(mem.total), "host_bytes": float(mem.host)}
    return got


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median step time (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["step_s"])[len(runs) // 2]


def run(args, device, budget_share, data, weight) -> dict[bool, dict[str, float]]:
    """One table at one budget (``None``: no budget), trained on demand on ``data[False]``,
    then with prefetch on ``data[True]`` (other ids: the first run warmed nothing for it);
    ``{prefetch: measurement}``, empty when it did not fit. The table without a budget
    trains on both, without prefetch (it has nothing to promote)."""
    budget = None if budget_share is None else max(1, int(args.rows * budget_share))
    name = "all in GPU memory" if budget is None else f"budget {budget_share:.0%}"
    out: dict[bool, dict[str, float]] = {}
    ec = opt = None
    try:
        t0 = time.perf_counter()
        ec, opt = build(args, device, budget)
        print(f"  {name}: filled in {time.perf_counter() - t0:.1f} s", flush=True)
        for prefetch in (False, True):
            ahead = prefetch and budget is not None
            got = out[prefetch] = timed(args, device, ec, opt, data[prefetch], weight, ahead)
            mode = "prefetch" if ahead else "on demand"
            if budget is None:
                mode = f"the {'prefetch' if prefetch else 'on-demand'} run's ids"
            print(
                f"  {name}, {mode}: {got['step_s'] * 1e3:.2f} ms a step, hit rate "
                f"{got['hit_rate']:.3f}, {got['host_bytes_per_step'] / 2**20:.1f} MiB between "
                f"tiers a step, {got['gpu_bytes'] / 2**30:.1f} GiB on the GPU, "
                f"{got['host_bytes'] / 2**30:.1f} GiB in host memory",
                flush=True,
            )
    except torch.cuda.OutOfMemoryError:
        print(f"  {name}: out of GPU memory", flush=True)
    del ec, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, help="ids in the table (GPU: 100M, 50M below 120 GiB)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, help="bags a step (GPU 16384)")
    p.add_argument("--bag", type=int, default=4, help="ids a bag")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="steps before timing (the GPU tier fills)")
    p.add_argument("--fill-chunk", type=int, help="ids imported at once when filling")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--repeats", type=int, help="baseline and tiered runs per budget (GPU 3)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the all-GPU table (for one that cannot fit): the runs print, no report",
    )
    add_json_option(p)
    args = p.parse_args()
    device = sized_for_device(args, GPU, CPU)
    if args.rows is None:
        # 100M rows with Adam and their all-GPU baseline need about 83 GiB: half as many
        # on a card with less memory.
        total = torch.cuda.get_device_properties(device).total_memory
        args.rows = 100_000_000 if total >= 120 * 2**30 else 50_000_000
    bandwidth = copy_bandwidth(device, None if device.type == "cuda" else 64 * 2**20)
    print(
        f"tiered: {args.rows:,} rows x {args.dim} (fp32, Adam) on {device_name(device)}, "
        f"{args.batch} bags x {args.bag} Zipf(1.05) ids a step",
        flush=True,
    )
    count = args.warmup + args.steps + 1
    data = {False: batches(args, device, count, 7), True: batches(args, device, count, 8)}
    weight = torch.randn(args.batch, args.dim, device=device)
    report = Report(
        f"Tiered table: {args.rows:,} rows x {args.dim} with Adam, lookup + backward + update",
        device_name(device),
        bandwidth,
    )
    row_bytes = args.dim * 4 * 3  # values and two Adam moments
    unique = float(torch.unique(data[False][0].values()).numel())
    for share in args.budgets:
        ours: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        base: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.repeats):
            if not args.no_baseline:
                for prefetch, got in run(args, device, None, data, weight).items():
                    base[prefetch].append(got)
            for prefetch, got in run(args, device, share, data, weight).items():
                ours[prefetch].append(got)
        for prefetch in (False, True):
            if not ours[prefetch] or not base[prefetch]:
                continue
            got, ref = median_run(ours[prefetch]), median_run(base[prefetch])
            pairs = zip(ours[prefetch], base[prefetch], strict=False)  # a run may not fit
            ratios = [b["step_s"] / o["step_s"] for o, b in pairs]
            mode = "prefetch" if prefetch else "on demand"
            report.add(
                Row(
                    f"budget {share:.0%} of rows, {mode}",
                    got["step_s"],
                    ref["step_s"],
                    int(unique * row_bytes * 2),
                    baseline="the same table all in GPU memory",
                    notes=f"hit rate {got['hit_rate']:.3f}, "
                    f"{got['host_bytes_per_step'] / 2**20:.1f} MiB between tiers a step, "
                    f"median of {len(ratios)} runs (each beside its baseline: ratios "
                    f"{min(ratios):.2f}-{max(ratios):.2f})",
                    extra=got | {"ratio_min": min(ratios), "ratio_max": max(ratios)},
                )
            )
    if report.rows:
        print(report.markdown())
        save(report_result(report, "tiered", device, args), args.json)


if __name__ == "__main__":
    main()
