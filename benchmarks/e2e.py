"""A whole DIN training step, RecStack against plain PyTorch, from Parquet files to AUC.

Workload: a DIN click model over synthetic CTR data written once with ColumnIO's generator
(``write_synthetic_ctr``: power-law id popularity and a known best AUC): ``--features`` id
features of ``--ids`` ids each (the first is the candidate item), one behaviour history of up
to ``--hist`` items read from the item table, 13 dense features, embeddings of ``--dim``,
batches of ``--batch`` rows. Each side trains ``--warmup`` + ``--steps`` +
``--profile-steps`` + ``--split-steps`` steps on the same files, then is evaluated on the
same held-out file.

* Ours, built from the public API as a user would: a ``ColumnReader`` (its own decoding
  threads, batches delivered on the GPU), a ``FeatureEngine``, an ``EmbeddingCollection`` of
  dynamic (collision-free) tables with the history as a jagged ``pooling="none"`` feature
  whose rows the fused attention reads from the table (``gather=False``; ``--history
  jagged`` hands it the gathered rows, ``--history padded`` pads them to ``--hist``),
  ``recstack.pipelines.models.DIN``, ``SparseAdam(tf_compat=True)`` and ``AdamW``, bf16
  autocast for the dense tower, run by ``recstack.pipelines.trainer.Trainer``
  (``max_steps``). Its phases are timed from outside: the data source and the feature
  engine are wrapped, and module, tensor and optimizer hooks mark the rest.
* The baseline, plain PyTorch as usually written (``_e2e_plain.py``): a ``DataLoader``
  (``--num-workers`` processes reading row groups with pyarrow), ids ``% N`` into one
  ``nn.EmbeddingBag(N, dim, mode="sum", sparse=True)`` per feature, the history padded
  into ``F.embedding(..., sparse=True)`` on the item table with a mask, the same DIN
  attention and MLP in fp32, ``torch.optim.SparseAdam`` and ``AdamW``.

Measured per side and history length:

* step time (median, mean, max) and samples/s over the ``--steps`` steps, timed without
  any device sync (host timestamps at each step's end; one sync at each end of the window,
  so the mean is exact and the median and max are the host's view of a loop that syncs
  inside every step anyway);
* the split over ``--split-steps`` further steps that synchronize at every phase boundary:
  io (waiting for the next batch, on the device), features, sparse (lookup forward,
  embedding backward, sparse optimizer), dense (tower forward, loss, tower backward, dense
  optimizer) and other (the rest of the loop);
* the GPU idle share over ``--profile-steps`` unsynced steps: 1 - (union of the kernel,
  memcpy and memset intervals that ``torch.profiler`` records, CUDA activity only) / wall
  time;
* peak GPU memory (``torch.cuda.max_memory_allocated``, from building the model to the
  end of training) and the AUC on the evaluation file, beside the data's best AUC;
* a roofline floor: the bytes the step must move (each unique embedding row read once in
  the forward, then its value and both Adam moments read and written once; the dense
  weights; the batch) at the device-to-device copy bandwidth measured in the run, plus the
  dense FLOPs of the valid history positions (forward and backward) at the bf16 matmul
  rate measured in the run (a large ``torch.matmul``), and each side's time over it.

    python benchmarks/e2e.py --hist 1000 100 --json
    python benchmarks/e2e.py --data-dir /tmp/e2e-data --prepare-only   # write the data once
    python benchmarks/e2e.py --device cpu --quick                     # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _e2e_plain as plain
import pyarrow.parquet as pq
import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time, synchronize
from _results import Measurement, add_json_option, measurement, new_result, save
from _stall_probe import StallProbe

from recstack.columnio import (
    ColumnReader,
    SyntheticCTRConfig,
    best_auc,
    roc_auc,
    write_synthetic_ctr,
)
from recstack.embedding_engine import FeatureConfig, TableConfig, TableRows
from recstack.feature_engine import Feature, FeatureEngine, Truncate
from recstack.pipelines import Callback, Task, Trainer
from recstack.pipelines.models import DIN, DINConfig
from recstack.sparse_optim import SparseAdam

PHASES = ("io", "features", "sparse", "dense", "other")
NUM_DENSE = 13
ATTENTION_HIDDEN = (80, 40)  # DINConfig's defaults, used by both sides
MLP_HIDDEN = (200, 80)
BASELINE = "plain PyTorch: DataLoader, nn.EmbeddingBag, SparseAdam, fp32"
DATA_INFO = "e2e-data.json"


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Schedule:
    """Steps of one side's run, in order: warmup, measured, profiled, split."""

    warmup: int
    steps: int
    profile: int
    split: int

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.profile + self.split


