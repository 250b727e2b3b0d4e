"""The two-pass driver shared by the data sets that get per-user behaviour histories.

Pass 1 streams the source through the data set's parser into ``K`` user buckets
(scratch files inside the staging directory). Pass 2 sorts one bucket at a time, appends
the history columns and writes the bucket as one part file. See
:mod:`recstack.pipelines.data.history` for the history semantics and the memory bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from recstack.core.checks import check_int
from recstack.pipelines.data.common import ConvertReport, OnError, Problems
from recstack.pipelines.data.history import UserBuckets, sort_bucket, with_histories
from recstack.pipelines.data.output import ParquetSettings, Staging
from recstack.pipelines.data.text import FieldBlock, read_tables, text_size
from recstack.saver.progress import Progress

__all__ = [
    "BUCKET_TEXT_BYTES",
    "HistoryLayout",
    "TextFormat",
    "auto_buckets",
    "convert_with_histories",
]

#: Text bytes per user bucket when ``buckets=None``: sorting one takes about 1.5 GB.
BUCKET_TEXT_BYTES = 256 << 20


@dataclass(frozen=True)
class TextFormat:
    """How a data set's text lines become rows.

    Args:
        separator: the field separator (``","``, ``"::"``).
        num_fields: fields per line.
        parse: types one block of fields into a table of the layout's ``base`` schema,
            reporting bad rows to the :class:`~recstack.pipelines.data.common.Problems`.
        header: the header line's fields, or ``None`` for a file without one.
    """

    separator: str
    num_fields: int
    parse: Callable[[FieldBlock, Problems], pa.Table]
    header: Sequence[str] | None = None

    def read(
        self, path: Path, problems: Problems, on_bytes: Callable[[int], None]
    ) -> Iterator[pa.Table]:
        """The tables of ``path`` (see :func:`~recstack.pipelines.data.text.read_tables`).

        Args:
            path: the text file.
            problems: the bad-line policy.
            on_bytes: called with the bytes read, as they are.
        """
        return read_tables(
            path,
            lambda block: self.parse(block, problems),
            separator=self.separator,
            num_fields=self.num_fields,
            problems=problems,
            header=self.header,
            on_bytes=on_bytes,
        )


@dataclass(frozen=True)
class HistoryLayout:
    """Where a data set's users, times and histories are.

    Args:
        base: the schema of the parsed rows (pass 1).
        schema: the schema of the output files.
        user: the user column.
        time: the timestamp column.
        sort_keys: the row order within a user: ``user``, ``time``, then tie-breakers.
        lists: history column -> the column whose earlier values it holds.
        finish: adds the remaining output columns to a chunk (e.g. a join), or ``None``.
    """

    base: pa.Schema
    schema: pa.Schema
    user: str
    time: str
    sort_keys: Sequence[str]
    lists: Mapping[str, str]
    finish: Callable[[pa.Table], pa.Table] | None = None


def auto_buckets(sources: Sequence[Path]) -> int:
    """Buckets so each holds about :data:`BUCKET_TEXT_BYTES` of text (compressed x4).

    Args:
        sources: the text files.
    """
    text = sum(text_size(p)[1] for p in sources)
    return max(1, math.ceil(text / BUCKET_TEXT_BYTES))


def _counted(chunks: Iterator[pa.Table], bar: Progress) -> Iterator[pa.Table]:
    for chunk in chunks:
        bar.add(chunk.num_rows)
        yield chunk


def convert_with_histories(
    dataset: str,
    sources: Sequence[Path],
    text: TextFormat,
    layout: HistoryLayout,
    dst: str | Path,
    *,
    max_history: int,
    buckets: int | None,
    row_group_size: int,
    compression: str,
    on_error: OnError,
    overwrite: bool,
    progress: bool | None,
    metadata: Mapping[str, Any],
) -> ConvertReport:
    """Run both passes and return the report (see the module docstring).

    Args:
        dataset: the converter's name, for the report and the progress line.
        sources: the text files, read in order.
        text: how their lines become rows of ``layout.base``.
        layout: the columns.
        dst: the output directory.
        max_history: values per history list.
        buckets: user buckets; ``None`` picks :func:`auto_buckets`.
        row_group_size: rows per Parquet row group (and per history chunk).
        compression: the Parquet codec.
        on_error: the bad-line policy.
        overwrite: replace a previous conversion at ``dst``.
        progress: show progress lines; ``None`` when stderr is a terminal.
        metadata: what to record in the files' ``recstack.data`` metadata.
    """
    started = time.monotonic()
    who = f"convert_{dataset}"
    check_int(max_history, f"{who}: max_history", minimum=0)
    check_int(row_group_size, f"{who}: row_group_size", minimum=1)
    if buckets is None:
        buckets = auto_buckets(sources)
    check_int(buckets, f"{who}: buckets", minimum=1)
    problems = Problems(on_error)
    settings = ParquetSettings(row_group_size, compression, {"dataset": dataset, **metadata})
    report = ConvertReport(dataset, [str(p) for p in sources], str(Path(dst).absolute()))
    with Staging(dst, overwrite=overwrite) as staging:
        reading = Progress(
            f"{dataset}: reading", sum(text_size(p)[0] for p in sources), enabled=progress
        )
        scratch = UserBuckets(staging.scratch, buckets, layout.base, user=layout.user)
        parsed = 0
        for path in sources:
            for table in text.read(path, problems, reading.add):
                parsed += table.num_rows
                scratch.add(table)
        bucket_files = scratch.close()
        reading.close()
        report.bytes_read = reading.done

        sorting = Progress(f"{dataset}: histories", parsed, enabled=progress, unit="rows")
        written = 0
        for path in bucket_files:
            table = sort_bucket(path, layout.sort_keys)
            path.unlink()  # the disk holds one copy of the data at most
            chunks: Iterator[pa.Table] = with_histories(
                table,
                user=layout.user,
                time=layout.time,
                lists=layout.lists,
                max_history=max_history,
                chunk_rows=row_group_size,
            )
            if layout.finish is not None:
                chunks = map(layout.finish, chunks)
            written += settings.write(_counted(chunks, sorting), staging.next_part(), layout.schema)
        if not bucket_files:  # an empty input still gives a readable, empty file
            settings.write([], staging.next_part(), layout.schema)
        sorting.close()
        files = staging.commit()
    report.rows_written = written
    report.rows_skipped = problems.skipped
    report.rows_in = written + problems.skipped
    report.skipped_examples = problems.examples
    report.files = [str(f) for f in files]
    report.bytes_written = sum(f.stat().st_size for f in files)
    report.seconds = time.monotonic() - started
    return report
