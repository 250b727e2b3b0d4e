"""Dice kernels vs the torch reference: output, running statistics and both gradients, in
training (batch statistics) and eval (running ones), fp32 and bf16, on empty, one-row and
ragged shapes; and the Dice layer on each backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from backends import DEVICE, RUNNABLE

from recstack.core import kernels
from recstack.pipelines.kernels.dice import dice_reference
from recstack.pipelines.models import Dice
from recstack.pipelines.ops.dice import dice

needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="needs a GPU or TRITON_INTERPRET=1 to run the Triton kernels"
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# Rows: none, one, fewer than a block, several blocks and a ragged last one.
SHAPES = [(0, 5), (1, 3), (7, 1), (130, 40), (300, 200)]


@pytest.fixture(autouse=True)
def torch_kernels() -> Iterator[None]:
    """Replaces the package's fixture (which forces the torch reference under the
    interpreter): these tests pick the backend themselves."""
    yield


def _case(n: int, c: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # Channels far from zero: the shifted sums must keep the variance's digits.
    spread = torch.rand(c, generator=gen) + 0.5
    x = torch.randn(n, c, generator=gen) * spread + 20 * torch.randn(c, generator=gen)
    return {
        "x": x.to(dtype).to(DEVICE),
        "alpha": (torch.rand(c, generator=gen) - 0.5).to(DEVICE),
        "mean": torch.randn(c, generator=gen).to(DEVICE),
        "var": (torch.rand(c, generator=gen) + 0.1).to(DEVICE),
        "dy": torch.randn(n, c, generator=gen).to(dtype).to(DEVICE),
    }


def _run(case: dict, backend: str, training: bool) -> tuple[torch.Tensor, ...]:
    x = case["x"].clone().requires_grad_(True)
    alpha = case["alpha"].clone().requires_grad_(True)
    mean, var = case["mean"].clone(), case["var"].clone()
    with kernels.use_backend(backend):
        y = dice(x, alpha, mean, var, training=training, eps=1e-5, momentum=0.1)
    y.backward(case["dy"])
    assert y.dtype == x.dtype and y.shape == x.shape
    return y.float(), x.grad.float(), alpha.grad, mean, var


def _reference64(case: dict, training: bool) -> tuple[torch.Tensor, ...]:
    """The reference in float64 on the same (rounded) inputs: fp32 autograd through the
    batch statistics cancels catastrophically where the variance is tiny."""
    x = case["x"].double().cpu().requires_grad_(True)
    alpha = case["alpha"].double().cpu().requires_grad_(True)
    mean, var = case["mean"].double().cpu(), case["var"].double().cpu()
    y = dice_reference(x, alpha, mean, var, training=training, eps=1e-5, momentum=0.1)
    y.backward(case["dy"].double().cpu())
    return y.detach(), x.grad, alpha.grad, mean, var


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_kernels_match_the_reference(shape, dtype, training) -> None:
    case = _case(*shape, dtype, seed=shape[0] * 7 + shape[1])
    got = _run(case, "triton", training)
    want = _reference64(case, training)
    tol = TOL[dtype]
    names = ("y", "dx", "dalpha", "running_mean", "running_var")
    for name, g, w in zip(names, got, want, strict=True):
        w = w.float().to(g.device)
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g.detach(), w, atol=tol * scale, rtol=tol, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_torch_path_matches_the_reference(training) -> None:
    case = _case(130, 40, torch.float32, seed=5)
    case["x"] = case["x"] - case["x"].mean(0)  # a well-conditioned batch for fp32 autograd
    got = _run(case, "torch", training)
    for g, w in zip(got, _reference64(case, training), strict=True):
        torch.testing.assert_close(g.detach(), w.float().to(g.device), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_layer_on_any_leading_shape(backend: str) -> None:
    layer = Dice(6).to(DEVICE)
    with torch.no_grad():
        layer.alpha.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 6, device=DEVICE, requires_grad=True)
    with kernels.use_backend(backend):
        y = layer(x)
        y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and layer.alpha.grad is not None
    assert not torch.equal(layer.running_mean, torch.zeros(6, device=DEVICE))
    layer.eval()
    with kernels.use_backend(backend), torch.no_grad():
        assert layer(x).shape == x.shape


def test_bad_shapes_are_named() -> None:
    from recstack.pipelines.kernels.dice import dice_forward

    with pytest.raises(ValueError, match="alpha must be contiguous float32 \\[4\\]"):
        dice_forward(
            torch.zeros(3, 4), torch.zeros(5), torch.zeros(4), torch.ones(4),
            training=True, eps=1e-5, momentum=0.1,
        )  # fmt: skip
