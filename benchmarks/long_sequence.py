"""DIN trained on very long user behaviour histories: RecStack against plain PyTorch.

Workload: click prediction with DIN over items from a vocabulary of ``--items`` ids
(10,000,000), drawn on the device from a Zipf-like law (a continuous power law of exponent
``--zipf`` over the ranks, so a few items are hot). Each of the ``--batch`` (64) rows has a
history of exactly ``L`` ids (with ``--ragged``, lengths uniform in ``[L/2, L]``), one
candidate item and one click label, for ``L`` in ``--lengths`` (10,000, 100,000 and
1,000,000). Embeddings are ``--dim`` (32) wide. ``--batches`` (2) batches are generated on
the device before a side runs, from the same seed for both sides (the same ids), and cycled.

* Ours, built from the public API: ``recstack.pipelines.models.DIN`` with
  ``DINConfig(attention_hidden=[80, 40], mlp_hidden=[200, 80], mlp_activation="relu")``
  (the fused target attention, the default), one dynamic ``TableConfig`` item table read by
  the candidate (sum pooling, one id) and by the history as a jagged feature
  (``pooling="none"`` without ``max_len``: no padding, no host sync in the attention).
  With ``--rows table`` (the default) the history feature has ``gather=False``: the
  attention kernels read each id's row from the table, so the batch's ``[N, D]`` history
  rows are never gathered or kept for the backward; ``--rows gathered`` hands the
  attention the gathered rows instead;
  ``recstack.sparse_optim.SparseAdam`` for the rows, ``torch.optim.AdamW`` for the dense
  layers. The batch is ``{"sparse": KeyedJaggedTensor, "label": ...}``.
* Plain PyTorch, the DIN a user writes: ``nn.Embedding(items, dim, sparse=True)``, the
  histories padded to ``[B, L]`` with a bool mask, the attention MLP (the same sizes,
  sigmoid) over ``[q, k, q - k, q * k]`` on ``[B, L, 4D]``, the masked weighted sum, the
  same MLP; ``torch.optim.SparseAdam`` for the table, ``torch.optim.AdamW`` for the rest.

Both sides run their forward under bf16 autocast on CUDA (fp32 on the CPU) and train on
BCE-with-logits. A step is the forward, the loss, the backward and both optimizers' steps.

What is timed: per side and length, ``--warmup`` (2) steps, then ``--steps`` (5) steps,
each followed by a device sync and timed by the wall clock (our embedding lookup reads the
count of unique ids from the device, so host time is part of a step): median, mean and
max. samples/s is the batch over the median step. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (the statistics are reset after
the warm-up, which inserts every id of the cycled batches into our table when ``--warmup``
is at least ``--batches``), so it counts the model, the tables, the optimizer state and
the side's input batches. Everything is freed (``del``, ``gc.collect``,
``torch.cuda.empty_cache``) between sides and lengths. For ours, the peak divided by the
batch's history ids (bytes per id) shows whether memory grows with the ids and not with
``B * L_max``.

A side that fails is reported, not fatal: ``torch.cuda.OutOfMemoryError`` (or an error
saying out of memory) as "out of memory", an error about int32 indexing (``int32``,
``2**31``, ``numel``) as an int32 index overflow, anything else with its message. Plain
PyTorch is expected to run out of memory at some length (the ``[B, L, 4D]`` input of the
attention MLP alone is ``B * L * 128 * 4`` bytes in fp32 at ``D = 32``): the first length
where it fails is printed and stored in the JSON result's ``extra``.

MBU counts a lower bound of the bytes a step must move, ``N * (2 * D * 4 + 8)`` for the
``N`` history ids of a batch: each history row read once in the forward (fp32), its
gradient written once in the backward (fp32) and each id read once (int64). Padding, the
optimizer's updates, the attention MLP's intermediates and the candidates are not counted.

The target: histories of 1,000,000 ids train at batch >= 64 on one H200, and our peak
memory grows with the number of ids (bytes per id flat as ``L`` grows).

    python benchmarks/long_sequence.py                    # on a GPU
    python benchmarks/long_sequence.py --ragged --json    # ragged lengths, results file
    python benchmarks/long_sequence.py --device cpu       # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import cycle

import torch
import torch.nn.functional as F
from _harness import Report, Row, copy_bandwidth, device_name, sized_for_device, synchronize
from _results import Measurement, add_json_option, measurement, report_result, save
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import FeatureConfig, TableConfig
from recstack.pipelines.models import DIN, DINConfig
from recstack.sparse_optim import SparseAdam

ATTENTION_HIDDEN = (80, 40)
MLP_HIDDEN = (200, 80)
BASELINE = "plain PyTorch: nn.Embedding(sparse=True), padded [B, L] + mask, SparseAdam"
OURS, PLAIN = "RecStack", "plain PyTorch"
_GPU_SIZES = {"lengths": [10_000, 100_000, 1_000_000], "batch": 64, "items": 10_000_000, "steps": 5}
_CPU_SIZES = {"lengths": [50, 200], "batch": 4, "items": 1000, "steps": 2}
# Words in a RuntimeError that mean a size passed what int32 indexing can address.
_INT32_WORDS = ("int32", "2**31", "2^31", "numel")
_OOM_WORDS = ("out of memory", "can't allocate memory")


# ------------------------------------------------------------------------------ the data


def zipf_ids(
    shape: tuple[int, ...], items: int, exponent: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """int64 ids in ``[0, items)``, id ``r`` about as likely as ``(r + 1) ** -exponent``:
    the inverse CDF of a continuous power law on ``[1, items + 1)``, drawn on ``device``."""
    x = torch.rand(shape, generator=gen, device=device, dtype=torch.float64)
    if abs(exponent - 1.0) < 1e-9:
        x.mul_(math.log1p(items)).exp_()
    else:
        a = 1.0 - exponent
        x.mul_((items + 1.0) ** a - 1.0).add_(1.0).pow_(1.0 / a)
    ids = x.floor_().to(torch.int64)
    del x
    return ids.sub_(1).clamp_(0, items - 1)


@dataclass
class RawBatch:
    """One batch as drawn: the ``[B, L]`` history ids (valid ones first), their lengths,
    the candidates and the labels, on the device."""

    history: torch.Tensor
    lengths: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor


def draw_batch(args: argparse.Namespace, length: int, index: int, device: torch.device) -> RawBatch:
    """Batch ``index`` of history length ``length``; the same on every call (both sides
    train on the same ids)."""
    gen = torch.Generator(device=device).manual_seed(1000 * length + index)
    b = args.batch
    history = zipf_ids((b, length), args.items, args.zipf, gen, device)
    if args.ragged:
        lengths = torch.randint(length // 2, length + 1, (b,), generator=gen, device=device)
    else:
        lengths = torch.full((b,), length, dtype=torch.int64, device=device)
    item = zipf_ids((b,), args.items, args.zipf, gen, device)
    label = torch.randint(0, 2, (b,), generator=gen, device=device).float()
    return RawBatch(history, lengths, item, label)


def jagged_batch(raw: RawBatch) -> tuple[dict[str, object], int]:
    """Our batch dict (candidate and history in one ``KeyedJaggedTensor``) and the number
    of history ids in it. Runs before the timing: reading ``N`` is a host sync."""
    b, length = raw.history.shape
    if raw.lengths.min().item() == length:
        history = raw.history.reshape(-1)
    else:
        valid = torch.arange(length, device=raw.lengths.device) < raw.lengths[:, None]
        history = raw.history[valid]
    n = history.numel()
    kjt = KeyedJaggedTensor(
        ["item", "history"],
        torch.cat([raw.item, history]),
        lengths=torch.cat([torch.ones_like(raw.lengths), raw.lengths]),
        length_per_key=[b, n],  # known here: the lookup need not read it from the device
    )
    return {"sparse": kjt, "label": raw.label}, n


def padded_batch(raw: RawBatch) -> dict[str, torch.Tensor]:
    """The plain side's batch: ``[B, L]`` ids (padding past a row's length, id 0 as a
    user's pad) and the ``[B, L]`` mask."""
    length = raw.history.shape[1]
    mask = torch.arange(length, device=raw.lengths.device) < raw.lengths[:, None]
    history = raw.history.masked_fill(~mask, 0)
    return {"item": raw.item, "history": history, "mask": mask, "label": raw.label}


