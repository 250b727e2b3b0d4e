"""Export for serving: each table's ids and embedding rows, and the dense weights, in one
dtype; loaded back as read-only lookups.

A serving export is what an inference server needs of a trained model and nothing more:

* per table (every core ``KeyedState`` found as a checkpoint finds it, e.g. the tables of
  an embedding collection inside a model), its keys and the ``"values"`` slot of its
  export chunks, cast to ``dtype``; no optimizer slots, no row metadata;
* the tensors of every ``torch.nn.Module``'s ``state_dict()``, floating ones cast to
  ``dtype`` (non-tensor entries such as an embedding collection's step counters are left
  out).

It is written like a checkpoint (the same layout, per-rank part files, CRC-32 checksums,
files written aside and renamed, ``manifest.json`` last) with kind ``"serving"``, so it
is complete or ignored. :func:`load_for_inference` reads it back: each table's keys
sorted once with their rows in that order, looked up with ``torch.searchsorted`` (pure
torch, CPU or CUDA).

Example:
    >>> import tempfile, torch
    >>> from recstack.saver.serving import export_for_serving, load_for_inference
    >>> class Table:  # any KeyedState: here 3 ids with 2-wide rows
    ...     def state_metadata(self):
    ...         return {"dim": 2}
    ...     def export_chunks(self, chunk_rows):
    ...         yield torch.tensor([30, 10, 20]), {"values": torch.arange(6.0).view(3, 2)}
    ...     def import_chunk(self, keys, slots, metadata, shard=None):
    ...         return 0
    >>> out = export_for_serving(tempfile.mkdtemp(), dtype=torch.bfloat16, item=Table())
    >>> model = load_for_inference(out)
    >>> values, found = model.tables["item"].lookup(torch.tensor([10, 99]))
    >>> values.tolist(), found.tolist()
    ([[2.0, 3.0], [0.0, 0.0]], [True, False])
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recstack.core import HasKeyedStates, KeyedState
from recstack.saver.errors import CheckpointError
from recstack.saver.files import SAFETENSORS_DTYPES
from recstack.saver.manifest import MANIFEST, read_manifest
from recstack.saver.progress import Progress
from recstack.saver.read import CheckedFile, read_checked, read_parts
from recstack.saver.snapshot import estimate_chunk_rows, host_copies, iter_host_chunks
from recstack.saver.stateful import PerRank, declared_dim, sort_stateful
from recstack.saver.tree import decode_tree, encode_tree
from recstack.saver.write import DenseJob, RankJob, TableJob, write_rank

__all__ = [
    "SERVING_DTYPES",
    "ServingModel",
    "ServingTable",
    "export_for_serving",
    "load_for_inference",
]

#: The dtypes a serving export can be written in.
SERVING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VALUES = "values"
_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES}
_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
# What an export directory may hold besides the manifest: anything else means the caller
# pointed at a directory that is not an export (never deleted).
_OWN_ENTRIES = {"sparse", "dense", "rank"}


def _name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------- export


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
    if dtype not in SERVING_DTYPES:
        raise TypeError(
            f"export_for_serving: dtype must be one of {[_name(d) for d in SERVING_DTYPES]}, "
            f"got {dtype!r}"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"export_for_serving: step must be an int >= 0, got {step!r}")
    for what, value in (("part_bytes", part_bytes), ("dense_file_bytes", dense_file_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"export_for_serving: {what} must be an int >= 1, got {value!r}")
    rank, world_size, group = _place(rank, world_size)
    if barrier is not None:
        group = bool(barrier)
    _refuse_non_serving(stateful)
    objs = sort_stateful(stateful)
    out = Path(out_dir)
    _prepare(out, rank, group)
    tables = [_table_job(name, state, dtype, part_bytes) for name, state in objs.tables.items()]
    dense = _dense_job(objs.dense, dtype) if rank == 0 else None
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
        max_in_flight=2 * _threads(threads),
        extra={"dtype": _name(dtype)},
    )
    bar = Progress(f"exporting {out.name} for serving", enabled=progress)
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(_threads(threads), thread_name_prefix="recstack-export")
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


def _threads(threads: int | None) -> int:
    n = threads if threads is not None else min(16, os.cpu_count() or 4)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"export_for_serving: threads must be an int >= 1, got {threads!r}")
    return n


def _place(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, use the process group)``."""
    if (rank is None) != (world_size is None):
        raise ValueError("export_for_serving: give both rank and world_size, or neither")
    group = rank is None and dist.is_available() and dist.is_initialized()
    if rank is None or world_size is None:
        rank = dist.get_rank() if group else 0
        world_size = dist.get_world_size() if group else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"export_for_serving: world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"export_for_serving: rank must be in [0, {world_size}), got {rank!r}")
    return rank, world_size, group


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


