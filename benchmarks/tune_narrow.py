"""Warps of the segment-sum kernels on narrow tables (dim 1-16).

Narrow rows give a tile of many rows (``tile_elems / dim``); one warp per few hundred rows
spills registers (the compile check saw up to 424 bytes a thread), so core's
``segment_sum_warps`` and the embedding engine's ``lookup_grad_warps`` raise the warp count
with the tile's rows. This sweep times both kernels at each warp count so that rule rests on
measurements: core's ``SparseGrad.coalesce`` on Zipf rows, and the embedding backward's
per-row sums (``lookup_grad_sums``) of sequence ids.

    python benchmarks/tune_narrow.py [--dims 1 2 4 8 16] [--ids 4194304]
"""

from __future__ import annotations

import argparse

import torch
from _harness import copy_bandwidth, device_name, median_time
from _results import Measurement, add_json_option, measurement, new_result, save

from recstack.core import SparseGrad
from recstack.core.kernels import segment_sum
from recstack.embedding_engine.kernels import lookup_grad

WARPS = (1, 2, 4, 8, 16)


def _zipf(n: int, high: int, device: torch.device) -> torch.Tensor:
    u = torch.rand(n, device=device)
    return (u.pow(-1 / 1.05).to(torch.int64) - 1).clamp_(0, high - 1)


def _row(
    op: str, dim: int, warps: int, default: int, seconds: float, nbytes: int, bandwidth: float
) -> Measurement:
    """Print one line of the sweep and return it as a result row."""
    mark = "*" if warps == default else ""
    mbu = nbytes / seconds / bandwidth
    print(f"{op} | {dim} | {warps} | {mark} | {seconds * 1e3:.3f} | {mbu:.0%}")
    name = f"{op}, dim {dim}, {warps} warp{'s' if warps > 1 else ''}"
    notes = "the default" if mark else ""
    return measurement(name, seconds, nbytes=nbytes, bandwidth=bandwidth, notes=notes)


def _coalesce(rows: torch.Tensor, values: torch.Tensor, bandwidth: float) -> list[Measurement]:
    n, dim = values.shape
    unique = int(torch.unique(rows).numel())
    moved = n * (8 + dim * 4) + unique * (8 + dim * 4)
    block_d = 1 << (dim - 1).bit_length()
    default = segment_sum.segment_sum_warps(
        segment_sum.SEGMENT_SUM_DEFAULTS["tile_elems"] // block_d
    )
    want = SparseGrad(rows, values).coalesce()
    out = []
    for warps in WARPS:
        grad = SparseGrad(rows, values)
        # Sums in another order: fp32 rounding, not equality.
        got = grad.coalesce(num_warps=warps)
        torch.testing.assert_close(got.values, want.values, rtol=1e-4, atol=1e-3)
        t = median_time(lambda g=grad, w=warps: g.coalesce(num_warps=w), values.device)
        out.append(_row("coalesce", dim, warps, default, t, moved, bandwidth))
    return out


def _grad_sums(rows: torch.Tensor, dim: int, bandwidth: float) -> list[Measurement]:
    """The embedding backward's per-row sums, sequence ids only (each id's gradient row
    is its own), summed per distinct row."""
    n, device = rows.numel(), rows.device
    order = torch.argsort(rows)
    labels = torch.unique_consecutive(rows[order], return_inverse=True)[1]
    segs = int(labels.max()) + 1 if n else 0
    grad_seq = torch.randn(n, dim, device=device)
    moved = n * (8 + 8 + dim * 4) + segs * dim * 4
    block_d = 1 << (dim - 1).bit_length()
    default = lookup_grad.lookup_grad_warps(
        max(2, lookup_grad.GRAD_DEFAULTS["tile_elems"] // block_d)
    )

    def sums(warps: int | None) -> torch.Tensor:
        return lookup_grad.lookup_grad_sums(
            order, labels, segs, None, dim, grad_sequence=grad_seq, num_warps=warps
        )

    want = sums(None)
    out = []
    for warps in WARPS:
        torch.testing.assert_close(sums(warps), want, rtol=1e-4, atol=1e-3)
        t = median_time(lambda w=warps: sums(w), device)
        out.append(_row("grad sums", dim, warps, default, t, moved, bandwidth))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--ids", type=int, default=4_194_304)
    parser.add_argument("--rows", type=int, default=10_000_000, help="table rows the ids hit")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"{device_name(device)}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    print("op | dim | num_warps | default | ms | MBU")
    results = []
    for dim in args.dims:
        rows = _zipf(args.ids, args.rows, device)
        results += _coalesce(rows, torch.randn(args.ids, dim, device=device), bandwidth)
        results += _grad_sums(rows, dim, bandwidth)
    title = "Warps of the segment-sum kernels on narrow tables"
    result = new_result("tune_narrow", title, device, args, copy_bandwidth=bandwidth, rows=results)
    save(result, args.json)


if __name__ == "__main__":
    main()
