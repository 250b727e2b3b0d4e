"""init_rows: bit-identical backends, per-key determinism, distributions, paged writes."""

from __future__ import annotations

import math

import pytest
import torch
from embedding_testdata import INIT_KINDS as KINDS

from recstack.core import kernels
from recstack.core.paged import PagedTensor
from recstack.embedding_engine.config import Initializer
from recstack.embedding_engine.kernels import init_rows as ir
from recstack.embedding_engine.kernels.init_rows import (
    GOLDEN,
    init_rows,
    init_rows_into,
    init_rows_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0.0 != 0.0 and every last bit counts)."""
    return t.contiguous().view(_INT_VIEW[t.dtype]).cpu()


def _keys(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


def _mix64(k: int) -> int:
    m = (1 << 64) - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    return k ^ (k >> 33)


# ---------------------------------------------------------------------------- backends agree


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("init", KINDS, ids=lambda i: f"{i.kind}{i.params.get('a', '')}")
def test_backends_are_bit_identical(backend, device, init, dtype) -> None:
    keys = _keys(37, seed=KINDS.index(init))
    keys[:3] = torch.tensor([0, -1, 2**63 - 1])  # edge keys
    with kernels.count_launches() as launches:
        got = init_rows(keys.to(device), 67, init, seed=12345, dtype=dtype)
    want = init_rows_reference(keys, 67, init, seed=12345, dtype=dtype)
    assert got.shape == (37, 67) and got.dtype == dtype and got.device.type == device.type
    assert torch.equal(_bits(got), _bits(want))
    name = "init_rows" if backend == "triton" else "init_rows_reference"
    assert launches[name] == 1


@pytest.mark.parametrize(("n", "dim"), [(0, 4), (1, 1), (1, 5), (3, 1), (5, 130), (70, 3)])
def test_shapes_empty_and_non_multiple_of_block(backend, device, n, dim) -> None:
    keys = _keys(n, seed=n * 1000 + dim)
    for init in (Initializer.uniform(-1, 1), Initializer.truncated_normal(std=0.1)):
        got = init_rows(keys.to(device), dim, init, seed=3)
        want = init_rows_reference(keys, dim, init, seed=3)
        assert got.shape == (n, dim)
        assert torch.equal(_bits(got), _bits(want))


def test_tail_truncations_stay_in_bounds(backend, device) -> None:
    keys = _keys(200, seed=9)
    for a, b in ((5.0, 6.0), (-20.0, -19.5), (0.1, 0.1001), (-0.5, 20.0)):
        init = Initializer.truncated_normal(2.0, 0.5, a, b)
        got = init_rows(keys.to(device), 16, init, seed=1).cpu()
        want = init_rows_reference(keys, 16, init, seed=1)
        assert torch.equal(_bits(got), _bits(want))
        lo, hi = init.support(16)
        assert got.min().item() >= lo - 1e-6 and got.max().item() <= hi + 1e-6
        assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------- determinism


def test_golden_values_are_stable() -> None:
    """The construction is a compatibility contract: checkpoints rely on it."""
    keys = torch.tensor([0, 1, -1, 2**62])
    golden = {
        "uniform": [
            0x3F3BD83F, -0x408DA1C8, 0x3EC553BE, -0x4103B64C, 0x3E799046, -0x4168FCBA,
            0x3E658441, -0x40CA6A99, -0x413E4857, -0x40C83BB3, -0x419AAA0C, -0x41E08EA7,
        ],
        "normal": [
            0x3F8E4EE5, -0x40089715, 0x3F00E6FD, -0x40D63D68, 0x3E9EE7CA, -0x413E342F,
            0x3E91C622, -0x4078C0F6, -0x4103516E, -0x407656C0, -0x416E5814, -0x41B6E1F0,
        ],
        "truncated_normal": [
            0x3F84C4AF, -0x402B253C, 0x3EF51BF5, -0x40DF1A06, 0x3E977480, -0x41476C8E,
            0x3E8AF8C3, -0x4082F908, -0x410FB8F3, -0x407F571F, -0x417523F9, -0x41C024D9,
        ],
    }  # fmt: skip
    inits = {
        "uniform": Initializer.uniform(-1.0, 1.0),
        "normal": Initializer.normal(),
        "truncated_normal": Initializer.truncated_normal(),
    }
    for kind, want in golden.items():
        got = init_rows_reference(keys, 3, inits[kind], seed=0)
        assert got.view(torch.int32).flatten().tolist() == want, kind


def test_uniform_follows_the_documented_counter_construction() -> None:
    keys = [0, 5, -3, 2**63 - 1]
    seed, dim, low, high = 77, 6, -0.5, 1.5
    got = init_rows_reference(torch.tensor(keys), dim, Initializer.uniform(low, high), seed=seed)
    m = (1 << 64) - 1
    salt = _mix64((seed + GOLDEN) & m)
    for i, key in enumerate(keys):
        base = _mix64((key & m) ^ salt)
        for j in range(dim):
            bits = _mix64((base + (j + 1) * GOLDEN) & m)
            u = (bits >> 11) * 2.0**-53
            assert got[i, j].item() == float(torch.tensor(u * (high - low) + low).float())


def test_rows_depend_only_on_key_and_seed(backend, device) -> None:
    init = Initializer.normal(std=0.05)
    keys = _keys(40, seed=4)
    full = init_rows(keys.to(device), 9, init, seed=11).cpu()
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    dup = torch.cat([keys[perm], keys[:7], keys[:7]])
    again = init_rows(dup.to(device), 9, init, seed=11).cpu()
    assert torch.equal(_bits(again[:40]), _bits(full[perm]))
    assert torch.equal(_bits(again[40:47]), _bits(full[:7]))
    assert torch.equal(_bits(again[47:]), _bits(full[:7]))
    one = init_rows(keys[5:6].to(device), 9, init, seed=11).cpu()
    assert torch.equal(_bits(one[0]), _bits(full[5]))
    # A wider row starts with the same columns (for a dim-independent initializer).
    wide = init_rows(keys.to(device), 20, init, seed=11).cpu()
    assert torch.equal(_bits(wide[:, :9]), _bits(full))
    other_seed = init_rows(keys.to(device), 9, init, seed=12).cpu()
    assert (other_seed != full).float().mean() > 0.99


def test_reference_chunking_does_not_change_values(monkeypatch) -> None:
    keys = _keys(50, seed=6)
    init = Initializer.truncated_normal(std=0.3)
    whole = init_rows_reference(keys, 7, init, seed=2)
    monkeypatch.setattr(ir, "_REF_CHUNK", 20)  # 2 rows per chunk
    assert torch.equal(init_rows_reference(keys, 7, init, seed=2), whole)


def test_float16_values_are_the_float32_values_rounded() -> None:
    keys = _keys(64, seed=8)
    init = Initializer.normal()
    f32 = init_rows_reference(keys, 8, init, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(init_rows_reference(keys, 8, init, seed=4, dtype=dtype), f32.to(dtype))


# ---------------------------------------------------------------------------- distributions


def _sample(init: Initializer, dim: int = 8, n: int = 2500) -> torch.Tensor:
    # torch reference: it is bit-identical to the kernel and fast on the CPU.
    with kernels.use_backend("torch"):
        return init_rows(torch.arange(n, dtype=torch.int64) * 7919, dim, init, seed=5).double()


def _check_moments(x: torch.Tensor, mean: float, std: float) -> None:
    n = x.numel()
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(x.std().item() - std) < 5 * std / math.sqrt(2 * n)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_uniform_statistics() -> None:
    x = _sample(Initializer.uniform(-0.3, 0.5))
    assert x.min() >= -0.3 and x.max() <= 0.5
    _check_moments(x, 0.1, 0.8 / math.sqrt(12))
    hist = torch.histc(x.float(), bins=8, min=-0.3, max=0.5) / x.numel()
    assert (hist - 1 / 8).abs().max() < 0.01


def test_normal_statistics_and_shape() -> None:
    x = _sample(Initializer.normal(0.1, 2.0))
    _check_moments(x, 0.1, 2.0)
    z = (x - 0.1) / 2.0
    for q in (-2.0, -1.0, 0.0, 0.5, 1.5):
        assert abs((z < q).double().mean().item() - _phi(q)) < 0.01
    # Columns and rows are independent streams.
    cols = z.view(-1, 8)
    assert abs(torch.corrcoef(cols.T)[0, 1].item()) < 0.06
    assert abs(torch.corrcoef(torch.stack([cols[:-1, 0], cols[1:, 0]]))[0, 1].item()) < 0.06


@pytest.mark.parametrize(("a", "b"), [(-2.0, 2.0), (-1.0, 3.0), (0.5, 1.5)])
def test_truncated_normal_statistics(a, b) -> None:
    mean, std = 0.2, 0.5
    x = _sample(Initializer.truncated_normal(mean, std, a, b))
    assert x.min() >= mean + a * std - 1e-6 and x.max() <= mean + b * std + 1e-6
    # Moments of the standard normal truncated to [a, b].
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mass = _phi(b) - _phi(a)
    m1 = (pdf(a) - pdf(b)) / mass
    var = 1 + (a * pdf(a) - b * pdf(b)) / mass - m1 * m1
    _check_moments(x, mean + std * m1, std * math.sqrt(var))


def test_xavier_statistics() -> None:
    dim = 48
    x = _sample(Initializer.xavier_uniform(2.0), dim=dim, n=500)
    bound = 2.0 * math.sqrt(3.0 / dim)
    assert x.abs().max() <= bound and x.abs().max() > 0.95 * bound
    _check_moments(x, 0.0, bound / math.sqrt(3))
    _check_moments(
        _sample(Initializer.xavier_normal(0.5), dim=dim, n=500), 0.0, 0.5 / math.sqrt(dim)
    )


def test_constant_and_zeros() -> None:
    assert torch.equal(
        _sample(Initializer.constant(0.25), n=10), torch.full((10, 8), 0.25).double()
    )
    assert _sample(Initializer.zeros(), n=10).abs().sum() == 0


# ---------------------------------------------------------------------------- numerics helpers


def test_float64_helpers_match_torch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(5000, generator=g, dtype=torch.float64) * 50, torch.tensor([1e-300])])
    x = x.clamp_min(1e-300)
    assert torch.allclose(ir._log_ref(x), x.log(), rtol=1e-15, atol=1e-15)
    assert torch.allclose(ir._sqrt_ref(x), x.sqrt(), rtol=3e-16, atol=0)
    p = torch.cat(
        [
            torch.rand(5000, generator=g, dtype=torch.float64),
            torch.logspace(-88, -1, 200, dtype=torch.float64),
        ]
    )
    p = p.clamp(1e-300, 1 - 1e-16)
    ref = torch.special.ndtri(p)
    assert ((ir._ndtri_ref(p) - ref).abs() <= 1.2e-9 * ref.abs() + 1e-15).all()


def test_decimal_normal_cdf_is_accurate() -> None:
    for x in (-20.0, -8.0, -2.0, -0.3, 0.0, 1.0, 3.0):
        got = float(ir._std_normal_cdf(x))
        assert math.isclose(got, _phi(x), rel_tol=1e-13), x
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        for x in (-19.5, -5.0, 0.7):
            assert float(ir._std_normal_cdf(x)) == float(mpmath.ncdf(x))


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: init_rows([1, 2], 4, Initializer.zeros()), TypeError, "keys must be a torch"),
        (lambda: init_rows(torch.ones(2), 4, Initializer.zeros()), TypeError, "keys must be int64"),
        (
            lambda: init_rows(torch.ones(2, 2, dtype=torch.int64), 4, Initializer.zeros()),
            ValueError,
            "keys must be 1-D",
        ),
        (
            lambda: init_rows(torch.ones(2, dtype=torch.int64), 0, Initializer.zeros()),
            ValueError,
            "dim",
        ),
        (
            lambda: init_rows(torch.ones(2, dtype=torch.int64), 4, "normal"),
            TypeError,
            "initializer must be an Initializer",
        ),
        (
            lambda: init_rows(
                torch.ones(2, dtype=torch.int64), 4, Initializer.zeros(), dtype=torch.float64
            ),
            TypeError,
            "dtype must be one of",
        ),
        (
            lambda: init_rows(torch.ones(2, dtype=torch.int64), 4, Initializer.zeros(), seed=-1),
            ValueError,
            "seed",
        ),
        (
            lambda: init_rows(torch.ones(2, dtype=torch.int64), 4, Initializer.zeros(), seed=2**64),
            ValueError,
            "seed",
        ),
    ],
)
def test_init_rows_errors(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------- init_rows_into


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_init_rows_into_writes_only_those_rows(backend, device, dtype) -> None:
    table = PagedTensor(dim=5, dtype=dtype, device=device, page_rows=8, name="item_emb")
    table.append_rows(30)
    rows = torch.tensor([3, 17, 29, 8], device=device)
    keys = torch.tensor([42, -7, 42, 2**40], device=device)
    init = Initializer.truncated_normal(std=0.1)
    init_rows_into(table, rows, keys, init, seed=9)
    dense = table.to_dense().cpu()
    want = init_rows_reference(keys.cpu(), 5, init, seed=9, dtype=dtype)
    assert torch.equal(_bits(dense[rows.cpu()]), _bits(want))
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert dense[untouched].abs().sum() == 0
    init_rows_into(table, rows[:0], keys[:0], init)  # empty is a no-op


def test_init_rows_into_errors(backend, device) -> None:
    table = PagedTensor(dim=3, device=device, page_rows=4, name="user_emb")
    table.append_rows(5)
    keys = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match="'user_emb'.*one row per key"):
        init_rows_into(table, torch.tensor([0], device=device), keys, Initializer.zeros())
    with pytest.raises(IndexError, match="'user_emb'.*row 5 is out of range"):
        init_rows_into(table, torch.tensor([0, 5], device=device), keys, Initializer.zeros())
    with pytest.raises(TypeError, match="paged must be a PagedTensor"):
        init_rows_into(torch.zeros(5, 3), torch.tensor([0]), keys[:1], Initializer.zeros())


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernel_matches_cpu_reference_bit_for_bit(dtype) -> None:
    keys = _keys(4099, seed=21)
    for init in KINDS:
        with kernels.use_backend("triton"):
            got = init_rows(keys.cuda(), 130, init, seed=2**63 + 5, dtype=dtype)
        want = init_rows_reference(keys, 130, init, seed=2**63 + 5, dtype=dtype)
        assert torch.equal(_bits(got), _bits(want)), init
        with kernels.use_backend("torch"):
            on_gpu_ref = init_rows(keys.cuda(), 130, init, seed=2**63 + 5, dtype=dtype)
        assert torch.equal(_bits(on_gpu_ref), _bits(want)), init
