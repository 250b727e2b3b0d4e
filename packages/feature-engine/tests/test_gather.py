"""gather_inputs: ids, bucketized floats and hashed strings into one key-major jagged buffer,
against a plain-Python oracle (lists for ids, torch.bucketize for floats, xxhash for strings)."""

from __future__ import annotations

import random

import pytest
import torch
import xxhash
from feature_testdata import M64, s64

from recstack.core import kernels
from recstack.feature_engine.kernels.bucketize_float import bucketize_float
from recstack.feature_engine.kernels.gather import (
    SEG_FLOAT,
    SEG_IDS,
    SEG_STRING,
    InputSegment,
    gather_inputs,
    gather_inputs_reference,
)

ID_DTYPES = [torch.int64, torch.int32, torch.uint8]
FLOAT_DTYPES = [torch.float32, torch.float64]


def _launch_name(backend: str) -> str:
    return "gather_inputs" if backend == "triton" else "gather_inputs_reference"


# ----------------------------------------------------------------------------------------
# oracle
# ----------------------------------------------------------------------------------------


def _oracle(segments, batch_size, boundaries):
    values: list[int] = []
    rows: list[int] = []
    for seg in segments:
        base = len(values)
        items = seg.items.cpu()
        if seg.kind == SEG_IDS:
            values.extend(items.tolist())  # Python ints: int32 signed, uint8 unsigned
        elif seg.kind == SEG_FLOAT:
            x = items.to(torch.float64)
            bl = boundaries.cpu()[seg.bound_start : seg.bound_start + seg.bound_count]
            ids = torch.bucketize(x, bl, right=seg.right).tolist()
            values.extend(
                seg.bound_count if v != v else i for v, i in zip(x.tolist(), ids, strict=True)
            )
        else:
            data = bytes(items.tolist())
            so = seg.string_offsets.tolist()
            for a, b in zip(so, so[1:], strict=False):
                values.append(s64(xxhash.xxh64_intdigest(data[a:b], seg.seed)))
        if seg.row_offsets is None:
            rows.extend(base + b for b in range(batch_size))
        else:
            ro = seg.row_offsets.tolist()
            rows.extend(base + ro[b] - ro[0] for b in range(batch_size))
    rows.append(len(values))
    return values, rows


# ----------------------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------------------


def _boundaries(rng: random.Random, lists: int):
    """Several strictly increasing float32-representable lists back to back."""
    flat: list[float] = []
    spans = []
    for _ in range(lists):
        n = rng.randint(1, 9)
        vals = sorted({float(torch.tensor(rng.gauss(0, 3)).float()) for _ in range(n)})
        spans.append((len(flat), len(vals)))
        flat.extend(vals)
    return torch.tensor(flat, dtype=torch.float64), spans


def _row_offsets(rng: random.Random, batch_size: int, max_len: int, device):
    """Ragged rows (some empty) starting at a random offset; returns (offsets, count)."""
    lengths = [rng.choice([0, rng.randint(0, max_len)]) for _ in range(batch_size)]
    start = rng.choice([0, 0, 5, 1000])
    ro = [start]
    for n in lengths:
        ro.append(ro[-1] + n)
    return torch.tensor(ro, dtype=torch.int64, device=device), ro[-1] - start


def _ids(rng: random.Random, gen: torch.Generator, count: int, dtype, device):
    if dtype == torch.uint8:
        t = torch.randint(0, 256, (count,), generator=gen).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (count,), generator=gen, dtype=torch.int64)
        t = t.to(dtype)
    if rng.random() < 0.5:
        # A view at an odd element offset: items need not be 16-byte aligned.
        t = torch.cat([t.new_zeros(1), t])[1:]
    return t.to(device)


def _floats(rng: random.Random, gen: torch.Generator, count, dtype, bounds, start, n, device):
    x = torch.randn(count, generator=gen, dtype=torch.float64) * 4
    picks = bounds[start : start + n].tolist() + [float("nan"), float("inf"), -float("inf")]
    for i in range(count):
        if rng.random() < 0.3:
            x[i] = rng.choice(picks)  # values equal to boundaries, NaN and infinities
    return x.to(dtype).to(device)


