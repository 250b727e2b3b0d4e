"""ColumnReader: columnar files in, batches of tensors out, exactly once per epoch.

Work flows through three stages. A pool of threads decodes units (Parquet row groups, ORC
stripes, Arrow record batches) with pyarrow, which releases the GIL, and turns each column
into tensors straight from Arrow's buffers. One assembler thread cuts those into batches
(and permutes shuffle windows or epoch buckets), copying each column once into fresh, optionally
page-locked, memory. A bounded queue hands batches to the training loop, so the loop only
ever waits when decoding is slower than training.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Unpack

import torch
from torch.utils.data import IterableDataset, get_worker_info

from recstack.columnio.batching import (
    Batch,
    BatchBuilder,
    FileSchema,
    Piece,
    PieceBuffer,
    count_unit,
    decode_ahead,
)
from recstack.columnio.columns import MISSING, Column, ResolvedColumn
from recstack.columnio.convert import ColumnValue
from recstack.columnio.device import batch_to, hand_over, move_batch_to_cuda
from recstack.columnio.epoch_shuffle import BucketPlan, estimated_passes
from recstack.columnio.errors import ColumnIOError, ReadStats, ShuffleWarning
from recstack.columnio.files import FileRef
from recstack.columnio.formats import FileMeta, inspect_file
from recstack.columnio.options import (
    ReadOptions,
    ReadOptionsArgs,
    ReadOptionsFields,
    resolve_options,
)
from recstack.columnio.paths import resolve_files
from recstack.columnio.plan import (
    Segment,
    UnitRef,
    epoch_units,
    rank_rows,
    segments,
    window_order,
)
from recstack.columnio.process_run import ProcessRun, ReaderProcess
from recstack.columnio.rows import cat_rows, slice_rows, take_rows
from recstack.core.checks import check_int

__all__ = ["Batch", "ColumnReader", "EpochRun"]

Shuffle = bool | Literal["window", "epoch"]

_STATE_FORMAT = "recstack.columnio.ColumnReader"
_STATE_VERSION = 1


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _check_shuffle(value: Any) -> bool | Literal["epoch"]:
    """``False``, ``True`` (windows) or ``"epoch"``: the forms a state dict records."""
    if value is False or value is True:
        return value
    if value == "window":
        return True
    if value == "epoch":
        return "epoch"
    raise ValueError(f"shuffle must be False, True, 'window' or 'epoch', got {value!r}")


class ColumnReader(ReadOptionsFields, IterableDataset[Batch]):
    """An iterable of batches read from Parquet (default), ORC or Arrow IPC files.

    Each ``iter(reader)`` runs (the rest of) one epoch; the next one starts the next epoch.
    A batch is a ``dict`` from column name to a tensor or :class:`JaggedTensor` (see
    :mod:`recstack.columnio.columns` for which Arrow type becomes which), plus one
    :class:`KeyedJaggedTensor` under ``keyed_jagged_key`` when ``keyed_jagged`` is given.

    The reader is a ``torch.utils.data.IterableDataset`` that yields whole batches, so
    ``torch.utils.data.DataLoader(reader, batch_size=None)`` (and torchdata's
    ``StatefulDataLoader``, which resumes it through :meth:`state_dict`) works as is. It
    decodes on its own threads (``num_threads``) or in its own reader process
    (``worker="process"``), so it refuses to run in DataLoader worker processes
    (``num_workers`` must stay 0).

    What to read (columns, batch size, format, filesystem, rank, world size, decoding
    threads, pinned memory, the KeyedJaggedTensor packing, bad-file handling) comes from
    :class:`ReadOptions`, given as ``options=`` or as keyword arguments of the same names;
    the other arguments say how an epoch is read.
    ``reader.options`` holds the options in effect (``rank`` and ``world_size`` filled in
    from torchrun's environment where not given, ``pin_memory`` on for a CUDA device).

    Args:
        paths: files, directories, globs or URIs (``s3://``, ``gs://``, ``hdfs://``), or a
            list of them; see :func:`recstack.columnio.resolve_files`.
        columns: :attr:`ReadOptions.columns`: names or :class:`Column` objects; ``None``
            reads every column of the first file. Only these columns are read and decoded.
        batch_size: :attr:`ReadOptions.batch_size` (default 4096). The last batch of an
            epoch may be smaller unless ``drop_last``.
        options: the :class:`ReadOptions`; a keyword argument that is not ``None`` (this
            reader's ``columns``, ``batch_size`` or any ``**read_options``) replaces the
            option of the same name.
        shuffle: ``False`` keeps file order. ``True`` or ``"window"`` shuffles unit order
            per epoch, then permutes the rank's stream in windows of ``shuffle_buffer``
            rows: a **partial** shuffle whenever the rank reads more rows than one window
            (a row moves at most one window, and each batch mixes rows of a few units),
            which ``True`` warns about once with a :class:`ShuffleWarning` (``"window"``
            says you know). ``"epoch"`` is an exact full-epoch shuffle: a uniformly random
            permutation of every row of the epoch, built from random buckets of about
            ``shuffle_buffer`` rows (see :mod:`recstack.columnio.epoch_shuffle`). It holds
            at most about one bucket of rows in memory but decodes the data about
            ``ceil(total_rows / shuffle_buffer / world_size) + 1`` times per epoch per
            rank: give it as large a ``shuffle_buffer`` as memory allows.
        seed: the shuffle seed; the same seed gives the same order.
        shuffle_buffer: rows held for shuffling: the window size (``shuffle=True``) or the
            bucket size (``"epoch"``); default ``max(65536, 16 * batch_size)``.
        drop_last: drop the epoch's last, smaller batch (its rows are counted in
            :attr:`stats`).
        prefetch: batches assembled ahead of the consumer.
        device: deliver batches on this device (``"cuda"``). The assembler thread copies
            each pinned batch on a side CUDA stream as soon as it is cut, so ``next()``
            only queues a wait on the copy: the cheapest way to feed a GPU, since the
            training thread does no per-tensor work at all. A CUDA device turns
            ``pin_memory`` on.
        worker: ``"thread"`` decodes and assembles on threads of this process;
            ``"process"`` does it in a separate reader process that writes each batch into
            shared memory, so the training thread never waits for Python's GIL on account
            of data loading (the better choice for GPU training; it needs ``paths`` as
            strings or URIs, not a ``filesystem`` object, and JSON-able column defaults).
            ``"auto"`` (the default) takes the process when batches go to a CUDA device
            and those conditions hold, else threads; :attr:`worker` says which.
            Call :meth:`close` (or use ``with``) to stop the process early.
        **read_options: any other :class:`ReadOptions` field by name: ``format``,
            ``filesystem``, ``rank``, ``world_size`` (together the ``world_size`` readers
            yield every row exactly once per epoch, with row counts that differ by at most
            one), ``num_threads``, ``pin_memory`` (allocate each batch as one page-locked
            block, for fast, asynchronous copies to the GPU; see
            :func:`recstack.columnio.to_device`), ``keyed_jagged``, ``keyed_jagged_key``
            and ``on_error``.

    For example:

        >>> reader = ColumnReader("data/", ["user", "clicks", "label"], batch_size=1024)
        >>> for batch in reader:  # doctest: +SKIP
        ...     train_step(batch)
    """

    def __init__(
        self,
        paths: Any,
        columns: Sequence[str | Column] | None = None,
        batch_size: int | None = None,
        *,
        options: ReadOptions | None = None,
        shuffle: Shuffle = False,
        seed: int = 0,
        shuffle_buffer: int | None = None,
        drop_last: bool = False,
        prefetch: int = 4,
        device: torch.device | str | None = None,
        worker: Literal["auto", "thread", "process"] = "auto",
        **read_options: Unpack[ReadOptionsArgs],
    ) -> None:
        opts = resolve_options(
            "ColumnReader", options, columns=columns, batch_size=batch_size, **read_options
        ).sharded()
        if worker not in ("auto", "thread", "process"):
            raise ValueError(f"worker must be 'auto', 'thread' or 'process', got {worker!r}")
        if worker == "process" and opts.filesystem is not None:
            raise ValueError(
                "worker='process' re-opens the files in the reader process: give paths as "
                "strings or URIs instead of a filesystem object"
            )
        self.worker = worker
        self._paths_arg = paths
        self.prefetch = check_int(prefetch, "ColumnReader: prefetch", minimum=1)
        self.seed = check_int(seed, "ColumnReader: seed", minimum=0)
        self.shuffle: bool | Literal["epoch"] = _check_shuffle(shuffle)
        buffer_given = shuffle_buffer is not None
        if shuffle_buffer is None:
            shuffle_buffer = max(65536, 16 * opts.batch_size)
        self.shuffle_buffer = check_int(shuffle_buffer, "ColumnReader: shuffle_buffer", minimum=1)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda":
            opts = dataclasses.replace(opts, pin_memory=True)
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.options = opts
        self.stats = ReadStats()

        self._files, self._metas = self._inspect(
            resolve_files(paths, filesystem=opts.filesystem, format=opts.format)
        )
        self._resolved = self._resolve_columns(None if opts.columns is None else list(opts.columns))
        self._builder = BatchBuilder(
            self._resolved, opts.keyed_jagged, opts.keyed_jagged_key, opts.pin_memory
        )
        self._process: ReaderProcess | None = None
        self._units = [
            UnitRef(fi, ui, rows)
            for fi, meta in enumerate(self._metas)
            for ui, rows in enumerate(meta.unit_rows)
        ]
        self.total_rows = sum(u.rows for u in self._units)
        lo, hi = rank_rows(self.total_rows, self.rank, self.world_size)
        self.num_rows = hi - lo
        # Global row index -> unit: the epoch shuffle reads rows by their place in file order.
        self._unit_ends = torch.tensor(
            list(itertools.accumulate(u.rows for u in self._units)), dtype=torch.int64
        )
        self._fingerprint = self._make_fingerprint()
        if self.worker == "auto":
            self.worker = "process" if self._process_fits() else "thread"
        self.epoch = 0
        self._position = 0
        self._active: EpochRun | None = None
        self._segment_cache: tuple[int, list[Segment], list[int]] | None = None
        self._bucket_cache: BucketPlan | None = None
        self._warn_about_shuffle(shuffle, buffer_given)

    def _warn_about_shuffle(self, asked: Shuffle, buffer_given: bool) -> None:
        if asked is True and self.num_rows > self.shuffle_buffer:
            warnings.warn(
                f"ColumnReader: shuffle=True permutes windows of {self.shuffle_buffer} rows "
                f"but this rank reads {self.num_rows} rows per epoch, so the shuffle is "
                "partial (rows move at most one window). Pass shuffle='epoch' for a full "
                "shuffle, a larger shuffle_buffer, or shuffle='window' to keep windows "
                "without this warning.",
                ShuffleWarning,
                stacklevel=3,
            )
        if asked == "epoch" and not buffer_given:
            passes = estimated_passes(self.total_rows, self.num_rows, self.shuffle_buffer)
            if passes > 4:
                warnings.warn(
                    f"ColumnReader: shuffle='epoch' with buckets of {self.shuffle_buffer} "
                    f"rows decodes the data about {passes} times per epoch on this rank; "
                    "pass the rows you can hold in memory as shuffle_buffer (at or above "
                    f"{self.num_rows}, the rows of this rank, means about 2 passes).",
                    ShuffleWarning,
                    stacklevel=3,
                )

    # ------------------------------------------------------------------ planning

    def _inspect(self, files: list[FileRef]) -> tuple[list[FileRef], list[FileMeta]]:
        # Remote footers cost a round trip each: fetch them concurrently.
        with ThreadPoolExecutor(max(8, self.num_threads)) as pool:
            futures = [pool.submit(inspect_file, f) for f in files]
        kept_files, metas = [], []
        for f, fut in zip(files, futures, strict=True):
            try:
                meta = fut.result()
            except ColumnIOError as e:
                if self.on_error == "raise":
                    raise
                self.stats.record_skip(f.uri, 0, e)
                continue
            kept_files.append(f)
            metas.append(meta)
        return kept_files, metas

    def _resolve_columns(self, columns: list[Column] | None) -> list[ResolvedColumn]:
        if not self._metas:
            if columns is None:
                raise ColumnIOError("no readable file to take the column list from; pass columns=")
            return []
        first = self._metas[0]
        if columns is None:
            columns = [Column(name) for name in first.schema.names]
        schema = FileSchema(columns)
        keep_files, keep_metas = [], []
        for f, meta in zip(self._files, self._metas, strict=True):
            try:
                schema.check(f, meta)
            except ColumnIOError as e:
                if self.on_error == "raise":
                    raise
                self.stats.record_skip(f.uri, meta.num_rows, e)
                continue
            keep_files.append(f)
            keep_metas.append(meta)
        self._files, self._metas = keep_files, keep_metas
        return schema.resolved or []

    def _make_fingerprint(self) -> str:
        desc = {
            "files": [
                [f.uri, list(m.unit_rows)] for f, m in zip(self._files, self._metas, strict=True)
            ],
            "columns": [rc.name for rc in self._resolved],
        }
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:32]

    @property
    def fingerprint(self) -> str:
        """A digest of the files, their units and the columns: what a saved state pins."""
        return self._fingerprint

    @property
    def files(self) -> list[str]:
        """The files this reader reads (after ``on_error="skip"`` dropped bad ones)."""
        return [f.uri for f in self._files]

    @property
    def columns(self) -> list[str]:
        """The names of the columns each batch holds (before KeyedJaggedTensor packing)."""
        return [rc.name for rc in self._resolved]

    def __len__(self) -> int:
        """Batches per epoch for this rank (when no unit is skipped mid-epoch)."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _bucket_plan(self, epoch: int) -> BucketPlan:
        # Cached: counting the buckets hashes every row index once per epoch.
        plan = self._bucket_cache
        if plan is None or plan.epoch != epoch:
            plan = BucketPlan.build(self.total_rows, self.shuffle_buffer, self.seed, epoch)
            self._bucket_cache = plan
        return plan

    def _segments(self, epoch: int) -> list[Segment]:
        # Cached: state_dict() is called after every batch by DevicePrefetcher.
        cached = self._segment_cache
        if cached is None or cached[0] != epoch:
            shuffled = self.shuffle is True
            units = epoch_units(self._units, shuffle=shuffled, seed=self.seed, epoch=epoch)
            lo, hi = rank_rows(self.total_rows, self.rank, self.world_size)
            segs = segments(units, lo, hi)
            ends = list(itertools.accumulate(s.rows for s in segs))
            cached = self._segment_cache = (epoch, segs, ends)
        return cached[1]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "ColumnReader runs in a DataLoader worker process: every worker would read "
                "the whole epoch. The reader decodes in parallel itself: keep the DataLoader's "
                "num_workers=0 and give the reader num_threads= (decoding threads) or "
                "worker='process' (its own reader process, outside the training GIL)"
            )
        return self._run()

    def _run(self) -> Iterator[Batch]:
        if self._active is not None:
            self._active.close()
        epoch, start = self.epoch, self._position
        run: EpochRun | ProcessRun
        if self.worker == "process":
            if self._process is None:
                self._process = ReaderProcess(self._process_config(), self.device, self.pin_memory)
            run = self._process.run(epoch, start, self.stats)
        else:
            run = EpochRun(self, epoch, start)
        self._active = run
        try:
            for batch, pos_after, rows in run:
                self._position = pos_after
                if isinstance(run, EpochRun):
                    self.stats.rows_yielded += rows
                    self.stats.batches_yielded += 1
                else:
                    self.stats = run.stats  # the reader process counts for us
                yield run.deliver(batch)
            if not isinstance(run, EpochRun):
                self.stats = run.stats
            self.epoch, self._position = epoch + 1, 0
        finally:
            run.close()
            if self._active is run:
                self._active = None

    def _process_fits(self) -> bool:
        """Whether ``worker="auto"`` takes a reader process: batches go to a CUDA device
        (where the training thread's launches must not wait for the GIL behind batch
        assembly) and the process can re-open the files and get the column defaults."""
        if self.device is None or self.device.type != "cuda" or self.options.filesystem is not None:
            return False
        try:
            self._process_config()  # paths that are not strings or paths, odd defaults
        except (TypeError, ValueError):
            return False
        return True

    def _process_config(self) -> dict[str, Any]:
        paths = self._paths_arg
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        columns = []
        for rc in self._resolved:
            spec: dict[str, Any] = {"name": rc.name}
            for key in ("default", "element_default"):
                value = getattr(rc.spec, key)
                if value is not MISSING:
                    try:
                        json.dumps(value)
                    except TypeError as e:
                        raise ValueError(
                            f"column {rc.name!r}: {key}={value!r} must be JSON-able to reach "
                            "the reader process"
                        ) from e
                    spec[key] = value
            if rc.spec.dtype is not None:
                spec["dtype"] = str(rc.spec.dtype).removeprefix("torch.")
            columns.append(spec)
        reader = {
            "paths": paths,
            "columns": columns,
            "batch_size": self.batch_size,
            "format": self.format,
            # "window", not True: the reader process must not warn a second time.
            "shuffle": "window" if self.shuffle is True else self.shuffle,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "rank": self.rank,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "num_threads": self.num_threads,
            "keyed_jagged": list(self.options.keyed_jagged or []) or None,
            "keyed_jagged_key": self.options.keyed_jagged_key,
            "on_error": self.on_error,
        }
        return {"reader": reader, "fingerprint": self._fingerprint, "slots": self.prefetch + 2}

    def close(self) -> None:
        """Stop any pass in progress and the reader process (``worker="process"``)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._process is not None:
            self._process.close()
            self._process = None

    def __enter__(self) -> ColumnReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None:
            with contextlib.suppress(Exception):
                process.close()

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.epoch = check_int(epoch, "ColumnReader.set_epoch: epoch", minimum=0)
        self._position = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Where the reader stands, as plain JSON-able data.

        ``position`` counts the rows of this rank's epoch stream already yielded (in
        stream order, so it also pins the place inside a shuffle window or bucket);
        ``next`` names the file, unit and row the stream continues from (the window, or
        the bucket, and the row in it, when shuffling). Loading it into a reader over the
        same files makes it yield exactly the rows not yet yielded, in the same order.
        """
        state: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self._position,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "fingerprint": self._fingerprint,
            "stats": self.stats.to_dict(),
        }
        state["next"] = self._where(self.epoch, self._position)
        return state

    def _where(self, epoch: int, position: int) -> dict[str, Any] | None:
        if self.shuffle == "epoch":
            lo, _ = rank_rows(self.total_rows, self.rank, self.world_size)
            if position >= self.num_rows:
                return None
            bucket, row = self._bucket_plan(epoch).locate(lo + position)
            return {"bucket": bucket, "row_in_bucket": row}
        if self.shuffle:
            w = position // self.shuffle_buffer
            return {"window": w, "row_in_window": position - w * self.shuffle_buffer}
        segs = self._segments(epoch)
        assert self._segment_cache is not None
        ends = self._segment_cache[2]
        k = bisect.bisect_right(ends, position)
        if k == len(segs):
            return None
        seg = segs[k]
        row = seg.start + position - (ends[k] - seg.rows)
        return {"file": self._files[seg.file].uri, "unit": seg.unit, "row": row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; raises if it was taken over other data."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a ColumnReader state (format {state.get('format')!r}, "
                f"version {state.get('version')!r})"
            )
        for key in ("rank", "world_size", "shuffle", "seed", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ColumnReader state has {key}={state[key]!r} but this reader has "
                    f"{key}={getattr(self, key)!r}; resume with the same setting"
                )
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(
                "ColumnReader state was saved over different data (files, row groups or "
                "columns changed); exact resume needs the same files"
            )
        position = check_int(state["position"], "ColumnReader state: position", minimum=0)
        if position > self.num_rows:
            raise ValueError(f"position {position} is past this rank's {self.num_rows} rows")
        if self._active is not None:
            self._active.close()
        self.epoch = check_int(state["epoch"], "ColumnReader state: epoch", minimum=0)
        self._position = position
        self.stats = ReadStats.from_dict(dict(state.get("stats", {})))


