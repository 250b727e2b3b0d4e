"""Async snapshots: pinned buffers are never allocated on the training thread; the first
save copies to ordinary memory and the next ones reuse buffers pinned behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_table import ToyTable

from recstack.saver import Checkpointer
from recstack.saver.snapshot import (
    MIN_PART_BYTES,
    PinnedPool,
    estimate_chunk_rows,
    host_copy,
    spread_chunk_rows,
)


def test_cpu_snapshots_never_share_memory() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    snap = host_copy(t, snapshot=True, pool=None)
    t.add_(1)
    assert torch.equal(snap, torch.arange(6.0).reshape(2, 3))
    streamed = host_copy(t, snapshot=False, pool=None)  # a blocking save writes it as is
    assert streamed.data_ptr() == t.data_ptr()


@pytest.mark.gpu
def test_the_first_async_save_pins_nothing_and_the_next_reuse_pinned_buffers(
    tmp_path: Path,
) -> None:
    pool = PinnedPool()
    x = torch.randn(1000, 8, device="cuda")
    first = host_copy(x, snapshot=True, pool=pool)
    assert not first.is_pinned() and torch.equal(first, x.cpu())
    pool.recycle()  # what the writer thread does once the files are written
    second = host_copy(x, snapshot=True, pool=pool)
    torch.cuda.synchronize()
    assert second.is_pinned() and torch.equal(second, x.cpu())
    assert host_copy(x, snapshot=True, pool=pool) is not second  # one buffer, lent once
    pool.recycle()
    # Through the checkpointer: a table on the GPU, saved async three times.
    table = ToyTable("t")
    model = torch.nn.Linear(64, 64, device="cuda")
    ckpt = Checkpointer(tmp_path)
    for step in range(3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, blocking=False, model=model, emb=table)
        with torch.no_grad():
            model.weight.fill_(-1.0)  # training goes on: the snapshot is taken already
        ckpt.wait()
        fresh = torch.nn.Linear(64, 64)
        Checkpointer(tmp_path).load(step, model=fresh, emb=ToyTable("t"))
        assert bool((fresh.weight == float(step)).all())


def test_small_exports_are_spread_over_the_writer_threads() -> None:
    meta = {"slots": {"values": {"dtype": "float32", "shape": [64]}}, "num_keys": 100_000_000}
    row = 8 + 64 * 4
    part = 256 << 20
    assert estimate_chunk_rows(meta, part) == part // row
    # A big full export: parts of part_bytes.
    assert spread_chunk_rows(meta, part, 16, delta=False) == part // row
    # A small one: one part per thread, none under the floor.
    small = {**meta, "num_keys": 200_000}
    assert spread_chunk_rows(small, part, 16, delta=False) == MIN_PART_BYTES // row
    medium = {**meta, "num_keys": 1_000_000}
    assert spread_chunk_rows(medium, part, 16, delta=False) == 62_500
    # A delta's size is unknown: part_bytes / threads, at least the floor.
    assert spread_chunk_rows(meta, part, 16, delta=True) == part // row // 16
    assert spread_chunk_rows(meta, part, 64, delta=True) == MIN_PART_BYTES // row
    assert spread_chunk_rows({}, part, 16, delta=False) == 1 << 16
    assert spread_chunk_rows({**meta, "num_keys": 0}, part, 1, delta=False) == part // row
