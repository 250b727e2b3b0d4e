"""Write Arrow tables or tensor batches to one Parquet file, atomically.

:func:`write_parquet` takes what a pipeline has at hand (a ``pyarrow.Table``, a
``RecordBatch``, a ColumnIO batch ``dict[str, Tensor | JaggedTensor | KeyedJaggedTensor]``,
or an iterable of any of these) and streams it into one Parquet file in row groups of a
fixed size. The file is written under a hidden name beside the target (``.<name>.<random>.tmp``)
and renamed when complete, so a reader that follows a directory never sees half a file.

Tensor columns map to Arrow as follows (:func:`batch_to_table`):

* 1-D tensor ``[B]`` -> a scalar column of the same dtype (``bool``, ints, floats).
* ``[B, D, ...]`` tensor -> ``fixed_size_list<D>`` (nested once per trailing dim).
* ``JaggedTensor`` -> ``list<values' type>``; values with trailing dims give
  ``list<fixed_size_list<D>>``, a nested JaggedTensor gives ``list<list<...>>``.
* A uint8 ``JaggedTensor`` named in ``strings`` -> ``string`` (UTF-8 checked); any other
  uint8 ``JaggedTensor`` stays ``list<uint8>``: bytes alone cannot tell text from data.
* ``KeyedJaggedTensor`` -> one list column per key, named by the key.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from recstack.columnio.errors import ColumnIOError
from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.core.checks import check_int

__all__ = ["batch_to_table", "write_parquet"]

_INT32_MAX = 2**31 - 1

Batch = Mapping[str, Any]
Writable = pa.Table | pa.RecordBatch | pa.RecordBatchReader | Batch | Iterable[Any]


# ---------------------------------------------------------------------------- tensors -> Arrow


def _tensor_to_arrow(t: torch.Tensor, column: str) -> pa.Array:
    """A ``[N, *trailing]`` tensor as an ``N``-row Arrow array, copying at most once."""
    if t.dim() == 0:
        raise ColumnIOError("a 0-d tensor is not a column; give one value per row", column=column)
    if t.dtype in (torch.bfloat16, torch.complex32, torch.complex64, torch.complex128):
        raise ColumnIOError(
            f"dtype {t.dtype} has no Parquet equivalent; convert it first (e.g. .float())",
            column=column,
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    try:
        flat = t.contiguous().reshape(-1).numpy()
    except (TypeError, RuntimeError) as exc:
        raise ColumnIOError(f"dtype {t.dtype} cannot be written: {exc}", column=column) from exc
    arr: pa.Array = pa.array(flat)
    # Trailing dims become fixed-size lists, innermost first.
    for size in reversed(t.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(size))
    return arr


def _offsets_int32(offsets: torch.Tensor, column: str) -> pa.Array:
    offsets = offsets.detach().cpu()
    if offsets.numel() and int(offsets[-1]) > _INT32_MAX:
        raise ColumnIOError(
            f"{int(offsets[-1])} items in one batch exceed Arrow's list limit of 2**31 - 1; "
            "write smaller batches",
            column=column,
        )
    return pa.array(offsets.to(torch.int32).numpy())


def _jagged_to_arrow(jt: JaggedTensor, column: str, as_string: bool) -> pa.Array:
    if jt.weights is not None:
        raise ColumnIOError(
            "JaggedTensor weights cannot be written alongside the ids; pass them as their own "
            "column (a JaggedTensor with the same offsets and the weights as values)",
            column=column,
        )
    try:
        jt.validate()
    except (ValueError, TypeError) as exc:
        raise ColumnIOError(f"invalid JaggedTensor: {exc}", column=column) from exc
    offsets = _offsets_int32(jt.offsets, column)
    if isinstance(jt.values, JaggedTensor):
        return pa.ListArray.from_arrays(offsets, _jagged_to_arrow(jt.values, column, as_string))
    if as_string:
        if jt.values.dtype != torch.uint8 or jt.values.dim() != 1:
            raise ColumnIOError(
                f"named in strings= but holds {jt.values.dtype} values of "
                f"{jt.values.dim()} dims; a string column is a 1-D uint8 JaggedTensor",
                column=column,
            )
        data = jt.values.detach().cpu().contiguous().numpy()
        arr = pa.StringArray.from_buffers(
            len(offsets) - 1, offsets.buffers()[1], pa.py_buffer(data)
        )
        try:
            arr.validate(full=True)  # UTF-8 and offsets
        except pa.ArrowInvalid as exc:
            raise ColumnIOError(f"not a valid string column: {exc}", column=column) from exc
        return arr
    return pa.ListArray.from_arrays(offsets, _tensor_to_arrow(jt.values, column))


def batch_to_table(batch: Batch, *, strings: Collection[str] = ()) -> pa.Table:
    """A ColumnIO batch (``dict`` of tensors / jagged tensors) as an Arrow table.

    Args:
        batch: column name -> ``Tensor`` (``[B]`` or ``[B, D, ...]``), ``JaggedTensor``
            (``B`` rows) or ``KeyedJaggedTensor`` (one column per key, ``B`` rows each).
        strings: names of uint8 ``JaggedTensor`` columns to write as UTF-8 strings. Other
            uint8 jagged columns are written as ``list<uint8>``.

    Returns:
        A table with the batch's columns in order (KeyedJaggedTensor keys in key order).
        Conversion is vectorized; numeric data is not copied twice.

    Raises:
        ColumnIOError: naming the column: unequal row counts, an unsupported dtype, invalid
            offsets, JaggedTensor weights, invalid UTF-8 in a string column.
    """
    names: list[str] = []
    arrays: list[pa.Array] = []
    strings = set(strings)
    expanded: list[tuple[str, Any]] = []
    for name, value in batch.items():
        if isinstance(value, KeyedJaggedTensor):
            expanded.extend(value.to_dict().items())
        else:
            expanded.append((name, value))
    for name, value in expanded:
        if not isinstance(name, str):
            raise ColumnIOError(f"column names must be str, got {type(name).__name__}")
        if name in names:
            raise ColumnIOError("appears twice in the batch", column=name)
        if isinstance(value, JaggedTensor):
            arr = _jagged_to_arrow(value, name, as_string=name in strings)
        elif isinstance(value, torch.Tensor):
            if name in strings:
                raise ColumnIOError(
                    "named in strings= but is a plain tensor, not a uint8 JaggedTensor",
                    column=name,
                )
            arr = _tensor_to_arrow(value, name)
        else:
            raise ColumnIOError(
                f"unsupported value {type(value).__name__}; expected a Tensor, JaggedTensor "
                "or KeyedJaggedTensor",
                column=name,
            )
        if arrays and len(arr) != len(arrays[0]):
            raise ColumnIOError(
                f"has {len(arr)} rows but column {names[0]!r} has {len(arrays[0])}", column=name
            )
        names.append(name)
        arrays.append(arr)
    missing = strings - set(names)
    if missing:
        raise ColumnIOError(f"strings= names columns not in the batch: {sorted(missing)}")
    return pa.Table.from_arrays(arrays, names=names)


# ---------------------------------------------------------------------------- inputs


def _as_table(item: Any, strings: Collection[str], where: str) -> pa.Table:
    if isinstance(item, pa.Table):
        return item
    if isinstance(item, pa.RecordBatch):
        return pa.Table.from_batches([item])
    if isinstance(item, Mapping):
        return batch_to_table(item, strings=strings)
    raise ColumnIOError(
        f"{where}: cannot write a {type(item).__name__}; give a pyarrow Table or RecordBatch, "
        "a dict of tensors, or an iterable of those"
    )


def _iter_tables(data: Any, strings: Collection[str]) -> tuple[pa.Schema | None, Iterator]:
    """The input's schema when it states one up front, and its tables one by one."""
    if isinstance(data, (pa.Table, pa.RecordBatch, Mapping)):
        return None, iter([_as_table(data, strings, "input")])
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, (pa.Table.from_batches([b]) for b in data)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ColumnIOError(
            f"cannot write a {type(data).__name__}; give a pyarrow Table or RecordBatch, "
            "a dict of tensors, or an iterable of those"
        )
    return None, (_as_table(x, strings, f"item {i}") for i, x in enumerate(data))


