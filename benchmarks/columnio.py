"""ColumnIO read throughput on the CPU: Parquet -> batches of tensors, rows per second.

Workload: 2M synthetic CTR rows (13 float32 ``dense_*``, 26 int64 ``sparse_*``,
1 string ``user_id``, 1 ``list<int64>`` ``history`` with mean length 50, plus ``label`` and
``label_prob``), snappy Parquet in 64k-row row groups, written by
``recstack.columnio.synthetic.write_synthetic_ctr`` as ``--files`` part files. Each method
reads the same 27 columns, ``dense_0..dense_12``, ``sparse_0..sparse_12`` and ``history``,
in batches of 4096, from the first file opened to the last batch (one epoch, in file order):

(a) the usual PyTorch way: a map-style ``Dataset`` whose workers each load the columns
    into NumPy and return one row (a dict of tensors) per ``__getitem__``, with a
    ``collate_fn`` that stacks the dense/sparse rows and concatenates the histories into
    values + offsets; ``DataLoader(batch_size=4096, num_workers=2)``.
(b) the limit: one ``pyarrow.dataset`` scan of the same columns into Arrow record batches
    (pyarrow's own threads, default options), no tensors. (b') is the same scan with a
    short readahead (2 batches, 1 file in flight), often faster and steadier on 2 cores.
(c) a well-written ``IterableDataset``: workers take alternate row groups, read each whole
    with ``ParquetFile.read_row_group`` and convert it to tensors vectorized (dense and
    sparse stacked ``[rows, 13]``, history as values + offsets), then slice 4096-row batches;
    ``DataLoader(batch_size=None, num_workers=2)``.
(d) ``recstack.columnio.ColumnReader(paths, columns, batch_size=4096, num_threads=2)``
    (skipped with "not available" until it exists).

Each method runs ``--repeat`` times, in interleaved rounds (the median is reported), after
one untimed scan that pulls the files into the page cache; every run is checked to yield
every row and every history item. Ratios are against (b), the limit. Reference figures
for 2 cores on other data: (a) ~105k rows/s, (c) ~640k, (b) ~1.38M; the target is
(d) >= 80% of (b).

    python benchmarks/columnio.py                         # 2M rows, all methods
    python benchmarks/columnio.py --rows 300000 --repeat 1 --methods b,c
    python benchmarks/columnio.py --data-dir /data/ctr --json out.json

With ``--json``, the rows of the shared results file are ColumnIO (d) against each other
method measured (without (d), each method's rate alone); every method's runs are in its
``extra``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from _harness import device_name
from _results import Measurement, add_json_option, new_result, save
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from recstack.columnio.synthetic import METADATA_KEY, SyntheticCTRConfig, write_synthetic_ctr

DENSE = [f"dense_{i}" for i in range(13)]
SPARSE = [f"sparse_{i}" for i in range(13)]
SEQ = "history"
COLUMNS = DENSE + SPARSE + [SEQ]  # 27 columns incl. the list

# Arrow buffers are read-only; every method here only reads its tensors.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

METHODS = {
    "a": "(a) map-style Dataset + DataLoader(4096, num_workers=2)",
    "b": "(b) pyarrow.dataset scan into Arrow (the limit)",
    "b2": "(b') the same scan, readahead 2 batches x 1 file",
    "c": "(c) row-group IterableDataset + DataLoader(None, num_workers=2)",
    "d": "(d) recstack ColumnReader(num_threads=2)",
}


# ---------------------------------------------------------------------------- data


def make_data(data_dir: Path, rows: int, files: int, row_group_size: int) -> list[str]:
    """The part files of ``rows`` synthetic rows under ``data_dir``; reused when they match."""
    config = SyntheticCTRConfig(num_rows=rows)
    root = data_dir / f"ctr-{rows}-rows-{files}-files-rg{row_group_size}"
    rows_per_file = max(1, math.ceil(rows / files))
    expected = len(range(0, rows, rows_per_file)) or 1
    paths = [str(root / f"part-{i:05d}.parquet") for i in range(expected)]
    if all(_matches(p, config, row_group_size) for p in paths):
        print(f"reusing {root}", flush=True)
        return paths
    t0 = time.perf_counter()
    info = write_synthetic_ctr(
        root, config, rows_per_file=rows_per_file, row_group_size=row_group_size, overwrite=True
    )
    size = sum(os.path.getsize(p) for p in info.paths)
    print(
        f"wrote {rows:,} rows in {len(info.paths)} files ({size / 2**20:,.0f} MiB) to {root} "
        f"in {time.perf_counter() - t0:.1f} s; best AUC {info.best_auc:.4f}",
        flush=True,
    )
    return list(info.paths)


def _matches(path: str, config: SyntheticCTRConfig, row_group_size: int) -> bool:
    try:
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[METADATA_KEY])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return False
    return (
        meta.get("config") == config.to_dict()
        and pf.metadata.num_row_groups > 0
        and pf.metadata.row_group(0).num_rows == min(row_group_size, pf.metadata.num_rows)
    )


# ---------------------------------------------------------------------------- (a) map-style


class ParquetRowDataset(Dataset):
    """One row per ``__getitem__``; each worker loads the columns on first use."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.num_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        self.loaded = False

    def _load(self) -> None:
        table = pq.read_table(self.paths, columns=COLUMNS)
        self.dense = np.stack([table.column(c).to_numpy() for c in DENSE], axis=1)
        self.sparse = np.stack([table.column(c).to_numpy() for c in SPARSE], axis=1)
        history = table.column(SEQ).combine_chunks()
        self.offsets = history.offsets.to_numpy()
        self.items = history.values.to_numpy()
        self.loaded = True

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.loaded:
            self._load()
        return {
            "dense": torch.from_numpy(self.dense[i]),
            "sparse": torch.from_numpy(self.sparse[i]),
            SEQ: torch.from_numpy(self.items[self.offsets[i] : self.offsets[i + 1]]),
        }


