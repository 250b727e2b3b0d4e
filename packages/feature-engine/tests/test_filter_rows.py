"""filter_rows on both backends vs a plain per-row Python oracle."""

from __future__ import annotations

import doctest
import random

import pytest
import torch
from feature_testdata import (
    BLOCK_CASES,
    I64_MAX,
    I64_MIN,
    SIZES,
    block_case,
    block_modes,
    blocks_fixture,
    check_filter,
    filter_oracle,
    filter_sets,
    id_pool,
    parametrize_blocks,
    ragged_buffer,
)

from recstack.core import kernels
from recstack.feature_engine.kernels import filter_rows as filter_module
from recstack.feature_engine.kernels.filter_rows import filter_rows, filter_rows_reference

# Tiny row blocks and chunks for the "small_blocks" runs of every backend test.
pytest_generate_tests = parametrize_blocks
blocks = blocks_fixture({filter_module: {"_ROWS": 8, "_BLOCK": 32}})


@pytest.mark.parametrize(("num_features", "batch_size"), SIZES)
def test_filter_matches_oracle(backend, device, num_features, batch_size):
    rng = random.Random(1000 + 100 * num_features + batch_size)
    pool = id_pool(rng)
    values, row_offsets = ragged_buffer(rng, num_features, batch_size, pool)
    set_ids, set_offsets, mode = filter_sets(rng, num_features, pool)
    check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode)


def test_filter_mixed_modes_in_one_call(backend, device):
    rng = random.Random(17)
    pool = id_pool(rng)
    values, row_offsets = ragged_buffer(rng, 9, 31, pool)
    # Every mode with an empty list, a one-id list and a long list; one table from tensors
    # on the values' device.
    ids, offs = [], [0]
    for size in (0, 1, len(pool)) * 3:
        ids += sorted(rng.sample(pool, size))
        offs.append(len(ids))
    mode = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    tables = (torch.tensor(ids), torch.tensor(offs), mode)
    check_filter(device, values, row_offsets, 31, *tables)
    check_filter(device, values, row_offsets, 31, *(t.to(device) for t in tables))
    check_filter(device, values, row_offsets, 31, *tables, check_offsets=False)


def test_filter_int64_extremes(backend, device):
    # F=2, B=2; the lists start/end at the int64 extremes, which lower bounds must find.
    row = [I64_MIN, -1, 0, I64_MAX, I64_MIN + 1, I64_MAX - 1]
    values = torch.tensor(row * 4)
    row_offsets = torch.tensor([0, 6, 12, 18, 24])
    set_ids = torch.tensor([I64_MIN, 0, I64_MAX, I64_MIN, I64_MAX])
    set_offsets = torch.tensor([0, 3, 5])
    out, _ = check_filter(
        device, values, row_offsets, 2, set_ids, set_offsets, torch.tensor([1, 2])
    )
    assert out.tolist() == [-1, I64_MIN + 1, I64_MAX - 1] * 2 + [I64_MIN, I64_MAX] * 2


def test_filter_launch_counts(backend, device):
    rng = random.Random(5)
    pool = id_pool(rng)
    values, row_offsets = ragged_buffer(rng, 3, 5, pool)
    tables = filter_sets(rng, 3, pool)
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
    pool = id_pool(rng)
    values, row_offsets = ragged_buffer(rng, 4, 6, pool)
    tables = filter_sets(rng, 4, pool)
    got = filter_rows_reference(values, row_offsets, 6, *tables)  # max_list_len read back
    assert (got[0].tolist(), got[1].tolist()) == filter_oracle(values, row_offsets, 6, *tables)


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


# ----------------------------------------------------------------------------------------
# Row-block layout: blocks over several features, features over several blocks, rows
# over several chunks, untouched and mixed blocks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_filter_row_blocks(backend, device, blocks, case):
    rng, pool, num_features, batch_size, values, row_offsets = block_case(blocks, case, 37)
    set_ids, set_offsets, _ = filter_sets(rng, num_features, pool)
    mode = torch.tensor(block_modes(rng, num_features))
    check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode)
    check_filter(
        device, values, row_offsets, batch_size, set_ids, set_offsets, mode, check_offsets=False
    )


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_filter_row_blocks_keeping_everything(backend, device, blocks, case):
    # Untouched blocks (copied) and filtered blocks that keep every id (walked) must both
    # give the input back.
    _, pool, num_features, batch_size, values, row_offsets = block_case(blocks, case, 41)
    ids = sorted(pool)
    set_ids = torch.tensor(ids * num_features)
    set_offsets = torch.arange(num_features + 1) * len(ids)
    for modes in ([0] * num_features, [2] * num_features, [0, 2] * (num_features // 2) + [2]):
        mode = torch.tensor(modes[:num_features])
        out, offs = check_filter(
            device, values, row_offsets, batch_size, set_ids, set_offsets, mode
        )
        assert torch.equal(out.cpu(), values) and torch.equal(offs.cpu(), row_offsets)


def test_docstring_examples_run(backend):
    if backend == "triton" and not kernels.interpret_mode():
        pytest.skip("the examples use CPU tensors, which only the interpreter runs in Triton")
    results = doctest.testmod(filter_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 1 and results.failed == 0
