"""What a serving export holds, and the pieces of one, whatever it is written from: the
live objects (:func:`~recstack.saver.export_for_serving`) or a checkpoint's files
(:func:`~recstack.saver.export_checkpoint`).

An export is laid out like a checkpoint of kind ``"serving"`` whose tables hold one slot,
``"values"``, in the export's dtype (recorded in the manifest's ``extra``), and whose
dense entries are the modules' tensors, floating ones in that dtype. Its directory holds
nothing else: a directory with other entries is refused, never cleared.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from recstack.saver.dtype_names import dtype_name
from recstack.saver.errors import CheckpointError
from recstack.saver.manifest import MANIFEST
from recstack.saver.snapshot import host_copies
from recstack.saver.stateful import declared_dim
from recstack.saver.tree import encode_tree

__all__ = [
    "SERVING_DTYPES",
    "VALUES",
    "check_export_dir",
    "check_serving_dtype",
    "module_serving_entry",
    "prepare_export_dir",
    "serving_rows",
    "serving_table_metadata",
]

#: The dtypes a serving export can be written in.
SERVING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The one slot of an export's tables: the embedding rows.
VALUES = "values"
# What an export directory may hold besides the manifest: anything else means the caller
# pointed at a directory that is not an export (never deleted).
_OWN_ENTRIES = {"sparse", "dense", "rank"}


def check_serving_dtype(dtype: object, who: str) -> None:
    """Raise unless ``dtype`` is one of :data:`SERVING_DTYPES`.

    Args:
        dtype: the dtype asked for.
        who: the function asked, for the message.

    Raises:
        TypeError: another dtype, naming the allowed ones.
    """
    if dtype not in SERVING_DTYPES:
        raise TypeError(
            f"{who}: dtype must be one of {[dtype_name(d) for d in SERVING_DTYPES]}, got {dtype!r}"
        )


def check_export_dir(out: Path) -> list[Path]:
    """Refuse a directory that holds a complete export or foreign files; return what an
    unfinished export left there (to clear).

    Args:
        out: the export directory (it may not exist yet).

    Raises:
        CheckpointError: ``out`` holds a complete export, or entries an export does not
            write.
    """
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


def prepare_export_dir(out: Path, rank: int, group: bool) -> None:
    """Refuse a directory that holds a complete export or foreign files (every rank checks,
    so all of them raise); on rank 0 clear what an unfinished export left; then let every
    rank write.

    Args:
        out: the export directory.
        rank: this process's rank.
        group: synchronize the ranks through ``torch.distributed`` once it is ready.

    Raises:
        CheckpointError: as :func:`check_export_dir`.
    """
    entries = check_export_dir(out)
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


def serving_table_metadata(
    name: str, meta: Any, dtype: torch.dtype
) -> tuple[dict[str, Any], int | None]:
    """``(metadata of the table in the export, its row width or None)`` from the table's
    own metadata (live, or as a checkpoint recorded it).

    Args:
        name: the table's name.
        meta: its metadata (``state_metadata()``).
        dtype: the export's dtype.
    """
    dim = declared_dim(meta)
    # Without a declared dim, the slots come from the first chunk a rank writes.
    slots = {} if dim is None else {VALUES: {"dtype": dtype_name(dtype), "shape": [dim]}}
    serving_meta: dict[str, Any] = {"table": name, "dtype": dtype_name(dtype), "slots": slots}
    if dim is not None:
        serving_meta["dim"] = dim
    source = meta.get("format") if isinstance(meta, Mapping) else None
    if isinstance(source, str):
        serving_meta["source_format"] = source
    return serving_meta, dim


def serving_rows(
    name: str,
    chunks: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    dtype: torch.dtype,
    dim: int | None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The ``"values"`` slot of each chunk, cast to ``dtype`` where the rows live.

    Args:
        name: the table's name, for errors.
        chunks: its ``(keys, {slot: rows})`` chunks.
        dtype: the export's dtype.
        dim: the row width the metadata declares (``None``: not checked).

    Raises:
        CheckpointError: a chunk without ``"values"`` rows or of the wrong shape.
        TypeError: rows that are not floating point, keys that are not int64.
    """
    for keys, slots in chunks:
        values = slots.get(VALUES)
        if values is None:
            raise CheckpointError(
                f"table {name!r}: its export chunks have no {VALUES!r} slot (they have "
                f"{sorted(slots)}); only tables of embedding rows can be exported for serving"
            )
        if not values.is_floating_point():
            raise TypeError(f"table {name!r}: its {VALUES!r} rows are {values.dtype}, not float")
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
        yield keys, {VALUES: values.detach().to(dtype)}


def module_serving_entry(
    name: str, state: Mapping[str, Any], dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(dense tree entry, host tensors)`` of a module's state dict in the export: its
    tensors only, floating ones cast to ``dtype``.

    Args:
        name: the module's name (its tensors' name prefix).
        state: its state dict.
        dtype: the export's dtype.
    """
    kept = {
        key: (value.detach().to(dtype) if value.is_floating_point() else value.detach())
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    tree, ts = encode_tree(kept, name)
    return {"kind": "module", "tree": tree}, host_copies(ts, snapshot=False, pool=None)
