"""ColumnIO device feeding: how long a training step waits for its next batch.

A ``ColumnReader`` over synthetic CTR data feeds a simulated training step: a CUDA sleep
calibrated to ``--step-ms`` on the compute stream plus a small read of every batch tensor.
Ours wraps the reader in ``to_device`` (pinned batches, copies on a side stream, ``prefetch``
batches ahead); the baseline, measured in the same run on the same file, is the loop a user
would write instead: a plain synchronous ``.to(device)`` of each batch, no prefetching.

Each step ends with a sync, like a loop that reads its loss every step, so fetching the next
batch cannot hide behind queued GPU work. A step's wait is timed on the GPU clock from an
event recorded before ``next()`` to one recorded after it: the compute stream is idle at the
first, so this is the host's time in ``next()`` plus the stream's wait for the copy. The step
runs from that first event to the end of the step's work. Target: wait / step < 5%.

    python benchmarks/columnio_feed.py
    python benchmarks/columnio_feed.py --rows 4000000 --batch-size 16384 --prefetch 1,2,4
    python benchmarks/columnio_feed.py --data-dir /tmp/ctr   # keep (and reuse) the data
    python benchmarks/columnio_feed.py --device cpu --steps 50  # host sleep; checks the loop

With ``--json``, each row of the shared results file is one feed against the baseline in
steps/s; the wait shares are in its notes and every feed's statistics in its ``extra``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _harness import device_name, synchronize
from _results import Measurement, add_json_option, new_result, save

# ---------------------------------------------------------------------- loading the pieces


def load_columnio() -> dict[str, Any]:
    """ColumnIO's reader, synthetic data writer and device feeding, or a clear exit."""
    pieces: dict[str, Any] = {}
    try:
        from recstack.columnio.device import batch_to, to_device

        pieces.update(batch_to=batch_to, to_device=to_device)
    except ImportError as exc:
        sys.exit(f"columnio_feed: recstack.columnio.device cannot be imported: {exc}")
    try:
        from recstack.columnio import ColumnReader

        pieces["ColumnReader"] = ColumnReader
    except ImportError as exc:
        sys.exit(
            f"columnio_feed: cannot import recstack.columnio.ColumnReader ({exc}); it needs "
            "the ColumnIO reader and pyarrow"
        )
    try:
        from recstack.columnio.synthetic import SyntheticCTRConfig, write_synthetic_ctr

        pieces.update(
            SyntheticCTRConfig=SyntheticCTRConfig, write_synthetic_ctr=write_synthetic_ctr
        )
    except ImportError as exc:
        sys.exit(
            "columnio_feed: cannot import SyntheticCTRConfig and write_synthetic_ctr from "
            f"recstack.columnio.synthetic ({exc})"
        )
    return pieces


# ---------------------------------------------------------------------- data


def make_data(
    pieces: dict[str, Any], data_dir: Path, rows: int, seed: int, row_group_size: int
) -> list[str]:
    """Synthetic CTR file(s) of ``rows`` rows; an existing one in ``data_dir`` is reused."""
    path = data_dir / f"ctr_{rows}_{seed}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        config = pieces["SyntheticCTRConfig"](num_rows=rows, seed=seed)
        written = pieces["write_synthetic_ctr"](path, config, row_group_size=row_group_size)
        print(f"wrote {rows:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        if isinstance(written, (str, Path)):
            path = Path(written)
        elif isinstance(written, (list, tuple)) and written:
            return [str(p) for p in written]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file())
        if not files:
            sys.exit(f"columnio_feed: no data files under {path}")
        return files
    return [str(path)]


def column_names(paths: list[str]) -> list[str]:
    import pyarrow.dataset as ds

    return list(
        ds.dataset(paths[0], format=Path(paths[0]).suffix.lstrip(".") or "parquet").schema.names
    )


def warm_page_cache(paths: list[str]) -> None:
    # Both runs then read from memory; otherwise the first one pays for the disk.
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# ---------------------------------------------------------------------- batches


