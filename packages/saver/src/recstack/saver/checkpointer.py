"""``Checkpointer``: save, resume, reshard and go incremental, atomically.

Examples:
    >>> import tempfile, torch
    >>> from recstack.saver import Checkpointer
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep_last=2)
    >>> _ = ckpt.save(10, model=model, opt=opt, extras={"epoch": 1})
    >>> ckpt.latest()
    10
    >>> fresh = torch.nn.Linear(3, 1)
    >>> report = ckpt.load(model=fresh, opt=torch.optim.Adam(fresh.parameters()), extras={})
    >>> report.step, torch.equal(fresh.weight, model.weight)
    (10, True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import AuxiliaryState, IncrementalKeyedState, check_json_metadata
from recstack.core.checks import check_int
from recstack.saver.errors import CheckpointError
from recstack.saver.load import LoadReport, load_chain
from recstack.saver.manifest import (
    MANIFEST,
    checkpoint_dirname,
    complete_steps,
    manifest_crc,
    parse_step,
    resolve_chain,
)
from recstack.saver.parallel import default_threads, resolve_ranks
from recstack.saver.progress import Progress
from recstack.saver.read import default_keep_bytes
from recstack.saver.rng import capture_rng
from recstack.saver.serving_export import export_for_serving
from recstack.saver.sharded_dense import gather_sharded, holds_sharded
from recstack.saver.snapshot import (
    GpuStage,
    PinnedPool,
    host_copies,
    host_copy,
    iter_host_chunks,
    spread_chunk_rows,
)
from recstack.saver.stateful import Sorted, sort_stateful
from recstack.saver.tree import encode_tree
from recstack.saver.write import DenseJob, RankJob, TableJob, write_rank

__all__ = ["Checkpointer"]


class Checkpointer:
    """Checkpoints under ``root``, one directory per step (``step-000000000100``).

    Args:
        root: the directory holding the checkpoints (created when missing).
        keep_last: keep only the newest ``keep_last`` complete checkpoints (and the ones
            their deltas build on); ``None`` keeps all.
        rng: save each rank's random generator states (torch CPU and CUDA, Python, NumPy)
            and restore them on load.
        part_bytes: about how many bytes of a table go in one part file (the export chunk;
            a blocking save holds ``max_in_flight`` of them in host memory).
        max_in_flight: chunks a blocking save holds at once while they are written
            (default: ``threads + 2``), so its host memory is about
            ``max_in_flight * part_bytes`` whatever the table's size.
        dense_file_bytes: the dense state is split into safetensors files of about this size.
        threads: writer/reader threads (default: the CPU count, at most 16).
        rank: this process's rank; default from ``torch.distributed`` when initialized,
            else ``0``. Giving ``rank`` and ``world_size`` without a process group runs
            the ranks of a job one after another in one program, rank 0 first (tests and
            tools).
        world_size: the number of ranks; default from ``torch.distributed``, else ``1``.
        progress: show a progress line; ``None`` shows it when stderr is a terminal.
        durable: fsync every file and the checkpoint directory before the manifest counts
            it complete, so a checkpoint survives a power loss or an operating-system
            crash. ``False`` skips the fsyncs: a save then runs at page-cache speed and
            still survives the process being killed at any instant (the kernel keeps what
            was written), but not the machine going down. For scratch checkpoints, memory
            file systems and checkpoints copied elsewhere right after.
        load_buffer_bytes: host memory a load may fill with files it has checked, so it
            imports them without reading them a second time (a load checks every file's
            CRC-32 before it changes anything). Default: a quarter of the memory available
            when the load starts. Files beyond it are checked in blocks and read again,
            part by part, when imported; 0 always does that.
        gpu_snapshot_fraction: an async save first copies GPU tensors into spare GPU
            memory, up to this share of what is free when it starts (device-to-device:
            milliseconds for gigabytes), and the writer threads move them to the host in
            the background, releasing the GPU memory file by file. What does not fit goes
            to pinned host buffers kept from the previous async save, else to ordinary
            host memory. ``0`` snapshots to host memory only.

    Attributes:
        last_gpu_snapshot_bytes: how many bytes the last async save staged in GPU memory.

    A save writes every file aside and renames it when whole; ``manifest.json`` comes last
    and names only complete files, so a process killed at any moment leaves the previous
    checkpoints loadable and a partial directory that :meth:`latest` and :meth:`load`
    ignore (with a warning).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        rng: bool = True,
        part_bytes: int = 128 << 20,
        dense_file_bytes: int = 1 << 30,
        threads: int | None = None,
        max_in_flight: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool | None = None,
        durable: bool = True,
        load_buffer_bytes: int | None = None,
        gpu_snapshot_fraction: float = 0.5,
    ) -> None:
        self.root = Path(root)
        fraction = float(gpu_snapshot_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                "Checkpointer: gpu_snapshot_fraction must be in [0, 1], "
                f"got {gpu_snapshot_fraction!r}"
            )
        self.gpu_snapshot_fraction = fraction
        self.last_gpu_snapshot_bytes = 0
        self.load_buffer_bytes = (
            None
            if load_buffer_bytes is None
            else check_int(load_buffer_bytes, "Checkpointer: load_buffer_bytes", minimum=0)
        )
        self.durable = bool(durable)
        if keep_last is not None:
            check_int(keep_last, "Checkpointer: keep_last", minimum=1)
        self.keep_last = keep_last
        self.rng = bool(rng)
        self.part_bytes = check_int(part_bytes, "Checkpointer: part_bytes", minimum=1)
        self.dense_file_bytes = check_int(
            dense_file_bytes, "Checkpointer: dense_file_bytes", minimum=1
        )
        self.threads = check_int(
            default_threads() if threads is None else threads, "Checkpointer: threads", minimum=1
        )
        in_flight = self.threads + 2 if max_in_flight is None else max_in_flight
        self.max_in_flight = check_int(in_flight, "Checkpointer: max_in_flight", minimum=1)
        self.progress = progress
        # Explicit ranks use no collectives (see the docstring).
        self.rank, self.world_size, self._pg = resolve_ranks(rank, world_size, "Checkpointer")
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="recstack-saver")
        self._pinned = PinnedPool()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._in_flight: Path | None = None
        # The checkpoint the tables' change marks refer to: a delta's base.
        self._base: tuple[str, int] | None = None

    # ------------------------------------------------------------------ queries
    def path(self, step: int) -> Path:
        """The directory of the checkpoint of ``step``.

        Args:
            step: the training step.
        """
        return self.root / checkpoint_dirname(step)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (partial ones are skipped)."""
        return complete_steps(self.root)

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, *, blocking: bool = True, delta: bool = False, **stateful: Any
    ) -> Path:
        """Write the checkpoint of ``step`` from the named objects; return its directory.

        Args:
            step: the training step (an int >= 0; one checkpoint per step).
            blocking: ``False`` snapshots everything (GPU tensors into spare GPU memory
                or pinned host buffers, see ``gpu_snapshot_fraction``), returns, and
                writes the files in a background thread; call :meth:`wait` to join it.
                At most one save is in flight: a save first waits for the previous one.
            delta: write only the table rows changed since the checkpoint saved or loaded
                last (its *base*), plus tombstones for the keys removed since, and the
                whole dense state. Needs tables that track changes (core's
                ``IncrementalKeyedState``).
            **stateful: what to save, by name: modules, optimizers, schedulers, keyed
                states, objects with ``keyed_states()``, dicts of JSON values,
                :class:`~recstack.saver.PerRank` objects (see :mod:`recstack.saver.stateful`).

        Raises:
            CheckpointError: the step's checkpoint exists, a delta without a base, or a
                previous async save failed (its error is chained).
            TypeError, ValueError: an object that cannot be saved, named.
        """
        self.wait()
        check_int(step, "Checkpointer.save: step", minimum=0)
        objs = sort_stateful(stateful)
        ckpt = self.path(step)
        if (ckpt / MANIFEST).exists():
            raise CheckpointError(f"{ckpt}: a checkpoint of step {step} exists already")
        base = self._delta_base(step, objs) if delta else None
        self._prepare(ckpt)
        snapshot = not blocking
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        pinned = self._pinned if snapshot and cuda else None
        stage = GpuStage(self.gpu_snapshot_fraction) if snapshot and cuda else None
        tables = self._table_jobs(objs, delta, snapshot, pinned, stage)
        dense = self._dense_job(objs, snapshot, pinned, stage)
        per_rank, per_rank_tensors = self._per_rank_job(objs, snapshot, pinned, stage)
        self.last_gpu_snapshot_bytes = 0 if stage is None else stage.staged_bytes
        job = RankJob(
            ckpt=ckpt,
            step=step,
            kind="delta" if delta else "full",
            rank=self.rank,
            world_size=self.world_size,
            base=base,
            tables=tables,
            dense=dense,
            per_rank=per_rank,
            per_rank_tensors=per_rank_tensors,
            dense_file_bytes=self.dense_file_bytes,
            max_in_flight=self.max_in_flight,
            durable=self.durable,
            host_pool=pinned,
        )
        incremental = [s for s in objs.tables.values() if isinstance(s, IncrementalKeyedState)]
        if blocking:
            self._run(job, incremental)
            error, self._error = self._error, None
            self._agree(error, ckpt)
            return ckpt
        if cuda:
            # The staged and pinned copies are complete before the writer threads read them.
            torch.cuda.synchronize()
        # Changes after this instant belong to the next delta, whatever the write does.
        for state in incremental:
            state.mark_clean()
        self._in_flight = ckpt
        self._thread = threading.Thread(
            target=self._run_async, args=(job, pinned), name="recstack-saver-async", daemon=True
        )
        self._thread.start()
        return ckpt

    def wait(self) -> Path | None:
        """Wait for the async save in flight, if any; return its directory.

        Raises:
            CheckpointError: the async save failed (its error is chained); the next delta
                then needs a full save first.
        """
        thread, ckpt = self._thread, self._in_flight
        if thread is None:
            return None
        thread.join()
        self._thread = self._in_flight = None
        error, self._error = self._error, None
        self._agree(error, ckpt, what="the async save")
        return ckpt

    def _run_async(self, job: RankJob, pinned: PinnedPool | None) -> None:
        try:
            self._run(job, [])
        finally:
            # Out of page-locked memory: the next save copies to ordinary memory instead.
            if pinned is not None:
                with contextlib.suppress(RuntimeError):
                    pinned.recycle()  # free again, and pinned for the next save

    def _run(self, job: RankJob, mark_after: list[IncrementalKeyedState]) -> None:
        progress = Progress(f"saving step {job.step}", enabled=self.progress)
        try:
            finalized = write_rank(job, self._pool, progress.add)
            for state in mark_after:
                state.mark_clean()
            self._base = (job.ckpt.name, job.step)
            if finalized and self.keep_last is not None:
                self.prune()
        except BaseException as err:  # noqa: BLE001  # reported by save() or wait()
            self._error = err
            # Marks may already be cleared: the changes since the last complete
            # checkpoint are known to no delta, so the next one must be full.
            self._base = None
        finally:
            progress.close()

    def _delta_base(self, step: int, objs: Sorted) -> dict[str, Any]:
        if self._base is None:
            raise CheckpointError(
                "Checkpointer.save(delta=True): a delta needs a base: save a full checkpoint "
                "or load one first (and after a failed save, save a full one)"
            )
        name, base_step = self._base
        if base_step >= step:
            raise CheckpointError(
                f"Checkpointer.save(delta=True): step {step} is not after its base's {base_step}"
            )
        for tname, state in objs.tables.items():
            if not isinstance(state, IncrementalKeyedState):
                raise TypeError(
                    f"Checkpointer.save(delta=True): table {tname!r} does not track changes "
                    "(it lacks mark_clean/export_changed_chunks/removed_keys/remove_keys)"
                )
        if not (self.root / name / MANIFEST).is_file():
            raise CheckpointError(f"{self.root / name}: the delta's base is not complete")
        return {"dir": name, "step": base_step, "manifest_crc32": manifest_crc(self.root / name)}

    def _prepare(self, ckpt: Path) -> None:
        """Clear what a save of this step left unfinished, then let every rank write."""
        if self.rank == 0 and ckpt.exists():
            shutil.rmtree(ckpt)
        self._barrier()
        ckpt.mkdir(parents=True, exist_ok=True)

    def _barrier(self) -> None:
        if self._pg:
            dist.barrier()

    def _agree(self, error: BaseException | None, ckpt: Path, what: str = "the save") -> None:
        """Raise on every rank if any rank failed (a rank that raised alone would leave
        the others waiting at their next collective); otherwise return once every rank's
        files and the manifest are there."""
        failed = error is not None
        if self._pg:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flags = torch.zeros(self.world_size, dtype=torch.int32, device=device)
            flags[self.rank] = int(failed)
            dist.all_reduce(flags)
            bad = [r for r, f in enumerate(flags.tolist()) if f]
            if bad and not failed:
                raise CheckpointError(f"{ckpt}: {what} failed on rank(s) {bad}; see their errors")
        if error is not None:
            if isinstance(error, CheckpointError) or what == "the save":
                raise error
            raise CheckpointError(f"{ckpt}: {what} failed ({error})") from error

    def _table_jobs(
        self,
        objs: Sorted,
        delta: bool,
        snapshot: bool,
        pinned: PinnedPool | None,
        stage: GpuStage | None,
    ) -> list[TableJob]:
        jobs = []
        for name, state in objs.tables.items():
            meta = state.state_metadata()
            check_json_metadata(meta, name)
            rows = spread_chunk_rows(meta, self.part_bytes, self.threads, delta=delta)
            if delta:
                assert isinstance(state, IncrementalKeyedState)
                source = state.export_changed_chunks(rows)
                removed = host_copy(state.removed_keys(), snapshot=True, pool=None)
            else:
                source = state.export_chunks(rows)
                removed = None
            chunks: Any = iter_host_chunks(source, snapshot=snapshot, pool=pinned, stage=stage)
            if snapshot:
                chunks = list(chunks)
            aux = {}
            if isinstance(state, AuxiliaryState):
                aux = host_copies(state.auxiliary_state(), snapshot=True, pool=None)
            jobs.append(TableJob(name, meta, chunks, removed, aux))
        return jobs

    def _dense_job(
        self, objs: Sorted, snapshot: bool, pinned: PinnedPool | None, stage: GpuStage | None
    ) -> DenseJob | None:
        """Rank 0's dense state to write (``None`` on the other ranks). State sharded
        over the ranks (FSDP2) is gathered whole first, by every rank."""
        states = {
            name: obj if isinstance(obj, dict) else obj.state_dict()
            for name, obj in objs.dense.items()
        }
        if holds_sharded(states):
            states = gather_sharded(states)
        if self.rank != 0:
            return None
        trees: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, obj in objs.dense.items():
            tree, ts = encode_tree(states[name], name)
            kind = (
                "module"
                if isinstance(obj, nn.Module)
                else "dict"
                if isinstance(obj, dict)
                else "object"
            )
            trees[name] = {"kind": kind, "tree": tree}
            tensors.update(host_copies(ts, snapshot=snapshot, pool=pinned, stage=stage))
        return DenseJob(trees, tensors)

    def _per_rank_job(
        self, objs: Sorted, snapshot: bool, pinned: PinnedPool | None, stage: GpuStage | None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        states: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, obj in objs.per_rank.items():
            state = obj if isinstance(obj, dict) else obj.state_dict()
            tree, ts = encode_tree(state, name)
            states[name] = {"kind": "dict" if isinstance(obj, dict) else "object", "tree": tree}
            tensors.update(host_copies(ts, snapshot=snapshot, pool=pinned, stage=stage))
        return {"rng": capture_rng() if self.rng else None, "states": states}, tensors

    # ------------------------------------------------------------------ load
    def load(
        self,
        step: int | None = None,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        rename: dict[str, str] | None = None,
        strict: bool = True,
        rng: bool | None = None,
        **stateful: Any,
    ) -> LoadReport:
        """Load checkpoint ``step`` (default: the latest complete one) into the objects.

        Args:
            step: which checkpoint; a delta is replayed on its chain (the full checkpoint
                it builds on, then each delta in order).
            include: glob patterns (``fnmatch``) of names to load (default: all): table
                names (``"model.ec.item"``), module entries (``"model.tower.0.weight"``),
                objects (``"opt"``). Names are matched after ``rename``.
            exclude: glob patterns of names to leave as they are.
            rename: ``{old: new}`` name prefixes (at ``.`` boundaries), to load into a
                model whose tables or modules were renamed.
            strict: refuse (before changing anything) when something is missing from the
                checkpoint, left over in it, or of another shape or dtype; ``False``
                loads what fits and reports the rest.
            rng: restore the random generator states (default: the checkpointer's ``rng``).
            **stateful: the objects to load into, by the names they were saved under.

        Returns:
            What was loaded, skipped, missing, unexpected and mismatched.

        Raises:
            CheckpointError: no checkpoint, a broken delta chain, a missing, truncated or
                corrupt file, an unknown format version, or (``strict``) objects that do
                not fit; nothing is changed then.
        """
        self.wait()
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointError(f"{self.root}: no complete checkpoint to load")
        chain = resolve_chain(self.root, checkpoint_dirname(step))
        objs = sort_stateful(stateful)
        report = load_chain(
            chain,
            objs,
            rank=self.rank,
            world_size=self.world_size,
            include=include,
            exclude=exclude,
            rename=rename or {},
            strict=strict,
            rng=self.rng if rng is None else rng,
            pool=self._pool,
            progress=self.progress,
            keep_bytes=(
                default_keep_bytes() if self.load_buffer_bytes is None else self.load_buffer_bytes
            ),
        )
        for state in objs.tables.values():
            if isinstance(state, IncrementalKeyedState):
                state.mark_clean()
        self._base = (checkpoint_dirname(step), step)
        return report

    # ------------------------------------------------------------------ serving
    def export(
        self,
        out_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        step: int = 0,
        **stateful: Any,
    ) -> Path:
        """Write a serving export of the objects into ``out_dir`` (ids and rows of every
        table in ``dtype``, no optimizer state, plus the modules' dense weights), with this
        checkpointer's ranks, part size and threads; see
        :func:`~recstack.saver.export_for_serving`. Read it back with
        :func:`~recstack.saver.load_for_inference`.

        Args:
            out_dir: the export directory.
            dtype: the dtype of the rows and of the modules' floating tensors.
            step: the training step recorded in the export.
            **stateful: what to export, by name (see
                :func:`~recstack.saver.export_for_serving`).
        """
        self.wait()
        return export_for_serving(
            out_dir,
            dtype=dtype,
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            part_bytes=self.part_bytes,
            dense_file_bytes=self.dense_file_bytes,
            pool=self._pool,
            progress=self.progress,
            barrier=self._pg,
            **stateful,
        )

    # ------------------------------------------------------------------ pruning
    def prune(self) -> list[int]:
        """Delete complete checkpoints beyond the newest ``keep_last`` (keeping every
        checkpoint a kept delta builds on) and unfinished ones older than the newest
        complete one; return the steps deleted. Only rank 0 deletes."""
        if self.keep_last is None or self.rank != 0:
            return []
        steps = complete_steps(self.root, warn=False)
        keep = set(steps[-self.keep_last :])
        for s in list(keep):
            for ckpt, _ in resolve_chain(self.root, checkpoint_dirname(s)):
                keep.add(int(parse_step(ckpt.name) or 0))
        deleted = []
        newest = steps[-1] if steps else -1
        for entry in self.root.iterdir():
            s = parse_step(entry.name)
            if s is None or not entry.is_dir():
                continue
            complete = (entry / MANIFEST).is_file()
            if (complete and s not in keep) or (not complete and s < newest):
                shutil.rmtree(entry, ignore_errors=True)
                deleted.append(s)
        return sorted(deleted)

    def close(self) -> None:
        """Wait for the save in flight and stop the worker threads."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
