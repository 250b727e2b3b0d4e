"""StreamingReader: files read as they land, windows closed with markers, exact resume."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack.columnio.columns import Column
from recstack.columnio.errors import ColumnIOError
from recstack.columnio.streaming import EndOfWindow, StreamingReader


def _land(directory: Path, name: str, ids: list[int], ts: list[int] | None = None) -> Path:
    """Write aside, then rename into place (how producers must publish files)."""
    cols = {"id": pa.array(ids, pa.int64()), "hist": pa.array([[i] * (i % 3) for i in ids])}
    if ts is not None:
        cols["ts"] = pa.array(ts, pa.int64())
    tmp = directory / f".{name}.tmp"
    pq.write_table(pa.table(cols), tmp, row_group_size=7)
    final = directory / name
    tmp.rename(final)
    return final


def _drain(reader: StreamingReader) -> list:
    out = []
    for item in reader:
        out.append(item if isinstance(item, EndOfWindow) else item["id"].tolist())
    return out


def _rows(items: list) -> list[int]:
    return [i for it in items if not isinstance(it, EndOfWindow) for i in it]


def test_file_windows_and_markers(tmp_path: Path) -> None:
    for k in range(5):
        _land(tmp_path, f"f{k}.parquet", list(range(10 * k, 10 * k + 10)))
    r = StreamingReader(
        str(tmp_path), ["id"], batch_size=8, window_files=2, idle_timeout=0.0, poll_interval=0.01
    )
    items = _drain(r)
    assert _rows(items) == list(range(50))
    markers = [m for m in items if isinstance(m, EndOfWindow)]
    assert [m.window for m in markers] == [0, 1]
    assert [m.rows for m in markers] == [20, 20]
    assert [Path(f).name for f in markers[0].files] == ["f0.parquet", "f1.parquet"]
    # A window's last batch is cut short so no batch spans two windows.
    assert [len(x) for x in items[:4] if not isinstance(x, EndOfWindow)] == [8, 8, 4]
    assert r.stats.rows_yielded == 50


def test_follows_new_files_as_they_land(tmp_path: Path) -> None:
    _land(tmp_path, "a.parquet", [1, 2, 3])

    def producer() -> None:
        time.sleep(0.3)
        _land(tmp_path, "b.parquet", [4, 5])
        (tmp_path / "_SUCCESS").write_text("")  # bookkeeping files are never read
        time.sleep(0.3)
        _land(tmp_path, "c.parquet", [6])

    t = threading.Thread(target=producer)
    t.start()
    r = StreamingReader(str(tmp_path), ["id"], batch_size=2, idle_timeout=1.5, poll_interval=0.05)
    items = _drain(r)
    t.join()
    assert _rows(items) == [1, 2, 3, 4, 5, 6]


def test_time_windows_with_late_rows(tmp_path: Path) -> None:
    _land(tmp_path, "p0.parquet", [0, 1, 2, 3], ts=[5, 12, 3, 15])  # unsorted inside
    _land(tmp_path, "p1.parquet", [4, 5, 6], ts=[21, 8, 35])  # 8 is late
    r = StreamingReader(
        str(tmp_path),
        ["id"],
        batch_size=100,
        time_column="ts",
        window_length=10,
        idle_timeout=0.0,
        poll_interval=0.01,
    )
    items = _drain(r)
    assert items[0] == [0, 2]
    assert isinstance(items[1], EndOfWindow) and (
        items[1].window,
        items[1].start,
        items[1].end,
    ) == (0, 0, 10)
    assert items[2] == [1, 3, 5]  # ts=8 arrives after window 0 ended: it joins window 1
    assert isinstance(items[3], EndOfWindow) and (items[3].window, items[3].rows) == (1, 3)
    assert items[4] == [4] and items[5].window == 2 and items[6] == [6]
    assert len(items) == 7  # the last window is still open: no marker
    assert r.stats.late_rows == 1
    assert "ts" in next(
        iter(
            StreamingReader(
                str(tmp_path), ["id"], time_column="ts", window_length=10, idle_timeout=0
            )
        )
    )


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 7])
def test_resume_is_exact(tmp_path: Path, stop_after: int) -> None:
    for k in range(4):
        _land(tmp_path, f"f{k}.parquet", list(range(9 * k, 9 * k + 9)))
    kw = dict(batch_size=4, window_files=3, idle_timeout=0.0, poll_interval=0.01)
    full = _drain(StreamingReader(str(tmp_path), ["id"], **kw))
    first = StreamingReader(str(tmp_path), ["id"], **kw)
    it = iter(first)
    head = []
    for _ in range(stop_after):
        item = next(it)
        head.append(item if isinstance(item, EndOfWindow) else item["id"].tolist())
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    second = StreamingReader(str(tmp_path), ["id"], **kw)
    second.load_state_dict(state)
    tail = _drain(second)
    assert _rows(head) + _rows(tail) == _rows(full)
    markers = [m.window for m in head + tail if isinstance(m, EndOfWindow)]
    assert markers == [m.window for m in full if isinstance(m, EndOfWindow)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_file(tmp_path: Path, world: int) -> None:
    for k in range(3):
        _land(tmp_path, f"f{k}.parquet", list(range(11 * k, 11 * k + 11)))
    seen = []
    for rank in range(world):
        r = StreamingReader(
            str(tmp_path),
            ["id"],
            batch_size=5,
            window_files=3,
            rank=rank,
            world_size=world,
            idle_timeout=0.0,
            poll_interval=0.01,
        )
        items = _drain(r)
        seen += _rows(items)
        assert sum(isinstance(m, EndOfWindow) for m in items) == 1  # every rank sees the window
    assert sorted(seen) == list(range(33))


def test_bad_files(tmp_path: Path) -> None:
    _land(tmp_path, "a.parquet", [1, 2])
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    other = pa.table({"id": pa.array(["x"])})
    pq.write_table(other, tmp_path / "c.parquet")
    kw = dict(batch_size=4, idle_timeout=0.0, poll_interval=0.01, settle_seconds=0.0)
    with pytest.raises(ColumnIOError, match="b.parquet"):
        _drain(StreamingReader(str(tmp_path), ["id"], **kw))
    r = StreamingReader(str(tmp_path), ["id"], on_error="skip", **kw)
    assert _rows(_drain(r)) == [1, 2]
    assert r.stats.files_skipped == 2


def test_nulls_filled_counts_row_and_item_nulls(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([0, 1, 2, 3], pa.int64()),
            "l": pa.array([[1, 2], None, [3, None], []], pa.list_(pa.int64())),
            "items_only": pa.array([[None], [5], [None, None], [6]], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    r = StreamingReader(
        str(tmp_path),
        [
            "id",
            Column("l", default=[], element_default=-1),
            Column("items_only", element_default=0),
        ],
        batch_size=4,
        idle_timeout=0.0,
        poll_interval=0.01,
        settle_seconds=0.0,
    )
    batches = [b for b in r if not isinstance(b, EndOfWindow)]
    assert [x for b in batches for x in b["l"].to_list()] == [[1, 2], [], [3, -1], []]
    assert r.stats.nulls_filled == {"l": 2, "items_only": 3}


def test_young_unreadable_file_is_retried(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1 half written")
    r = StreamingReader(
        str(tmp_path), [Column("id")], batch_size=4, idle_timeout=0.5, poll_interval=0.05
    )

    def finish() -> None:
        time.sleep(0.2)
        _land(tmp_path, "a.parquet", [7, 8])

    t = threading.Thread(target=finish)
    t.start()
    items = _drain(r)
    t.join()
    assert _rows(items) == [7, 8]


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        StreamingReader(str(tmp_path), window_files=2, time_column="ts", window_length=1)
    with pytest.raises(ValueError, match="go together"):
        StreamingReader(str(tmp_path), time_column="ts")
