"""Async snapshots: GPU tensors are staged in spare GPU memory while it has room, and
written from there; pinned buffers are never allocated on the training thread (the first
save copies to ordinary memory and the next ones reuse buffers pinned behind it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_table import ToyTable

from recstack.saver import Checkpointer
from recstack.saver.snapshot import (
    MIN_PART_BYTES,
    GpuStage,
    PinnedPool,
    estimate_chunk_rows,
    host_copy,
    spread_chunk_rows,
    to_host,
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


class GpuRows:
    """A keyed state living on the GPU whose export chunks are views of its live storage
    (allowed by the protocol): the worst case for a snapshot."""

    def __init__(self, n: int, dim: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(n)
        self.keys = torch.arange(n, device="cuda", dtype=torch.int64) * 7
        self.values = torch.randn(n, dim, device="cuda", generator=gen)
        self.m = torch.randn(n, dim, device="cuda", generator=gen)

    def state_metadata(self) -> dict[str, object]:
        dim = self.values.shape[1]
        shape = {"dtype": "float32", "shape": [dim]}
        return {"num_keys": self.keys.numel(), "slots": {"values": shape, "m": shape}}

    def export_chunks(self, chunk_rows: int):  # type: ignore[no-untyped-def]
        for i in range(0, self.keys.numel(), chunk_rows):
            j = i + chunk_rows
            yield self.keys[i:j], {"values": self.values[i:j], "m": self.m[i:j]}

    def import_chunk(self, keys, slots, metadata, shard=None) -> int:  # type: ignore[no-untyped-def]
        return int(keys.numel())


def _tensor_files(ckpt: Path) -> dict[str, bytes]:
    return {str(f.relative_to(ckpt)): f.read_bytes() for f in sorted(ckpt.rglob("*.safetensors"))}


@pytest.mark.gpu
def test_an_async_save_stages_in_spare_gpu_memory_and_writes_what_a_blocking_save_writes(
    tmp_path: Path,
) -> None:
    rows = GpuRows(20_000, 16)
    model = torch.nn.Linear(64, 32, device="cuda")
    blocking = Checkpointer(tmp_path / "blocking", part_bytes=256 << 10, rng=False)
    expected = _tensor_files(blocking.save(3, model=model, emb=rows))
    assert len([p for p in expected if p.startswith("sparse/")]) > 1  # several parts
    before = torch.cuda.memory_allocated()
    for fraction in (0.5, 0.0):
        ckpt = Checkpointer(
            tmp_path / f"async-{fraction}",
            part_bytes=256 << 10,
            rng=False,
            gpu_snapshot_fraction=fraction,
        )
        keep = rows.values.clone(), rows.m.clone(), model.weight.detach().clone()
        path = ckpt.save(3, blocking=False, model=model, emb=rows)
        staged = ckpt.last_gpu_snapshot_bytes
        with torch.no_grad():  # training goes on while the files are written
            rows.values.add_(1.0)
            rows.m.mul_(-1.0)
            model.weight.add_(1.0)
        ckpt.wait()
        assert _tensor_files(path) == expected
        if fraction:
            table_bytes = rows.keys.numel() * (8 + 2 * 16 * 4)
            assert staged >= table_bytes
        else:
            assert staged == 0
        with torch.no_grad():
            rows.values.copy_(keep[0])
            rows.m.copy_(keep[1])
            model.weight.copy_(keep[2])
        del keep
        # The staged copies are released once written.
        assert torch.cuda.memory_allocated() <= before


@pytest.mark.gpu
def test_the_gpu_stage_keeps_to_its_budget_and_the_writer_moves_staged_tensors_home() -> None:
    x = torch.randn(1000, 8, device="cuda")
    assert GpuStage(0.0).take(x) is None
    tiny = GpuStage(1e-15)  # a budget of a few bytes at most
    assert tiny.take(x) is None and tiny.staged_bytes == 0
    stage = GpuStage(0.5)
    view = x[::2]  # not contiguous: the staged copy is
    before = view.cpu()
    staged = stage.take(view)
    assert staged is not None and staged.is_cuda and staged.is_contiguous()
    assert stage.staged_bytes == view.numel() * 4
    x.add_(1.0)  # the copy is independent of the source
    host = to_host({"a": staged, "b": torch.arange(3)})
    assert host["a"].device.type == "cpu" and torch.equal(host["a"], before)
    assert torch.equal(host["b"], torch.arange(3))
    # Through pinned buffers: the first call notes the shape, the pool pins it after.
    bounce = PinnedPool()
    assert not to_host({"a": staged}, bounce)["a"].is_pinned()
    bounce.recycle()
    again = to_host({"a": staged}, bounce)["a"]
    assert again.is_pinned() and torch.equal(again, before)
    # The copy through host_copy prefers the stage over pinned buffers.
    pool = PinnedPool()
    pool.recycle()
    snap = host_copy(x, snapshot=True, pool=pool, stage=GpuStage(0.5))
    assert snap.is_cuda and torch.equal(snap, x)
