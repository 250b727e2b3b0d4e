"""Reading a checkpoint's files back: checked against the manifest, then decoded.

Every file a load needs is checked first (present, of the recorded size and CRC-32, a
well-formed safetensors file whose tensors fit the manifest), in parallel; only then does
anything change in the objects loaded into. Part files are read whole (a part is one
exported chunk, so memory stays bounded by the part size), a few ahead of the import.

A check reads every byte, so a file checked into memory is kept there (up to a byte
budget, :class:`KeptBytes`) and imported from it: a checkpoint that fits the budget is
read once; the files beyond it are checked in blocks and read again when imported.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from recstack.saver.dtype_names import safetensors_name
from recstack.saver.errors import CheckpointError
from recstack.saver.files import byte_view, crc32_file, read_header, read_tensor_file
from recstack.saver.manifest import MANIFEST, safe_path

__all__ = [
    "CheckedFile",
    "KeptBytes",
    "default_keep_bytes",
    "part_expectation",
    "read_checked",
    "read_json",
    "read_parts",
    "shape_fits",
    "verify_files",
]


class CheckedFile:
    """A file of a checkpoint named by its manifest, with what the manifest says of it."""

    def __init__(self, ckpt: Path, manifest: dict[str, Any], rel: str) -> None:
        self.where = f"{ckpt / rel}"
        self.path = safe_path(ckpt, rel, str(ckpt / MANIFEST))
        info = manifest["files"].get(rel)
        if info is None:
            raise CheckpointError(f"{ckpt / MANIFEST}: names {rel!r} but not among its files")
        self.bytes: int = info["bytes"]
        self.crc32: str = info["crc32"]
        # The file's bytes, when :func:`verify_files` checked them into memory.
        self.kept: torch.Tensor | None = None

    def read(self, *, crc: bool = True) -> bytes:
        """The file's bytes, checked against the manifest's size and (with ``crc``, the
        default) CRC-32.

        Raises:
            CheckpointError: missing, truncated or changed.
        """
        data = self.read_buffer(crc=crc)  # held while its view is copied
        return bytes(byte_view(data))

    def read_buffer(self, *, crc: bool = True) -> torch.Tensor:
        """The file's bytes as a uint8 tensor (torch-allocated memory: copies from it to a
        GPU run several times faster than from a ``bytearray``), checked like
        :meth:`read`; a file :meth:`check` verified moments ago may skip the CRC.

        Raises:
            CheckpointError: missing, truncated or changed.
        """
        try:
            size = self.path.stat().st_size
            data = torch.empty(size, dtype=torch.uint8)
            got = 0
            with open(self.path, "rb", buffering=0) as f:
                view = byte_view(data)
                while got < size and (n := f.readinto(view[got:])):
                    got += n
            data = data[:got]
        except FileNotFoundError:
            raise CheckpointError(f"{self.where}: missing (the manifest lists it)") from None
        if len(data) != self.bytes:
            raise CheckpointError(
                f"{self.where}: {len(data)} bytes, the manifest says {self.bytes} (truncated "
                "or replaced)"
            )
        if not crc:
            return data
        crc = f"{zlib.crc32(byte_view(data)):08x}"
        if crc != self.crc32:
            raise CheckpointError(
                f"{self.where}: checksum mismatch (CRC-32 {crc}, the manifest says "
                f"{self.crc32}): the file is corrupt"
            )
        return data

    def check(self) -> bytes:
        """Check size and CRC-32 reading the file in blocks (memory bounded by a block,
        not the file); return its safetensors header bytes (length prefix included) or,
        for a file that is no safetensors file, its first bytes.

        Raises:
            CheckpointError: missing, truncated or changed.
        """
        try:
            size, crc = crc32_file(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.where}: missing (the manifest lists it)") from None
        if size != self.bytes:
            raise CheckpointError(
                f"{self.where}: {size} bytes, the manifest says {self.bytes} (truncated "
                "or replaced)"
            )
        if crc != self.crc32:
            raise CheckpointError(
                f"{self.where}: checksum mismatch (CRC-32 {crc}, the manifest says "
                f"{self.crc32}): the file is corrupt"
            )
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            return head + f.read(min(n, max(size - 8, 0)))


def read_checked(f: CheckedFile, *, crc: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a checked safetensors file (see :meth:`CheckedFile.read`); from the
    bytes :func:`verify_files` kept, when it kept them (handed over once: the caller's
    tensors then hold the memory, which goes when they do)."""
    data, f.kept = f.kept, None
    if data is None:
        data = f.read_buffer(crc=crc)
    try:
        return read_tensor_file(data, f.where)[0]
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def read_json(f: CheckedFile) -> Any:
    """The JSON value of a checked file."""
    try:
        return json.loads(f.read())
    except ValueError as err:
        raise CheckpointError(f"{f.where}: not valid JSON ({err})") from None


