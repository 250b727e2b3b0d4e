"""reshape_rows / filter_rows on both backends vs plain per-row Python oracles."""

from __future__ import annotations

import doctest
import random

import pytest
import torch

from recstack.core import kernels
from recstack.feature_engine.kernels import rows as rows_module
from recstack.feature_engine.kernels.rows import (
    RESHAPE_IDENTITY,
    filter_rows,
    filter_rows_reference,
    reshape_rows,
    reshape_rows_reference,
)

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
EDGE_IDS = [0, 1, -1, I64_MAX, I64_MIN, I64_MAX - 1, I64_MIN + 1]
SIZES = [(f, b) for f in (0, 1, 3, 7) for b in (0, 1, 5, 33)]

# Tiny row blocks and chunks, so small inputs cross many blocks (a block spans several
# features, a feature several blocks) and rows span several chunks.
SMALL_BLOCKS = {
    "_ROW_BLOCK": 8,
    "_RESHAPE_ROWS": 8,
    "_RESHAPE_BLOCK": 16,
    "_FILTER_ROWS": 8,
    "_FILTER_BLOCK": 32,
}


def pytest_generate_tests(metafunc):
    # Every backend test runs with the default block sizes and with tiny ones.
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("blocks", ["default_blocks", "small_blocks"], indirect=True)


@pytest.fixture(autouse=True)
def blocks(request, monkeypatch):
    if getattr(request, "param", None) == "small_blocks":
        for name, value in SMALL_BLOCKS.items():
            assert isinstance(getattr(rows_module, name), int)
            monkeypatch.setattr(rows_module, name, value)
    return getattr(request, "param", "default_blocks")


# ----------------------------------------------------------------------------------------
# Oracles (plain Python lists, one row at a time)
# ----------------------------------------------------------------------------------------


def _rows(values, row_offsets):
    vals, ro = values.tolist(), row_offsets.tolist()
    return [vals[ro[r] : ro[r + 1]] for r in range(len(ro) - 1)]


def _pack(rows):
    out, offs = [], [0]
    for row in rows:
        out += row
        offs.append(len(out))
    return out, offs


