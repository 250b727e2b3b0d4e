"""Readers from the ``data`` section, and the synthetic data set written on first use."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from recstack.columnio import (
    Column,
    ColumnReader,
    StreamingReader,
    write_synthetic_ctr,
)
from recstack.pipelines.config.data_sections import ReaderConfig, StreamConfig, SyntheticData
from recstack.pipelines.config.schema import RunConfig

__all__ = [
    "SYNTHETIC_MARKER",
    "build_reader",
    "build_stream",
    "default_columns",
    "ensure_synthetic",
]

#: The file in ``data.synthetic.dir`` recording what was generated there.
SYNTHETIC_MARKER = "synthetic.json"


def _settings(s: SyntheticData) -> dict[str, Any]:
    dataset = dataclasses.asdict(s.dataset)
    # Through JSON, so a tuple compares equal to the list a marker file holds.
    return json.loads(json.dumps({"dataset": dataset, "rows_per_file": s.rows_per_file}))


def ensure_synthetic(s: SyntheticData) -> tuple[list[str], list[str]]:
    """Write the synthetic data set unless ``s.dir`` holds it already (same settings);
    return its training files and its evaluation files (the last ``eval_files``).

    Args:
        s: the ``data.synthetic`` section.
    """
    root = Path(s.dir)
    marker = root / SYNTHETIC_MARKER
    settings = _settings(s)
    files: list[str] | None = None
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        names = saved.get("files")
        if saved.get("settings") == settings and isinstance(names, list):
            paths = [str(root / n) for n in names]
            if all(Path(p).is_file() for p in paths):
                files = paths
    if files is None:
        info = write_synthetic_ctr(
            root, s.dataset, rows_per_file=s.rows_per_file, overwrite=True, compute_best_auc=False
        )
        files = [str(p) for p in info.paths]
        record = {"settings": settings, "files": [Path(p).name for p in files]}
        tmp = root / f".{SYNTHETIC_MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, marker)  # last: a marker names only files written whole
    cut = len(files) - s.eval_files
    return files[:cut], files[cut:]


def default_columns(config: RunConfig) -> list[str] | None:
    """The columns a reader reads when its section names none: the feature schema's
    columns and the tasks' label and group columns (``None`` without a feature schema:
    every column).

    Args:
        config: the run.
    """
    if config.features is None:
        return None
    columns = sorted(config.features.schema)
    for task in config.task_list:
        for name in (task.label, task.group):
            if name is not None and name not in columns:
                columns.append(name)
    return columns


def _columns(given: tuple[Column, ...] | None, default: list[str] | None) -> list[Any] | None:
    return list(given) if given is not None else default


def build_reader(
    reader: ReaderConfig,
    *,
    paths: list[str] | None = None,
    columns: list[str] | None = None,
    train: bool = True,
) -> ColumnReader:
    """A :class:`~recstack.columnio.ColumnReader` from a reader section.

    Args:
        reader: the section.
        paths: the files when the section gives none (``data.synthetic``'s).
        columns: the columns when the section names none.
        train: a training reader; an evaluation reader never shuffles nor drops rows.
    """
    files = list(reader.paths) if reader.paths is not None else paths
    if not files:
        raise ValueError("a reader needs paths")
    return ColumnReader(
        files,
        _columns(reader.columns, columns),
        reader.batch_size,
        format=reader.format,
        shuffle=reader.shuffle if train else False,
        seed=reader.seed,
        shuffle_buffer=reader.shuffle_buffer,
        drop_last=reader.drop_last if train else False,
        num_threads=reader.num_threads,
        prefetch=reader.prefetch,
        pin_memory=reader.pin_memory,
        keyed_jagged=list(reader.keyed_jagged) if reader.keyed_jagged else None,
        keyed_jagged_key=reader.keyed_jagged_key,
        on_error=reader.on_error,
        worker=reader.worker,
    )


def build_stream(stream: StreamConfig, *, columns: list[str] | None = None) -> StreamingReader:
    """A :class:`~recstack.columnio.StreamingReader` from ``data.stream``.

    Args:
        stream: the section.
        columns: the columns when the section names none.
    """
    return StreamingReader(
        list(stream.source),
        _columns(stream.columns, columns),
        stream.batch_size,
        format=stream.format,
        window_files=stream.window_files,
        time_column=stream.time_column,
        window_length=stream.window_length,
        origin=stream.origin,
        poll_interval=stream.poll_interval,
        idle_timeout=stream.idle_timeout,
        settle_seconds=stream.settle_seconds,
        num_threads=stream.num_threads,
        pin_memory=stream.pin_memory,
        keyed_jagged=list(stream.keyed_jagged) if stream.keyed_jagged else None,
        keyed_jagged_key=stream.keyed_jagged_key,
        on_error=stream.on_error,
    )
