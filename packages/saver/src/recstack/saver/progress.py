"""A one-line progress display for long saves, loads, exports and conversions: the amount
done (bytes or rows), the share of the total, the rate and the time left."""

from __future__ import annotations

import sys
import threading
import time
from typing import Literal, TextIO

__all__ = ["Progress", "ProgressUnit"]

#: What a :class:`Progress` counts.
ProgressUnit = Literal["bytes", "rows"]


class Progress:
    """Prints ``label: 1.20 GB / 7.70 GB  16%  2.10 GB/s  ~3 s left`` on one line of
    ``stream``, redrawn at most every 0.2 s.

    Args:
        label: what is in progress (may be changed while it runs).
        total: the amount expected (0 when unknown).
        enabled: ``None`` shows it when ``stream`` is a terminal.
        stream: where to print (default ``sys.stderr``).
        unit: ``"bytes"`` or ``"rows"``, for the display.

    Attributes:
        label: what is in progress.
    """

    def __init__(
        self,
        label: str,
        total: int = 0,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        *,
        unit: ProgressUnit = "bytes",
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self._on = bool(isatty and isatty()) if enabled is None else enabled
        self.label = label
        self._total = total
        self._unit = unit
        self._done = 0
        self._start = time.monotonic()
        self._shown = float("-inf")
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        """The amount counted so far."""
        return self._done

    def add(self, amount: int) -> None:
        """Count ``amount`` more done and redraw the line if 0.2 s have passed
        (thread-safe).

        Args:
            amount: bytes or rows just finished.
        """
        with self._lock:
            self._done += amount
            now = time.monotonic()
            if self._on and now - self._shown >= 0.2:
                self._shown = now
                self._print(now, end="")

    def close(self) -> None:
        """Print the final line (and a newline)."""
        if self._on:
            self._print(time.monotonic(), end="\n")

    def _amount(self, n: float) -> str:
        return f"{n / 1e9:.2f} GB" if self._unit == "bytes" else f"{n / 1e6:.2f}M rows"

    def _rate(self, per_second: float) -> str:
        if self._unit == "bytes":
            return f"{per_second / 1e9:.2f} GB/s"
        return f"{per_second / 1e6:.2f}M rows/s"

    def _print(self, now: float, end: str) -> None:
        rate = self._done / max(now - self._start, 1e-9)
        text = f"\r{self.label}: {self._amount(self._done)}"
        if self._total:
            text += f" / {self._amount(self._total)}  {100 * self._done / self._total:.0f}%"
        text += f"  {self._rate(rate)}"
        if self._total and rate > 0 and end != "\n":
            text += f"  ~{max(self._total - self._done, 0) / rate:.0f} s left"
        self._stream.write(text + " " * 8 + end)
        self._stream.flush()
