"""Dice, DIN's data-adaptive activation, in four Triton kernels (two forward, two
backward) instead of a couple of dozen elementwise and reduction launches.

Dice of ``x`` (``[N, C]``, channels last) is ``y = x * (alpha + (1 - alpha) * p)`` with
``p = sigmoid((x - mean) * rstd)``, ``rstd = 1 / sqrt(var + eps)``. In training ``mean`` and
``var`` are the batch's per-channel statistics (biased variance) and the running averages
move towards them; in eval they are the running averages.

* forward: :func:`dice_forward`. A first kernel sums each block of rows' ``x - x[0]`` and
  its square per channel (shifted by the first row, so a channel far from zero keeps its
  variance's digits); a second reduces those partial sums, writes ``y`` and, from its first
  row block, the statistics and the running averages.
* backward: :func:`dice_backward`. With ``z = (x - mean) * rstd`` and
  ``g = dy * x * (1 - alpha) * p * (1 - p)`` (the gradient reaching ``z``), ``dx = dy * gate
  + rstd * (g - mean(g) - z * mean(g * z))`` through the batch statistics (``dy * gate +
  rstd * g`` with fixed statistics) and ``dalpha = sum(dy * x * (1 - p))``. A first kernel
  sums ``g``, ``g * z`` and ``dy * x * (1 - p)`` per block of rows, a second reduces them
  and writes ``dx`` (and ``dalpha``).

Statistics and sums are fp32 whatever ``x``'s dtype; ``y`` and ``dx`` take ``x``'s dtype.
:func:`dice_reference` is the torch version the kernels are tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recstack.core.kernels import HAS_TRITON, record_launch
from recstack.core.kernels.host import next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.launch import FastKernel

__all__ = ["DiceSaved", "dice_backward", "dice_forward", "dice_reference"]

#: Rows per block of the partial-sum kernels, and the most channels a program covers.
_BLOCK_N = 32
_MAX_BLOCK_C = 64


class DiceSaved(NamedTuple):
    """What the forward keeps for the backward: fp32 ``[C]`` mean and rstd used."""

    mean: torch.Tensor
    rstd: torch.Tensor


def dice_reference(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    eps: float,
    momentum: float,
) -> torch.Tensor:
    """Dice of ``x`` ``[N, C]`` in torch (differentiable); in training, with batch
    statistics, updating ``running_mean`` / ``running_var`` in place.

    Args:
        x: the input, channels last.
        alpha: fp32 ``[C]``.
        running_mean: fp32 ``[C]``.
        running_var: fp32 ``[C]``.
        training: batch statistics (and update the running ones) or the running ones.
        eps: added to the variance.
        momentum: weight of the batch in the running averages.
    """
    flat = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
    if training and flat.shape[0] > 0:
        var, mean = torch.var_mean(flat, dim=0, unbiased=False)
        with torch.no_grad():
            running_mean.lerp_(mean.detach(), momentum)
            running_var.lerp_(var.detach(), momentum)
    else:
        mean, var = running_mean, running_var
    p = torch.sigmoid((flat - mean) * torch.rsqrt(var + eps))
    return (p * flat + (1 - p) * alpha * flat).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _tile(n, c, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's channels and rows: ``(cols, col_ok, ok, at)``, ``at`` the
        ``[BLOCK_N, BLOCK_C]`` element offsets and ``ok`` their mask."""
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < c
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (rows < n)[:, None] & col_ok[None, :]
        return cols, col_ok, ok, rows[:, None] * c + cols[None, :]

    @triton.jit
    def _sum_blocks(part_ptr, slot, n_blocks, c, cols, col_ok, BLOCK_P: tl.constexpr):
        """Per channel, the sum over the row blocks of ``part[slot]`` (``[S, n_blocks, c]``)."""
        acc = tl.zeros(cols.shape, dtype=tl.float32)
        base = part_ptr + slot * n_blocks.to(tl.int64) * c
        for start in range(0, n_blocks, BLOCK_P):
            blk = start + tl.arange(0, BLOCK_P)
            m = (blk < n_blocks)[:, None] & col_ok[None, :]
            at = blk.to(tl.int64)[:, None] * c + cols[None, :]
            acc += tl.sum(tl.load(base + at, mask=m, other=0.0), axis=0)
        return acc

    @triton.jit(do_not_specialize=["n"])
    def _dice_stats_kernel(
        x_ptr,
        part_ptr,
        n,
        c,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # part [2, n_blocks, c]: sums of x - x[0] and of its square over this row block.
        cols, col_ok, ok, at = _tile(n, c, BLOCK_N, BLOCK_C)
        shift = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + at, mask=ok, other=0.0)
        d = tl.where(ok, v.to(tl.float32) - shift[None, :], 0.0)
        out = tl.program_id(0).to(tl.int64) * c + cols
        tl.store(part_ptr + out, tl.sum(d, axis=0), mask=col_ok)
        step = tl.num_programs(0).to(tl.int64) * c
        tl.store(part_ptr + step + out, tl.sum(d * d, axis=0), mask=col_ok)

    @triton.jit(do_not_specialize=["n", "n_blocks"])
    def _dice_apply_kernel(
        x_ptr,
        y_ptr,
        alpha_ptr,
        part_ptr,
        mean_ptr,
        rstd_ptr,
        run_mean_ptr,
        run_var_ptr,
        n,
        c,
        n_blocks,
        eps,
        momentum,
        BATCH_STATS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        cols, col_ok, ok, at = _tile(n, c, BLOCK_N, BLOCK_C)
        if BATCH_STATS:
            s1 = _sum_blocks(part_ptr, 0, n_blocks, c, cols, col_ok, BLOCK_P)
            s2 = _sum_blocks(part_ptr, 1, n_blocks, c, cols, col_ok, BLOCK_P)
            shift = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            inv_n = 1.0 / n.to(tl.float32)
            dm = s1 * inv_n
            var = tl.maximum(s2 * inv_n - dm * dm, 0.0)
            mean = shift + dm
            rstd = 1.0 / tl.sqrt(var + eps)
            if tl.program_id(0) == 0:
                tl.store(mean_ptr + cols, mean, mask=col_ok)
                tl.store(rstd_ptr + cols, rstd, mask=col_ok)
                rm = tl.load(run_mean_ptr + cols, mask=col_ok, other=0.0)
                rv = tl.load(run_var_ptr + cols, mask=col_ok, other=0.0)
                tl.store(run_mean_ptr + cols, rm + momentum * (mean - rm), mask=col_ok)
                tl.store(run_var_ptr + cols, rv + momentum * (var - rv), mask=col_ok)
        else:
            mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
            rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        p = tl.sigmoid((v - mean[None, :]) * rstd[None, :])
        y = v * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["n"])
    def _dice_grad_sums_kernel(
        x_ptr,
        dy_ptr,
        alpha_ptr,
        mean_ptr,
        rstd_ptr,
        part_ptr,
        n,
        c,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # part [3, n_blocks, c]: sums of g, g * z and dy * x * (1 - p) over this row block.
        cols, col_ok, ok, at = _tile(n, c, BLOCK_N, BLOCK_C)
        n_blocks = tl.num_programs(0).to(tl.int64)
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        z = (v - mean[None, :]) * rstd[None, :]
        p = tl.sigmoid(z)
        dyx = dy * v
        g = tl.where(ok, dyx * (1.0 - alpha[None, :]) * p * (1.0 - p), 0.0)
        da = tl.where(ok, dyx * (1.0 - p), 0.0)
        out = tl.program_id(0).to(tl.int64) * c + cols
        tl.store(part_ptr + out, tl.sum(g, axis=0), mask=col_ok)
        tl.store(part_ptr + n_blocks * c + out, tl.sum(g * z, axis=0), mask=col_ok)
        tl.store(part_ptr + 2 * n_blocks * c + out, tl.sum(da, axis=0), mask=col_ok)

    @triton.jit(do_not_specialize=["n", "n_blocks"])
    def _dice_grad_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        alpha_ptr,
        mean_ptr,
        rstd_ptr,
        part_ptr,
        dalpha_ptr,
        n,
        c,
        n_blocks,
        BATCH_STATS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        cols, col_ok, ok, at = _tile(n, c, BLOCK_N, BLOCK_C)
        sg = _sum_blocks(part_ptr, 0, n_blocks, c, cols, col_ok, BLOCK_P)
        sgz = _sum_blocks(part_ptr, 1, n_blocks, c, cols, col_ok, BLOCK_P)
        if tl.program_id(0) == 0:
            sa = _sum_blocks(part_ptr, 2, n_blocks, c, cols, col_ok, BLOCK_P)
            tl.store(dalpha_ptr + cols, sa, mask=col_ok)
        inv_n = 1.0 / n.to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        z = (v - mean[None, :]) * rstd[None, :]
        p = tl.sigmoid(z)
        gate = alpha[None, :] + (1.0 - alpha[None, :]) * p
        g = dy * v * (1.0 - alpha[None, :]) * p * (1.0 - p)
        if BATCH_STATS:
            g = g - (sg * inv_n)[None, :] - z * (sgz * inv_n)[None, :]
        dx = dy * gate + rstd[None, :] * g
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)

    _STATS = FastKernel(_dice_stats_kernel)
    _APPLY = FastKernel(_dice_apply_kernel)
    _GRAD_SUMS = FastKernel(_dice_grad_sums_kernel)
    _GRAD = FastKernel(_dice_grad_kernel)


