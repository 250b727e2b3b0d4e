"""Export a checkpoint for serving from its files, without the model's Python objects.

:func:`export_checkpoint` turns a checkpoint directory (or a checkpoint of a checkpointer
root) into the serving export :func:`~recstack.saver.export_for_serving` writes from the
live model at that step: the same tables, ids and ``"values"`` rows bit for bit in the
export's dtype, the same dense module weights, served by
:func:`~recstack.saver.load_for_inference`. This is what ``recstack export`` and
``recstack-saver export`` run.

* **Checked first.** Every file it reads (table parts, a delta's tombstones, the dense
  files of the modules) is checked against its manifest (size, CRC-32, tensor headers)
  before anything is written; the export's manifest is written last, so an export that
  fails is never taken for a complete one.
* **Streamed.** The rows of every rank's parts are read a few parts at a time and
  re-chunked into parts of about ``part_bytes`` of serving rows (ids and ``dtype``
  values), written as one rank: an export's world size is 1 whatever the checkpoint's
  (its parts hold every saved rank's rows). Host memory is a few parts, never a table.
* **Deltas replayed.** For a delta, its chain is replayed file by file
  (:mod:`recstack.saver.replay`): keys removed by a tombstone are gone, a later delta's
  row replaces an earlier one. It adds about 40 bytes per changed row or tombstone of the
  chain's deltas to the memory above.
* **Dense.** The tensors of the checkpoint's ``nn.Module`` entries, floating ones cast to
  ``dtype``; optimizers, schedulers, dicts of values and per-rank state are left out.

Examples:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from recstack.saver import Checkpointer, export_checkpoint, load_for_inference
    >>> root = Path(tempfile.mkdtemp())
    >>> with Checkpointer(root / "ckpts", progress=False) as ckpt:
    ...     _ = ckpt.save(7, model=torch.nn.Linear(3, 1))
    >>> out = export_checkpoint(root / "ckpts", root / "serve", dtype=torch.bfloat16)
    >>> served = load_for_inference(out)
    >>> served.step, served.dtype, served.dense_names
    (7, torch.bfloat16, ['model'])
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recstack.core.checks import check_int
from recstack.saver.dense_state import DenseState
from recstack.saver.dtype_names import DTYPES_BY_NAME, dtype_name
from recstack.saver.errors import CheckpointError
from recstack.saver.manifest import (
    MANIFEST,
    Chain,
    checkpoint_dirname,
    complete_steps,
    locate_checkpoint,
    resolve_chain,
)
from recstack.saver.names import NameFilter
from recstack.saver.parallel import default_threads
from recstack.saver.progress import Progress
from recstack.saver.read import CheckedFile, part_expectation, verify_files
from recstack.saver.replay import ChainFiles, chain_files, replay_rows
from recstack.saver.serving_format import (
    VALUES,
    check_export_dir,
    check_serving_dtype,
    module_serving_entry,
    prepare_export_dir,
    serving_rows,
    serving_table_metadata,
)
from recstack.saver.snapshot import estimate_chunk_rows
from recstack.saver.tree import decode_tree, tensor_names
from recstack.saver.write import DenseJob, RankJob, TableJob, write_rank

__all__ = ["export_checkpoint", "find_chain"]

Rows = tuple[torch.Tensor, dict[str, torch.Tensor]]
# As export_for_serving writes them: the dense tensors in files of about this size.
_DENSE_FILE_BYTES = 1 << 30
# Part files read ahead of the one being converted: enough to keep the disk busy.
_READ_AHEAD = 2


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    step: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    threads: int | None = None,
    part_bytes: int = 256 << 20,
    progress: bool | None = None,
) -> Path:
    """Write the serving export of a checkpoint into ``out_dir``; return it.

    The result is what :func:`~recstack.saver.export_for_serving` writes from the live
    objects at that step (kind ``"serving"``, the dtype recorded, tables named as in the
    checkpoint): read it with :func:`~recstack.saver.load_for_inference`.

    Args:
        checkpoint: a checkpoint directory (``step-000000001000``, or its
            ``manifest.json``; a delta is replayed on its chain), or a checkpointer root
            (the directory holding the ``step-*`` directories).
        out_dir: the export directory (created when missing). It must not hold a complete
            export already, nor files that are not an export's; what an unfinished export
            left there is cleared.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``: the dtype of
            every table's rows and of the modules' floating tensors.
        step: with a root, the checkpoint to export (default: the latest complete one);
            with a checkpoint directory, it must be that checkpoint's step.
        include: glob patterns (``fnmatch``) of the table names to export (default: all);
            each must match a table of the checkpoint.
        exclude: glob patterns of table names to leave out. Dense weights are always
            exported.
        threads: reader/writer threads (default: the CPU count, at most 16).
        part_bytes: about how many bytes of serving rows (ids and ``dtype`` values) one
            part file of the export holds. Host memory is about ``threads + 2`` such parts
            being written plus 3 of the checkpoint's parts being read.
        progress: show a progress line; ``None`` shows it when stderr is a terminal.

    Raises:
        NotACheckpointError: ``checkpoint`` is missing or neither a checkpoint nor a root
            (a :class:`~recstack.saver.CheckpointError`).
        CheckpointError: no complete checkpoint (of ``step``), a serving export given as
            the checkpoint, a broken delta chain, a missing, truncated or corrupt file
            (named), a table without floating-point ``"values"`` rows (named), or an
            ``out_dir`` that holds an export or foreign files. Nothing is written then.
        TypeError: an unsupported ``dtype``, or patterns that are not a list of strings.
        ValueError: a bad ``step``, ``threads`` or ``part_bytes``; a ``step`` that is not
            the given checkpoint's; an ``include`` pattern matching no table.
    """
    _check_args(dtype, step, include, exclude, threads, part_bytes)
    chain = find_chain(checkpoint, step)
    last_dir, last = chain[-1]
    out = Path(out_dir)
    check_export_dir(out)
    tables = _plan_tables(chain, include, exclude)
    dense = DenseState(last_dir, last)
    modules = _module_trees(dense, last_dir)
    needed: set[str] = set()
    for tree in modules.values():
        needed.update(tensor_names(tree))
    n_threads = threads if threads is not None else default_threads()
    with ThreadPoolExecutor(n_threads, thread_name_prefix="recstack-export") as pool:
        checks: list[tuple[CheckedFile, dict[str, Any] | None]] = []
        for table in tables:
            checks += table.checks()
        checks += dense.checked_files(needed)
        verify_files(checks, pool)
        dense_job = _saved_modules_job(modules, dense.tensors(needed), dtype, last_dir)
        # ---- every file is checked and the dense state decoded; from here on, write.
        prepare_export_dir(out, 0, False)
        bar = Progress(
            f"exporting {last_dir.name} for serving",
            sum(t.bytes_read for t in tables),
            enabled=progress,
        )
        job = RankJob(
            ckpt=out,
            step=last["step"],
            kind="serving",
            rank=0,
            world_size=1,
            base=None,
            tables=[t.job(dtype, part_bytes, pool, bar.add) for t in tables],
            dense=dense_job,
            per_rank={"rng": None, "states": {}},
            per_rank_tensors={},
            dense_file_bytes=_DENSE_FILE_BYTES,
            max_in_flight=n_threads + 1,
            extra={"dtype": dtype_name(dtype)},
        )
        try:
            write_rank(job, pool)
        finally:
            bar.close()
    return out


def _check_args(
    dtype: object,
    step: object,
    include: object,
    exclude: object,
    threads: object,
    part_bytes: object,
) -> None:
    check_serving_dtype(dtype, "export_checkpoint")
    if step is not None:
        check_int(step, "export_checkpoint: step", minimum=0)
    for what, patterns in (("include", include), ("exclude", exclude)):
        if patterns is None:
            continue
        if isinstance(patterns, str) or not (
            isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)
        ):
            raise TypeError(
                f"export_checkpoint: {what} must be a list of glob patterns, got {patterns!r}"
            )
    if threads is not None:
        check_int(threads, "export_checkpoint: threads", minimum=1)
    check_int(part_bytes, "export_checkpoint: part_bytes", minimum=1)


def find_chain(checkpoint: str | os.PathLike[str], step: int | None = None) -> Chain:
    """``[(dir, manifest), ...]`` of the checkpoint to export, full checkpoint first.

    Args:
        checkpoint: a checkpoint directory (or its ``manifest.json``) or a checkpointer
            root.
        step: with a root, which checkpoint (default: the latest complete one); with a
            checkpoint directory, its step (checked).

    Raises:
        NotACheckpointError: ``checkpoint`` is missing or neither a checkpoint nor a root.
        CheckpointError: a save that did not finish, no complete checkpoint (of ``step``),
            a serving export, or a broken delta chain.
        ValueError: ``step`` is not the given checkpoint directory's.
    """
    what, path = locate_checkpoint(checkpoint)
    if what == "partial":
        raise CheckpointError(
            f"{path}: no {MANIFEST}: a save that did not finish; export a complete checkpoint"
        )
    if what == "root":
        steps = complete_steps(path, warn=False)
        if not steps:
            raise CheckpointError(f"{path}: no complete checkpoint to export")
        if step is not None and step not in steps:
            raise CheckpointError(
                f"{path}: no complete checkpoint of step {step} (complete steps: {steps})"
            )
        root, name = path, checkpoint_dirname(steps[-1] if step is None else step)
    else:
        root, name = path.parent, path.name
    chain = resolve_chain(root, name)
    last_dir, last = chain[-1]
    if last["kind"] == "serving":
        raise CheckpointError(
            f"{last_dir}: a serving export already, not a training checkpoint; serve it with "
            "load_for_inference"
        )
    if what == "checkpoint" and step is not None and last["step"] != step:
        raise ValueError(
            f"{last_dir}: the checkpoint of step {last['step']}, not {step}; give the "
            "checkpointer root to pick a step"
        )
    return chain


# ---------------------------------------------------------------------------- tables


@dataclass
class _Table:
    """One table to export: its files along the chain and what the manifests say."""

    name: str
    files: ChainFiles
    slots: dict[str, Any]
    metadata: Any

    def checks(self) -> list[tuple[CheckedFile, dict[str, Any] | None]]:
        expect = part_expectation(self.slots)
        out: list[tuple[CheckedFile, dict[str, Any] | None]] = []
        for _, parts, removed, _ in self.files:
            out += [(f, expect) for f in parts]
            out += [(f, {"keys": ("I64", [-1])}) for f in removed]
        return out

    @property
    def bytes_read(self) -> int:
        """A delta's parts are read twice: for their keys, then for the final rows."""
        base = sum(f.bytes for f in self.files[0][1])
        deltas = sum(
            2 * sum(f.bytes for f in parts) + sum(f.bytes for f in removed)
            for _, parts, removed, _ in self.files[1:]
        )
        return base + deltas

    def job(
        self,
        dtype: torch.dtype,
        part_bytes: int,
        pool: ThreadPoolExecutor,
        on_file: Callable[[int], None],
    ) -> TableJob:
        meta, dim = serving_table_metadata(self.name, self.metadata, dtype)
        rows = estimate_chunk_rows({"slots": meta["slots"]}, part_bytes)
        source = replay_rows(self.files, pool, slots=(VALUES,), ahead=_READ_AHEAD, on_file=on_file)
        return TableJob(
            self.name, meta, _rechunk(serving_rows(self.name, source, dtype, dim), rows)
        )


