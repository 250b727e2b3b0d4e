"""Checkpoint saver: a 10M-row dynamic embedding table with Adam state + a 50M-param MLP.

The workload (defaults, for a GPU host): one ``EmbeddingCollection`` table of ``--rows``
ids x ``--dim`` fp32 whose value store carries the two Adam moments as companions
(``exp_avg``, ``exp_avg_sq``, adopted by ``recstack.sparse_optim.SparseAdam``) and its
per-row metadata (last-seen step, hit count): 792 bytes an id at dim 64, about 7.9 GB;
plus a dense MLP of about ``--dense-params`` parameters with a ``torch.optim.AdamW`` state
(12 bytes a parameter, about 0.6 GB). Everything is saved with
``Checkpointer(dir).save(step, model=holder, sparse=sparse_adam, dense=adamw)``.

Rows, each against what a user would write instead, measured in the same run:

1. **Blocking save**: bytes written / time, against ONE ``safetensors.torch.save_file``
   call writing the same tensors (the single-call limit), fsynced like ours; the user's
   gather of the table and the dense state into one dict of CPU tensors is timed apart and
   also added to the baseline in a second row. Then ``Checkpointer(durable=False)``
   against the same call without its fsync: both at page-cache speed, where the single
   call's one thread is the limit rather than the disk.
2. **Async save**: the training stall (until ``save(blocking=False)`` returns) and the
   total (until ``wait()`` returns), the first save and the steady state, against the
   blocking save. On a GPU twice: with the snapshot staged in spare GPU memory (the
   default) and in host memory only (``gpu_snapshot_fraction=0``: the first save copies
   to ordinary memory and pins buffers behind it, the next reuse them).
3. **Delta save** after 1% of the rows changed (re-imported with new values): the table
   alone and with the whole dense state, against 1% of the full save's bytes and time.
4. **Load** into a fresh model and optimizers, against ``safetensors.torch.load_file`` of
   the single-call file plus importing its rows with ``import_collection_chunk``.

The "disk BW" column is a save's bytes / time / the raw disk write bandwidth measured in
the same run (one thread, ``os.write`` of the same number of bytes from one preallocated
host buffer in 64 MiB blocks, then ``fsync``). Writes land in the page cache; every
timing includes the ``fsync`` of what it wrote (the page cache cannot be dropped without
root), and ``os.sync()`` runs before each timing so earlier writes are not flushed inside
it. Checkpoints are deleted as soon as no later phase needs them and the whole work
directory at the end, also on error; the run needs about twice the checkpoint's size free.

    python benchmarks/saver.py                       # GPU: the full workload
    python benchmarks/saver.py --device cpu --rows 1000000 --dense-params 5000000
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _harness import Report, Row, device_name, synchronize
from _results import add_json_option, report_result, save
from torch import nn

from recstack.core import SparseGrad
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.embedding_engine.state import (
    collection_state_metadata,
    export_collection_chunks,
    import_collection_chunk,
)
from recstack.saver import Checkpointer
from recstack.saver.files import fsync_path
from recstack.sparse_optim import SparseAdam

_BLOCK = 64 << 20  # bytes per os.write of the raw bandwidth test (the saver's block size)
_KEY_MULT = -7046029254386353131  # odd: arange(n) * it is n distinct int64 ids (mod 2**64)
_SLOTS = ("exp_avg", "exp_avg_sq")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f} GB"


# ----------------------------------------------------------------------------- report


@dataclass
class SaverReport(Report):
    """The harness's report; ``bandwidth`` is the raw disk write bandwidth (bytes/s)."""

    disk: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row, *, disk: bool = False) -> Row:
        """Add ``row`` with its GB/s (bytes over time, ours and the baseline's) and, for a
        write (``disk``), its fraction of the raw disk write bandwidth."""
        x = row.extra
        base_bytes = x.get("baseline_bytes", row.nbytes)
        if row.nbytes:
            x["gb_per_s"] = row.nbytes / row.ours_s / 1e9
            x["baseline_gb_per_s"] = base_bytes / row.baseline_s / 1e9
            if disk:
                x["disk_fraction"] = x["gb_per_s"] * 1e9 / self.bandwidth
                x["disk_fraction_baseline"] = x["baseline_gb_per_s"] * 1e9 / self.bandwidth
        return super().add(row)

    def markdown(self) -> str:
        lines = [
            f"**{self.title}** on {self.device}, {self.date}; {self.versions}; "
            f"raw disk write bandwidth {self.bandwidth / 1e9:.2f} GB/s (one thread, os.write "
            f"+ fsync, 64 MiB blocks); {self.disk}; `{self.command}`",
            "",
            *[f"- {n}" for n in self.notes],
            "",
            "| workload | ours (ms) | baseline (ms) | baseline | speedup | GB/s ours "
            "| GB/s baseline | disk BW ours | disk BW baseline | notes |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.rows:
            x = r.extra
            cells = [
                f"{x['gb_per_s']:.2f}" if "gb_per_s" in x else "",
                f"{x['baseline_gb_per_s']:.2f}" if "baseline_gb_per_s" in x else "",
                f"{x['disk_fraction']:.0%}" if "disk_fraction" in x else "",
                f"{x['disk_fraction_baseline']:.0%}" if "disk_fraction_baseline" in x else "",
            ]
            lines.append(
                f"| {r.workload} | {r.ours_s * 1e3:,.1f} | {r.baseline_s * 1e3:,.1f} "
                f"| {r.baseline} | {r.speedup():.2f}x | {' | '.join(cells)} | {r.notes} |"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- workload


class Holder(nn.Module):
    """The model a trainer saves: the embedding collection and the dense tower."""

    def __init__(self, ec: EmbeddingCollection, mlp: nn.Module) -> None:
        super().__init__()
        self.ec = ec
        self.mlp = mlp


def make_mlp(dim: int, params: int, device: torch.device) -> nn.Sequential:
    """Three hidden square layers sized so the MLP has about ``params`` parameters."""
    width = max(64, round(math.sqrt(params / 3) / 64) * 64)
    layers: list[nn.Module] = [nn.Linear(dim, width), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).to(device)


def companion_metadata(ec: EmbeddingCollection, dim: int) -> dict:
    """The collection's metadata declaring the two Adam moments as companion slots."""
    meta = collection_state_metadata(ec)
    for slot in _SLOTS:
        meta["tables"]["item"]["slots"][slot] = {
            "dtype": "float32", "shape": [dim], "companion": True, "init": 0.0,
        }  # fmt: skip
    return meta


def new_collection(dim: int, device: torch.device) -> EmbeddingCollection:
    return EmbeddingCollection(
        [TableConfig("item", dim=dim)], [FeatureConfig("f", "item")], device=device
    )


@dataclass
class Model:
    holder: Holder
    ec: EmbeddingCollection
    sparse: SparseAdam
    dense: torch.optim.AdamW

    def objects(self) -> dict[str, object]:
        return {"model": self.holder, "sparse": self.sparse, "dense": self.dense}


def fresh_model(dim: int, dense_params: int, device: torch.device) -> Model:
    """An empty collection, a new MLP and their optimizers (the load target)."""
    ec = new_collection(dim, device)
    mlp = make_mlp(dim, dense_params, device)
    holder = Holder(ec, mlp)
    sparse = SparseAdam([ec.physical_tables["item"].values], lr=1e-3)
    return Model(holder, ec, sparse, torch.optim.AdamW(mlp.parameters(), lr=1e-3))


def build(args, device: torch.device, gen: torch.Generator) -> tuple[Model, torch.Tensor]:
    """The trained-looking model: the table filled chunk by chunk (no forwards), one Adam
    step on a few rows so the sparse optimizer holds the companions as its slots, and
    one AdamW step so the dense moments exist. Returns the model and the table's ids."""
    n, dim = args.rows, args.dim
    model = fresh_model(dim, args.dense_params, device)
    ec = model.ec
    meta = companion_metadata(ec, dim)
    keys = torch.arange(n, dtype=torch.int64, device=device) * _KEY_MULT
    t0 = time.perf_counter()
    for start in range(0, n, args.chunk_rows):
        k = keys[start : start + args.chunk_rows]
        m = k.numel()
        slots = {
            "values": torch.randn(m, dim, generator=gen, device=device) * 0.1,
            "exp_avg": torch.randn(m, dim, generator=gen, device=device) * 1e-3,
            "exp_avg_sq": torch.rand(m, dim, generator=gen, device=device) * 1e-6,
        }
        import_collection_chunk(ec, "item", k, slots, metadata=meta)
        del slots
    synchronize(device)
    log(f"table: {n:,} ids x {dim} imported in {time.perf_counter() - t0:.1f} s")
    values = ec.physical_tables["item"].values
    assert set(_SLOTS) <= set(values.companions), "the moments are not companions"
    rows = torch.arange(min(n, 1024), device=device)
    grad = torch.randn(rows.numel(), dim, generator=gen, device=device) * 1e-3
    model.sparse.step(grads={values: SparseGrad(rows, grad, is_coalesced=True)})
    for spec in _SLOTS:  # the optimizer's slots are the table's companions, not copies
        assert model.sparse.state[values][spec] is values.companions[spec].store
    for p in model.holder.mlp.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    model.dense.step()
    model.dense.zero_grad(set_to_none=True)
    synchronize(device)
    return model, keys


def dense_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The MLP's parameters and AdamW's state as named tensors (the user's flattening)."""
    out = {f"mlp.{k}": v for k, v in model.holder.mlp.state_dict().items()}
    for i, st in model.dense.state_dict()["state"].items():
        out.update((f"adamw.{i}.{k}", v) for k, v in st.items() if isinstance(v, torch.Tensor))
    return out


def lookup(ec: EmbeddingCollection, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Values, moments and metadata of ``keys`` (which must all be held), on the host."""
    phys = ec.physical_tables["item"]
    # "item" is the physical table's only logical table: its hash tag is 0 (the default).
    rows = phys.hash_table.find(keys.to(ec.device), check_keys=False)
    assert bool((rows >= 0).all()), "an id is missing from the table"
    out = {"values": phys.values.gather_rows(rows, check_bounds=False)}
    for slot in _SLOTS:
        out[slot] = phys.values.companions[slot].store.gather_rows(rows, check_bounds=False)
    out["hit_count"] = phys.meta.counts.index_select(0, rows)
    return {k: v.cpu() for k, v in out.items()}


def check_loaded(src: Model, dst: Model, keys: torch.Tensor, what: str) -> None:
    """The loaded model holds the source's ids, rows, moments and dense state."""
    sample = keys[torch.randperm(keys.numel(), device=keys.device)[:4096]]
    a, b = lookup(src.ec, sample), lookup(dst.ec, sample)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: slot {k} differs after the load"
    n_src = len(src.ec.physical_tables["item"].hash_table)
    n_dst = len(dst.ec.physical_tables["item"].hash_table)
    assert n_src == n_dst, f"{what}: {n_dst:,} ids loaded, {n_src:,} saved"
    da, db = dense_tensors(src), dense_tensors(dst)
    assert da.keys() == db.keys(), f"{what}: dense state names differ"
    for k in da:
        assert torch.equal(da[k].cpu(), db[k].cpu()), f"{what}: {k} differs after the load"


# ----------------------------------------------------------------------------- disk


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def table_part_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "sparse").rglob("*") if f.is_file())


def describe_fs(path: Path) -> str:
    """The filesystem holding ``path``: mount point, type, device, free space."""
    real = str(path.resolve())
    best = ("/", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    free = shutil.disk_usage(path).free
    return f"{path} on {best[0]} ({best[1]}, {best[2]}, {free / 1e9:.0f} GB free)"


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a new file with os.write in 64 MiB blocks from one
    preallocated host buffer (up to 1 GiB, written over and over), then fsync it."""
    size = min(max(nbytes, _BLOCK), 1 << 30) // _BLOCK * _BLOCK
    buf = memoryview(bytearray(os.urandom(1 << 20) * (size >> 20)))
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left, off = nbytes, 0
        while left:
            n = os.write(fd, buf[off : off + min(_BLOCK, left)])
            left -= n
            off = (off + n) % size
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def clear(root: Path, keep: Path | None = None) -> None:
    """Delete the checkpoints under ``root`` except ``keep``."""
    for entry in root.glob("step-*"):
        if entry != keep:
            shutil.rmtree(entry)


# ----------------------------------------------------------------------------- phases


def timed(fn, device: torch.device) -> tuple[float, object]:
    os.sync()
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def gather_user(model: Model, n: int) -> dict[str, torch.Tensor]:
    """What a user writes to save with one save_file call: the table's ids and slots in
    one chunk and the dense state, each as a CPU tensor in one dict."""
    chunks = list(export_collection_chunks(model.ec, max(n, 1), table="item"))
    assert len(chunks) == 1
    _, keys, slots = chunks[0]
    out = {"item.keys": keys.cpu()}
    out.update((f"item.{k}", v.cpu()) for k, v in slots.items())
    out.update((k, v.detach().cpu().contiguous()) for k, v in dense_tensors(model).items())
    return out


def baseline_load(path: Path, dst: Model, args) -> None:
    """The user's load: load_file, then the rows through import_collection_chunk in
    chunks, then the MLP and AdamW state dicts."""
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    meta = companion_metadata(dst.ec, args.dim)
    keys = tensors.pop("item.keys")
    slots = {k[5:]: tensors.pop(k) for k in list(tensors) if k.startswith("item.")}
    for start in range(0, keys.numel(), args.chunk_rows):
        stop = start + args.chunk_rows
        chunk = {k: v[start:stop] for k, v in slots.items()}
        import_collection_chunk(dst.ec, "item", keys[start:stop], chunk, metadata=meta)
    mlp = {k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")}
    dst.holder.mlp.load_state_dict(mlp)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("adamw."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = dst.dense.state_dict()["param_groups"]
    dst.dense.load_state_dict({"state": state, "param_groups": groups})


def run(args, device: torch.device, root: Path, report: SaverReport) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(0)
    n, dim, rep = args.rows, args.dim, args.repeat
    model, keys = build(args, device, gen)
    n_dense = sum(p.numel() for p in model.holder.mlp.parameters())
    log(f"dense: MLP of {n_dense:,} parameters with AdamW state")
    ckpt = Checkpointer(
        root, threads=args.threads, part_bytes=args.part_mb << 20, progress=False, rng=True
    )
    report.notes.append(
        f"{n:,} ids x {dim} fp32 with Adam moments as companions and per-row metadata; "
        f"MLP of {n_dense:,} parameters with AdamW; Checkpointer(threads={ckpt.threads}, "
        f"part_bytes={args.part_mb} MiB); every timed save writes a fresh step directory; "
        f"medians of {rep}"
    )
    step = [0]

    def save(blocking: bool = True, delta: bool = False, **objs) -> Path:
        step[0] += 1
        return ckpt.save(step[0], blocking=blocking, delta=delta, **(objs or model.objects()))

    try:
        # ---- 1. the user's single save_file call (also the load baseline's file)
        single = root / "single.safetensors"
        gathers, writes, syncs, single_bytes = [], [], [], 0
        for i in range(rep):
            single.unlink(missing_ok=True)
            t_gather, tensors = timed(lambda: gather_user(model, n), device)
            os.sync()
            t0 = time.perf_counter()
            save_file(tensors, str(single))
            t1 = time.perf_counter()
            fsync_path(single)
            t2 = time.perf_counter()
            del tensors
            gc.collect()
            gathers.append(t_gather)
            writes.append(t1 - t0)
            syncs.append(t2 - t0)
            single_bytes = single.stat().st_size
            log(f"baseline {i + 1}/{rep}: gather {t_gather:.2f} s, save_file "
                f"{t1 - t0:.2f} s, + fsync {t2 - t0:.2f} s ({gb(single_bytes)})")  # fmt: skip
        t_gather, t_save_file, t_single = map(statistics.median, (gathers, writes, syncs))

        # ---- raw disk write bandwidth, same byte count
        raws = []
        for i in range(rep):
            raws.append(raw_write(root / "raw.bin", single_bytes))
            log(f"raw write {i + 1}/{rep}: {gb(single_bytes)} in {raws[-1]:.2f} s "
                f"({single_bytes / raws[-1] / 1e9:.2f} GB/s)")  # fmt: skip
        report.bandwidth = single_bytes / statistics.median(raws)

        # ---- 2. blocking saves
        blocking, full_bytes, last = [], 0, None
        for i in range(rep):
            clear(root)
            t, last = timed(save, device)
            blocking.append(t)
            full_bytes = dir_bytes(last)
            log(f"blocking save {i + 1}/{rep}: {t:.2f} s, {gb(full_bytes)} "
                f"({full_bytes / t / 1e9:.2f} GB/s)")  # fmt: skip
        t_block = statistics.median(blocking)
        extra = {"baseline_bytes": float(single_bytes),
                 "gather_s": t_gather, "save_file_s": t_save_file}  # fmt: skip
        report.add(Row(
            f"blocking save ({gb(full_bytes)})", t_block, t_single, full_bytes,
            baseline="one safetensors save_file call + fsync",
            notes=f"target >= 2x; save_file alone (no fsync) {t_save_file * 1e3:,.0f} ms",
            extra=dict(extra),
        ), disk=True)  # fmt: skip
        report.add(Row(
            f"blocking save ({gb(full_bytes)}) vs gather + one call", t_block,
            t_gather + t_single, full_bytes,
            baseline="gather to CPU dict + save_file + fsync",
            notes=f"gather (export in one chunk, .cpu()) {t_gather * 1e3:,.0f} ms",
            extra=dict(extra),
        ), disk=True)  # fmt: skip

        # ---- 4. load (into fresh objects) against load_file + import
        assert last is not None
        ours_load, base_load = [], []
        for i in range(rep):
            for kind in ("ours", "baseline"):
                dst = fresh_model(dim, args.dense_params, device)
                gc.collect()
                if kind == "ours":
                    t, _ = timed(lambda d=dst: ckpt.load(step[0], **d.objects()), device)
                    ours_load.append(t)
                else:
                    t, _ = timed(lambda d=dst: baseline_load(single, d, args), device)
                    base_load.append(t)
                check_loaded(model, dst, keys, f"{kind} load")
                log(f"load {i + 1}/{rep} ({kind}): {t:.2f} s, checked")
                del dst
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        load_row = Row(
            f"load into fresh model + optimizers ({gb(full_bytes)})",
            statistics.median(ours_load), statistics.median(base_load), full_bytes,
            baseline="load_file + import_collection_chunk + load_state_dict",
            notes="reads from the page cache; ours checks every file's CRC-32 first",
            extra={"baseline_bytes": float(single_bytes)},
        )  # fmt: skip
        single.unlink()

        # ---- 2b. without fsync: the single-thread limit when the disk is not the bound
        quick = Checkpointer(
            root, threads=args.threads, part_bytes=args.part_mb << 20, progress=False,
            rng=True, durable=False,
        )  # fmt: skip
        try:
            quicks = []
            for i in range(rep):
                clear(root)
                step[0] += 1
                t, path = timed(lambda: quick.save(step[0], **model.objects()), device)
                quicks.append(t)
                log(f"blocking save, durable=False {i + 1}/{rep}: {t:.2f} s "
                    f"({dir_bytes(path) / t / 1e9:.2f} GB/s)")  # fmt: skip
        finally:
            quick.close()
        report.add(Row(
            f"blocking save, durable=False ({gb(full_bytes)})", statistics.median(quicks),
            t_save_file, full_bytes,
            baseline="one safetensors save_file call, no fsync",
            notes="page-cache speed on both sides (target >= 2x)",
            extra={"baseline_bytes": float(single_bytes)},
        ), disk=True)  # fmt: skip

        # ---- 3. async saves, snapshots in spare GPU memory (the default) and, on a GPU,
        # in host memory only: the first allocates pinned buffers, the next reuse them.
        modes = [("", ckpt)]
        if device.type == "cuda":
            host_only = Checkpointer(
                root, threads=args.threads, part_bytes=args.part_mb << 20, progress=False,
                rng=True, gpu_snapshot_fraction=0.0,
            )  # fmt: skip
            modes = [(" (GPU-staged)", ckpt), (" (host memory only)", host_only)]
        for mode, saver in modes:
            stalls, totals = [], []
            for i in range(1 + rep):
                clear(root)
                os.sync()
                synchronize(device)
                step[0] += 1
                t0 = time.perf_counter()
                saver.save(step[0], blocking=False, **model.objects())
                t1 = time.perf_counter()
                saver.wait()
                t2 = time.perf_counter()
                stalls.append(t1 - t0)
                totals.append(t2 - t0)
                log(f"async save{mode} {i + 1}/{1 + rep}{' (first)' if i == 0 else ''}: "
                    f"stall {(t1 - t0) * 1e3:,.0f} ms, total {t2 - t0:.2f} s, "
                    f"{gb(saver.last_gpu_snapshot_bytes)} staged on the GPU")  # fmt: skip
            first = "first"
            if device.type == "cuda" and saver is not ckpt:
                first = "first (pinned buffers allocated)"
            for label, stall, total in (
                (first, stalls[0], totals[0]),
                ("steady state", statistics.median(stalls[1:]), statistics.median(totals[1:])),
            ):
                report.add(Row(
                    f"async save{mode}, {label}: stall until save() returns", stall, t_block, 0,
                    baseline="blocking save",
                    notes=f"stall {stall / t_block:.1%} of the blocking save (target < 10%)",
                    extra={"stall_fraction": stall / t_block,
                           "gpu_staged_bytes": float(saver.last_gpu_snapshot_bytes)},
                ))  # fmt: skip
                report.add(Row(
                    f"async save{mode}, {label}: until wait() returns", total, t_block,
                    full_bytes, baseline="blocking save", extra={"baseline_bytes": full_bytes},
                ), disk=True)  # fmt: skip
            if saver is not ckpt:
                saver.close()

        # ---- 3. deltas after 1% of the rows changed
        changed = max(1, n // 100)
        table = model.ec.keyed_states()["item"]
        bases, d_table, d_table_bytes, d_all, d_all_bytes = [], [], [], [], []
        for i in range(rep):
            clear(root)
            t, base = timed(save, device)  # a full save: the delta's base, marks all clean
            bases.append(t)
            base_bytes, base_table = dir_bytes(base), table_part_bytes(base)
            for everything in (False, True):
                pick = torch.randperm(n, generator=gen, device=device)[:changed]
                rows = torch.randn(changed, dim, generator=gen, device=device)
                import_collection_chunk(model.ec, "item", keys[pick], {"values": rows})
                objs = model.objects() if everything else {"table": table}
                t, path = timed(lambda o=objs: save(delta=True, **o), device)
                (d_all if everything else d_table).append(t)
                nbytes = dir_bytes(path) if everything else table_part_bytes(path)
                (d_all_bytes if everything else d_table_bytes).append(nbytes)
                log(f"delta {i + 1}/{rep}, {'everything' if everything else 'table only'}: "
                    f"{t * 1e3:,.0f} ms, {gb(nbytes)}")  # fmt: skip
            log(f"  (its base, a full save: {bases[-1]:.2f} s, {gb(base_bytes)})")
        t_base = statistics.median(bases)
        # The references: the full save's time for 1% of its table bytes (at its rate), and
        # 1% of the full save (bytes and time).
        ref_table_bytes = base_table / 100
        ref_table_s = t_base * ref_table_bytes / base_bytes
        nb = statistics.median(d_table_bytes)
        t = statistics.median(d_table)
        report.add(Row(
            f"delta save, table only, {changed:,} ids changed (1%)", t, ref_table_s, int(nb),
            baseline="1% of the full save's table bytes at its rate",
            notes=f"{nb / ref_table_bytes:.2f}x the bytes, {t / ref_table_s:.2f}x the time "
                  "of 1% (target: within 2x)",
            extra={"baseline_bytes": ref_table_bytes, "full_save_s": t_base},
        ), disk=True)  # fmt: skip
        nb, t = statistics.median(d_all_bytes), statistics.median(d_all)
        dense_share = (base_bytes - base_table) / base_bytes
        report.add(Row(
            f"delta save, table + dense state (dense written whole: {dense_share:.0%} of "
            "a full save)", t, t_base / 100, int(nb),
            baseline="1% of the full save",
            notes=f"{nb / (base_bytes / 100):.2f}x the bytes, {t / (t_base / 100):.2f}x the "
                  "time of 1%",
            extra={"baseline_bytes": base_bytes / 100, "full_save_s": t_base},
        ), disk=True)  # fmt: skip
        report.add(load_row)
    finally:
        ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="ids in the table")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dense-params", type=int, default=50_000_000, help="MLP size")
    parser.add_argument(
        "--dir", default=None, help="where to write (a fresh subdirectory, deleted at the "
        "end); default: a temp dir under /tmp",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="Checkpointer threads (default: its own)"
    )
    parser.add_argument("--part-mb", type=int, default=256, help="Checkpointer part_bytes, MiB")
    parser.add_argument("--chunk-rows", type=int, default=1 << 20, help="ids per import chunk")
    parser.add_argument("--repeat", type=int, default=1, help="timed saves and loads each")
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    # SIGTERM (a job's time limit) unwinds like Ctrl-C, so the checkpoints are deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parent = Path(args.dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    row_bytes = 8 + 3 * args.dim * 4 + 16  # key, values + 2 moments, last-seen + hit count
    est = args.rows * row_bytes + 12 * args.dense_params
    # At most a full checkpoint and the single-call file exist at once (plus small deltas).
    need = int(2.1 * est) + (256 << 20)
    free = shutil.disk_usage(parent).free
    if need > 0.8 * free:
        sys.exit(
            f"saver benchmark: refusing to run: it needs about {gb(need)} on disk "
            f"(a checkpoint of about {gb(est)} and the single-call file at once), more "
            f"than 80% of the {gb(free)} free under {parent}; pass --dir elsewhere or "
            "fewer --rows / --dense-params"
        )
    root = Path(tempfile.mkdtemp(prefix="recstack-saver-bench-", dir=parent))
    try:
        import safetensors

        report = SaverReport(
            f"Checkpoint saver, {args.rows:,} ids x {args.dim} fp32 + Adam state, "
            f"~{args.dense_params / 1e6:g}M-param MLP + AdamW",
            device_name(device),
            0.0,
            disk=describe_fs(root),
        )
        report.versions += f", safetensors {safetensors.__version__}"
        report.notes.append(
            "writes land in the page cache: every timing includes the fsync of each file it "
            "wrote (ours fsyncs every file; the baseline and the raw write are fsynced "
            "after writing); os.sync() runs before each timing; the page cache is not "
            "dropped (no root), so loads read from it"
        )
        log(f"device {report.device}; writing under {report.disk}")
        log(f"about {gb(est)} a checkpoint; peak disk use about {gb(need)}")
        if device.type == "cpu":
            report.notes.append(
                "on a CPU an async save has no pinned buffers to fill: its snapshot copies "
                "every row in host memory, so the stall is that copy (the GPU target does "
                "not apply)"
            )
        run(args, device, root, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        log(f"removed {root}")
    print()
    print(report.markdown(), flush=True)
    # The report's bandwidth is the disk's, not a copy bandwidth: no MBU, the disk share is in
    # each row's extra.
    result = report_result(
        report, "saver", device, args, mbu=False, safetensors=safetensors.__version__
    )
    result.notes = "; ".join(report.notes)
    for row in result.rows:  # the printed table's GB/s and disk columns, for the page
        rate = row.extra.get("gb_per_s")
        if rate is not None:
            disk = row.extra.get("disk_fraction")
            text = f"{rate:.2f} GB/s" + (f", {disk:.0%} of the disk" if disk is not None else "")
            row.notes = f"{text}; {row.notes}" if row.notes else text
    result.extra = {"disk_write_bandwidth": report.bandwidth, "disk": report.disk}
    save(result, args.json)


if __name__ == "__main__":
    main()