def collate_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seqs = [r[SEQ] for r in rows]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return {
        "dense": torch.stack([r["dense"] for r in rows]),
        "sparse": torch.stack([r["sparse"] for r in rows]),
        "history_values": torch.cat(seqs),
        "history_offsets": offsets,
    }


def run_map_style(paths: list[str], batch_size: int, workers: int) -> Iterator[Any]:
    dataset = ParquetRowDataset(paths)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_rows
    )
    yield from loader


# ---------------------------------------------------------------------------- (b) the limit


def run_arrow_scan(paths: list[str], batch_size: int, workers: int) -> Iterator[Any]:
    del batch_size, workers  # the scan picks its own batches (row groups) and threads
    yield from pads.dataset(paths, format="parquet").to_batches(columns=COLUMNS)


def run_arrow_scan_short_readahead(paths: list[str], batch_size: int, workers: int) -> Iterator:
    # The default readahead (16 batches x 4 files in flight) is tuned for many cores; on
    # two it churns memory and varies from run to run, so (b') shows the same scan with less.
    del batch_size, workers
    dataset = pads.dataset(paths, format="parquet")
    yield from dataset.to_batches(columns=COLUMNS, batch_readahead=2, fragment_readahead=1)


# ---------------------------------------------------------------------------- (c) iterable


class RowGroupIterable(IterableDataset):
    """Whole row groups read with pyarrow, converted to tensors in one go, then sliced."""

    def __init__(self, paths: list[str], batch_size: int) -> None:
        self.batch_size = batch_size
        self.units = [
            (path, rg) for path in paths for rg in range(pq.ParquetFile(path).num_row_groups)
        ]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        files: dict[str, pq.ParquetFile] = {}
        for k, (path, rg) in enumerate(self.units):
            if k % workers != worker:
                continue
            if path not in files:
                files[path] = pq.ParquetFile(path)
            table = files[path].read_row_group(rg, columns=COLUMNS)
            dense = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in DENSE], 1))
            sparse = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in SPARSE], 1))
            history = table.column(SEQ).combine_chunks()
            offsets = torch.from_numpy(history.offsets.to_numpy().astype(np.int64))
            values = torch.from_numpy(history.values.to_numpy())
            for s in range(0, table.num_rows, self.batch_size):
                e = min(s + self.batch_size, table.num_rows)
                lo, hi = int(offsets[s]), int(offsets[e])
                yield {
                    "dense": dense[s:e],
                    "sparse": sparse[s:e],
                    "history_values": values[lo:hi],
                    "history_offsets": offsets[s : e + 1] - lo,
                }


def run_iterable(paths: list[str], batch_size: int, workers: int) -> Iterator[Any]:
    loader = DataLoader(RowGroupIterable(paths, batch_size), batch_size=None, num_workers=workers)
    yield from loader


# ---------------------------------------------------------------------------- (d) ColumnReader


def load_column_reader() -> tuple[Any, str]:
    try:
        from recstack.columnio import ColumnReader
    except ImportError as exc:
        return None, f"not available ({exc})"
    return ColumnReader, ""


def run_column_reader(paths: list[str], batch_size: int, workers: int) -> Iterator[Any]:
    column_reader, _ = load_column_reader()
    reader = column_reader(paths, columns=COLUMNS, batch_size=batch_size, num_threads=workers)
    yield from reader


# ---------------------------------------------------------------------------- counting


def count(batch: Any) -> tuple[int, int]:
    """Rows and history items of one batch, whatever its layout."""
    if isinstance(batch, pa.RecordBatch):
        offsets = batch.column(SEQ).offsets
        return batch.num_rows, offsets[len(offsets) - 1].as_py() - offsets[0].as_py()
    if "history_offsets" in batch:
        return len(batch["dense"]), int(batch["history_values"].numel())
    seq = batch[SEQ]  # ColumnReader: a JaggedTensor
    return len(seq), int(seq.offsets[-1] - seq.offsets[0])


