"""recstack.columnio.device: pinned batches and the device prefetcher.

The CPU tests check the prefetcher's order, resume and error semantics (device ``"cpu"``,
and ``"meta"`` where a real move must be seen); the ``gpu`` tests check the CUDA stream
path: copied values, ordering against a busy compute stream, and ``record_stream``.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch

from recstack.columnio.device import (
    DevicePrefetcher,
    batch_to,
    pin_batch,
    record_batch_stream,
    to_device,
)
from recstack.core import JaggedTensor, KeyedJaggedTensor


class EndOfWindow:
    """A pass-through marker, like a streaming reader's end of a time window."""

    def __init__(self, window: int) -> None:
        self.window = window


class CountingSource:
    """A resumable source shaped like a ColumnReader.

    ``iter()`` starts the next epoch (or resumes a loaded state); the state counts the items
    handed out in the current epoch. ``fail_at`` makes the source raise at that position.
    """

    def __init__(self, items: list[Any], fail_at: int | None = None) -> None:
        self.items = items
        self.fail_at = fail_at
        self.epoch = 0
        self.position = 0
        self.pulled = 0
        self.iter_calls = 0
        self._started = False
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        self.iter_calls += 1
        if self._resume is not None:
            self.epoch, self.position = self._resume
            self._resume = None
        elif self._started:
            self.epoch += 1
            self.position = 0
        self._started = True
        return self._generate()

    def _generate(self):
        while self.position < len(self.items):
            if self.position == self.fail_at:
                raise RuntimeError(f"bad row group at item {self.position}")
            item = self.items[self.position]
            self.position += 1
            self.pulled += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["position"])


def make_batch(gen: torch.Generator, rows: int, tag: int = 0) -> dict[str, Any]:
    """Random batch of ``rows`` rows: dense, jagged (weighted), strings and a KJT."""
    lengths = torch.randint(0, 4, (rows,), generator=gen)
    n = int(lengths.sum())
    seq = JaggedTensor.from_lengths(
        torch.randint(0, 1000, (n,), generator=gen), lengths, torch.rand(n, generator=gen)
    )
    names = JaggedTensor.from_strings([f"u{tag}-{i}" * (i % 3) for i in range(rows)])
    tags_lengths = torch.randint(0, 3, (2 * rows,), generator=gen)
    kjt = KeyedJaggedTensor(
        ["a", "b"],
        torch.randint(0, 50, (int(tags_lengths.sum()),), generator=gen),
        tags_lengths,
        stride=rows,
    )
    return {
        "id": torch.arange(rows, dtype=torch.int64) + 1000 * tag,
        "dense": torch.randn(rows, 3, generator=gen),
        "label": (torch.rand(rows, generator=gen) > 0.5).float(),
        "seq": seq,
        "name": names,
        "sparse": kjt,
        "tag": tag,  # a non-tensor value stays as it is
    }


