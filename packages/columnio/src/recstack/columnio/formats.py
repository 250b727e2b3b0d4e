"""Per-format layer: a file's read units and one unit's columns as a pyarrow Table.

A *unit* is the smallest piece of a file that can be read on its own: a Parquet row
group, an ORC stripe, an Arrow IPC record batch. :func:`inspect_file` lists the units with
exact row counts taken from metadata; :func:`read_unit` decodes the requested columns of
one unit and nothing else.

Both functions are safe to call from many threads at once: every call opens its own file
handle and format reader, and the only shared state is a lock-guarded cache of parsed
metadata (Parquet footers, unit row counts, schemas), so a hot loop of ``read_unit`` calls
never re-reads or re-parses a footer. The cache is keyed by the file's filesystem, URI,
size and mtime; a :class:`FileRef` without size and mtime is assumed not to change while
it is being read. :func:`clear_metadata_cache` empties it.

Arrow IPC *stream* files (no footer, no random access) are one unit holding the whole
stream; :func:`inspect_file` reads the stream once to count its rows (only the cheapest
column is decoded for that).
"""

from __future__ import annotations

import operator
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.orc as orc
import pyarrow.parquet as pq

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.files import FileRef
from recstack.columnio.orc_tail import stripe_row_counts

__all__ = ["FileMeta", "clear_metadata_cache", "inspect_file", "read_unit"]

#: Parsed-metadata entries kept; a Parquet footer is tens of KB to a few MB parsed.
METADATA_CACHE_SIZE = 256

_FORMAT_NAMES = {"parquet": "a Parquet", "orc": "an ORC", "ipc": "an Arrow IPC"}
_IPC_FILE_MAGIC = b"ARROW1"
_FEATHER_V1_MAGIC = b"FEA1"

# What pyarrow raises on bad files; ColumnIOError (a ValueError) is re-raised untouched.
_READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, IndexError, KeyError)


@dataclass(frozen=True)
class FileMeta:
    """A file's schema and read units.

    ``unit_rows`` holds the rows of each unit (row group / stripe / record batch) in file
    order, zero-row units included; ``num_rows`` is their sum.
    """

    file: FileRef
    schema: pa.Schema
    unit_rows: tuple[int, ...]
    num_rows: int


@dataclass(frozen=True)
class _Info:
    """What one metadata read learns about a file; immutable, so shared across threads."""

    schema: pa.Schema
    unit_rows: tuple[int, ...]
    parquet_metadata: pq.FileMetaData | None = None
    ipc_stream: bool = False

    @cached_property
    def name_counts(self) -> Counter[str]:
        """How many top-level fields carry each name (to reject missing or ambiguous ones)."""
        return Counter(self.schema.names)


