"""Async snapshots: pinned buffers are never allocated on the training thread; the first
save copies to ordinary memory and the next ones reuse buffers pinned behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_table import ToyTable

from recstack.saver import Checkpointer
from recstack.saver.snapshot import PinnedPool, host_copy


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