def _strings(rng: random.Random, count: int, device):
    """``count`` strings of 0..70 bytes after a random junk prefix (unaligned starts)."""
    data = bytearray(rng.randbytes(rng.randint(0, 9)))
    so = [len(data)]
    for _ in range(count):
        n = rng.choice([0, rng.randint(0, 70), rng.randint(28, 40)])
        data += rng.randbytes(n)
        so.append(len(data))
    data += rng.randbytes(rng.randint(0, 3))  # bytes past the last string
    # A view 0..7 bytes into its allocation: the kernel's word reads start below it.
    skip = rng.randrange(8)
    items = torch.tensor([0] * skip + list(data), dtype=torch.uint8, device=device)[skip:]
    return items, torch.tensor(so, dtype=torch.int64, device=device)


def _segment(rng, gen, kind, batch_size, bounds, spans, device, max_len=4):
    jagged = rng.random() < 0.6
    if jagged:
        ro, count = _row_offsets(rng, batch_size, max_len, device)
    else:
        ro, count = None, batch_size
    if kind == SEG_IDS:
        return InputSegment(SEG_IDS, _ids(rng, gen, count, rng.choice(ID_DTYPES), device), ro)
    if kind == SEG_FLOAT:
        start, n = rng.choice(spans)
        dtype = rng.choice(FLOAT_DTYPES)
        items = _floats(rng, gen, count, dtype, bounds, start, n, device)
        right = rng.random() < 0.5
        return InputSegment(SEG_FLOAT, items, ro, bound_start=start, bound_count=n, right=right)
    items, so = _strings(rng, count, device)
    seed = rng.choice([0, 1, 2**63, M64, rng.getrandbits(64)])
    return InputSegment(SEG_STRING, items, ro, string_offsets=so, seed=seed)


def _random_call(seed: int, batch_size: int, n_segments: int, device, max_len=4):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bounds, spans = _boundaries(rng, 4)
    kinds = [SEG_IDS, SEG_FLOAT, SEG_STRING] + [rng.randrange(3) for _ in range(n_segments - 3)]
    rng.shuffle(kinds)
    segs = [_segment(rng, gen, k, batch_size, bounds, spans, device, max_len) for k in kinds]
    return segs, bounds.to(device)


def _check(backend, segs, batch_size, bounds, **kw):
    with kernels.count_launches() as launches:
        values, rows = gather_inputs(segs, batch_size, bounds, **kw)
    exp_values, exp_rows = _oracle(segs, batch_size, bounds)
    assert values.dtype == rows.dtype == torch.int64
    assert values.device == rows.device == segs[0].items.device
    assert rows.shape == (len(segs) * batch_size + 1,)
    assert values.tolist() == exp_values
    assert rows.tolist() == exp_rows
    assert dict(launches) == {_launch_name(backend): 1}
    return values, rows


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, 1, 5, 33])
def test_mixed_segments_match_oracle(backend, device, batch_size):
    for trial in range(2):
        segs, bounds = _random_call(100 * batch_size + trial, batch_size, 9, device)
        _check(backend, segs, batch_size, bounds, check_offsets=trial == 1)


def test_many_tiles_per_segment(backend, device):
    # Segments longer than one tile: 2500 ids, 1100 rows, 300 strings, 1500 floats.
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    b = 1100
    bounds, spans = _boundaries(rng, 2)
    ro_ids, n_ids = _row_offsets(rng, b, 12, device)
    ro_str = torch.tensor([3] + [3 + min(i, 300) for i in range(1, b + 1)], device=device)
    start, n = spans[0]
    items, so = _strings(rng, 300, device)
    segs = [
        InputSegment(SEG_IDS, _ids(rng, gen, n_ids, torch.int32, device), ro_ids),
        InputSegment(SEG_STRING, items, ro_str, string_offsets=so, seed=9),
        InputSegment(
            SEG_FLOAT,
            _floats(rng, gen, b, torch.float32, bounds, start, n, device),
            bound_start=start,
            bound_count=n,
            right=True,
        ),
        InputSegment(SEG_IDS, _ids(rng, gen, b, torch.uint8, device)),
    ]
    assert n_ids > 2048
    _check(backend, segs, b, bounds.to(device))