def _tiles(n: int, c: int) -> tuple[int, int, int]:
    """``(BLOCK_C, row blocks, BLOCK_P)``."""
    block_c = min(next_pow2(max(c, 1)), _MAX_BLOCK_C)
    n_blocks = max(1, -(-n // _BLOCK_N))
    return block_c, n_blocks, min(next_pow2(n_blocks), 64)


def _check(x: torch.Tensor, alpha: torch.Tensor, *stats: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"dice: x must be a contiguous [N, C] tensor, got {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in zip(("alpha", "mean", "var"), (alpha, *stats), strict=False):
        if t.shape != (c,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"dice: {name} must be contiguous float32 [{c}], got {t.dtype} {tuple(t.shape)}"
            )


def dice_forward(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    eps: float,
    momentum: float,
) -> tuple[torch.Tensor, DiceSaved]:
    """Dice of ``x`` with the Triton kernels (see the module docs); in training, updates
    ``running_mean`` / ``running_var`` in place.

    Args:
        x: contiguous ``[N, C]``, float32 or bfloat16.
        alpha: float32 ``[C]``.
        running_mean: float32 ``[C]``.
        running_var: float32 ``[C]``.
        training: batch statistics (and update the running ones) or the running ones.
        eps: added to the variance.
        momentum: weight of the batch in the running averages.

    Returns:
        ``y`` (``x``'s dtype) and what :func:`dice_backward` needs.
    """
    _check(x, alpha, running_mean, running_var)
    n, c = x.shape
    y = torch.empty_like(x)
    batch_stats = training and n > 0
    if batch_stats:
        mean = torch.empty(c, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
    else:
        mean = running_mean.clone()
        rstd = torch.rsqrt(running_var + eps)
    if n == 0 or c == 0:
        return y, DiceSaved(mean, rstd)
    block_c, n_blocks, block_p = _tiles(n, c)
    grid = (n_blocks, triton.cdiv(c, block_c))
    # Without batch statistics the apply kernel reads no partial sums.
    part = (
        torch.empty((2, n_blocks, c), dtype=torch.float32, device=x.device) if batch_stats else mean
    )
    if batch_stats:
        _STATS(grid, x, part, n, c, _BLOCK_N, block_c, num_warps=4)
        record_launch("dice_stats")
    _APPLY(
        grid, x, y, alpha, part, mean, rstd, running_mean, running_var, n, c, n_blocks,
        float(eps), float(momentum), batch_stats, _BLOCK_N, block_c, block_p, num_warps=4,
    )  # fmt: skip
    record_launch("dice_apply")
    return y, DiceSaved(mean, rstd)


def dice_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    saved: DiceSaved,
    *,
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dalpha)`` of :func:`dice_forward` with the Triton kernels.

    Args:
        dy: the output's gradient, ``x``'s shape (any float dtype).
        x: the forward's input.
        alpha: the forward's ``alpha``.
        saved: the forward's :class:`DiceSaved`.
        batch_stats: the forward used the batch's statistics (training with rows).
    """
    n, c = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    if n == 0 or c == 0:
        return dx, torch.zeros(c, dtype=torch.float32, device=x.device)
    dalpha = torch.empty(c, dtype=torch.float32, device=x.device)
    block_c, n_blocks, block_p = _tiles(n, c)
    grid = (n_blocks, triton.cdiv(c, block_c))
    part = torch.empty((3, n_blocks, c), dtype=torch.float32, device=x.device)
    _GRAD_SUMS(
        grid, x, dy, alpha, saved.mean, saved.rstd, part, n, c, _BLOCK_N, block_c, num_warps=4
    )
    _GRAD(
        grid, x, dy, dx, alpha, saved.mean, saved.rstd, part, dalpha, n, c, n_blocks,
        batch_stats, _BLOCK_N, block_c, block_p, num_warps=4,
    )  # fmt: skip
    record_launch("dice_grad", 2)
    return dx, dalpha