def assert_leaf_equal(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want.cpu())
    elif isinstance(want, JaggedTensor):
        assert isinstance(got, JaggedTensor)
        assert_leaf_equal(got.values, want.values)
        assert_leaf_equal(got.offsets, want.offsets)
        assert (got.weights is None) == (want.weights is None)
        if want.weights is not None:
            assert_leaf_equal(got.weights, want.weights)
    elif isinstance(want, KeyedJaggedTensor):
        assert isinstance(got, KeyedJaggedTensor)
        assert got.keys() == want.keys() and got.stride() == want.stride()
        assert_leaf_equal(got.values(), want.values())
        assert_leaf_equal(got.lengths(), want.lengths())
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_leaf_equal(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_leaf_equal(g, w)
    else:
        assert got is want


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor inside a batch (through jagged types and containers)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, JaggedTensor):
        out = tensors_of(obj.values) + [obj.offsets]
        return out + ([obj.weights] if obj.weights is not None else [])
    if isinstance(obj, KeyedJaggedTensor):
        return [obj.values(), obj.lengths()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def nested_jagged(gen: torch.Generator, rows: int) -> JaggedTensor:
    """A list<string> column (row -> strings -> bytes); skips if core cannot nest yet."""
    n_strings = torch.randint(0, 3, (rows,), generator=gen)
    strings = JaggedTensor.from_strings([f"s{i}" * (i % 4) for i in range(int(n_strings.sum()))])
    try:
        return JaggedTensor.from_lengths(strings, n_strings)  # type: ignore[arg-type]
    except TypeError:
        pytest.skip("recstack.core's JaggedTensor does not take JaggedTensor values yet")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def mixed_items(gen: torch.Generator) -> list[Any]:
    """Batches of ragged sizes (incl. empty and length-1) with markers between them."""
    return [
        make_batch(gen, 5, tag=0),
        EndOfWindow(0),
        make_batch(gen, 0, tag=1),
        make_batch(gen, 1, tag=2),
        EndOfWindow(1),
        EndOfWindow(2),
        make_batch(gen, 7, tag=3),
    ]


# ---------------------------------------------------------------------- CPU path


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_cpu_passes_batches_and_markers_through_in_order(gen, prefetch) -> None:
    items = mixed_items(gen)
    out = list(to_device(items, "cpu", prefetch=prefetch))
    assert len(out) == len(items)
    for got, want in zip(out, items, strict=True):
        if isinstance(want, EndOfWindow):
            assert got is want
        else:
            assert_leaf_equal(got, want)
            assert all(t.device.type == "cpu" for t in tensors_of(got))


def test_to_device_returns_a_prefetcher() -> None:
    pf = to_device([], torch.device("cpu"), prefetch=2, pin_memory=False)
    assert isinstance(pf, DevicePrefetcher)
    assert pf.device == torch.device("cpu")
    assert list(pf) == []


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_markers_are_handed_out_without_pulling_past_them(gen, prefetch) -> None:
    # A streaming source: the next window's data only exists once the consumer has seen
    # the end of the current one.
    seen_marker = []
    marker = EndOfWindow(0)

    def stream():
        yield make_batch(gen, 2, tag=0)
        yield make_batch(gen, 1, tag=1)
        yield marker
        if not seen_marker:
            raise AssertionError("pulled past the end of the window")
        yield make_batch(gen, 3, tag=2)

    out = []
    for item in to_device(stream(), "cpu", prefetch=prefetch):
        out.append(item)
        if item is marker:
            seen_marker.append(True)
    assert [x if x is marker else x["tag"] for x in out] == [0, 1, marker, 2]


def test_empty_and_single_item_sources(gen) -> None:
    empty = CountingSource([])
    pf = DevicePrefetcher(empty, "cpu", prefetch=2)
    assert list(pf) == []
    assert pf.state_dict() == {"epoch": 0, "position": 0}
    with pytest.raises(StopIteration):
        next(pf)

    batch = make_batch(gen, 1)
    single = CountingSource([batch])
    pf = DevicePrefetcher(single, "cpu", prefetch=2)
    (got,) = list(pf)
    assert_leaf_equal(got, batch)
    assert pf.state_dict() == {"epoch": 0, "position": 1}


def test_batch_to_moves_every_leaf_and_keeps_other_values(gen) -> None:
    Pair = namedtuple("Pair", ["left", "right"])
    batch = make_batch(gen, 4)
    batch["nested"] = {"inner": torch.ones(2), "pair": Pair(torch.zeros(1), "text")}
    batch["list"] = [torch.arange(3), None, (torch.arange(2), 7)]
    marker = EndOfWindow(5)
    batch["marker"] = marker
    moved = batch_to(batch, "meta")
    tensors = tensors_of(moved)
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert len(tensors) == len(tensors_of(batch))
    assert moved["tag"] == 0 and moved["marker"] is marker
    assert isinstance(moved["nested"]["pair"], Pair) and moved["nested"]["pair"].right == "text"
    assert moved["list"][1] is None and moved["list"][2][1] == 7
    assert moved["sparse"].keys() == ["a", "b"] and moved["sparse"].stride() == 4
    # The input is left where it was.
    assert all(t.device.type == "cpu" for t in tensors_of(batch))


def test_prefetcher_moves_batches_to_a_non_cuda_device(gen) -> None:
    items = [make_batch(gen, 3, tag=0), EndOfWindow(0), make_batch(gen, 2, tag=1)]
    out = list(to_device(items, "meta", prefetch=1))
    assert out[1] is items[1]
    for got in (out[0], out[2]):
        assert all(t.device.type == "meta" for t in tensors_of(got))
        assert got["seq"].values.shape == items[0 if got is out[0] else 2]["seq"].values.shape


def test_nested_jagged_values_are_moved(gen) -> None:
    column = nested_jagged(gen, 6)
    batch = {"tags": column, "label": torch.zeros(6)}
    moved = batch_to(batch, "meta")
    assert isinstance(moved["tags"].values, JaggedTensor)
    assert all(t.device.type == "meta" for t in tensors_of(moved))
    (passed,) = list(to_device([batch], "cpu"))
    assert_leaf_equal(passed, batch)


def test_record_batch_stream_skips_cpu_tensors(gen) -> None:
    # Nothing on CUDA: nothing to record, and the stream is never touched.
    record_batch_stream(make_batch(gen, 3), None)  # type: ignore[arg-type]


def test_prefetcher_pulls_ahead_of_the_consumer(gen) -> None:
    source = CountingSource([make_batch(gen, 2, tag=i) for i in range(6)])
    pf = DevicePrefetcher(source, "cpu", prefetch=2)
    it = iter(pf)
    assert source.pulled == 0  # nothing is read before the first next()
    first = next(it)
    assert first["tag"] == 0
    assert source.pulled == 3  # the item handed out plus two in flight
    next(it)
    assert source.pulled == 4


@pytest.mark.parametrize("with_markers", [False, True])
@pytest.mark.parametrize("prefetch", [0, 1, 4])
def test_state_dict_follows_the_consumer_not_the_source(gen, prefetch, with_markers) -> None:
    items = mixed_items(gen)
    if not with_markers:
        items = [item for item in items if isinstance(item, dict)]
    source = CountingSource(items)
    pf = DevicePrefetcher(source, "cpu", prefetch=prefetch)
    assert pf.state_dict() == {"epoch": 0, "position": 0}
    it = iter(pf)
    assert pf.state_dict() == {"epoch": 0, "position": 0}
    for k in range(1, len(items) + 1):
        next(it)
        assert pf.state_dict() == {"epoch": 0, "position": k}
        if with_markers:  # the source is never pulled past a marker
            assert k <= source.position <= min(k + prefetch, len(items))
        else:
            assert source.position == min(k + prefetch, len(items))
    with pytest.raises(StopIteration):
        next(it)
    assert pf.state_dict() == {"epoch": 0, "position": len(items)}


def test_state_dict_is_a_copy(gen) -> None:
    source = CountingSource([make_batch(gen, 1), make_batch(gen, 1)])
    pf = DevicePrefetcher(source, "cpu")
    next(iter(pf))
    state = pf.state_dict()
    state["position"] = 99
    assert pf.state_dict() == {"epoch": 0, "position": 1}


def test_load_state_dict_resumes_in_a_new_prefetcher(gen) -> None:
    items = [make_batch(gen, r, tag=i) for i, r in enumerate([3, 0, 1, 5, 2, 4])]
    first = DevicePrefetcher(CountingSource(items), "cpu", prefetch=3)
    it = iter(first)
    for _ in range(3):
        next(it)
    saved = first.state_dict()
    assert saved == {"epoch": 0, "position": 3}

    source = CountingSource(items)
    resumed = DevicePrefetcher(source, "cpu", prefetch=3)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == {"epoch": 0, "position": 3}
    rest = list(resumed)
    assert [b["tag"] for b in rest] == [3, 4, 5]
    for got, want in zip(rest, items[3:], strict=True):
        assert_leaf_equal(got, want)


def test_load_state_dict_drops_what_was_prefetched(gen) -> None:
    items = [make_batch(gen, 2, tag=i) for i in range(8)]
    source = CountingSource(items)
    pf = DevicePrefetcher(source, "cpu", prefetch=2)
    it = iter(pf)
    next(it), next(it)
    saved = pf.state_dict()
    for _ in range(3):
        next(it)
    pf.load_state_dict(saved)
    # next() without iter() continues from the loaded state, not from the prefetch queue.
    assert next(pf)["tag"] == 2
    assert pf.state_dict() == {"epoch": 0, "position": 3}
    # iter() after a next(): a new pass, the source's next epoch.
    assert [b["tag"] for b in pf] == list(range(8))
    assert pf.state_dict() == {"epoch": 1, "position": 8}
    pf.load_state_dict({"epoch": 4, "position": 6})
    assert [b["tag"] for b in pf] == [6, 7]
    assert pf.state_dict() == {"epoch": 4, "position": 8}


def test_state_needs_a_resumable_source(gen) -> None:
    pf = DevicePrefetcher([make_batch(gen, 1)], "cpu")
    with pytest.raises(TypeError, match="no state_dict"):
        pf.state_dict()
    with pytest.raises(TypeError, match="no load_state_dict"):
        pf.load_state_dict({"position": 0})
    assert len(list(pf)) == 1  # still iterable


def test_iterating_again_starts_a_new_pass(gen) -> None:
    items = [make_batch(gen, 1, tag=i) for i in range(4)]
    source = CountingSource(items)
    pf = DevicePrefetcher(source, "cpu", prefetch=2)
    assert [b["tag"] for b in pf] == [0, 1, 2, 3]
    assert [b["tag"] for b in pf] == [0, 1, 2, 3]
    assert source.epoch == 1 and source.iter_calls == 2

    for batch in pf:  # stop early: the next pass still starts from the top
        if batch["tag"] == 1:
            break
    assert pf.state_dict() == {"epoch": 2, "position": 2}
    assert [b["tag"] for b in pf] == [0, 1, 2, 3]
    assert source.epoch == 3


def test_iter_of_a_fresh_pass_does_not_skip_an_epoch(gen) -> None:
    source = CountingSource([make_batch(gen, 1, tag=i) for i in range(3)])
    pf = DevicePrefetcher(source, "cpu")
    it = iter(pf)
    assert [b["tag"] for b in it] == [0, 1, 2]  # `for` calls iter(it) once more
    assert source.iter_calls == 1 and source.epoch == 0


@pytest.mark.parametrize("prefetch", [0, 1, 5])
def test_source_error_reaches_the_consumer_at_its_position(gen, prefetch) -> None:
    items = [make_batch(gen, 2, tag=i) for i in range(6)]
    source = CountingSource(items, fail_at=3)
    pf = DevicePrefetcher(source, "cpu", prefetch=prefetch)
    it = iter(pf)
    assert [next(it)["tag"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad row group at item 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    # The saved position is the failing item's, so a resume retries it.
    state = pf.state_dict()
    assert state == {"epoch": 0, "position": 3}
    source.fail_at = None
    pf.load_state_dict(state)
    assert [b["tag"] for b in pf] == [3, 4, 5]


def test_first_item_error_and_error_after_markers(gen) -> None:
    source = CountingSource([EndOfWindow(0)], fail_at=0)
    pf = DevicePrefetcher(source, "cpu", prefetch=2)
    with pytest.raises(RuntimeError, match="item 0"):
        next(iter(pf))
    assert pf.state_dict() == {"epoch": 0, "position": 0}

    marker = EndOfWindow(1)
    source = CountingSource([marker, make_batch(gen, 1), EndOfWindow(2)], fail_at=2)
    out = []
    with pytest.raises(RuntimeError, match="item 2"):
        for item in DevicePrefetcher(source, "cpu", prefetch=3):
            out.append(item)
    assert len(out) == 2 and out[0] is marker


class FailingMove(JaggedTensor):
    """A jagged column whose move fails, as a copy to a full device would."""

    def to(self, device, non_blocking=False):  # type: ignore[override]
        raise MemoryError("no room for this batch")


def test_move_error_reaches_the_consumer_at_its_position(gen) -> None:
    bad = {"seq": FailingMove(torch.arange(3), torch.tensor([0, 3]))}
    items = [make_batch(gen, 1, tag=0), make_batch(gen, 1, tag=1), bad, make_batch(gen, 1)]
    pf = DevicePrefetcher(CountingSource(items), "cpu", prefetch=3)
    it = iter(pf)
    assert [next(it)["tag"] for _ in range(2)] == [0, 1]
    with pytest.raises(MemoryError, match="no room"):
        next(it)
    assert pf.state_dict() == {"epoch": 0, "position": 2}


@pytest.mark.parametrize("prefetch", [-1, True, 1.5, "2"])
def test_bad_prefetch_is_rejected(prefetch) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        DevicePrefetcher([], "cpu", prefetch=prefetch)


def test_source_must_be_iterable() -> None:
    with pytest.raises(TypeError, match="iterable"):
        DevicePrefetcher(42, "cpu")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- CUDA path


def _random_batches(seed: int, count: int, rows: list[int]) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(gen, rows[i % len(rows)], tag=i) for i in range(count)]


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 1, 3])
@pytest.mark.parametrize("pin_memory", [True, False])
def test_gpu_batches_arrive_on_cuda_with_equal_values(prefetch, pin_memory) -> None:
    items: list[Any] = _random_batches(0, 6, [5, 0, 1, 17])
    items.insert(2, EndOfWindow(0))
    out = list(to_device(items, "cuda", prefetch=prefetch, pin_memory=pin_memory))
    torch.cuda.synchronize()
    assert len(out) == len(items)
    for got, want in zip(out, items, strict=True):
        if isinstance(want, EndOfWindow):
            assert got is want
            continue
        assert all(t.is_cuda for t in tensors_of(got))
        assert_leaf_equal(got, want)