@dataclass(frozen=True)
class Settings:
    """The run's sizes, from the command line (``--quick`` changes the defaults)."""

    device: torch.device
    features: int
    ids: int
    dim: int
    hists: tuple[int, ...]
    hist_mean: float
    batch: int
    schedule: Schedule
    eval_rows: int
    num_workers: int
    reader_threads: int
    reader_worker: str
    sparse_lr: float
    dense_lr: float
    seed: int
    data_dir: Path | None
    baseline_bf16: bool
    deferred_checks: bool
    capacity: int | None
    gen_workers: int
    history: str  # our history feature: "padded", "jagged" or "table" (see --history)
    data_max_hist: int  # the data's longest history: fixed, so --hist lists share files


def _pick(value: Any, quick: bool, quick_value: Any, full_value: Any) -> Any:
    if value is not None:
        return value
    return quick_value if quick else full_value


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick
    device = torch.device(args.device)
    profile = _pick(args.profile_steps, q, 0, 5) if device.type == "cuda" else 0
    schedule = Schedule(
        warmup=_pick(args.warmup, q, 2, 20),
        steps=_pick(args.steps, q, 5, 200),
        profile=profile,
        split=0 if args.no_split else _pick(args.split_steps, q, 3, 20),
    )
    if schedule.steps < 1 or schedule.warmup < 0 or schedule.profile < 0 or schedule.split < 0:
        raise SystemExit("e2e: --steps must be >= 1 and the other step counts >= 0")
    batch = _pick(args.batch, q, 256, 8192)
    eval_rows = _pick(args.eval_rows, q, 1024, 262_144)
    eval_rows = max(batch, eval_rows // batch * batch)  # whole batches on both sides
    hists = tuple(_pick(args.hist, q, [20], [1000]))
    return Settings(
        device=device,
        features=_pick(args.features, q, 2, 26),
        ids=_pick(args.ids, q, 10_000, 2_000_000),
        dim=args.dim,
        hists=hists,
        hist_mean=_pick(args.hist_mean, q, 8.0, 200.0),
        batch=batch,
        schedule=schedule,
        eval_rows=eval_rows,
        num_workers=_pick(args.num_workers, q, 2, 4),
        reader_threads=_pick(args.reader_threads, q, 2, 4),
        reader_worker=args.reader_worker,
        sparse_lr=args.sparse_lr,
        dense_lr=args.dense_lr,
        seed=args.seed,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        baseline_bf16=args.baseline_bf16,
        deferred_checks=args.deferred_checks,
        capacity=args.capacity,
        gen_workers=args.gen_workers or min(os.cpu_count() or 1, 16),
        history=args.history,
        data_max_hist=max((*hists, 20 if q else 1000)),
    )


def sparse_columns(cfg: Settings) -> list[str]:
    return [f"sparse_{i}" for i in range(cfg.features)]


def dense_columns() -> list[str]:
    return [f"dense_{i}" for i in range(NUM_DENSE)]


# ---------------------------------------------------------------------- data


@dataclass
class Data:
    """The files both sides read: training parts, the evaluation part, the best AUC."""

    train: list[str]
    eval: str
    best_auc: float
    rows: int


def prepare_data(cfg: Settings) -> Data:
    """Write the synthetic data set once (or reuse ``--data-dir`` when it holds the same)."""
    file_rows = cfg.eval_rows
    train_files = math.ceil(cfg.schedule.total * cfg.batch / file_rows)
    config = SyntheticCTRConfig(
        num_rows=(train_files + 1) * file_rows,
        seed=cfg.seed,
        num_dense=NUM_DENSE,
        num_sparse=cfg.features,
        vocab_size=cfg.ids,
        seq_mean_len=cfg.hist_mean,
        seq_max_len=cfg.data_max_hist,
        string_ids=0,
    )
    root = cfg.data_dir or Path(tempfile.mkdtemp(prefix="recstack-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    reused = reuse_data(root, config, file_rows)
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    group = max(cfg.batch, min(65_536, file_rows) // cfg.batch * cfg.batch)
    written = write_synthetic_ctr(
        root,
        config,
        rows_per_file=file_rows,
        row_group_size=group,
        overwrite=True,
        workers=cfg.gen_workers,
    )
    names = [Path(p).name for p in written.paths]
    best = best_auc(pq.read_table(root / names[-1], columns=["label", "label_prob"]))
    info = {"config": config.to_dict(), "rows_per_file": file_rows, "files": names}
    with open(root / DATA_INFO, "w") as f:  # the data's manifest, not a result
        json.dump({**info, "best_auc": best}, f)
    size = sum((root / n).stat().st_size for n in names) / 2**30
    say(
        f"data: wrote {config.num_rows:,} rows ({len(names) - 1} training files + 1 evaluation "
        f"file, {size:.2f} GiB) to {root} in {time.perf_counter() - t0:.1f} s; click rate "
        f"{written.positive_rate:.3f}, best AUC on the evaluation file {best:.4f}"
    )
    paths = [str(root / n) for n in names]
    return Data(paths[:-1], paths[-1], best, config.num_rows)


def reuse_data(root: Path, config: SyntheticCTRConfig, file_rows: int) -> Data | None:
    """The data already in ``root`` when it was generated with the same settings and holds
    at least as many rows (a run of fewer steps reuses a longer run's data)."""
    path = root / DATA_INFO
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    have = dict(info.get("config") or {})
    want = config.to_dict()
    rows = have.pop("num_rows", 0)
    need = want.pop("num_rows")
    paths = [str(root / name) for name in info.get("files", [])]
    same = have == want and info.get("rows_per_file") == file_rows and rows >= need
    if not same or not paths or not all(Path(p).exists() for p in paths):
        return None
    say(f"data: reusing {rows:,} rows in {root}; best AUC {info['best_auc']:.4f}")
    return Data(paths[:-1], paths[-1], info["best_auc"], rows)


def warm_page_cache(paths: Iterable[str]) -> None:
    # Both sides then read from memory; otherwise the first one pays for the disk.
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# ---------------------------------------------------------------------- device rates


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a large matmul: bf16 on a GPU, fp32 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / seconds, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


@dataclass
class Roofline:
    """What one step must do, from a sample of batches, and its floor time."""

    unique_rows: float
    valid_positions: float
    nbytes: float
    flops: float
    floor_s: float


def dense_parameter_count(cfg: Settings) -> int:
    d = cfg.dim
    count, width = 0, 4 * d
    for h in (*ATTENTION_HIDDEN, 1):
        count += width * h + h
        width = h
    width = (cfg.features + 1) * d + NUM_DENSE
    for h in MLP_HIDDEN:
        count += width * h + 2 * h  # weights, bias, Dice's alpha
        width = h
    return count + width + 1


def roofline(
    cfg: Settings, data: Data, hist: int, bandwidth: float, flop_rate: float, samples: int = 8
) -> Roofline:
    """The step's floor: bytes at the copy bandwidth plus dense FLOPs at the matmul rate."""
    ds = plain.ParquetBatches(
        data.train, cfg.batch, sparse_columns(cfg), dense_columns(), hist, cfg.ids
    )
    uniques, valid, n = 0.0, 0.0, 0
    for batch in ds:
        b = {k: v.to(cfg.device) for k, v in batch.items()}
        mask = plain.history_mask(b)
        items = torch.cat([b["sparse"][:, 0], b["hist"][mask]])
        uniques += torch.unique(items).numel()
        uniques += sum(torch.unique(b["sparse"][:, i]).numel() for i in range(1, cfg.features))
        valid += float(b["hist_len"].sum())
        n += 1
        if n == samples:
            break
    uniques, valid = uniques / n, valid / n
    d, bsz = cfg.dim, cfg.batch
    row = d * 4
    # Each unique row: read once in the forward; value, exp_avg, exp_avg_sq read + written.
    table_bytes = uniques * row * 7
    # Dense weights: read in forward and backward, gradient written, AdamW reads p, g, m, v
    # and writes p, m, v.
    weight_bytes = dense_parameter_count(cfg) * 4 * 10
    batch_bytes = bsz * (cfg.features * 8 + NUM_DENSE * 4 + 4) + valid * 8 + (bsz + 1) * 8
    nbytes = table_bytes + weight_bytes + batch_bytes
    attention = 2 * (4 * d * ATTENTION_HIDDEN[0] + ATTENTION_HIDDEN[0] * ATTENTION_HIDDEN[1])
    attention += 2 * ATTENTION_HIDDEN[1] + 2 * d  # the score layer, the weighted sum
    width, mlp = (cfg.features + 1) * d + NUM_DENSE, 0
    for h in (*MLP_HIDDEN, 1):
        mlp += 2 * width * h
        width = h
    flops = 3 * (valid * attention + bsz * mlp)  # forward + backward (twice the forward)
    floor = nbytes / bandwidth + flops / flop_rate
    return Roofline(uniques, valid, nbytes, flops, floor)


# ---------------------------------------------------------------------- timing


class StepTimer:
    """Times one side's run through its schedule.

    ``mark(phase)`` closes the interval since the previous mark as ``phase``; it only
    records (after a device sync) during the split steps. ``step_end(step)`` closes a
    step and moves through the schedule: warmup, measured steps (host timestamps, no
    sync), profiled steps (``torch.profiler``, CUDA activity only), split steps.
    """

    def __init__(self, name: str, device: torch.device, schedule: Schedule) -> None:
        self.name, self.device, self.schedule = name, device, schedule
        self.splitting = False
        self.step_times: list[float] = []
        self.measured_s = 0.0
        self.splits: list[dict[str, float]] = []
        self.busy_share: float | None = None
        self._marks: list[tuple[str, float]] = []
        self._last = self._t0 = self._split_start = self._phase_start = 0.0
        self._profiler: Any = None
        self.probe = StallProbe(device)

    def mark(self, phase: str) -> None:
        if self.splitting:
            synchronize(self.device)
            self._marks.append((phase, time.perf_counter()))

    def start(self) -> None:
        self._phase_start = time.perf_counter()
        self._boundary(0)

    def step_end(self, step: int) -> None:
        now = time.perf_counter()
        self.probe.step_end()
        s = self.schedule
        if s.warmup < step <= s.warmup + s.steps:
            self.step_times.append(now - self._last)
            self._last = now
        if self.splitting:
            synchronize(self.device)
            self.splits.append(self._split_phases(time.perf_counter()))
        self._boundary(step)

    def _split_phases(self, now: float) -> dict[str, float]:
        out = dict.fromkeys(PHASES, 0.0)
        prev = self._split_start
        for phase, t in self._marks:
            out[phase] += t - prev
            prev = t
        out["other"] += now - prev
        self._marks, self._split_start = [], now
        return out

    def _say(self, what: str, steps: int) -> None:
        now = time.perf_counter()
        say(f"  {self.name}: {what}: {steps} steps in {now - self._phase_start:.1f} s")
        self._phase_start = now

    def _boundary(self, step: int) -> None:
        s = self.schedule
        if step == s.warmup:
            synchronize(self.device)
            if step:
                self._say("warmup", s.warmup)
            self._t0 = self._last = time.perf_counter()
        measured_end = s.warmup + s.steps
        if step == measured_end:
            synchronize(self.device)
            self.measured_s = time.perf_counter() - self._t0
            self._say("measured (no sync)", s.steps)
            if s.profile:
                self._start_profile()
        if s.profile and step == measured_end + s.profile:
            self._stop_profile()
        if s.split and step == measured_end + s.profile:
            synchronize(self.device)
            self.splitting, self._marks = True, []
            self._split_start = time.perf_counter()
        if s.split and step == s.total:
            self.splitting = False
            self._say("split (synced at each phase)", s.split)

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        try:
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.start()
        except Exception as exc:  # no CUPTI, say: the idle share is then not measured
            say(f"  {self.name}: torch.profiler did not start ({exc}); no idle share")
            self._profiler = None
        self._t0 = time.perf_counter()

    def _stop_profile(self) -> None:
        synchronize(self.device)
        wall = time.perf_counter() - self._t0
        if self._profiler is None:
            self._say("profile steps (no profiler)", self.schedule.profile)
            return
        try:
            self._profiler.stop()
            self.busy_share = min(1.0, device_busy_seconds(self._profiler) / wall)
        except Exception as exc:
            say(f"  {self.name}: reading the profile failed ({exc}); no idle share")
        self._profiler = None
        busy = "n/a" if self.busy_share is None else f"{self.busy_share:.0%}"
        self._say(f"profiled (GPU busy {busy})", self.schedule.profile)


def device_busy_seconds(prof: Any) -> float:
    """The union of the device's kernel, memcpy and memset intervals in a profile."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    busy, end = 0.0, -math.inf
    for a, b in spans:
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy * 1e-6


@dataclass
class SideResult:
    """One side's numbers for one history length (``error`` when it could not run)."""

    name: str
    median_s: float = math.nan
    mean_s: float = math.nan
    max_s: float = math.nan
    phases: dict[str, float] = field(default_factory=dict)
    split_step_s: float = math.nan
    busy_share: float | None = None
    peak_bytes: int | None = None
    auc: float = math.nan
    error: str | None = None
    stalls: list[str] = field(default_factory=list)

    @classmethod
    def from_timer(cls, timer: StepTimer, auc: float, peak: int | None) -> SideResult:
        timer.probe.close()
        splits = timer.splits
        phases = {p: statistics.fmean(s[p] for s in splits) for p in PHASES} if splits else {}
        return cls(
            name=timer.name,
            median_s=statistics.median(timer.step_times),
            mean_s=timer.measured_s / timer.schedule.steps,
            max_s=max(timer.step_times),
            phases=phases,
            split_step_s=sum(phases.values()) if phases else math.nan,
            busy_share=timer.busy_share,
            peak_bytes=peak,
            auc=auc,
            stalls=timer.probe.explain(timer.step_times, timer.schedule.warmup),
        )

    @property
    def ok(self) -> bool:
        return self.error is None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ---------------------------------------------------------------------- ours


class TimedBatches:
    """The reader, with the wait for each batch marked as io. It keeps the reader's
    ``device``, so the trainer takes its batches as they come instead of prefetching."""

    def __init__(self, source: ColumnReader, timer: StepTimer) -> None:
        self.source, self.timer = source, timer
        self.device = source.device

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.source)
        while True:
            self.timer.mark("other")
            batch = next(batches, None)
            if batch is None:
                return
            self.timer.mark("io")
            yield batch


class TimedFeatures:
    """The feature engine, its call marked as features."""

    def __init__(self, engine: FeatureEngine, timer: StepTimer) -> None:
        self.engine, self.timer = engine, timer

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.timer.mark("other")
        out = self.engine(batch)
        self.timer.mark("features")
        return out


class TimerCallback(Callback):
    """Hands the trainer's step boundaries to the timer."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_fit_start(self, trainer: Trainer) -> None:
        self.timer.start()

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        self.timer.step_end(step)


def instrument(
    model: DIN, sparse: torch.optim.Optimizer, dense: torch.optim.Optimizer, timer: StepTimer
) -> None:
    """Marks at the lookup, the model's output, the backward's hand-over to the tables
    and the optimizer steps, with the hooks PyTorch offers."""

    def mark(phase: str) -> Callable[..., None]:
        return lambda *_: timer.mark(phase)

    def grad_hooks(outputs: Iterable[Any]) -> None:
        if timer.splitting and torch.is_grad_enabled():
            for t in outputs:
                if isinstance(t, TableRows):
                    t = t.depends_on  # its gradient comes once the attention's backward is done
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(mark("dense"))

    def after_lookup(module: Any, args: Any, out: Mapping[str, Any]) -> None:
        timer.mark("sparse")
        grad_hooks(out.values())  # the last one fires as the tables' backward starts

    model.embeddings.register_forward_pre_hook(mark("other"))
    model.embeddings.register_forward_hook(after_lookup)
    model.register_forward_hook(lambda module, args, out: grad_hooks([out]))
    sparse.register_step_pre_hook(mark("sparse"))  # closes the tables' backward
    sparse.register_step_post_hook(mark("sparse"))
    dense.register_step_pre_hook(mark("sparse"))  # closes the sparse zero_grad
    dense.register_step_post_hook(mark("dense"))


def history_lookup(kind: str, hist: int) -> FeatureConfig:
    """Our history's lookup: its ids (the feature engine keeps the last ``hist``) as jagged
    rows the attention reads from the table, as gathered jagged rows, or padded."""
    if kind == "padded":
        return FeatureConfig("history", "item", pooling="none", max_len=hist)
    return FeatureConfig("history", "item", pooling="none", gather=kind == "jagged")


def run_ours(cfg: Settings, data: Data, hist: int) -> SideResult:
    """Train and evaluate the RecStack side with the Trainer."""
    device, s = cfg.device, cfg.schedule
    timer = StepTimer("RecStack", device, s)
    torch.manual_seed(cfg.seed)
    reset_peak(device)
    items = ["item", *(f"f{i}" for i in range(1, cfg.features))]
    columns = sparse_columns(cfg)
    features = [
        *(Feature(name, col) for name, col in zip(items, columns, strict=True)),
        Feature("history", "history", [Truncate(hist)]),  # the most recent items
        *(Feature(c, c) for c in dense_columns()),
    ]
    schema = {c: "int" for c in columns} | {c: "float" for c in dense_columns()}
    schema |= {"history": "int_list"}
    engine = FeatureEngine(features, schema)
    tables = [TableConfig(name, dim=cfg.dim, capacity=cfg.capacity) for name in items]
    lookups = [
        FeatureConfig("item", "item"),
        history_lookup(cfg.history, hist),
        *(FeatureConfig(name, name) for name in items[1:]),
    ]
    din = DINConfig(
        item_feature="item",
        history_feature="history",
        other_features=items[1:],
        dense_dim=NUM_DENSE,
        attention_hidden=ATTENTION_HIDDEN,
        mlp_hidden=MLP_HIDDEN,
    )
    model = DIN(din, tables, lookups, device=device)
    sparse = SparseAdam(
        model.embeddings.sparse_parameters(),
        lr=cfg.sparse_lr,
        tf_compat=True,
        deferred_checks=cfg.deferred_checks,
    )
    dense = torch.optim.AdamW(model.parameters(), lr=cfg.dense_lr)
    instrument(model, sparse, dense, timer)
    on_gpu = device if device.type == "cuda" else None
    read = {"num_threads": cfg.reader_threads, "worker": cfg.reader_worker, "device": on_gpu}
    reader = ColumnReader(data.train, [*schema, "label"], cfg.batch, drop_last=True, **read)
    trainer = Trainer(
        model,
        TimedBatches(reader, timer),
        features=TimedFeatures(engine, timer),
        tasks=[Task("ctr", label="label")],
        sparse_optimizer=sparse,
        dense_optimizer=dense,
        device=device,
        precision="bf16" if device.type == "cuda" else "fp32",
        max_steps=s.total,
        log_every=10**9,  # no loss read-back: neither side syncs for logging
        callbacks=[TimerCallback(timer)],
        progress=False,
    )
    try:
        fit = trainer.fit(resume=False)
        if cfg.deferred_checks:
            sparse.flush_checks()
    finally:
        reader.close()
    if fit.step != s.total:
        raise RuntimeError(f"RecStack: the data ran out after {fit.step} of {s.total} steps")
    peak = peak_memory(device)
    with ColumnReader([data.eval], [*schema, "label"], cfg.batch, **read) as evaluation:
        auc = trainer.evaluate(evaluation)["ctr/auc"]
    say(f"  RecStack: evaluated, AUC {auc:.4f}")
    return SideResult.from_timer(timer, auc, peak)


# ---------------------------------------------------------------------- baseline


def run_plain(cfg: Settings, data: Data, hist: int) -> SideResult:
    """Train and evaluate the plain-PyTorch side (``_e2e_plain.py``)."""
    device, s = cfg.device, cfg.schedule
    timer = StepTimer("plain PyTorch", device, s)
    torch.manual_seed(cfg.seed)
    reset_peak(device)
    model = plain.PlainDIN(
        cfg.features, cfg.ids, cfg.dim, NUM_DENSE, ATTENTION_HIDDEN, MLP_HIDDEN
    ).to(device)
    sparse = torch.optim.SparseAdam(model.sparse_parameters(), lr=cfg.sparse_lr)
    dense = torch.optim.AdamW(model.dense_parameters(), lr=cfg.dense_lr)

    def loader(paths: list[str]) -> Any:
        ds = plain.ParquetBatches(
            paths, cfg.batch, sparse_columns(cfg), dense_columns(), hist, cfg.ids
        )
        return plain.make_loader(ds, cfg.num_workers, device)

    batches = iter(loader(data.train))
    timer.start()
    try:
        plain.train(
            model, batches, device, s.total, sparse, dense, timer, autocast=cfg.baseline_bf16
        )
    except StopIteration:
        raise RuntimeError("plain PyTorch: the data ran out before the last step") from None
    finally:
        del batches  # stops the workers
    peak = peak_memory(device)
    scores, labels = plain.predict(
        model, iter(loader([data.eval])), device, autocast=cfg.baseline_bf16
    )
    auc = roc_auc(scores, labels > 0.5)
    say(f"  plain PyTorch: evaluated, AUC {auc:.4f}")
    return SideResult.from_timer(timer, auc, peak)


def run_side(
    run: Callable[[Settings, Data, int], SideResult],
    name: str,
    cfg: Settings,
    data: Data,
    hist: int,
) -> SideResult:
    """One side's run; running out of GPU memory is a result, not the end of the script."""
    warm_page_cache([*data.train, data.eval])
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()  # what the previous side or the rate probes left cached
    try:
        return run(cfg, data, hist)
    except torch.cuda.OutOfMemoryError as exc:
        say(f"  {name}: out of GPU memory ({str(exc).splitlines()[0]})")
        return SideResult(name, error="out of GPU memory")
    finally:
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def _gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def split_table(results: Mapping[int, tuple[SideResult, SideResult]], cfg: Settings) -> str:
    lines = [
        "| hist | side | step ms median / mean / max | samples/s | "
        + " | ".join(f"{p} ms (share)" for p in PHASES)
        + " | GPU idle | peak GPU memory | AUC |",
        "| ---: | --- | ---: | ---: | "
        + " | ".join("---:" for _ in PHASES)
        + " | ---: | ---: | ---: |",
    ]
    for hist, sides in results.items():
        for r in sides:
            if not r.ok:
                lines.append(f"| {hist} | {r.name} | {r.error} |" + " |" * (len(PHASES) + 4))
                continue
            rate = cfg.batch / r.mean_s
            split = [
                f"{_ms(r.phases[p])} ({r.phases[p] / r.split_step_s:.0%})" if r.phases else "n/a"
                for p in PHASES
            ]
            idle = None if r.busy_share is None else 1 - r.busy_share
            lines.append(
                f"| {hist} | {r.name} | {_ms(r.median_s)} / {_ms(r.mean_s)} / {_ms(r.max_s)} "
                f"| {rate:,.0f} | " + " | ".join(split) + f" | {_share(idle)} "
                f"| {_gib(r.peak_bytes)} | {r.auc:.4f} |"
            )
    return "\n".join(lines)


def roofline_table(
    roofs: Mapping[int, Roofline],
    results: Mapping[int, tuple[SideResult, SideResult]],
    bandwidth: float,
    flop_rate: float,
) -> str:
    lines = [
        f"Floor = bytes / {bandwidth / 1e9:,.0f} GB/s + dense FLOPs / "
        f"{flop_rate / 1e12:,.1f} TFLOP/s (both measured in this run). Bytes: unique "
        "embedding rows (read, then value and Adam moments read + written), dense weights "
        "and their AdamW state, the batch; activations are not counted. FLOPs: the "
        "attention over the valid history items only, and the MLP, forward + backward.",
        "",
        "| hist | unique rows / step | valid history items / step | bytes / step | dense "
        "GFLOP / step | floor ms | ours / floor | baseline / floor |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for hist, roof in roofs.items():
        ours, base = results[hist]
        ratio = [f"{r.median_s / roof.floor_s:.1f}x" if r.ok else "n/a" for r in (ours, base)]
        lines.append(
            f"| {hist} | {roof.unique_rows:,.0f} | {roof.valid_positions:,.0f} "
            f"| {roof.nbytes / 2**20:,.1f} MiB | {roof.flops / 1e9:,.1f} "
            f"| {roof.floor_s * 1e3:.2f} | {ratio[0]} | {ratio[1]} |"
        )
    return "\n".join(lines)


def side_extra(r: SideResult, roof: Roofline, batch: int) -> dict[str, Any]:
    """One side's numbers for the JSON row's ``extra``."""
    if not r.ok:
        return {"error": r.error}
    return {
        "median_ms": r.median_s * 1e3,
        "mean_ms": r.mean_s * 1e3,
        "max_ms": r.max_s * 1e3,
        "samples_per_s": batch / r.mean_s,
        "split_ms": {p: v * 1e3 for p, v in r.phases.items()},
        "gpu_idle_share": None if r.busy_share is None else 1 - r.busy_share,
        "peak_gpu_bytes": r.peak_bytes,
        "auc": r.auc,
        "floor_ratio": r.median_s / roof.floor_s,
        "slow_steps": r.stalls,
    }


def json_rows(
    results: Mapping[int, tuple[SideResult, SideResult]],
    roofs: Mapping[int, Roofline],
    cfg: Settings,
    bandwidth: float,
    best: float,
) -> list[Measurement]:
    rows = []
    for hist, (ours, base) in results.items():
        roof = roofs[hist]
        extra = {
            "ours": side_extra(ours, roof, cfg.batch),
            "baseline": side_extra(base, roof, cfg.batch),
            "best_auc": best,
            "roofline": asdict(roof),
        }
        notes = "median of the unsynced steps; floor and split in extra"
        if ours.ok:
            rows.append(
                measurement(
                    f"DIN step, hist {hist}",
                    ours.median_s,
                    base.median_s if base.ok else None,
                    baseline=BASELINE,
                    nbytes=int(roof.nbytes),
                    bandwidth=bandwidth,
                    notes=notes if base.ok else f"baseline: {base.error}",
                    extra=extra,
                )
            )
        else:
            rows.append(
                Measurement(
                    f"DIN step, hist {hist}",
                    None,
                    "ms",
                    baseline=BASELINE,
                    baseline_value=base.median_s * 1e3 if base.ok else None,
                    notes=f"ours: {ours.error}",
                    extra=extra,
                )
            )
        if ours.ok and base.ok and ours.phases and base.phases:
            for p in PHASES:
                rows.append(
                    measurement(
                        f"hist {hist}: {p} per step (synced split)",
                        ours.phases[p],
                        base.phases[p],
                        baseline=BASELINE,
                    )
                )
    return rows


def workload(cfg: Settings) -> dict[str, Any]:
    """The resolved settings, as the JSON's workload."""
    out = {k: v for k, v in vars(cfg).items() if k not in ("device", "schedule", "data_dir")}
    out |= asdict(cfg.schedule)
    out["device"] = str(cfg.device)
    out["hists"] = list(cfg.hists)
    return out


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--hist", type=int, nargs="+", help="history lengths (default 1000)")
    p.add_argument("--hist-mean", type=float, help="mean history length in the data (200)")
    p.add_argument("--features", type=int, help="id features (26)")
    p.add_argument("--ids", type=int, help="ids per feature (2,000,000)")
    p.add_argument("--dim", type=int, default=64, help="embedding width")
    p.add_argument("--batch", type=int, help="rows per step (8192)")
    p.add_argument("--warmup", type=int, help="steps before timing (20)")
    p.add_argument("--steps", type=int, help="timed steps, no sync (200)")
    p.add_argument("--profile-steps", type=int, help="steps profiled for the idle share (5)")
    p.add_argument("--split-steps", type=int, help="steps synced at every phase (20)")
    p.add_argument("--no-split", action="store_true", help="no synced split steps")
    p.add_argument("--eval-rows", type=int, help="evaluation rows (262,144)")
    p.add_argument("--num-workers", type=int, help="the baseline's DataLoader workers (4)")
    p.add_argument("--reader-threads", type=int, help="ColumnReader decoding threads (4)")
    p.add_argument("--reader-worker", choices=("auto", "thread", "process"), default="auto")
    p.add_argument("--sparse-lr", type=float, default=0.01)
    p.add_argument("--dense-lr", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="write the data here and reuse it on later runs")
    p.add_argument("--prepare-only", action="store_true", help="write the data and stop")
    p.add_argument(
        "--gen-workers", type=int, help="processes writing the data (the CPU count, at most 16)"
    )
    p.add_argument(
        "--baseline-bf16", action="store_true", help="bf16 autocast for the baseline's tower"
    )
    p.add_argument(
        "--deferred-checks", action="store_true", help="SparseAdam(deferred_checks=True)"
    )
    p.add_argument("--capacity", type=int, help="TableConfig capacity hint (rows per table)")
    p.add_argument(
        "--history",
        choices=("table", "jagged", "padded"),
        default="table",
        help="our history feature: jagged rows read from the table by the attention kernels "
        "(gather=False), jagged gathered rows, or padded to --hist",
    )
    add_json_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = settings_from(args)
    device = cfg.device
    s = cfg.schedule
    say(
        f"e2e: DIN on {device_name(device)}: {cfg.features} id features x {cfg.ids:,} ids, "
        f"dim {cfg.dim}, hist {', '.join(map(str, cfg.hists))}, batch {cfg.batch}, steps "
        f"{s.warmup} warmup + {s.steps} timed + {s.profile} profiled + {s.split} split"
    )
    if args.prepare_only and cfg.data_dir is None:
        raise SystemExit("e2e: --prepare-only needs --data-dir (where later runs find the data)")
    data = prepare_data(cfg)
    try:
        if not args.prepare_only:
            measure(cfg, data, args.json)
    finally:
        if cfg.data_dir is None:
            shutil.rmtree(Path(data.eval).parent, ignore_errors=True)


def measure(cfg: Settings, data: Data, json_path: str | None) -> None:
    """Both sides at every history length; print the tables, write the JSON."""
    device, s = cfg.device, cfg.schedule
    bandwidth = copy_bandwidth(device, None if device.type == "cuda" else 64 * 2**20)
    flop_rate, matmul = matmul_rate(device)
    say(
        f"device: copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write), {matmul} "
        f"{flop_rate / 1e12:,.2f} TFLOP/s"
    )
    roofs: dict[int, Roofline] = {}
    results: dict[int, tuple[SideResult, SideResult]] = {}
    for hist in cfg.hists:
        roof = roofs[hist] = roofline(cfg, data, hist, bandwidth, flop_rate)
        say(
            f"hist {hist}: {roof.unique_rows:,.0f} unique rows and {roof.valid_positions:,.0f} "
            f"history items per step; floor {roof.floor_s * 1e3:.2f} ms"
        )
        ours = run_side(run_ours, "RecStack", cfg, data, hist)
        base = run_side(run_plain, "plain PyTorch", cfg, data, hist)
        results[hist] = (ours, base)
    title = (
        f"DIN training step end to end ({cfg.features} x {cfg.ids:,} ids, dim {cfg.dim}, "
        f"batch {cfg.batch}, median of {s.steps} steps)"
    )
    report = Report(title, device_name(device), bandwidth)
    for hist, (ours, base) in results.items():
        if ours.ok and base.ok:
            report.add(
                Row(
                    f"DIN step, hist {hist}",
                    ours.median_s,
                    base.median_s,
                    int(roofs[hist].nbytes),
                    baseline=BASELINE,
                )
            )
    print()
    print(report.markdown())
    print()
    split = f"split over {s.split} synced steps" if s.split else "no split (--no-split)"
    print(
        f"Step times over {s.steps} unsynced steps, {split}; GPU idle over {s.profile} "
        f"profiled steps; best AUC on the evaluation file {data.best_auc:.4f}"
    )
    print()
    print(split_table(results, cfg))
    print()
    print(roofline_table(roofs, results, bandwidth, flop_rate))
    for hist, sides in results.items():
        for side in sides:
            if side.stalls:
                print(f"\nhist {hist}, {side.name}: steps above 2x the median")
                print("\n".join(f"  {line}" for line in side.stalls))
    result = new_result(
        "e2e",
        title,
        device,
        workload(cfg),
        copy_bandwidth=bandwidth,
        rows=json_rows(results, roofs, cfg, bandwidth, data.best_auc),
    )
    result.notes = (
        "Step times: host timestamps at each step's end, no device sync inside the window. "
        "Split: a device sync at every phase boundary. GPU idle: torch.profiler (CUDA "
        "activity), 1 - union of kernel/memcpy/memset time over wall time."
    )
    result.extra = {
        "best_auc": data.best_auc,
        "matmul_flops_per_s": flop_rate,
        "matmul": matmul,
        "data_rows": data.rows,
    }
    save(result, json_path)


if __name__ == "__main__":
    main()