def timed_epoch(run: Callable[..., Iterator[Any]], paths, batch_size, workers) -> dict:
    rows = items = batches = 0
    t0 = time.perf_counter()
    for batch in run(paths, batch_size, workers):
        r, n = count(batch)
        rows += r
        items += n
        batches += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "items": items, "batches": batches}


# ---------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def markdown(results: dict[str, dict], header: str) -> str:
    rate = {k: r["rows_per_s"] for k, r in results.items() if r.get("rows_per_s")}
    lines = [
        header,
        "",
        "| method | rows/s | median s | vs (b) limit | vs (c) iterable | vs (a) map-style |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        if not r.get("rows_per_s"):
            lines.append(f"| {METHODS[key]} | {r.get('note', 'n/a')} | | | | |")
            continue

        def vs(base: str, key: str = key) -> str:
            return f"{rate[key] / rate[base]:.2f}x" if base in rate else "n/a"

        lines.append(
            f"| {METHODS[key]} | {r['rows_per_s'] / 1e3:,.0f}k | {r['seconds']:.2f} "
            f"| {vs('b')} | {vs('c')} | {vs('a')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=4, help="part files to split rows into")
    parser.add_argument("--row-group-size", type=int, default=65_536)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / threads")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default="a,b,b2,c,d", help="comma list of a, b, b2, c, d")
    parser.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "recstack-bench-columnio"),
        help="where the generated Parquet files are kept (regenerated if missing)",
    )
    add_json_option(parser)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; pick from {sorted(METHODS)}")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs ({cores} usable)"
    print(f"{device_name(torch.device('cpu'))}; {machine}", flush=True)
    paths = make_data(Path(args.data_dir), args.rows, args.files, args.row_group_size)
    timed_epoch(run_arrow_scan, paths, args.batch_size, args.workers)  # page cache warm-up

    runners = {
        "a": run_map_style,
        "b": run_arrow_scan,
        "b2": run_arrow_scan_short_readahead,
        "c": run_iterable,
        "d": run_column_reader,
    }
    results: dict[str, dict] = {}
    if "d" in methods:
        available, note = load_column_reader()
        if available is None:
            print(f"{METHODS['d']}: {note}", flush=True)
            results["d"] = {"note": "not available"}
    timed = [k for k in methods if k not in results]
    runs: dict[str, list[dict]] = {k: [] for k in timed}
    expected: tuple[int, int] | None = None
    # Rounds interleave the methods, so a burst of background load hits them alike.
    for _ in range(args.repeat):
        for key in timed:
            run = timed_epoch(runners[key], paths, args.batch_size, args.workers)
            got = (run["rows"], run["items"])
            if expected is None:
                expected = got
            if got != expected or run["rows"] != args.rows:
                sys.exit(f"{METHODS[key]} read {got} (rows, items), expected {expected}")
            runs[key].append(run)
            print(
                f"  {METHODS[key]}: {run['rows'] / run['seconds'] / 1e3:,.0f}k rows/s "
                f"({run['seconds']:.2f} s, {run['batches']} batches)",
                flush=True,
            )
    for key in timed:
        seconds = statistics.median(r["seconds"] for r in runs[key])
        results[key] = {
            "rows_per_s": args.rows / seconds,
            "seconds": seconds,
            "runs_s": [r["seconds"] for r in runs[key]],
            "batches": runs[key][0]["batches"],
        }
    results = {k: results[k] for k in methods}

    header = (
        f"**ColumnIO read throughput**, {args.rows:,} rows x 27 columns (13 dense, 13 sparse, "
        f"history list), {len(paths)} snappy Parquet files, {args.row_group_size}-row row "
        f"groups, batch {args.batch_size}, {args.workers} workers/threads; {machine}; "
        f"torch {torch.__version__}, pyarrow {pa.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"median of {args.repeat}; `python {' '.join(sys.argv)}`"
    )
    print()
    print(markdown(results, header))
    if args.json:
        result = new_result(
            "columnio",
            "ColumnIO read throughput",
            "cpu",
            args,
            rows=result_rows(results),
            pyarrow=pa.__version__,
        )
        result.host = machine
        result.extra = {
            "columns": COLUMNS,
            "files": paths,
            "methods": {k: {"name": METHODS[k], **v} for k, v in results.items()},
        }
        save(result, args.json)


def result_rows(results: dict[str, dict]) -> list[Measurement]:
    """ColumnIO (d) against each other measured method; without (d), each method alone."""
    rate = {k: r["rows_per_s"] for k, r in results.items() if r.get("rows_per_s")}
    if "d" not in rate:
        return [Measurement(METHODS[k], v, "rows/s") for k, v in rate.items()]
    return [
        Measurement(
            f"{METHODS['d']} vs {METHODS[k].split()[0]}",  # "... vs (b)"
            rate["d"],
            "rows/s",
            baseline=METHODS[k],
            baseline_value=v,
            ratio=rate["d"] / v,
        )
        for k, v in rate.items()
        if k != "d"
    ]


if __name__ == "__main__":
    main()
