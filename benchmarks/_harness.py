"""Shared benchmark harness: copy bandwidth, median timing, and the printed table.

Every RecStack benchmark prints one table: the workload, our time, the plain-PyTorch
baseline's time measured in the same run, their ratio, and MBU (model bandwidth
utilisation) = bytes that must move / time / the device-to-device copy bandwidth measured
in this run (bytes read plus bytes written). The card (or CPU) is named in the output.
With ``--json``, a script also writes its run in the shared format of ``_results.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _results import host_name, module_version

# The benchmarks run from a checkout without installing anything (the GPU machine has torch
# and triton but not RecStack), so make the packages' sources importable.
_ROOT = Path(__file__).resolve().parents[1]
for _src in sorted(_ROOT.glob("packages/*/src")):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))


def sized_for_device(args: Any, gpu: Mapping[str, Any], cpu: Mapping[str, Any]) -> torch.device:
    """``args.device`` as a device, after filling each size in ``args`` left ``None`` with
    its GPU default (on CUDA) or CPU smoke-run default."""
    device = torch.device(args.device)
    for name, value in (gpu if device.type == "cuda" else cpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return device


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU model and core count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / 2**30
        return f"{props.name} ({memory:.0f} GiB, {props.multi_processor_count} SMs)"
    return host_name()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 5,
    repeat: int = 20,
    *,
    wall: bool = False,
) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, the wall clock on a CPU.

    ``wall=True`` times GPU calls by the wall clock too, each call followed by a device
    sync: the honest measure for work that waits on the device inside the call (reads a
    size back, say), where the time a training step loses is the host's.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda" and wall:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    elif device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeat)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_table(
    fn: Callable[[], object], device: torch.device, *, steps: int = 5, row_limit: int = 15
) -> str:
    """The ops and kernels of ``steps`` calls of ``fn`` under ``torch.profiler``, the
    largest own device time first (own CPU time on a CPU): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()  # compiled and allocated before the profile
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    Copies for about a second first, so an idle GPU's clocks are up before anything is timed.
    """
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 256 * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        dst.copy_(src)
        synchronize(device)
    seconds = median_time(lambda: dst.copy_(src), device, warmup=3, repeat=20)
    return 2 * nbytes / seconds


@dataclass
class Row:
    """One workload: our time and the baseline's, both in seconds, and the bytes moved."""

    workload: str
    ours_s: float
    baseline_s: float
    nbytes: int
    baseline: str = "plain PyTorch"
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def speedup(self) -> float:
        return self.baseline_s / self.ours_s

    def mbu(self, bandwidth: float, seconds: float) -> float:
        return self.nbytes / seconds / bandwidth


@dataclass
class Report:
    """A benchmark run: the device, its measured copy bandwidth, and the rows."""

    title: str
    device: str
    bandwidth: float
    rows: list[Row] = field(default_factory=list)
    command: str = field(default_factory=lambda: " ".join(["python", *sys.argv]))
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))
    versions: str = field(
        default_factory=lambda: f"torch {torch.__version__}, triton {_triton_version()}"
    )

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(
            f"  measured: {row.workload}: ours {row.ours_s * 1e3:.3f} ms, "
            f"baseline {row.baseline_s * 1e3:.3f} ms",
            flush=True,
        )
        return row

    def markdown(self) -> str:
        """The run as a markdown table; without MBU columns, and with the rows' notes,
        when the report has no copy bandwidth (``0``: workloads without a copy roofline,
        such as exchanges between ranks)."""
        if self.bandwidth <= 0:
            return self._markdown_without_mbu()
        lines = [
            f"**{self.title}** on {self.device}, {self.date}; {self.versions}; "
            f"copy bandwidth {self.bandwidth / 1e9:,.0f} GB/s (read + write); `{self.command}`",
            "",
            "| workload | ours (ms) | baseline (ms) | baseline | speedup | MBU ours "
            "| MBU baseline |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.workload} | {r.ours_s * 1e3:.3f} | {r.baseline_s * 1e3:.3f} | {r.baseline} "
                f"| {r.speedup():.2f}x | {r.mbu(self.bandwidth, r.ours_s):.0%} "
                f"| {r.mbu(self.bandwidth, r.baseline_s):.0%} |"
            )
        return "\n".join(lines)

    def _markdown_without_mbu(self) -> str:
        lines = [
            f"**{self.title}** on {self.device}, {self.date}; {self.versions}; `{self.command}`",
            "",
            "| workload | ours (ms) | baseline (ms) | baseline | ratio | notes |",
            "| --- | ---: | ---: | --- | ---: | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.workload} | {r.ours_s * 1e3:,.1f} | {r.baseline_s * 1e3:,.1f} "
                f"| {r.baseline} | {r.speedup():.2f}x | {r.notes} |"
            )
        return "\n".join(lines)


def _triton_version() -> str:
    return module_version("triton") or "absent"
