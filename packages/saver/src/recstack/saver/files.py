"""Tensor files: safetensors written in one pass with their checksum, atomically.

A checkpoint's tensors live in plain safetensors files (any safetensors reader opens
them). They are written here rather than with ``safetensors.torch.save_file`` for three
reasons: the checksum is computed while the bytes go out (no second read), the bytes of a
CPU tensor go to the file straight from its memory (no ``bytes`` copy), and the file
appears under its name only once complete and on disk (written aside, fsynced, renamed).

The checksum is CRC-32 (``zlib.crc32``): it detects truncation and bit rot at several
GB/s per core, and the threads that write files run it in parallel.
"""

from __future__ import annotations

import ctypes
import json
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CHECKSUM",
    "FileRecord",
    "SAFETENSORS_DTYPES",
    "crc32_file",
    "fsync_path",
    "read_header",
    "read_tensor_file",
    "write_bytes_atomic",
    "write_tensor_file",
]

#: The checksum every manifest records for its files.
CHECKSUM = "crc32"

#: torch dtype -> safetensors dtype name.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_BLOCK = 64 << 20  # bytes per write call: bounded, and large enough to stream at full speed


@dataclass(frozen=True)
class FileRecord:
    """A written file: its path relative to the checkpoint, byte size and checksum."""

    path: str
    bytes: int
    crc32: str


def _views(t: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of a contiguous CPU tensor, in blocks, without copying them."""
    n = t.numel() * t.element_size()
    if not n:
        return
    base = t.data_ptr()
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        yield memoryview((ctypes.c_char * size).from_address(base + start)).cast("B")


def _in_file_order(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Widest elements first: with the 8-byte-padded header, every tensor then starts at a
    multiple of its element size, so a reader views it in place instead of copying it."""
    return sorted(tensors.items(), key=lambda kv: -kv[1].element_size())


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in _in_file_order(tensors):
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        entries[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return len(raw).to_bytes(8, "little") + raw


def write_tensor_file(
    root: Path,
    rel: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
) -> FileRecord:
    """Write ``tensors`` (CPU, contiguous) as the safetensors file ``root / rel``.

    Written to a temporary name beside it, fsynced (unless ``durable`` is false), then
    renamed, so the file is either absent or complete. Returns its size and CRC-32
    (computed as it was written).

    Raises:
        TypeError: a tensor whose dtype safetensors cannot hold.
        ValueError: a tensor that is not a contiguous CPU tensor.
    """
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{rel}: tensor {name!r} must be a contiguous CPU tensor")
    header = _header(tensors, metadata)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    crc = zlib.crc32(header)
    size = len(header)
    with open(tmp, "wb", buffering=0) as f:
        f.write(header)
        for _, t in _in_file_order(tensors):
            for view in _views(t):
                crc = zlib.crc32(view, crc)
                f.write(view)
                size += len(view)
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return FileRecord(rel, size, f"{crc:08x}")


def write_bytes_atomic(root: Path, rel: str, data: bytes, *, durable: bool = True) -> FileRecord:
    """Write ``data`` as ``root / rel`` (aside, fsynced unless ``durable`` is false,
    renamed); return its record."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb", buffering=0) as f:
        f.write(data)
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return FileRecord(rel, len(data), f"{zlib.crc32(data):08x}")


def fsync_path(path: Path) -> None:
    """Make a file's data, or the names created in a directory, durable (a rename is on
    disk only once its directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc32_file(path: Path) -> tuple[int, str]:
    """``(byte size, CRC-32)`` of the file at ``path``."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, f"{crc:08x}"


def read_header(
    data: bytes | memoryview, where: str, size: int | None = None
) -> tuple[dict[str, dict], dict[str, str]]:
    """``({tensor: {"dtype", "shape", "data_offsets"}}, metadata)`` of safetensors bytes.

    ``data`` may be the whole file or its first bytes (at least the header), with ``size``
    the whole file's length (default ``len(data)``).

    Raises:
        ValueError: the bytes are not a well-formed safetensors file (``where`` names it).
    """
    size = len(data) if size is None else size
    if len(data) < 8:
        raise ValueError(f"{where}: truncated ({len(data)} bytes, no safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{where}: truncated (its header says {n} bytes, the file is shorter)")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as err:
        raise ValueError(f"{where}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: the safetensors metadata is not a JSON object")
    end = 0
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise ValueError(f"{where}: tensor {name!r} {problem}")
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise ValueError(
            f"{where}: truncated (the tensors need {8 + n + end} bytes, the file has {size})"
        )
    return header, meta


def _entry_problem(info: object) -> str | None:
    """What is wrong with a header entry, if anything: it must name a known dtype, a shape
    of sizes >= 0, and a byte range that holds exactly that many elements."""
    if not isinstance(info, dict) or info.get("dtype") not in _FROM_NAME:
        return "has a malformed header entry (no known dtype)"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    ints = (
        isinstance(shape, list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, *offsets)
        )  # fmt: skip
    )
    if not ints or offsets[1] < offsets[0]:
        return "has a malformed header entry (shape or data_offsets)"
    count = 1
    for d in shape:
        count *= d
    item = torch.empty(0, dtype=_FROM_NAME[info["dtype"]]).element_size()
    if offsets[1] - offsets[0] != count * item:
        return f"is {info['dtype']} {shape} but spans {offsets[1] - offsets[0]} bytes"
    return None


def byte_view(buf: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU uint8 tensor as a writable memoryview (no copy).

    The view does not keep ``buf`` alive: hold ``buf`` for as long as the view is used.
    """
    n = buf.numel()
    if not n:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")


def read_tensor_file(
    data: bytes | bytearray | torch.Tensor, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file's bytes, after :func:`read_header`
    checked it is whole and every entry consistent.

    Given the bytes as a uint8 tensor, the tensors are views of it where aligned (files
    written here always are: widest elements first), copies otherwise. Reading into
    torch-allocated memory rather than a ``bytearray`` matters on a GPU host: a host to
    device copy from it runs several times faster.
    """
    if not isinstance(data, torch.Tensor):
        data = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if len(data)
            else (torch.empty(0, dtype=torch.uint8))
        )
    view = byte_view(data)
    header, meta = read_header(view, where)
    base = 8 + int.from_bytes(view[:8], "little")
    out = {}
    for name, info in header.items():
        dtype = _FROM_NAME[info["dtype"]]
        start, stop = info["data_offsets"]
        raw = data[base + start : base + stop]
        if (base + start) % torch.empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # an unaligned tensor of a file written elsewhere
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out, meta
