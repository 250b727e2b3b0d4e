"""dense_program: Triton vs torch reference vs a per-op torch oracle, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from feature_testdata import on_both_backends, with_arg

from recstack.core import kernels
from recstack.feature_engine.kernels import dense_program as dense_module
from recstack.feature_engine.kernels.dense_program import (
    DOP_CLIP,
    DOP_FILL_NAN,
    DOP_LOG1P,
    DOP_NOP,
    DOP_NORMALIZE,
    compile_dense_program,
    dense_program,
)

NAN = float("nan")
INF = float("inf")

# Dense kernels in Triton's interpreter evaluate log on every lane with numpy, which warns
# on the lanes whose result is NaN/-inf by definition (x <= -1) or is discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal NaN positions and bit-identical values elsewhere (signed zeros included)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    ok = ~a.isnan()
    assert torch.equal(a[ok].view(torch.int32), b[ok].view(torch.int32))


def _dense_inputs(num_features: int, batch: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_features, batch, generator=g) * 3
    special = torch.tensor([NAN, INF, -INF, 0.0, -0.0, -1.0, -2.0, 1e-30, -1e-12, 3e38])
    flat = x.view(-1)
    k = min(flat.numel(), special.numel())
    flat[:k] = special[:k]
    flat[k::7] = NAN
    return x.to(device)


def _dense_oracle(x: torch.Tensor, features_ops) -> torch.Tensor:
    rows = []
    for f, ops in enumerate(features_ops):
        r = x[f].clone()
        for op in ops:
            code, p = op[0], [torch.tensor(v, dtype=torch.float64).float() for v in op[1:]]
            if code == DOP_LOG1P:
                r = r.double().log1p().float()
            elif code == DOP_CLIP:
                r = torch.clamp(r, p[0], p[1])
            elif code == DOP_NORMALIZE:
                r = (r - p[0]) / p[1]
            elif code == DOP_FILL_NAN:
                r = torch.where(r.isnan(), p[0], r)
        rows.append(r)
    return torch.stack(rows, 1) if rows else torch.empty(x.shape[1], 0, device=x.device)


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        (DOP_NOP,),
        (DOP_LOG1P,),
        (DOP_CLIP, -1.0, 2.5),
        (DOP_CLIP, -INF, 0.0),
        (DOP_CLIP, 0.1, INF),
        (DOP_NORMALIZE, 0.1, 3.7),
        (DOP_NORMALIZE, -1e3, 1e-3),
        (DOP_FILL_NAN, 0.0),
        (DOP_FILL_NAN, -7.25),
    ],
)
def test_dense_each_op(backend, device, op):
    x = _dense_inputs(3, 517, device)
    ops, params = compile_dense_program([[op]] * 3)
    got = dense_program(x, ops.to(device), params.to(device))
    assert got.shape == (517, 3) and got.dtype == torch.float32
    # The oracle runs on the CPU: CUDA's torch divides by a scalar through its reciprocal.
    want = _dense_oracle(x.cpu(), [[op]] * 3)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


def test_dense_log1p_tiny_and_edges(backend, device):
    x = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 2.0**-30, 2.0**-29, 1e-6, -1.0, -1.5, INF, NAN]])
    ops, params = compile_dense_program([[(DOP_LOG1P,)]])
    got = dense_program(x.to(device), ops.to(device), params.to(device))[:, 0].cpu()
    want = x[0].double().log1p().float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(got[1]) and got[7] == -INF and got[8].isnan()


def test_dense_params_round_to_float32(backend, device):
    x = torch.tensor([[1.0, 2.0]], device=device)
    ops, params = compile_dense_program([[(DOP_NORMALIZE, 0.1, 0.3)]])
    got = dense_program(x, ops.to(device), params.to(device))
    want = (x.cpu() - torch.tensor(0.1).float()) / torch.tensor(0.3).float()
    assert torch.equal(got.cpu(), want.t())


@pytest.mark.parametrize("num_features,batch", [(0, 5), (4, 0), (1, 1), (5, 3), (37, 129)])
def test_dense_chains_and_shapes(backend, device, num_features, batch):
    rng = random.Random(num_features * 1000 + batch)
    choices = [
        (DOP_LOG1P,),
        (DOP_CLIP, -0.5, 0.5),
        (DOP_NORMALIZE, 0.25, 2.0),
        (DOP_FILL_NAN, 1.5),
        (DOP_NOP,),
    ]
    feats = [[rng.choice(choices) for _ in range(rng.randint(0, 4))] for _ in range(num_features)]
    ops, params = compile_dense_program(feats, slots=4)
    x = _dense_inputs(num_features, batch, device, seed=batch)
    got = dense_program(x, ops.to(device), params.to(device))
    assert got.shape == (batch, num_features)
    want = _dense_oracle(x.cpu(), feats)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


def test_dense_fill_then_log_has_no_nan(backend, device):
    x = torch.tensor([[NAN, 0.5, NAN], [NAN, NAN, 4.0]], device=device)
    ops, params = compile_dense_program(
        [[(DOP_FILL_NAN, 0.0), (DOP_LOG1P,)], [(DOP_FILL_NAN, -3.0), (DOP_CLIP, -1.0, 1.0)]]
    )
    got = dense_program(x, ops.to(device), params.to(device))
    assert not got.isnan().any()
    assert got[:, 1].tolist() == [-1.0, -1.0, 1.0]


def test_dense_triton_equals_torch_bitwise(device):
    rng = random.Random(9)
    choices = [
        (DOP_LOG1P,),
        (DOP_CLIP, -0.0, 0.7),
        (DOP_NORMALIZE, -0.3, 1.1),
        (DOP_FILL_NAN, -0.0),
        (DOP_NOP,),
    ]
    feats = [[rng.choice(choices) for _ in range(3)] for _ in range(19)]
    ops, params = compile_dense_program(feats)
    x = _dense_inputs(19, 301, device, seed=4)
    outs = on_both_backends(lambda: dense_program(x, ops.to(device), params.to(device)))
    for out in outs[1:]:
        _same_bits(out, outs[0])


def test_launch_counts(backend, device):
    suffix = "" if backend == "triton" else "_reference"
    xf = torch.randn(3, 50, device=device)
    ops, params = compile_dense_program([[(DOP_LOG1P,), (DOP_CLIP, -1, 1)]] * 3)
    with kernels.count_launches() as c:
        dense_program(xf, ops.to(device), params.to(device))
    assert dict(c) == {"dense_program" + suffix: 1}


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _dense_args():
    ops, params = compile_dense_program([[(DOP_CLIP, -1, 1)], [(DOP_NORMALIZE, 0.0, 2.0)]])
    return [torch.zeros(2, 3), ops, params]


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (0, torch.zeros(2, 3, dtype=torch.float64), TypeError, "x must be torch.float32"),
        (0, torch.zeros(6), ValueError, "x must be 2-D"),
        (1, torch.zeros(3, 1, dtype=torch.int64), ValueError, "ops must have shape"),
        (1, torch.zeros(2, 1, dtype=torch.int32), TypeError, "ops must be torch.int64"),
        (2, torch.zeros(2, 1, 2, dtype=torch.float32), TypeError, "params must be torch.float64"),
        (2, torch.zeros(2, 2, 2, dtype=torch.float64), ValueError, "params must have shape"),
        (1, torch.tensor([[5], [0]]), ValueError, "unknown opcode"),
        (2, torch.tensor([[[2.0, 1.0]], [[0.0, 1.0]]], dtype=torch.float64), ValueError, "CLIP"),
        (2, torch.tensor([[[NAN, 1.0]], [[0.0, 1.0]]], dtype=torch.float64), ValueError, "CLIP"),
        (2, torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]], dtype=torch.float64), ValueError, "std"),
        (2, torch.tensor([[[0.0, 1.0]], [[0.0, -1.0]]], dtype=torch.float64), ValueError, "std"),
        (2, torch.tensor([[[0.0, 1.0]], [[0.0, 1e-50]]], dtype=torch.float64), ValueError, "std"),
        (2, torch.tensor([[[0.0, 1.0]], [[INF, 1.0]]], dtype=torch.float64), ValueError, "mean"),
        (0, torch.zeros(2, 3, device="meta"), ValueError, "one device"),
    ],
)
def test_dense_validation(i, value, exc, match):
    with pytest.raises(exc, match=match):
        dense_program(*with_arg(_dense_args(), i, value))


# ----------------------------------------------------------------------------------------
# compile_dense_program
# ----------------------------------------------------------------------------------------


def test_compile_dense_program():
    ops, params = compile_dense_program(
        [[(DOP_FILL_NAN, 2), (DOP_LOG1P,)], [(DOP_NORMALIZE, 1.0, 2.0)]], slots=3
    )
    assert ops.tolist() == [[DOP_FILL_NAN, DOP_LOG1P, 0], [DOP_NORMALIZE, 0, 0]]
    assert params.dtype == torch.float64 and params.shape == (2, 3, 2)
    assert params[0, 0].tolist() == [2.0, 0.0] and params[1, 0].tolist() == [1.0, 2.0]
    for bad, match in [
        ((DOP_CLIP, 1.0), "takes 2 parameter"),
        ((DOP_CLIP, 2.0, 1.0), "lo <= hi"),
        ((DOP_NORMALIZE, 0.0, 0.0), "std"),
        ((7,), "unknown dense opcode"),
        ((DOP_FILL_NAN, "x"), "floats"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            compile_dense_program([[bad]], names=["age"])


# ----------------------------------------------------------------------------------------
# CUDA: bigger sizes through the compiled kernel (skipped without a GPU)
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_reference():
    feats = [[(DOP_FILL_NAN, 0.0), (DOP_LOG1P,), (DOP_NORMALIZE, 0.5, 1.5)]] * 50
    ops, params = compile_dense_program(feats)
    xd = _dense_inputs(50, 8193, "cpu")
    with kernels.use_backend("torch"):
        want_d = dense_program(xd, ops, params)
    _same_bits(dense_program(xd.cuda(), ops.cuda(), params.cuda()).cpu(), want_d)


def test_module_exports():
    for name in dense_module.__all__:
        assert hasattr(dense_module, name), name