def test_triton_matches_torch_bit_for_bit(device):
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    segs, bounds = _random_call(3, 17, 12, device, max_len=6)
    with kernels.use_backend("triton"):
        got = gather_inputs(segs, 17, bounds)
    with kernels.use_backend("torch"):
        ref = gather_inputs(segs, 17, bounds)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    direct = gather_inputs_reference(segs, 17, bounds)
    assert torch.equal(direct[0], ref[0]) and torch.equal(direct[1], ref[1])


def test_many_segments_one_launch(backend, device):
    segs, bounds = _random_call(11, 3, 60, device, max_len=2)
    _check(backend, segs, 3, bounds)


def test_no_segments(backend, device):
    with kernels.count_launches() as launches:
        values, rows = gather_inputs([], 4, device=device)
    assert values.shape == (0,) and rows.tolist() == [0]
    assert values.device.type == rows.device.type == device.type
    assert dict(launches) == {}
    values, rows = gather_inputs([], 0)
    assert values.device.type == "cpu" and rows.tolist() == [0]


def test_empty_strings_and_empty_rows(backend, device):
    empty_bytes = torch.zeros(0, dtype=torch.uint8, device=device)
    segs = [
        # Three empty strings and no bytes at all, one per row.
        InputSegment(
            SEG_STRING, empty_bytes, string_offsets=torch.zeros(4, dtype=torch.int64, device=device)
        ),
        # No items: every row empty, offsets not starting at 0.
        InputSegment(
            SEG_IDS,
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.full((4,), 7, dtype=torch.int64, device=device),
        ),
        # No strings at all.
        InputSegment(
            SEG_STRING,
            empty_bytes,
            torch.zeros(4, dtype=torch.int64, device=device),
            string_offsets=torch.zeros(1, dtype=torch.int64, device=device),
            seed=5,
        ),
    ]
    values, rows = _check(backend, segs, 3, None, check_offsets=True)
    assert values.numel() == 3 and rows.tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_everything_empty(backend, device):
    segs = [
        InputSegment(SEG_IDS, torch.zeros(0, dtype=torch.int64, device=device)),
        InputSegment(
            SEG_IDS,
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
        ),
    ]
    values, rows = _check(backend, segs, 0, None)
    assert values.numel() == 0 and rows.tolist() == [0]


def test_edge_ids_and_dtypes(backend, device):
    i64 = torch.tensor([0, -1, 2**63 - 1, -(2**63)], device=device)
    i32 = torch.tensor([-(2**31), 2**31 - 1, -1, 0], dtype=torch.int32, device=device)
    u8 = torch.tensor([0, 255, 128, 7], dtype=torch.uint8, device=device)
    segs = [InputSegment(SEG_IDS, t) for t in (i64, i32, u8)]
    values, _ = _check(backend, segs, 4, None)
    assert values[4:8].tolist() == i32.tolist() and values[8:].tolist() == [0, 255, 128, 7]


def test_float_edges_match_bucketize_float(backend, device):
    bounds = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64, device=device)
    x = torch.tensor(
        [-2.0, -1.0, -0.0, 0.0, 1.0, 2.5, 3.0, float("nan"), float("inf"), -float("inf")],
        device=device,
    )
    for right in (False, True):
        seg = InputSegment(SEG_FLOAT, x, bound_count=3, right=right)
        values, _ = _check(backend, [seg], x.numel(), bounds)
        expected = bucketize_float(
            x,
            torch.tensor([0, x.numel()], device=device),
            bounds,
            torch.tensor([0, 3], device=device),
            torch.tensor([int(right)], device=device),
        )
        assert torch.equal(values, expected)