def _plan_tables(
    chain: Chain, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[_Table]:
    full_dir, full = chain[0]
    last = chain[-1][1]
    saved = list(full["tables"])
    for pattern in include or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in saved):
            raise ValueError(
                f"export_checkpoint: include pattern {pattern!r} matches no table of "
                f"{chain[-1][0]} (its tables: {saved})"
            )
    names = NameFilter(include, exclude, {})
    out = []
    for name in saved:
        if not names.selected(name):
            continue
        for ckpt, m in chain[1:]:
            if name not in m["tables"]:
                raise CheckpointError(f"{ckpt}: the delta lacks table {name!r} its base has")
        slots = full["tables"][name].get("slots")
        _check_rows(name, slots, f"{full_dir / MANIFEST}")
        out.append(
            _Table(name, chain_files(chain, name), slots or {}, last["tables"][name]["metadata"])
        )
    return out


def _check_rows(name: str, slots: Any, where: str) -> None:
    """A table is exported with its ``"values"`` rows: they must be there, floating point."""
    if not isinstance(slots, dict):
        raise CheckpointError(f"{where}: table {name!r} has malformed slots {slots!r}")
    if not slots:
        return  # no rows were ever written: an empty table
    info = slots.get(VALUES)
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{where}: table {name!r} has no {VALUES!r} slot (it has {sorted(slots)}); only "
            "tables of embedding rows can be exported for serving"
        )
    dtype = DTYPES_BY_NAME.get(str(info.get("dtype")))
    if dtype is None or not dtype.is_floating_point:
        raise CheckpointError(
            f"{where}: table {name!r} has {VALUES!r} rows of dtype {info.get('dtype')}, not "
            "floating point; it cannot be exported for serving"
        )
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1):
        raise CheckpointError(
            f"{where}: table {name!r} has {VALUES!r} rows of shape {shape}, not [dim]"
        )