def _reshape_oracle(values, row_offsets, batch_size, params):
    table = params.tolist()
    new_rows = []
    for r, row in enumerate(_rows(values, row_offsets)):
        keep, keep_last, pad_to, min_len, pad_value, pad_left = table[r // batch_size]
        kept = len(row) if keep < 0 else min(len(row), keep)
        ids = row[len(row) - kept :] if keep_last else row[:kept]
        n = pad_to if pad_to >= 0 else max(kept, min_len)
        pad = [pad_value] * (n - kept)
        new_rows.append(pad + ids if pad_left else ids + pad)
    return _pack(new_rows)


def _filter_oracle(values, row_offsets, batch_size, set_ids, set_offsets, mode):
    ids, so, md = set_ids.tolist(), set_offsets.tolist(), mode.tolist()
    new_rows = []
    for r, row in enumerate(_rows(values, row_offsets)):
        f = r // batch_size
        listed = set(ids[so[f] : so[f + 1]])
        if md[f] == 1:
            row = [v for v in row if v not in listed]
        elif md[f] == 2:
            row = [v for v in row if v in listed]
        new_rows.append(row)
    return _pack(new_rows)


# ----------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------


def _buffer(rng: random.Random, num_features: int, batch_size: int, pool: list[int]):
    """Ragged key-major rows: many empty and short rows, a few long ones (up to 70 ids)."""
    lengths = []
    for _ in range(num_features * batch_size):
        kind = rng.random()
        lengths.append(
            0 if kind < 0.2 else rng.randint(60, 70) if kind > 0.9 else rng.randint(1, 8)
        )
    values = [rng.choice(pool) for _ in range(sum(lengths))]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(values, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def _reshape_param(rng: random.Random, kind: int) -> list[int]:
    k = rng.randint(0, 6)
    pad_value = rng.choice([0, -1, 7, I64_MIN, I64_MAX])
    side = rng.randint(0, 1)
    return [
        list(RESHAPE_IDENTITY),
        [k, 0, -1, 0, 0, 0],  # truncate: keep the first k
        [k, 1, -1, 0, 0, 0],  # truncate: keep the last k
        [k, side, k, 0, pad_value, 0],  # pad right to k (with truncation)
        [k, side, k, rng.randint(0, k), pad_value, 1],  # pad left to k (with truncation)
        [k, side, k + rng.randint(0, 3), 0, pad_value, side],  # keep < pad_to
        [-1, 0, -1, 1, pad_value, 0],  # fill missing
        [k, side, -1, rng.randint(0, 9), pad_value, 1 - side],  # truncate + min length
        [-1, side, -1, rng.randint(2, 9), pad_value, side],  # min length only
        [0, 0, 0, 0, pad_value, 0],  # everything dropped
    ][kind]


def _params(rng: random.Random, num_features: int) -> torch.Tensor:
    rows = [_reshape_param(rng, rng.randrange(10)) for _ in range(num_features)]
    return torch.tensor(rows, dtype=torch.int64).view(num_features, 6)


def _sets(rng: random.Random, num_features: int, pool: list[int]):
    ids, offsets, modes = [], [0], []
    for _ in range(num_features):
        size = rng.choice([0, 1, 3, len(pool) // 2, len(pool)])
        ids += sorted(rng.sample(pool, size))
        offsets.append(len(ids))
        modes.append(rng.randint(0, 2))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return as_t(ids), as_t(offsets), as_t(modes)


def _pool(rng: random.Random) -> list[int]:
    return EDGE_IDS + [rng.randint(I64_MIN, I64_MAX) for _ in range(9)] + list(range(2, 12))


def _check_reshape(device, values, row_offsets, batch_size, params, **kw):
    out, offs = reshape_rows(values.to(device), row_offsets.to(device), batch_size, params, **kw)
    exp_out, exp_offs = _reshape_oracle(values, row_offsets, batch_size, params)
    assert out.dtype == offs.dtype == torch.int64
    assert out.device.type == offs.device.type == device.type
    assert offs.tolist() == exp_offs
    assert out.tolist() == exp_out
    return out, offs


def _check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode, **kw):
    out, offs = filter_rows(
        values.to(device), row_offsets.to(device), batch_size, set_ids, set_offsets, mode, **kw
    )
    exp_out, exp_offs = _filter_oracle(values, row_offsets, batch_size, set_ids, set_offsets, mode)
    assert out.dtype == offs.dtype == torch.int64
    assert out.device.type == offs.device.type == device.type
    assert offs.tolist() == exp_offs
    assert out.tolist() == exp_out
    return out, offs


# ----------------------------------------------------------------------------------------
# reshape_rows
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_features", "batch_size"), SIZES)
def test_reshape_matches_oracle(backend, device, num_features, batch_size):
    rng = random.Random(100 * num_features + batch_size)
    values, row_offsets = _buffer(rng, num_features, batch_size, _pool(rng))
    params = _params(rng, num_features)
    _check_reshape(device, values, row_offsets, batch_size, params)


def test_reshape_every_setting_in_one_call(backend, device):
    rng = random.Random(7)
    params = torch.tensor([_reshape_param(rng, kind) for kind in range(10)] * 2)
    values, row_offsets = _buffer(rng, 20, 17, _pool(rng))
    out, offs = _check_reshape(device, values, row_offsets, 17, params)
    assert out.numel() > 1024  # several output tiles
    _check_reshape(device, values, row_offsets, 17, params, check_offsets=False)


def test_reshape_examples(backend, device):
    # F=4, B=2: [1, 2, 3], [] | [4, 5, 6, 7], [8] | [9, 10], [11] | [], [12, 13, 14]
    values = torch.arange(1, 15)
    row_offsets = torch.tensor([0, 3, 3, 7, 8, 10, 11, 11, 14])
    params = torch.tensor(
        [
            [2, 1, -1, 0, 0, 0],  # truncate, keep the last 2
            [3, 0, 3, 0, -1, 0],  # pad right to 3
            [3, 0, 3, 0, -1, 1],  # pad left to 3
            [-1, 0, -1, 1, 99, 0],  # fill missing
        ]
    )
    out, offs = reshape_rows(values.to(device), row_offsets.to(device), 2, params)
    assert offs.tolist() == [0, 2, 2, 5, 8, 11, 14, 15, 18]
    assert out.tolist() == [2, 3, 4, 5, 6, 8, -1, -1, -1, 9, 10, -1, -1, 11, 99, 12, 13, 14]


def test_reshape_empty_values_with_padding(backend, device):
    # N = 0 but padding and filling create ids.
    row_offsets = torch.zeros(7, dtype=torch.int64)
    params = torch.tensor([[0, 0, 2, 0, 5, 0], [-1, 0, -1, 1, 6, 1], list(RESHAPE_IDENTITY)])
    values = torch.empty(0, dtype=torch.int64)
    out, offs = _check_reshape(device, values, row_offsets, 2, params)
    assert out.tolist() == [5, 5, 5, 5, 6, 6]


def test_reshape_launch_counts(backend, device):
    rng = random.Random(3)
    values, row_offsets = _buffer(rng, 3, 5, _pool(rng))
    params = _params(rng, 3)
    with kernels.count_launches() as launches:
        reshape_rows(values.to(device), row_offsets.to(device), 5, params)
    if backend == "triton":
        assert launches == {"reshape_rows_lengths": 1, "reshape_rows": 1}
    else:
        assert launches == {"reshape_rows_reference": 1}
    # No rows, or rows that all end up empty: no zero-size grid is launched.
    with kernels.count_launches() as launches:
        reshape_rows(
            values[:0].to(device), torch.zeros(1, dtype=torch.int64, device=device), 0, params
        )
        keep_none = torch.tensor([[0, 0, -1, 0, 0, 0]] * 3)
        out, offs = reshape_rows(values.to(device), row_offsets.to(device), 5, keep_none)
    assert out.numel() == 0 and offs.tolist() == [0] * 16
    if backend == "triton":
        assert launches == {"reshape_rows_lengths": 1}


def test_reshape_reference_is_the_torch_path():
    rng = random.Random(11)
    values, row_offsets = _buffer(rng, 3, 5, _pool(rng))
    params = _params(rng, 3)
    got = reshape_rows_reference(values, row_offsets, 5, params)
    assert (got[0].tolist(), got[1].tolist()) == _reshape_oracle(values, row_offsets, 5, params)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ([-2, 0, -1, 0, 0, 0], "keep must be >= -1"),
        ([1, 2, -1, 0, 0, 0], "keep_last must be 0 or 1"),
        ([1, 0, -1, 0, 0, -1], "pad_left must be 0 or 1"),
        ([1, 0, -2, 0, 0, 0], "pad_to must be >= -1"),
        ([1, 0, -1, -1, 0, 0], "min_len must be >= 0"),
        ([-1, 0, 3, 0, 0, 0], "keep must be in [0, pad_to]"),
        ([4, 0, 3, 0, 0, 0], "keep must be in [0, pad_to]"),
        ([2, 0, 3, 4, 0, 0], "min_len must be <= pad_to"),
    ],
)
def test_reshape_rejects_bad_params(backend, device, row, words):
    params = torch.tensor([list(RESHAPE_IDENTITY), row, list(RESHAPE_IDENTITY)])
    values = torch.arange(6, device=device)
    row_offsets = torch.tensor([0, 2, 4, 6], device=device)
    with pytest.raises(ValueError, match=r"params\[1\] \(feature 1") as info:
        reshape_rows(values, row_offsets, 1, params)
    assert words in str(info.value)


def test_reshape_rejects_bad_arguments(device):
    values = torch.arange(4, device=device)
    ro = torch.tensor([0, 1, 2, 4], device=device)
    ident = torch.tensor([list(RESHAPE_IDENTITY)] * 3)
    with pytest.raises(ValueError, match=r"params must have shape \[F, 6\]"):
        reshape_rows(values, ro, 1, ident[:, :5])
    with pytest.raises(TypeError, match="params must be torch.int64"):
        reshape_rows(values, ro, 1, ident.int())
    with pytest.raises(TypeError, match="values must be torch.int64"):
        reshape_rows(values.float(), ro, 1, ident)
    with pytest.raises(ValueError, match="F=2 features and batch_size=1"):
        reshape_rows(values, ro, 1, ident[:2])
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        reshape_rows(values, ro, -1, ident)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        reshape_rows(values, ro, True, ident)
    with pytest.raises(ValueError, match="batch_size is 0 but row_offsets has 4 entries"):
        reshape_rows(values, ro, 0, ident)
    with pytest.raises(ValueError, match="values has 4 ids but the buffer has no rows"):
        reshape_rows(values, ro[:1], 0, ident)
    with pytest.raises(ValueError, match="row_offsets must have F"):
        reshape_rows(values, ro[:0], 0, ident)


@pytest.mark.parametrize(
    ("offsets", "words"),
    [
        ([1, 2, 3, 4], "first=1"),
        ([0, 1, 2, 3], "last=3"),
        ([0, 3, 2, 4], "row 1 (feature 1, batch row 0) would have a negative length"),
    ],
)
def test_bad_row_offsets_are_reported(backend, device, offsets, words):
    values = torch.arange(4, device=device)
    ro = torch.tensor(offsets, device=device)
    ident = torch.tensor([list(RESHAPE_IDENTITY)] * 3)
    with pytest.raises(ValueError, match="row_offsets must be non-decreasing") as info:
        reshape_rows(values, ro, 1, ident)
    assert words in str(info.value)
    sets = (torch.tensor([1]), torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="row_offsets must be non-decreasing"):
        filter_rows(values, ro, 1, *sets)
    # Trusted offsets are not read back, and bad ones never index out of bounds.
    out, offs = reshape_rows(values, ro, 1, ident, check_offsets=False)
    assert int(offs[-1]) == out.numel()
    out, offs = filter_rows(values, ro, 1, *sets, check_offsets=False)
    assert int(offs[-1]) == out.numel()


def test_reshape_output_size_overflow_is_reported(backend, device):
    # Two rows padded to 2**62 ids each: the int64 total would wrap.
    values = torch.arange(3, device=device)
    params = torch.tensor([[0, 0, 2**62, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"2\*\*62 or more ids"):
        reshape_rows(values, torch.tensor([0, 1, 3], device=device), 2, params)


def test_bad_offsets_of_a_buffer_without_rows(backend, device):
    values = torch.empty(0, dtype=torch.int64, device=device)
    ro = torch.tensor([3], device=device)
    with pytest.raises(ValueError, match="first=3"):
        reshape_rows(values, ro, 0, torch.zeros(0, 6, dtype=torch.int64))


def test_params_checked_once_per_version(backend, device):
    values = torch.arange(4, device=device)
    ro = torch.tensor([0, 1, 2, 4], device=device)
    params = torch.tensor([list(RESHAPE_IDENTITY)] * 3)
    reshape_rows(values, ro, 1, params)
    params[2, 0] = -5  # an in-place change bumps the version: validated again
    with pytest.raises(ValueError, match=r"params\[2\] \(feature 2"):
        reshape_rows(values, ro, 1, params)
    params[2, 0] = 1
    out, offs = reshape_rows(values, ro, 1, params)
    assert out.tolist() == [0, 1, 2] and offs.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------
# filter_rows
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_features", "batch_size"), SIZES)
def test_filter_matches_oracle(backend, device, num_features, batch_size):
    rng = random.Random(1000 + 100 * num_features + batch_size)
    pool = _pool(rng)
    values, row_offsets = _buffer(rng, num_features, batch_size, pool)
    set_ids, set_offsets, mode = _sets(rng, num_features, pool)
    _check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode)


def test_filter_mixed_modes_in_one_call(backend, device):
    rng = random.Random(17)
    pool = _pool(rng)
    values, row_offsets = _buffer(rng, 9, 31, pool)
    # Every mode with an empty list, a one-id list and a long list; one table from tensors
    # on the values' device.
    ids, offs = [], [0]
    for size in (0, 1, len(pool)) * 3:
        ids += sorted(rng.sample(pool, size))
        offs.append(len(ids))
    mode = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    tables = (torch.tensor(ids), torch.tensor(offs), mode)
    _check_filter(device, values, row_offsets, 31, *tables)
    _check_filter(device, values, row_offsets, 31, *(t.to(device) for t in tables))
    _check_filter(device, values, row_offsets, 31, *tables, check_offsets=False)


def test_filter_int64_extremes(backend, device):
    # F=2, B=2; the lists start/end at the int64 extremes, which lower bounds must find.
    row = [I64_MIN, -1, 0, I64_MAX, I64_MIN + 1, I64_MAX - 1]
    values = torch.tensor(row * 4)
    row_offsets = torch.tensor([0, 6, 12, 18, 24])
    set_ids = torch.tensor([I64_MIN, 0, I64_MAX, I64_MIN, I64_MAX])
    set_offsets = torch.tensor([0, 3, 5])
    out, _ = _check_filter(
        device, values, row_offsets, 2, set_ids, set_offsets, torch.tensor([1, 2])
    )
    assert out.tolist() == [-1, I64_MIN + 1, I64_MAX - 1] * 2 + [I64_MIN, I64_MAX] * 2


def test_filter_launch_counts(backend, device):
    rng = random.Random(5)
    pool = _pool(rng)
    values, row_offsets = _buffer(rng, 3, 5, pool)
    tables = _sets(rng, 3, pool)
    with kernels.count_launches() as launches:
        filter_rows(values.to(device), row_offsets.to(device), 5, *tables)
    if backend == "triton":
        assert launches == {"filter_rows_count": 1, "filter_rows": 1}
    else:
        assert launches == {"filter_rows_reference": 1}
    keep_nothing = (torch.empty(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with kernels.count_launches() as launches:
        out, offs = filter_rows(
            values.to(device), row_offsets.to(device), 5, *keep_nothing, torch.tensor([2] * 3)
        )
        filter_rows(
            values[:0].to(device),
            torch.zeros(1, dtype=torch.int64, device=device),
            0,
            *keep_nothing,
            torch.tensor([2] * 3),
        )
    assert out.numel() == 0 and offs.tolist() == [0] * 16
    if backend == "triton":
        assert launches == {"filter_rows_count": 1}


def test_filter_reference_is_the_torch_path():
    rng = random.Random(19)
    pool = _pool(rng)
    values, row_offsets = _buffer(rng, 4, 6, pool)
    tables = _sets(rng, 4, pool)
    got = filter_rows_reference(values, row_offsets, 6, *tables)  # max_list_len read back
    assert (got[0].tolist(), got[1].tolist()) == _filter_oracle(values, row_offsets, 6, *tables)


@pytest.mark.parametrize(
    ("set_ids", "set_offsets", "mode", "pattern"),
    [
        ([1, 2], [0, 1, 2, 2], [0, 3, 1], r"mode\[1\] = 3 \(feature 1\)"),
        ([1, 2], [0, 2, 1, 2], [1, 1, 1], r"feature 1's id list would have a negative length"),
        ([1, 2], [0, 1, 2, 3], [1, 1, 1], r"must lie within \[0, len\(set_ids\)=2\]"),
        ([1, 2], [-1, 0, 1, 2], [1, 1, 1], r"first=-1"),
        ([1, 5, 5, 3], [0, 1, 3, 4], [0, 2, 1], r"feature 1's id list set_ids\[1:3\]"),
        ([9, 5, 7, 3], [0, 1, 2, 4], [0, 2, 1], r"feature 2's id list set_ids\[2:4\]"),
    ],
)
def test_filter_rejects_bad_tables(backend, device, set_ids, set_offsets, mode, pattern):
    values = torch.arange(6, device=device)
    row_offsets = torch.tensor([0, 2, 4, 6], device=device)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    with pytest.raises(ValueError, match=pattern):
        filter_rows(values, row_offsets, 1, as_t(set_ids), as_t(set_offsets), as_t(mode))


def test_filter_rejects_bad_arguments(device):
    values = torch.arange(4, device=device)
    ro = torch.tensor([0, 1, 2, 4], device=device)
    ids, offs, mode = torch.tensor([1]), torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0, 0])
    with pytest.raises(ValueError, match=r"set_offsets must have F \+ 1 = 4 entries"):
        filter_rows(values, ro, 1, ids, offs[:3], mode)
    with pytest.raises(TypeError, match="set_ids must be torch.int64"):
        filter_rows(values, ro, 1, ids.int(), offs, mode)
    with pytest.raises(ValueError, match="mode must be 1-D"):
        filter_rows(values, ro, 1, ids, offs, mode.view(3, 1))
    with pytest.raises(ValueError, match="F=3 features and batch_size=2"):
        filter_rows(values, ro, 2, ids, offs, mode)


def test_filter_tables_checked_once_per_version(backend, device):
    values = torch.tensor([1, 2, 3], device=device)
    ro = torch.tensor([0, 3], device=device)
    ids, offs, mode = torch.tensor([1, 3]), torch.tensor([0, 2]), torch.tensor([2])
    out, _ = filter_rows(values, ro, 1, ids, offs, mode)
    assert out.tolist() == [1, 3]
    ids[1] = 0  # no longer increasing: the version changed, so it is checked again
    with pytest.raises(ValueError, match="feature 0's id list"):
        filter_rows(values, ro, 1, ids, offs, mode)


@pytest.mark.gpu
def test_cpu_tables_with_cuda_values(backend):
    rng = random.Random(23)
    pool = _pool(rng)
    values, row_offsets = _buffer(rng, 3, 8, pool)
    dev = torch.device("cuda")
    _check_reshape(dev, values, row_offsets, 8, _params(rng, 3))
    _check_filter(dev, values, row_offsets, 8, *_sets(rng, 3, pool))
    with pytest.raises(ValueError, match="it must be on the CPU or on cpu"):
        reshape_rows(values, row_offsets, 8, _params(rng, 3).to(dev))


# ----------------------------------------------------------------------------------------
# Row-block layout: blocks over several features, features over several blocks, rows over
# several chunks, untouched and mixed blocks (with the default and with tiny block sizes)
# ----------------------------------------------------------------------------------------

# (F, B) with the default and with the tiny block sizes: B = 1 (the first two thirds of
# the features, untouched, fill whole blocks), B below R (a block spans several features),
# B = R (the filter blocks) and B above R (a feature spans several blocks).
BLOCK_CASES = {
    "B=1": {"default_blocks": (300, 1), "small_blocks": (40, 1)},
    "B<R": {"default_blocks": (60, 3), "small_blocks": (12, 3)},
    "B=R": {"default_blocks": (3, 128), "small_blocks": (6, 8)},
    "B>R": {"default_blocks": (3, 300), "small_blocks": (3, 21)},
}
# Long rows span several chunks: longer than the default chunks, or than the tiny ones
# (which keeps the interpreter fast).
LONG_ROWS = {"default_blocks": (520, 1100), "small_blocks": (40, 90)}


def _block_buffer(
    rng: random.Random,
    num_features: int,
    batch_size: int,
    pool: list[int],
    long_row: tuple[int, int],
):
    """Engine-like rows: mostly 1 id, some empty, a few sequences and two long rows."""
    n_rows = num_features * batch_size
    lengths = []
    for _ in range(n_rows):
        kind = rng.random()
        lengths.append(0 if kind < 0.1 else rng.randint(20, 40) if kind > 0.95 else 1)
    for r in rng.sample(range(n_rows), 2):
        lengths[r] = rng.randint(*long_row)
    values = [rng.choice(pool) for _ in range(sum(lengths))]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(values, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def _block_modes(rng: random.Random, num_features: int) -> list[int]:
    # The first two thirds untouched (whole blocks of them), then a mix of all modes, the
    # last feature filtered.
    modes = [0 if f < 2 * num_features // 3 else rng.randint(0, 2) for f in range(num_features)]
    modes[-1] = rng.randint(1, 2)
    return modes


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_reshape_row_blocks(backend, device, blocks, case):
    num_features, batch_size = BLOCK_CASES[case][blocks]
    rng = random.Random(31 * num_features + batch_size)
    long_row = LONG_ROWS[blocks]
    values, row_offsets = _block_buffer(rng, num_features, batch_size, _pool(rng), long_row)
    settings = [
        list(RESHAPE_IDENTITY),
        [long_row[0], 1, -1, 0, 0, 0],  # a long row keeps more ids than a chunk holds
        [3, 0, -1, 0, 0, 0],
        [2, 1, 4, 0, -7, 1],
        [-1, 0, -1, 1, 99, 0],
        [1, 0, -1, 2, 5, 1],
    ]
    params = torch.tensor([rng.choice(settings) for _ in range(num_features)])
    params[rng.randrange(num_features)] = torch.tensor(RESHAPE_IDENTITY)
    out, _ = _check_reshape(device, values, row_offsets, batch_size, params)
    ident = torch.tensor([list(RESHAPE_IDENTITY)] * num_features)
    out, offs = _check_reshape(device, values, row_offsets, batch_size, ident)
    assert torch.equal(out.cpu(), values) and torch.equal(offs.cpu(), row_offsets)


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_filter_row_blocks(backend, device, blocks, case):
    num_features, batch_size = BLOCK_CASES[case][blocks]
    rng = random.Random(37 * num_features + batch_size)
    pool = _pool(rng)
    values, row_offsets = _block_buffer(rng, num_features, batch_size, pool, LONG_ROWS[blocks])
    set_ids, set_offsets, _ = _sets(rng, num_features, pool)
    mode = torch.tensor(_block_modes(rng, num_features))
    _check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode)
    _check_filter(
        device, values, row_offsets, batch_size, set_ids, set_offsets, mode, check_offsets=False
    )


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_filter_row_blocks_keeping_everything(backend, device, blocks, case):
    # Untouched blocks (copied) and filtered blocks that keep every id (walked) must both
    # give the input back.
    num_features, batch_size = BLOCK_CASES[case][blocks]
    rng = random.Random(41 * num_features + batch_size)
    pool = _pool(rng)
    values, row_offsets = _block_buffer(rng, num_features, batch_size, pool, LONG_ROWS[blocks])
    ids = sorted(pool)
    set_ids = torch.tensor(ids * num_features)
    set_offsets = torch.arange(num_features + 1) * len(ids)
    for modes in ([0] * num_features, [2] * num_features, [0, 2] * (num_features // 2) + [2]):
        mode = torch.tensor(modes[:num_features])
        out, offs = _check_filter(
            device, values, row_offsets, batch_size, set_ids, set_offsets, mode
        )
        assert torch.equal(out.cpu(), values) and torch.equal(offs.cpu(), row_offsets)


def test_unchecked_bad_offsets_over_row_blocks(backend, device):
    # Garbage offsets (out of range, decreasing) over many blocks: unspecified output, but
    # consistent offsets and no out-of-bounds access or endless loop.
    rng = random.Random(43)
    pool = _pool(rng)
    values, row_offsets = _block_buffer(rng, 6, 20, pool, (30, 40))
    n = values.numel()
    set_ids, set_offsets, _ = _sets(rng, 6, pool)
    mode = torch.tensor(_block_modes(rng, 6))
    params = torch.tensor([[3, 1, -1, 2, 9, 0], list(RESHAPE_IDENTITY)] * 3)
    for trial in range(2):
        bad = row_offsets.clone()
        picks = torch.randint(0, bad.numel(), (40,), generator=torch.Generator().manual_seed(trial))
        bad[picks] = torch.randint(-5, n + 6, (40,), generator=torch.Generator().manual_seed(9))
        if trial == 1:
            bad = bad.flip(0)
        for out, offs in (
            reshape_rows(values.to(device), bad.to(device), 20, params, check_offsets=False),
            filter_rows(
                values.to(device),
                bad.to(device),
                20,
                set_ids,
                set_offsets,
                mode,
                check_offsets=False,
            ),
        ):
            steps = (offs[1:] - offs[:-1]).cpu()
            assert int(offs[0]) == 0 and int(offs[-1]) == out.numel() and bool((steps >= 0).all())


# ----------------------------------------------------------------------------------------
# Docstring examples
# ----------------------------------------------------------------------------------------


def test_docstring_examples_run(backend):
    if backend == "triton" and not kernels.interpret_mode():
        pytest.skip("the examples use CPU tensors, which only the interpreter runs in Triton")
    results = doctest.testmod(rows_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 2 and results.failed == 0


# ----------------------------------------------------------------------------------------
# capacity: no host sync, the output laid out in a caller's upper bound
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("slack", [0, 5])
def test_capacity_gives_the_same_ids_without_a_sync(backend, device, blocks, slack):
    rng = random.Random(40 + slack)
    values, row_offsets = _buffer(rng, 5, 9, _pool(rng))
    params = _params(rng, 5)
    exp_out, exp_offs = _reshape_oracle(values, row_offsets, 9, params)
    v, o = values.to(device), row_offsets.to(device)
    out, offs = reshape_rows(v, o, 9, params, check_offsets=False, capacity=len(exp_out) + slack)
    assert out.numel() == len(exp_out) + slack and offs.tolist() == exp_offs
    assert out[: len(exp_out)].tolist() == exp_out
    set_ids, set_offsets, mode = _sets(rng, 5, _pool(rng))
    exp_out, exp_offs = _filter_oracle(values, row_offsets, 9, set_ids, set_offsets, mode)
    out, offs = filter_rows(
        v, o, 9, set_ids, set_offsets, mode, check_offsets=False, capacity=len(exp_out) + slack
    )
    assert out.numel() == len(exp_out) + slack and offs.tolist() == exp_offs
    assert out[: len(exp_out)].tolist() == exp_out


def test_capacity_too_small_never_writes_past_it(backend, device, blocks):
    rng = random.Random(44)
    values, row_offsets = _buffer(rng, 3, 6, _pool(rng))
    params = torch.tensor([[9, 0, 9, 0, 5, 0]] * 3)  # every row becomes 9 ids
    out, offs = reshape_rows(
        values.to(device), row_offsets.to(device), 6, params, check_offsets=False, capacity=10
    )
    exp_out, exp_offs = _reshape_oracle(values, row_offsets, 6, params)
    # The caller sees the shortfall in the offsets; the ids that fit are right.
    assert out.numel() == 10 and offs.tolist() == exp_offs and offs[-1].item() > 10
    assert out.tolist() == exp_out[:10]


def test_capacity_needs_unchecked_offsets(device):
    values, row_offsets = torch.tensor([1, 2]), torch.tensor([0, 1, 2])
    params = torch.tensor([list(RESHAPE_IDENTITY)])
    with pytest.raises(ValueError, match="check_offsets=False"):
        reshape_rows(values, row_offsets, 2, params, capacity=4)
    with pytest.raises(ValueError, match="capacity must be in"):
        reshape_rows(values, row_offsets, 2, params, check_offsets=False, capacity=-1)
    with pytest.raises(TypeError, match="capacity must be an int"):
        filter_rows(
            values,
            row_offsets,
            2,
            torch.tensor([1]),
            torch.tensor([0, 1]),
            torch.tensor([1]),
            check_offsets=False,
            capacity=2.0,
        )


@pytest.mark.parametrize("batch_size", [3, 8, 21])
def test_reshape_blocks_of_untouched_rows_are_copied(backend, device, blocks, batch_size):
    # Identity features around touched ones: whole blocks take the straight-copy path, and
    # blocks straddling a feature boundary mix it with the general walk.
    rng = random.Random(60 + batch_size)
    values, row_offsets = _buffer(rng, 6, batch_size, _pool(rng))
    rows = [list(RESHAPE_IDENTITY)] * 6
    rows[2] = [2, 1, -1, 0, 0, 0]
    rows[4] = [-1, 0, -1, 1, 9, 0]
    _check_reshape(device, values, row_offsets, batch_size, torch.tensor(rows))
    _check_reshape(device, values, row_offsets, batch_size, torch.tensor([RESHAPE_IDENTITY] * 6))
