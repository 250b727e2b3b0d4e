"""Feeding batches to the device: pinned host batches and a CUDA-stream prefetcher.

:class:`DevicePrefetcher` (made by :func:`to_device`) wraps any iterable of batches and
copies batch ``k + 1`` to the GPU on a side stream while the model trains on batch ``k``.
A batch is a ``dict[str, Tensor | JaggedTensor | KeyedJaggedTensor]`` (nested dicts, lists
and tuples of those work too); items that are not dicts, such as a streaming reader's
end-of-window marker, pass through unchanged and in order.

For example:

    >>> import torch
    >>> from recstack.columnio.device import to_device
    >>> batches = [{"label": torch.tensor([1.0, 0.0])}, "end-of-window"]
    >>> [item if isinstance(item, str) else item["label"].tolist()
    ...  for item in to_device(batches, "cpu")]
    [[1.0, 0.0], 'end-of-window']
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor

__all__ = ["DevicePrefetcher", "batch_to", "pin_batch", "record_batch_stream", "to_device"]

_LEAF_TYPES = (torch.Tensor, JaggedTensor, KeyedJaggedTensor)

# Entry kinds in the prefetch queue.
_ITEM, _END, _ERROR = "item", "end", "error"
# State markers: the source has no state_dict / an entry leaves the state as it was / no
# state captured yet (state_dict() then asks the source itself).
_NO_STATE = object()
_KEEP = object()
_LIVE = object()


def _map_batch(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every tensor-like leaf; other values are kept as they are."""
    if isinstance(obj, _LEAF_TYPES):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: _map_batch(value, fn) for key, value in obj.items()}
    if _is_namedtuple(obj):
        return type(obj)(*(_map_batch(value, fn) for value in obj))
    if type(obj) in (list, tuple):
        return type(obj)(_map_batch(value, fn) for value in obj)
    return obj


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _leaves(obj: Any) -> Iterator[Any]:
    """Every tensor-like leaf of a batch, in the order :func:`_map_batch` visits them."""
    if isinstance(obj, _LEAF_TYPES):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _leaves(value)
    elif type(obj) in (list, tuple) or _is_namedtuple(obj):
        for value in obj:
            yield from _leaves(value)