@dataclass
class _InFlight:
    """A batch whose host-to-device copy was issued on the reader's side stream."""

    batch: Batch
    host: Batch
    event: torch.cuda.Event
    owners: list[torch.Tensor]  # record_stream on these covers all of the batch's memory


class EpochRun:
    """One pass over (the rest of) an epoch: decoding pool, assembler thread, batch queue.

    :class:`ColumnReader` starts one per ``iter()``; the reader process of
    ``worker="process"`` drives one without its thread, through :meth:`batch_parts` and
    :meth:`assemble`.

    Args:
        reader: the reader whose plan, files and counters the pass uses.
        epoch: the epoch to read.
        start: rows of the rank's epoch stream already yielded (where to resume).
        start_thread: start the assembler thread that fills the batch queue.
    """

    def __init__(
        self, reader: ColumnReader, epoch: int, start: int, start_thread: bool = True
    ) -> None:
        self.r = reader
        self.epoch = epoch
        self.start = start
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=reader.prefetch)
        self.stop = threading.Event()
        self.stream: torch.cuda.Stream | None = None
        self.retiring: deque[tuple[torch.cuda.Event, Batch]] = deque()
        self.pool = ThreadPoolExecutor(reader.num_threads, thread_name_prefix="columnio-decode")
        self.thread = threading.Thread(target=self._produce, name="columnio-assemble", daemon=True)
        # Epoch shuffle: every bucket decodes the units again, so a unit that failed is
        # skipped (and counted) once, and a unit's filled nulls are counted once.
        self.failed_units: set[int] = set()
        self.counted_units: set[int] = set()
        if start_thread:
            self.thread.start()

    # consumer side
    def __iter__(self) -> Iterator[tuple[Batch, int, int]]:
        while True:
            item = self.queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self.pool.shutdown(wait=True, cancel_futures=True)

    # producer side
    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._batches():
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(_Failure(e))

    def _plan(self) -> tuple[list[tuple[Segment, int]], int]:
        """Segments still to read, each with its first slot in the stream, and the skip."""
        r = self.r
        segs = r._segments(self.epoch)
        if r.shuffle:
            # Resume rebuilds the whole window the position falls in, then skips into it.
            begin = (self.start // r.shuffle_buffer) * r.shuffle_buffer
            # Split segments at window boundaries so each window is whole segments.
            out, pos = [], 0
            for seg in segs:
                a = seg.start
                while a < seg.stop:
                    edge = (pos // r.shuffle_buffer + 1) * r.shuffle_buffer
                    b = min(seg.stop, a + edge - pos)
                    if pos >= begin:
                        out.append((Segment(seg.file, seg.unit, a, b), pos))
                    pos += b - a
                    a = b
            return out, self.start - begin
        out, pos = [], 0
        for seg in segs:
            end = pos + seg.rows
            if end > self.start:
                cut = max(0, self.start - pos)
                out.append((Segment(seg.file, seg.unit, seg.start + cut, seg.stop), pos + cut))
            pos = end
        return out, 0

    def _decoded(
        self, plan: list[tuple[Segment, int]]
    ) -> Iterator[tuple[Segment, int, dict[str, ColumnValue] | None]]:
        """Each planned segment's columns (``None`` when skipped), decoded ahead in the pool."""
        r = self.r
        units: list[tuple[int, int]] = []
        for seg, _ in plan:
            if not units or units[-1] != (seg.file, seg.unit):
                units.append((seg.file, seg.unit))
        jobs = [(r._files[fi], r._metas[fi], ui) for fi, ui in units]
        decoded = decode_ahead(self.pool, jobs, r._resolved, 2 * r.num_threads, self.stop)
        current: tuple[tuple[int, int], dict[str, ColumnValue] | None] | None = None
        for seg, pos in plan:
            key = (seg.file, seg.unit)
            if current is None or current[0] != key:
                nxt = next(decoded, None)
                if nxt is None:  # stopped
                    return
                cols, local, error = nxt
                rows = r._metas[seg.file].unit_rows[seg.unit]
                where = (r._files[seg.file].uri, seg.unit)
                count_unit(r.stats, r.on_error, where, rows, (local, error))
                current = (key, cols)
            cols = current[1]
            if cols is not None:
                cols = {k: slice_rows(v, seg.start, seg.stop) for k, v in cols.items()}
            yield seg, pos, cols

    def _pieces(self) -> Iterator[Piece]:
        r = self.r
        if r.shuffle == "epoch":
            yield from self._epoch_pieces()
            return
        plan, skip = self._plan()
        if not r.shuffle:
            for seg, pos, cols in self._decoded(plan):
                if cols is not None:
                    yield Piece(cols, torch.arange(pos, pos + seg.rows, dtype=torch.int64))
            return
        window: list[tuple[int, int, dict[str, ColumnValue] | None]] = []
        current_w = None
        for seg, pos, cols in self._decoded(plan):
            w = pos // r.shuffle_buffer
            if current_w is not None and w != current_w and window:
                yield from self._window(current_w, window, skip)
                skip, window = 0, []
            current_w = w
            window.append((pos, seg.rows, cols))
        if window and current_w is not None:
            yield from self._window(current_w, window, skip)

    def _window(
        self, w: int, parts: list[tuple[int, int, dict[str, ColumnValue] | None]], skip: int
    ) -> Iterator[Piece]:
        r = self.r
        base = w * r.shuffle_buffer
        size = parts[-1][0] + parts[-1][1] - base
        present = torch.zeros(size, dtype=torch.bool)
        for pos, rows, cols in parts:
            if cols is not None:
                present[pos - base : pos - base + rows] = True
        order = window_order(size, r.seed, self.epoch, r.rank, w)
        kept_slots = torch.nonzero(present.index_select(0, order)).flatten()
        kept_slots = kept_slots[kept_slots >= skip]
        if kept_slots.numel() == 0:
            return
        # Row index within the concatenation of present parts, for each window row.
        dense_index = torch.cumsum(present.to(torch.int64), 0) - 1
        take = dense_index.index_select(0, order.index_select(0, kept_slots))
        live = [cols for _, _, cols in parts if cols is not None]
        joined = {rc.name: cat_rows([c[rc.name] for c in live]) for rc in r._resolved}
        cols = {k: take_rows(v, take) for k, v in joined.items()}
        yield Piece(cols, base + kept_slots)

    def _epoch_pieces(self) -> Iterator[Piece]:
        """The rank's share of the epoch's bucket stream, one piece per bucket it overlaps."""
        r = self.r
        plan = r._bucket_plan(self.epoch)
        lo, hi = rank_rows(r.total_rows, r.rank, r.world_size)
        position = self.start
        while lo + position < hi and not self.stop.is_set():
            bucket, row = plan.locate(lo + position)
            take = min(hi, plan.ends[bucket]) - plan.start(bucket) - row
            rows = plan.stream_rows(bucket)[row : row + take]
            gathered = self._gather(rows)
            if gathered is None:  # stopped
                return
            cols, kept = gathered
            slots = torch.arange(position, position + take, dtype=torch.int64)[kept]
            if slots.numel():
                yield Piece(cols, slots)
            position += take

    def _gather(self, rows: torch.Tensor) -> tuple[dict[str, ColumnValue], torch.Tensor] | None:
        """Columns of the global ``rows`` in the given order, and which rows were present.

        Rows are read unit by unit in file order (each unit decoded once), then put in the
        asked order with one gather per column.
        """
        r = self.r
        ascending, _ = torch.sort(rows)
        unit_of = torch.searchsorted(r._unit_ends, ascending, right=True)
        units, counts = torch.unique_consecutive(unit_of, return_counts=True)
        indices = units.tolist()
        live = [u for u in indices if u not in self.failed_units]
        jobs = [
            (r._files[r._units[u].file], r._metas[r._units[u].file], r._units[u].unit) for u in live
        ]
        decoded = decode_ahead(self.pool, jobs, r._resolved, 2 * r.num_threads, self.stop)
        parts: list[dict[str, ColumnValue]] = []
        present = torch.ones(ascending.numel(), dtype=torch.bool)
        first = 0
        for index, n in zip(indices, counts.tolist(), strict=True):
            ref = r._units[index]
            if index in self.failed_units:
                present[first : first + n] = False
                first += n
                continue
            nxt = next(decoded, None)
            if nxt is None:
                return None
            cols, local, error = nxt
            where = (r._files[ref.file].uri, ref.unit)
            first_time = index not in self.counted_units
            if not count_unit(
                r.stats, r.on_error, where, ref.rows, (local, error), count_nulls=first_time
            ):
                self.failed_units.add(index)
                present[first : first + n] = False
            else:
                assert cols is not None
                self.counted_units.add(index)
                unit_start = int(r._unit_ends[index]) - ref.rows
                local_rows = ascending[first : first + n] - unit_start
                parts.append({k: take_rows(v, local_rows) for k, v in cols.items()})
            first += n
        # Output row j is ascending row searchsorted(ascending, rows[j]) among those present.
        where = torch.searchsorted(ascending, rows)
        kept = present.index_select(0, where)
        dense = torch.cumsum(present.to(torch.int64), 0) - 1
        take = dense.index_select(0, where[kept])
        if not parts:
            return {}, kept
        joined = {rc.name: cat_rows([p[rc.name] for p in parts]) for rc in r._resolved}
        return {k: take_rows(v, take) for k, v in joined.items()}, kept

    def _batches(self) -> Iterator[tuple[Batch, int, int]]:
        for parts in self.batch_parts():
            yield self._emit(parts)

    def batch_parts(self) -> Iterator[list[Piece]]:
        """The pieces of each batch of the run, in order (``drop_last`` applied)."""
        r = self.r
        buf = PieceBuffer()
        for piece in self._pieces():
            buf.add(piece)
            while buf.rows >= r.batch_size:
                yield buf.take(r.batch_size)
        if buf.rows:
            if r.drop_last:
                r.stats.rows_dropped_last += buf.rows
            else:
                yield buf.take(buf.rows)

    def assemble(
        self, parts: list[Piece], into: Callable[[int], torch.Tensor] | None = None
    ) -> Batch:
        """One batch of ``parts`` (from :meth:`batch_parts`), carved from ``into`` if given.

        Args:
            parts: the pieces of one batch.
            into: returns a uint8 buffer of at least the asked bytes for the whole batch
                (the reader process's shared-memory slot); ``None`` allocates.
        """
        return self.r._builder.assemble(parts, into=into)

    def _emit(self, parts: list[Piece]) -> tuple[Any, int, int]:
        rows = sum(p.rows for p in parts)
        batch = self.assemble(parts)
        dev = self.r.device
        if dev is not None and dev.type == "cuda":
            batch = self._copy(batch, dev)
        elif dev is not None:
            batch = batch_to(batch, dev)
        return batch, parts[-1].last_pos + 1, rows

    def _copy(self, host: Batch, dev: torch.device) -> _InFlight:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=dev)
        with torch.cuda.device(dev), torch.cuda.stream(self.stream):
            moved, owners = move_batch_to_cuda(host, dev)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _InFlight(moved, host, event, owners)

    def deliver(self, item: Any) -> Batch:
        """The consumer's side: wait (on the GPU, not the host) for the batch's copy."""
        if not isinstance(item, _InFlight):
            return item
        hand_over(item.event, item.owners, self.r.device)
        # Pinned host blocks stay referenced until their copy has run.
        self.retiring.append((item.event, item.host))
        while self.retiring and self.retiring[0][0].query():
            self.retiring.popleft()
        return item.batch
