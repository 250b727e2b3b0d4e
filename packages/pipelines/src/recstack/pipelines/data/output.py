"""The output directory of a conversion: built aside, renamed into place when complete.

Part files ``part-00000.parquet, part-00001.parquet, ...`` are written (each atomically,
by :func:`recstack.columnio.write_parquet`) into a hidden directory ``.<name>.<random>.tmp``
beside the destination, together with any scratch files. Only when every part is written
is the directory renamed to the destination, so a reader never sees half a data set and a
failed or interrupted conversion leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from recstack.columnio import write_parquet
from recstack.pipelines.data.common import ConvertError

__all__ = ["PART_GLOB", "ParquetSettings", "Staging", "split_parts"]

#: The names of the files a conversion writes.
PART_GLOB = "part-*.parquet"

_SCRATCH = "_scratch"


@dataclass(frozen=True)
class ParquetSettings:
    """How part files are written.

    Args:
        row_group_size: rows per Parquet row group.
        compression: the Parquet codec.
        metadata: description stored in each file's schema metadata under ``recstack.data``.
    """

    row_group_size: int
    compression: str
    metadata: Mapping[str, Any]

    def write(self, tables: Iterable[pa.Table], path: Path, schema: pa.Schema) -> int:
        """Write ``tables`` to one Parquet file at ``path``; return the rows written.

        Args:
            tables: tables with exactly ``schema``'s columns and types.
            path: the file to write (atomically).
            schema: the file's schema (also what an empty input writes).
        """
        return write_parquet(
            tables,
            path,
            schema=schema,
            row_group_size=self.row_group_size,
            compression=self.compression,
            metadata={"recstack.data": json.dumps(self.metadata, sort_keys=True)},
        )


def split_parts(tables: Iterable[pa.Table], rows_per_part: int) -> Iterator[Iterator[pa.Table]]:
    """Cut a stream of tables into parts of ``rows_per_part`` rows (the last may be smaller).

    Each part is an iterator that must be consumed before the next part is requested.
    No part is empty, so an empty input gives no parts.

    Args:
        tables: the stream.
        rows_per_part: rows per part.
    """
    source = iter(tables)
    carry: list[pa.Table] = []

    def part(first: pa.Table) -> Iterator[pa.Table]:
        room = rows_per_part
        table: pa.Table | None = first
        while table is not None:
            if table.num_rows >= room:
                yield table.slice(0, room)
                if table.num_rows > room:
                    carry.append(table.slice(room))
                return
            if table.num_rows:
                yield table
                room -= table.num_rows
            table = next(source, None)

    while True:
        first = carry.pop() if carry else next(source, None)
        while first is not None and not first.num_rows:
            first = next(source, None)
        if first is None:
            return
        yield part(first)


def _is_output(directory: Path) -> bool:
    """Whether ``directory`` holds only files a conversion writes (safe to replace)."""
    return all(p.is_file() and p.match(PART_GLOB) for p in directory.iterdir())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """A hidden directory that becomes ``dst`` on :meth:`commit`, or vanishes on error.

    Use it as a context manager: leaving the block with an exception removes it.

    Args:
        dst: the destination directory (local).
        overwrite: replace an existing destination that holds only ``part-*.parquet``
            files. An empty directory is always fine; anything else is refused.

    Raises:
        ConvertError: ``dst`` is a file, or a directory that is not empty (without
            ``overwrite``) or holds other files than a conversion's (with it).
    """

    def __init__(self, dst: str | os.PathLike[str], *, overwrite: bool) -> None:
        self.dst = Path(dst).absolute()
        if self.dst.exists():
            if not self.dst.is_dir():
                raise ConvertError("exists and is not a directory", path=str(self.dst))
            if any(self.dst.iterdir()):
                if not overwrite:
                    raise ConvertError(
                        "is not empty; pass overwrite=True to replace a previous conversion",
                        path=str(self.dst),
                    )
                if not _is_output(self.dst):
                    raise ConvertError(
                        "holds files a conversion does not write; refusing to replace it",
                        path=str(self.dst),
                    )
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.dst.parent / f".{self.dst.name}.{uuid.uuid4().hex[:12]}.tmp"
        self.dir.mkdir()
        self._parts = 0

    @property
    def scratch(self) -> Path:
        """A directory for temporary files, removed before :meth:`commit` renames."""
        path = self.dir / _SCRATCH
        path.mkdir(exist_ok=True)
        return path

    def next_part(self) -> Path:
        """The path of the next part file (``part-00000.parquet``, then ``-00001``...)."""
        path = self.dir / f"part-{self._parts:05d}.parquet"
        self._parts += 1
        return path

    def commit(self) -> list[Path]:
        """Rename the staging directory to ``dst``; return the part files' final paths."""
        shutil.rmtree(self.dir / _SCRATCH, ignore_errors=True)
        names = sorted(p.name for p in self.dir.glob(PART_GLOB))
        old = None
        if self.dst.exists():
            if any(self.dst.iterdir()):
                old = self.dst.parent / f".{self.dst.name}.{uuid.uuid4().hex[:12]}.old"
                os.rename(self.dst, old)
            else:
                self.dst.rmdir()
        os.rename(self.dir, self.dst)
        _fsync_dir(self.dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return [self.dst / name for name in names]

    def abort(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            with contextlib.suppress(OSError):
                self.abort()