def test_non_contiguous_inputs(backend, device):
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    ids = _ids(rng, gen, 10, torch.int64, device)
    strided = torch.stack([ids, -ids], dim=1).reshape(-1)[::2]
    ro = torch.tensor([0, 0, 3, 3, 9, 10, 10, 10, 10, 10, 10, 10], device=device)
    ro_strided = torch.stack([ro, ro], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and not ro_strided.is_contiguous()
    _check(backend, [InputSegment(SEG_IDS, strided, ro_strided)], 11, None)


def test_check_offsets_rejects_bad_offsets(device):
    ids = torch.arange(5, device=device)
    good = torch.tensor([2, 4, 7], device=device)
    gather_inputs([InputSegment(SEG_IDS, ids[:5], good)], 2, check_offsets=True)
    with pytest.raises(ValueError, match=r"segments\[1\] \(SEG_IDS\): row_offsets must be non-dec"):
        gather_inputs(
            [
                InputSegment(SEG_IDS, ids, torch.tensor([0, 2, 5], device=device)),
                InputSegment(SEG_IDS, ids, torch.tensor([0, 3, 6], device=device)),
            ],
            2,
            check_offsets=True,
        )
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_IDS\): row_offsets must be non-dec"):
        gather_inputs(
            [InputSegment(SEG_IDS, ids, torch.tensor([0, 4, 3, 5], device=device))],
            3,
            check_offsets=True,
        )
    data = torch.zeros(6, dtype=torch.uint8, device=device)
    for so in ([0, 3, 7], [0, 4, 2], [-1, 2, 3]):
        seg = InputSegment(SEG_STRING, data, string_offsets=torch.tensor(so, device=device))
        with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_STRING\): string_offsets"):
            gather_inputs([seg], 2, check_offsets=True)


def test_boundaries_revalidated_after_in_place_change(device):
    bounds = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, device=device)
    seg = InputSegment(SEG_FLOAT, torch.tensor([0.5], device=device), bound_count=3)
    assert gather_inputs([seg], 1, bounds)[0].tolist() == [1]
    bounds[2] = 1.0
    with pytest.raises(ValueError, match=r"boundaries\[0:3\] must be strictly increasing"):
        gather_inputs([seg], 1, bounds)


# ----------------------------------------------------------------------------------------
# validation: one test per error
# ----------------------------------------------------------------------------------------


def _ids_seg(device, n=2, **kw):
    return InputSegment(SEG_IDS, torch.arange(n, device=device), **kw)


B64 = torch.tensor([0.0, 1.0], dtype=torch.float64)


def test_error_segments_not_a_sequence(device):
    with pytest.raises(TypeError, match="sequence of InputSegment"):
        gather_inputs(_ids_seg(device), 2)


def test_error_not_an_input_segment(device):
    with pytest.raises(TypeError, match=r"segments\[1\] must be an InputSegment"):
        gather_inputs([_ids_seg(device), (SEG_IDS, torch.arange(2))], 2)


def test_error_batch_size(device):
    with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
        gather_inputs([_ids_seg(device)], -1)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        gather_inputs([_ids_seg(device)], 2.0)


def test_error_unknown_kind(device):
    with pytest.raises(ValueError, match=r"segments\[0\]: unknown kind 3"):
        gather_inputs([InputSegment(3, torch.arange(2, device=device))], 2)


def test_error_items_not_a_tensor(device):
    with pytest.raises(TypeError, match=r"segments\[0\] \(SEG_IDS\): items must be a torch"):
        gather_inputs([InputSegment(SEG_IDS, [1, 2])], 2)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        (SEG_IDS, torch.float32),
        (SEG_IDS, torch.int16),
        (SEG_FLOAT, torch.int64),
        (SEG_STRING, torch.int8),
    ],
)
def test_error_items_dtype(device, kind, dtype):
    seg = InputSegment(
        kind,
        torch.zeros(2, dtype=dtype, device=device),
        string_offsets=torch.tensor([0, 1, 2], device=device) if kind == SEG_STRING else None,
        bound_count=1,
    )
    with pytest.raises(TypeError, match=r"segments\[0\] \(SEG_\w+\): items must be"):
        gather_inputs([seg], 2, B64.to(device))


