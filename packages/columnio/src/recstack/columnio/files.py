"""FileRef: one input file, on whatever filesystem it lives."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

__all__ = ["FORMATS", "FileRef"]

#: The formats ColumnIO reads, by the name ``format=`` takes.
FORMATS = ("parquet", "orc", "ipc")


@dataclass(frozen=True)
class FileRef:
    """A file to read: its filesystem, its path there, and how to name it in messages.

    ``uri`` is what the user would recognize (``s3://bucket/key`` or a local path) and is
    what errors print. ``format`` is one of :data:`FORMATS`.
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str
    format: str
    size: int | None = None
    mtime_ns: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"file {self.uri!r}: unknown format {self.format!r}, pick one of {FORMATS}"
            )

    def open(self) -> pafs.NativeFile:
        """A random-access handle (local files are memory-mapped by pyarrow when asked)."""
        return self.filesystem.open_input_file(self.path)
