"""Serving exports read back: each table's ids and embedding rows, and the dense weights,
in one dtype, as read-only lookups.

A serving export is what an inference server needs of a trained model and nothing more:

* per table (every core ``KeyedState`` found as a checkpoint finds it, e.g. the tables of
  an embedding collection inside a model), its keys and the ``"values"`` slot of its
  export chunks, cast to ``dtype``; no optimizer slots, no row metadata;
* the tensors of every ``torch.nn.Module``'s ``state_dict()``, floating ones cast to
  ``dtype`` (non-tensor entries such as an embedding collection's step counters are left
  out).

It is written like a checkpoint (the same layout, per-rank part files, CRC-32 checksums,
files written aside and renamed, ``manifest.json`` last) with kind ``"serving"``, so it
is complete or ignored (:mod:`recstack.saver.serving_export`,
:mod:`recstack.saver.convert`). :func:`load_for_inference` reads it back: each table's keys
sorted once with their rows in that order, looked up with ``torch.searchsorted`` (pure
torch, CPU or CUDA).

Examples:
    >>> import tempfile, torch
    >>> from recstack.saver import export_for_serving, load_for_inference
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from recstack.saver.dtype_names import DTYPES_BY_NAME, dtype_name
from recstack.saver.errors import CheckpointError
from recstack.saver.manifest import MANIFEST, read_manifest
from recstack.saver.parallel import default_threads
from recstack.saver.read import CheckedFile, read_checked, read_parts
from recstack.saver.serving_format import SERVING_DTYPES, VALUES
from recstack.saver.stateful import declared_dim
from recstack.saver.tree import decode_tree

__all__ = ["PoolingMode", "ServingModel", "ServingTable", "load_for_inference"]

#: How :meth:`ServingTable.lookup_pooled` pools a bag of ids.
PoolingMode = Literal["sum", "mean"]


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
        self._check_device(ids, what)
        return ids.to(torch.int64)

    def _check_device(self, t: torch.Tensor, what: str) -> None:
        if t.device != self.device:
            raise ValueError(
                f"ServingTable {self.name!r}: {what} are on {t.device} but the table is on "
                f"{self.device}"
            )

    def lookup(
        self, ids: torch.Tensor, *, default: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, found)`` of integer ``ids`` (any shape): ``values`` is
        ``[*ids.shape, dim]`` in the table dtype, ``found`` a bool mask of ``ids``' shape.

        Unknown ids read ``default`` (``[dim]``; else the table's :attr:`default`; else
        zeros). No host sync.

        Args:
            ids: integer ids, on the table's device.
            default: the row unknown ids read (``None``: the table's default).
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
        """The rows of ``ids`` (see :meth:`lookup`).

        Args:
            ids: integer ids, on the table's device.
        """
        return self.lookup(ids)[0]

    def lookup_pooled(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        mode: PoolingMode = "sum",
        *,
        weights: torch.Tensor | None = None,
        default: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pool the rows of bags of ids, like ``nn.EmbeddingBag``: bag ``b`` holds
        ``ids[offsets[b]:offsets[b + 1]]`` (1-D ``ids``, int64 ``offsets`` of length
        ``B + 1`` as in core's ``JaggedTensor``). Returns ``[B, dim]`` in the table dtype
        (accumulated in fp32).

        Args:
            ids: 1-D integer ids of every bag, on the table's device.
            offsets: int64 ``[B + 1]`` bag boundaries into ``ids``.
            mode: ``"sum"`` or ``"mean"`` (an empty bag gives zeros; unknown ids read the
                default row and count in the mean, as in the embedding engine's eval).
            weights: per-id weights (``[len(ids)]``), for a weighted ``"sum"``.
            default: as in :meth:`lookup`.

        Offsets are not read on the host (no sync): ids past ``offsets[-1]`` are ignored.
        """
        if mode not in get_args(PoolingMode):
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
        self._check_device(offsets, "offsets")
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

    Args:
        path: the export directory.
        step: the step recorded at export.
        dtype: the export's dtype.
        tables: a :class:`ServingTable` per table.
        dense: each module's dense weights, by module name.

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

        Args:
            name: a module's name, or a dotted path below it.

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

    Args:
        path: the export directory.
        device: where the tables and dense weights go.
        threads: reader threads (default: the CPU count, at most 16).

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
    dtype = DTYPES_BY_NAME.get(str(extra.get("dtype")))
    if dtype not in SERVING_DTYPES:
        raise CheckpointError(f"{where}: unknown serving dtype {extra.get('dtype')!r}")
    device = torch.device(device)
    n_threads = threads if threads is not None else default_threads()
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
    info = (entry.get("slots") or {}).get(VALUES) or {}
    shape = info.get("shape")
    dim = shape[0] if isinstance(shape, list) and len(shape) == 1 else None
    if dim is None:
        dim = declared_dim(entry.get("metadata"))
    if info and info.get("dtype") != dtype_name(dtype):
        raise CheckpointError(
            f"{where}: rows are {info.get('dtype')}, the export is {dtype_name(dtype)}"
        )
    files, total = [], 0
    for r in entry["ranks"]:
        files += [CheckedFile(ckpt, manifest, rel) for rel in r.get("parts", [])]
        total += int(r.get("keys", 0))
    keys = torch.empty(total, dtype=torch.int64)
    values = torch.empty((total, dim or 0), dtype=dtype)
    at = 0
    for f, tensors in zip(files, read_parts(files, pool), strict=True):
        k, v = tensors.get("keys"), tensors.get(f"slot/{VALUES}")
        if k is None or v is None:
            raise CheckpointError(f"{f.where}: lacks tensor 'keys' or 'slot/{VALUES}'")
        if k.dtype != torch.int64 or k.dim() != 1:
            raise CheckpointError(f"{f.where}: keys are {k.dtype} {list(k.shape)}, not int64 [n]")
        if v.dtype != dtype or v.dim() != 2 or v.shape[0] != k.shape[0] or v.shape[1] != (dim or 0):
            raise CheckpointError(
                f"{f.where}: values are {v.dtype} {list(v.shape)}, the manifest says "
                f"{dtype_name(dtype)} [{k.shape[0]}, {dim}]"
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
            dtype_name(t.dtype) != expect.get("dtype") or list(t.shape) != expect.get("shape")
        ):
            raise CheckpointError(
                f"{ckpt / rel}: tensor {name!r} is {dtype_name(t.dtype)} {list(t.shape)}, the "
                f"manifest says {expect.get('dtype')} {expect.get('shape')}"
            )
        tensors[name] = t
    out = {}
    for name, info in trees.items():
        state = decode_tree(info.get("tree") or {}, tensors, f"{ckpt}: {name!r}")
        out[name] = {k: v.to(device) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out
