"""row_buffer: the checks, offsets and capacity reshape_rows and filter_rows share."""

from __future__ import annotations

import random

import pytest
import torch
from feature_testdata import (
    block_buffer,
    block_modes,
    blocks_fixture,
    check_filter,
    check_reshape,
    filter_oracle,
    filter_sets,
    id_pool,
    parametrize_blocks,
    ragged_buffer,
    reshape_oracle,
    reshape_params,
)

from recstack.feature_engine.kernels import filter_rows as filter_module
from recstack.feature_engine.kernels import reshape_rows as reshape_module
from recstack.feature_engine.kernels.filter_rows import filter_rows
from recstack.feature_engine.kernels.reshape_rows import RESHAPE_IDENTITY, reshape_rows

# Tiny row blocks and chunks for the "small_blocks" runs of every backend test.
pytest_generate_tests = parametrize_blocks
blocks = blocks_fixture(
    {
        reshape_module: {"_LENGTHS_BLOCK": 8, "_ROWS": 8, "_BLOCK": 16},
        filter_module: {"_ROWS": 8, "_BLOCK": 32},
    }
)


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


def test_unchecked_bad_offsets_over_row_blocks(backend, device):
    # Garbage offsets (out of range, decreasing) over many blocks: unspecified output, but
    # consistent offsets and no out-of-bounds access or endless loop.
    rng = random.Random(43)
    pool = id_pool(rng)
    values, row_offsets = block_buffer(rng, 6, 20, pool, (30, 40))
    n = values.numel()
    set_ids, set_offsets, _ = filter_sets(rng, 6, pool)
    mode = torch.tensor(block_modes(rng, 6))
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


@pytest.mark.gpu
def test_cpu_tables_with_cuda_values(backend):
    rng = random.Random(23)
    pool = id_pool(rng)
    values, row_offsets = ragged_buffer(rng, 3, 8, pool)
    dev = torch.device("cuda")
    check_reshape(dev, values, row_offsets, 8, reshape_params(rng, 3))
    check_filter(dev, values, row_offsets, 8, *filter_sets(rng, 3, pool))
    with pytest.raises(ValueError, match="it must be on the CPU or on cpu"):
        reshape_rows(values, row_offsets, 8, reshape_params(rng, 3).to(dev))


# ----------------------------------------------------------------------------------------
# capacity: no host sync, the output laid out in a caller's upper bound
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("slack", [0, 5])
def test_capacity_gives_the_same_ids_without_a_sync(backend, device, blocks, slack):
    rng = random.Random(40 + slack)
    values, row_offsets = ragged_buffer(rng, 5, 9, id_pool(rng))
    params = reshape_params(rng, 5)
    exp_out, exp_offs = reshape_oracle(values, row_offsets, 9, params)
    v, o = values.to(device), row_offsets.to(device)
    out, offs = reshape_rows(v, o, 9, params, check_offsets=False, capacity=len(exp_out) + slack)
    assert out.numel() == len(exp_out) + slack and offs.tolist() == exp_offs
    assert out[: len(exp_out)].tolist() == exp_out
    set_ids, set_offsets, mode = filter_sets(rng, 5, id_pool(rng))
    exp_out, exp_offs = filter_oracle(values, row_offsets, 9, set_ids, set_offsets, mode)
    out, offs = filter_rows(
        v, o, 9, set_ids, set_offsets, mode, check_offsets=False, capacity=len(exp_out) + slack
    )
    assert out.numel() == len(exp_out) + slack and offs.tolist() == exp_offs
    assert out[: len(exp_out)].tolist() == exp_out


def test_capacity_too_small_never_writes_past_it(backend, device, blocks):
    rng = random.Random(44)
    values, row_offsets = ragged_buffer(rng, 3, 6, id_pool(rng))
    params = torch.tensor([[9, 0, 9, 0, 5, 0]] * 3)  # every row becomes 9 ids
    out, offs = reshape_rows(
        values.to(device), row_offsets.to(device), 6, params, check_offsets=False, capacity=10
    )
    exp_out, exp_offs = reshape_oracle(values, row_offsets, 6, params)
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
