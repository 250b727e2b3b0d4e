"""Embedding Engine benchmarks: the GPU hash table and the fused pooled lookup.

Lookup + sum pooling: 26 features, batch 65536, about 20 ids a bag, dim 64 fp32, against
``torch.nn.EmbeddingBag`` of the same shape (issue 5; more workloads land with the module).

HashTable ``find`` and ``find_or_insert`` in keys/s for 1M-key batches in a 64M-slot table
at load factors 0.25, 0.5 and 0.75 (issue 5). The plain-PyTorch baseline, in the same run,
is what a user would write without a hash map: a sorted key array searched with
``torch.searchsorted`` (``find``), and for inserts the same search plus merging the new keys
into the sorted array (``torch.cat`` + ``torch.sort``). MBU counts 32 bytes per key: the key
read, one 16-byte slot probed, the row written. Inserts are timed over 3 calls of fresh keys
(the median), so the load factor moves by at most 3 batches while they run.

    python benchmarks/embedding_engine.py
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time

from recstack.embedding_engine import HashTable

BYTES_PER_KEY = 32


def _keys(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # Random 62-bit ids: never a reserved sentinel, as real hashed ids look.
    return torch.randint(0, 2**62, (n,), generator=gen).to(device)


def pooling(report: Report, device: torch.device, args: argparse.Namespace) -> None:
    """Lookup + sum pooling (26 features, batch 65536, 20 ids a bag, dim 64 fp32) against
    ``nn.EmbeddingBag`` of the same shape, in the same run."""
    from recstack.core import PagedTensor
    from recstack.embedding_engine.kernels.pooling import pooled_lookup

    k, b, ids_per_bag, dim, n_rows = 26, args.pool_batch, 20, 64, 1 << 20
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 2 * ids_per_bag + 1, (k * b,), generator=gen)
    offsets = torch.zeros(k * b + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n = int(offsets[-1])
    rows = torch.randint(0, n_rows, (n,), generator=gen)
    weight = torch.randn(n_rows, dim, generator=gen)
    rows, offsets, weight = rows.to(device), offsets.to(device), weight.to(device)
    table = PagedTensor.wrap(weight)
    modes = torch.zeros(k, dtype=torch.int64, device=device)
    bag = torch.nn.EmbeddingBag(n_rows, dim, mode="sum", device=device)
    with torch.no_grad():
        bag.weight.copy_(weight)
    ours = median_time(
        lambda: pooled_lookup(table, rows, offsets, b, modes, check_bounds=False),
        device,
        repeat=args.repeat,
    )
    with torch.no_grad():
        base = median_time(lambda: bag(rows, offsets[:-1]), device, repeat=args.repeat)
        got = pooled_lookup(table, rows, offsets, b, modes).permute(1, 0, 2).reshape(k * b, dim)
        torch.testing.assert_close(got, bag(rows, offsets[:-1]), rtol=1e-4, atol=1e-4)
    nbytes = n * 8 + (k * b + 1) * 8 + n * dim * 4 + k * b * dim * 4
    report.add(
        Row(
            f"lookup + sum pooling, {k} features, batch {b}",
            ours,
            base,
            nbytes,
            baseline="nn.EmbeddingBag(mode='sum')",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", type=int, default=1 << 26)
    parser.add_argument("--batch", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--pool-batch", type=int, default=65536)
    parser.add_argument("--only", choices=["table", "pooling"], default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    report = Report(
        f"HashTable, {args.batch:,}-key batches, {args.capacity:,} slots",
        device_name(device),
        copy_bandwidth(device),
    )
    if args.only != "table":
        pooling(report, device, args)
    if args.only == "pooling":
        print(report.markdown())
        report.save(args.json)
        return
    table = HashTable(args.capacity, device, max_load=0.8)
    inserted: list[torch.Tensor] = []
    sorted_keys = torch.empty(0, dtype=torch.int64, device=device)
    for load in (0.25, 0.5, 0.75):
        while len(table) < load * args.capacity:
            k = _keys(min(args.batch, int(load * args.capacity) - len(table)), gen, device)
            table.find_or_insert(k)
            inserted.append(k)
        sorted_keys = torch.sort(torch.cat(inserted)).values
        assert table.capacity == args.capacity, "the table grew: raise max_load"
        # find: half present, half absent keys.
        present = torch.cat(inserted)[
            torch.randint(0, len(table), (args.batch // 2,), generator=gen).to(device)
        ]
        probe = torch.cat([present, _keys(args.batch - present.numel(), gen, device)])

        def base_find(p=probe, s=sorted_keys) -> torch.Tensor:
            pos = torch.searchsorted(s, p).clamp(max=s.numel() - 1)
            return torch.where(s[pos] == p, pos, -1)

        ours = median_time(
            lambda p=probe: table.find(p, check_keys=False), device, repeat=args.repeat
        )
        base = median_time(base_find, device, repeat=args.repeat)
        report.add(
            Row(
                f"find, load {load:.2f}",
                ours,
                base,
                BYTES_PER_KEY * args.batch,
                baseline="sorted array + searchsorted",
                extra={"keys/s (ours)": args.batch / ours},
            )
        )
        # find_or_insert of all-new keys: 3 calls, so the load moves by at most 3 batches.
        times = []
        for _ in range(3):
            fresh = _keys(args.batch, gen, device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            table.find_or_insert(fresh)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            inserted.append(fresh)
        ours = sorted(times)[1]

        def base_insert(s=sorted_keys) -> torch.Tensor:
            fresh = _keys(args.batch, gen, device)
            pos = torch.searchsorted(s, fresh).clamp(max=s.numel() - 1)
            new = fresh[s[pos] != fresh]
            return torch.sort(torch.cat([s, new])).values

        base = median_time(base_insert, device, warmup=1, repeat=3)
        report.add(
            Row(
                f"find_or_insert (new keys), load {load:.2f}",
                ours,
                base,
                BYTES_PER_KEY * args.batch,
                baseline="searchsorted + cat + sort",
                extra={"keys/s (ours)": args.batch / ours},
            )
        )
    print()
    print(report.markdown())
    for row in report.rows:
        if "keys/s (ours)" in row.extra:
            print(f"{row.workload}: {row.extra['keys/s (ours)'] / 1e9:.2f} billion keys/s")
    report.save(args.json)


if __name__ == "__main__":
    main()
