"""The Feature Engine against the same graph as a plain PyTorch per-feature loop.

Workload: a 200-feature graph over a batch of 8192 rows: 80 int hash+mod features,
40 float bucketizes, 20 string hashes, 20 truncated behaviour sequences, 20 crosses, 10 padded
sequences and 10 id filters. Each op type is also timed on its own (its features only) for
its MBU: the bytes that must move (inputs read once, outputs written once) over the time,
over the device-to-device copy bandwidth measured in the same run. Both sides are timed by
the wall clock with a device sync after each call (both read sizes back mid-call, so the
host's time is what a training step loses); the median of ``--repeat`` calls.

    python benchmarks/feature_engine.py                  # on a GPU
    python benchmarks/feature_engine.py --device cpu     # the torch reference path
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time
from _results import add_json_option, report_result, save

from recstack.core import JaggedTensor
from recstack.feature_engine import (
    Bucketize,
    Cross,
    Feature,
    FeatureEngine,
    FilterIds,
    Hash,
    Mod,
    Pad,
    Truncate,
    run_per_feature,
    schema_of,
)

INT_COLS, FLOAT_COLS, STR_COLS, SEQ_COLS = 40, 20, 5, 10


def make_batch(rows: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch: dict = {}
    for c in range(INT_COLS):
        batch[f"i{c}"] = torch.randint(0, 2**40, (rows,), generator=g)
    for c in range(FLOAT_COLS):
        batch[f"f{c}"] = torch.randn(rows, generator=g) * 10
    for c in range(STR_COLS):
        lens = torch.randint(4, 24, (rows,), generator=g)
        values = torch.randint(97, 123, (int(lens.sum()),), generator=g, dtype=torch.uint8)
        batch[f"s{c}"] = JaggedTensor.from_lengths(values, lens)
    for c in range(SEQ_COLS):
        lens = torch.randint(0, 60, (rows,), generator=g)
        batch[f"q{c}"] = JaggedTensor.from_lengths(
            torch.randint(0, 2**30, (int(lens.sum()),), generator=g), lens
        )
    return {k: v.to(device) for k, v in batch.items()}


def graph() -> dict[str, list[Feature]]:
    """The 200 features, by op type."""
    hashes = [
        Feature(f"h{k}", f"i{k % INT_COLS}", [Hash(seed=k, buckets=1 << 20), Mod(100_000 + k)])
        for k in range(80)
    ]
    buckets = [
        Feature(f"b{k}", f"f{k % FLOAT_COLS}", [Bucketize([-10.0 - k, -1.0, 0.0, 1.0, 5.0 + k])])
        for k in range(40)
    ]
    strings = [
        Feature(f"s{k}h", f"s{k % STR_COLS}", [Hash(seed=k, buckets=1 << 22)]) for k in range(20)
    ]
    seqs = [
        Feature(f"t{k}", f"q{k % SEQ_COLS}", [Truncate(20 + k), Hash(buckets=1 << 20)])
        for k in range(20)
    ]
    crosses = [
        Feature(f"x{k}", f"h{2 * k}", [Cross([f"h{2 * k + 1}"], buckets=1 << 24)])
        for k in range(20)
    ]
    # For the cross row alone: crosses of raw ids (identity features), so only crossing is timed.
    ids = [Feature(f"id{c}", f"i{c}") for c in range(40)]
    raw_crosses = [
        Feature(f"xr{k}", f"id{2 * k}", [Cross([f"id{2 * k + 1}"], buckets=1 << 24)])
        for k in range(20)
    ]
    pads = [Feature(f"p{k}", f"q{k % SEQ_COLS}", [Pad(32, value=0)]) for k in range(10)]
    filters = [
        Feature(f"r{k}", f"q{k % SEQ_COLS}", [FilterIds(list(range(k, 1000, 7)))])
        for k in range(10)
    ]
    return {
        "full": hashes + buckets + strings + seqs + crosses + pads + filters,
        "hash + mod (int)": hashes,
        "bucketize (float)": buckets,
        "string hash": strings,
        "truncate + hash (sequences)": seqs,
        "cross": ids + raw_crosses,
        "pad": pads,
        "filter ids": filters,
    }


def nbytes(name: str, features: list[Feature], batch: dict, rows: int) -> int:
    """Bytes that must move: each feature's input read once, its output written once."""
    total = 0
    for f in features:
        src = batch.get(f.source)
        if name == "cross" and f.name.startswith("id"):
            continue
        if name == "cross":
            total += rows * (2 * 8 + 8)
        elif isinstance(src, JaggedTensor):
            width = src.values.element_size()
            total += src.values.numel() * width + src.offsets.numel() * 8
            out_items = {
                "string hash": rows,
                "pad": rows * 32,
            }.get(name, src.values.numel())
            total += out_items * 8 + rows * 8
        else:
            total += rows * (src.element_size() + 8)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=20)
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = make_batch(args.rows, device)
    schema = schema_of(batch)
    groups = graph()
    report = Report(
        f"Feature Engine, batch {args.rows}", device_name(device), copy_bandwidth(device)
    )
    everything = groups.pop("full")
    cases = [(f"full graph, {len(everything)} features", everything)] + list(groups.items())
    for name, feats in cases:
        engine = FeatureEngine(feats, schema)
        out = engine(batch)  # warm: compiles the plan, caches tables, checks the result
        want = run_per_feature(feats, batch)
        for key in out["sparse"]:
            assert torch.equal(out["sparse"][key].values, want[key].values), key
        # Wall clock, a sync after each call: both sides read sizes back mid-call.
        ours = median_time(lambda e=engine: e(batch), device, repeat=args.repeat, wall=True)
        loop = median_time(
            lambda f=feats: run_per_feature(f, batch), device, repeat=args.repeat, wall=True
        )
        if name.startswith("full"):
            size = sum(nbytes(n, g, batch, args.rows) for n, g in groups.items())
        else:
            size = nbytes(name, feats, batch, args.rows)
        report.add(Row(name, ours, loop, size, baseline="per-feature PyTorch loop"))
    print()
    print(report.markdown())
    save(report_result(report, "feature_engine", device, args), args.json)


if __name__ == "__main__":
    main()
