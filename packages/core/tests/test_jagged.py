"""JaggedTensor: constructors, padding/truncation against a per-row Python reference, views,
strings (nested rows too), validation and device movement."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recstack.core.jagged import JaggedTensor

HAS_CUDA = torch.cuda.is_available()
SIDES = ["left", "right"]


# ---------------------------------------------------------------------- helpers


def random_rows(
    gen: torch.Generator,
    batch: int,
    max_len: int,
    trailing: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """``batch`` CPU rows of random lengths in [0, max_len] (zeros are common)."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
    rows = []
    for n in lengths:
        if dtype.is_floating_point:
            rows.append(torch.randn((n, *trailing), generator=gen).to(dtype))
        else:
            rows.append(torch.randint(-1000, 1000, (n, *trailing), generator=gen).to(dtype))
    return rows


def make_jagged(
    rows: list[torch.Tensor],
    device: torch.device,
    weights: list[torch.Tensor] | None = None,
    trailing: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> JaggedTensor:
    values = torch.cat(rows) if rows else torch.empty((0, *trailing), dtype=dtype)
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    w = None
    if weights is not None:
        w = (torch.cat(weights) if weights else torch.empty(0)).to(device)
    return JaggedTensor.from_lengths(values.to(device), lengths.to(device), w)


def reference_padded(
    rows: list[torch.Tensor],
    max_len: int,
    pad_value: float,
    side: str,
    truncate: str,
    trailing: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain per-row Python padding: the semantics to_padded must match."""
    out = torch.full((len(rows), max_len, *trailing), pad_value, dtype=dtype)
    for b, row in enumerate(rows):
        if row.shape[0] > max_len:
            row = row[row.shape[0] - max_len :] if truncate == "left" else row[:max_len]
        k = row.shape[0]
        if side == "right":
            out[b, :k] = row
        else:
            out[b, max_len - k :] = row
    return out


def reference_from_padded(
    padded: torch.Tensor, lengths: list[int], side: str
) -> list[torch.Tensor]:
    width = padded.shape[1]
    rows = []
    for b, n in enumerate(lengths):
        rows.append(padded[b, :n] if side == "right" else padded[b, width - n :])
    return rows


def assert_rows(jt: JaggedTensor, rows: list[torch.Tensor]) -> None:
    assert len(jt) == len(rows)
    assert jt.lengths().tolist() == [r.shape[0] for r in rows]
    for b, row in enumerate(rows):
        got = jt[b].cpu()
        assert got.shape == row.shape
        assert torch.equal(got, row.to(got.dtype))


# ---------------------------------------------------------------------- constructor


def test_constructor_basic_and_int32_offsets(device):
    values = torch.tensor([5, 6, 7], device=device)
    jt = JaggedTensor(values, torch.tensor([0, 2, 2, 3], dtype=torch.int32, device=device))
    assert jt.offsets.dtype == torch.int64
    assert jt.values is values
    assert jt.weights is None and jt.weights_or_none() is None
    assert len(jt) == 3
    assert jt.numel() == 3
    assert jt.lengths().tolist() == [2, 0, 1]
    assert jt.lengths().dtype == torch.int64
    assert jt.device == values.device and jt.dtype == torch.int64
    assert jt.to_list() == [[5, 6], [], [7]]
    r = repr(jt)
    assert r.startswith("JaggedTensor(batch=3") and len(r) < 120


def test_constructor_empty_batch(device):
    jt = JaggedTensor(
        torch.empty(0, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    )
    assert len(jt) == 0 and jt.numel() == 0
    assert jt.lengths().shape == (0,)
    assert jt.to_list() == [] and jt.unbind() == []
    assert jt.to_padded().shape == (0, 0)
    assert jt.to_padded(max_len=4).shape == (0, 4)
    jt.validate()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"values": [1, 2], "offsets": torch.tensor([0, 2])}, TypeError, "values"),
        ({"values": torch.tensor(1), "offsets": torch.tensor([0, 1])}, ValueError, "at least 1"),
        ({"values": torch.ones(2), "offsets": torch.tensor([[0, 2]])}, ValueError, "offsets.*1-D"),
        ({"values": torch.ones(2), "offsets": torch.tensor([0.0, 2.0])}, TypeError, "offsets.*int"),
        ({"values": torch.ones(2), "offsets": torch.tensor([0, 2]).bool()}, TypeError, "offsets"),
        (
            {"values": torch.ones(2), "offsets": torch.empty(0, dtype=torch.int64)},
            ValueError,
            r"B \+ 1",
        ),
        (
            {"values": torch.ones(2), "offsets": torch.tensor([0, 2]), "weights": torch.ones(3)},
            ValueError,
            "weights.*one entry per item",
        ),
        (
            {"values": torch.ones(2), "offsets": torch.tensor([0, 2]), "weights": torch.ones(2, 1)},
            ValueError,
            "weights",
        ),
        (
            {"values": torch.ones(2, device="meta"), "offsets": torch.tensor([0, 2])},
            ValueError,
            "one device.*values on meta.*offsets on cpu",
        ),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        JaggedTensor(**kwargs)


@pytest.mark.gpu
def test_cheap_paths_never_sync():
    """Constructors, offsets and padding to a known width must not wait on the GPU."""
    device = torch.device("cuda")
    values = torch.arange(10, device=device, dtype=torch.float32)
    lengths = torch.tensor([3, 0, 7], device=device)
    weights = torch.rand(10, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        jt = JaggedTensor.from_lengths(values, lengths, weights)
        jt = JaggedTensor(jt.values, jt.offsets.to(torch.int32), jt.weights)
        jt.lengths()
        jt.to_padded(max_len=4, side="left", truncate="left")
        jt.to_padded_weights(max_len=4)
        jt.padding_mask(max_len=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------- from_lengths / validate


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [0, 1, 5, 33])
def test_from_lengths_matches_rows(device, seed, batch):
    gen = torch.Generator().manual_seed(1000 + seed * 7 + batch)
    rows = random_rows(gen, batch, 6)
    w_rows = [torch.rand(r.shape[0], generator=gen) for r in rows]
    values = torch.cat(rows) if rows else torch.empty(0)
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int32)  # stays on the CPU
    weights = torch.cat(w_rows) if w_rows else torch.empty(0)
    jt = JaggedTensor.from_lengths(values.to(device), lengths, weights.to(device))
    assert jt.offsets.device == jt.values.device and jt.offsets.dtype == torch.int64
    jt.validate()
    assert_rows(jt, rows)
    assert jt.numel() == values.shape[0]
    assert torch.equal(jt.weights.cpu(), weights)


def test_from_lengths_errors():
    with pytest.raises(TypeError, match="lengths.*integer"):
        JaggedTensor.from_lengths(torch.ones(2), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="lengths.*1-D"):
        JaggedTensor.from_lengths(torch.ones(2), torch.tensor([[1, 1]]))
    with pytest.raises(TypeError, match="values"):
        JaggedTensor.from_lengths([1, 2], torch.tensor([2]))


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        ([1, 2, 4], r"offsets\[0\] must be 0"),
        ([0, 3, 2, 4], "non-decreasing"),
        ([0, 2, 3], r"offsets\[-1\]=3 must equal the number of items in values \(4\)"),
        ([0, 2, 5], r"offsets\[-1\]=5"),
    ],
)
def test_validate_errors(device, offsets, match):
    jt = JaggedTensor(torch.arange(4, device=device), torch.tensor(offsets, device=device))
    with pytest.raises(ValueError, match=match):
        jt.validate()


def test_validate_weights_replaced_after_construction(device):
    jt = JaggedTensor(torch.arange(4, device=device), torch.tensor([0, 4], device=device))
    assert jt.validate() is jt
    jt.weights = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="weights"):
        jt.validate()


# ---------------------------------------------------------------------- to_padded


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("truncate", SIDES)
@pytest.mark.parametrize("max_len", [None, 0, 1, 3, 9])
@pytest.mark.parametrize(
    ("batch", "trailing", "dtype"),
    [
        (0, (), torch.float32),
        (1, (), torch.int64),
        (7, (), torch.float32),
        (13, (3,), torch.float32),
        (5, (2, 2), torch.int32),
    ],
)
def test_to_padded_matches_reference(device, side, truncate, max_len, batch, trailing, dtype):
    seed = zlib.crc32(repr((side, truncate, max_len, batch, trailing)).encode())
    gen = torch.Generator().manual_seed(seed)
    rows = random_rows(gen, batch, 6, trailing, dtype)
    w_rows = [torch.rand(r.shape[0], generator=gen) for r in rows]
    jt = make_jagged(rows, device, w_rows, trailing, dtype)
    pad = -7
    width = max_len if max_len is not None else max((r.shape[0] for r in rows), default=0)

    got = jt.to_padded(max_len=max_len, pad_value=pad, side=side, truncate=truncate)
    want = reference_padded(rows, width, pad, side, truncate, trailing, dtype)
    assert got.device == jt.device and got.dtype == dtype
    assert got.shape == want.shape
    assert torch.equal(got.cpu(), want)

    got_w = jt.to_padded_weights(max_len=max_len, pad_value=0.5, side=side, truncate=truncate)
    want_w = reference_padded(w_rows, width, 0.5, side, truncate, (), torch.float32)
    assert torch.equal(got_w.cpu(), want_w)

    mask = jt.padding_mask(max_len=max_len, side=side)
    kept = [min(r.shape[0], width) for r in rows]
    want_mask = reference_padded(
        [torch.ones(k, dtype=torch.bool) for k in kept], width, False, side, "right", (), torch.bool
    )
    assert torch.equal(mask.cpu(), want_mask)


def test_to_padded_keeps_most_recent_items(device):
    jt = JaggedTensor.from_list([[1, 2, 3, 4, 5], [6], []], device=device)
    assert jt.to_padded(3, side="left", truncate="left").tolist() == [
        [3, 4, 5],
        [0, 0, 6],
        [0, 0, 0],
    ]
    assert jt.to_padded(3, pad_value=-1, side="right", truncate="right").tolist() == [
        [1, 2, 3],
        [6, -1, -1],
        [-1, -1, -1],
    ]
    assert jt.to_padded(2, side="right", truncate="left").tolist() == [[4, 5], [6, 0], [0, 0]]
    assert jt.to_padded(2, side="left", truncate="right").tolist() == [[1, 2], [0, 6], [0, 0]]


def test_to_padded_all_rows_empty(device):
    jt = JaggedTensor.from_lengths(
        torch.empty(0, 4, device=device), torch.zeros(3, dtype=torch.int64)
    )
    assert torch.equal(jt.to_padded(pad_value=1.0).cpu(), torch.empty(3, 0, 4))
    assert torch.equal(jt.to_padded(max_len=2, pad_value=1.0).cpu(), torch.ones(3, 2, 4))


def test_to_padded_errors(device):
    jt = JaggedTensor.from_list([[1, 2], [3]], dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        jt.to_padded(side="middle")
    with pytest.raises(ValueError, match="truncate must be 'left' or 'right'"):
        jt.to_padded(truncate="up")
    with pytest.raises(ValueError, match="max_len"):
        jt.to_padded(max_len=-1)
    with pytest.raises(ValueError, match="max_len"):
        jt.to_padded(max_len=2.5)
    with pytest.raises(ValueError, match="pad_value=0.5 cannot be stored in a torch.int64"):
        jt.to_padded(pad_value=0.5)
    u8 = JaggedTensor.from_strings(["ab"], device=device)
    with pytest.raises(ValueError, match="pad_value=300"):
        u8.to_padded(pad_value=300)
    with pytest.raises(ValueError, match="no weights"):
        jt.to_padded_weights()


@pytest.mark.parametrize(
    ("dtype", "pad"),
    [
        (torch.int64, 2**63 - 1),
        (torch.int64, -(2**63)),
        (torch.int64, 2**53 + 1),
        (torch.int32, 2**31 - 1),
        (torch.uint8, 255),
    ],
)
def test_to_padded_accepts_every_integer_of_the_dtype(device, dtype, pad):
    # Bounds checked through float64 rejected int64 pads above 2**53.
    jt = JaggedTensor.from_list([[1]], dtype=dtype, device=device)
    assert jt.to_padded(2, pad_value=pad).tolist() == [[1, pad]]


@pytest.mark.parametrize(
    ("pad", "shown"),
    [
        (2**63, "pad_value=9223372036854775808"),
        (-(2**63) - 1, "pad_value=-9223372036854775809"),
        (2.0**63, "pad_value=9.223372036854776e\\+18"),
        (float("nan"), "pad_value=nan"),
        (float("inf"), "pad_value=inf"),
    ],
)
def test_to_padded_rejects_values_outside_int64(device, pad, shown):
    jt = JaggedTensor.from_list([[1]], dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=f"{shown} cannot be stored in a torch.int64 tensor"):
        jt.to_padded(2, pad_value=pad)


def test_to_padded_weights_checks_integer_weights_exactly(device):
    jt = JaggedTensor(
        torch.tensor([1], device=device),
        torch.tensor([0, 1], device=device),
        weights=torch.tensor([7], dtype=torch.int64, device=device),
    )
    assert jt.to_padded_weights(2, pad_value=2**63 - 1).tolist() == [[7, 2**63 - 1]]
    with pytest.raises(ValueError, match="pad_value=9223372036854775808 cannot be stored"):
        jt.to_padded_weights(2, pad_value=2**63)


# ---------------------------------------------------------------------- from_padded


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("batch", "width", "trailing"), [(0, 4, ()), (1, 1, ()), (6, 5, (3,))])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_padded_matches_reference(device, side, batch, width, trailing, seed):
    gen = torch.Generator().manual_seed(500 + seed * 31 + batch * 7 + width)
    padded = torch.randn((batch, width, *trailing), generator=gen)
    w_padded = torch.rand((batch, width), generator=gen)
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    if batch:
        lengths[0] = width  # a full row
    jt = JaggedTensor.from_padded(
        padded.to(device), lengths.to(device), side=side, weights=w_padded.to(device)
    )
    jt.validate()
    assert_rows(jt, reference_from_padded(padded, lengths.tolist(), side))
    want_w = reference_from_padded(w_padded, lengths.tolist(), side)
    got_w = jt.weights.cpu()
    assert torch.equal(got_w, torch.cat(want_w) if want_w else torch.empty(0))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_padded_round_trips(device, side, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = random_rows(gen, 9, 5, (2,))
    w_rows = [torch.rand(r.shape[0], generator=gen) for r in rows]
    jt = make_jagged(rows, device, w_rows, (2,))
    longest = max(r.shape[0] for r in rows)
    for width in (longest, longest + 3):
        padded = jt.to_padded(max_len=width, side=side)
        w_padded = jt.to_padded_weights(max_len=width, side=side)
        back = JaggedTensor.from_padded(padded, jt.lengths(), side=side, weights=w_padded)
        assert torch.equal(back.offsets, jt.offsets)
        assert torch.equal(back.values, jt.values)
        assert torch.equal(back.weights, jt.weights)
        # and the other way round: padding again reproduces the padded tensor
        assert torch.equal(back.to_padded(max_len=width, side=side), padded)


def test_from_padded_errors(device):
    padded = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="a length of 4 exceeds the padded width L=3"):
        JaggedTensor.from_padded(padded, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        JaggedTensor.from_padded(padded, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="lengths has 3 entries but padded has 2 rows"):
        JaggedTensor.from_padded(padded, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"padded must be \[B, L, \*trailing\]"):
        JaggedTensor.from_padded(torch.zeros(3, device=device), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="side must be"):
        JaggedTensor.from_padded(padded, torch.tensor([1, 1]), side="top")
    with pytest.raises(ValueError, match=r"weights must be \[B, L\]"):
        JaggedTensor.from_padded(padded, torch.tensor([1, 1]), weights=torch.ones(2, 2))


# ---------------------------------------------------------------------- lists and strings


def test_from_list_and_to_list(device):
    rows = [[1, 2, 3], [], [4], [5, 6]]
    jt = JaggedTensor.from_list(rows, dtype=torch.int32, device=device)
    assert jt.dtype == torch.int32 and jt.device.type == device.type
    assert jt.to_list() == rows
    assert JaggedTensor.from_list(jt.to_list(), dtype=torch.int32).to_list() == rows

    floats = JaggedTensor.from_list([[0.5], [1.5, 2.5]])
    assert floats.dtype == torch.float32 and floats.to_list() == [[0.5], [1.5, 2.5]]

    seqs = JaggedTensor.from_list([[[1, 2], [3, 4]], [], [[5, 6]]], dtype=torch.float64)
    assert seqs.values.shape == (3, 2)
    assert seqs.to_list() == [[[1, 2], [3, 4]], [], [[5, 6]]]
    assert seqs.lengths().tolist() == [2, 0, 1]


def test_from_list_of_tensors(device):
    rows = [torch.arange(3), torch.arange(0), torch.arange(2) + 10]
    jt = JaggedTensor.from_list(rows, dtype=torch.float32, device=device)
    assert jt.dtype == torch.float32
    assert jt.to_list() == [[0.0, 1.0, 2.0], [], [10.0, 11.0]]
    # from_list accepts what unbind gives back
    assert JaggedTensor.from_list(jt.unbind()).to_list() == jt.to_list()


def test_from_list_empty(device):
    jt = JaggedTensor.from_list([], dtype=torch.int64, device=device)
    assert len(jt) == 0 and jt.dtype == torch.int64 and jt.to_list() == []
    jt = JaggedTensor.from_list([[], []], dtype=torch.int64, device=device)
    assert len(jt) == 2 and jt.numel() == 0 and jt.to_list() == [[], []]


@pytest.mark.parametrize(
    "strings",
    [
        [],
        [""],
        ["hello", "", "wörld", "日本語", "🙂 emoji"],
        ["a" * 300, "b"],
    ],
)
def test_strings_round_trip(device, strings):
    jt = JaggedTensor.from_strings(strings, device=device)
    assert jt.dtype == torch.uint8 and jt.values.dim() == 1
    assert len(jt) == len(strings)
    assert jt.lengths().tolist() == [len(s.encode("utf-8")) for s in strings]
    assert jt.to_strings() == strings
    jt.validate()


def test_strings_from_bytes_and_errors(device):
    jt = JaggedTensor.from_strings([b"ab", "c", bytearray(b"")], device=device)
    assert jt.to_strings() == ["ab", "c", ""]
    bad = JaggedTensor.from_strings([b"\xff\xfe"], device=device)
    with pytest.raises(UnicodeDecodeError):
        bad.to_strings()
    assert bad.to_strings(errors="replace") == ["\ufffd\ufffd"]
    with pytest.raises(TypeError, match="item 1 is a int"):
        JaggedTensor.from_strings(["a", 3])
    with pytest.raises(TypeError, match="to_strings needs 1-D uint8"):
        JaggedTensor.from_list([[1]], dtype=torch.int64).to_strings()


# ---------------------------------------------------------------------- indexing and views


def test_getitem_rows_and_slices(device):
    gen = torch.Generator().manual_seed(77)
    rows = random_rows(gen, 8, 4, (2,))
    rows[3] = torch.empty(0, 2)
    rows[4] = torch.randn(1, 2, generator=gen)
    w_rows = [torch.rand(r.shape[0], generator=gen) for r in rows]
    jt = make_jagged(rows, device, w_rows, (2,))
    for b in range(8):
        assert torch.equal(jt[b].cpu(), rows[b])
        assert torch.equal(jt[b - 8].cpu(), rows[b])
        assert jt[b].untyped_storage().data_ptr() == jt.values.untyped_storage().data_ptr()
    assert torch.equal(jt[torch.tensor(2)].cpu(), rows[2])

    for start, stop in [(0, 8), (2, 5), (3, 4), (5, 5), (6, 100), (-3, None)]:
        sub = jt[start:stop]
        want = rows[start:stop]
        sub.validate()
        assert_rows(sub, want)
        want_w = torch.cat(w_rows[start:stop]) if want else torch.empty(0)
        assert torch.equal(sub.weights.cpu(), want_w)
        if sub.numel():
            assert sub.values.untyped_storage().data_ptr() == jt.values.untyped_storage().data_ptr()


def test_getitem_errors(device):
    jt = JaggedTensor.from_list([[1], [2, 3]], device=device)
    with pytest.raises(IndexError, match="row 2 out of range for a batch of 2"):
        jt[2]
    with pytest.raises(IndexError, match="row -3"):
        jt[-3]
    with pytest.raises(ValueError, match="step 1"):
        jt[::2]
    with pytest.raises(TypeError, match="int or slice"):
        jt["a"]
    with pytest.raises(TypeError, match="int or slice"):
        jt[True]
    with pytest.raises(IndexError):
        JaggedTensor.from_list([], dtype=torch.int64)[0]


def test_unbind_and_iter(device):
    rows = [[1.0, 2.0], [], [3.0]]
    jt = JaggedTensor.from_list(rows, device=device)
    parts = jt.unbind()
    assert [p.tolist() for p in parts] == rows
    assert [p.tolist() for p in jt] == rows


# ---------------------------------------------------------------------- device movement


def test_to_and_cpu_carry_weights(device):
    jt = JaggedTensor.from_lengths(
        torch.arange(6, dtype=torch.float32), torch.tensor([2, 0, 4]), torch.rand(6)
    )
    moved = jt.to(device)
    assert moved.values.device.type == device.type
    assert moved.offsets.device == moved.values.device == moved.weights.device
    back = moved.cpu()
    assert back.device.type == "cpu"
    assert torch.equal(back.values, jt.values) and torch.equal(back.weights, jt.weights)
    assert torch.equal(back.offsets, jt.offsets)
    assert not back.is_pinned()
    back.record_stream(None)  # CPU tensors: nothing to record


@pytest.mark.skipif(not HAS_CUDA, reason="pinning memory needs CUDA")
def test_pin_memory_and_non_blocking_copy():
    jt = JaggedTensor.from_lengths(torch.arange(6), torch.tensor([2, 0, 4]), torch.rand(6))
    pinned = jt.pin_memory()
    assert pinned.is_pinned() and not jt.is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    stream = torch.cuda.Stream()
    on_gpu.record_stream(stream)
    torch.cuda.synchronize()
    assert on_gpu.values.is_cuda and on_gpu.offsets.is_cuda and on_gpu.weights.is_cuda
    assert torch.equal(on_gpu.cpu().values, jt.values)
    assert torch.equal(on_gpu.cpu().weights, jt.weights)
    assert on_gpu.cuda().device == on_gpu.device


# ---------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), max_size=8),
    max_len=st.one_of(st.none(), st.integers(0, 7)),
    side=st.sampled_from(SIDES),
    truncate=st.sampled_from(SIDES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_padding(lengths, max_len, side, truncate, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 100, (n,), generator=gen) for n in lengths]
    jt = make_jagged(rows, torch.device("cpu"), dtype=torch.int64)
    width = max_len if max_len is not None else max(lengths, default=0)
    got = jt.to_padded(max_len=max_len, side=side, truncate=truncate)
    assert torch.equal(got, reference_padded(rows, width, 0, side, truncate, (), torch.int64))
    # Padding a row set that fits, then un-padding, is the identity.
    if all(n <= width for n in lengths):
        back = JaggedTensor.from_padded(got, jt.lengths(), side=side)
        assert torch.equal(back.values, jt.values) and torch.equal(back.offsets, jt.offsets)


# Nested JaggedTensor: rows of strings, each string a row of bytes (list<string> columns).

NESTED_ROWS = [["a", "bb"], [], ["ccc"], ["", "d", "ee"]]


def test_from_string_lists_round_trips() -> None:
    jt = JaggedTensor.from_string_lists(NESTED_ROWS)
    assert jt.is_nested and len(jt) == 4 and jt.numel() == 6
    assert jt.lengths().tolist() == [2, 0, 1, 3]
    assert jt.values.to_strings() == ["a", "bb", "ccc", "", "d", "ee"]
    assert jt.to_strings() == NESTED_ROWS
    assert jt.validate() is jt


@pytest.mark.parametrize("rows", [[], [[]], [["x"]], [[], []]])
def test_empty_and_length_one(rows: list[list[str]]) -> None:
    jt = JaggedTensor.from_string_lists(rows)
    assert jt.to_strings() == rows
    assert len(jt) == len(rows)


def test_slicing_rows_and_to_list() -> None:
    jt = JaggedTensor.from_string_lists(NESTED_ROWS)
    assert jt[1:4].to_strings() == NESTED_ROWS[1:4]
    assert jt[3].to_strings() == NESTED_ROWS[3]
    assert [r.to_strings() for r in jt.unbind()] == NESTED_ROWS
    assert jt.to_list()[0] == [[97], [98, 98]]


def test_move_keeps_nesting() -> None:
    jt = JaggedTensor.from_string_lists(NESTED_ROWS)
    moved = jt.to("cpu")
    assert moved.is_nested and moved.to_strings() == NESTED_ROWS
    assert moved.dtype == torch.uint8


def test_padding_needs_flat_values() -> None:
    with pytest.raises(TypeError, match="nested"):
        JaggedTensor.from_string_lists(NESTED_ROWS).to_padded(2)


def test_validate_checks_inner_offsets() -> None:
    inner = JaggedTensor(torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        JaggedTensor(inner, torch.tensor([0, 1])).validate()
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        outer_inner = JaggedTensor(torch.tensor([1], dtype=torch.uint8), torch.tensor([0, 1]))
        JaggedTensor(outer_inner, torch.tensor([0, 2])).validate()


def test_one_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        JaggedTensor.from_string_lists(["abc"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        JaggedTensor.from_strings("abc")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_nested_pin_and_cuda() -> None:
    jt = JaggedTensor.from_string_lists(NESTED_ROWS).pin_memory()
    assert jt.is_pinned()
    dev = jt.to("cuda", non_blocking=True)
    dev.record_stream(torch.cuda.current_stream())
    assert dev.values.values.is_cuda and dev.to_strings() == NESTED_ROWS
