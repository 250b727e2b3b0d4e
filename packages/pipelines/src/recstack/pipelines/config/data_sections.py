"""The ``data`` section: training and evaluation readers, a stream for online learning,
and a synthetic data set generated on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from recstack.columnio import Column, SyntheticCTRConfig
from recstack.pipelines.config.errors import Invalid
from recstack.pipelines.config.fields import (
    NAMES,
    PARSERS,
    Where,
    at_least,
    check_keys,
    child,
    construct,
    describe_value,
    parse_value,
)

__all__ = ["DataConfig", "ReaderConfig", "StreamConfig", "SyntheticData"]

Shuffle = bool | Literal["window", "epoch"]
Format = Literal["parquet", "orc", "ipc"]
_COLUMN_KEYS = ("name", "default", "element_default", "dtype")


def _parse_column(value: object, path: str, where: Where) -> Column:
    """A column: its name, or ``{name, default, element_default, dtype}``."""
    if isinstance(value, str):
        return construct(Column, {"name": value}, path, where)
    data = check_keys(value, _COLUMN_KEYS, ("name",), path, where)
    kwargs: dict[str, Any] = {"name": parse_value(str, data["name"], child(path, "name"), where)}
    for key in ("default", "element_default"):
        if key in data:
            kwargs[key] = data[key]
    if data.get("dtype") is not None:
        dtype = getattr(torch, str(data["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise where.error(
                child(path, "dtype"),
                f"expected a torch dtype name (int32, float32, ...), got "
                f"{describe_value(data['dtype'])}",
            )
        kwargs["dtype"] = dtype
    return construct(Column, kwargs, path, where)


PARSERS[Column] = _parse_column
NAMES[Column] = "column names or {name, default, element_default, dtype} mappings"


def _paths(value: object, path: str, where: Where) -> tuple[str, ...]:
    """One path or a non-empty list of them (files, directories, globs or URIs)."""
    paths = (value,) if isinstance(value, str) else parse_value(tuple[str, ...], value, path, where)
    if not paths or not all(paths):
        raise where.error(path, f"expected a path or a list of paths, got {describe_value(value)}")
    return paths


def _optional_paths(value: object, path: str, where: Where) -> tuple[str, ...] | None:
    return None if value is None else _paths(value, path, where)


def _parse_columns(value: object, path: str, where: Where) -> tuple[Column, ...] | None:
    if value is None:
        return None
    return parse_value(tuple[Column, ...], value, path, where)


@dataclass(frozen=True)
class ReaderConfig:
    """A :class:`~recstack.columnio.ColumnReader` (``data.train``, ``data.eval``, a
    stage's ``train``/``eval``); the keys are its arguments.

    Args:
        paths: files, directories, globs or URIs (one or a list); ``None`` only with
            ``data.synthetic``, which supplies them.
        batch_size: rows per batch.
        columns: the columns to read (names, or ``{name, default, element_default,
            dtype}`` to fill nulls); ``None``: the feature schema's columns and the
            tasks' label and group columns.
        shuffle: ``false``, ``true``/``"window"`` (windowed) or ``"epoch"`` (exact).
        seed: the shuffle seed.
        shuffle_buffer: rows per shuffle window or bucket (``None``: the reader's).
        drop_last: drop each epoch's last, smaller batch.
        format: ``"parquet"``, ``"orc"`` or ``"ipc"`` (``None``: from the extension).
        num_threads: decoding threads.
        prefetch: batches assembled ahead.
        worker: ``"auto"`` (a reader process when batches go to a CUDA device), ``"thread"``
            or ``"process"`` (a reader process, see ColumnReader).
        on_error: ``"raise"`` or ``"skip"`` a bad file.
        pin_memory: page-locked batches (CUDA only).
        keyed_jagged: integer columns packed into one KeyedJaggedTensor.
        keyed_jagged_key: that KeyedJaggedTensor's batch key.
    """

    paths: tuple[str, ...] | None = field(default=None, metadata={"parse": _optional_paths})
    batch_size: int = 4096
    columns: tuple[Column, ...] | None = field(default=None, metadata={"parse": _parse_columns})
    shuffle: Shuffle = False
    seed: int = 0
    shuffle_buffer: int | None = None
    drop_last: bool = False
    format: Format | None = None
    num_threads: int = 2
    prefetch: int = 4
    worker: Literal["auto", "thread", "process"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    pin_memory: bool = False
    keyed_jagged: tuple[str, ...] | None = None
    keyed_jagged_key: str = "sparse"

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size", "shuffle_buffer", "num_threads", "prefetch")
        at_least(self, 0, "seed")


#: Keys ``data.eval`` takes from ``data.train`` when it does not give them.
EVAL_INHERITS = (
    "batch_size",
    "columns",
    "format",
    "num_threads",
    "prefetch",
    "worker",
    "on_error",
    "pin_memory",
    "keyed_jagged",
    "keyed_jagged_key",
)


@dataclass(frozen=True)
class StreamConfig:
    """A :class:`~recstack.columnio.StreamingReader` for online learning
    (``data.stream``); the keys are its arguments.

    Args:
        source: the directory, glob or URI to follow (or a list of them).
        batch_size: rows per batch.
        columns: as for :class:`ReaderConfig`.
        format: as for :class:`ReaderConfig`.
        window_files: end a window after every this many files.
        time_column: end windows by this column instead.
        window_length: a time window's length in the column's units.
        origin: where time windows are anchored.
        poll_interval: seconds between directory listings.
        idle_timeout: stop after this many seconds without a new file (``None``: never).
        settle_seconds: how long a file that cannot be opened yet is retried.
        num_threads: decoding threads.
        pin_memory: page-locked batches (CUDA only).
        keyed_jagged: integer columns packed into one KeyedJaggedTensor.
        keyed_jagged_key: that KeyedJaggedTensor's batch key.
        on_error: ``"raise"`` or ``"skip"`` a bad file.
    """

    source: tuple[str, ...] = field(metadata={"parse": _paths})
    batch_size: int = 4096
    columns: tuple[Column, ...] | None = field(default=None, metadata={"parse": _parse_columns})
    format: Format | None = None
    window_files: int | None = None
    time_column: str | None = None
    window_length: int | float | None = None
    origin: int | float = 0
    poll_interval: float = 1.0
    idle_timeout: float | None = None
    settle_seconds: float = 30.0
    num_threads: int = 2
    pin_memory: bool = False
    keyed_jagged: tuple[str, ...] | None = None
    keyed_jagged_key: str = "sparse"
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size", "window_files", "num_threads")
        if self.window_files is not None and self.time_column is not None:
            raise Invalid("give window_files or time_column, not both", "time_column")
        if (self.time_column is None) != (self.window_length is None):
            raise Invalid("time_column and window_length go together", "window_length")
        if self.window_files is None and self.time_column is None:
            raise Invalid("give window_files (or time_column and window_length)", "window_files")


def _dataset(value: object, path: str, where: Where) -> SyntheticCTRConfig:
    return parse_value(SyntheticCTRConfig, value, path, where)


@dataclass(frozen=True)
class SyntheticData:
    """A synthetic click data set (:func:`recstack.columnio.write_synthetic_ctr`)
    written to ``dir`` on first use and reused while its settings are unchanged
    (``data.synthetic``). Its last ``eval_files`` files are the evaluation data, the
    others the training data (they fill in ``data.train.paths``/``data.eval.paths``).

    Args:
        dir: the directory of the ``part-*.parquet`` files.
        dataset: the generator's settings (:class:`~recstack.columnio.SyntheticCTRConfig`
            fields; ``num_rows`` is required).
        rows_per_file: rows per file.
        eval_files: how many of the last files are evaluation data (0: none).
    """

    dir: str
    dataset: SyntheticCTRConfig = field(metadata={"parse": _dataset})
    rows_per_file: int = 65_536
    eval_files: int = 1

    def __post_init__(self) -> None:
        at_least(self, 1, "rows_per_file")
        at_least(self, 0, "eval_files")
        files = -(-self.dataset.num_rows // self.rows_per_file)
        if self.eval_files and files <= self.eval_files:
            raise Invalid(
                f"{self.dataset.num_rows} rows in files of {self.rows_per_file} make "
                f"{files} file(s): too few to keep {self.eval_files} for evaluation and "
                "train on the rest",
                "eval_files",
            )


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from (the ``data`` section).

    Args:
        train: the training reader (not with ``stream``).
        eval: the evaluation reader; keys it leaves out come from ``train`` (see
            :data:`EVAL_INHERITS`).
        stream: a stream for online learning (``recstack train`` then runs
            ``fit_online``).
        synthetic: generate a synthetic data set on first use.
    """

    train: ReaderConfig | None = None
    eval: ReaderConfig | None = None
    stream: StreamConfig | None = None
    synthetic: SyntheticData | None = None

    def __post_init__(self) -> None:
        if self.stream is not None and self.train is not None:
            raise Invalid("give data.train or data.stream (online learning), not both", "stream")
        if self.synthetic is None:
            for name, reader in (("train", self.train), ("eval", self.eval)):
                if reader is not None and reader.paths is None:
                    raise Invalid(
                        "required key is missing (or give data.synthetic, which supplies it)",
                        f"{name}.paths",
                    )
        elif self.synthetic.eval_files == 0 and self.eval is not None and self.eval.paths is None:
            raise Invalid("required key is missing: data.synthetic has eval_files: 0", "eval.paths")