@pytest.mark.gpu
def test_gpu_pin_batch() -> None:
    (batch,) = _random_batches(1, 1, [9])
    on_gpu = torch.ones(3, device="cuda")
    batch["on_gpu"] = on_gpu
    pinned = pin_batch(batch)
    for t in tensors_of(pinned):
        assert t.is_cuda or t.is_pinned() or t.numel() == 0
    assert pinned["on_gpu"] is on_gpu
    assert pinned["tag"] == batch["tag"]
    assert_leaf_equal(pinned, batch)
    again = pin_batch(pinned)
    assert again["dense"] is pinned["dense"]  # already pinned: no copy
    assert again["seq"].offsets is pinned["seq"].offsets


@pytest.mark.gpu
def test_gpu_already_pinned_source_batches() -> None:
    items = [pin_batch(b) for b in _random_batches(2, 4, [3, 8])]
    out = list(to_device(items, "cuda", prefetch=2, pin_memory=True))
    torch.cuda.synchronize()
    for got, want in zip(out, items, strict=True):
        assert_leaf_equal(got, want)


def _busy(matmuls: int = 8) -> torch.Tensor:
    """Queue tens of milliseconds of matmuls on the current stream."""
    a = torch.randn(4096, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")
    c = a
    for _ in range(matmuls):
        c = torch.mm(a, b)
    return c


@pytest.mark.gpu
@pytest.mark.parametrize("consumer", ["default", "side"])
def test_gpu_correct_under_a_busy_compute_stream(consumer) -> None:
    items = _random_batches(3, 12, [64, 1, 33])
    stream = torch.cuda.current_stream() if consumer == "default" else torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pf = to_device(items, "cuda", prefetch=2)
        _busy()
        results = []
        for batch in pf:
            # Read every tensor on the consumer stream, behind the matmuls.
            results.append([t.clone() for t in tensors_of(batch)])
            _busy(2)
    torch.cuda.synchronize()
    for got, want in zip(results, items, strict=True):
        expected = tensors_of(want)
        assert len(got) == len(expected)
        for g, w in zip(got, expected, strict=True):
            assert torch.equal(g.cpu(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 1])
def test_gpu_consumer_stream_waits_for_the_copy(prefetch) -> None:
    # Copies of 64 MiB take milliseconds; the consumer reads each batch the moment next()
    # returns, so it would see unwritten memory if its stream did not wait for the copy.
    gen = torch.Generator().manual_seed(7)
    items = [{"x": torch.randn(1 << 24, generator=gen)} for _ in range(3)]
    copies = [batch["x"].clone() for batch in to_device(items, "cuda", prefetch=prefetch)]
    torch.cuda.synchronize()
    for got, want in zip(copies, items, strict=True):
        assert torch.equal(got.cpu(), want["x"])


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [1, 2])
def test_gpu_freed_batches_are_not_reused_while_the_compute_stream_reads_them(prefetch) -> None:
    # Same-size batches, so a freed copy buffer is an exact fit for the next copy. The
    # consumer drops each batch right after queueing a slow read of it; without
    # record_stream the allocator would hand its memory to a later copy, which the side
    # stream would write before the compute stream had read it.
    gen = torch.Generator().manual_seed(4)
    rows, steps = 1 << 18, 40
    items = [
        {
            "x": torch.randn(rows, generator=gen),
            "seq": JaggedTensor.from_lengths(
                torch.randint(0, 1 << 30, (rows,), generator=gen),
                torch.ones(rows, dtype=torch.int64),
            ),
        }
        for _ in range(steps)
    ]
    outs = []
    for batch in to_device(items, "cuda", prefetch=prefetch):
        torch.cuda._sleep(2_000_000)  # ~1 ms: the compute stream is behind the copies
        outs.append((batch["x"] * 1, batch["seq"].values + 0))
        del batch
    torch.cuda.synchronize()
    for (x, values), want in zip(outs, items, strict=True):
        assert torch.equal(x.cpu(), want["x"])
        assert torch.equal(values.cpu(), want["seq"].values)