# ------------------------------------------------------------------------------ the models


class PlainDIN(nn.Module):
    """DIN as a user writes it in plain PyTorch, on a padded history and its mask."""

    def __init__(self, items: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.item = nn.Embedding(items, dim, sparse=True, device=device)
        h1, h2 = ATTENTION_HIDDEN
        self.attention = nn.Sequential(
            nn.Linear(4 * dim, h1), nn.Sigmoid(), nn.Linear(h1, h2), nn.Sigmoid(), nn.Linear(h2, 1)
        ).to(device)
        m1, m2 = MLP_HIDDEN
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, m1), nn.ReLU(), nn.Linear(m1, m2), nn.ReLU(), nn.Linear(m2, 1)
        ).to(device)

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.attention.parameters(), *self.mlp.parameters()]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        q = self.item(batch["item"])  # [B, D]
        k = self.item(batch["history"])  # [B, L, D]
        qe = q[:, None, :].expand_as(k)
        scores = self.attention(torch.cat([qe, k, qe - k, qe * k], dim=-1)).squeeze(-1)
        weights = scores.float().masked_fill(~batch["mask"], 0.0)
        interest = torch.einsum("bl,bld->bd", weights, k.float())
        return self.mlp(torch.cat([interest, q.float()], dim=-1)).squeeze(-1).float()


