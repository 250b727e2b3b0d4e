"""StreamingReader: follow a directory (or a growing list of files) for online learning.

New files are read as they land, in name order, and the stream is cut into windows (every
``window_files`` files, or by a timestamp column) with an :class:`EndOfWindow` marker after
each window's last batch, where an online trainer evaluates, checkpoints or publishes.

Files must appear whole: write them aside and rename them into place (as
:func:`recstack.columnio.write_parquet` does). Names starting with ``.`` or ``_`` are never
read. A file that cannot be opened yet is retried for ``settle_seconds`` after its last
modification before it counts as bad.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Unpack

import pyarrow as pa
import torch

from recstack.columnio.batching import (
    Batch,
    BatchBuilder,
    FileSchema,
    Piece,
    PieceBuffer,
    count_unit,
    decode_ahead,
)
from recstack.columnio.columns import Column, ResolvedColumn
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.columnio.files import FileRef
from recstack.columnio.formats import FileMeta, inspect_file
from recstack.columnio.options import (
    ReadOptions,
    ReadOptionsArgs,
    ReadOptionsFields,
    resolve_options,
)
from recstack.columnio.paths import resolve_files
from recstack.columnio.plan import UnitRef, rank_rows, segments
from recstack.columnio.rows import slice_rows, take_rows
from recstack.core.checks import check_int

__all__ = ["EndOfWindow", "StreamingReader"]

_STATE_FORMAT = "recstack.columnio.StreamingReader"
_STATE_VERSION = 1


@dataclass(frozen=True)
class EndOfWindow:
    """Yielded after the last batch of a window.

    ``window`` counts file windows from 0, or is the time window's index
    ``floor((t - origin) / window_length)``; ``start``/``end`` are a time window's bounds in
    the time column's units (``None`` for file windows). ``rows`` and ``files`` are what
    this reader yielded in the window.
    """

    window: int
    rows: int
    files: tuple[str, ...]
    start: float | int | None = None
    end: float | int | None = None


@dataclass
class _Window:
    id: int | None = None
    rows: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """A file whose rows are (partly) in flight: stream slots ``[first, first + rows)``."""

    uri: str
    first: int
    rows: int
    skip: int = 0  # rows of it already yielded before a restart


Source = Any  # a path, URI, glob, a list of them, or a callable returning one


class StreamingReader(ReadOptionsFields):
    """An endless iterable of batches and :class:`EndOfWindow` markers from arriving files.

    What to read (columns, batch size, format, filesystem, rank, world size, decoding
    threads, pinned memory, the KeyedJaggedTensor packing, bad-file handling) comes from
    :class:`~recstack.columnio.ReadOptions`, given as ``options=`` or as keyword arguments
    of the same names, exactly as for :class:`~recstack.columnio.ColumnReader`; the other
    arguments say how the stream is followed and cut into windows.
    ``reader.options`` holds the options in effect (``rank`` and ``world_size`` filled in
    from torchrun's environment where not given).

    Args:
        source: a directory, glob or URI to follow, a list of them, or a callable that
            returns the current list of paths (re-evaluated every poll).
        columns: ``ReadOptions.columns``: names or :class:`~recstack.columnio.Column`
            objects, as for ColumnReader.
        batch_size: ``ReadOptions.batch_size`` (default 4096); a window's last batch may
            be smaller.
        options: the :class:`~recstack.columnio.ReadOptions`; a keyword argument that is
            not ``None`` (``columns``, ``batch_size`` or any ``**read_options``) replaces
            the option of the same name.
        window_files: end a window after every ``window_files`` files.
        time_column: end windows by this column instead (an int, float or timestamp
            column; it is read even when not among ``columns``).
        window_length: a time window's length in the column's units (an int/float, or a
            ``datetime.timedelta`` for timestamp columns).
        origin: where time windows are anchored (window ``k`` is
            ``[origin + k * length, origin + (k + 1) * length)``).
        poll_interval: seconds between directory listings while no new file is waiting.
        idle_timeout: stop iterating after this many seconds without a new file (the
            rows of an unfinished window are yielded first, without a marker); ``None``
            follows forever.
        settle_seconds: how long a file that cannot be opened yet is retried.
        **read_options: any other ReadOptions field by name: ``format``, ``filesystem``
            (the source lives on it), ``rank`` (default torchrun's ``RANK``; each file's
            rows are split between ranks as ColumnReader splits an epoch, so every rank
            sees every window), ``world_size``, ``num_threads``, ``pin_memory``,
            ``keyed_jagged``, ``keyed_jagged_key`` and ``on_error``.

    A time window ends at the first row of a later window (rows are expected roughly in
    time order). A row whose window has already ended is yielded with the current window
    and counted in ``stats.late_rows``: nothing is dropped.
    """

    def __init__(
        self,
        source: Source,
        columns: Sequence[str | Column] | None = None,
        batch_size: int | None = None,
        *,
        options: ReadOptions | None = None,
        window_files: int | None = None,
        time_column: str | None = None,
        window_length: float | int | dt.timedelta | None = None,
        origin: float | int = 0,
        poll_interval: float = 1.0,
        idle_timeout: float | None = None,
        settle_seconds: float = 30.0,
        **read_options: Unpack[ReadOptionsArgs],
    ) -> None:
        self.options = resolve_options(
            "StreamingReader", options, columns=columns, batch_size=batch_size, **read_options
        ).sharded()
        if window_files is not None and time_column is not None:
            raise ValueError("give window_files or time_column, not both")
        if window_files is not None:
            check_int(window_files, "StreamingReader: window_files", minimum=1)
        if (time_column is None) != (window_length is None):
            raise ValueError("time_column and window_length go together")
        self.source = source
        self.window_files = window_files
        self.time_column = time_column
        self.window_length = window_length
        self.origin = origin
        self.poll_interval = float(poll_interval)
        self.idle_timeout = idle_timeout
        self.settle_seconds = float(settle_seconds)
        self._schema: FileSchema | None = None
        self._resolved: list[ResolvedColumn] | None = None
        self._builder: BatchBuilder | None = None
        self._length: float | int | None = None
        self.stats = ReadStats()
        # Committed state: what has been handed to the consumer.
        self._consumed: set[str] = set()
        self._partial: tuple[str, int] | None = None
        self._window = _Window()
        self._retry_since: dict[str, float] = {}

    # ------------------------------------------------------------------ discovery

    def _list(self) -> list[FileRef]:
        src = self.source() if callable(self.source) else self.source
        if isinstance(src, (list, tuple)) and src and all(isinstance(s, FileRef) for s in src):
            return sorted(src, key=lambda f: f.uri)
        files = resolve_files(src, filesystem=self.filesystem, format=self.format, allow_empty=True)
        return sorted(files, key=lambda f: f.uri)

    def _waiting(self, started: set[str]) -> list[FileRef]:
        listed = self._list()
        # Files deleted by retention can never come back: forget them to bound the state.
        self._consumed &= {f.uri for f in listed}
        files = [f for f in listed if f.uri not in self._consumed and f.uri not in started]
        if self._partial is not None:
            files.sort(key=lambda f: f.uri != self._partial[0])  # the interrupted file first
        return files

    def _open(self, f: FileRef) -> FileMeta | None:
        """The file's metadata; ``None`` while it may still be landing, or when skipped."""
        try:
            meta = inspect_file(f)
        except ColumnIOError as e:
            age = time.time() - (f.mtime_ns or 0) / 1e9
            if age < self.settle_seconds:
                self._retry_since.setdefault(f.uri, time.monotonic())
                return None
            return self._bad(f, e)
        self._retry_since.pop(f.uri, None)
        try:
            if self._schema is None or self._schema.resolved is None:
                cols = list(self.options.columns or [Column(n) for n in meta.schema.names])
                if self.time_column is not None and self.time_column not in {c.name for c in cols}:
                    cols = [*cols, Column(self.time_column)]
                self._schema = FileSchema(cols)
            resolved = self._schema.check(f, meta)
            if self._resolved is None:
                self._resolved = resolved
                opts = self.options
                self._builder = BatchBuilder(
                    resolved, opts.keyed_jagged, opts.keyed_jagged_key, opts.pin_memory
                )
                self._length = self._check_time_column()
        except ColumnIOError as e:
            return self._bad(f, e)
        return meta

    def _bad(self, f: FileRef, error: ColumnIOError) -> None:
        if self.on_error == "raise":
            raise error
        self.stats.record_skip(f.uri, 0, error)
        self._consumed.add(f.uri)
        return None

    def _check_time_column(self) -> float | int | None:
        if self.time_column is None:
            return None
        assert self._resolved is not None
        rc = next(r for r in self._resolved if r.name == self.time_column)
        if rc.kind != "scalar" or rc.dtype == torch.bool:
            raise ColumnIOError(
                f"time column must hold one number or timestamp per row, it is {rc.arrow_type}",
                column=self.time_column,
            )
        length = self.window_length
        if isinstance(length, dt.timedelta):
            if not pa.types.is_timestamp(rc.arrow_type):
                raise ColumnIOError(
                    "a timedelta window_length needs a timestamp column; give a number in the "
                    "column's units",
                    column=self.time_column,
                )
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[rc.arrow_type.unit]
            length = round(length.total_seconds() * per_second)
        if length is None or length <= 0:
            raise ValueError(f"window_length must be > 0, got {self.window_length!r}")
        return length

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch | EndOfWindow]:
        return self._run()

    def _run(self) -> Iterator[Batch | EndOfWindow]:
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="columnio-stream")
        buf = PieceBuffer()
        pending: list[_Pending] = []
        slot = 0  # stream slot of the next row read in this run
        window = _Window(self._window.id, self._window.rows, list(self._window.files))
        idle_since = time.monotonic()
        started: set[str] = set()  # files read in this run (their rows may still be buffered)

        def emit(parts: list[Piece]) -> Batch:
            last = parts[-1].last_pos
            rows = sum(p.rows for p in parts)
            self._commit(pending, last, window, rows)
            assert self._builder is not None
            return self._builder.assemble(parts)

        def flush() -> Iterator[Batch]:
            while buf.rows:
                yield emit(buf.take(min(self.batch_size, buf.rows)))

        def end_window(next_id: int) -> EndOfWindow:
            marker = self._marker(window)
            self._consumed.update(p.uri for p in pending)
            pending.clear()
            self._partial = None
            window.id, window.rows, window.files = next_id, 0, []
            self._window = _Window(next_id, 0, [])
            return marker

        try:
            while True:
                waiting = self._waiting(started)
                progressed = False
                for f in waiting:
                    meta = self._open(f)
                    if meta is None:
                        continue
                    progressed = True
                    started.add(f.uri)
                    skip = self._partial[1] if self._partial and self._partial[0] == f.uri else 0
                    if self._length is None:
                        if window.id is None:
                            window.id = 0
                        if f.uri not in window.files:
                            window.files.append(f.uri)
                    lo, hi = rank_rows(meta.num_rows, self.rank, self.world_size)
                    entry = _Pending(f.uri, slot, hi - lo, skip)
                    pending.append(entry)
                    for piece in self._file_pieces(f, meta, pool, lo, hi, slot, skip):
                        runs = (
                            [(window.id, piece)]
                            if self._length is None
                            else self._runs(piece, window)
                        )
                        for wid, run in runs:
                            if window.id is None:
                                window.id = wid
                            elif wid != window.id:
                                if window.rows + buf.rows:
                                    yield from flush()
                                    yield end_window(wid)
                                else:
                                    window.id = wid
                            if f.uri not in window.files:
                                window.files.append(f.uri)
                            buf.add(run)
                            while buf.rows >= self.batch_size:
                                yield emit(buf.take(self.batch_size))
                    slot += hi - lo
                    if not buf.rows:
                        self._commit(pending, slot - 1, window, 0)
                    if self.window_files is not None and len(window.files) >= self.window_files:
                        yield from flush()
                        assert window.id is not None
                        yield end_window(window.id + 1)
                if progressed:
                    idle_since = time.monotonic()
                    continue
                if (
                    self.idle_timeout is not None
                    and time.monotonic() - idle_since >= self.idle_timeout
                ):
                    yield from flush()
                    return
                time.sleep(self.poll_interval)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _marker(self, window: _Window) -> EndOfWindow:
        assert window.id is not None
        if self._length is None:
            return EndOfWindow(window.id, window.rows, tuple(window.files))
        start = self.origin + window.id * self._length
        return EndOfWindow(window.id, window.rows, tuple(window.files), start, start + self._length)

    def _commit(self, pending: list[_Pending], last: int, window: _Window, rows: int) -> None:
        """Record that every stream slot up to ``last`` has been handed out."""
        while pending and pending[0].first + pending[0].rows <= last + 1:
            done = pending.pop(0)
            self._consumed.add(done.uri)
            if self._partial is not None and self._partial[0] == done.uri:
                self._partial = None
        if pending and pending[0].first <= last:
            p = pending[0]
            self._partial = (p.uri, p.skip + last + 1 - p.first)
        window.rows += rows
        self.stats.rows_yielded += rows
        self.stats.batches_yielded += 1 if rows else 0
        self._window = _Window(window.id, window.rows, list(window.files))

    def _file_pieces(
        self,
        f: FileRef,
        meta: FileMeta,
        pool: ThreadPoolExecutor,
        lo: int,
        hi: int,
        slot: int,
        skip: int,
    ) -> Iterator[Piece]:
        """This rank's rows of ``f`` from row ``skip`` of them on, as pieces with slots."""
        assert self._resolved is not None
        units = [UnitRef(0, i, n) for i, n in enumerate(meta.unit_rows)]
        segs = segments(units, lo, hi)
        jobs = [(f, meta, s.unit) for s in segs]
        stop_flag = _NeverStop()
        pos = slot
        done = 0
        for seg, (cols, local, error) in zip(
            segs,
            decode_ahead(pool, jobs, self._resolved, 2 * self.num_threads, stop_flag),
            strict=True,
        ):
            rows = meta.unit_rows[seg.unit]
            decoded = (local, error)
            where = (f.uri, seg.unit)
            if count_unit(self.stats, self.on_error, where, rows, decoded, skipped_rows=seg.rows):
                assert cols is not None
                part = {k: slice_rows(v, seg.start, seg.stop) for k, v in cols.items()}
                if self._length is not None:
                    part = self._time_sorted(part)
                first = max(0, skip - done)
                if first < seg.rows:
                    if first:
                        part = {k: slice_rows(v, first, seg.rows) for k, v in part.items()}
                    yield Piece(part, torch.arange(pos + first, pos + seg.rows, dtype=torch.int64))
            pos += seg.rows
            done += seg.rows

    def _wids(self, cols: Mapping[str, Any]) -> torch.Tensor:
        t = cols[self.time_column]
        assert isinstance(t, torch.Tensor) and self._length is not None
        return torch.div(t.to(torch.float64) - self.origin, self._length, rounding_mode="floor").to(
            torch.int64
        )

    def _time_sorted(self, cols: dict[str, Any]) -> dict[str, Any]:
        """Rows grouped by time window (stable), so each window's rows are contiguous."""
        wid = self._wids(cols)
        if wid.numel() < 2 or bool((wid[1:] >= wid[:-1]).all()):
            return cols
        order = torch.argsort(wid, stable=True)
        return {k: take_rows(v, order) for k, v in cols.items()}

    def _runs(self, piece: Piece, window: _Window) -> Iterator[tuple[int, Piece]]:
        """The piece cut where its window id changes; late rows join the current window."""
        wid = self._wids({self.time_column: piece.column(self.time_column)})
        current = window.id
        if current is not None:
            late = wid < current
            n_late = int(late.sum())
            if n_late:
                self.stats.late_rows += n_late
                wid = torch.where(late, torch.full_like(wid, current), wid)
        change = torch.nonzero(wid[1:] != wid[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), wid.numel()]
        rest = piece
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            head, rest = rest.split(b - a)
            yield int(wid[a]), head

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: files consumed, the interrupted file and the open window."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "consumed": sorted(self._consumed),
            "partial": list(self._partial) if self._partial else None,
            "window": {
                "id": self._window.id,
                "rows": self._window.rows,
                "files": list(self._window.files),
            },
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the last batch or marker the saved reader handed out."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a StreamingReader state (format {state.get('format')!r})")
        for key in ("rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"StreamingReader state has {key}={state[key]!r} but this reader has "
                    f"{getattr(self, key)!r}"
                )
        self._consumed = set(state["consumed"])
        partial = state.get("partial")
        self._partial = (str(partial[0]), int(partial[1])) if partial else None
        w = state["window"]
        self._window = _Window(w["id"], int(w["rows"]), list(w["files"]))
        self.stats = ReadStats.from_dict(dict(state.get("stats", {})))


class _NeverStop:
    """decode_ahead's stop flag for a reader that runs in the consumer's thread."""

    def is_set(self) -> bool:
        return False