class _MetadataCache:
    """A small LRU of :class:`_Info` by file identity, guarded by one lock."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Info] = OrderedDict()

    def get(self, key: tuple) -> _Info | None:
        with self._lock:
            info = self._entries.get(key)
            if info is not None:
                self._entries.move_to_end(key)
            return info

    def put(self, key: tuple, info: _Info) -> None:
        with self._lock:
            self._entries[key] = info
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _MetadataCache(METADATA_CACHE_SIZE)


def clear_metadata_cache() -> None:
    """Forget every cached footer and unit list (e.g. after files were rewritten in place)."""
    _CACHE.clear()


def _cache_key(file: FileRef) -> tuple:
    return (file.filesystem.type_name, file.uri, file.path, file.format, file.size, file.mtime_ns)


@contextmanager
def _wrap_errors(file: FileRef, action: str) -> Iterator[None]:
    """Turn whatever pyarrow raises into a ColumnIOError naming the file, keeping its text."""
    try:
        yield
    except ColumnIOError:
        raise
    except _READ_ERRORS as err:
        hint = ""
        if not isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            hint = f" (truncated, corrupt or not {_FORMAT_NAMES[file.format]} file?)"
        raise ColumnIOError(f"{action}{hint}: {type(err).__name__}: {err}", file=file.uri) from err


def _check_not_empty(file: FileRef, handle: pa.NativeFile) -> None:
    size = file.size if file.size is not None else handle.size()
    if size == 0:
        fmt = _FORMAT_NAMES[file.format]
        raise ColumnIOError(f"empty file (0 bytes), not {fmt} file", file=file.uri)


# ---------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------


def _parquet_info(file: FileRef, handle: pa.NativeFile) -> _Info:
    with pq.ParquetFile(handle) as pf:
        md = pf.metadata
        schema = pf.schema_arrow
    unit_rows = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
    if sum(unit_rows) != md.num_rows:
        raise ColumnIOError(
            f"row groups hold {sum(unit_rows)} rows but the footer says {md.num_rows}",
            file=file.uri,
        )
    return _Info(schema=schema, unit_rows=unit_rows, parquet_metadata=md)


def _orc_info(file: FileRef, handle: pa.NativeFile) -> _Info:
    reader = orc.ORCFile(handle)
    unit_rows = stripe_row_counts(
        reader.reader.serialized_file_tail(), expected_rows=reader.nrows, file=file.uri
    )
    if len(unit_rows) != reader.nstripes:
        raise ColumnIOError(
            f"ORC tail lists {len(unit_rows)} stripes but the reader sees {reader.nstripes}",
            file=file.uri,
        )
    return _Info(schema=reader.schema, unit_rows=unit_rows)


def _cheapest_field(schema: pa.Schema) -> list[int]:
    """One field whose buffers are cheapest to load, to count IPC rows without decoding all.

    IPC batches carry their length in the message header, but pyarrow only exposes it on a
    decoded batch; loading one narrow fixed-width column keeps that close to free even for
    compressed files.
    """
    if len(schema) == 0:
        return []
    best, best_cost = 0, float("inf")
    for i, field in enumerate(schema):
        if pa.types.is_null(field.type):
            return [i]
        try:
            cost = float(field.type.bit_width)
        except ValueError:  # variable width or nested
            continue
        if cost < best_cost:
            best, best_cost = i, cost
    return [best]


def _ipc_options(included: list[int]) -> ipc.IpcReadOptions:
    return ipc.IpcReadOptions(use_threads=False, included_fields=included)


def _ipc_info(file: FileRef, handle: pa.NativeFile) -> _Info:
    magic = handle.read_at(len(_IPC_FILE_MAGIC), 0)
    if magic.startswith(_FEATHER_V1_MAGIC):
        raise ColumnIOError(
            "Feather v1 files are not supported; rewrite as Feather v2 / Arrow IPC",
            file=file.uri,
        )
    if magic == _IPC_FILE_MAGIC:
        # The footer holds the full schema; a second open reads only one cheap column.
        schema = ipc.open_file(handle, options=_ipc_options([])).schema
        reader = ipc.open_file(handle, options=_ipc_options(_cheapest_field(schema)))
        unit_rows = tuple(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        return _Info(schema=schema, unit_rows=unit_rows)
    # No file magic: an IPC stream, one unit for the whole stream (no random access).
    try:
        schema = ipc.open_stream(handle, options=_ipc_options([])).schema
    except _READ_ERRORS as err:
        raise ColumnIOError(
            f"neither an Arrow IPC file (no {_IPC_FILE_MAGIC.decode()} magic) nor an IPC "
            f"stream: {type(err).__name__}: {err}",
            file=file.uri,
        ) from err
    handle.seek(0)
    rows = 0
    with ipc.open_stream(handle, options=_ipc_options(_cheapest_field(schema))) as reader:
        for batch in reader:
            rows += batch.num_rows
    return _Info(schema=schema, unit_rows=(rows,), ipc_stream=True)


_INFO_READERS = {"parquet": _parquet_info, "orc": _orc_info, "ipc": _ipc_info}


def _file_info(file: FileRef) -> _Info:
    key = _cache_key(file)
    info = _CACHE.get(key)
    if info is not None:
        return info
    # Two threads missing at once both read the footer; the result is the same either way.
    with _wrap_errors(file, "cannot read file metadata"), file.open() as handle:
        _check_not_empty(file, handle)
        info = _INFO_READERS[file.format](file, handle)
    _CACHE.put(key, info)
    return info


def inspect_file(file: FileRef) -> FileMeta:
    """The file's arrow schema and its read units with exact row counts.

    Raises :class:`ColumnIOError` naming the file when it is empty, truncated, corrupt or
    unreadable.
    """
    info = _file_info(file)
    return FileMeta(
        file=file, schema=info.schema, unit_rows=info.unit_rows, num_rows=sum(info.unit_rows)
    )


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _check_columns(file: FileRef, info: _Info, columns: list[str]) -> None:
    counts = info.name_counts
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise ColumnIOError("column requested more than once", file=file.uri, column=name)
        seen.add(name)
        count = counts.get(name, 0)
        if count == 0:
            raise ColumnIOError(
                f"no such column; available columns: {info.schema.names}",
                file=file.uri,
                column=name,
            )
        if count > 1:
            raise ColumnIOError(
                f"ambiguous column: the file has {count} columns of that name",
                file=file.uri,
                column=name,
            )


def _read_parquet(file: FileRef, info: _Info, unit: int, columns: list[str]) -> pa.Table:
    # The cached footer spares each call a footer read and parse (about 1 ms for a
    # 64-row-group file, and a round trip on object stores); pre_buffer coalesces the
    # column-chunk reads into few large requests, which matters on remote filesystems.
    with file.open() as handle:
        pf = pq.ParquetFile(
            handle,
            metadata=info.parquet_metadata,
            pre_buffer=file.filesystem.type_name != "local",
        )
        return pf.read_row_group(unit, columns=columns, use_threads=False)


def _read_orc(file: FileRef, info: _Info, unit: int, columns: list[str]) -> pa.Table:
    with file.open() as handle:
        batch = orc.ORCFile(handle).read_stripe(unit, columns=columns)
    return pa.Table.from_batches([batch])


def _read_ipc(file: FileRef, info: _Info, unit: int, columns: list[str]) -> pa.Table:
    # Load only the requested fields' buffers (matters on remote or compressed files).
    included = sorted(info.schema.get_field_index(name) for name in columns)
    with file.open() as handle:
        if info.ipc_stream:
            with ipc.open_stream(handle, options=_ipc_options(included)) as reader:
                return reader.read_all()
        reader = ipc.open_file(handle, options=_ipc_options(included))
        return pa.Table.from_batches([reader.get_batch(unit)])


_UNIT_READERS = {"parquet": _read_parquet, "orc": _read_orc, "ipc": _read_ipc}
_UNIT_NAMES = {"parquet": "row group", "orc": "stripe", "ipc": "record batch"}


def read_unit(file: FileRef, unit: int, columns: Sequence[str]) -> pa.Table:
    """Decode ``columns`` of one unit (row group / stripe / record batch) of ``file``.

    Only the requested columns are read, and the table's columns come in the order asked.
    An empty ``columns`` gives a table with no columns and the unit's row count. Raises
    :class:`ColumnIOError` naming the file (and column) for an unknown or ambiguous
    column, a unit index out of range, or a file that cannot be decoded.
    """
    info = _file_info(file)
    unit_name = _UNIT_NAMES[file.format]
    try:
        index = operator.index(unit)
    except TypeError:
        raise TypeError(f"file {file.uri!r}: unit must be an int, not {unit!r}") from None
    if not 0 <= index < len(info.unit_rows):
        raise ColumnIOError(
            f"{unit_name} {unit} out of range: the file has {len(info.unit_rows)}",
            file=file.uri,
        )
    if isinstance(columns, (str, bytes)):
        raise TypeError(f"file {file.uri!r}: columns must be a list of names, not {columns!r}")
    columns = list(columns)
    _check_columns(file, info, columns)
    expected = info.unit_rows[index]
    if not columns:
        # No IO needed; a zero-column table still carries its row count.
        return pa.table({"_": pa.nulls(expected)}).drop_columns(["_"])
    with _wrap_errors(file, f"cannot read {unit_name} {index}"):
        table = _UNIT_READERS[file.format](file, info, index, columns)
        if table.column_names != columns:
            table = table.select(columns)
    if table.num_rows != expected:
        raise ColumnIOError(
            f"{unit_name} {index} decoded to {table.num_rows} rows but its metadata says "
            f"{expected} (was the file rewritten while being read?)",
            file=file.uri,
        )
    return table