def training_step(
    model: nn.Module,
    sparse: torch.optim.Optimizer,
    dense: torch.optim.Optimizer,
    device: torch.device,
) -> Callable[[dict], None]:
    """One step of either side: the forward (bf16 autocast on CUDA), BCE on the click
    label, the backward, then the sparse and dense optimizer steps."""
    bf16 = device.type == "cuda"

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)
        F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
        sparse.step()
        sparse.zero_grad()
        dense.step()
        dense.zero_grad(set_to_none=True)

    return step


def build_ours(args: argparse.Namespace, device: torch.device) -> Callable[[dict], None]:
    """Our DIN's training step over one batch dict."""
    tables = [TableConfig("item", dim=args.dim, capacity=args.capacity)]
    features = [
        FeatureConfig("item", "item"),
        # Jagged: every id, no padding; with --rows table the kernels read each id's row
        # from the table, so the [N, dim] rows are never gathered.
        FeatureConfig("history", "item", pooling="none", gather=args.rows == "gathered"),
    ]
    config = DINConfig(
        item_feature="item",
        history_feature="history",
        attention_hidden=list(ATTENTION_HIDDEN),
        mlp_hidden=list(MLP_HIDDEN),
        mlp_activation="relu",
    )
    model = DIN(config, tables, features, device=device)
    if model.max_len is not None or not model.fused:
        raise RuntimeError("the history should be jagged and the attention fused")
    sparse = SparseAdam(model.embeddings.sparse_parameters(), lr=1e-3)
    dense = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return training_step(model, sparse, dense, device)


def build_plain(args: argparse.Namespace, device: torch.device) -> Callable[[dict], None]:
    """The plain-PyTorch DIN's training step over one padded batch dict."""
    model = PlainDIN(args.items, args.dim, device)
    sparse = torch.optim.SparseAdam([model.item.weight], lr=1e-3)
    dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-3)
    return training_step(model, sparse, dense, device)


# ------------------------------------------------------------------------------ measuring


@dataclass
class SideRun:
    """One side at one length: its step times (seconds), peak bytes and status."""

    side: str
    length: int
    status: str = "ok"
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    history_ids: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def failure_status(exc: BaseException) -> str:
    """How a failed run is reported: out of memory, an int32 index overflow, or the error."""
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else ""
    lower = text.lower()
    if isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(w in lower for w in _OOM_WORDS)
    ):
        return "out of memory"
    if isinstance(exc, RuntimeError) and any(w in lower for w in _INT32_WORDS):
        return f"int32 index overflow: {first}"
    return f"error: {type(exc).__name__}: {first}"