@pytest.mark.gpu
def test_gpu_state_and_markers_follow_the_consumer() -> None:
    items: list[Any] = _random_batches(5, 5, [4])
    items.insert(1, EndOfWindow(0))
    source = CountingSource(items)
    pf = DevicePrefetcher(source, "cuda", prefetch=2)
    it = iter(pf)
    assert next(it)["tag"] == 0
    assert next(it) is items[1]
    assert pf.state_dict() == {"epoch": 0, "position": 2}
    saved = pf.state_dict()
    next(it)
    pf.load_state_dict(saved)
    rest = list(pf)
    torch.cuda.synchronize()
    assert [b["tag"] for b in rest] == [1, 2, 3, 4]
    for got, want in zip(rest, items[2:], strict=True):
        assert_leaf_equal(got, want)


@pytest.mark.gpu
def test_gpu_nested_jagged_moved() -> None:
    gen = torch.Generator().manual_seed(6)
    batches = [{"tags": nested_jagged(gen, r), "label": torch.ones(r)} for r in (5, 0, 1)]
    out = list(to_device(batches, "cuda", prefetch=1))
    torch.cuda.synchronize()
    for got, want in zip(out, batches, strict=True):
        assert all(t.is_cuda for t in tensors_of(got))
        assert_leaf_equal(got, want)