_ALIGN = 64  # bytes; every tensor of a packed block starts on a cache line


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every plain tensor, inside JaggedTensors and KeyedJaggedTensors too."""
    return _map_batch(
        batch, lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf.map_tensors(fn)
    )


def _tensors(batch: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def visit(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    _map_tensors(batch, visit)
    return found


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _is_packed_pinned(tensors: list[torch.Tensor]) -> bool:
    host = [t for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    return not host or (len({_storage_key(t) for t in host}) == 1 and host[0].is_pinned())


def pin_batch(batch: Any) -> Any:
    """A batch whose CPU tensors all live in one page-locked block, so it moves in one copy.

    Every CPU tensor (inside :class:`JaggedTensor` and :class:`KeyedJaggedTensor` too) is
    copied into a single pinned buffer and replaced by a view of it: a host-to-device copy
    of the batch is then one asynchronous ``cudaMemcpy`` instead of one per tensor, which
    is what keeps the training loop's per-batch cost flat as the column count grows. A
    batch already packed this way is returned as it is; tensors on a device and non-tensor
    values are kept. Needs a CUDA build with a device. Mappings come back as plain dicts.
    """
    tensors = _tensors(batch)
    if _is_packed_pinned(tensors):
        return batch
    offsets: dict[int, int] = {}
    total = 0
    for t in tensors:
        if t.device.type == "cpu" and id(t) not in offsets:
            offsets[id(t)] = total
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    block = torch.empty(total, dtype=torch.uint8, pin_memory=True)

    def place(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t
        start = offsets[id(t)]
        nbytes = t.numel() * t.element_size()
        view = block[start : start + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        return view

    return _map_tensors(batch, place)


def move_batch_to_cuda(batch: Any, device: torch.device) -> tuple[Any, list[torch.Tensor]]:
    """Move a batch with one copy per host storage (one for a :func:`pin_batch` batch).

    Tensors that are views of one pinned storage are rebuilt on the device as views of one
    copied storage; anything else (pageable memory, storages mostly unused by the batch)
    is copied tensor by tensor. Call inside the copy stream's context. Also returns the
    tensors that own the batch's device memory: ``record_stream`` on them covers it all.
    """
    tensors = [t for t in _tensors(batch) if t.device.type == "cpu"]
    used: dict[int, int] = {}
    for t in tensors:
        used[_storage_key(t)] = used.get(_storage_key(t), 0) + t.numel() * t.element_size()
    copied: dict[int, torch.UntypedStorage] = {}
    owners: list[torch.Tensor] = []
    for t in tensors:
        key = _storage_key(t)
        storage = t.untyped_storage()
        if key in copied or not t.is_pinned() or used[key] * 2 < storage.nbytes():
            continue
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        owners.append(flat.to(device, non_blocking=True))
        copied[key] = owners[-1].untyped_storage()

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t
        dev = copied.get(_storage_key(t))
        if dev is None:
            owners.append(t.to(device, non_blocking=t.is_pinned()))
            return owners[-1]
        out = torch.empty(0, dtype=t.dtype, device=device)
        return out.set_(dev, t.storage_offset(), t.shape, t.stride())

    return _map_tensors(batch, move), owners


def batch_to(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor of a batch to ``device`` (same structure; other values kept).

    ``non_blocking=True`` overlaps the copy with host work only for pinned host tensors;
    the caller then owns the ordering (see :class:`DevicePrefetcher`).
    """
    return _map_batch(batch, lambda leaf: leaf.to(device, non_blocking=non_blocking))


def record_batch_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    """``record_stream(stream)`` on every CUDA tensor of a batch; CPU tensors are skipped.

    Tells the caching allocator that ``stream`` uses the memory, so when the batch is freed
    the memory is not handed out again before ``stream``'s queued work on it has run.
    """
    # Once per storage: views of one block share one allocation, and recording costs a
    # call into the allocator each.
    seen: set[int] = set()
    for t in _tensors(batch):
        if t.is_cuda and t.numel() > 0:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                t.record_stream(stream)


def hand_over(
    event: torch.cuda.Event, owners: Iterable[torch.Tensor], device: torch.device
) -> None:
    """Let the current stream use a batch copied on a side stream: wait for the copy's
    ``event`` on the GPU (no host sync), and ``record_stream`` its device memory.

    The memory was allocated on the side stream; without the record the caching allocator
    could give it to a later copy as soon as the batch is dropped, while kernels queued on
    the compute stream still read it.
    """
    current = torch.cuda.current_stream(device)
    current.wait_event(event)
    for t in owners:
        t.record_stream(current)


def _all_host_pinned(batch: Any) -> bool:
    # An empty tensor has no memory to pin (torch never reports it pinned) nor to copy.
    return all(
        leaf.device.type != "cpu"
        or leaf.is_pinned()
        or (isinstance(leaf, torch.Tensor) and leaf.numel() == 0)
        for leaf in _leaves(batch)
    )


@dataclass
class _Entry:
    """One prefetched position of the source: an item, its end, or its error."""

    kind: str
    value: Any = None
    state: Any = _KEEP
    passthrough: bool = False  # an item that is not a batch (a marker)
    # CUDA only: the host batch the copy reads from, kept alive until the copy is done,
    # and the event recorded on the copy stream after the copy.
    host: Any = None
    event: torch.cuda.Event | None = None
    owners: list[torch.Tensor] | None = None  # own all of the batch's device memory


