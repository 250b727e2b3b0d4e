"""Errors and counters shared by every ColumnIO reader.

Every failure names the file (and the column, when one is at fault) so that a bad file in
a directory of thousands can be found without a debugger.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ColumnIOError", "ReadStats", "ShuffleWarning", "logger"]

logger = logging.getLogger("recstack.columnio")


class ColumnIOError(ValueError):
    """A file or column that cannot be read as asked.

    ``file`` is the file's URI or local path, ``column`` the column at fault (or ``None``
    when the whole file is bad). ``str(err)`` names both.
    """

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None):
        self.file = file
        self.column = column
        self.reason = message
        where = []
        if file is not None:
            where.append(f"file {file!r}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ShuffleWarning(UserWarning):
    """A shuffle setting that silently costs something: quality or time.

    Raised (as a warning) when ``shuffle=True`` permutes windows smaller than the rank's
    epoch (a partial shuffle), and when ``shuffle="epoch"`` with the default
    ``shuffle_buffer`` would decode the data many times per epoch. Choosing explicitly
    (``shuffle="window"``, or passing ``shuffle_buffer``) silences it, as does
    ``warnings.filterwarnings("ignore", category=ShuffleWarning)``.
    """


@dataclass
class ReadStats:
    """What a reader did: rows yielded and every row it did not yield, with the reason.

    ``rows_skipped`` counts rows of files (or row groups) skipped with ``on_error="skip"``;
    ``skipped_files`` lists them with the error. ``rows_dropped_last`` counts rows left out
    by ``drop_last``. ``nulls_filled`` counts, per column, every null that was filled: null
    rows replaced by the column's ``default`` plus null list items replaced by its
    ``element_default``.
    ``late_rows`` counts rows a streaming reader yielded in a later time window than their
    own, because their window had already ended.
    """

    rows_read: int = 0
    rows_yielded: int = 0
    batches_yielded: int = 0
    rows_skipped: int = 0
    rows_dropped_last: int = 0
    late_rows: int = 0
    files_skipped: int = 0
    skipped_files: list[dict[str, Any]] = field(default_factory=list)
    nulls_filled: dict[str, int] = field(default_factory=dict)

    def add_nulls(self, column: str, count: int) -> None:
        if count:
            self.nulls_filled[column] = self.nulls_filled.get(column, 0) + int(count)

    def record_skip(
        self, file: str, rows: int, error: BaseException, unit: int | None = None
    ) -> None:
        self.rows_skipped += int(rows)
        entry: dict[str, Any] = {"file": file, "rows": int(rows), "error": str(error)}
        if unit is not None:
            entry["unit"] = int(unit)
        else:
            self.files_skipped += 1
        self.skipped_files.append(entry)
        where = f"{file} (unit {unit})" if unit is not None else file
        logger.warning("columnio: skipped %s, %d rows: %s", where, rows, error)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadStats:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
