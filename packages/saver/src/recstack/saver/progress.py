"""A one-line progress display for long saves and loads (bytes done, rate, time left)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Prints ``label: 1.2 / 7.7 GB  2.1 GB/s  ~3 s left`` on one line, at most every 0.2 s.

    Args:
        label: what is in progress.
        total: bytes expected (0 if unknown).
        enabled: ``None`` shows it when the stream is a terminal.
        stream: where to print (default stderr).
    """

    def __init__(
        self, label: str, total: int = 0, enabled: bool | None = None, stream: TextIO | None = None
    ) -> None:
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty() if enabled is None else enabled
        self._label = label
        self._total = total
        self._done = 0
        self._start = time.monotonic()
        self._shown = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more done (thread-safe)."""
        with self._lock:
            self._done += nbytes
            now = time.monotonic()
            if self._on and now - self._shown >= 0.2:
                self._shown = now
                self._print(now, end="")

    def close(self) -> None:
        """Print the final line."""
        if self._on:
            self._print(time.monotonic(), end="\n")

    def _print(self, now: float, end: str) -> None:
        dt = max(now - self._start, 1e-9)
        rate = self._done / dt
        text = f"\r{self._label}: {self._done / 1e9:.2f}"
        if self._total:
            text += f" / {self._total / 1e9:.2f}"
        text += f" GB  {rate / 1e9:.2f} GB/s"
        if self._total and rate > 0 and end != "\n":
            text += f"  ~{max(self._total - self._done, 0) / rate:.0f} s left"
        self._stream.write(text + " " * 8 + end)
        self._stream.flush()
