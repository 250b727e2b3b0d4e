"""What every converter shares: its error, its report and its bad-line policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from recstack.pipelines.choices import check_choice

__all__ = [
    "ConvertError",
    "ConvertReport",
    "NeedLineNumbers",
    "OnError",
    "Problems",
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
        check_choice(on_error, "on_error", OnError)
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
