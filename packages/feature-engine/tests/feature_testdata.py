"""Helpers the Feature Engine's tests share: int64 bit patterns, offsets, both backends,
the engine tests' schema, and the random key-major buffers and oracles of the row ops."""

from __future__ import annotations

import random

import pytest
import torch

from recstack.core import kernels
from recstack.feature_engine.kernels.filter_rows import filter_rows
from recstack.feature_engine.kernels.reshape_rows import RESHAPE_IDENTITY, reshape_rows

M64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EDGE_IDS = [0, 1, -1, I64_MAX, I64_MIN, I64_MAX - 1, I64_MIN + 1]

#: The schema of the engine tests' batches: one column of each kind, and a second int one.
SCHEMA = {
    "user_id": "int",
    "item_id": "int",
    "price": "float",
    "age": "float",
    "hist": "int_list",
    "query": "string",
    "tags": "string_list",
    "cat": "int",
}


def s64(v: int) -> int:
    """The int64 holding the uint64 bit pattern of ``v``."""
    v &= M64
    return v - (1 << 64) if v >= 1 << 63 else v


def triton_runs() -> bool:
    """Whether the Triton kernels can run here (a GPU, or the interpreter)."""
    return kernels.HAS_TRITON and (torch.cuda.is_available() or kernels.interpret_mode())


def on_both_backends(fn):
    """``fn()`` under the torch reference and, where it can run, the Triton kernel."""
    outs = []
    for backend in ("torch", "triton") if triton_runs() else ("torch",):
        with kernels.use_backend(backend):
            outs.append(fn())
    return outs


def offsets_of(lengths: list[int], device) -> torch.Tensor:
    """int64 offsets ``[0, l0, l0 + l1, ...]`` of consecutive slices of these lengths."""
    off = [0]
    for n in lengths:
        off.append(off[-1] + n)
    return torch.tensor(off, dtype=torch.int64, device=device)


def with_arg(args, i, value):
    """``args`` with entry ``i`` replaced by ``value`` (one bad argument at a time)."""
    args = list(args)
    args[i] = value
    return args


# ----------------------------------------------------------------------------------------
# Row-block sizes: every backend test of the row ops runs with the default block sizes and
# with tiny ones, so small inputs cross many blocks (a block spans several features, a
# feature several blocks) and rows span several chunks.
# ----------------------------------------------------------------------------------------