def free_memory(device: torch.device) -> None:
    """Drop what the last run left, so the next run's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(
    step: Callable[[dict], None], batches: list, device: torch.device, warmup: int, steps: int
) -> tuple[list[float], int | None]:
    """Wall-clock seconds of ``steps`` synchronized steps after ``warmup`` ones, cycling
    ``batches``, and the peak bytes allocated during the timed steps (CUDA only)."""
    feed: Iterator = cycle(batches)
    for _ in range(warmup):
        step(next(feed))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        batch = next(feed)
        t0 = time.perf_counter()
        step(batch)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def _measure_ours(args: argparse.Namespace, length: int, device: torch.device, run: SideRun):
    torch.manual_seed(0)
    batches, counts = [], []
    for i in range(args.batches):
        batch, n = jagged_batch(draw_batch(args, length, i, device))
        batches.append(batch)
        counts.append(n)
    run.history_ids = round(statistics.mean(counts))
    step = build_ours(args, device)
    run.times, run.peak = time_steps(step, batches, device, args.warmup, args.steps)


def _measure_plain(args: argparse.Namespace, length: int, device: torch.device, run: SideRun):
    torch.manual_seed(0)
    batches, counts = [], []
    for i in range(args.batches):
        raw = draw_batch(args, length, i, device)
        counts.append(int(raw.lengths.sum()))
        batches.append(padded_batch(raw))
        del raw
    run.history_ids = round(statistics.mean(counts))
    step = build_plain(args, device)
    run.times, run.peak = time_steps(step, batches, device, args.warmup, args.steps)


def measure(side: str, args: argparse.Namespace, length: int, device: torch.device) -> SideRun:
    """One side at one length; a failure becomes the run's status, never an exception."""
    run = SideRun(side, length)
    measure_side = _measure_ours if side == OURS else _measure_plain
    try:
        # Everything the side allocates lives in measure_side's frame: gone once it returns
        # or once the exception (and its traceback, holding that frame) is dropped below.
        measure_side(args, length, device, run)
    except Exception as exc:  # a failing side is a result to report
        run.status = failure_status(exc)
        run.times, run.peak = [], None
        if run.status.startswith("error"):
            traceback.print_exc()
    free_memory(device)
    line = f"  {side}, history {length:,}: {run.status}"
    if run.ok:
        line += f", median step {run.median * 1e3:.1f} ms"
        if run.peak is not None:
            line += f", peak {run.peak / 2**30:.2f} GiB"
    print(line, flush=True)
    return run


# ------------------------------------------------------------------------------ reporting


def workload_name(args: argparse.Namespace, length: int) -> str:
    shape = f"lengths uniform in [{length // 2:,}, {length:,}]" if args.ragged else "all full"
    rows = "rows read from the table" if args.rows == "table" else "rows gathered"
    return f"DIN train step, history {length:,} ({shape}), batch {args.batch}, {rows}"


def nbytes_lower_bound(history_ids: int, dim: int) -> int:
    """Each history row read (fp32) and its gradient written (fp32), each id read (int64)."""
    return history_ids * (2 * dim * 4 + 8)


def side_extra(prefix: str, run: SideRun, batch: int) -> dict[str, float]:
    if not run.ok:
        return {}
    extra = {
        f"{prefix}_samples_per_s": batch / run.median,
        f"{prefix}_step_ms_mean": statistics.mean(run.times) * 1e3,
        f"{prefix}_step_ms_max": max(run.times) * 1e3,
    }
    if run.peak is not None:
        extra[f"{prefix}_peak_gib"] = run.peak / 2**30
    return extra


