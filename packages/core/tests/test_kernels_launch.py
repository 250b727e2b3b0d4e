"""FastKernel: relaunches through the compiled kernel give what Triton's own launch gives,
for every argument signature Triton specializes on (alignment, ints equal to 1 or divisible
by 16, dtypes, constexprs)."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

from recstack.core import kernels
from recstack.core.kernels.launch import FastKernel

if kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _axpy(x_ptr, y_ptr, out_ptr, n, stride, alpha, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        x = tl.load(x_ptr + i * stride, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (x * alpha * SCALE + y).to(out_ptr.dtype.element_ty), mask=ok)


class _Strided(NamedTuple):
    """A runtime kernel argument of related fields (Triton passes a tuple as its fields)."""

    ptr: Any
    stride: int


class _Tile(NamedTuple):
    """A constexpr kernel argument of related choices."""

    scale: int
    block: int


if kernels.HAS_TRITON:

    @triton.jit
    def _axpy_tuples(x, y_ptr, out_ptr, n, alpha, TILE: tl.constexpr):
        # _axpy with its arguments grouped in a runtime and a constexpr named tuple.
        i = tl.program_id(0) * TILE.block + tl.arange(0, TILE.block)
        ok = i < n
        xv = tl.load(x.ptr + i * x.stride, mask=ok, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32)
        out = xv * alpha * TILE.scale + yv
        tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=ok)


pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")


def _launch(fk: FastKernel, x, y, n, stride, alpha, scale, block=64):
    out = torch.zeros(n, dtype=y.dtype, device=y.device)
    fk((triton.cdiv(n, block),), x, y, out, n, stride, alpha, scale, block, num_warps=2)
    return out


def _expected(x, y, n, stride, alpha, scale):
    return (x[: n * stride : stride].float() * alpha * scale + y.float()).to(y.dtype)


def _device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if kernels.interpret_mode():
        return "cpu"
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")


def test_wrong_argument_count_names_the_kernel():
    with pytest.raises(TypeError, match="_axpy: 3 arguments for 8 parameters"):
        FastKernel(_axpy)((1,), 1, 2, 3)


@pytest.mark.parametrize("n", [1, 16, 37])
def test_matches_torch(n):
    device = _device()
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(2 * n, generator=gen, device=device)
    y = torch.randn(n, generator=gen, device=device)
    fk = FastKernel(_axpy)
    for _ in range(3):  # first launch compiles, the rest relaunch (on a GPU)
        out = _launch(fk, x, y, n, 2, 0.5, 3)
        torch.testing.assert_close(out, _expected(x, y, n, 2, 0.5, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 16])
def test_named_tuple_arguments(stride):
    device = _device()
    gen = torch.Generator(device=device).manual_seed(stride)
    x = torch.randn(40 * stride, generator=gen, device=device)
    y = torch.randn(37, generator=gen, device=device)
    fk = FastKernel(_axpy_tuples)
    for scale in (3, 3, 1, 3):  # relaunches of one signature, then another constexpr
        out = torch.zeros(37, device=device)
        fk((1,), _Strided(x, stride), y, out, 37, 0.5, _Tile(scale, 64))
        torch.testing.assert_close(
            out, _expected(x, y, 37, stride, 0.5, scale), rtol=1e-6, atol=1e-6
        )
    if device == "cuda":
        # Keyed by the tuples' fields, not their identity: one kernel per constexpr scale.
        assert fk.cached == 2


@pytest.mark.gpu
def test_each_signature_gets_its_own_kernel():
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(4097, generator=gen, device="cuda")
    fk = FastKernel(_axpy)
    cases = [
        # (x, y, n, stride, alpha, scale): aligned / offset-by-one pointers, n == 1,
        # n % 16 == 0, stride 1 (Triton may fold a 1), bf16 values, another constexpr.
        (base, base[:100].clone(), 100, 1, 0.5, 1),
        (base[1:], base[:100].clone(), 100, 1, 0.5, 1),
        (base, base[1:101], 100, 1, 0.5, 1),
        (base, base[:1].clone(), 1, 2, 0.5, 1),
        (base, base[:64].clone(), 64, 16, 0.5, 1),
        (base, base[:64].clone(), 64, 3, 2.0, 1),
        (base.bfloat16(), base[:77].bfloat16(), 77, 1, 0.5, 1),
        (base, base[:100].clone(), 100, 1, 0.5, 4),
    ]
    for _ in range(2):  # the second round relaunches every signature directly
        for x, y, n, stride, alpha, scale in cases:
            out = _launch(fk, x, y, n, stride, alpha, scale)
            want = _expected(x, y, n, stride, alpha, scale)
            torch.testing.assert_close(
                out,
                want,
                rtol=1e-2 if y.dtype != torch.float32 else 1e-6,
                atol=1e-2 if y.dtype != torch.float32 else 1e-6,
            )
    assert 5 <= fk.cached <= len(cases)


@pytest.mark.gpu
def test_follows_the_current_stream():
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    fk = FastKernel(_axpy)
    _launch(fk, x, y, 1000, 1, 1.0, 1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = _launch(fk, x, y, 1000, 1, 1.0, 1)
    stream.synchronize()
    torch.testing.assert_close(out, x + y)
