"""shuffle="epoch": an exact, uniform permutation of every row of the epoch, sharded,
deterministic and exactly resumable; and the ShuffleWarning for a partial window shuffle."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from itertools import accumulate
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from columnio_testdata import make_table, write_parts

from recstack.columnio import ColumnReader, ShuffleWarning
from recstack.columnio.epoch_shuffle import BucketPlan, estimated_passes
from recstack.columnio.errors import ColumnIOError
from recstack.columnio.plan import rank_rows
from recstack.core import kernels


def _ids(batches) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def _stream(total: int, bucket_rows: int, seed: int, epoch: int) -> list[int]:
    # mix64's torch reference: the same function as its Triton kernel (tested in core),
    # minus the interpreter's cost in the statistical tests' thousands of small calls.
    with kernels.use_backend("torch"):
        plan = BucketPlan.build(total, bucket_rows, seed, epoch)
        return torch.cat([plan.stream_rows(k) for k in range(plan.num_buckets)]).tolist()


# ---------------------------------------------------------------------- the plan


@pytest.mark.parametrize(("total", "bucket_rows"), [(0, 4), (1, 4), (10, 3), (1000, 64), (77, 500)])
def test_plan_is_a_permutation_with_consistent_buckets(total, bucket_rows):
    plan = BucketPlan.build(total, bucket_rows, seed=1, epoch=2)
    assert plan.num_buckets == max(1, math.ceil(total / bucket_rows))
    assert plan.ends[-1] == total if plan.ends else total == 0
    stream = _stream(total, bucket_rows, 1, 2)
    assert sorted(stream) == list(range(total))
    for k in range(plan.num_buckets):
        members = plan.members(k)
        assert members.numel() == plan.ends[k] - plan.start(k)
        assert bool((plan.bucket_of(members) == k).all())
    for pos in range(total):
        bucket, row = plan.locate(pos)
        assert plan.start(bucket) + row == pos and row < plan.ends[bucket] - plan.start(bucket)


def test_plan_is_deterministic_per_seed_and_epoch():
    a = _stream(200, 32, seed=5, epoch=0)
    assert a == _stream(200, 32, seed=5, epoch=0)
    assert a != _stream(200, 32, seed=6, epoch=0)
    assert a != _stream(200, 32, seed=5, epoch=1)


def test_every_permutation_is_reached_about_equally_often():
    """4 rows in 2 buckets: all 24 orders appear, each about 1/24 of the time."""
    trials = 2400
    counts = Counter(tuple(_stream(4, 2, seed=s, epoch=0)) for s in range(trials))
    assert len(counts) == 24
    expected = trials / 24
    sigma = math.sqrt(expected * (1 - 1 / 24))
    assert all(abs(c - expected) < 5 * sigma for c in counts.values()), counts


def test_any_row_can_land_anywhere_unlike_a_window():
    """Row positions are uniform over the whole epoch (a window keeps rows near home)."""
    total, trials = 12, 1200
    hist = torch.zeros(total, total)
    for s in range(trials):
        stream = _stream(total, 4, seed=s, epoch=3)
        hist[torch.tensor(stream), torch.arange(total)] += 1
    expected = trials / total
    sigma = math.sqrt(expected * (1 - 1 / total))
    assert float((hist - expected).abs().max()) < 5 * sigma
    assert bool((hist > 0).all())  # row 0 reached the last position, row 11 the first


def test_estimated_passes():
    assert estimated_passes(0, 0, 10) == 0
    assert estimated_passes(1000, 1000, 1000) == 1
    assert estimated_passes(1000, 500, 500) == 2
    assert estimated_passes(10_000, 10_000, 100) == 100


# ---------------------------------------------------------------------- the reader


def test_reader_yields_the_plan_stream_with_matching_columns(tmp_path: Path):
    paths = write_parts(tmp_path, [333, 0, 20, 150, 1], row_group=37)
    r = ColumnReader(
        paths, ["id", "hist", "name", "tags"], batch_size=50, shuffle="epoch", shuffle_buffer=100
    )
    batches = list(r)
    ids = _ids(batches)
    assert ids == _stream(504, 100, seed=0, epoch=0)
    assert r.stats.rows_yielded == 504 and r.epoch == 1
    # Every column of a row travels with its id.
    for b in batches:
        rows = zip(b["id"].tolist(), b["hist"].to_list(), b["name"].to_strings(), strict=True)
        for i, hist, name in rows:
            assert hist == list(range(i, i + i % 5)) and name == f"n{i}" * (i % 4)
        assert b["tags"].is_nested
    # The data is decoded about once per bucket: the price of an exact shuffle.
    assert r.stats.rows_read >= 504 * 5
    assert _ids(list(r)) == _stream(504, 100, seed=0, epoch=1)


def test_one_bucket_when_the_buffer_holds_the_epoch(tmp_path: Path):
    paths = write_parts(tmp_path, [90, 30], row_group=25)
    r = ColumnReader(paths, ["id"], batch_size=32, shuffle="epoch", seed=2, shuffle_buffer=1000)
    ids = _ids(list(r))
    assert sorted(ids) == list(range(120)) and ids != list(range(120))
    assert r.stats.rows_read == 120  # one pass


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_split_one_global_permutation(tmp_path: Path, world: int):
    paths = write_parts(tmp_path, [333, 20, 150, 1], row_group=37)
    stream = _stream(504, 64, seed=9, epoch=0)
    for rank in range(world):
        r = ColumnReader(
            paths,
            ["id"],
            batch_size=16,
            shuffle="epoch",
            seed=9,
            shuffle_buffer=64,
            rank=rank,
            world_size=world,
        )
        lo, hi = rank_rows(504, rank, world)
        assert _ids(list(r)) == stream[lo:hi]
        assert len(r) == math.ceil((hi - lo) / 16)


@pytest.mark.parametrize("k", [0, 5, 9])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_resume_is_exact(tmp_path: Path, k: int, rank: int, world: int):
    paths = write_parts(tmp_path, [157, 64, 90], row_group=30)
    kw = dict(shuffle="epoch", seed=5, shuffle_buffer=45, rank=rank, world_size=world)
    full_reader = ColumnReader(paths, ["id", "hist"], batch_size=13, **kw)
    full = _ids(list(full_reader))
    first = ColumnReader(paths, ["id", "hist"], batch_size=13, **kw)
    it = iter(first)
    head = _ids(next(it) for _ in range(k))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["shuffle"] == "epoch" and state["position"] == len(head)
    lo, _ = rank_rows(311, rank, world)
    bucket, row = BucketPlan.build(311, 45, 5, 0).locate(lo + len(head))
    assert state["next"] == {"bucket": bucket, "row_in_bucket": row}
    second = ColumnReader(paths, ["id", "hist"], batch_size=7, **kw)  # another batch size
    second.load_state_dict(state)
    assert head + _ids(list(second)) == full
    assert second.state_dict()["next"] is not None  # at the start of epoch 1
    assert _ids(list(second)) == _ids(list(full_reader))


def test_state_across_shuffle_modes_is_refused(tmp_path: Path):
    paths = write_parts(tmp_path, [60], row_group=20)
    windowed = ColumnReader(paths, ["id"], batch_size=10, shuffle="window", shuffle_buffer=20)
    assert windowed.shuffle is True  # "window" is recorded as True, as before
    epoch = ColumnReader(paths, ["id"], batch_size=10, shuffle="epoch", shuffle_buffer=20)
    with pytest.raises(ValueError, match="shuffle=True but this reader has shuffle='epoch'"):
        epoch.load_state_dict(windowed.state_dict())


def test_bad_shuffle_values(tmp_path: Path):
    paths = write_parts(tmp_path, [10], row_group=10)
    for bad in ("full", 1, None):
        with pytest.raises(ValueError, match="shuffle must be False, True, 'window' or 'epoch'"):
            ColumnReader(paths, ["id"], batch_size=4, shuffle=bad)


def test_corrupt_row_group_is_skipped_once(tmp_path: Path):
    p = tmp_path / "c.parquet"
    pq.write_table(make_table(300), p, row_group_size=100, compression="snappy")
    data = bytearray(p.read_bytes())
    start = pq.ParquetFile(p).metadata.row_group(1).column(0).data_page_offset
    data[start + 20 : start + 60] = b"\xff" * 40  # garble a data page of row group 1
    p.write_bytes(bytes(data))
    with pytest.raises(ColumnIOError, match="c.parquet"):
        list(ColumnReader(str(p), ["id"], batch_size=64, shuffle="epoch", shuffle_buffer=50))
    r = ColumnReader(
        str(p), ["id"], batch_size=64, shuffle="epoch", shuffle_buffer=50, on_error="skip"
    )
    ids = _ids(list(r))
    assert ids == [i for i in _stream(300, 50, 0, 0) if not 100 <= i < 200]
    assert r.stats.rows_skipped == 100 and r.stats.rows_yielded == 200
    assert len(r.stats.skipped_files) == 1


@pytest.mark.slow
def test_process_worker_matches_threads(tmp_path: Path):
    paths = write_parts(tmp_path, [150, 61], row_group=40)
    kw = dict(batch_size=32, shuffle="epoch", seed=4, shuffle_buffer=70, keyed_jagged=["id"])
    want = [b["sparse"].values().tolist() for b in ColumnReader(paths, ["id", "hist"], **kw)]
    with ColumnReader(paths, ["id", "hist"], worker="process", **kw) as reader:
        got = [b["sparse"].values().tolist() for b in reader]
    assert got == want
    assert sorted(i for ids in got for i in ids) == list(range(211))


# ---------------------------------------------------------------------- warnings


def _caught(**kw) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ColumnReader(**kw)
    return [w for w in caught if issubclass(w.category, ShuffleWarning)]


def test_partial_window_shuffle_warns_unless_chosen(tmp_path: Path):
    paths = write_parts(tmp_path, [300], row_group=50)
    base = dict(paths=paths, columns=["id"], batch_size=10)
    (warned,) = _caught(**base, shuffle=True, shuffle_buffer=100)
    assert "partial" in str(warned.message) and "300 rows" in str(warned.message)
    assert warned.filename == __file__  # points at the caller's line
    assert _caught(**base, shuffle="window", shuffle_buffer=100) == []
    assert _caught(**base, shuffle=True, shuffle_buffer=300) == []
    assert _caught(**base, shuffle=True) == []  # the default window holds all 300 rows
    assert _caught(**base, shuffle="epoch", shuffle_buffer=100) == []
    # Sharded: what counts is the rank's share.
    assert _caught(**base, shuffle=True, shuffle_buffer=150, rank=0, world_size=2) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=ShuffleWarning)
        ColumnReader(**base, shuffle=True, shuffle_buffer=100)  # silenced the usual way


def test_costly_epoch_shuffle_warns_with_the_default_buffer(tmp_path: Path, monkeypatch):
    paths = write_parts(tmp_path, [300], row_group=50)
    monkeypatch.setattr("recstack.columnio.reader.estimated_passes", lambda *a: 40)
    (warned,) = _caught(paths=paths, columns=["id"], batch_size=10, shuffle="epoch")
    assert "about 40 times per epoch" in str(warned.message)
    given = _caught(paths=paths, columns=["id"], batch_size=10, shuffle="epoch", shuffle_buffer=9)
    assert given == []


def test_cumulative_unit_index_matches_files(tmp_path: Path):
    paths = write_parts(tmp_path, [5, 0, 7], row_group=3)
    r = ColumnReader(paths, ["id"], batch_size=4)
    assert r._unit_ends.tolist() == list(accumulate(u.rows for u in r._units))