def batch_tensors(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor of a batch, through JaggedTensor (nested too) and KJT."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in batch_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in batch_tensors(v)]
    # JaggedTensor: values (a tensor or a nested JaggedTensor), offsets, weights.
    if hasattr(obj, "offsets") and hasattr(obj, "values") and not callable(obj.values):
        out = batch_tensors(obj.values) + [obj.offsets]
        return out + ([obj.weights] if getattr(obj, "weights", None) is not None else [])
    # KeyedJaggedTensor: accessor methods.
    if callable(getattr(obj, "values", None)) and callable(getattr(obj, "lengths", None)):
        return [obj.values(), obj.lengths()]
    return []


def batch_rows(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else 1
        if callable(getattr(value, "stride", None)) and callable(getattr(value, "keys", None)):
            return int(value.stride())  # a KeyedJaggedTensor
        if hasattr(value, "offsets"):
            return len(value)
    return 0


def batch_nbytes(batch: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in batch_tensors(batch))


# ---------------------------------------------------------------------- the training step


class SimulatedStep:
    """``step_ms`` of GPU work (a calibrated ``torch.cuda._sleep``) plus a read of each tensor.

    The read makes the step depend on the batch, so the compute stream must wait for its
    copy. On the CPU the work is a ``time.sleep``.
    """

    def __init__(self, device: torch.device, step_ms: float) -> None:
        self.device = device
        self.step_ms = step_ms
        self.acc = torch.zeros((), dtype=torch.float64, device=device)
        self.cycles = 0
        self.measured_ms = step_ms
        if device.type == "cuda":
            self.cycles, self.measured_ms = calibrate_sleep(step_ms, device)

    def __call__(self, batch: Mapping[str, Any]) -> None:
        if self.device.type == "cuda":
            torch.cuda._sleep(self.cycles)
        else:
            time.sleep(self.step_ms / 1e3)
        for t in batch_tensors(batch):
            if t.numel():
                self.acc.add_(t.sum())


def calibrate_sleep(step_ms: float, device: torch.device) -> tuple[int, float]:
    """Cycles of ``torch.cuda._sleep`` that take ``step_ms``, and what they measured."""

    def timed(cycles: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    cycles = 1_000_000
    timed(cycles)  # first launch
    for _ in range(4):
        cycles = max(1, int(cycles * step_ms / max(timed(cycles), 1e-3)))
    return cycles, statistics.median(timed(cycles) for _ in range(5))


def h2d_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Pinned host-to-device copy bandwidth in bytes/s (median of 10 copies)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[2:])


# ---------------------------------------------------------------------- the loop


@dataclass
class StepSample:
    wait_s: float  # from before next() until the batch is usable on the compute stream
    step_s: float  # from before next() until the step's work is done
    host_next_s: float  # host time blocked in next()
    rows: int


@dataclass
class FeedStats:
    feed: str
    steps: int
    rows: int
    wall_s: float
    wait_s: float
    step_s: float
    host_next_s: float
    wait_share: float
    wait_median_ms: float
    wait_p99_ms: float
    step_median_ms: float
    steps_per_s: float
    rows_per_s: float
    restarts: int


def summarize(feed: str, samples: list[StepSample], wall_s: float, restarts: int) -> FeedStats:
    """Totals and rates of the measured steps; wait share = total wait / total step time."""
    if not samples:
        raise ValueError(f"{feed}: no steps were measured")
    waits = sorted(s.wait_s for s in samples)
    wait_s = sum(waits)
    step_s = sum(s.step_s for s in samples)
    rows = sum(s.rows for s in samples)
    p99 = waits[min(len(waits) - 1, int(round(0.99 * (len(waits) - 1))))]
    return FeedStats(
        feed=feed,
        steps=len(samples),
        rows=rows,
        wall_s=wall_s,
        wait_s=wait_s,
        step_s=step_s,
        host_next_s=sum(s.host_next_s for s in samples),
        wait_share=wait_s / step_s if step_s > 0 else 0.0,
        wait_median_ms=statistics.median(waits) * 1e3,
        wait_p99_ms=p99 * 1e3,
        step_median_ms=statistics.median(s.step_s for s in samples) * 1e3,
        steps_per_s=len(samples) / wall_s if wall_s > 0 else 0.0,
        rows_per_s=rows / wall_s if wall_s > 0 else 0.0,
        restarts=restarts,
    )


def feed_loop(
    feed: str,
    batches: Iterable[Any],
    step: Callable[[Mapping[str, Any]], None],
    device: torch.device,
    steps: int,
    warmup: int,
    prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> FeedStats:
    """Run ``warmup + steps`` steps on batches of ``batches`` and time the measured ones.

    ``prepare`` turns a yielded batch into a device batch (the baseline's ``.to``); it is
    timed as part of getting the batch. Items that are not batches (markers) are skipped. An
    exhausted source is iterated again (its next epoch); the restart counts as waiting.
    """
    cuda = device.type == "cuda"
    it: Iterator[Any] = iter(batches)
    restarts = 0
    samples: list[StepSample] = []
    first_start = last_end = 0.0

    def next_batch() -> Mapping[str, Any]:
        nonlocal it, restarts
        fresh = False
        while True:
            try:
                item = next(it)
            except StopIteration:
                if fresh:
                    raise RuntimeError(f"{feed}: the source yielded no batches") from None
                it, fresh = iter(batches), True
                restarts += 1
                continue
            if isinstance(item, Mapping):
                return prepare(item) if prepare is not None else item

    synchronize(device)
    for i in range(warmup + steps):
        if cuda:
            ev_before = torch.cuda.Event(enable_timing=True)
            ev_ready = torch.cuda.Event(enable_timing=True)
            ev_done = torch.cuda.Event(enable_timing=True)
            ev_before.record()
        t_before = time.perf_counter()
        batch = next_batch()
        t_ready = time.perf_counter()
        if cuda:
            ev_ready.record()
        step(batch)
        if cuda:
            ev_done.record()
            ev_done.synchronize()
        t_done = time.perf_counter()
        if i < warmup:
            if i == warmup - 1:
                restarts = 0
            continue
        if not samples:
            first_start = t_before
        last_end = t_done
        if cuda:
            wait_s = ev_before.elapsed_time(ev_ready) / 1e3
            step_s = ev_before.elapsed_time(ev_done) / 1e3
        else:
            wait_s, step_s = t_ready - t_before, t_done - t_before
        samples.append(StepSample(wait_s, step_s, t_ready - t_before, batch_rows(batch)))
        del batch
    return summarize(feed, samples, last_end - first_start, restarts)


# ---------------------------------------------------------------------- report


def markdown(stats: list[FeedStats], header: str, baseline: FeedStats, target_share: float) -> str:
    lines = [
        header,
        "",
        "| feed | steps | wait / step | wait per step, median / p99 (ms) "
        "| host in next(), mean (ms) | step, median (ms) | steps/s | rows/s | vs baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in stats:
        lines.append(
            f"| {s.feed} | {s.steps} | {s.wait_share:.2%} "
            f"| {s.wait_median_ms:.3f} / {s.wait_p99_ms:.3f} "
            f"| {s.host_next_s / s.steps * 1e3:.3f} | {s.step_median_ms:.2f} "
            f"| {s.steps_per_s:.1f} | {s.rows_per_s:,.0f} "
            f"| {s.steps_per_s / baseline.steps_per_s:.2f}x |"
        )
    ours = [s for s in stats if s is not baseline]
    if ours:
        best = min(ours, key=lambda s: s.wait_share)
        verdict = "met" if best.wait_share < target_share else "NOT met"
        lines += [
            "",
            f"Target wait / step < {target_share:.0%}: {verdict} (best: {best.feed}, "
            f"{best.wait_share:.2%}; baseline {baseline.wait_share:.2%}).",
        ]
    if any(s.restarts for s in stats):
        lines.append(
            "Epoch restarts during the measured steps: "
            + ", ".join(f"{s.feed} {s.restarts}" for s in stats)
            + " (their wait is included)."
        )
    return "\n".join(lines)


def parse_prefetch(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--prefetch wants ints >= 0 like 1,2; got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=300, help="measured steps per feed")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--prefetch", type=parse_prefetch, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--threads", type=int, default=4, help="ColumnReader num_threads")
    parser.add_argument(
        "--rows", type=int, default=None, help="rows of data (default: one epoch of all steps)"
    )
    parser.add_argument("--row-group-size", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", default=None, help="comma-separated (default: all)")
    parser.add_argument("--data-dir", default=None, help="keep the data here (reused if there)")
    parser.add_argument("--target", type=float, default=0.05, help="wait / step target")
    add_json_option(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pieces = load_columnio()
    rows = args.rows or (args.warmup + args.steps + 2) * args.batch_size

    with tempfile.TemporaryDirectory(prefix="columnio_feed_") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        paths = make_data(pieces, data_dir, rows, args.seed, args.row_group_size)
        columns = args.columns.split(",") if args.columns else column_names(paths)
        warm_page_cache(paths)

        def reader() -> Any:
            return pieces["ColumnReader"](
                paths, columns, args.batch_size, num_threads=args.threads, pin_memory=cuda
            )

        probe = next(b for b in reader() if isinstance(b, Mapping))
        per_batch = batch_nbytes(probe)
        del probe

        step = SimulatedStep(device, args.step_ms)
        bandwidth = h2d_bandwidth(device) if cuda else 0.0
        batch_to, to_device = pieces["batch_to"], pieces["to_device"]
        stats: list[FeedStats] = []
        # The baseline first and again last: the better of the two is reported, so neither
        # side gains from a warmer machine.
        baseline_runs = []
        baseline_name = "plain .to(device), no prefetch (baseline)"

        def run_baseline() -> FeedStats:
            return feed_loop(
                baseline_name,
                reader(),
                step,
                device,
                args.steps,
                args.warmup,
                prepare=lambda b: batch_to(b, device),
            )

        baseline_runs.append(run_baseline())
        if cuda:
            direct = pieces["ColumnReader"](
                paths, columns, args.batch_size, num_threads=args.threads, device=device
            )
            name = "ColumnReader(device=cuda)"
            stats.append(feed_loop(name, direct, step, device, args.steps, args.warmup))
            process = pieces["ColumnReader"](
                paths,
                columns,
                args.batch_size,
                num_threads=args.threads,
                device=device,
                worker="process",
            )
            name = "ColumnReader(device=cuda, worker=process)"
            stats.append(feed_loop(name, process, step, device, args.steps, args.warmup))
            process.close()
        for prefetch in args.prefetch:
            name = f"to_device(prefetch={prefetch})"
            feed = to_device(reader(), device, prefetch=prefetch, pin_memory=cuda)
            stats.append(feed_loop(name, feed, step, device, args.steps, args.warmup))
        baseline_runs.append(run_baseline())
        baseline = max(baseline_runs, key=lambda s: s.steps_per_s)
        stats.append(baseline)

    header = (
        f"**ColumnIO device feed** on {device_name(device)}, {time.strftime('%Y-%m-%d')}; "
        f"torch {torch.__version__}; `{' '.join(['python', *sys.argv])}`\n\n"
        f"{len(columns)} columns, {args.batch_size:,} rows a batch "
        f"({per_batch / 2**20:.2f} MiB on the device), {rows:,} rows, ColumnReader "
        f"num_threads={args.threads}; simulated step {args.step_ms:g} ms "
        f"(measured {step.measured_ms:.2f} ms of "
        + ("`torch.cuda._sleep`" if cuda else "`time.sleep`")
        + ") + a sum of every batch tensor"
    )
    if cuda:
        header += (
            f"; pinned H2D {bandwidth / 1e9:.1f} GB/s, so a batch's copy takes "
            f"{per_batch / bandwidth * 1e3:.3f} ms"
        )
    print()
    print(markdown(stats, header, baseline, args.target))
    if args.json:
        result = new_result(
            "columnio_feed", "ColumnIO device feed", device, args, rows=result_rows(stats, baseline)
        )
        result.extra = {
            "columns": columns,
            "rows": rows,
            "batch_bytes": per_batch,
            "step_ms": step.measured_ms,
            "h2d_bytes_per_s": bandwidth,
            "feeds": [asdict(s) for s in stats],
            "baseline_runs": [asdict(s) for s in baseline_runs],
        }
        save(result, args.json)


def result_rows(stats: list[FeedStats], baseline: FeedStats) -> list[Measurement]:
    """Each feed against the baseline in steps/s, its wait shares in the notes."""
    return [
        Measurement(
            s.feed,
            s.steps_per_s,
            "steps/s",
            baseline=baseline.feed,
            baseline_value=baseline.steps_per_s,
            ratio=s.steps_per_s / baseline.steps_per_s if baseline.steps_per_s else None,
            notes=f"wait / step {s.wait_share:.2%} (baseline {baseline.wait_share:.2%}); "
            f"wait median / p99 {s.wait_median_ms:.3f} / {s.wait_p99_ms:.3f} ms",
            extra=asdict(s),
        )
        for s in stats
        if s is not baseline
    ]


if __name__ == "__main__":
    main()
