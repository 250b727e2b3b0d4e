"""What every ColumnIO reader shares: schema checks, unit decoding and batch assembly."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import torch

from recstack.columnio.columns import Column, ResolvedColumn, resolve
from recstack.columnio.convert import ColumnValue, convert_table
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.columnio.files import FileRef
from recstack.columnio.formats import FileMeta, read_unit
from recstack.columnio.rows import Alloc, cat_rows, cat_shapes, new_tensor, num_rows, slice_rows
from recstack.core import JaggedTensor, KeyedJaggedTensor

__all__ = [
    "Batch",
    "FileSchema",
    "count_unit",
    "BatchBuilder",
    "Piece",
    "PieceBuffer",
    "decode_ahead",
    "decode_unit",
    "resolve_in",
    "same_types",
]

Batch = dict[str, torch.Tensor | JaggedTensor | KeyedJaggedTensor]


@dataclass
class Piece:
    """Rows ``[start, stop)`` of decoded columns waiting to be batched.

    ``pos[i]`` is row i's slot in the reader's stream. Splitting only moves the bounds:
    the columns are sliced once, when a batch is assembled.
    """

    cols: dict[str, ColumnValue]
    pos: torch.Tensor
    start: int = 0
    stop: int = -1

    def __post_init__(self) -> None:
        if self.stop < 0:
            self.stop = int(self.pos.numel())

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def last_pos(self) -> int:
        return int(self.pos[self.stop - 1])

    def split(self, n: int) -> tuple[Piece, Piece]:
        mid = self.start + n
        return (
            Piece(self.cols, self.pos, self.start, mid),
            Piece(self.cols, self.pos, mid, self.stop),
        )

    def column(self, name: str) -> ColumnValue:
        v = self.cols[name]
        if self.start == 0 and self.stop == num_rows(v):
            return v
        return slice_rows(v, self.start, self.stop)


class PieceBuffer:
    """Pieces in stream order, from which batches of any size are cut."""

    def __init__(self) -> None:
        self._pieces: deque[Piece] = deque()
        self.rows = 0

    def add(self, piece: Piece) -> None:
        if piece.rows:
            self._pieces.append(piece)
            self.rows += piece.rows

    def take(self, n: int) -> list[Piece]:
        """The next ``n`` rows (``n <= rows``), split off the pieces holding them."""
        parts: list[Piece] = []
        need = n
        while need:
            p = self._pieces.popleft()
            if p.rows > need:
                p, tail = p.split(need)
                self._pieces.appendleft(tail)
            parts.append(p)
            need -= p.rows
        self.rows -= n
        return parts


def resolve_in(f: FileRef, meta: FileMeta, columns: list[Column]) -> list[ResolvedColumn]:
    """``columns`` matched to the types they have in ``f``; a missing column names both."""
    out = []
    for col in columns:
        idx = meta.schema.get_field_index(col.name)
        if idx < 0:
            raise ColumnIOError(
                f"no such column; the file has {meta.schema.names}", file=f.uri, column=col.name
            )
        out.append(resolve(col, meta.schema.field(idx).type, f.uri))
    return out


def same_types(
    want: list[ResolvedColumn], got: list[ResolvedColumn], origin: str, file: str
) -> None:
    """Raise naming the file and column when a column's type differs from ``origin``'s."""
    for w, g in zip(want, got, strict=True):
        if w.arrow_type != g.arrow_type:
            raise ColumnIOError(
                f"the type changed between files: {g.arrow_type} here, {w.arrow_type} in "
                f"{origin!r}",
                file=file,
                column=g.name,
            )


class FileSchema:
    """The selected columns as the first file types them; every later file must agree.

    Args:
        columns: the columns to find in every file.
    """

    def __init__(self, columns: list[Column]) -> None:
        self.columns = columns
        self.resolved: list[ResolvedColumn] | None = None
        self.origin = ""

    def check(self, f: FileRef, meta: FileMeta) -> list[ResolvedColumn]:
        """The columns resolved in ``f``; the first file that passes sets their types.

        Args:
            f: the file.
            meta: its metadata.

        Raises:
            ColumnIOError: a column is missing from ``f`` or has another type there.
        """
        mine = resolve_in(f, meta, self.columns)
        if self.resolved is None:
            self.resolved, self.origin = mine, f.uri
        else:
            same_types(self.resolved, mine, self.origin, f.uri)
        return self.resolved


def decode_unit(
    f: FileRef, meta: FileMeta, unit: int, columns: list[ResolvedColumn]
) -> tuple[dict[str, ColumnValue], ReadStats]:
    """One unit's columns as tensors, and the nulls it filled (runs on a decode thread)."""
    table = read_unit(f, unit, [rc.name for rc in columns])
    expected = meta.unit_rows[unit]
    if table.num_rows != expected:
        raise ColumnIOError(
            f"unit {unit} decoded to {table.num_rows} rows but the file's metadata says {expected}",
            file=f.uri,
        )
    local = ReadStats()
    return convert_table(table, columns, f.uri, local), local