def parametrize_blocks(metafunc) -> None:
    """``pytest_generate_tests`` of the row-op test modules."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("blocks", ["default_blocks", "small_blocks"], indirect=True)


def blocks_fixture(small_blocks: dict):
    """An autouse ``blocks`` fixture that shrinks ``{module: {name: size}}`` when asked."""

    @pytest.fixture(autouse=True)
    def blocks(request, monkeypatch):
        if getattr(request, "param", None) == "small_blocks":
            for module, sizes in small_blocks.items():
                for name, value in sizes.items():
                    assert isinstance(getattr(module, name), int)
                    monkeypatch.setattr(module, name, value)
        return getattr(request, "param", "default_blocks")

    return blocks


# (F, B) with the default and with the tiny block sizes: B = 1 (the first two thirds of
# the features, untouched, fill whole blocks), B below R (a block spans several features),
# B = R (the filter blocks) and B above R (a feature spans several blocks).
BLOCK_CASES = {
    "B=1": {"default_blocks": (300, 1), "small_blocks": (40, 1)},
    "B<R": {"default_blocks": (60, 3), "small_blocks": (12, 3)},
    "B=R": {"default_blocks": (3, 128), "small_blocks": (6, 8)},
    "B>R": {"default_blocks": (3, 300), "small_blocks": (3, 21)},
}


LONG_ROWS = {"default_blocks": (520, 1100), "small_blocks": (40, 90)}
SIZES = [(f, b) for f in (0, 1, 3, 7) for b in (0, 1, 5, 33)]


# ----------------------------------------------------------------------------------------
# Oracles of the row ops (plain Python lists, one row at a time)
# ----------------------------------------------------------------------------------------


def rows_of(values, row_offsets):
    vals, ro = values.tolist(), row_offsets.tolist()
    return [vals[ro[r] : ro[r + 1]] for r in range(len(ro) - 1)]


def pack_rows(rows):
    out, offs = [], [0]
    for row in rows:
        out += row
        offs.append(len(out))
    return out, offs


def reshape_oracle(values, row_offsets, batch_size, params):
    table = params.tolist()
    new_rows = []
    for r, row in enumerate(rows_of(values, row_offsets)):
        keep, keep_last, pad_to, min_len, pad_value, pad_left = table[r // batch_size]
        kept = len(row) if keep < 0 else min(len(row), keep)
        ids = row[len(row) - kept :] if keep_last else row[:kept]
        n = pad_to if pad_to >= 0 else max(kept, min_len)
        pad = [pad_value] * (n - kept)
        new_rows.append(pad + ids if pad_left else ids + pad)
    return pack_rows(new_rows)


def filter_oracle(values, row_offsets, batch_size, set_ids, set_offsets, mode):
    ids, so, md = set_ids.tolist(), set_offsets.tolist(), mode.tolist()
    new_rows = []
    for r, row in enumerate(rows_of(values, row_offsets)):
        f = r // batch_size
        listed = set(ids[so[f] : so[f + 1]])
        if md[f] == 1:
            row = [v for v in row if v not in listed]
        elif md[f] == 2:
            row = [v for v in row if v in listed]
        new_rows.append(row)
    return pack_rows(new_rows)


# ----------------------------------------------------------------------------------------
# Random key-major buffers and tables
# ----------------------------------------------------------------------------------------


def buffer_of(rng: random.Random, lengths: list[int], pool: list[int]):
    """A key-major buffer with rows of these lengths, ids drawn from ``pool``."""
    values = [rng.choice(pool) for _ in range(sum(lengths))]
    return torch.tensor(values, dtype=torch.int64), offsets_of(lengths, "cpu")


def ragged_buffer(rng: random.Random, num_features: int, batch_size: int, pool: list[int]):
    """Ragged key-major rows: many empty and short rows, a few long ones (up to 70 ids)."""
    lengths = []
    for _ in range(num_features * batch_size):
        kind = rng.random()
        lengths.append(
            0 if kind < 0.2 else rng.randint(60, 70) if kind > 0.9 else rng.randint(1, 8)
        )
    return buffer_of(rng, lengths, pool)


def block_buffer(
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
    return buffer_of(rng, lengths, pool)


def block_case(blocks: str, case: str, salt: int):
    """A :data:`BLOCK_CASES` buffer: ``(rng, pool, num_features, batch_size, values,
    row_offsets)``, with the rng seeded from ``salt`` and the case's sizes."""
    num_features, batch_size = BLOCK_CASES[case][blocks]
    rng = random.Random(salt * num_features + batch_size)
    pool = id_pool(rng)
    values, row_offsets = block_buffer(rng, num_features, batch_size, pool, LONG_ROWS[blocks])
    return rng, pool, num_features, batch_size, values, row_offsets


def reshape_param(rng: random.Random, kind: int) -> list[int]:
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


def reshape_params(rng: random.Random, num_features: int) -> torch.Tensor:
    rows = [reshape_param(rng, rng.randrange(10)) for _ in range(num_features)]
    return torch.tensor(rows, dtype=torch.int64).view(num_features, 6)


def filter_sets(rng: random.Random, num_features: int, pool: list[int]):
    ids, offsets, modes = [], [0], []
    for _ in range(num_features):
        size = rng.choice([0, 1, 3, len(pool) // 2, len(pool)])
        ids += sorted(rng.sample(pool, size))
        offsets.append(len(ids))
        modes.append(rng.randint(0, 2))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return as_t(ids), as_t(offsets), as_t(modes)


def id_pool(rng: random.Random) -> list[int]:
    return EDGE_IDS + [rng.randint(I64_MIN, I64_MAX) for _ in range(9)] + list(range(2, 12))


def block_modes(rng: random.Random, num_features: int) -> list[int]:
    # The first two thirds untouched (whole blocks of them), then a mix of all modes, the
    # last feature filtered.
    modes = [0 if f < 2 * num_features // 3 else rng.randint(0, 2) for f in range(num_features)]
    modes[-1] = rng.randint(1, 2)
    return modes


def check_reshape(device, values, row_offsets, batch_size, params, **kw):
    out, offs = reshape_rows(values.to(device), row_offsets.to(device), batch_size, params, **kw)
    exp_out, exp_offs = reshape_oracle(values, row_offsets, batch_size, params)
    assert out.dtype == offs.dtype == torch.int64
    assert out.device.type == offs.device.type == device.type
    assert offs.tolist() == exp_offs
    assert out.tolist() == exp_out
    return out, offs


def check_filter(device, values, row_offsets, batch_size, set_ids, set_offsets, mode, **kw):
    out, offs = filter_rows(
        values.to(device), row_offsets.to(device), batch_size, set_ids, set_offsets, mode, **kw
    )
    exp_out, exp_offs = filter_oracle(values, row_offsets, batch_size, set_ids, set_offsets, mode)
    assert out.dtype == offs.dtype == torch.int64
    assert out.device.type == offs.device.type == device.type
    assert offs.tolist() == exp_offs
    assert out.tolist() == exp_out
    return out, offs
