"""recstack.columnio.batching: the schema check across files and the per-unit counters."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack.columnio.batching import FileSchema, count_unit
from recstack.columnio.columns import Column
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.columnio.files import FileRef
from recstack.columnio.formats import inspect_file
from recstack.columnio.paths import resolve_files


def _file(tmp_path: Path, name: str, table: pa.Table) -> FileRef:
    pq.write_table(table, tmp_path / name)
    return resolve_files(str(tmp_path / name))[0]


def test_file_schema_takes_the_first_file_and_checks_the_rest(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.parquet", pa.table({"x": pa.array([1], pa.int64()), "y": [1.0]}))
    b = _file(tmp_path, "b.parquet", pa.table({"x": pa.array([2], pa.int64())}))
    c = _file(tmp_path, "c.parquet", pa.table({"x": pa.array([3], pa.int32())}))
    schema = FileSchema([Column("x")])
    assert schema.resolved is None
    resolved = schema.check(a, inspect_file(a))
    assert [rc.name for rc in resolved] == ["x"] and schema.origin == a.uri
    assert schema.check(b, inspect_file(b)) is resolved
    with pytest.raises(ColumnIOError, match="the type changed between files") as info:
        schema.check(c, inspect_file(c))
    assert info.value.file == c.uri and info.value.column == "x"
    with pytest.raises(ColumnIOError, match="no such column"):
        FileSchema([Column("y")]).check(b, inspect_file(b))


def test_count_unit_counts_rows_and_nulls_or_the_skip() -> None:
    stats, local = ReadStats(), ReadStats()
    local.add_nulls("x", 2)
    assert count_unit(stats, "raise", ("f", 0), 10, (local, None))
    assert count_unit(stats, "raise", ("f", 1), 5, (local, None), count_nulls=False)
    assert stats.rows_read == 15 and stats.nulls_filled == {"x": 2}
    error = ColumnIOError("corrupt", file="f")
    with pytest.raises(ColumnIOError, match="corrupt"):
        count_unit(stats, "raise", ("f", 2), 5, (None, error))
    assert not count_unit(stats, "skip", ("f", 2), 5, (None, error), skipped_rows=3)
    assert stats.rows_skipped == 3 and stats.skipped_files[-1]["unit"] == 2
    assert stats.rows_read == 15