class BatchBuilder:
    """Turns pieces into a batch dict: one copy per column, optionally page-locked."""

    def __init__(
        self,
        columns: list[ResolvedColumn],
        keyed_jagged: Sequence[str] | None,
        keyed_jagged_key: str,
        pin_memory: bool,
    ) -> None:
        self.columns = columns
        self.pin_memory = pin_memory
        self.keyed_jagged_key = keyed_jagged_key
        self.keys = self._check_keyed(keyed_jagged)
        if self.keys and keyed_jagged_key in {rc.name for rc in columns}:
            raise ValueError(
                f"keyed_jagged_key {keyed_jagged_key!r} is also a column name; pick another"
            )

    def _check_keyed(self, keyed: Sequence[str] | None) -> list[str]:
        if not keyed:
            return []
        keys = [keyed] if isinstance(keyed, str) else list(keyed)
        by_name = {rc.name: rc for rc in self.columns}
        if len(set(keys)) != len(keys):
            raise ValueError(f"keyed_jagged names a column twice: {keys}")
        for k in keys:
            rc = by_name.get(k)
            if rc is None:
                raise ValueError(f"keyed_jagged column {k!r} is not among the selected columns")
            if (
                rc.kind not in ("scalar", "list")
                or rc.dtype is None
                or rc.dtype.is_floating_point
                or rc.dtype == torch.bool
            ):
                raise ValueError(
                    f"keyed_jagged column {k!r} must hold integer ids (a scalar or a list), "
                    f"it is {rc.arrow_type}"
                )
        return keys

    def assemble(
        self, pieces: list[Piece], into: Callable[[int], torch.Tensor] | None = None
    ) -> Batch:
        """The batch of ``pieces``' rows.

        With ``into``, every tensor is carved from the uint8 buffer ``into(nbytes)``
        returns (at least ``nbytes`` long); else from one pinned block when
        ``pin_memory``; else each tensor is allocated on its own.
        """
        plain = [rc.name for rc in self.columns if rc.name not in self.keys]
        parts = {name: [p.column(name) for p in pieces] for name in plain}
        keyed = self._keyed_parts(pieces) if self.keys else None
        alloc: Alloc = new_tensor
        if self.pin_memory or into is not None:
            # One block per batch, every column copied straight into it: the trip to the
            # GPU (or to another process) is then one copy, and no second host copy is made.
            shapes = [shape for name in plain for shape in cat_shapes(parts[name])]
            if keyed is not None:
                shapes += [shape for group in keyed[:2] for shape in cat_shapes(group)]
            alloc = _Block(shapes, into)
        batch: Batch = {name: cat_rows(parts[name], alloc) for name in plain}
        if keyed is not None:
            values, lengths, per_key, rows = keyed
            v, ln = cat_rows(values, alloc), cat_rows(lengths, alloc)
            assert isinstance(v, torch.Tensor) and isinstance(ln, torch.Tensor)
            batch[self.keyed_jagged_key] = KeyedJaggedTensor(
                self.keys, v, ln, stride=rows, length_per_key=per_key
            )
        return batch

    def _keyed_parts(
        self, pieces: list[Piece]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], int]:
        rows = sum(p.rows for p in pieces)
        values, lengths, per_key = [], [], []
        for k in self.keys:
            parts = [p.column(k) for p in pieces]
            if isinstance(parts[0], JaggedTensor):
                jt = cat_rows(parts)
                assert isinstance(jt, JaggedTensor)
                values.append(jt.values.to(torch.int64))
                lengths.append(jt.lengths())
            else:
                values.append(torch.cat(parts).to(torch.int64))
                lengths.append(torch.ones(rows, dtype=torch.int64))
            per_key.append(int(values[-1].numel()))
        return values, lengths, per_key, rows