@pytest.mark.gpu
def test_gpu_pin_batch_packs_one_block_and_moves_in_one_copy() -> None:
    gen = torch.Generator().manual_seed(11)
    batch = {
        "x": torch.randn(33, generator=gen),
        "vec": torch.randint(0, 9, (33, 3), generator=gen, dtype=torch.int32),
        "tags": nested_jagged(gen, 33),
        "empty": torch.empty(0, dtype=torch.int64),
        "sparse": KeyedJaggedTensor(
            ["a", "b"], torch.arange(5), torch.tensor([1, 0, 2, 2]), stride=2
        ),
    }
    packed = pin_batch(batch)
    host = [t for t in _all_tensors(packed) if t.numel() > 0]
    assert len({t.untyped_storage().data_ptr() for t in host}) == 1
    assert all(t.is_pinned() for t in host)
    assert pin_batch(packed) is packed  # already packed: no second copy
    assert_leaf_equal(packed["tags"], batch["tags"])
    moved = next(iter(to_device([packed], "cuda", prefetch=1)))
    torch.cuda.synchronize()
    dev = [t for t in _all_tensors(moved) if t.numel() > 0]
    assert all(t.is_cuda for t in dev)
    assert len({t.untyped_storage().data_ptr() for t in dev}) == 1
    for key in batch:
        assert_leaf_equal(moved[key], batch[key])


def _all_tensors(batch: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for leaf in batch.values():
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        else:
            leaf.map_tensors(lambda t: out.append(t) or t)
    return out
