"""Sweep the tile parameters of the paged gather/scatter and segment-sum kernels.

Prints the median time and MBU of each (tile_elems, num_warps) pair on the core.py workload,
so the defaults in ``recstack.core.kernels`` can be chosen from measurements.

    python benchmarks/tune_core.py
"""

from __future__ import annotations

import argparse

import torch
from _harness import copy_bandwidth, device_name, median_time
from _results import add_json_option, measurement, new_result, save

from recstack.core import PagedTensor, SparseGrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table-rows", type=int, default=20_000_000)
    parser.add_argument("--batch", type=int, default=1_300_000)
    parser.add_argument("--dim", type=int, default=64)
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{device_name(device)}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    n, dim = args.batch, args.dim
    table = PagedTensor(dim, device=device, name="tune")
    table.append_rows(args.table_rows)
    for page in table.pages:
        page.uniform_()
    rows = torch.randint(0, args.table_rows, (n,), device=device)
    values = torch.randn(n, dim, device=device)
    out = torch.empty(n, dim, device=device)
    moved = 2 * n * dim * 4 + 8 * n
    add_moved = 3 * n * dim * 4 + 8 * n
    rows = []

    def record(op: str, tile: int, warps: int, seconds: float, nbytes: int = 0) -> None:
        rows.append(
            measurement(f"{op}, tile {tile}, {warps} warps", seconds, nbytes=nbytes,
                        bandwidth=bandwidth)
        )  # fmt: skip

    print("op | tile_elems | num_warps | ms | MBU")
    for tile in (1024, 2048, 4096, 8192, 16384):
        for warps in (2, 4, 8, 16):
            kw = {"tile_elems": tile, "num_warps": warps, "check_bounds": False}
            t = median_time(lambda kw=kw: table.gather_rows(rows, out=out, **kw), device)
            print(f"gather | {tile} | {warps} | {t * 1e3:.3f} | {moved / t / bandwidth:.0%}")
            record("gather", tile, warps, t, moved)
            t = median_time(lambda kw=kw: table.scatter_rows(rows, values, **kw), device)
            print(f"scatter set | {tile} | {warps} | {t * 1e3:.3f} | {moved / t / bandwidth:.0%}")
            record("scatter set", tile, warps, t, moved)
            t = median_time(
                lambda kw=kw: table.scatter_rows(rows, values, reduce="add", **kw), device
            )
            print(
                f"scatter add | {tile} | {warps} | {t * 1e3:.3f} | {add_moved / t / bandwidth:.0%}"
            )
            record("scatter add", tile, warps, t, add_moved)
    zipf = (torch.rand(n, device=device).pow(-1 / 1.05).to(torch.int64) - 1).clamp_(0, 10**7)
    for tile in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            grad = SparseGrad(zipf, values)
            t = median_time(
                lambda g=grad, a=tile, w=warps: g.coalesce(tile_elems=a, num_warps=w), device
            )
            print(f"coalesce | {tile} | {warps} | {t * 1e3:.3f} | -")
            record("coalesce", tile, warps, t)
    title = "Tile sweep of the paged gather/scatter and segment-sum kernels"
    result = new_result("tune_core", title, device, args, copy_bandwidth=bandwidth, rows=rows)
    save(result, args.json)


if __name__ == "__main__":
    main()
