"""bucketize_float: Triton vs torch reference vs a bisect oracle, per-feature lists."""

from __future__ import annotations

import bisect
import random

import pytest
import torch
from feature_testdata import offsets_of, on_both_backends, with_arg

from recstack.core import kernels
from recstack.feature_engine.kernels import bucketize_float as bucketize_module
from recstack.feature_engine.kernels.bucketize_float import (
    bucketize_float,
    compile_float_boundaries,
)

NAN = float("nan")
INF = float("inf")


def _float_oracle(values, lengths, lists, rights):
    out, at = [], 0
    for n, b, r in zip(lengths, lists, rights, strict=True):
        for v in values[at : at + n]:
            v = float(v)
            if v != v:
                out.append(len(b))
            else:
                out.append(bisect.bisect_right(b, v) if r else bisect.bisect_left(b, v))
        at += n
    return out


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucketize_float_matches_oracle(backend, device, dtype):
    rng = random.Random(21)
    lists = [[0.5], [-1.0, 0.0, 1.0], [-INF, 0.1, 0.2, 0.30000001192092896, 5.0], [1e300]]
    lists.append(sorted({rng.uniform(-3, 3) for _ in range(40)}))
    rights = [False, True, False, True, True]
    lengths = [1, 0, 50, 9, 400]
    vals = [v for b in lists for v in b] + [NAN, INF, -INF, 0.0, -0.0, 0.3]
    vals += [rng.uniform(-4, 4) for _ in range(sum(lengths) - len(vals))]
    rng.shuffle(vals)
    x = torch.tensor(vals, dtype=dtype)
    b, bo, r = compile_float_boundaries(lists, right=rights)
    got = bucketize_float(
        x.to(device), offsets_of(lengths, device), b.to(device), bo.to(device), r.to(device)
    )
    assert got.dtype == torch.int64 and got.shape == x.shape
    assert got.cpu().tolist() == _float_oracle(x.tolist(), lengths, lists, rights)


def test_bucketize_float_equals_torch_bucketize_in_float64(backend, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(700, generator=g).to(device)
    bounds = torch.linspace(-2, 2, 33, dtype=torch.float64)
    for right in (False, True):
        b, bo, r = compile_float_boundaries([bounds.tolist()], right=right)
        got = bucketize_float(
            x, offsets_of([700], device), b.to(device), bo.to(device), r.to(device)
        )
        assert torch.equal(got, torch.bucketize(x.double(), bounds.to(device), right=right))


def test_bucketize_float_empty_and_single(backend, device):
    e64 = torch.empty(0, dtype=torch.float64, device=device)
    ei = torch.empty(0, dtype=torch.int64, device=device)
    assert (
        bucketize_float(e64, offsets_of([], device), e64, offsets_of([], device), ei).numel() == 0
    )
    b, bo, r = compile_float_boundaries([[1.0], [2.0, 3.0]])
    out = bucketize_float(e64, offsets_of([0, 0], device), *(t.to(device) for t in (b, bo, r)))
    assert out.numel() == 0
    x = torch.tensor([NAN], device=device)
    out = bucketize_float(x, offsets_of([0, 1], device), *(t.to(device) for t in (b, bo, r)))
    assert out.tolist() == [2]


def test_bucketize_float_triton_equals_torch(device):
    rng = random.Random(4)
    lists = [sorted({rng.uniform(-2, 2) for _ in range(rng.randint(1, 30))}) for _ in range(31)]
    rights = [rng.random() < 0.5 for _ in lists]
    lengths = [rng.choice([0, 1, 5, 80]) for _ in lists]
    x = torch.randn(sum(lengths))
    x[::13] = NAN
    b, bo, r = compile_float_boundaries(lists, right=rights)
    args = [t.to(device) for t in (x, offsets_of(lengths, "cpu"), b, bo, r)]
    outs = on_both_backends(lambda: bucketize_float(*args))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert outs[0].cpu().tolist() == _float_oracle(x.tolist(), lengths, lists, rights)


def test_launch_counts(backend, device):
    suffix = "" if backend == "triton" else "_reference"
    xf = torch.randn(3, 50, device=device)
    b, bo, r = compile_float_boundaries([[0.0, 1.0], [2.0]], right=[False, True])
    with kernels.count_launches() as c:
        bucketize_float(
            xf.view(-1)[:77], offsets_of([7, 70], device), *(t.to(device) for t in (b, bo, r))
        )
    assert dict(c) == {"bucketize_float" + suffix: 1}


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _float_args():
    b, bo, r = compile_float_boundaries([[0.0, 1.0], [5.0]])
    return [torch.zeros(4), torch.tensor([0, 1, 4]), b, bo, r]


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (0, torch.zeros(4, dtype=torch.int64), TypeError, "values must be torch.float32"),
        (1, torch.tensor([0, 1, 3]), ValueError, "value_offsets"),
        (2, torch.zeros(3, dtype=torch.float32), TypeError, "boundaries must be torch.float64"),
        (3, torch.tensor([0, 3]), ValueError, "bound_offsets must have F \\+ 1 = 3"),
        (3, torch.tensor([0, 2, 2]), ValueError, "feature 1 has no boundaries"),
        (3, torch.tensor([0, 2, 4]), ValueError, "bound_offsets"),
        (4, torch.tensor([0]), ValueError, "right must have F = 2"),
        (4, torch.tensor([0, 2]), ValueError, "right must be 0 or 1"),
        (2, torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64), ValueError, "strictly increasing"),
        (2, torch.tensor([1.0, 1.0, 5.0], dtype=torch.float64), ValueError, "strictly increasing"),
        (2, torch.tensor([0.0, NAN, 5.0], dtype=torch.float64), ValueError, "NaN"),
    ],
)
def test_bucketize_float_validation(i, value, exc, match):
    with pytest.raises(exc, match=match):
        bucketize_float(*with_arg(_float_args(), i, value))


# ----------------------------------------------------------------------------------------
# compile_float_boundaries
# ----------------------------------------------------------------------------------------


def test_compile_float_boundaries():
    b, bo, r = compile_float_boundaries([[0.5, 1.5], [-INF, 10.0]], right=True)
    assert b.dtype == torch.float64 and b.tolist() == [0.5, 1.5, -INF, 10.0]
    assert bo.tolist() == [0, 2, 4] and r.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no boundaries"):
        compile_float_boundaries([[1.0], []])
    with pytest.raises(ValueError, match="strictly increasing"):
        compile_float_boundaries([[1.0, 1.0]])
    with pytest.raises(ValueError, match="2 flags for 1"):
        compile_float_boundaries([[1.0]], right=[True, False])


# ----------------------------------------------------------------------------------------
# CUDA: bigger sizes through the compiled kernel (skipped without a GPU)
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_reference():
    rng = random.Random(0)
    lists = [sorted({rng.uniform(-2, 2) for _ in range(rng.randint(1, 200))}) for _ in range(300)]
    b, bo, r = compile_float_boundaries(lists, right=[f % 2 == 1 for f in range(300)])
    xf = torch.randn(300 * 517)
    vo = offsets_of([517] * 300, "cpu")
    with kernels.use_backend("torch"):
        want_f = bucketize_float(xf, vo, b, bo, r)
    got_f = bucketize_float(xf.cuda(), vo.cuda(), b.cuda(), bo.cuda(), r.cuda())
    assert torch.equal(got_f.cpu(), want_f)


def test_module_exports():
    for name in bucketize_module.__all__:
        assert hasattr(bucketize_module, name), name
