"""Host copies of what a save writes: streamed in chunks, or snapshotted for an async save.

A blocking save copies one chunk at a time to the host and hands it to a writer thread,
so host memory is bounded by the chunks in flight, not by the table. An async save
copies everything first, GPU tensors into pinned host buffers with non-blocking copies
(one wait at the end), and returns; the files are written behind training. Pinned buffers
are kept for the next async save, whose tensors usually have the same shapes.

Page-locked memory is slow to allocate (about 0.3 s a GB on an H100 host), so a snapshot
never allocates it: a tensor with no pinned buffer of its shape is copied to ordinary
memory, and the writer thread, once its files are written, pins buffers of the shapes
that were missing, for the next save.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "MIN_PART_BYTES",
    "PinnedPool",
    "estimate_chunk_rows",
    "host_copies",
    "host_copy",
    "iter_host_chunks",
    "spread_chunk_rows",
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


def host_copy(t: torch.Tensor, *, snapshot: bool, pool: PinnedPool | None) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor.

    With ``snapshot`` the result never shares memory with ``t`` (training may change
    ``t`` while the copy is written); a CUDA tensor goes to a pinned buffer with a
    non-blocking copy (synchronize before reading it). Without, a contiguous CPU tensor
    comes back as it is and a CUDA tensor is copied synchronously.
    """
    t = t.detach()
    if t.device.type == "cpu":
        if snapshot:
            return t.clone(memory_format=torch.contiguous_format)
        return t.contiguous()
    if snapshot and pool is not None:
        buf = pool.take(t)
        if buf is not None:
            buf.copy_(t, non_blocking=True)
            return buf
    return t.to("cpu").contiguous()


def host_copies(
    tensors: Mapping[str, torch.Tensor], *, snapshot: bool, pool: PinnedPool | None
) -> dict[str, torch.Tensor]:
    """:func:`host_copy` of every tensor of a dict."""
    return {k: host_copy(v, snapshot=snapshot, pool=pool) for k, v in tensors.items()}


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
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The chunks of a KeyedState export, copied to the host one at a time."""
    for keys, slots in chunks:
        yield (
            host_copy(keys, snapshot=snapshot, pool=pool),
            host_copies(slots, snapshot=snapshot, pool=pool),
        )