class _Block:
    """An allocator handing out views of one buffer, in plan order.

    Tensors are laid out grouped by dtype, back to back, each group 64-byte aligned: a
    reader in another process can then rebuild a whole group with one ``split``.
    """

    def __init__(
        self,
        shapes: list[tuple[tuple[int, ...], torch.dtype]],
        into: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        nbytes = [math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes]
        order = sorted(range(len(shapes)), key=lambda i: str(shapes[i][1]))
        starts = [0] * len(shapes)
        at, dtype = 0, None
        for i in order:
            if shapes[i][1] != dtype:
                at, dtype = -(-at // 64) * 64, shapes[i][1]
            starts[i] = at
            at += nbytes[i]
        total = -(-at // 64) * 64
        if into is not None:
            block = into(total)
        else:
            block = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        self._views: deque[torch.Tensor] = deque(
            block[a : a + n].view(d).view(s)
            for (s, d), a, n in zip(shapes, starts, nbytes, strict=True)
        )

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self._views.popleft()
        assert view.shape == shape and view.dtype == dtype, "allocation out of plan order"
        return view


def decode_ahead(
    pool: Executor,
    jobs: Sequence[tuple[FileRef, FileMeta, int]],
    columns: list[ResolvedColumn],
    lookahead: int,
    stop: threading.Event,
) -> Iterator[tuple[dict[str, ColumnValue] | None, ReadStats | None, ColumnIOError | None]]:
    """Decode ``jobs`` (file, meta, unit) on ``pool``, ``lookahead`` in flight, yielded in order.

    A unit that fails yields its :class:`ColumnIOError` instead of columns; the caller
    decides whether to raise or skip.
    """
    futures: deque[Future[Any]] = deque()
    submitted = 0
    while submitted < len(jobs) or futures:
        while submitted < len(jobs) and len(futures) < lookahead:
            f, meta, unit = jobs[submitted]
            futures.append(pool.submit(decode_unit, f, meta, unit, columns))
            submitted += 1
        if stop.is_set():
            return
        fut = futures.popleft()
        try:
            cols, local = fut.result()
        except ColumnIOError as e:
            yield None, None, e
            continue
        yield cols, local, None


def count_unit(
    stats: ReadStats,
    on_error: str,
    where: tuple[str, int],
    rows: int,
    decoded: tuple[ReadStats | None, ColumnIOError | None],
    *,
    skipped_rows: int | None = None,
    count_nulls: bool = True,
) -> bool:
    """Count one unit that :func:`decode_ahead` yielded in ``stats``; ``False`` if it failed.

    Args:
        stats: the reader's counters.
        on_error: the reader's ``on_error``: ``"raise"`` raises the unit's error.
        where: the file's URI and the unit's index, for the skip record.
        rows: the rows the unit decoded (``rows_read``).
        decoded: the unit's own counters and its error, as ``decode_ahead`` yielded them.
        skipped_rows: the rows a failure skips, when not ``rows`` (a rank's share).
        count_nulls: add the unit's filled nulls (off for a unit decoded again).

    Raises:
        ColumnIOError: the unit failed and ``on_error`` is ``"raise"``.
    """
    local, error = decoded
    if error is not None:
        if on_error == "raise":
            raise error
        uri, unit = where
        stats.record_skip(uri, rows if skipped_rows is None else skipped_rows, error, unit=unit)
        return False
    stats.rows_read += rows
    if count_nulls and local is not None:
        for name, n in local.nulls_filled.items():
            stats.add_nulls(name, n)
    return True
