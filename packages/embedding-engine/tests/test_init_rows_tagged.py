"""init_rows_tagged: every row bit-identical to init_rows with its own table's initializer and
seed, on both backends, for mixed, constant-only, uniform-only and normal-only tables, empty
and one-row batches, tables with no rows, duplicate keys across tables; clear errors."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import INIT_KINDS as KINDS

from recstack.core import kernels
from recstack.embedding_engine.config import Initializer
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.kernels.init_rows_tagged import (
    init_rows_tagged,
    init_rows_tagged_reference,
)

SETS = {
    "mixed": KINDS,
    "constants": KINDS[:2],
    "uniform": [KINDS[2], KINDS[6]],
    "normal": [KINDS[3], KINDS[4], KINDS[5], KINDS[7]],
}
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype]).cpu()


def _case(n: int, tables: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    # The last table gets no row: its plan is there, its rows are not.
    tags = torch.randint(0, max(tables - 1, 1), (n,), generator=g)
    return keys.to(device), tags.to(device)


def _expected(keys, tags, dim, inits, seeds, dtype):
    out = torch.empty((keys.numel(), dim), dtype=dtype, device=keys.device)
    with kernels.use_backend("torch"):
        for i in range(keys.numel()):
            t = int(tags[i])
            out[i] = init_rows(keys[i : i + 1], dim, inits[t], seed=seeds[t], dtype=dtype)[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SETS))
@pytest.mark.parametrize("n", [0, 1, 53])
def test_each_row_is_its_tables_init_rows(backend, device, name, n, dtype) -> None:
    inits = SETS[name]
    seeds = [3 * i + 1 for i in range(len(inits))]
    keys, tags = _case(n, len(inits), seed=n, device=device)
    dim = 70  # two column tiles, the second partial
    got = init_rows_tagged(keys, tags, dim, inits, seeds, dtype=dtype)
    assert got.shape == (n, dim) and got.dtype == dtype and got.device == keys.device
    assert torch.equal(_bits(got), _bits(_expected(keys, tags, dim, inits, seeds, dtype)))


def test_one_key_in_two_tables_gets_two_rows(backend, device) -> None:
    inits = [Initializer.normal(0.0, 1.0), Initializer.normal(0.0, 1.0)]
    keys = torch.tensor([42, 42, 42], device=device)
    tags = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    rows = init_rows_tagged(keys, tags, 8, inits, [5, 6])
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])


def test_one_launch_whatever_the_number_of_tables(backend, device) -> None:
    keys, tags = _case(40, 8, seed=1, device=device)
    name = "init_rows_tagged" if backend == "triton" else "init_rows_tagged_reference"
    with kernels.count_launches() as launches:
        init_rows_tagged(keys, tags, 16, KINDS, list(range(8)))
    assert launches == {name: 1}


def test_the_reference_matches_on_any_device(device) -> None:
    keys, tags = _case(20, 3, seed=2, device=device)
    inits, seeds = KINDS[2:5], [0, 1, 2]
    got = init_rows_tagged_reference(keys, tags, 5, inits, seeds)
    assert torch.equal(_bits(got), _bits(_expected(keys, tags, 5, inits, seeds, torch.float32)))


def test_bad_arguments_are_named() -> None:
    keys = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"init_rows_tagged: tags must be a 1-D tensor"):
        init_rows_tagged(keys, torch.tensor([0]), 4, KINDS[:1], [0])
    with pytest.raises(TypeError, match=r"init_rows_tagged: tags must be int32 or int64"):
        init_rows_tagged(keys, torch.tensor([0.0, 1.0]), 4, KINDS[:2], [0, 1])
    with pytest.raises(ValueError, match=r"2 initializers and 1 seeds"):
        init_rows_tagged(keys, torch.tensor([0, 1]), 4, KINDS[:2], [0])
    with pytest.raises(ValueError, match=r"dim"):
        init_rows_tagged(keys, torch.tensor([0, 1]), 0, KINDS[:2], [0, 1])
