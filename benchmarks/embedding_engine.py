"""Embedding Engine benchmarks: the GPU hash table, the fused pooled lookup and its backward,
and a 100M-id table.

Lookup + sum pooling: 26 features, batch 65536, about 20 ids a bag, dim 64 fp32, against
``torch.nn.EmbeddingBag`` of the same shape. Its backward to one coalesced ``SparseGrad``
(what ``EmbeddingCollection`` runs: dedup of the rows, then the segmented reduction) against
``EmbeddingBag(sparse=True)``'s backward, given the forward's dedup (one sort of the ids,
kept for the backward; timed on its own against ``torch.unique``), and a whole forward +
backward. MBU of the backward counts, as the lookup's does, one row read per id (here a
gradient row) plus the index reads and the rows written; the stricter "must move" count
(the output gradient read once) is printed in the notes.

A 100M-id table: ``EmbeddingCollection`` with one dim-64 fp32 table is filled with
100M random 62-bit ids, then looks up batches of 65536 bags of about 20 present ids. It
reports GPU memory per id and the lookup's ids/s in training mode (find_or_insert, stamps,
pooling) and eval mode, against ``nn.EmbeddingBag`` over a 100M-row weight given the rows
directly (no id map). MBU counts the id read and the row read per id.

HashTable ``find`` and ``find_or_insert`` in keys/s for 1M-key batches in a 64M-slot table
at load factors 0.25, 0.5 and 0.75. The plain-PyTorch baseline, in the same run,
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
from _results import Measurement, add_json_option, measurement, report_result, save

from recstack.embedding_engine import HashTable

BYTES_PER_KEY = 32


def _keys(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # Random 62-bit ids, as real hashed ids look (any int64 would do: none is reserved).
    return torch.randint(0, 2**62, (n,), generator=gen).to(device)


def pooling(report: Report, device: torch.device, args: argparse.Namespace) -> None:
    """Lookup + sum pooling (26 features, batch 65536, 20 ids a bag, dim 64 fp32) against
    ``nn.EmbeddingBag`` of the same shape, in the same run."""
    from recstack.core import PagedTensor
    from recstack.embedding_engine.kernels.pooling import pooled_lookup

    b, n_rows = args.pool_batch, 1 << 20
    k, rows, offsets, weight = _pooling_batch(device, b, n_rows)
    n, dim = rows.numel(), weight.shape[1]
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


def _pooling_batch(device: torch.device, b: int, n_rows: int):
    """The pooling workload: rows, key-major offsets and a weight of ``n_rows`` x 64 fp32."""
    k, ids_per_bag, dim = 26, 20, 64
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 2 * ids_per_bag + 1, (k * b,), generator=gen)
    offsets = torch.zeros(k * b + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    rows = torch.randint(0, n_rows, (int(offsets[-1]),), generator=gen)
    weight = torch.randn(n_rows, dim, generator=gen)
    return k, rows.to(device), offsets.to(device), weight.to(device)


def backward(report: Report, device: torch.device, args: argparse.Namespace) -> Measurement | None:
    """Backward of lookup + sum pooling to a coalesced ``SparseGrad`` against
    ``EmbeddingBag(sparse=True)``'s backward, same workload as :func:`pooling`; the forward's
    dedup against ``torch.unique``; a whole forward + backward against EmbeddingBag's.

    Returns our backward alone at ``--pool-batch`` (printed, not in the table: the baseline
    fails there) as a row for the JSON results, or None when it is not timed."""
    from recstack.core import PagedTensor
    from recstack.embedding_engine.autograd import LookupPlan, RowSort, lookup_backward
    from recstack.embedding_engine.dedup import sort_ids
    from recstack.embedding_engine.kernels.pooling import pooled_lookup

    b, n_rows = args.backward_batch, 1 << 20
    k, rows, offsets, weight = _pooling_batch(device, b, n_rows)
    dim = weight.shape[1]
    n = rows.numel()
    table = PagedTensor.wrap(weight)
    modes = torch.zeros(k, dtype=torch.int64, device=device)

    def plan_of(s) -> LookupPlan:
        # As EmbeddingCollection hands it over: the forward's sort, labels in key order
        # (rows_sorted=False also times the sort of the U rows a hash table leaves unsorted).
        return LookupPlan(
            name="t",
            table=table,
            batch_size=b,
            pooled_rows=rows,
            pooled_offsets=offsets,
            modes=modes,
            weights=None,
            sequence_rows=torch.empty(0, dtype=torch.int64, device=device),
            row_sort=RowSort(s.order, s.sorted_seg, s.unique, s.num_unique, rows_sorted=False),
        )

    sorted_ids = sort_ids(rows)
    plan = plan_of(sorted_ids)
    u = sorted_ids.num_unique
    grad = torch.randn(b, k, dim, generator=torch.Generator().manual_seed(2)).to(device)
    bag = torch.nn.EmbeddingBag(n_rows, dim, mode="sum", sparse=True, device=device)
    with torch.no_grad():
        bag.weight.copy_(weight)
    out = bag(rows, offsets[:-1])
    grad_bags = grad.permute(1, 0, 2).reshape(k * b, dim)

    def base() -> torch.Tensor:
        return torch.autograd.grad(out, bag.weight, grad_bags, retain_graph=True)[0]

    ours = median_time(lambda: lookup_backward(plan, grad, None), device, repeat=args.repeat)
    base_s = median_time(base, device, repeat=args.repeat)
    got = lookup_backward(plan, grad, None)
    want = base().coalesce()
    assert torch.equal(got.rows, want.indices()[0])
    torch.testing.assert_close(got.values, want.values(), rtol=1e-4, atol=1e-3)
    # Per-id count, the forward's mirror: sorted position and label, one gradient row per id
    # read; the rows and their gradients written. "must move" reads grad_out once instead.
    per_id = n * (8 + 4 + dim * 4) + u * (dim * 4 + 8)
    must = grad.numel() * 4 + n * 8 + offsets.numel() * 8 + u * (dim * 4 + 8)
    bw = report.bandwidth
    row = report.add(
        Row(
            f"backward to SparseGrad, {k} features, batch {b} ({u:,} unique rows)",
            ours,
            base_s,
            per_id,
            baseline="EmbeddingBag(sparse=True) backward",
            notes=f"MBU by the must-move count: ours {must / ours / bw:.1%}, "
            f"baseline {must / base_s / bw:.1%}",
        )
    )
    print(f"  {row.notes}")

    # The forward's dedup (kept for the backward) against torch.unique of the same ids.
    ours = median_time(lambda: sort_ids(rows), device, repeat=args.repeat)
    base_s = median_time(
        lambda: torch.unique(rows, sorted=True, return_inverse=True, return_counts=True),
        device,
        repeat=args.repeat,
    )
    report.add(
        Row(
            f"dedup of {n:,} ids (sort_ids, kept for the backward)",
            ours,
            base_s,
            n * 8 * 4,  # ids read, inverse + order + labels written (lower bound)
            baseline="torch.unique(return_inverse, return_counts)",
        )
    )

    # One training step's embedding work, end to end: dedup + pooled lookup + backward.
    def step_ours():
        s = sort_ids(rows)
        pooled_lookup(table, rows, offsets, b, modes, check_bounds=False)
        return lookup_backward(plan_of(s), grad, None)

    def step_base():
        o = bag(rows, offsets[:-1])
        return torch.autograd.grad(o, bag.weight, grad_bags)[0]

    ours = median_time(step_ours, device, repeat=args.repeat)
    base_s = median_time(step_base, device, repeat=args.repeat)
    report.add(
        Row(
            f"forward + backward, {k} features, batch {b}",
            ours,
            base_s,
            n * (8 + dim * 4) + k * b * dim * 4 + per_id,
            baseline="EmbeddingBag(sparse=True) forward + backward",
        )
    )
    if args.full_batch_backward:
        # Batch 65536 (34M ids), ours only: the baseline's backward fails there.
        k, rows, offsets, weight = _pooling_batch(device, args.pool_batch, n_rows)
        big = sort_ids(rows)
        grad = torch.randn(args.pool_batch, k, dim, device=device)
        plan = LookupPlan(
            name="t",
            table=PagedTensor.wrap(weight),
            batch_size=args.pool_batch,
            pooled_rows=rows,
            pooled_offsets=offsets,
            modes=modes,
            weights=None,
            sequence_rows=torch.empty(0, dtype=torch.int64, device=device),
            row_sort=RowSort(
                big.order, big.sorted_seg, big.unique, big.num_unique, rows_sorted=False
            ),
        )
        t = median_time(lambda: lookup_backward(plan, grad, None), device, repeat=args.repeat)
        n, u = rows.numel(), big.num_unique
        nbytes = n * (8 + 4 + dim * 4) + u * (dim * 4 + 8)
        print(
            f"backward to SparseGrad, batch {args.pool_batch} ({n:,} ids): {t * 1e3:.3f} ms, "
            f"MBU {nbytes / t / bw:.1%} (per-id count)"
        )
        return measurement(
            f"backward to SparseGrad, {k} features, batch {args.pool_batch} ({n:,} ids)",
            t,
            nbytes=nbytes,
            bandwidth=bw,
            notes="ours only: the baseline's backward fails at this batch",
        )
    return None


def big_table(report: Report, device: torch.device, args: argparse.Namespace) -> None:
    """Fill an ``EmbeddingCollection`` with ``args.big_ids`` ids; memory per id and lookup
    throughput in training and eval mode against ``nn.EmbeddingBag`` over the same rows."""
    from recstack.core import KeyedJaggedTensor
    from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig

    n_ids, dim, b, per_bag = args.big_ids, 64, 65536, 20
    gen = torch.Generator(device=device).manual_seed(3)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    ec = EmbeddingCollection([TableConfig("t", dim=dim)], [FeatureConfig("f", "t")], device=device)
    ids = torch.randint(0, 2**62, (n_ids,), generator=gen, device=device)
    chunk = 1 << 21
    with torch.no_grad():
        for i, start in enumerate(range(0, n_ids, chunk)):
            part = ids[start : start + chunk]
            lengths = torch.full((part.numel(),), 1, dtype=torch.int64, device=device)
            ec(KeyedJaggedTensor(["f"], part, lengths=lengths))
            if i % 10 == 0:
                print(f"  filling: {start + part.numel():,} / {n_ids:,} ids", flush=True)
    torch.cuda.synchronize(device)
    phys = next(iter(ec.physical_tables.values()))
    held = len(phys.hash_table)
    per_id = (torch.cuda.memory_allocated(device) - before - ids.numel() * 8) / held
    parts = {
        "slots": phys.hash_table.capacity * 16 / held,
        "values": phys.values.capacity * dim * 4 / held,
    }
    print(
        f"  {held:,} ids held: {per_id:.0f} bytes/id on the GPU "
        f"(hash slots {parts['slots']:.0f}, values {parts['values']:.0f}, the rest metadata); "
        f"{phys.hash_table.capacity:,} slots, load {phys.hash_table.load_factor:.2f}",
        flush=True,
    )
    pick = torch.randint(0, n_ids, (b * per_bag,), generator=gen, device=device)
    batch_ids = ids[pick]
    lengths = torch.full((b,), per_bag, dtype=torch.int64, device=device)
    kjt = KeyedJaggedTensor(["f"], batch_ids, lengths=lengths)
    rows = phys.hash_table.find(batch_ids)
    del ids
    weight = torch.empty(phys.values.num_rows, dim, device=device)
    with torch.no_grad():
        weight.copy_(phys.values.to_dense())
    bag = torch.nn.EmbeddingBag.from_pretrained(weight, mode="sum", freeze=True)
    offsets = torch.arange(0, b * per_bag, per_bag, device=device)
    n = batch_ids.numel()
    nbytes = n * (8 + dim * 4) + b * dim * 4
    with torch.no_grad():
        base = median_time(lambda: bag(rows, offsets), device, repeat=args.repeat)
        for mode in ("train", "eval"):
            ec.train(mode == "train")
            ours = median_time(lambda: ec(kjt), device, repeat=args.repeat, wall=True)
            torch.testing.assert_close(ec(kjt)["f"], bag(rows, offsets), rtol=1e-4, atol=1e-4)
            report.add(
                Row(
                    f"{held / 1e6:.0f}M-id table, lookup + sum pooling ({mode}), "
                    f"{n:,} ids, {per_id:.0f} B/id",
                    ours,
                    base,
                    nbytes,
                    baseline="EmbeddingBag on the rows (no id map)",
                    extra={"ids/s (ours)": n / ours, "bytes/id": per_id},
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", type=int, default=1 << 26)
    parser.add_argument("--batch", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--pool-batch", type=int, default=65536)
    # EmbeddingBag(sparse=True)'s backward fails (illegal memory access, torch 2.11) once its
    # per-id gradient passes 2**31 elements: batch 65536 has 34M ids x 64.
    parser.add_argument("--backward-batch", type=int, default=32768)
    parser.add_argument(
        "--full-batch-backward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time our backward alone at --pool-batch",
    )
    parser.add_argument("--big-ids", type=int, default=100_000_000)
    parser.add_argument(
        "--only", choices=["table", "pooling", "backward", "big"], nargs="*", default=None
    )
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    report = Report(
        f"HashTable, {args.batch:,}-key batches, {args.capacity:,} slots",
        device_name(device),
        copy_bandwidth(device),
    )
    only = set(args.only or ["pooling", "backward", "table", "big"])
    if "pooling" in only:
        pooling(report, device, args)
    full_batch_backward = backward(report, device, args) if "backward" in only else None
    if "table" in only:
        hash_table(report, device, args, gen)
    if "big" in only:
        big_table(report, device, args)
    print()
    print(report.markdown())
    for row in report.rows:
        if "keys/s (ours)" in row.extra:
            print(f"{row.workload}: {row.extra['keys/s (ours)'] / 1e9:.2f} billion keys/s")
        if "ids/s (ours)" in row.extra:
            print(f"{row.workload}: {row.extra['ids/s (ours)'] / 1e9:.2f} billion ids/s")
    result = report_result(report, "embedding_engine", device, args)
    if full_batch_backward is not None:
        result.rows.append(full_batch_backward)
    save(result, args.json)


def hash_table(
    report: Report, device: torch.device, args: argparse.Namespace, gen: torch.Generator
) -> None:
    """find and find_or_insert at load 0.25, 0.5 and 0.75 of a 64M-slot table."""
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


if __name__ == "__main__":
    main()