def default_keep_bytes() -> int:
    """A quarter of the memory the operating system reports available (``MemAvailable``
    on Linux, free pages elsewhere); 0 when it reports nothing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (OSError, ValueError, AttributeError):
        return 0


class KeptBytes:
    """How many bytes of checked files a load may still keep in memory (thread-safe).

    Args:
        budget: the bytes it may keep at most (0 keeps none).
    """

    def __init__(self, budget: int) -> None:
        self._left = max(int(budget), 0)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if that many are left; whether it did.

        Args:
            nbytes: the size of the file to keep.
        """
        with self._lock:
            if nbytes > self._left:
                return False
            self._left -= nbytes
            return True


def verify_files(
    files: Iterable[tuple[CheckedFile, dict[str, Any] | None]],
    pool: ThreadPoolExecutor,
    keep: KeptBytes | None = None,
) -> None:
    """Check every file in parallel; with an expectation ``{tensor: (dtype, shape or
    None)}`` also check its safetensors header (a shape of ``None`` accepts any, a
    leading ``-1`` any length). Raises the first problem found, naming the file.

    Args:
        files: ``(file, expectation or None)`` pairs.
        pool: the threads that check.
        keep: a budget for keeping the checked bytes of tensor files (those with an
            expectation) in memory, as :attr:`CheckedFile.kept`, so that
            :func:`read_checked` and :func:`read_parts` need not read them again.
    """

    def check(f: CheckedFile, expect: dict[str, Any] | None) -> None:
        if expect is not None and keep is not None and keep.take(f.bytes):
            data = f.read_buffer(crc=True)
            head = byte_view(data)[: min(len(data), 8 + _header_length(data))]
            f.kept = data
        else:
            head = f.check()
        if expect is None:
            return
        try:
            header, _ = read_header(head, f.where, size=f.bytes)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        for name, (dtype, shape) in expect.items():
            info = header.get(name)
            if info is None:
                raise CheckpointError(f"{f.where}: tensor {name!r} is missing")
            if dtype is not None and info["dtype"] != dtype:
                raise CheckpointError(
                    f"{f.where}: tensor {name!r} is {info['dtype']}, the manifest says {dtype}"
                )
            if shape is not None and not shape_fits(info["shape"], shape):
                raise CheckpointError(
                    f"{f.where}: tensor {name!r} has shape {info['shape']}, the manifest "
                    f"says {shape}"
                )

    futures = [pool.submit(check, f, e) for f, e in files]
    for fut in futures:
        fut.result()


def _header_length(data: torch.Tensor) -> int:
    return int.from_bytes(byte_view(data[:8]), "little") if len(data) >= 8 else 0


def shape_fits(shape: list[int], expect: list[int]) -> bool:
    """Whether a tensor's ``shape`` is the expected one (an ``expect`` entry of ``-1``
    accepts any length there).

    Args:
        shape: the shape a file's header records.
        expect: the shape the manifest implies.
    """
    if len(shape) != len(expect):
        return False
    return all(e == -1 or s == e for s, e in zip(shape, expect, strict=True))


def part_expectation(slots: dict[str, Any]) -> dict[str, Any]:
    """What a table's part file must hold, for :func:`verify_files`: int64 ``keys`` and,
    per slot, ``slot/<name>`` rows of the recorded dtype and row shape, one per key.

    Args:
        slots: the table's ``{slot: {"dtype", "shape"}}`` from the manifest.
    """
    expect: dict[str, Any] = {"keys": ("I64", [-1])}
    for slot, info in slots.items():
        expect[f"slot/{slot}"] = (safetensors_name(info.get("dtype")), [-1, *info.get("shape", [])])
    return expect


def read_parts(
    files: list[CheckedFile], pool: ThreadPoolExecutor, ahead: int = 4, *, crc: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of ``files`` in order, read ``ahead`` files in advance on ``pool``
    (without their CRC when ``crc`` is false: files :func:`verify_files` just checked)."""
    futures: list[Future[dict[str, torch.Tensor]]] = []
    nxt = 0
    for i in range(len(files)):
        while nxt < len(files) and nxt <= i + ahead:
            futures.append(pool.submit(read_checked, files[nxt], crc=crc))
            nxt += 1
        yield futures[i].result()
        futures[i] = None  # type: ignore[call-overload]  # release the part's memory