def test_error_items_not_1d(device):
    seg = InputSegment(SEG_IDS, torch.zeros(2, 1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_IDS\): items must be 1-D"):
        gather_inputs([seg], 2)


def test_error_row_offsets_dtype(device):
    seg = _ids_seg(device, row_offsets=torch.tensor([0, 1, 2], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"segments\[0\] \(SEG_IDS\): row_offsets must be int64"):
        gather_inputs([seg], 2)


def test_error_row_offsets_shape(device):
    seg = _ids_seg(device, row_offsets=torch.tensor([0, 2], device=device))
    with pytest.raises(ValueError, match=r"row_offsets must have shape \[B \+ 1\] = \[3\]"):
        gather_inputs([_ids_seg(device), seg], 2)
    seg = _ids_seg(device, row_offsets=torch.zeros(3, 1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="row_offsets must be 1-D"):
        gather_inputs([seg], 2)


def test_error_scalar_segment_count(device):
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_IDS\): row_offsets is None .* 3"):
        gather_inputs([_ids_seg(device, n=3)], 2)


def test_error_string_offsets_missing(device):
    seg = InputSegment(SEG_STRING, torch.zeros(2, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_STRING\): string_offsets is req"):
        gather_inputs([seg], 2)


def test_error_string_offsets_on_non_string(device):
    seg = _ids_seg(device, string_offsets=torch.tensor([0, 1, 2], device=device))
    with pytest.raises(ValueError, match="string_offsets is only for SEG_STRING"):
        gather_inputs([seg], 2)


def test_error_string_offsets_empty(device):
    seg = InputSegment(
        SEG_STRING,
        torch.zeros(2, dtype=torch.uint8, device=device),
        string_offsets=torch.zeros(0, dtype=torch.int64, device=device),
    )
    with pytest.raises(ValueError, match="string_offsets must have S \\+ 1 >= 1 entries"):
        gather_inputs([seg], 2)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_error_seed_range(device, seed):
    seg = InputSegment(
        SEG_STRING,
        torch.zeros(2, dtype=torch.uint8, device=device),
        string_offsets=torch.tensor([0, 1, 2], device=device),
        seed=seed,
    )
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_STRING\): seed must be in"):
        gather_inputs([seg], 2)


def test_error_float_without_boundaries(device):
    seg = InputSegment(SEG_FLOAT, torch.zeros(2, device=device), bound_count=1)
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_FLOAT\): .*need the boundaries"):
        gather_inputs([seg], 2)


@pytest.mark.parametrize(("start", "count"), [(0, 0), (-1, 1), (1, 2), (3, 1)])
def test_error_bound_range(device, start, count):
    seg = InputSegment(
        SEG_FLOAT, torch.zeros(2, device=device), bound_start=start, bound_count=count
    )
    with pytest.raises(ValueError, match=r"segments\[0\] \(SEG_FLOAT\): needs 0 <= bound_start"):
        gather_inputs([seg], 2, B64.to(device))


def test_error_boundaries_not_increasing(device):
    bounds = torch.tensor([0.0, 1.0, 1.0, 0.5, 3.0], dtype=torch.float64, device=device)
    ok = InputSegment(SEG_FLOAT, torch.zeros(2, device=device), bound_start=3, bound_count=2)
    gather_inputs([ok], 2, bounds)  # [0.5, 3.0]: only the slices in use must increase
    bad = InputSegment(SEG_FLOAT, torch.zeros(2, device=device), bound_start=0, bound_count=3)
    with pytest.raises(ValueError, match=r"segments\[1\] \(SEG_FLOAT\): boundaries\[0:3\] must"):
        gather_inputs([_ids_seg(device), bad], 2, bounds)


def test_error_boundaries_nan_dtype_dim(device):
    seg = InputSegment(SEG_FLOAT, torch.zeros(2, device=device), bound_count=1)
    nan = torch.tensor([0.0, float("nan")], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"boundaries must not be NaN \(at index 1\)"):
        gather_inputs([seg], 2, nan)
    with pytest.raises(TypeError, match="boundaries must be float64"):
        gather_inputs([seg], 2, torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(ValueError, match="boundaries must be 1-D"):
        gather_inputs([seg], 2, torch.zeros(2, 1, dtype=torch.float64, device=device))


def test_error_right_flag(device):
    seg = InputSegment(SEG_FLOAT, torch.zeros(2, device=device), bound_count=1, right=2)
    with pytest.raises(TypeError, match=r"segments\[0\] \(SEG_FLOAT\): right must be a bool"):
        gather_inputs([seg], 2, B64.to(device))


def test_error_mixed_devices():
    meta = torch.device("meta")
    seg = InputSegment(SEG_IDS, torch.arange(2, device=meta))
    with pytest.raises(ValueError, match=r"segments\[1\] \(SEG_IDS\): items is on meta"):
        gather_inputs([_ids_seg("cpu"), seg], 2)
    with pytest.raises(ValueError, match="row_offsets is on meta"):
        gather_inputs([_ids_seg("cpu", row_offsets=torch.arange(3, device=meta))], 2)
    with pytest.raises(ValueError, match="boundaries is on meta"):
        gather_inputs([_ids_seg("cpu")], 2, torch.zeros(1, dtype=torch.float64, device=meta))
    with pytest.raises(ValueError, match="device=meta but the segments are on cpu"):
        gather_inputs([_ids_seg("cpu")], 2, device="meta")


# ----------------------------------------------------------------------------------------
# GatherPlan: the static part checked once, per call only the tensors
# ----------------------------------------------------------------------------------------


def _plan_for(segs, bounds):
    from recstack.feature_engine.kernels.gather import GatherPlan

    return GatherPlan(
        [g.kind for g in segs],
        seeds=[g.seed for g in segs],
        bound_starts=[g.bound_start for g in segs],
        bound_counts=[g.bound_count for g in segs],
        rights=[g.right for g in segs],
        boundaries=bounds,
    )


@pytest.mark.parametrize("batch_size", [0, 1, 5, 33])
def test_plan_matches_gather_inputs(backend, device, batch_size):
    segs, bounds = _random_call(500 + batch_size, batch_size, 9, device, max_len=40)
    plan = _plan_for(segs, bounds)
    exp_values, exp_rows = _oracle(segs, batch_size, bounds)
    for _ in range(2):  # the same plan, called again (a training loop's next step)
        with kernels.count_launches() as launches:
            values, rows = plan(
                [g.items for g in segs],
                [g.row_offsets for g in segs],
                [g.string_offsets for g in segs],
                batch_size,
            )
        assert values.tolist() == exp_values and rows.tolist() == exp_rows
        assert dict(launches) == {_launch_name(backend): 1}


def test_plan_checks_its_static_part_and_its_calls(device):
    from recstack.feature_engine.kernels.gather import GatherPlan

    with pytest.raises(ValueError, match="seed"):
        GatherPlan([SEG_STRING], seeds=[2**64])
    with pytest.raises(ValueError, match="bound"):
        GatherPlan(
            [SEG_FLOAT], bound_counts=[3], boundaries=torch.tensor([1.0], dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="one entry per kind"):
        GatherPlan([SEG_IDS, SEG_IDS], seeds=[0])
    plan = GatherPlan([SEG_IDS])
    with pytest.raises(ValueError, match="1 segments, got 2"):
        plan([torch.arange(2), torch.arange(2)], [None, None], [None, None], 2)
    if kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode()):
        with kernels.use_backend("triton"), pytest.raises(TypeError, match="int16"):
            plan([torch.arange(2, dtype=torch.int16, device=device)], [None], [None], 2)


def test_docstring_examples_run(backend):
    import doctest

    from recstack.feature_engine.kernels import gather as gather_module

    if backend == "triton" and not kernels.interpret_mode():
        pytest.skip("the examples use CPU tensors, which only the interpreter runs in Triton")
    results = doctest.testmod(gather_module, optionflags=doctest.ELLIPSIS)
    assert results.failed == 0 and results.attempted >= 2
