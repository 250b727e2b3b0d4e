"""Rows swapped between the GPU tier and the pinned host tier of a ``PagedTensor``: the
swap kernel (one launch, host rows read and written in place through mapped memory)
against plain PyTorch moving the same rows (gather the host rows on the CPU, copy them to
the GPU, copy the GPU rows back, scatter them on the CPU).

Workload: a ``--dim``-wide fp32 table whose first ``--gpu-rows`` rows are in GPU memory
and the next ``--host-gb`` GiB in pinned host memory; ``--pairs`` pairs of one GPU row and
one host row, the host rows random or consecutive. Reported: the time per swap, the
baseline's (both by the wall clock, a device sync after each call), the ratio, and the
bytes moved both ways (``2 * pairs * dim * 4``) against the
device-to-device copy bandwidth.

    python benchmarks/tier_bus.py                   # GPU
    python benchmarks/tier_bus.py --device cpu      # a smoke run: both tiers in host memory
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time, sized_for_device
from _results import add_json_option, report_result, save

from recstack.core import PagedTensor
from recstack.core.kernels.paged_swap import swap_paged_rows

GPU = {"gpu_rows": 1 << 20, "host_gb": [1.0, 24.0], "pairs": 10_000, "page_rows": 1 << 16}
CPU = {"gpu_rows": 1 << 14, "host_gb": [0.01], "pairs": 1000, "page_rows": 1 << 12}


def tiered_table(args, device: torch.device, host_gb: float) -> tuple[PagedTensor, int]:
    """A table with ``gpu_rows`` rows in the GPU tier and ``host_gb`` GiB in host pages."""
    host_rows = int(host_gb * 2**30 / (args.dim * 4))
    table = PagedTensor(args.dim, device=device, page_rows=args.page_rows, name="bus")
    table.place_pages(args.gpu_rows // args.page_rows)
    table.append_rows(args.gpu_rows + host_rows)
    return table, host_rows


def plain_swap(dev: torch.Tensor, host: torch.Tensor, gi: torch.Tensor, hi: torch.Tensor):
    """The baseline: the same swap between a GPU tensor and a pinned CPU tensor."""
    up = host.index_select(0, hi).to(dev.device, non_blocking=True)
    down = dev.index_select(0, gi).to("cpu")
    dev.index_copy_(0, gi, up)
    host.index_copy_(0, hi, down)


def measure(args, device: torch.device, host_gb: float, gen, report: Report) -> None:
    """Rows of both kinds (random, consecutive host rows) for one host tier size."""
    table, host_rows = tiered_table(args, device, host_gb)
    pin = device.type == "cuda"
    plain_dev = torch.zeros(args.gpu_rows, args.dim, device=device)
    plain_host = torch.empty(host_rows, args.dim, pin_memory=pin)
    moved = 2 * args.pairs * args.dim * 4
    for kind in ("random", "consecutive"):
        if kind == "random":
            hi = torch.randperm(host_rows, generator=gen)[: args.pairs]
        else:
            hi = torch.arange(args.pairs) + host_rows // 2
        gi = torch.randperm(args.gpu_rows, generator=gen)[: args.pairs]
        a, b = gi.to(device), (hi + args.gpu_rows).to(device)
        # By the wall clock, each call synced: the baseline waits for its copy back.
        ours = median_time(
            lambda a=a, b=b: swap_paged_rows(table, a, b), device, repeat=args.repeat, wall=True
        )
        base = median_time(
            lambda g=a, h=hi: plain_swap(plain_dev, plain_host, g, h),
            device,
            repeat=args.repeat,
            wall=True,
        )
        report.add(
            Row(
                f"{kind} host rows, {host_gb:g} GiB host tier",
                ours,
                base,
                moved,
                baseline="CPU gather, copies both ways, CPU scatter",
                notes=f"{moved / ours / 1e9:.1f} GB/s both ways",
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--gpu-rows", type=int, help="rows in the GPU tier (GPU: 2**20)")
    p.add_argument("--host-gb", type=float, nargs="+", help="host tier sizes (GPU: 1 and 24)")
    p.add_argument("--pairs", type=int, help="rows swapped each way (GPU: 10,000)")
    p.add_argument("--page-rows", type=int, help="rows a page")
    p.add_argument("--repeat", type=int, default=20)
    add_json_option(p)
    args = p.parse_args()
    device = sized_for_device(args, GPU, CPU)
    report = Report(
        f"Tier swap: {args.pairs:,} pairs of {args.dim}-wide fp32 rows, HBM <-> pinned host",
        device_name(device),
        copy_bandwidth(device, None if device.type == "cuda" else 64 * 2**20),
    )
    gen = torch.Generator().manual_seed(0)
    for host_gb in args.host_gb:
        measure(args, device, host_gb, gen, report)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(report.markdown())
    save(report_result(report, "tier_bus", device, args), args.json)


if __name__ == "__main__":
    main()
