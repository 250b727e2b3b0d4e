"""The in-place softmax cross-entropy row kernel against F.cross_entropy and its autograd:
per-row loss and log-sum-exp, the gradient written over the block, ignored and bad
targets, label smoothing, -inf logits, empty and one-row blocks, several column tiles."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from backends import DEVICE

from recstack.core import kernels
from recstack.pipelines.kernels.cross_entropy import (
    cross_entropy_rows,
    cross_entropy_rows_reference,
)

# (loss / lse, gradient) tolerances: the gradient of a bf16 block is stored in bf16.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 8e-3)}


@pytest.fixture(autouse=True)
def on_the_device() -> Iterator[None]:
    """The tensors a test makes live on the GPU where there is one (the compiled kernels
    read no CPU tensor), else on the CPU."""
    with torch.device(DEVICE):
        yield


def _expected(z: torch.Tensor, target: torch.Tensor, eps: float, scale: torch.Tensor):
    """Per-row loss, lse and the scaled logits gradient from torch's autograd (fp32)."""
    zf = z.float().requires_grad_()
    loss = F.cross_entropy(zf, target, reduction="none", label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, zf, scale.float().expand(len(target)))
    ignored = target == -100
    lse = torch.where(ignored, 0.0, torch.logsumexp(zf.detach(), dim=1))
    return loss.detach(), lse, grad


def _targets(rows: int, vocab: int) -> torch.Tensor:
    target = torch.randint(0, vocab, (rows,))
    target[1::4] = -100
    if rows > 2:
        target[-1] = vocab - 1
    return target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 7), (1, 1), (1, 300), (9, 5), (37, 129)])
def test_rows_match_torch(backend, dtype, shape):
    torch.manual_seed(0)
    rows, vocab = shape
    z = (torch.randn(rows, vocab) * 3).to(dtype)
    target = _targets(rows, vocab)
    for eps, per_row in ((0.0, False), (0.1, True)):
        scale = torch.rand(rows) + 0.5 if per_row else torch.tensor([0.25])
        block = z.clone()
        loss, lse = cross_entropy_rows(block, target, label_smoothing=eps, grad_scale=scale)
        ref_loss, ref_lse, ref_grad = _expected(z, target, eps, scale)
        tol, grad_tol = TOL[dtype]
        assert loss.dtype == lse.dtype == torch.float32 and loss.shape == (rows,)
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
        assert block.dtype == dtype
        torch.testing.assert_close(block.float(), ref_grad, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_column_tiles(backend, dtype):
    # block_v 64 over 300 columns: five tiles, the last one partial; the running max moves.
    torch.manual_seed(1)
    z = (torch.randn(6, 300) * 4).to(dtype)
    z[2, 250] = 40.0  # the max in the last tile
    target = torch.tensor([0, 299, 250, -100, 64, 63])
    scale = torch.tensor([0.5])
    block = z.clone()
    loss, lse = cross_entropy_rows(
        block, target, label_smoothing=0.05, grad_scale=scale, block_v=64
    )
    ref_loss, ref_lse, ref_grad = _expected(z, target, 0.05, scale)
    tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(block.float(), ref_grad, rtol=grad_tol, atol=grad_tol)


def test_loss_only_leaves_block(backend):
    torch.manual_seed(2)
    z = torch.randn(5, 33)
    block = z.clone()
    target = torch.tensor([3, -100, 0, 32, 7])
    loss, _ = cross_entropy_rows(block, target)
    assert torch.equal(block, z)
    ref = F.cross_entropy(z, target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_ignored_row_is_not_read(backend):
    z = torch.randn(3, 20)
    z[1] = float("nan")
    target = torch.tensor([4, -100, 19])
    loss, lse = cross_entropy_rows(z, target, grad_scale=torch.ones(1))
    assert loss[1].item() == 0.0 and lse[1].item() == 0.0
    assert torch.equal(z[1], torch.zeros(20))
    assert torch.isfinite(loss).all() and torch.isfinite(z).all()


def test_custom_ignore_index(backend):
    z = torch.randn(3, 10)
    target = torch.tensor([7, 2, 7])
    loss, _ = cross_entropy_rows(z.clone(), target, ignore_index=7)
    assert loss[0].item() == 0.0 and loss[2].item() == 0.0
    ref = F.cross_entropy(z[1:2], target[1:2], reduction="none")
    torch.testing.assert_close(loss[1:2], ref, rtol=1e-5, atol=1e-6)


def test_bad_target_is_flagged_not_read(backend):
    z = torch.randn(4, 12)
    target = torch.tensor([1, 12, -5, 3])
    bad_row = torch.full((1,), -1)
    block = z.clone()
    loss, _ = cross_entropy_rows(
        block, target, grad_scale=torch.ones(1), bad_row=bad_row, row_offset=100
    )
    assert bad_row.item() in (101, 102)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(block[1:3]).all() and torch.isfinite(block[[0, 3]]).all()


def test_valid_targets_leave_bad_row(backend):
    bad_row = torch.full((1,), -1)
    cross_entropy_rows(torch.randn(3, 4), torch.tensor([0, 3, -100]), bad_row=bad_row)
    assert bad_row.item() == -1


def test_minus_inf_logits(backend):
    # Items masked with -inf (a whole 64-column tile of them in row 0): no NaN.
    z = torch.randn(2, 200)
    z[0, :64] = float("-inf")
    z[1, 150:] = float("-inf")
    target = torch.tensor([100, 3])
    block = z.clone()
    loss, _ = cross_entropy_rows(block, target, grad_scale=torch.ones(1), block_v=64)
    ref_loss, _, ref_grad = _expected(z, target, 0.0, torch.ones(1))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(block[0, :64], torch.zeros(64))


def test_large_logits_are_stable(backend):
    z = torch.randn(3, 50) + torch.tensor([[1e4], [-1e4], [0.0]])
    target = torch.tensor([1, 2, 3])
    block = z.clone()
    loss, _ = cross_entropy_rows(block, target, grad_scale=torch.ones(1))
    ref_loss, _, ref_grad = _expected(z, target, 0.0, torch.ones(1))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block, ref_grad, rtol=1e-4, atol=1e-5)


def test_strided_rows_and_output_buffers(backend):
    # A block whose rows are padded (row stride 48 for 37 columns), as the op allocates it.
    torch.manual_seed(3)
    storage = torch.randn(5, 48)
    block = storage[:, :37]
    z = block.clone()
    target = torch.tensor([0, 36, -100, 5, 9])
    loss_out, lse_out = torch.empty(5), torch.empty(5)
    loss, lse = cross_entropy_rows(
        block, target, grad_scale=torch.ones(1), loss_out=loss_out, lse_out=lse_out
    )
    assert loss is loss_out and lse is lse_out
    ref_loss, _, ref_grad = _expected(z, target, 0.0, torch.ones(1))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block, ref_grad, rtol=1e-5, atol=1e-6)