def table_lines(runs: list[SideRun], batch: int) -> list[str]:
    lines = [
        "| length | side | samples/s | step ms median | mean | max | peak GiB | status |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        if r.ok:
            cells = [
                f"{batch / r.median:,.1f}",
                f"{r.median * 1e3:,.1f}",
                f"{statistics.mean(r.times) * 1e3:,.1f}",
                f"{max(r.times) * 1e3:,.1f}",
                "n/a" if r.peak is None else f"{r.peak / 2**30:.2f}",
            ]
        else:
            cells = ["–"] * 5
        status = r.status.replace("|", "/")
        lines.append(f"| {r.length:,} | {r.side} | {' | '.join(cells)} | {status} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", help="history lengths")
    parser.add_argument("--batch", type=int, help="rows per batch (64; 4 on a CPU)")
    parser.add_argument("--dim", type=int, default=32, help="embedding dim")
    parser.add_argument("--items", type=int, help="vocabulary (10,000,000; 1000 on a CPU)")
    parser.add_argument("--zipf", type=float, default=1.1, help="exponent of the id law")
    parser.add_argument("--ragged", action="store_true", help="lengths uniform in [L/2, L]")
    parser.add_argument("--batches", type=int, default=2, help="batches generated and cycled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--steps", type=int, help="timed steps per side (5; 2 on a CPU)")
    parser.add_argument("--capacity", type=int, help="our table's capacity hint (rows)")
    parser.add_argument(
        "--rows",
        choices=["table", "gathered"],
        default="table",
        help="our attention reads the history rows from the table (FeatureConfig(gather="
        "False)) or from the lookup's gathered [N, dim] rows",
    )
    add_json_option(parser)
    args = parser.parse_args()
    device = sized_for_device(args, _GPU_SIZES, _CPU_SIZES)

    bandwidth = copy_bandwidth(device)
    free_memory(device)
    title = (
        f"DIN with long histories, batch {args.batch}, {args.items:,} items x {args.dim}"
        f"{', ragged lengths' if args.ragged else ''}"
    )
    report = Report(title, device_name(device), bandwidth)
    print(f"{report.device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    if args.warmup < args.batches:
        print("  note: --warmup < --batches, so timed steps also insert new ids", flush=True)

    runs: list[SideRun] = []
    rows: dict[str, Measurement | None] = {}  # by workload, in length order
    only_ours: list[Measurement] = []
    for length in args.lengths:
        # Ours first: should the baseline fail in a way that breaks the device, the
        # shorter lengths' results are already in.
        ours = measure(OURS, args, length, device)
        plain = measure(PLAIN, args, length, device)
        runs += [ours, plain]
        name = workload_name(args, length)
        history_ids = ours.history_ids or plain.history_ids
        nbytes = nbytes_lower_bound(history_ids, args.dim)
        extra = {"history_ids": float(history_ids)}
        extra |= side_extra("ours", ours, args.batch) | side_extra("baseline", plain, args.batch)
        if ours.ok and ours.peak is not None and history_ids:
            extra["ours_bytes_per_history_id"] = ours.peak / history_ids
        if ours.ok and plain.ok:
            report.add(Row(name, ours.median, plain.median, nbytes, baseline=BASELINE, extra=extra))
            rows[name] = None  # taken from the report
        elif ours.ok:
            notes = (
                "baseline out of memory"
                if plain.status == "out of memory"
                else f"baseline failed: {plain.status}"
            )
            rows[name] = measurement(
                name, ours.median, None, baseline=BASELINE, nbytes=nbytes, bandwidth=bandwidth,
                notes=notes, extra=extra,
            )  # fmt: skip
            only_ours.append(rows[name])
        else:
            base_ms = plain.median * 1e3 if plain.ok else None
            rows[name] = Measurement(
                name, None, "ms", baseline=BASELINE, baseline_value=base_ms,
                notes=f"ours failed: {ours.status}; baseline: {plain.status}", extra=extra,
            )  # fmt: skip

    print()
    print("\n".join(table_lines(runs, args.batch)))
    print()
    for r in runs:
        if r.side == OURS and r.ok and r.peak is not None and r.history_ids:
            print(
                f"  {OURS}, history {r.length:,}: peak {r.peak / 2**30:.2f} GiB over "
                f"{r.history_ids:,} history ids = {r.peak / r.history_ids:,.0f} bytes per id"
            )
    if device.type != "cuda":
        print(f"  {OURS}: peak memory and bytes per history id are measured on CUDA only")
    fails_at = next((r for r in runs if r.side == PLAIN and not r.ok), None)
    if fails_at is None:
        print(f"  {PLAIN} ran at every length")
    else:
        print(f"  {PLAIN} fails at history {fails_at.length:,}: {fails_at.status}")
    ours_fail = [r for r in runs if r.side == OURS and not r.ok]
    for r in ours_fail:
        print(f"  {OURS} FAILED at history {r.length:,}: {r.status}")
    print()
    print(report.markdown())
    for row in only_ours:
        print(f"| {row.name} | {row.ours:.3f} | {row.notes} | {BASELINE} | | | |")

    result = report_result(report, "long_sequence", device, args)
    from_report = {row.name: row for row in result.rows}
    result.rows = [row if row is not None else from_report[name] for name, row in rows.items()]
    result.extra = {
        "baseline_fails_at": None if fails_at is None else fails_at.length,
        "baseline_failure": None if fails_at is None else fails_at.status,
        "ours_fails_at": ours_fail[0].length if ours_fail else None,
    }
    save(result, args.json)


if __name__ == "__main__":
    main()
