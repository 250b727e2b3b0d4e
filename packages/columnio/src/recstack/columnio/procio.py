"""Length-prefixed JSON messages over pipes between the trainer and a reader process.

JSON, not pickle: the only thing that crosses is plain data, so a message can never run
code in the process that reads it.
"""

from __future__ import annotations

import json
import os
import select
import struct
import threading
from typing import Any

__all__ = ["MessageReader", "MessageWriter", "WorkerGone"]

_HEADER = struct.Struct("<Q")


class WorkerGone(RuntimeError):
    """The other end of the pipe closed (the process exited or crashed)."""


class MessageWriter:
    """Writes whole messages; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        frame = _HEADER.pack(len(data)) + data
        with self._lock:
            view = memoryview(frame)
            while view:
                try:
                    n = os.write(self._fd, view)
                except BrokenPipeError as e:
                    raise WorkerGone("the other process closed the pipe") from e
                view = view[n:]


class MessageReader:
    """Reads whole messages, blocking or polling, from one pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def _message(self) -> dict[str, Any] | None:
        if len(self._buf) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(self._buf)
        end = _HEADER.size + n
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return json.loads(data)

    def _fill(self) -> None:
        chunk = os.read(self._fd, 1 << 20)
        if not chunk:
            raise WorkerGone("the other process exited")
        self._buf += chunk

    def recv(self) -> dict[str, Any]:
        """The next message, waiting for it."""
        while True:
            msg = self._message()
            if msg is not None:
                return msg
            self._fill()

    def poll(self) -> dict[str, Any] | None:
        """The next message if one has fully arrived, else ``None`` (never waits)."""
        while True:
            msg = self._message()
            if msg is not None:
                return msg
            ready, _, _ = select.select([self._fd], [], [], 0)
            if not ready:
                return None
            self._fill()