def _refuse_out_dir(out: Path) -> list[Path]:
    """Refuse a directory that holds a complete export or foreign files; return what an
    unfinished export left there (to clear)."""
    if (out / MANIFEST).exists():
        raise CheckpointError(
            f"{out}: holds a complete export already; export into a new directory (or "
            "remove this one)"
        )
    entries = list(out.iterdir()) if out.is_dir() else []
    foreign = sorted(p.name for p in entries if not _own_entry(p.name))
    if foreign:
        raise CheckpointError(
            f"{out}: not empty and not an unfinished export (it holds {foreign[:5]}); "
            "export into a new or empty directory"
        )
    return entries


def _prepare(out: Path, rank: int, group: bool) -> None:
    """Refuse a directory that holds a complete export or foreign files (every rank checks,
    so all of them raise); on rank 0 clear what an unfinished export left; then let every
    rank write."""
    entries = _refuse_out_dir(out)
    if rank == 0:
        for p in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    if group:
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)


def _own_entry(name: str) -> bool:
    """Whether an export (finished or not) writes an entry of this name."""
    return (
        name in _OWN_ENTRIES
        or name.startswith(".writing")
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _table_metadata(name: str, meta: Any, dtype: torch.dtype) -> tuple[dict[str, Any], int | None]:
    """``(metadata of the table in the export, its row width or None)`` from the table's
    own metadata (live, or as a checkpoint recorded it)."""
    dim = declared_dim(meta)
    # Without a declared dim, the slots come from the first chunk a rank writes.
    slots = {} if dim is None else {_VALUES: {"dtype": _name(dtype), "shape": [dim]}}
    serving_meta: dict[str, Any] = {"table": name, "dtype": _name(dtype), "slots": slots}
    if dim is not None:
        serving_meta["dim"] = dim
    source = meta.get("format") if isinstance(meta, Mapping) else None
    if isinstance(source, str):
        serving_meta["source_format"] = source
    return serving_meta, dim


def _table_job(name: str, state: KeyedState, dtype: torch.dtype, part_bytes: int) -> TableJob:
    serving_meta, dim = _table_metadata(name, state.state_metadata(), dtype)
    rows = estimate_chunk_rows({"slots": serving_meta["slots"]}, part_bytes)
    chunks = iter_host_chunks(
        _values_only(name, state.export_chunks(rows), dtype, dim), snapshot=False, pool=None
    )
    return TableJob(name, serving_meta, chunks)


def _values_only(
    name: str,
    chunks: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    dtype: torch.dtype,
    dim: int | None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The ``"values"`` slot of each chunk, cast to ``dtype`` where the rows live."""
    for keys, slots in chunks:
        values = slots.get(_VALUES)
        if values is None:
            raise CheckpointError(
                f"table {name!r}: its export chunks have no {_VALUES!r} slot (they have "
                f"{sorted(slots)}); only tables of embedding rows can be exported for serving"
            )
        if not values.is_floating_point():
            raise TypeError(f"table {name!r}: its {_VALUES!r} rows are {values.dtype}, not float")
        if values.dim() != 2 or values.shape[0] != keys.shape[0] or keys.dim() != 1:
            raise CheckpointError(
                f"table {name!r}: a chunk has keys of shape {tuple(keys.shape)} and values of "
                f"shape {tuple(values.shape)}; expected [n] and [n, dim]"
            )
        if dim is not None and values.shape[1] != dim:
            raise CheckpointError(
                f"table {name!r}: a chunk has rows of width {values.shape[1]}, its metadata "
                f"says dim {dim}"
            )
        if keys.dtype != torch.int64:
            raise TypeError(f"table {name!r}: keys must be int64, got {keys.dtype}")
        yield keys, {_VALUES: values.detach().to(dtype)}


def _dense_job(dense: Mapping[str, Any], dtype: torch.dtype) -> DenseJob:
    trees: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, obj in dense.items():
        if not isinstance(obj, nn.Module):
            # An object with keyed_states() that also has a state_dict: its tables are
            # exported, its other state has no serving form.
            continue
        trees[name], ts = _module_entry(name, obj.state_dict(), dtype)
        tensors.update(ts)
    return DenseJob(trees, tensors)


def _module_entry(
    name: str, state: Mapping[str, Any], dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(dense tree entry, host tensors)`` of a module's state dict in the export: its
    tensors only, floating ones cast to ``dtype``."""
    kept = {
        key: (value.detach().to(dtype) if value.is_floating_point() else value.detach())
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    tree, ts = encode_tree(kept, name)
    return {"kind": "module", "tree": tree}, host_copies(ts, snapshot=False, pool=None)


# ---------------------------------------------------------------------------- serving


class ServingTable(nn.Module):
    """A read-only embedding table: ids -> rows, by binary search in the sorted ids.

    Args:
        keys: int64 ``[n]`` distinct ids (sorted here, once).
        values: ``[n, dim]`` rows of ``keys``.
        name: the table's name (in error messages).
        default: the row unknown ids read (``[dim]``); ``None`` reads zeros.

    ``keys`` and ``values`` are non-persistent buffers: ``.to(device)`` moves them and a
    model holding the table loads its dense ``state_dict`` without them. Used in eval,
    ``table(ids)`` is ``table.lookup(ids)[0]``.
    """

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        name: str = "table",
        default: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
            raise TypeError(f"ServingTable {name!r}: keys must be a 1-D int64 tensor")
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise TypeError(f"ServingTable {name!r}: values must be a 2-D tensor [n, dim]")
        if values.shape[0] != keys.shape[0] or values.device != keys.device:
            raise ValueError(
                f"ServingTable {name!r}: {keys.shape[0]} keys on {keys.device} but values of "
                f"shape {tuple(values.shape)} on {values.device}"
            )
        if keys.numel() > 1:
            keys, order = torch.sort(keys)
            values = values.index_select(0, order)
            repeated = keys[1:] == keys[:-1]
            if bool(repeated.any()):
                dup = int(keys[1:][repeated][0])
                raise ValueError(f"ServingTable {name!r}: id {dup} appears more than once")
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.default = default

    @property
    def dim(self) -> int:
        """The row width."""
        return int(self.values.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The rows' dtype."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """Where the rows live (where ids must be)."""
        return self.values.device

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __bool__(self) -> bool:  # an empty table is still a module, not "false"
        return True

    def extra_repr(self) -> str:
        return f"name={self.name!r}, ids={len(self)}, dim={self.dim}, dtype={self.dtype}"

    def _default_row(self, default: torch.Tensor | None) -> torch.Tensor | None:
        row = default if default is not None else self.default
        if row is None:
            return None
        row = torch.as_tensor(row)
        if row.shape != (self.dim,):
            raise ValueError(
                f"ServingTable {self.name!r}: the default row has shape {tuple(row.shape)}, "
                f"expected ({self.dim},)"
            )
        return row.to(device=self.device, dtype=self.dtype)

    def _check_ids(self, ids: object, what: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ServingTable {self.name!r}: {what} must be a tensor")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ServingTable {self.name!r}: {what} must be integers, got {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(
                f"ServingTable {self.name!r}: {what} are on {ids.device} but the table is on "
                f"{self.device}"
            )
        return ids.to(torch.int64)

    def lookup(
        self, ids: torch.Tensor, *, default: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, found)`` of integer ``ids`` (any shape): ``values`` is
        ``[*ids.shape, dim]`` in the table dtype, ``found`` a bool mask of ``ids``' shape.

        Unknown ids read ``default`` (``[dim]``; else the table's :attr:`default`; else
        zeros). No host sync.
        """
        ids = self._check_ids(ids, "ids")
        flat = ids.reshape(-1)
        n = len(self)
        if n == 0:
            found = torch.zeros(flat.shape, dtype=torch.bool, device=self.device)
            rows = torch.zeros((flat.numel(), self.dim), dtype=self.dtype, device=self.device)
        else:
            pos = torch.searchsorted(self.keys, flat).clamp_(max=n - 1)
            found = self.keys.index_select(0, pos) == flat
            rows = self.values.index_select(0, pos)
        fill = self._default_row(default)
        if fill is None:
            rows = rows.masked_fill(~found.unsqueeze(1), 0)
        else:
            rows = torch.where(found.unsqueeze(1), rows, fill)
        return rows.view(*ids.shape, self.dim), found.view(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` (see :meth:`lookup`)."""
        return self.lookup(ids)[0]

    def lookup_pooled(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        mode: str = "sum",
        *,
        weights: torch.Tensor | None = None,
        default: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pool the rows of bags of ids, like ``nn.EmbeddingBag``: bag ``b`` holds
        ``ids[offsets[b]:offsets[b + 1]]`` (1-D ``ids``, int64 ``offsets`` of length
        ``B + 1`` as in core's ``JaggedTensor``). Returns ``[B, dim]`` in the table dtype
        (accumulated in fp32).

        Args:
            mode: ``"sum"`` or ``"mean"`` (an empty bag gives zeros; unknown ids read the
                default row and count in the mean, as in the embedding engine's eval).
            weights: per-id weights (``[len(ids)]``), for a weighted ``"sum"``.
            default: as in :meth:`lookup`.

        Offsets are not read on the host (no sync): ids past ``offsets[-1]`` are ignored.
        """
        if mode not in ("sum", "mean"):
            raise ValueError(
                f"ServingTable {self.name!r}: mode must be 'sum' or 'mean', got {mode!r}"
            )
        ids = self._check_ids(ids, "ids")
        if ids.dim() != 1:
            raise ValueError(
                f"ServingTable {self.name!r}: pooled ids must be 1-D, got {tuple(ids.shape)}"
            )
        if (
            not isinstance(offsets, torch.Tensor)
            or offsets.dtype != torch.int64
            or offsets.dim() != 1
            or offsets.numel() < 1
        ):
            raise TypeError(
                f"ServingTable {self.name!r}: offsets must be a 1-D int64 tensor of length B + 1"
            )
        if offsets.device != self.device:
            raise ValueError(
                f"ServingTable {self.name!r}: offsets are on {offsets.device} but the table is "
                f"on {self.device}"
            )
        rows, _ = self.lookup(ids, default=default)
        rows = rows.float()
        if weights is not None:
            if mode != "sum":
                raise ValueError(f"ServingTable {self.name!r}: weights need mode='sum'")
            if not isinstance(weights, torch.Tensor) or weights.shape != ids.shape:
                raise ValueError(
                    f"ServingTable {self.name!r}: weights must be a tensor of shape "
                    f"{tuple(ids.shape)}"
                )
            rows = rows * weights.to(device=self.device, dtype=torch.float32).unsqueeze(1)
        batch = offsets.numel() - 1
        # Bag of item j: how many bag ends are <= j (items past the last end go to bag B).
        position = torch.arange(ids.numel(), device=self.device)
        bag = torch.searchsorted(offsets[1:], position, right=True)
        out = torch.zeros((batch + 1, self.dim), dtype=torch.float32, device=self.device)
        out.index_add_(0, bag, rows)
        out = out[:batch]
        if mode == "mean":
            lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(torch.float32)
            out = out / lengths.unsqueeze(1)
        return out.to(self.dtype)


class ServingModel:
    """What :func:`load_for_inference` read: the tables and dense weights of an export.

    Attributes:
        path: the export directory.
        step: the step recorded at export.
        dtype: the export's dtype.
        tables: a :class:`ServingTable` per table, by the name it was exported under.
    """

    def __init__(
        self,
        path: Path,
        step: int,
        dtype: torch.dtype,
        tables: dict[str, ServingTable],
        dense: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        self.path = path
        self.step = step
        self.dtype = dtype
        self.tables = tables
        self._dense = dense

    @property
    def dense_names(self) -> list[str]:
        """The names of the modules whose dense weights the export holds."""
        return sorted(self._dense)

    def dense_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The dense weights of module ``name`` (as exported), or of one of its submodules
        (``"model.tower"``: the entries under that prefix, the prefix removed), for
        ``load_state_dict``.

        Raises:
            KeyError: no such module or submodule in the export, listing what it holds.
        """
        if name in self._dense:
            return dict(self._dense[name])
        for module, state in self._dense.items():
            if name.startswith(module + "."):
                prefix = name[len(module) + 1 :] + "."
                found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if found:
                    return found
        raise KeyError(
            f"{self.path}: no dense weights under {name!r}; the export holds modules "
            f"{self.dense_names}"
        )

    def __repr__(self) -> str:
        return (
            f"ServingModel(path={str(self.path)!r}, step={self.step}, dtype={self.dtype}, "
            f"tables={ {n: len(t) for n, t in self.tables.items()} }, dense={self.dense_names})"
        )


# ---------------------------------------------------------------------------- load


def load_for_inference(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
) -> ServingModel:
    """Read the serving export at ``path`` onto ``device``.

    Every file is checked against the manifest (size, CRC-32, tensor dtypes and shapes);
    each table's ids are sorted once, its rows put in that order.

    Raises:
        CheckpointError: no manifest, not a serving export, a missing, truncated or
            corrupt file (named), or an id held by two ranks' parts.
    """
    ckpt = Path(path)
    manifest = read_manifest(ckpt)
    where = f"{ckpt / MANIFEST}"
    if manifest["kind"] != "serving":
        raise CheckpointError(
            f"{where}: a {manifest['kind']!r} checkpoint, not a serving export; write one with "
            "export_for_serving (or load this one with Checkpointer.load)"
        )
    extra = manifest.get("extra") if isinstance(manifest.get("extra"), dict) else {}
    dtype = _BY_NAME.get(str(extra.get("dtype")))
    if dtype not in SERVING_DTYPES:
        raise CheckpointError(f"{where}: unknown serving dtype {extra.get('dtype')!r}")
    device = torch.device(device)
    n_threads = threads if threads is not None else min(16, os.cpu_count() or 4)
    with ThreadPoolExecutor(n_threads, thread_name_prefix="recstack-serving") as pool:
        tables = {
            name: _load_table(ckpt, manifest, name, entry, dtype, device, pool)
            for name, entry in manifest["tables"].items()
        }
        dense = _load_dense(ckpt, manifest, device)
    return ServingModel(ckpt, manifest["step"], dtype, tables, dense)


def _load_table(
    ckpt: Path,
    manifest: dict[str, Any],
    name: str,
    entry: Any,
    dtype: torch.dtype,
    device: torch.device,
    pool: ThreadPoolExecutor,
) -> ServingTable:
    where = f"{ckpt / MANIFEST}: table {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("ranks"), list):
        raise CheckpointError(f"{where}: malformed entry")
    info = (entry.get("slots") or {}).get(_VALUES) or {}
    shape = info.get("shape")
    dim = shape[0] if isinstance(shape, list) and len(shape) == 1 else None
    if dim is None:
        dim = declared_dim(entry.get("metadata"))
    if info and info.get("dtype") != _name(dtype):
        raise CheckpointError(
            f"{where}: rows are {info.get('dtype')}, the export is {_name(dtype)}"
        )
    files, total = [], 0
    for r in entry["ranks"]:
        files += [CheckedFile(ckpt, manifest, rel) for rel in r.get("parts", [])]
        total += int(r.get("keys", 0))
    keys = torch.empty(total, dtype=torch.int64)
    values = torch.empty((total, dim or 0), dtype=dtype)
    at = 0
    for f, tensors in zip(files, read_parts(files, pool), strict=True):
        k, v = tensors.get("keys"), tensors.get(f"slot/{_VALUES}")
        if k is None or v is None:
            raise CheckpointError(f"{f.where}: lacks tensor 'keys' or 'slot/{_VALUES}'")
        if k.dtype != torch.int64 or k.dim() != 1:
            raise CheckpointError(f"{f.where}: keys are {k.dtype} {list(k.shape)}, not int64 [n]")
        if v.dtype != dtype or v.dim() != 2 or v.shape[0] != k.shape[0] or v.shape[1] != (dim or 0):
            raise CheckpointError(
                f"{f.where}: values are {v.dtype} {list(v.shape)}, the manifest says "
                f"{_name(dtype)} [{k.shape[0]}, {dim}]"
            )
        if at + k.shape[0] > total:
            raise CheckpointError(f"{where}: its parts hold more ids than the manifest's {total}")
        keys[at : at + k.shape[0]] = k
        values[at : at + k.shape[0]] = v
        at += k.shape[0]
    if at != total:
        raise CheckpointError(f"{where}: its parts hold {at} ids, the manifest says {total}")
    try:
        return ServingTable(keys.to(device), values.to(device), name=name)
    except ValueError as err:
        raise CheckpointError(
            f"{where}: {err} (in two ranks' parts: export a table every rank holds whole from "
            "one rank, rank=0, world_size=1)"
        ) from None


def _load_dense(
    ckpt: Path, manifest: dict[str, Any], device: torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    dense = manifest.get("dense") or {}
    trees = dense.get("trees") or {}
    files = dense.get("tensors") or {}
    info_of = dense.get("info") or {}
    read: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, rel in files.items():
        if rel not in read:
            read[rel] = read_checked(CheckedFile(ckpt, manifest, rel))
        t = read[rel].get(name)
        if t is None:
            raise CheckpointError(f"{ckpt / rel}: tensor {name!r} is missing")
        expect = info_of.get(name)
        if isinstance(expect, dict) and (
            _name(t.dtype) != expect.get("dtype") or list(t.shape) != expect.get("shape")
        ):
            raise CheckpointError(
                f"{ckpt / rel}: tensor {name!r} is {_name(t.dtype)} {list(t.shape)}, the "
                f"manifest says {expect.get('dtype')} {expect.get('shape')}"
            )
        tensors[name] = t
    out = {}
    for name, info in trees.items():
        state = decode_tree(info.get("tree") or {}, tensors, f"{ckpt}: {name!r}")
        out[name] = {k: v.to(device) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out
