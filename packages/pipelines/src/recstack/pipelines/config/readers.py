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
from recstack.pipelines.config.fields import section_arguments
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
    columns and the tasks' label and group columns (a loss task, which the model computes,
    has neither; ``None`` without a feature schema: every column).

    Args:
        config: the run.
    """
    if config.features is None:
        return None
    columns = sorted(config.features.schema)
    for task in config.task_list:
        if task.is_loss:
            continue
        for name in (task.label, task.group):
            if name is not None and name not in columns:
                columns.append(name)
    return columns


def _reader_columns(
    given: tuple[Column, ...] | None, default: list[str] | None
) -> list[Any] | None:
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
    own = ("paths", "columns", "batch_size", "shuffle", "drop_last", "keyed_jagged")
    return ColumnReader(
        files,
        _reader_columns(reader.columns, columns),
        reader.batch_size,
        shuffle=reader.shuffle if train else False,
        drop_last=reader.drop_last if train else False,
        keyed_jagged=list(reader.keyed_jagged) if reader.keyed_jagged else None,
        **section_arguments(reader, exclude=own),
    )


def build_stream(stream: StreamConfig, *, columns: list[str] | None = None) -> StreamingReader:
    """A :class:`~recstack.columnio.StreamingReader` from ``data.stream``.

    Args:
        stream: the section.
        columns: the columns when the section names none.
    """
    own = ("source", "columns", "batch_size", "keyed_jagged")
    return StreamingReader(
        list(stream.source),
        _reader_columns(stream.columns, columns),
        stream.batch_size,
        keyed_jagged=list(stream.keyed_jagged) if stream.keyed_jagged else None,
        **section_arguments(stream, exclude=own),
    )
