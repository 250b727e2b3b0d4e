"""What every converter shares: its error, its report, bad-line policy and a progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import numpy as np

__all__ = [
    "ConvertError",
    "ConvertReport",
    "NeedLineNumbers",
    "OnError",
    "Problems",
    "Progress",
    "check_int",
]

#: What a converter does with a bad line: stop with :class:`ConvertError`, or skip and count it.
OnError = Literal["raise", "skip"]

#: A row check: a boolean mask of bad rows (or ``None``: all good) and the reason for row ``i``.
Check = tuple[np.ndarray | None, Callable[[int], str]]


class ConvertError(ValueError):
    """A source file that cannot be converted, naming the file and, when known, the line.

    Args:
        message: what is wrong.
        path: the file at fault.
        line: the 1-based line number in ``path`` (``None`` when not about one line).
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        self.reason = message
        where = path or ""
        if line is not None:
            where = f"{where}, line {line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)


class NeedLineNumbers(Exception):
    """Raised inside a reader that does not know line numbers when a row is bad.

    The reader catches it and reads the file again with line numbers (internal).
    """


@dataclass
class ConvertReport:
    """What a conversion did.

    Args:
        dataset: the converter's name (``"criteo"``, ``"movielens"``, ``"taobao"``).
        sources: the files read, in order.
        destination: the output directory.
        files: the Parquet files written, in order.
        rows_in: data lines read (headers and blank lines not counted).
        rows_written: rows in the Parquet files.
        rows_skipped: bad lines skipped with ``on_error="skip"``; ``rows_in ==
            rows_written + rows_skipped``.
        bytes_read: bytes read from the sources (compressed size for compressed files).
        bytes_written: total size of the Parquet files.
        seconds: wall-clock time of the whole conversion.
        skipped_examples: the first skipped lines, as ``"<file>, line <n>: <reason>"``.
    """

    dataset: str
    sources: list[str]
    destination: str
    files: list[str] = field(default_factory=list)
    rows_in: int = 0
    rows_written: int = 0
    rows_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able ``dict``."""
        return asdict(self)

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """A few human-readable lines: rows, files, sizes, time, and skipped examples."""
        lines = [
            f"{self.dataset}: {self.rows_written:,} rows written to {len(self.files)} file(s) "
            f"in {self.destination} ({self.bytes_written / 1e6:,.1f} MB) "
            f"from {self.rows_in:,} rows read ({self.bytes_read / 1e6:,.1f} MB) "
            f"in {self.seconds:,.1f} s",
        ]
        if self.rows_skipped:
            lines.append(f"{self.rows_skipped:,} bad rows skipped, e.g.:")
            lines.extend(f"  {example}" for example in self.skipped_examples)
        return "\n".join(lines)


class Problems:
    """Applies the bad-line policy to a block of rows and counts what it skipped.

    Args:
        on_error: ``"raise"`` raises :class:`ConvertError` for the first bad line;
            ``"skip"`` drops bad lines and counts them.
        max_examples: how many skipped lines to remember for the report.
    """

    def __init__(self, on_error: OnError, max_examples: int = 20) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.max_examples = max_examples
        self.skipped = 0
        self.examples: list[str] = []

    def reject(
        self, path: str, lines: np.ndarray | None, checks: Sequence[Check]
    ) -> np.ndarray | None:
        """Rows to keep (a boolean mask), or ``None`` when every row passed every check.

        Args:
            path: the file the rows come from.
            lines: the 1-based line number of each row; ``None`` when unknown.
            checks: ``(bad_mask, reason)`` pairs; ``reason(i)`` explains why row ``i`` is bad.

        Raises:
            ConvertError: with ``on_error="raise"``, for the bad row with the lowest line
                number (the first failing check's reason).
            NeedLineNumbers: a row is bad and ``lines`` is ``None``.
        """
        failing = [(mask, reason) for mask, reason in checks if mask is not None and mask.any()]
        if not failing:
            return None
        if lines is None:
            raise NeedLineNumbers
        bad = np.logical_or.reduce([mask for mask, _ in failing])
        rows = np.flatnonzero(bad)
        if self.on_error == "raise":
            first = int(rows[0])
            raise ConvertError(_reason(failing, first), path=path, line=int(lines[first]))
        self.skipped += len(rows)
        for i in rows[: max(self.max_examples - len(self.examples), 0)]:
            self.examples.append(f"{path}, line {int(lines[i])}: {_reason(failing, int(i))}")
        return ~bad


def _reason(failing: Sequence[Check], row: int) -> str:
    return next(reason(row) for mask, reason in failing if mask is not None and mask[row])


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` if it is an ``int >= low``, else a ``ValueError`` naming the option.

    Args:
        name: the option's name, for the message.
        value: the value given.
        low: the smallest allowed value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class Progress:
    """One self-overwriting line on stderr: ``label: 1.20 / 3.50 GB  34%  210 MB/s  ~11 s left``.

    Printed at most every 0.2 s, and only to a terminal unless ``enabled`` says otherwise.

    Args:
        label: what is in progress.
        total: the amount expected (0 when unknown).
        unit: ``"bytes"`` or ``"rows"``, for the display.
        enabled: ``None`` shows it when ``stream`` is a terminal.
        stream: where to print (default ``sys.stderr``).
    """

    def __init__(
        self,
        label: str,
        total: int = 0,
        *,
        unit: Literal["bytes", "rows"] = "bytes",
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self._on = bool(isatty and isatty()) if enabled is None else enabled
        self.label = label
        self._total = total
        self._unit = unit
        self.done = 0
        self._start = time.monotonic()
        self._shown = float("-inf")

    def advance(self, amount: int) -> None:
        """Count ``amount`` more done and redraw the line if 0.2 s have passed.

        Args:
            amount: bytes or rows just finished.
        """
        self.done += amount
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

    def _print(self, now: float, end: str) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        text = f"\r{self.label}: {self._amount(self.done)}"
        if self._total:
            text += f" / {self._amount(self._total)}  {100 * self.done / self._total:.0f}%"
        text += (
            f"  {rate / 1e6:.0f} MB/s" if self._unit == "bytes" else f"  {rate / 1e6:.2f}M rows/s"
        )
        if self._total and rate > 0 and end != "\n":
            text += f"  ~{max(self._total - self.done, 0) / rate:.0f} s left"
        self._stream.write(text + " " * 8 + end)
        self._stream.flush()
