"""ColumnReader: every row once, in the promised order, with exact resume and sharding."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch
from columnio_testdata import make_table, write_parts

from recstack.columnio.columns import Column
from recstack.columnio.errors import ColumnIOError
from recstack.columnio.reader import ColumnReader
from recstack.core import JaggedTensor, KeyedJaggedTensor

# These tests pick small windows on purpose; the partial-shuffle warning is tested in
# test_epoch_shuffle.py.
pytestmark = pytest.mark.filterwarnings("ignore::recstack.columnio.ShuffleWarning")


def _ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def test_reads_every_type_exactly(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [130, 0, 71], row_group=50)
    source = pa.concat_tables([pq.read_table(p) for p in paths])
    reader = ColumnReader(paths, batch_size=64)
    batches = list(reader)
    assert [len(b["id"]) for b in batches] == [64, 64, 64, 9]
    got = {k: [] for k in source.column_names}
    for b in batches:
        for k in got:
            v = b[k]
            got[k].extend(
                v.to_strings()
                if k in ("name", "tags")
                else v.tolist()
                if isinstance(v, torch.Tensor)
                else v.to_list()
            )
    for k in source.column_names:
        want = source.column(k).to_pylist()
        if k == "x":
            assert got[k] == pytest.approx(want)
        else:
            assert got[k] == want, k
    b = batches[0]
    assert b["small"].dtype == torch.int8 and b["flag"].dtype == torch.bool
    assert b["vec"].shape == (64, 2) and b["vec"].dtype == torch.int32
    assert isinstance(b["tags"], JaggedTensor) and b["tags"].is_nested
    assert reader.stats.rows_yielded == 201 and reader.stats.rows_read == 201
    assert len(reader) == 4


def test_selects_columns_and_casts(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [40], row_group=16)
    reader = ColumnReader(paths, ["hist", Column("small", dtype=torch.int64)], batch_size=16)
    b = next(iter(reader))
    assert list(b) == ["hist", "small"] and b["small"].dtype == torch.int64
    with pytest.raises(ColumnIOError, match="'x'.*cannot convert"):
        list(ColumnReader(paths, [Column("x", dtype=torch.int64)], batch_size=8))


def test_batches_own_their_memory(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [32], row_group=32)
    b = next(iter(ColumnReader(paths, ["id"], batch_size=32)))
    b["id"].add_(1)  # writable, and not Arrow's memory
    b2 = next(iter(ColumnReader(paths, ["id"], batch_size=32)))
    assert b2["id"].tolist() == list(range(32))


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_drop_last_and_ragged_sizes(tmp_path: Path, batch_size: int) -> None:
    paths = write_parts(tmp_path, [23, 1, 40], row_group=9)
    full = list(ColumnReader(paths, ["id"], batch_size=batch_size))
    assert _ids(full) == list(range(64))
    reader = ColumnReader(paths, ["id"], batch_size=batch_size, drop_last=True)
    dropped = list(reader)
    assert all(len(b["id"]) == batch_size for b in dropped)
    assert reader.stats.rows_dropped_last == 64 % batch_size
    assert len(reader) == len(dropped)


def test_empty_files_and_zero_row_groups(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(make_table(0), empty)
    with pq.ParquetWriter(tmp_path / "zero_rg.parquet", make_table(0).schema) as w:
        w.write_table(make_table(3))
        w.write_table(make_table(0))
        w.write_table(make_table(2, start=3))
    reader = ColumnReader([str(empty), str(tmp_path / "zero_rg.parquet")], ["id"], batch_size=4)
    assert _ids(list(reader)) == [0, 1, 2, 3, 4]
    only_empty = ColumnReader(str(empty), ["id", "hist"], batch_size=4)
    assert list(only_empty) == [] and len(only_empty) == 0


def test_epochs_and_shuffle_order(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [300, 200], row_group=64)
    plain = ColumnReader(paths, ["id"], batch_size=50)
    assert _ids(list(plain)) == list(range(500))
    assert plain.epoch == 1
    a = ColumnReader(paths, ["id"], batch_size=50, shuffle=True, seed=3, shuffle_buffer=128)
    b = ColumnReader(paths, ["id"], batch_size=50, shuffle=True, seed=3, shuffle_buffer=128)
    e0, e1 = _ids(list(a)), _ids(list(a))
    assert sorted(e0) == sorted(e1) == list(range(500))
    assert e0 != e1 and e0 != list(range(500))
    assert _ids(list(b)) == e0
    c = ColumnReader(paths, ["id"], batch_size=50, shuffle=True, seed=4, shuffle_buffer=128)
    assert _ids(list(c)) != e0


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharded_readers_cover_every_row_once(tmp_path: Path, world: int, shuffle: bool) -> None:
    paths = write_parts(tmp_path, [333, 20, 150, 1], row_group=37)
    seen: list[int] = []
    counts = []
    for rank in range(world):
        r = ColumnReader(
            paths,
            ["id"],
            batch_size=16,
            rank=rank,
            world_size=world,
            shuffle=shuffle,
            seed=9,
            shuffle_buffer=50,
        )
        ids = _ids(list(r))
        counts.append(len(ids))
        seen.extend(ids)
        assert len(ids) == r.num_rows
    assert sorted(seen) == list(range(504))
    assert max(counts) - min(counts) <= 1


def _resume_case(tmp_path: Path, k: int, **kw) -> None:
    paths = write_parts(tmp_path, [157, 64, 90], row_group=30)
    full_reader = ColumnReader(paths, ["id", "hist"], **kw)
    full = _ids(list(full_reader))
    first = ColumnReader(paths, ["id", "hist"], **kw)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    second = ColumnReader(paths, ["id", "hist"], **kw)
    second.load_state_dict(state)
    tail = list(second)
    got = _ids(head) + _ids(tail)
    assert got == full  # same order too: the resumed stream is the rest of the same stream
    assert len(set(got)) == len(got)
    # The next epoch after a resumed one is the same as an uninterrupted reader's.
    assert _ids(list(second)) == _ids(list(full_reader))


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_resume_is_exact(tmp_path: Path, k: int) -> None:
    _resume_case(tmp_path, k, batch_size=40)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_resume_is_exact_with_shuffle_and_shards(tmp_path: Path, k: int) -> None:
    _resume_case(
        tmp_path, k, batch_size=13, shuffle=True, seed=5, shuffle_buffer=45, rank=1, world_size=2
    )


def test_resume_with_another_batch_size(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [100], row_group=32)
    r = ColumnReader(paths, ["id"], batch_size=30, shuffle=True, shuffle_buffer=64)
    it = iter(r)
    head = _ids([next(it), next(it)])
    state = r.state_dict()
    r2 = ColumnReader(paths, ["id"], batch_size=7, shuffle=True, shuffle_buffer=64)
    r2.load_state_dict(state)
    tail = _ids(list(r2))
    assert sorted(head + tail) == list(range(100))


def test_state_from_other_data_is_refused(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [50, 50], row_group=25)
    state = ColumnReader(paths, ["id"], batch_size=10).state_dict()
    with pytest.raises(ValueError, match="different data"):
        ColumnReader(paths[:1], ["id"], batch_size=10).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ColumnReader(paths, ["id"], batch_size=10, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a ColumnReader state"):
        ColumnReader(paths, ["id"], batch_size=10).load_state_dict({"epoch": 0})


def test_break_then_continue_yields_the_rest(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [90], row_group=20)
    r = ColumnReader(paths, ["id"], batch_size=10, num_threads=3, prefetch=2)
    got = []
    for i, b in enumerate(r):
        got += b["id"].tolist()
        if i == 2:
            break
    got += _ids(list(r))
    assert got == list(range(90))
    assert r.state_dict()["next"] is not None  # epoch 1 starts at the first row
    assert r.state_dict()["epoch"] == 1


def test_nulls_need_a_default(tmp_path: Path) -> None:
    t = pa.table(
        {
            "a": pa.array([1, None, 3], pa.int64()),
            "s": pa.array(["x", None, "z"]),
            "l": pa.array([[1], None, [2, None]], pa.list_(pa.int64())),
        }
    )
    p = tmp_path / "nulls.parquet"
    pq.write_table(t, p)
    with pytest.raises(ColumnIOError, match=r"nulls\.parquet.*column 'a'.*null"):
        list(ColumnReader(str(p), ["a"], batch_size=2))
    with pytest.raises(ColumnIOError, match=r"column 'l'.*null list item"):
        list(ColumnReader(str(p), [Column("l", default=[])], batch_size=2))
    r = ColumnReader(
        str(p),
        [
            Column("a", default=-1),
            Column("s", default=""),
            Column("l", default=[], element_default=0),
        ],
        batch_size=3,
    )
    b = next(iter(r))
    assert b["a"].tolist() == [1, -1, 3]
    assert b["s"].to_strings() == ["x", "", "z"]
    assert b["l"].to_list() == [[1], [], [2, 0]]
    assert r.stats.nulls_filled == {"a": 1, "s": 1, "l": 2}  # l: a null row and a null item
    with pytest.raises(ColumnIOError, match="does not fit"):
        list(ColumnReader(str(p), [Column("a", default="nope")], batch_size=2))


def _item_null_table() -> pa.Table:
    return pa.table(
        {
            "l": pa.array([[1, 2], None, [3, None], []], pa.list_(pa.int64())),
            # Null items but no null rows: counted all the same.
            "items_only": pa.array([[None], [5], [None, None], [6]], pa.list_(pa.int64())),
            "vec": pa.array([[1, None], None, [3, 4], [None, None]], pa.list_(pa.int32(), 2)),
            "tags": pa.array([["a", None], ["b"], None, [None]], pa.list_(pa.string())),
        }
    )


_ITEM_NULL_COLUMNS = [
    Column("l", default=[], element_default=-1),
    Column("items_only", element_default=0),
    Column("vec", default=[7, 8], element_default=0),
    Column("tags", default=[], element_default="?"),
]


# Parquet files whose fixed-size list column has a null row are read back by pyarrow 26
# on; earlier versions raise "Expected all lists to be of size=2" on the row group.
_READS_NULL_FIXED_LISTS = int(pa.__version__.split(".")[0]) >= 26


@pytest.mark.skipif(
    not _READS_NULL_FIXED_LISTS, reason="pyarrow < 26 cannot read a null fixed-size list row"
)
@pytest.mark.parametrize("worker", ["thread", "process"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_nulls_filled_counts_row_and_item_nulls(
    tmp_path: Path, worker: str, batch_size: int
) -> None:
    p = tmp_path / "items.parquet"
    pq.write_table(_item_null_table(), p, row_group_size=2)
    with ColumnReader(str(p), _ITEM_NULL_COLUMNS, batch_size=batch_size, worker=worker) as r:
        batches = list(r)
        stats = r.stats
    assert [x for b in batches for x in b["l"].to_list()] == [[1, 2], [], [3, -1], []]
    assert [x for b in batches for x in b["items_only"].to_list()] == [[0], [5], [0, 0], [6]]
    assert [x for b in batches for x in b["vec"].tolist()] == [[1, 0], [7, 8], [3, 4], [0, 0]]
    assert [x for b in batches for x in b["tags"].to_strings()] == [["a", "?"], ["b"], [], ["?"]]
    # l: the null row (default) and the null item (element_default); the null items of the
    # null vec row are not counted, since its default replaces the whole row.
    assert stats.nulls_filled == {"l": 2, "items_only": 3, "vec": 4, "tags": 3}


def test_nulls_filled_counts_item_nulls_of_every_unit_once(tmp_path: Path) -> None:
    p = tmp_path / "items.parquet"
    pq.write_table(_item_null_table(), p, row_group_size=1)
    r = ColumnReader(str(p), _ITEM_NULL_COLUMNS[:2], batch_size=3, shuffle=True, seed=1)
    for _ in range(2):
        list(r)
    assert r.stats.nulls_filled == {"l": 4, "items_only": 6}


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    good = write_parts(tmp_path, [20], row_group=10)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": pa.array(["a", "b"])}), other)
    with pytest.raises(ColumnIOError, match=r"other\.parquet.*column 'id'.*type changed"):
        ColumnReader(good + [str(other)], ["id"], batch_size=4)
    with pytest.raises(ColumnIOError, match=r"column 'nope'"):
        ColumnReader(good, ["nope"], batch_size=4)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(Path(good[0]).read_bytes()[:100])
    with pytest.raises(ColumnIOError, match="broken.parquet"):
        ColumnReader(good + [str(broken)], ["id"], batch_size=4)
    skipper = ColumnReader(good + [str(broken), str(other)], ["id"], batch_size=4, on_error="skip")
    assert _ids(list(skipper)) == list(range(20))
    assert skipper.stats.files_skipped == 2
    assert skipper.stats.rows_skipped == 2  # other.parquet's rows; broken's are unknown
    assert {Path(e["file"]).name for e in skipper.stats.skipped_files} == {
        "broken.parquet",
        "other.parquet",
    }


def test_corrupt_row_group_is_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(make_table(300), p, row_group_size=100, compression="snappy")
    data = bytearray(p.read_bytes())
    meta = pq.ParquetFile(p).metadata
    col = meta.row_group(1).column(0)
    start = col.data_page_offset
    data[start + 20 : start + 60] = b"\xff" * 40  # garble a data page of row group 1
    p.write_bytes(bytes(data))
    with pytest.raises(ColumnIOError, match="c.parquet"):
        list(ColumnReader(str(p), ["id"], batch_size=64))
    r = ColumnReader(str(p), ["id"], batch_size=64, on_error="skip")
    ids = _ids(list(r))
    assert ids == list(range(100)) + list(range(200, 300))
    assert r.stats.rows_skipped == 100 and r.stats.rows_yielded == 200


def test_keyed_jagged_packing(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [10], row_group=10)
    r = ColumnReader(paths, ["id", "hist", "x"], batch_size=4, keyed_jagged=["id", "hist"])
    b = next(iter(r))
    assert set(b) == {"x", "sparse"}
    kjt = b["sparse"]
    assert isinstance(kjt, KeyedJaggedTensor) and kjt.keys() == ["id", "hist"]
    assert kjt["id"].to_list() == [[0], [1], [2], [3]]
    assert kjt["hist"].to_list() == [[], [1], [2, 3], [3, 4, 5]]
    kjt.validate()
    with pytest.raises(ValueError, match="integer ids"):
        ColumnReader(paths, ["x"], batch_size=4, keyed_jagged=["x"])


def test_orc_and_arrow_ipc(tmp_path: Path) -> None:
    t = make_table(250).drop_columns(["vec"])
    orc.write_table(t, tmp_path / "a.orc", stripe_size=4096)
    feather.write_feather(t, tmp_path / "a.arrow", chunksize=60)
    for path in (tmp_path / "a.orc", tmp_path / "a.arrow"):
        for shuffle in (False, True):
            r = ColumnReader(str(path), ["id", "hist", "tags"], batch_size=32, shuffle=shuffle)
            batches = list(r)
            ids = _ids(batches)
            assert sorted(ids) == list(range(250)), path
            hist = {
                i: h
                for b in batches
                for i, h in zip(b["id"].tolist(), b["hist"].to_list(), strict=True)
            }
            assert hist == {i: list(range(i, i + i % 5)) for i in range(250)}


def test_s3_for_real(tmp_path: Path, s3_server) -> None:
    s3_server.make_bucket("ctr-data")
    fs = s3_server.filesystem()
    for k in range(2):
        pq.write_table(
            make_table(60, start=60 * k),
            f"ctr-data/day/p{k}.parquet",
            filesystem=fs,
            row_group_size=25,
        )
    r = ColumnReader(s3_server.uri("ctr-data/day"), ["id", "name"], batch_size=32)
    assert r.files == ["s3://ctr-data/day/p0.parquet", "s3://ctr-data/day/p1.parquet"]
    assert _ids(list(r)) == list(range(120))


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu_intact(tmp_path: Path) -> None:
    from recstack.columnio.device import to_device

    paths = write_parts(tmp_path, [300, 77], row_group=64)
    cols = ["id", "name", "hist", "tags", "vec"]
    want = list(ColumnReader(paths, cols, batch_size=50))
    reader = ColumnReader(paths, cols, batch_size=50, pin_memory=True, keyed_jagged=["hist"])
    got = list(to_device(reader, "cuda", prefetch=2))
    torch.cuda.synchronize()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["id"].is_cuda and torch.equal(g["id"].cpu(), w["id"])
        assert g["name"].to("cpu").to_strings() == w["name"].to_strings()
        assert g["tags"].to("cpu").to_strings() == w["tags"].to_strings()
        assert g["sparse"]["hist"].to("cpu").to_list() == w["hist"].to_list()
        assert torch.equal(g["vec"].cpu(), w["vec"])


@pytest.mark.gpu
@pytest.mark.parametrize("worker", ["auto", "thread"])
def test_reader_delivers_on_the_gpu(tmp_path: Path, worker: str) -> None:
    paths = write_parts(tmp_path, [300, 77], row_group=64)
    cols = ["id", "name", "hist", "tags", "vec"]
    want = list(ColumnReader(paths, cols, batch_size=50))
    reader = ColumnReader(paths, cols, batch_size=50, device="cuda", shuffle=False, worker=worker)
    assert reader.worker == ("process" if worker == "auto" else worker)
    got = []
    for b in reader:
        torch.cuda._sleep(1_000_000)  # the compute stream lags the copies
        got.append({k: (v * 1 if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    torch.cuda.synchronize()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["id"].is_cuda and torch.equal(g["id"].cpu(), w["id"])
        assert g["tags"].to("cpu").to_strings() == w["tags"].to_strings()
        assert g["hist"].to("cpu").to_list() == w["hist"].to_list()
        assert torch.equal(g["vec"].cpu(), w["vec"])
    state = reader.state_dict()
    assert state["epoch"] == 1


def test_auto_worker_reads_on_threads_for_host_batches(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [30], row_group=10)
    assert ColumnReader(paths, ["id"], batch_size=8).worker == "thread"
    assert ColumnReader(paths, ["id"], batch_size=8, device="cpu").worker == "thread"
    with pytest.raises(ValueError, match="'auto', 'thread' or 'process'"):
        ColumnReader(paths, ["id"], batch_size=8, worker="fibers")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_auto_worker_keeps_threads_when_a_process_cannot_read(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    paths = write_parts(tmp_path, [30], row_group=10)
    fs = ColumnReader(paths, ["id"], batch_size=8, device="cuda", filesystem=pafs.LocalFileSystem())
    assert fs.worker == "thread"
    odd = ColumnReader(paths, [Column("id", default=object())], batch_size=8, device="cuda")
    assert odd.worker == "thread"


# ---------------------------------------------------------------- torch.utils.data


def test_dataloader_passes_whole_batches_through(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [70, 45], row_group=20)
    reader = ColumnReader(paths, ["id", "tags"], batch_size=16, shuffle="window", seed=2)
    assert isinstance(reader, torch.utils.data.IterableDataset)
    want = [_ids([b]) for b in ColumnReader(paths, ["id"], 16, shuffle="window", seed=2)]
    loader = torch.utils.data.DataLoader(reader, batch_size=None)
    assert len(loader) == len(reader) == 8
    batches = list(loader)
    assert [_ids([b]) for b in batches] == want
    assert all(isinstance(b["tags"], JaggedTensor) for b in batches)
    # Each pass of the loader is the reader's next epoch.
    assert sorted(_ids(list(loader))) == list(range(115)) and reader.epoch == 2


def test_dataloader_worker_processes_are_refused(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [30], row_group=10)
    loader = torch.utils.data.DataLoader(
        ColumnReader(paths, ["id"], batch_size=8), batch_size=None, num_workers=1
    )
    with pytest.raises(RuntimeError, match="num_workers=0 and give the reader num_threads="):
        list(loader)


def _loader_resume_case(tmp_path: Path, make_loader: object) -> None:
    paths = write_parts(tmp_path, [60, 37], row_group=15)
    kw = dict(batch_size=9, shuffle="epoch", seed=4, shuffle_buffer=40)
    full = _ids(list(ColumnReader(paths, ["id"], **kw)))
    loader = make_loader(ColumnReader(paths, ["id"], **kw))  # type: ignore[operator]
    it = iter(loader)
    head = _ids([next(it) for _ in range(4)])
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make_loader(ColumnReader(paths, ["id"], **kw))  # type: ignore[operator]
    resumed.load_state_dict(state)
    assert head + _ids(list(resumed)) == full


class _ReaderStateLoader:
    """What a stateful loader does with an IterableDataset: keep its state_dict, reload it."""

    def __init__(self, reader: ColumnReader) -> None:
        self.reader = reader
        self.loader = torch.utils.data.DataLoader(reader, batch_size=None)

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict:
        return {"dataset_state": self.reader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["dataset_state"])


def test_dataloader_resumes_through_the_state_dict_protocol(tmp_path: Path) -> None:
    _loader_resume_case(tmp_path, _ReaderStateLoader)


def test_stateful_dataloader_resumes_exactly(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make_loader(reader: ColumnReader) -> object:
        return stateful.StatefulDataLoader(reader, batch_size=None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchdata calls a deprecated torch API
        _loader_resume_case(tmp_path, make_loader)