def test_one_launch_a_call(backend):
    with kernels.count_launches() as launches:
        cross_entropy_rows(torch.randn(4, 9), torch.tensor([0, 1, 2, 3]), grad_scale=torch.ones(1))
    name = "cross_entropy_rows" if backend == "triton" else "cross_entropy_rows_reference"
    assert launches == {name: 1}


def test_kernel_matches_reference_exactly_on_tied_inputs(backend):
    # Both paths side by side on one input (the reference is what the CPU op runs).
    torch.manual_seed(4)
    z = torch.randn(7, 77)
    target = torch.tensor([0, 76, 5, -100, 40, 1, 2])
    a, b = z.clone(), z.clone()
    la, sa = cross_entropy_rows(a, target, label_smoothing=0.2, grad_scale=torch.full((1,), 2.0))
    lb, sb = cross_entropy_rows_reference(
        b, target, label_smoothing=0.2, grad_scale=torch.full((1,), 2.0)
    )
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    z = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        cross_entropy_rows(torch.randn(4), t)
    with pytest.raises(ValueError, match="at least one column"):
        cross_entropy_rows(torch.randn(3, 0), t)
    with pytest.raises(TypeError, match="logits must be float32"):
        cross_entropy_rows(z.double(), t)
    with pytest.raises(ValueError, match="unit column stride"):
        cross_entropy_rows(torch.randn(4, 3).t(), t)
    with pytest.raises(ValueError, match="target must be a 1-D tensor of 3"):
        cross_entropy_rows(z, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="target must be an integer"):
        cross_entropy_rows(z, t.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_rows(z, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="grad_scale"):
        cross_entropy_rows(z, t, grad_scale=torch.ones(2))
    with pytest.raises(ValueError, match="bad_row"):
        cross_entropy_rows(z, t, bad_row=torch.zeros(1))
    with pytest.raises(ValueError, match="loss_out"):
        cross_entropy_rows(z, t, loss_out=torch.empty(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu_wide_rows(dtype):
    torch.manual_seed(5)
    z = (torch.randn(300, 100_003, device="cuda") * 2).to(dtype)
    target = torch.randint(0, 100_003, (300,), device="cuda")
    target[::7] = -100
    scale = torch.full((1,), 1 / 300, device="cuda")
    block = z.clone()
    with kernels.use_backend("triton"):
        loss, lse = cross_entropy_rows(block, target, label_smoothing=0.1, grad_scale=scale)
    ref_loss, ref_lse, ref_grad = _expected(z, target, 0.1, scale)
    grad_rtol = 1e-4 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.float(), ref_grad, rtol=grad_rtol, atol=1e-5)


def test_docstring_examples():
    import doctest

    from recstack.pipelines.kernels import cross_entropy as module

    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
