"""Export for serving from the live objects: :func:`export_for_serving` writes each
table's ids and embedding rows and the modules' dense weights in one dtype (see
:mod:`recstack.saver.serving_format`); :func:`~recstack.saver.load_for_inference` reads
the export back.

It is written like a checkpoint (the same layout, per-rank part files, CRC-32 checksums,
files written aside and renamed, ``manifest.json`` last) with kind ``"serving"``, so it
is complete or ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import HasKeyedStates, KeyedState
from recstack.core.checks import check_int
from recstack.saver.dtype_names import dtype_name
from recstack.saver.parallel import default_threads, resolve_ranks
from recstack.saver.progress import Progress
from recstack.saver.serving_format import (
    check_serving_dtype,
    module_serving_entry,
    prepare_export_dir,
    serving_rows,
    serving_table_metadata,
)
from recstack.saver.snapshot import estimate_chunk_rows, iter_host_chunks
from recstack.saver.stateful import PerRank, sort_stateful
from recstack.saver.write import DenseJob, RankJob, TableJob, write_rank

__all__ = ["export_for_serving"]


def export_for_serving(
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    step: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    part_bytes: int = 256 << 20,
    dense_file_bytes: int = 1 << 30,
    threads: int | None = None,
    pool: ThreadPoolExecutor | None = None,
    progress: bool | None = None,
    barrier: bool | None = None,
    **stateful: Any,
) -> Path:
    """Write the serving export of the named objects into ``out_dir``; return it.

    Args:
        out_dir: the export directory (created when missing). It must not hold a complete
            export already; what an unfinished export left there is cleared by rank 0.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``: the dtype of
            every table's rows and of the modules' floating tensors.
        step: the training step recorded in the manifest (:attr:`ServingModel.step`).
        rank: this process's rank; default from ``torch.distributed`` when initialized,
            else ``0``. Every rank writes the rows its tables hold
            (one part file per exported chunk), rank 0 also the dense weights; the last
            rank to finish writes the manifest. Given without a process group, the ranks
            run one after another into the same ``out_dir``, rank 0 first.
        world_size: the number of ranks; default from ``torch.distributed``, else ``1``.
        part_bytes: about how many bytes of serving rows (ids and ``dtype`` values) one
            part file holds (the export chunk; the state's other slots are gathered with
            it, so it briefly takes more memory where the table lives).
        dense_file_bytes: the dense tensors are split into files of about this size.
        threads: writer threads when ``pool`` is not given (default: CPU count, <= 16).
        pool: a thread pool to write with (a :class:`~recstack.saver.Checkpointer`'s).
        progress: show a progress line; ``None`` shows it when stderr is a terminal.
        barrier: synchronize the ranks through ``torch.distributed`` (after the directory
            is prepared, and before returning, when the manifest is there); default: when
            ``rank``/``world_size`` come from it.
        **stateful: what to export, by name: ``nn.Module`` objects (their tables and
            dense weights), ``KeyedState`` objects, dicts of them, objects with
            ``keyed_states()``. Tables get the names a checkpoint gives them
            (``"model.ec.item"`` for table ``item`` of submodule ``ec`` of ``model``).

    Raises:
        TypeError: an object that is not exported for serving (an optimizer, a scheduler,
            a dict of values, a ``PerRank``), an unsupported ``dtype``, or a table whose
            ``"values"`` rows are not floating point; named.
        ValueError: a bad name, ``rank``/``world_size`` or size.
        CheckpointError: ``out_dir`` holds a complete export, or files that are not an
            export's; a table without a ``"values"`` slot; ranks that did not export the
            same tables.
    """
    check_serving_dtype(dtype, "export_for_serving")
    check_int(step, "export_for_serving: step", minimum=0)
    check_int(part_bytes, "export_for_serving: part_bytes", minimum=1)
    check_int(dense_file_bytes, "export_for_serving: dense_file_bytes", minimum=1)
    n_threads = default_threads() if threads is None else threads
    check_int(n_threads, "export_for_serving: threads", minimum=1)
    rank, world_size, group = resolve_ranks(rank, world_size, "export_for_serving")
    if barrier is not None:
        group = bool(barrier)
    _refuse_non_serving(stateful)
    objs = sort_stateful(stateful)
    out = Path(out_dir)
    prepare_export_dir(out, rank, group)
    tables = [_table_job(name, state, dtype, part_bytes) for name, state in objs.tables.items()]
    dense = _modules_job(objs.dense, dtype) if rank == 0 else None
    job = RankJob(
        ckpt=out,
        step=step,
        kind="serving",
        rank=rank,
        world_size=world_size,
        base=None,
        tables=tables,
        dense=dense,
        per_rank={"rng": None, "states": {}},
        per_rank_tensors={},
        dense_file_bytes=dense_file_bytes,
        max_in_flight=2 * n_threads,
        extra={"dtype": dtype_name(dtype)},
    )
    bar = Progress(f"exporting {out.name} for serving", enabled=progress)
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(n_threads, thread_name_prefix="recstack-export")
    assert pool is not None
    try:
        write_rank(job, pool, bar.add)
    finally:
        bar.close()
        if own:
            pool.shutdown(wait=True)
    if group:
        dist.barrier()
    return out


def _refuse_non_serving(stateful: Mapping[str, Any]) -> None:
    """Only modules and tables have a serving form: refuse the rest before writing."""
    for name, obj in stateful.items():
        if isinstance(obj, (nn.Module, KeyedState, HasKeyedStates)):
            continue
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, KeyedState) for v in obj.values())
        ):
            continue
        what = "a PerRank object" if isinstance(obj, PerRank) else f"a {type(obj).__name__}"
        raise TypeError(
            f"export_for_serving: {name!r} is {what}; a serving export holds only the tables "
            "and dense weights of models: pass nn.Module objects, KeyedStates (or dicts of "
            "them) and objects with keyed_states(), not optimizers, schedulers, dicts of "
            "values or per-rank state"
        )


def _table_job(name: str, state: KeyedState, dtype: torch.dtype, part_bytes: int) -> TableJob:
    serving_meta, dim = serving_table_metadata(name, state.state_metadata(), dtype)
    rows = estimate_chunk_rows({"slots": serving_meta["slots"]}, part_bytes)
    chunks = iter_host_chunks(
        serving_rows(name, state.export_chunks(rows), dtype, dim), snapshot=False, pool=None
    )
    return TableJob(name, serving_meta, chunks)


def _modules_job(dense: Mapping[str, Any], dtype: torch.dtype) -> DenseJob:
    trees: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, obj in dense.items():
        if not isinstance(obj, nn.Module):
            # An object with keyed_states() that also has a state_dict: its tables are
            # exported, its other state has no serving form.
            continue
        trees[name], ts = module_serving_entry(name, obj.state_dict(), dtype)
        tensors.update(ts)
    return DenseJob(trees, tensors)
