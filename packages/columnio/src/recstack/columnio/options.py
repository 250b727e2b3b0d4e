"""ReadOptions: the options every ColumnIO reader shares, checked in one place.

:class:`~recstack.columnio.ColumnReader` and :class:`~recstack.columnio.StreamingReader`
both take ``options=ReadOptions(...)`` or the same fields as keyword arguments (a keyword
that is not ``None`` replaces the field of ``options``), so one object can configure the
training reader and the online stream alike, and a bad value fails the same way in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import pyarrow.fs as pafs
import torch

from recstack.columnio.columns import Column, normalize_columns
from recstack.columnio.files import FORMATS
from recstack.core.checks import check_int
from recstack.core.distributed import dist_env

__all__ = ["OnError", "ReadOptions", "ReadOptionsArgs", "ReadOptionsFields", "resolve_options"]

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class ReadOptions:
    """What to read and how, for any ColumnIO reader.

    Every field is checked when the options are made; an error names the field
    (``ReadOptions.batch_size must be an int >= 1, got 0``).

    Attributes:
        columns: names or :class:`~recstack.columnio.Column` objects (a single name or
            Column counts as a list of one); ``None`` reads every column of the first
            file. Kept as a tuple of Column objects.
        batch_size: rows per batch.
        format: ``"parquet"``, ``"orc"`` or ``"ipc"`` (any case); ``None`` infers it from
            each file's extension (Parquet when unknown).
        filesystem: a ``pyarrow.fs.FileSystem`` the paths live on (instead of URIs).
        rank: this reader's share of the data; ``None`` takes torchrun's ``RANK``.
        world_size: how many readers share the data; ``None`` takes ``WORLD_SIZE``.
        num_threads: decoding threads.
        pin_memory: build each batch as one page-locked block (needs CUDA).
        keyed_jagged: integer columns (scalars or lists) to pack into one
            :class:`~recstack.core.KeyedJaggedTensor`, keyed by column name; a single
            name counts as a list of one, an empty list as ``None``.
        keyed_jagged_key: the batch key of that KeyedJaggedTensor.
        on_error: ``"raise"`` stops at the first bad file; ``"skip"`` skips it, counts
            its rows in the reader's ``stats`` and logs a warning.

    Examples:
        >>> options = ReadOptions(columns=["user", "label"], batch_size=1024)
        >>> options.batch_size, [c.name for c in options.columns]
        (1024, ['user', 'label'])
    """

    columns: Sequence[str | Column] | None = None
    batch_size: int = 4096
    format: str | None = None
    filesystem: pafs.FileSystem | None = None
    rank: int | None = None
    world_size: int | None = None
    num_threads: int = 2
    pin_memory: bool = False
    keyed_jagged: Sequence[str] | None = None
    keyed_jagged_key: str = "sparse"
    on_error: OnError = "raise"

    def __post_init__(self) -> None:
        normalized = normalize_columns(self.columns)
        self._set("columns", None if normalized is None else tuple(normalized))
        self._set("batch_size", check_int(self.batch_size, _name("batch_size"), minimum=1))
        if self.format is not None:
            if not isinstance(self.format, str) or self.format.lower() not in FORMATS:
                raise ValueError(f"{_name('format')} must be one of {FORMATS}, got {self.format!r}")
            self._set("format", self.format.lower())
        if self.filesystem is not None and not isinstance(self.filesystem, pafs.FileSystem):
            raise TypeError(
                f"{_name('filesystem')} must be a pyarrow.fs.FileSystem, "
                f"got {type(self.filesystem).__name__}"
            )
        if self.world_size is not None:
            self._set("world_size", check_int(self.world_size, _name("world_size"), minimum=1))
        if self.rank is not None:
            self._set("rank", check_int(self.rank, _name("rank"), minimum=0))
        if self.rank is not None and self.world_size is not None:
            _check_shard(self.rank, self.world_size)
        self._set("num_threads", check_int(self.num_threads, _name("num_threads"), minimum=1))
        if not isinstance(self.pin_memory, bool):
            raise TypeError(f"{_name('pin_memory')} must be a bool, got {self.pin_memory!r}")
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA; this machine has none")
        self._set("keyed_jagged", _keyed_names(self.keyed_jagged))
        if not isinstance(self.keyed_jagged_key, str) or not self.keyed_jagged_key:
            raise ValueError(
                f"{_name('keyed_jagged_key')} must be a non-empty string, "
                f"got {self.keyed_jagged_key!r}"
            )
        if self.on_error not in ("raise", "skip"):
            raise ValueError(
                f"{_name('on_error')} must be 'raise' or 'skip', got {self.on_error!r}"
            )

    def _set(self, name: str, value: Any) -> None:
        # Frozen: normalized values are stored once, here, while the options are made.
        object.__setattr__(self, name, value)

    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)``, taking torchrun's environment where a field is ``None``.

        Raises:
            ValueError: the rank is out of range for the world size.
        """
        env = dist_env()
        world_size = env.world_size if self.world_size is None else self.world_size
        rank = env.rank if self.rank is None else self.rank
        _check_shard(rank, world_size)
        return rank, world_size

    def sharded(self) -> ReadOptions:
        """These options with ``rank`` and ``world_size`` filled in (see :meth:`shard`)."""
        rank, world_size = self.shard()
        return dataclasses.replace(self, rank=rank, world_size=world_size)