def _conform(table: pa.Table, schema: pa.Schema, index: int, uri: str) -> pa.Table:
    """``table`` with ``schema`` exactly, or an error naming the first column that differs."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    got, want = table.schema.names, schema.names
    if got != want:
        for name in want:
            if name not in got:
                raise ColumnIOError(
                    f"input {index} lacks this column of the first input", file=uri, column=name
                )
        for name in got:
            if name not in want:
                raise ColumnIOError(
                    f"input {index} has this column, which the first input lacks",
                    file=uri,
                    column=name,
                )
        raise ColumnIOError(
            f"input {index} has the columns in another order: {got} vs {want}", file=uri
        )
    for field, expected in zip(table.schema, schema, strict=True):
        if field.type != expected.type:
            raise ColumnIOError(
                f"input {index} has type {field.type}, the first input {expected.type}",
                file=uri,
                column=field.name,
            )
        if not expected.nullable and table.column(field.name).null_count:
            raise ColumnIOError(
                f"input {index} has nulls in a non-nullable column", file=uri, column=field.name
            )
    # Same names and types; only nullability or field metadata differ.
    return pa.Table.from_arrays(table.columns, schema=schema)


# ---------------------------------------------------------------------------- paths


def resolve_path(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None
) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path on it: a URI picks its filesystem, else local absolute."""
    path = os.fspath(path)
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _os_path(fs: pafs.FileSystem, path: str) -> str | None:
    """``path`` as an OS path when ``fs`` is the local disk (maybe under a subtree), else None."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
        return os.path.join(fs.base_path, path)
    return None


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_metadata(metadata: Mapping[Any, Any]) -> dict[bytes, bytes]:
    def enc(x: Any) -> bytes:
        if isinstance(x, bytes):
            return x
        if isinstance(x, str):
            return x.encode()
        raise TypeError(f"metadata keys and values must be str or bytes, got {type(x).__name__}")

    return {enc(k): enc(v) for k, v in metadata.items()}


# ---------------------------------------------------------------------------- writing


def write_parquet(
    data: Writable,
    path: str | os.PathLike[str],
    *,
    row_group_size: int = 65_536,
    compression: str = "snappy",
    filesystem: pafs.FileSystem | None = None,
    schema: pa.Schema | None = None,
    strings: Collection[str] = (),
    metadata: Mapping[str | bytes, str | bytes] | None = None,
    fsync: bool = True,
) -> int:
    """Write ``data`` to one Parquet file at ``path``, atomically; return the rows written.

    Args:
        data: a ``pyarrow.Table``, ``RecordBatch`` or ``RecordBatchReader``; a ColumnIO batch
            ``dict`` (see :func:`batch_to_table`); or an iterable of tables, record batches
            and batch dicts, consumed one at a time (a generator of any length works).
            Every input must have the first input's column names, order and types.
        path: a local path, or a URI (``s3://bucket/key``, ``file:///...``) resolved with
            ``pyarrow.fs.FileSystem.from_uri``; with ``filesystem``, a path on it.
        row_group_size: rows per row group. Small inputs are buffered, so every row group
            but the last has exactly this many rows whatever the input batch sizes.
        compression: a Parquet codec name (``"snappy"``, ``"zstd"``, ``"none"``, ...).
        filesystem: a ``pyarrow.fs.FileSystem`` to write on.
        schema: the file's schema. Inputs are checked against it; it lets an empty input
            write a valid zero-row file. Default: the first input's schema (incl. metadata).
        strings: uint8 JaggedTensor columns of batch dicts to write as strings.
        metadata: extra key/value pairs for the file's schema metadata (visible in
            ``pyarrow.parquet.read_schema(path).metadata``).
        fsync: on a local filesystem, flush the file and its directory to disk before and
            after the rename, so the file survives a crash once this returns.

    The data goes to a hidden file ``.<name>.<random>.tmp`` in the target's directory and is
    renamed to ``path`` when complete (an atomic rename locally; on object stores a
    copy-then-delete whose target appears whole). On any error the hidden file is removed
    and ``path`` is left as it was.

    Raises:
        ColumnIOError: inputs whose columns differ (naming the column), an empty input with
            no schema, a bad column in a batch dict, a target that is a directory.
    """
    row_group_size = check_int(row_group_size, "write_parquet: row_group_size", minimum=1)
    fs, target = resolve_path(path, filesystem)
    uri = os.fspath(path)
    if fs.get_file_info(target).type == pafs.FileType.Directory:
        raise ColumnIOError("is a directory; give a file path", file=uri)

    stated_schema, tables = _iter_tables(data, strings)
    first = None
    if schema is None:
        schema = stated_schema
    if schema is None:
        first = next(tables, None)
        if first is None:
            raise ColumnIOError(
                "nothing to write and no schema: pass schema= to write an empty file", file=uri
            )
        schema = first.schema
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **_encode_metadata(metadata)})

    parent = str(PurePosixPath(target).parent) if "/" in target else ""
    hidden = f".{PurePosixPath(target).name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp = f"{parent}/{hidden}" if parent else hidden
    if parent and fs.get_file_info(parent).type == pafs.FileType.NotFound:
        fs.create_dir(parent, recursive=True)
    os_dir = _os_path(fs, parent) if fsync else None
    all_tables = tables if first is None else _chain_first(first, tables)
    try:
        with fs.open_output_stream(tmp) as sink:
            writer = pq.ParquetWriter(sink, schema, compression=compression)
            try:
                rows = _write_row_groups(writer, all_tables, schema, row_group_size, uri)
            except BaseException:
                with contextlib.suppress(Exception):  # the file is discarded anyway
                    writer.close()
                raise
            writer.close()
        if os_dir is not None:
            _fsync(os.path.join(os_dir, hidden))
        fs.move(tmp, target)
        if os_dir is not None:
            _fsync(os_dir, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    return rows


def _write_row_groups(
    writer: pq.ParquetWriter,
    tables: Iterator[pa.Table],
    schema: pa.Schema,
    row_group_size: int,
    uri: str,
) -> int:
    """Write every table, buffering so each row group but the last is exactly full."""
    pending: list[pa.Table] = []
    pending_rows = 0
    rows = 0
    for index, table in enumerate(tables):
        table = _conform(table, schema, index, uri)
        if table.num_rows == 0:
            continue
        pending.append(table)
        pending_rows += table.num_rows
        rows += table.num_rows
        whole = pending_rows - pending_rows % row_group_size
        if whole:
            buffered = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            writer.write_table(buffered.slice(0, whole), row_group_size=row_group_size)
            rest = buffered.slice(whole)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
    if pending_rows:
        buffered = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        writer.write_table(buffered, row_group_size=row_group_size)
    return rows


def _chain_first(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest
