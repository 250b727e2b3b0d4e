"""Shared-memory batch slots and the JSON layout that describes a batch inside one.

A worker process assembles each batch straight into a slot: one memory-mapped file in
``/dev/shm`` (or the temp dir where there is none). It sends the trainer a layout, a JSON
tree giving each tensor's dtype, shape and byte offset. The trainer maps the same file and
rebuilds the batch as views: no pickle, and no copy beyond the one into the slot.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid
from typing import Any

import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor

__all__ = ["Slot", "decode_layout", "encode_layout", "shm_dir"]

_MB = 1 << 20


def shm_dir() -> str:
    """Where slot files live: RAM-backed ``/dev/shm`` when the system has one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class Slot:
    """One memory-mapped file a batch is written into (worker) or read from (trainer)."""

    def __init__(self, path: str, capacity: int, create: bool) -> None:
        self.path = path
        self.capacity = capacity
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def create(cls, capacity: int, tag: str) -> Slot:
        capacity = max(_MB, -(-capacity // _MB) * _MB)
        name = f"recstack-columnio-{os.getpid()}-{tag}-{uuid.uuid4().hex[:12]}"
        return cls(os.path.join(shm_dir(), name), capacity, create=True)

    def close(self, unlink: bool = False) -> None:
        del self.tensor
        # BufferError: a view of the map is still alive somewhere; the mapping then lives
        # until that view is collected, which is harmless.
        with contextlib.suppress(BufferError):
            self._map.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


_DTYPES = {
    str(d): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )
}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}


def _tree(v: Any, leaves: list[torch.Tensor]) -> dict[str, Any]:
    """The batch's shape as a tree whose leaves index into ``leaves`` (filled here)."""

    def ref(t: torch.Tensor) -> int:
        if not t.is_contiguous():
            raise ValueError("a batch tensor in a slot must be contiguous")
        leaves.append(t)
        return len(leaves) - 1

    if isinstance(v, torch.Tensor):
        return {"t": ref(v)}
    if isinstance(v, JaggedTensor):
        if v.weights is not None:
            raise ValueError("weighted JaggedTensors do not travel through slots")
        return {"j": [_tree(v.values, leaves), ref(v.offsets)]}
    if isinstance(v, KeyedJaggedTensor):
        return {"k": [v.keys(), ref(v.values()), ref(v.lengths()), v.stride(), v.length_per_key()]}
    raise TypeError(f"cannot place a {type(v).__name__} in a slot")


def encode_layout(batch: dict[str, Any], block: torch.Tensor) -> dict[str, Any]:
    """JSON-able layout of ``batch``, whose tensors are all views of ``block``.

    Tensors that sit back to back with one dtype form a group, so the reading side makes
    a whole group's views with one ``split`` (see :func:`decode_layout`). A leaf is
    ``[group, index in group, shape]``, or ``[-1, dtype, shape]`` when it is empty.
    """
    leaves: list[torch.Tensor] = []
    tree = {name: _tree(v, leaves) for name, v in batch.items()}
    base = block.data_ptr()
    refs: list[list[Any]] = [[] for _ in leaves]
    placed = sorted((t.data_ptr() - base, k) for k, t in enumerate(leaves) if t.numel() > 0)
    groups: list[list[Any]] = []
    end = -1
    for start, k in placed:
        t = leaves[k]
        dtype = str(t.dtype)
        if not groups or groups[-1][0] != dtype or start != end:
            groups.append([dtype, start, []])
        groups[-1][2].append(t.numel())
        refs[k] = [len(groups) - 1, len(groups[-1][2]) - 1, list(t.shape)]
        end = start + t.numel() * t.element_size()
    for k, t in enumerate(leaves):
        if t.numel() == 0:
            refs[k] = [-1, str(t.dtype), list(t.shape)]
    return {"groups": groups, "leaves": refs, "tree": tree}


def _decode(node: dict[str, Any], views: list[torch.Tensor]) -> Any:
    if "t" in node:
        return views[node["t"]]
    if "j" in node:
        values, offsets = node["j"]
        return JaggedTensor(_decode(values, views), views[offsets])
    keys, values, lengths, stride, per_key = node["k"]
    return KeyedJaggedTensor(
        keys, views[values], views[lengths], stride=stride, length_per_key=per_key
    )


def decode_layout(layout: dict[str, Any], block: torch.Tensor) -> dict[str, Any]:
    """The batch described by ``layout``, as views of ``block`` (host or device).

    This runs in the training thread for every batch, so it makes one ``split`` per group
    of same-dtype tensors rather than a few ops per tensor.
    """
    pieces = []
    for dtype_name, start, sizes in layout["groups"]:
        dtype = _DTYPES[dtype_name]
        nbytes = sum(sizes) * _ITEMSIZE[dtype]
        pieces.append(block[start : start + nbytes].view(dtype).split_with_sizes(sizes))
    views = []
    for ref in layout["leaves"]:
        if ref[0] < 0:
            views.append(block[:0].view(_DTYPES[ref[1]]).view(ref[2]))
            continue
        t = pieces[ref[0]][ref[1]]
        views.append(t if len(ref[2]) == 1 else t.view(ref[2]))
    return {name: _decode(node, views) for name, node in layout["tree"].items()}
