"""Host copies of what a save writes: streamed in chunks, or snapshotted for an async save.

A blocking save copies one chunk at a time to the host and hands it to a writer thread,
so host memory is bounded by the chunks in flight, not by the table. An async save
copies everything first, GPU tensors into pinned host buffers with non-blocking copies
(one wait at the end), and returns; the files are written behind training. Pinned buffers
are kept for the next async save, whose tensors usually have the same shapes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["PinnedPool", "estimate_chunk_rows", "host_copies", "host_copy", "iter_host_chunks"]


class PinnedPool:
    """Reusable pinned host tensors, by shape and dtype (page-locked memory is slow to
    allocate: an async save should not pay for it every time)."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(
            list
        )
        self._lent: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        with self._lock:
            free = self._free[key]
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        with self._lock:
            self._lent.append(buf)
        return buf

    def give_back_all(self) -> None:
        """Every buffer lent is free again (the save that used them has written them).

        Only those are kept: buffers the last save did not use (a table's last part
        changes shape as it grows, a delta's as its changed rows vary) are released, so
        the pool never holds more than one save's worth of page-locked memory."""
        with self._lock:
            self._free = defaultdict(list)
            for buf in self._lent:
                self._free[(tuple(buf.shape), buf.dtype)].append(buf)
            self._lent.clear()


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