class ReadOptionsArgs(TypedDict, total=False):
    """The fields of :class:`ReadOptions` that readers take as keyword arguments.

    ``columns`` and ``batch_size`` are left out: the readers take them by position too.
    """

    format: str | None
    filesystem: pafs.FileSystem | None
    rank: int | None
    world_size: int | None
    num_threads: int | None
    pin_memory: bool | None
    keyed_jagged: Sequence[str] | None
    keyed_jagged_key: str | None
    on_error: OnError | None


class ReadOptionsFields:
    """The shared options of a reader that keeps them as ``self.options``, as attributes."""

    options: ReadOptions

    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self.options.batch_size

    @property
    def format(self) -> str | None:
        """The format given for every file, or ``None`` (inferred per file)."""
        return self.options.format

    @property
    def filesystem(self) -> pafs.FileSystem | None:
        """The filesystem given for the paths, if any."""
        return self.options.filesystem

    @property
    def rank(self) -> int:
        """This reader's rank."""
        return self.options.shard()[0]

    @property
    def world_size(self) -> int:
        """How many readers share the data."""
        return self.options.shard()[1]

    @property
    def num_threads(self) -> int:
        """Decoding threads."""
        return self.options.num_threads

    @property
    def pin_memory(self) -> bool:
        """Whether batches are built in page-locked memory."""
        return self.options.pin_memory

    @property
    def on_error(self) -> OnError:
        """``"raise"`` or ``"skip"`` for a bad file."""
        return self.options.on_error


_FIELDS = frozenset(f.name for f in dataclasses.fields(ReadOptions))


def resolve_options(owner: str, options: ReadOptions | None, **given: Any) -> ReadOptions:
    """``options`` (default ``ReadOptions()``) with each ``given`` value that is not ``None``.

    Args:
        owner: the reader's name, for errors.
        options: the options passed as ``options=``, or ``None``.
        **given: the reader's keyword arguments that are ReadOptions fields.

    Raises:
        TypeError: ``options`` is not a ReadOptions, or a keyword is not one of its fields.
    """
    if options is not None and not isinstance(options, ReadOptions):
        raise TypeError(f"{owner}: options must be a ReadOptions, got {type(options).__name__}")
    unknown = sorted(set(given) - _FIELDS)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    changes = {name: value for name, value in given.items() if value is not None}
    if options is None:
        return ReadOptions(**changes)
    return dataclasses.replace(options, **changes) if changes else options


def _name(field: str) -> str:
    return f"ReadOptions.{field}"


def _check_shard(rank: int, world_size: int) -> None:
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")


def _keyed_names(keyed: Sequence[str] | None) -> tuple[str, ...] | None:
    if not keyed:
        return None
    names = (keyed,) if isinstance(keyed, str) else tuple(keyed)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{_name('keyed_jagged')} must hold column names, got {name!r}")
    return names
