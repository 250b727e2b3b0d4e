"""concat_1d: one launch through a pointer table, against torch.cat (and its casts)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels
from recstack.feature_engine.kernels.concat import CONCAT_DTYPES, concat_1d, concat_1d_reference

DTYPES = list(CONCAT_DTYPES)


def _random(n: int, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    if dtype.is_floating_point:
        t = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(dtype)
    return t.to(device)


def _name(backend: str) -> str:
    return "concat_1d" if backend == "triton" else "concat_1d_reference"


# Lengths: one input, empty inputs, lengths around the 2048-element tile, many small ones.
SIZES = {
    "one": [1],
    "one_empty": [0],
    "all_empty": [0, 0, 0],
    "ragged": [3, 0, 2049, 1, 4100, 0, 7],
    "tile_edges": [2047, 2048, 2049],
    "many": [(k * 37) % 41 for k in range(200)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
def test_matches_torch_cat(backend, device, dtype, sizes):
    gen = torch.Generator().manual_seed(100 * DTYPES.index(dtype) + list(SIZES).index(sizes))
    xs = [_random(n, dtype, gen, device) for n in SIZES[sizes]]
    with kernels.count_launches() as launches:
        out = concat_1d(xs)
    expected = torch.cat(xs)
    assert out.dtype == dtype and out.device == expected.device
    assert torch.equal(out, expected)
    n_launches = 1 if backend == "torch" or expected.numel() else 0
    assert dict(launches) == ({_name(backend): 1} if n_launches else {})


def test_many_inputs_is_one_launch(backend, device):
    gen = torch.Generator().manual_seed(1)
    xs = [_random(int(n), torch.int64, gen, device) for n in torch.randint(0, 300, (200,))]
    with kernels.count_launches() as launches:
        out = concat_1d(xs)
    assert torch.equal(out, torch.cat(xs))
    assert dict(launches) == {_name(backend): 1}


CASTS = [
    (torch.int32, torch.int64),
    (torch.uint8, torch.int64),
    (torch.int64, torch.int32),  # wraps, as Tensor.to does
    (torch.int64, torch.uint8),
    (torch.int32, torch.float32),
    (torch.int64, torch.float64),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.uint8, torch.float32),
]


@pytest.mark.parametrize(("src", "dst"), CASTS, ids=[f"{s}->{d}" for s, d in CASTS])
def test_cast_on_the_fly(backend, device, src, dst):
    gen = torch.Generator().manual_seed(7)
    xs = [_random(n, src, gen, device) for n in (5, 0, 2050, 1)]
    out = concat_1d(xs, dtype=dst)
    assert out.dtype == dst
    assert torch.equal(out, torch.cat(xs).to(dst))


def test_float_to_int_truncates(backend, device):
    x = torch.tensor([-2.75, -0.5, 0.0, 0.5, 3.99, 1e6], dtype=torch.float32, device=device)
    out = concat_1d([x, x.double()], dtype=torch.int64)
    assert out.tolist() == [-2, 0, 0, 0, 3, 1000000] * 2


def test_mixed_dtypes_with_dtype(backend, device):
    gen = torch.Generator().manual_seed(3)
    xs = [
        _random(10, torch.int32, gen, device),
        _random(2100, torch.int64, gen, device),
        _random(0, torch.float32, gen, device),
        _random(33, torch.uint8, gen, device),
        torch.arange(-5, 5, dtype=torch.float64, device=device),
    ]
    with kernels.count_launches() as launches:
        out = concat_1d(xs, dtype=torch.int64)
    assert torch.equal(out, torch.cat([x.to(torch.int64) for x in xs]))
    assert dict(launches) == {_name(backend): 1}
    # Each input is cast on its own (no detour through a promoted common dtype).
    big = torch.tensor([2**24 + 1], dtype=torch.int32, device=device)
    half = torch.tensor([0.5], dtype=torch.float32, device=device)
    assert concat_1d([big, half], dtype=torch.int64).tolist() == [2**24 + 1, 0]


def test_strided_and_offset_views(backend, device):
    base = torch.arange(10_000, dtype=torch.int64, device=device)
    xs = [
        base[1::3],  # stride 3, misaligned start
        base[5:9],  # storage offset, unit stride
        base[7:8].expand(40),  # stride 0
        base.flip(0)[::2].contiguous()[1:],  # contiguous, misaligned
        base[::7][:0],  # empty strided
    ]
    out = concat_1d(xs)
    assert torch.equal(out, torch.cat(xs))
    out32 = concat_1d(xs, dtype=torch.int32)
    assert torch.equal(out32, torch.cat(xs).to(torch.int32))


def test_output_is_a_new_tensor(backend, device):
    x = torch.arange(9, device=device)
    out = concat_1d([x])
    out[0] = 100
    assert x[0].item() == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_empty_list_needs_dtype(backend, dtype):
    out = concat_1d([], dtype=dtype)
    assert out.shape == (0,) and out.dtype == dtype and out.device.type == "cpu"
    out = concat_1d((), dtype=dtype, device="meta")
    assert out.device.type == "meta"
    with pytest.raises(ValueError, match="empty.*pass dtype="):
        concat_1d([])


def test_reference_matches_cat():
    xs = [torch.arange(3, dtype=torch.int32), torch.arange(2, dtype=torch.uint8)]
    assert concat_1d_reference(xs, torch.int64).tolist() == [0, 1, 2, 0, 1]
    assert concat_1d_reference([], torch.float32).dtype == torch.float32


def test_errors(backend):
    a = torch.arange(3)
    with pytest.raises(TypeError, match="mixed dtypes.*int32, int64.*pass dtype="):
        concat_1d([a, a.to(torch.int32)])
    with pytest.raises(ValueError, match=r"tensors\[1\] must be 1-D"):
        concat_1d([a, a.view(1, 3)])
    with pytest.raises(ValueError, match=r"tensors\[0\] must be 1-D"):
        concat_1d([torch.tensor(5)])
    with pytest.raises(TypeError, match=r"tensors\[1\] dtype int16 is not supported; use int64"):
        concat_1d([a, a.to(torch.int16)], dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype bool is not supported"):
        concat_1d([a], dtype=torch.bool)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        concat_1d([a], dtype="int64")
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor"):
        concat_1d([a, [1, 2]])
    with pytest.raises(TypeError, match="not one tensor"):
        concat_1d(a)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        concat_1d([a, torch.empty(2, dtype=torch.int64, device="meta")])
    with pytest.raises(ValueError, match="device=meta but the tensors are on cpu"):
        concat_1d([a], device="meta")


@pytest.mark.gpu
def test_gpu_large_and_many(backend):
    gen = torch.Generator().manual_seed(11)
    big = _random(10_000_003, torch.int64, gen, "cuda")
    assert torch.equal(concat_1d([big]), big)
    xs = [_random(8192 + k % 5, torch.int64, gen, "cuda") for k in range(200)]
    xs[3] = xs[3][1:]  # a misaligned input turns the alignment hint off
    assert torch.equal(concat_1d(xs), torch.cat(xs))
    ids32 = [x.to(torch.int32) for x in xs]
    assert torch.equal(concat_1d(ids32, dtype=torch.int64), torch.cat(ids32).to(torch.int64))