class DevicePrefetcher:
    """Iterate ``source`` with its batches moved to ``device``, copies ahead of the consumer.

    On CUDA, a side stream copies up to ``prefetch`` batches ahead (from pinned memory,
    pinning on the host first when ``pin_memory`` and a batch is not pinned yet), so the
    copy of batch ``k + 1`` overlaps the training step on batch ``k``. When batch ``k`` is
    handed out, the consumer's current stream waits on its copy (no host sync) and every
    tensor gets ``record_stream(current stream)``: the memory was allocated on the side
    stream, and without the record the caching allocator could give it to the next copy as
    soon as the consumer drops the batch, while kernels queued on the compute stream still
    read it. On other devices (``"cpu"``) batches are moved with ``.to`` and no streams.

    On CUDA with ``prefetch >= 1`` a worker thread pulls from the source and issues the
    copies, so the training loop's ``next()`` only takes a ready batch and queues a wait on
    its copy event. Items that are not dicts pass through unchanged and in order, as soon
    as they are pulled: a streaming reader's end-of-window marker never waits for the next
    window's data. (Without the worker, on the CPU or with ``prefetch=0``, the source is
    never pulled past such an item before it is handed out, for the same reason.) An
    exception raised by the source (or by moving a batch) reaches the consumer at its
    position, after the items before it; the pass then ends.

    Resuming: the source is pulled ahead of the consumer, so the prefetcher keeps the
    source's ``state_dict()`` taken after each pull and :meth:`state_dict` returns the one
    of the last item handed out. :meth:`load_state_dict` forwards to the source and drops
    what was prefetched. ``iter()`` starts a new pass from ``iter(source)`` (a
    ``ColumnReader``'s next epoch), unless the pass just started has not been read yet.

    Args:
        source: Iterable of batches (and pass-through items), e.g. a ``ColumnReader``.
        device: Where batches go.
        prefetch: Batches kept in flight ahead of the consumer (0: copy on demand).
        pin_memory: Pin unpinned host batches before copying to CUDA. With ``False``,
            unpinned batches are copied synchronously.
    """

    def __init__(
        self,
        source: Iterable[Any],
        device: torch.device | str | int,
        *,
        prefetch: int = 1,
        pin_memory: bool = True,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"DevicePrefetcher: prefetch must be an int >= 0, got {prefetch!r}")
        if not isinstance(source, Iterable):
            raise TypeError(
                f"DevicePrefetcher: source must be iterable, got {type(source).__name__}"
            )
        self._source = source
        self._device = torch.device(device)
        self._prefetch = prefetch
        self._pin_memory = bool(pin_memory)
        self._cuda = self._device.type == "cuda"
        self._stream: torch.cuda.Stream | None = None  # created on first use
        self._has_state = callable(getattr(source, "state_dict", None))
        self._queue: deque[_Entry] = deque()
        # Host batches of copies handed out or dropped, with their events: kept alive
        # until the copy has run (the consumer's wait is asynchronous to the host).
        self._retiring: deque[tuple[torch.cuda.Event, Any]] = deque()
        self._orphans: list[tuple[torch.cuda.Event, Any]] = []
        self._retire_lock = threading.Lock()
        self._it: Iterator[Any] | None = None
        self._fresh = False  # a pass was started and nothing has been asked of it yet
        self._source_done = False  # the source's end or error is in the queue
        self._exhausted = False  # the consumer has reached the end (or error) of the pass
        self._state: Any = _LIVE
        # CUDA with prefetch: a worker thread pulls and issues the copies, so the training
        # loop's next() only waits on an event; its Python work would otherwise sit on the
        # critical path between two steps.
        self._threaded = self._cuda and prefetch > 0
        self._worker: threading.Thread | None = None
        self._ready: queue.Queue[_Entry] | None = None
        self._stop = threading.Event()

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> DevicePrefetcher:
        # `it = iter(pf); for b in it:` calls iter twice; starting another pass then would
        # skip one of the source's epochs.
        if not (self._it is not None and self._fresh):
            self._start()
        return self

    def __next__(self) -> Any:
        if self._exhausted:
            raise StopIteration
        if self._it is None:
            self._start()
        self._fresh = False
        if self._threaded:
            if self._worker is None:
                self._launch()
            assert self._ready is not None
            return self._deliver(self._ready.get())
        if not self._queue:
            self._fill(1)
        if not self._queue:
            self._exhausted = True
            raise StopIteration
        entry = self._queue.popleft()
        if entry.kind == _ITEM and not entry.passthrough:
            # Start the next copies before the consumer queues its step on this batch.
            self._fill(self._prefetch)
        return self._deliver(entry)

    def _launch(self) -> None:
        self._stop = threading.Event()
        self._ready = queue.Queue(maxsize=self._prefetch)
        self._worker = threading.Thread(
            target=self._work, args=(self._stop, self._ready), name="columnio-h2d", daemon=True
        )
        self._worker.start()

    def _work(self, stop: threading.Event, ready: queue.Queue[_Entry]) -> None:
        def put(entry: _Entry) -> bool:
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            self._retire_later(entry)
            return False

        with torch.cuda.device(self._device):
            while not stop.is_set():
                entry = self._pull()
                if not put(entry) or entry.kind != _ITEM:
                    return

    def _retire_later(self, entry: _Entry) -> None:
        # A copy issued but never handed out: its host memory lives until the copy ran.
        if entry.event is not None:
            with self._retire_lock:
                self._orphans.append((entry.event, entry.host))

    def _stop_worker(self) -> None:
        if self._worker is None:
            return
        self._stop.set()
        assert self._ready is not None
        while self._worker.is_alive():
            with contextlib.suppress(queue.Empty):
                self._retire(self._ready.get(timeout=0.05))
        self._worker.join()
        while not self._ready.empty():
            self._retire(self._ready.get_nowait())
        with self._retire_lock:
            self._retiring.extend(self._orphans)
            self._orphans.clear()
        self._worker = None
        self._ready = None

    def _start(self) -> None:
        self._discard()
        self._it = None  # drop the old pass before the source starts a new one
        self._it = iter(self._source)
        self._fresh = True
        self._source_done = False
        self._exhausted = False
        # The state after iter() and before the first item: what state_dict() says until
        # an item is handed out.
        self._state = self._capture() if self._has_state else _LIVE

    def _fill(self, depth: int) -> None:
        # Never pull past a marker: what follows the end of a streaming window may not
        # exist yet, and the marker (and the batches before it) must not wait for it.
        while (
            len(self._queue) < depth
            and not self._source_done
            and not (self._queue and self._queue[-1].passthrough)
        ):
            self._queue.append(self._pull())

    def _pull(self) -> _Entry:
        assert self._it is not None
        try:
            item = next(self._it)
        except StopIteration:
            self._source_done = True
            try:
                return _Entry(_END, state=self._capture())
            except Exception as exc:
                return _Entry(_ERROR, exc)
        except Exception as exc:
            # Left in the queue so the consumer gets the items before it first; the state
            # stays that of the last item handed out, so a resume retries from here.
            self._source_done = True
            return _Entry(_ERROR, exc)
        try:
            state = self._capture()
            if not isinstance(item, Mapping):
                return _Entry(_ITEM, item, state, passthrough=True)
            if self._cuda:
                return self._copy_to_cuda(item, state)
            return _Entry(_ITEM, batch_to(item, self._device), state)
        except Exception as exc:
            self._source_done = True
            return _Entry(_ERROR, exc)

    def _copy_to_cuda(self, batch: Mapping[str, Any], state: Any) -> _Entry:
        stream = self._side_stream()
        if self._pin_memory:
            host, non_blocking = pin_batch(batch), True
        else:
            # Pageable memory is copied synchronously (still on the side stream): the host
            # may reuse such a buffer as soon as the copy call returns.
            host, non_blocking = batch, _all_host_pinned(batch)
        with torch.cuda.stream(stream):
            if non_blocking:
                moved, owners = move_batch_to_cuda(host, self._device)
            else:
                moved = batch_to(host, self._device, non_blocking=False)
                owners = None
            event = torch.cuda.Event()
            event.record(stream)
        return _Entry(_ITEM, moved, state, host=host, event=event, owners=owners)

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            if self._device.index is None:
                self._device = torch.device("cuda", torch.cuda.current_device())
            self._stream = torch.cuda.Stream(device=self._device)
        return self._stream

    def _deliver(self, entry: _Entry) -> Any:
        if entry.kind in (_END, _ERROR):
            self._exhausted = True
            self._stop_worker()
            self._release_copied()
            if entry.kind == _ERROR:
                raise entry.value
            self._set_state(entry.state)
            raise StopIteration
        self._set_state(entry.state)
        if entry.event is not None:
            if entry.owners is not None:
                hand_over(entry.event, entry.owners, self._device)
            else:
                torch.cuda.current_stream(self._device).wait_event(entry.event)
                record_batch_stream(entry.value, torch.cuda.current_stream(self._device))
            self._retire(entry)
        return entry.value

    def _retire(self, entry: _Entry) -> None:
        if entry.event is not None:
            self._retiring.append((entry.event, entry.host))
        self._release_copied()

    def _release_copied(self) -> None:
        # Events complete in the order they were recorded on the one side stream.
        while self._retiring and self._retiring[0][0].query():
            self._retiring.popleft()

    def _discard(self) -> None:
        """Drop what was prefetched; copies still running keep their host memory."""
        self._stop_worker()
        while self._queue:
            self._retire(self._queue.popleft())

    # ------------------------------------------------------------------ resume

    def _capture(self) -> Any:
        if not self._has_state:
            return _NO_STATE
        # A copy: a source may return (and later mutate) its live state.
        return copy.deepcopy(self._source.state_dict())  # type: ignore[attr-defined]

    def _set_state(self, state: Any) -> None:
        if state is not _KEEP:
            self._state = state

    def state_dict(self) -> dict[str, Any]:
        """The source's state after the last item handed out (its start state before any).

        Raises:
            TypeError: The source has no ``state_dict()``.
        """
        if not self._has_state:
            raise TypeError(
                f"DevicePrefetcher.state_dict: the source ({type(self._source).__name__}) has "
                "no state_dict(), so there is no position to save; wrap a resumable source "
                "such as a ColumnReader"
            )
        if self._state is _LIVE or self._state is _NO_STATE:
            return copy.deepcopy(self._source.state_dict())  # type: ignore[attr-defined]
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Forward ``state`` to the source and drop everything prefetched.

        The next ``next()`` or ``iter()`` continues from ``state``.

        Raises:
            TypeError: The source has no ``load_state_dict()``.
        """
        load = getattr(self._source, "load_state_dict", None)
        if not callable(load):
            raise TypeError(
                f"DevicePrefetcher.load_state_dict: the source ({type(self._source).__name__}) "
                "has no load_state_dict()"
            )
        self._discard()
        self._it = None
        self._fresh = False
        self._source_done = False
        self._exhausted = False
        load(state)
        # A source may apply a loaded state only when its next pass starts; until then the
        # position is the one just loaded.
        self._state = copy.deepcopy(state)

    def __repr__(self) -> str:
        return (
            f"DevicePrefetcher(source={type(self._source).__name__}, device={self._device}, "
            f"prefetch={self._prefetch}, pin_memory={self._pin_memory})"
        )


def to_device(
    source: Iterable[Any],
    device: torch.device | str | int,
    *,
    prefetch: int = 1,
    pin_memory: bool = True,
) -> DevicePrefetcher:
    """Wrap ``source`` so its batches arrive on ``device``; see :class:`DevicePrefetcher`."""
    return DevicePrefetcher(source, device, prefetch=prefetch, pin_memory=pin_memory)