def _rechunk(chunks: Iterator[Rows], rows: int) -> Iterator[Rows]:
    """The same rows in chunks of ``rows`` (the last one shorter), each a fresh tensor (a
    chunk waiting to be written holds no checkpoint part in memory)."""
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    held = 0
    for k, slots in chunks:
        v = slots[VALUES]
        start = 0
        while start < k.numel():
            take = min(rows - held, k.numel() - start)
            keys.append(k[start : start + take])
            values.append(v[start : start + take])
            held += take
            start += take
            if held == rows:
                yield torch.cat(keys), {VALUES: torch.cat(values)}
                keys, values, held = [], [], 0
    if held:
        yield torch.cat(keys), {VALUES: torch.cat(values)}


# ---------------------------------------------------------------------------- dense


def _module_trees(dense: DenseState, where: Path) -> dict[str, dict[str, Any]]:
    """The state tree of every ``nn.Module`` entry of the dense state, by name."""
    out = {}
    for name, info in dense.trees.items():
        if not isinstance(info, dict) or info.get("kind") != "module":
            continue
        tree = info.get("tree")
        if not isinstance(tree, dict):
            raise CheckpointError(f"{where / MANIFEST}: module {name!r} has a malformed tree")
        out[name] = tree
    return out


def _saved_modules_job(
    modules: dict[str, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    where: Path,
) -> DenseJob:
    trees: dict[str, Any] = {}
    host: dict[str, torch.Tensor] = {}
    for name, tree in modules.items():
        try:
            state = decode_tree(tree, tensors, f"{where}: {name!r}")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        trees[name], ts = module_serving_entry(name, state, dtype)
        host.update(ts)
    return DenseJob(trees, host)
