"""Host copies of what a save writes: streamed in chunks, or snapshotted for an async save.

A blocking save copies one chunk at a time to the host and hands it to a writer thread,
so host memory is bounded by the chunks in flight, not by the table. An async save
copies everything first and returns; the files are written behind training.

Where an async save's GPU tensors go, fastest first:

1. **Spare GPU memory** (:class:`GpuStage`): a device-to-device copy, at the GPU's memory
   bandwidth (milliseconds for gigabytes). The writer threads move each staged tensor to
   the host on a stream of their own just before writing it (:func:`to_host`; into pinned
   buffers kept from the previous save, which copy several times faster than ordinary
   memory), and the GPU memory is released file by file. Used while the staged bytes stay
   under a fraction of the GPU memory free when the save starts.
2. **Pinned host buffers** (:class:`PinnedPool`), kept from the previous async save,
   whose tensors usually have the same shapes: a non-blocking copy at the PCIe bandwidth.
3. **Ordinary host memory**: a synchronous copy, slower still. Page-locked memory is slow
   to allocate (about 0.3 s a GB on an H100 host), so a snapshot never allocates it: the
   writer thread, once its files are written, pins buffers of the shapes that were
   missing, for the next save.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "MIN_PART_BYTES",
    "GpuStage",
    "PinnedPool",
    "estimate_chunk_rows",
    "host_copies",
    "host_copy",
    "iter_host_chunks",
    "spread_chunk_rows",
    "to_host",
]


_Key = tuple[tuple[int, ...], torch.dtype]


class PinnedPool:
    """Reusable pinned host tensors, by shape and dtype (page-locked memory is slow to
    allocate: an async save should not pay for it, least of all on the training thread)."""

    def __init__(self) -> None:
        self._free: dict[_Key, list[torch.Tensor]] = defaultdict(list)
        self._lent: list[torch.Tensor] = []
        self._wanted: list[_Key] = []
        self._lock = threading.Lock()

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """A free pinned buffer shaped like ``like``, or ``None`` (the shape is noted:
        :meth:`recycle` pins one for the next save)."""
        key = (tuple(like.shape), like.dtype)
        with self._lock:
            free = self._free[key]
            if not free:
                self._wanted.append(key)
                return None
            buf = free.pop()
            self._lent.append(buf)
            return buf

    def recycle(self) -> None:
        """After a save's files are written: its buffers are free again, and buffers of
        the shapes it lacked are pinned now (off the training thread).

        Only those are kept: buffers the last save did not use (a table's last part
        changes shape as it grows, a delta's as its changed rows vary) are released, so
        the pool holds at most one save's worth of page-locked memory."""
        with self._lock:
            lent, wanted = self._lent, self._wanted
            self._lent, self._wanted = [], []
        fresh = [torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in wanted]
        free: dict[_Key, list[torch.Tensor]] = defaultdict(list)
        for buf in [*lent, *fresh]:
            free[(tuple(buf.shape), buf.dtype)].append(buf)
        with self._lock:
            self._free = free


class GpuStage:
    """Copies of an async save's GPU tensors kept in spare GPU memory, up to a budget.

    Args:
        fraction: the share of each GPU's free memory (the driver's free memory plus what
            PyTorch's caching allocator holds unused), measured at the first tensor on
            that GPU, that staged copies may fill; ``0`` stages nothing.

    Training keeps allocating while the files are written, so the budget leaves it the
    rest; the staged copies are released as the writer threads move them to the host.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self._left: dict[torch.device, int] = {}
        self.staged_bytes = 0

    def take(self, t: torch.Tensor) -> torch.Tensor | None:
        """A contiguous copy of CUDA tensor ``t`` in GPU memory, or ``None`` when the
        budget has no room for it."""
        if self.fraction <= 0:
            return None
        device = t.device
        if device not in self._left:
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            self._left[device] = int((free + cached) * self.fraction)
        nbytes = t.numel() * t.element_size()
        if nbytes > self._left[device]:
            return None
        try:
            out = t.clone(memory_format=torch.contiguous_format)
        except torch.OutOfMemoryError:
            self._left[device] = 0  # the estimate was wrong: the rest goes to the host
            return None
        self._left[device] -= nbytes
        self.staged_bytes += nbytes
        return out


def host_copy(
    t: torch.Tensor,
    *,
    snapshot: bool,
    pool: PinnedPool | None,
    stage: GpuStage | None = None,
) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor, or a GPU snapshot of it (see below).

    With ``snapshot`` the result never shares memory with ``t`` (training may change
    ``t`` while the copy is written): a CUDA tensor is copied into spare GPU memory when
    ``stage`` has room (the result is then a CUDA tensor: :func:`to_host` moves it), else
    to a pinned buffer of ``pool`` with a non-blocking copy (synchronize before reading
    either), else to ordinary memory. Without ``snapshot``, a contiguous CPU tensor comes
    back as it is and a CUDA tensor is copied synchronously.
    """
    t = t.detach()
    if t.device.type == "cpu":
        if snapshot:
            return t.clone(memory_format=torch.contiguous_format)
        return t.contiguous()
    if snapshot and stage is not None:
        staged = stage.take(t)
        if staged is not None:
            return staged
    if snapshot and pool is not None:
        buf = pool.take(t)
        if buf is not None:
            buf.copy_(t, non_blocking=True)
            return buf
    return t.to("cpu").contiguous()


def host_copies(
    tensors: Mapping[str, torch.Tensor],
    *,
    snapshot: bool,
    pool: PinnedPool | None,
    stage: GpuStage | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`host_copy` of every tensor of a dict."""
    return {k: host_copy(v, snapshot=snapshot, pool=pool, stage=stage) for k, v in tensors.items()}


_streams = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's copy stream on ``device``: PyTorch's pool streams do not wait for
    the default stream, so a writer's copies never queue behind training's kernels."""
    streams: dict[torch.device, torch.cuda.Stream] = getattr(_streams, "by_device", None) or {}
    _streams.by_device = streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def to_host(
    tensors: Mapping[str, torch.Tensor], pool: PinnedPool | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a file about to be written, with GPU-staged ones copied to the host
    on this thread's copy stream (the copy is complete when this returns): into a pinned
    buffer of ``pool`` when it has one of the shape (a copy at PCIe speed; the pool pins
    the missing shapes after the save), else into ordinary memory."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.device.type == "cuda":
            stream = _side_stream(t.device)
            buf = pool.take(t) if pool is not None else None
            with torch.cuda.stream(stream):
                if buf is None:
                    t = t.to("cpu")
                else:
                    t = buf.copy_(t, non_blocking=True)
                    stream.synchronize()
        out[name] = t
    return out


_ITEM_BYTES = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2,
               "bfloat16": 2, "int16": 2, "uint8": 1, "int8": 1, "bool": 1}  # fmt: skip


MIN_PART_BYTES = 8 << 20
"""Parts are not cut below this size to spread a small export over the threads."""


def estimate_chunk_rows(metadata: Mapping[str, Any], part_bytes: int) -> int:
    """Rows per exported chunk so that one part file holds about ``part_bytes``.

    Row size comes from the state's metadata ``"slots"`` (``{slot: {"dtype", "shape"}}``)
    when it has them, plus the 8-byte key; without them, 65,536 rows.
    """
    slots = metadata.get("slots") if isinstance(metadata, Mapping) else None
    if not isinstance(slots, Mapping) or not slots:
        return 1 << 16
    row = 8
    for info in slots.values():
        if not isinstance(info, Mapping):
            continue
        width = 1
        for d in info.get("shape") or []:
            width *= int(d) if isinstance(d, int) and d > 0 else 1
        row += width * _ITEM_BYTES.get(str(info.get("dtype")), 4)
    return max(1, part_bytes // row)


def spread_chunk_rows(
    metadata: Mapping[str, Any], part_bytes: int, threads: int, *, delta: bool
) -> int:
    """Rows per exported chunk for a save with ``threads`` writers: about ``part_bytes``
    a part, but an export too small to give every writer a part of that size is cut into
    about ``threads`` parts (none under :data:`MIN_PART_BYTES`), since each part file is
    written by one thread. A full export's size is its metadata's ``"num_keys"``; a
    delta's is unknown until exported, so its parts are ``part_bytes / threads``."""
    rows = estimate_chunk_rows(metadata, part_bytes)
    floor = max(1, rows * MIN_PART_BYTES // part_bytes)
    if delta:
        return max(floor, rows // threads, 1)
    num_keys = metadata.get("num_keys") if isinstance(metadata, Mapping) else None
    if isinstance(num_keys, int) and not isinstance(num_keys, bool) and num_keys > 0:
        return min(rows, max(floor, -(-num_keys // threads)))
    return rows


def iter_host_chunks(
    chunks: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    snapshot: bool,
    pool: PinnedPool | None,
    stage: GpuStage | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The chunks of a KeyedState export, copied one at a time (see :func:`host_copy`)."""
    for keys, slots in chunks:
        yield (
            host_copy(keys, snapshot=snapshot, pool=pool, stage=stage),
            host_copies(slots, snapshot=snapshot, pool=pool, stage=stage),
        )
