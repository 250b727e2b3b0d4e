"""Criteo display-advertising logs (Kaggle DAC ``train.txt``, the 1TB ``day_N`` files) to Parquet.

Each line is tab-separated, without a header: the label (0 or 1), 13 integer features
``I1..I13`` and 26 categorical features ``C1..C26`` written as hexadecimal hashes
(8 digits); any feature may be empty. Kaggle's ``test.txt`` has no label column
(``has_label=False``).

Output columns, in this order:

* ``label``: float32, 0.0 or 1.0 (what ``BCEWithLogitsLoss`` takes, no cast needed).
* ``I1..I13``: int64, null where the field is empty (Criteo's ``I`` values can be
  negative).
* ``C1..C26``: int64 parsed from hex (``"68fd1e64"`` -> 1761418852), null where empty;
  or, with ``categorical="string"``, the strings as they are (null where empty).

Read a null with :class:`recstack.columnio.Column`'s ``default``, e.g.
``Column("I1", default=0)``.

The input is streamed: memory is a few read blocks plus one row group, whatever the file
size, and files may be gzip/bz2/zstd compressed (``.gz``, ``.bz2``, ``.zst``). Rows keep
the input order; several inputs are converted one after another into one set of parts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recstack.core.checks import check_int
from recstack.pipelines.choices import check_choice
from recstack.pipelines.data.common import (
    ConvertError,
    ConvertReport,
    OnError,
    Problems,
)
from recstack.pipelines.data.output import ParquetSettings, Staging, split_parts
from recstack.pipelines.data.text import (
    FieldBlock,
    parse_hex,
    parse_int,
    parse_string,
    read_tables,
    show,
)
from recstack.saver.progress import Progress

__all__ = ["CRITEO_CATEGORICAL", "CRITEO_INTEGER", "convert_criteo", "criteo_schema"]

#: The integer feature columns.
CRITEO_INTEGER = tuple(f"I{i}" for i in range(1, 14))
#: The categorical feature columns.
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))

Categorical = Literal["int64", "string"]


def criteo_schema(categorical: Categorical = "int64", has_label: bool = True) -> pa.Schema:
    """The schema of the converted files.

    Args:
        categorical: ``"int64"`` (hex parsed) or ``"string"`` for ``C1..C26``.
        has_label: whether there is a ``label`` column first.
    """
    fields = [pa.field("label", pa.float32())] if has_label else []
    fields += [pa.field(name, pa.int64()) for name in CRITEO_INTEGER]
    kind = pa.int64() if categorical == "int64" else pa.string()
    fields += [pa.field(name, kind) for name in CRITEO_CATEGORICAL]
    return pa.schema(fields)


def _sources(src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    paths = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
    if not paths:
        raise ValueError("src is empty: give one or more Criteo text files")
    for path in paths:
        if not path.is_file():
            raise ConvertError("is not a file", path=str(path))
    return paths


def _table(
    block: FieldBlock, schema: pa.Schema, categorical: Categorical, problems: Problems
) -> pa.Table:
    """Typed columns of one block, bad rows raised or dropped."""
    columns: list[pa.Array] = []
    checks = []
    fields = iter(block.fields)
    if "label" in schema.names:
        label = next(fields)
        one = pc.equal(label, "1")
        bad = ~(
            one.to_numpy(zero_copy_only=False) | pc.equal(label, "0").to_numpy(zero_copy_only=False)
        )
        columns.append(one.cast(pa.float32()))
        checks.append((bad, lambda i, c=label: f"label {show(c, i)} is not 0 or 1"))
    for name in CRITEO_INTEGER:
        column = next(fields)
        values, bad = parse_int(column, nullable=True)
        columns.append(values)
        checks.append((bad, lambda i, c=column, n=name: f"{n} {show(c, i)} is not an integer"))
    for name in CRITEO_CATEGORICAL:
        column = next(fields)
        if categorical == "string":
            values, bad = parse_string(column, nullable=True)
            what = "is not UTF-8"
        else:
            values, bad = parse_hex(column, nullable=True)
            what = "is not a hex number < 2**63"
        columns.append(values)
        checks.append((bad, lambda i, c=column, n=name, w=what: f"{n} {show(c, i)} {w}"))
    table = pa.Table.from_arrays(columns, schema=schema)
    keep = problems.reject(block.path, block.lines, checks)
    return table if keep is None else table.filter(pa.array(keep))


def convert_criteo(
    src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dst: str | os.PathLike[str],
    *,
    categorical: Categorical = "int64",
    has_label: bool = True,
    rows_per_file: int = 10_000_000,
    row_group_size: int = 262_144,
    compression: str = "zstd",
    on_error: OnError = "raise",
    overwrite: bool = False,
    block_size: int = 8 << 20,
    progress: bool | None = None,
) -> ConvertReport:
    """Convert Criteo TSV files into ``dst/part-00000.parquet, part-00001.parquet, ...``.

    See the module docstring for the columns.

    Args:
        src: one file or a list of files (``train.txt``, ``day_0.gz``, ...), converted in
            the order given.
        dst: the output directory; it appears complete or not at all.
        categorical: ``"int64"`` parses ``C1..C26`` from hex; ``"string"`` keeps the text.
        has_label: ``False`` for files without the label column (Kaggle's ``test.txt``).
        rows_per_file: rows per part file (the last may have fewer).
        row_group_size: rows per Parquet row group; memory holds about one row group.
        compression: the Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
        on_error: ``"raise"`` stops at the first bad line with a :class:`ConvertError`
            naming the file, line and field; ``"skip"`` drops bad lines and counts them in
            the report. Bad: a wrong number of fields, a label other than 0/1, an integer
            or hex field that does not parse. Blank lines are ignored.
        overwrite: replace ``dst`` if it holds a previous conversion.
        block_size: bytes of text read at a time.
        progress: show a progress line on stderr; ``None`` shows it when stderr is a terminal.

    Returns:
        The :class:`ConvertReport`.

    Raises:
        ConvertError: a missing input, a bad line (with ``on_error="raise"``), or a
            ``dst`` that is in the way.
        ValueError: an invalid option.
    """
    started = time.monotonic()
    check_choice(categorical, "convert_criteo: categorical", Categorical)
    check_int(rows_per_file, "convert_criteo: rows_per_file", minimum=1)
    check_int(row_group_size, "convert_criteo: row_group_size", minimum=1)
    check_int(block_size, "convert_criteo: block_size", minimum=1)
    paths = _sources(src)
    problems = Problems(on_error)
    schema = criteo_schema(categorical, has_label)
    settings = ParquetSettings(
        row_group_size,
        compression,
        {"dataset": "criteo", "sources": [p.name for p in paths], "categorical": categorical},
    )
    report = ConvertReport("criteo", [str(p) for p in paths], str(Path(dst).absolute()))
    bar = Progress("criteo", sum(os.path.getsize(p) for p in paths), enabled=progress)

    def tables() -> Iterator[pa.Table]:
        for path in paths:
            bar.label = f"criteo {path.name}"
            yield from read_tables(
                path,
                lambda block: _table(block, schema, categorical, problems),
                separator="\t",
                num_fields=len(schema),
                problems=problems,
                block_size=block_size,
                on_bytes=bar.add,
            )

    with Staging(dst, overwrite=overwrite) as staging:
        for part in split_parts(tables(), rows_per_file):
            report.rows_written += settings.write(part, staging.next_part(), schema)
        if not report.rows_written:  # an empty input still gives a readable, empty file
            settings.write([], staging.next_part(), schema)
        files = staging.commit()
    bar.close()
    report.files = [str(f) for f in files]
    report.bytes_read = bar.done
    report.bytes_written = int(np.sum([f.stat().st_size for f in files]))
    report.rows_skipped = problems.skipped
    report.rows_in = report.rows_written + problems.skipped
    report.skipped_examples = problems.examples
    report.seconds = time.monotonic() - started
    return report
