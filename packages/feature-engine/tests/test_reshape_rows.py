"""reshape_rows on both backends vs a plain per-row Python oracle."""

from __future__ import annotations

import doctest
import random

import pytest
import torch
from feature_testdata import (
    BLOCK_CASES,
    LONG_ROWS,
    SIZES,
    block_case,
    blocks_fixture,
    check_reshape,
    id_pool,
    parametrize_blocks,
    ragged_buffer,
    reshape_oracle,
    reshape_param,
    reshape_params,
)

from recstack.core import kernels
from recstack.feature_engine.kernels import reshape_rows as reshape_module
from recstack.feature_engine.kernels.reshape_rows import (
    RESHAPE_IDENTITY,
    reshape_rows,
    reshape_rows_reference,
)

# Tiny row blocks and chunks for the "small_blocks" runs of every backend test.
pytest_generate_tests = parametrize_blocks
blocks = blocks_fixture({reshape_module: {"_LENGTHS_BLOCK": 8, "_ROWS": 8, "_BLOCK": 16}})


@pytest.mark.parametrize(("num_features", "batch_size"), SIZES)
def test_reshape_matches_oracle(backend, device, num_features, batch_size):
    rng = random.Random(100 * num_features + batch_size)
    values, row_offsets = ragged_buffer(rng, num_features, batch_size, id_pool(rng))
    params = reshape_params(rng, num_features)
    check_reshape(device, values, row_offsets, batch_size, params)


def test_reshape_every_setting_in_one_call(backend, device):
    rng = random.Random(7)
    params = torch.tensor([reshape_param(rng, kind) for kind in range(10)] * 2)
    values, row_offsets = ragged_buffer(rng, 20, 17, id_pool(rng))
    out, offs = check_reshape(device, values, row_offsets, 17, params)
    assert out.numel() > 1024  # several output tiles
    check_reshape(device, values, row_offsets, 17, params, check_offsets=False)


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
    out, offs = check_reshape(device, values, row_offsets, 2, params)
    assert out.tolist() == [5, 5, 5, 5, 6, 6]


def test_reshape_launch_counts(backend, device):
    rng = random.Random(3)
    values, row_offsets = ragged_buffer(rng, 3, 5, id_pool(rng))
    params = reshape_params(rng, 3)
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
    values, row_offsets = ragged_buffer(rng, 3, 5, id_pool(rng))
    params = reshape_params(rng, 3)
    got = reshape_rows_reference(values, row_offsets, 5, params)
    assert (got[0].tolist(), got[1].tolist()) == reshape_oracle(values, row_offsets, 5, params)


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
    with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
        reshape_rows(values, ro, -1, ident)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        reshape_rows(values, ro, True, ident)
    with pytest.raises(ValueError, match="batch_size is 0 but row_offsets has 4 entries"):
        reshape_rows(values, ro, 0, ident)
    with pytest.raises(ValueError, match="values has 4 ids but the buffer has no rows"):
        reshape_rows(values, ro[:1], 0, ident)
    with pytest.raises(ValueError, match="row_offsets must have F"):
        reshape_rows(values, ro[:0], 0, ident)


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
# Row-block layout: blocks over several features, features over several blocks, rows
# over several chunks, untouched and mixed blocks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_reshape_row_blocks(backend, device, blocks, case):
    rng, _, num_features, batch_size, values, row_offsets = block_case(blocks, case, 31)
    long_row = LONG_ROWS[blocks]
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
    out, _ = check_reshape(device, values, row_offsets, batch_size, params)
    ident = torch.tensor([list(RESHAPE_IDENTITY)] * num_features)
    out, offs = check_reshape(device, values, row_offsets, batch_size, ident)
    assert torch.equal(out.cpu(), values) and torch.equal(offs.cpu(), row_offsets)


@pytest.mark.parametrize("batch_size", [3, 8, 21])
def test_reshape_blocks_of_untouched_rows_are_copied(backend, device, blocks, batch_size):
    # Identity features around touched ones: whole blocks take the straight-copy path, and
    # blocks straddling a feature boundary mix it with the general walk.
    rng = random.Random(60 + batch_size)
    values, row_offsets = ragged_buffer(rng, 6, batch_size, id_pool(rng))
    rows = [list(RESHAPE_IDENTITY)] * 6
    rows[2] = [2, 1, -1, 0, 0, 0]
    rows[4] = [-1, 0, -1, 1, 9, 0]
    check_reshape(device, values, row_offsets, batch_size, torch.tensor(rows))
    check_reshape(device, values, row_offsets, batch_size, torch.tensor([RESHAPE_IDENTITY] * 6))


def test_docstring_examples_run(backend):
    if backend == "triton" and not kernels.interpret_mode():
        pytest.skip("the examples use CPU tensors, which only the interpreter runs in Triton")
    results = doctest.testmod(reshape_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 1 and results.failed == 0
