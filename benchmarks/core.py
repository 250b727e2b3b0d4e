"""recstack.core kernels against plain PyTorch: paged gather/scatter, coalesce, hash64.

Workload: a 20M-row, dim-64 fp32 table and 1.3M random rows; ``gather_rows``
against ``index_select`` on a plain tensor, ``scatter_rows`` against ``index_put_`` (set) and
``index_add_`` (add), ``SparseGrad.coalesce`` against ``unique`` + ``index_add_``, and
``hash64`` against the same XXH64 written in plain torch ops (our reference, run on the GPU),
and ``owner_partition`` (ids grouped by owner rank for an all-to-all) against ``owner`` +
a stable ``argsort`` + ``bincount``.

    python benchmarks/core.py                  # on a GPU
    python benchmarks/core.py --device cpu --table-rows 2000000 --batch 130000
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time
from _results import add_json_option, report_result, save

from recstack.core import (
    JaggedTensor,
    PagedTensor,
    SparseGrad,
    hash64,
    kernels,
    owner,
    owner_partition,
)


def _random_table(rows: int, dim: int, device: torch.device, page_rows: int) -> PagedTensor:
    table = PagedTensor(dim, torch.float32, device=device, page_rows=page_rows, name="bench")
    table.append_rows(rows)
    for page in table.pages:
        page.uniform_(-1.0, 1.0)
    return table


def _count(x: int) -> str:
    return f"{x / 1e6:.2f}M" if x >= 10**6 else f"{x / 1e3:.1f}k"


def _zipf_rows(n: int, universe: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    # Recommendation ids are heavy-tailed: a few ids repeat thousands of times per batch.
    ranks = torch.rand(n, generator=gen, device=device).pow(-1.0 / 1.05)
    return (ranks.to(torch.int64) - 1).clamp_(0, universe - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table-rows", type=int, default=20_000_000)
    parser.add_argument("--batch", type=int, default=1_300_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--page-rows", type=int, default=65536)
    parser.add_argument("--strings", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    add_json_option(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    bandwidth = copy_bandwidth(device)
    report = Report("recstack.core kernels", device_name(device), bandwidth)
    print(f"{report.device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)

    def timed(fn):
        return median_time(fn, device, repeat=args.repeat)

    n, dim, rows_total = args.batch, args.dim, args.table_rows
    table = _random_table(rows_total, dim, device, args.page_rows)
    dense = torch.cat(table.pages)[:rows_total]  # same content as a plain tensor
    rows = torch.randint(0, rows_total, (n,), device=device, generator=gen)
    values = torch.randn(n, dim, device=device, generator=gen)
    row_bytes = dim * 4

    # gather: read n rows + indices, write n rows.
    out = torch.empty(n, dim, device=device)
    assert torch.equal(table.gather_rows(rows), torch.index_select(dense, 0, rows))
    gather_bytes = 2 * n * row_bytes + n * 8
    report.add(
        Row(
            f"gather_rows {rows_total / 1e6:.0f}M x {dim} fp32, {n / 1e6:.1f}M rows",
            timed(lambda: table.gather_rows(rows, check_bounds=False, out=out)),
            timed(lambda: torch.index_select(dense, 0, rows, out=out)),
            gather_bytes,
            baseline="index_select",
            notes="unchecked (trusted rows)",
        )
    )
    report.add(
        Row(
            "gather_rows, bounds-checked (default)",
            timed(lambda: table.gather_rows(rows)),
            timed(lambda: torch.index_select(dense, 0, rows)),
            gather_bytes,
            baseline="index_select",
        )
    )

    # scatter set: read n rows of values + indices, write n rows.
    report.add(
        Row(
            "scatter_rows set",
            timed(lambda: table.scatter_rows(rows, values, reduce="set", check_bounds=False)),
            timed(lambda: dense.index_put_((rows,), values)),
            gather_bytes,
            baseline="index_put_",
        )
    )
    # scatter add: read values + indices, read-modify-write n table rows.
    report.add(
        Row(
            "scatter_rows add",
            timed(lambda: table.scatter_rows(rows, values, reduce="add", check_bounds=False)),
            timed(lambda: dense.index_add_(0, rows, values)),
            3 * n * row_bytes + n * 8,
            baseline="index_add_",
        )
    )

    # coalesce: read rows + values, write unique rows + sums. Two extremes: Zipf rows (heavy
    # duplicates, as recommendation ids are) and uniform rows (almost all unique, sort-bound).
    coalesce_cases = {
        "Zipf": _zipf_rows(n, rows_total, device, gen),
        "uniform": torch.randint(0, rows_total, (n,), device=device, generator=gen),
    }
    for kind, grad_rows in coalesce_cases.items():
        coalesced = SparseGrad(grad_rows, values).coalesce()
        ours_rows, ours_sums = coalesced.rows, coalesced.values
        uniq = ours_rows.numel()

        def unique_index_add(grad_rows=grad_rows):
            u, inverse = torch.unique(grad_rows, return_inverse=True)
            return u, torch.zeros(u.numel(), dim, device=device).index_add_(0, inverse, values)

        base_rows, base_sums = unique_index_add()
        assert torch.equal(ours_rows, base_rows)
        # Both sum in fp32 in different orders (a hot id repeats ~650k times): check each
        # against an fp64 sum rather than against each other.
        inverse = torch.searchsorted(base_rows, grad_rows)
        exact = torch.zeros(uniq, dim, dtype=torch.float64, device=device)
        exact.index_add_(0, inverse, values.double())
        errors = [float((s.double() - exact).norm() / exact.norm()) for s in (ours_sums, base_sums)]
        print(
            f"  coalesce {kind}: relative error vs fp64 ours {errors[0]:.1e}, "
            f"baseline {errors[1]:.1e}"
        )
        assert errors[0] < 1e-5, errors
        report.add(
            Row(
                f"SparseGrad.coalesce {kind} ({_count(uniq)} unique of {_count(n)})",
                timed(lambda grad_rows=grad_rows: SparseGrad(grad_rows, values).coalesce()),
                timed(unique_index_add),
                n * (row_bytes + 8) + uniq * (row_bytes + 8),
                baseline="unique + index_add_",
            )
        )

    # hash64 of int64 ids: read 8 bytes, write 8 bytes each.
    ids = torch.randint(-(2**63), 2**63 - 1, (16 * n,), device=device, generator=gen)
    ours = hash64(ids, seed=7)
    with kernels.use_backend("torch"):
        assert torch.equal(ours, hash64(ids, seed=7))
        baseline_s = timed(lambda: hash64(ids, seed=7))
    report.add(
        Row(
            f"hash64 int64 ({ids.numel() / 1e6:.1f}M ids)",
            timed(lambda: hash64(ids, seed=7)),
            baseline_s,
            16 * ids.numel(),
            baseline="same XXH64 in torch ops",
        )
    )

    # owner partition (the sharded lookup's id routing): read 8 bytes a key, write owner and
    # slot (8 + 8) and read the owner back once; baseline: owner + stable argsort + bincount.
    keys = ids[:n]
    for world in (8, 64):
        got = owner_partition(keys, world)
        owners = owner(keys, world)
        order = torch.argsort(owners, stable=True)
        assert torch.equal(got[1], order) and torch.equal(got[0], owners)

        def baseline(world=world) -> None:
            owners = owner(keys, world)
            torch.argsort(owners, stable=True)
            torch.bincount(owners, minlength=world)

        report.add(
            Row(
                f"owner_partition, {n / 1e6:.1f}M ids, {world} ranks",
                timed(lambda world=world: owner_partition(keys, world)),
                timed(baseline),
                32 * n,
                baseline="owner + argsort(stable) + bincount",
            )
        )

    # hash64 of strings: lengths 1..48 bytes (ids, tags, short titles).
    lengths = torch.randint(1, 49, (args.strings,), device=device, generator=gen)
    nbytes = int(lengths.sum())
    data = torch.randint(0, 256, (nbytes,), device=device, generator=gen, dtype=torch.int64)
    strings = JaggedTensor.from_lengths(data.to(torch.uint8), lengths)
    ours = hash64(strings)
    with kernels.use_backend("torch"):
        assert torch.equal(ours, hash64(strings))
        baseline_s = timed(lambda: hash64(strings))
    string_bytes = nbytes + 8 * (args.strings + 1) + 8 * args.strings
    label = f"hash64 strings ({args.strings / 1e6:.1f}M, mean {nbytes / args.strings:.1f} B)"
    report.add(
        Row(
            label + ", trusted offsets",
            timed(lambda: hash64(strings, check_offsets=False)),
            baseline_s,
            string_bytes,
            baseline="same XXH64 in torch ops",
        )
    )
    report.add(
        Row(
            label + ", offsets checked (default)",
            timed(lambda: hash64(strings)),
            baseline_s,
            string_bytes,
            baseline="same XXH64 in torch ops",
        )
    )

    print()
    print(report.markdown())
    save(report_result(report, "core", device, args), args.json)


if __name__ == "__main__":
    main()
