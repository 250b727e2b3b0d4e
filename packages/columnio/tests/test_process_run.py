"""recstack.columnio.process_run: ColumnReader(worker="process") gives the same batches as
the threaded reader, from another process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from columnio_testdata import flat_batch, write_parts

from recstack.columnio.columns import Column
from recstack.columnio.errors import ColumnIOError
from recstack.columnio.reader import ColumnReader

# These tests pick small windows on purpose; the partial-shuffle warning is tested in
# test_epoch_shuffle.py.
pytestmark = pytest.mark.filterwarnings("ignore::recstack.columnio.ShuffleWarning")


def test_same_batches_as_threads_then_resume(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [150, 0, 61], row_group=40)
    cols = ["id", Column("small", dtype=torch.int64), "flag", "name", "hist", "tags", "vec"]
    kw = dict(batch_size=32, shuffle=True, seed=4, shuffle_buffer=70, keyed_jagged=["id"])
    want = [flat_batch(b) for b in ColumnReader(paths, cols, **kw)]
    with ColumnReader(paths, cols, worker="process", **kw) as reader:
        got = [flat_batch(b) for b in reader]
        assert got == want
        assert reader.stats.rows_yielded == 211 and reader.epoch == 1
        # Second epoch, interrupted, then resumed by a fresh process reader.
        nxt = [flat_batch(b) for b in ColumnReader(paths, cols, **kw) for _ in [0]]
        it = iter(reader)
        head = [flat_batch(next(it)) for _ in range(3)]
        state = json.loads(json.dumps(reader.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 96
    threaded = ColumnReader(paths, cols, **kw)
    threaded.set_epoch(1)
    epoch1 = [flat_batch(b) for b in threaded]
    assert head == epoch1[:3]
    with ColumnReader(paths, cols, worker="process", **kw) as again:
        again.load_state_dict(state)
        assert head + [flat_batch(b) for b in again] == epoch1
    assert nxt  # the threaded reader ran too


def test_errors_in_the_reader_process_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"a": pa.array([1, None, 3], pa.int64())}), p)
    reader = ColumnReader(str(p), ["a"], batch_size=2, worker="process")
    with reader, pytest.raises(ColumnIOError, match=r"nulls\.parquet.*column 'a'.*null"):
        list(reader)


def test_close_stops_the_process_and_removes_its_slots(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [300], row_group=50)
    reader = ColumnReader(paths, ["id", "hist"], batch_size=10, worker="process", prefetch=2)
    it = iter(reader)
    next(it)
    proc = reader._process
    assert proc is not None
    slot_files = [m.slot.path for m in proc.maps.values()]
    assert slot_files and all(os.path.exists(f) for f in slot_files)
    reader.close()
    assert proc.proc.poll() is not None
    assert not any(os.path.exists(f) for f in slot_files)


def test_process_mode_arguments(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [10], row_group=10)
    with pytest.raises(ValueError, match="filesystem"):
        ColumnReader(paths, ["id"], worker="process", filesystem=pafs.LocalFileSystem())
    with pytest.raises(ValueError, match="worker"):
        ColumnReader(paths, ["id"], worker="fork")  # type: ignore[arg-type]
    bad = ColumnReader(paths, [Column("id", default=object())], worker="process")
    with pytest.raises(ValueError, match="JSON"):
        next(iter(bad))


@pytest.mark.gpu
def test_process_reader_delivers_on_the_gpu(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [300, 77], row_group=64)
    cols = ["id", "name", "hist", "tags", "vec"]
    want = [flat_batch(b) for b in ColumnReader(paths, cols, batch_size=50)]
    got = []
    with ColumnReader(paths, cols, batch_size=50, worker="process", device="cuda") as reader:
        for b in reader:
            torch.cuda._sleep(1_000_000)  # the compute stream lags the copies
            assert b["id"].is_cuda
            got.append(
                {k: (v * 1 if isinstance(v, torch.Tensor) else v.to("cpu")) for k, v in b.items()}
            )
    torch.cuda.synchronize()
    assert [
        flat_batch({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in g.items()})
        for g in got
    ] == want


def test_a_dead_reader_process_is_reported(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [400], row_group=20)
    reader = ColumnReader(paths, ["id"], batch_size=10, worker="process", prefetch=2)
    it = iter(reader)
    next(it)
    assert reader._process is not None
    reader._process.proc.kill()
    reader._process.proc.wait()
    with pytest.raises(RuntimeError, match="reader process exited"):
        for _ in range(100):
            next(it)
    reader.close()  # still cleans up its slot mappings
