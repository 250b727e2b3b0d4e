"""One fused Triton launch per optimizer step per parameter: read each touched row of the
weight, its gradient and its state once, update, write each once.

The rows are a coalesced gradient's (unique, in range). Every program takes ``BLOCK_R``
rows and walks their columns in ``BLOCK_D`` tiles; the weight and the state slots are
addressed through their :class:`~recstack.core.PagedTensor` page tables (core's
``_row_pointers``), so growable tables need no copy. Math is fp32; a bf16/fp16 weight is
rounded once on the way back (core's ``_to_table_dtype``, bit-identical to torch's
``.to()``). The equations are those of :mod:`recstack.sparse_optim.rules`, which is the
reference the tests hold this kernel to.

Bytes moved per step (``U`` rows, ``D`` = dim, ``E`` = weight element bytes, ``S`` = fp32
state floats per element): ``U * 8`` (rows) ``+ U * D * 4`` (gradient) ``+ 2 * U * D * E``
(weight read and written) ``+ 2 * U * D * 4 * S`` (state read and written); per-row slots
add ``2 * U * 4`` each. Row-wise Adagrad reads the gradient and weight twice (once for the
row's mean square), which its benchmark counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recstack.core import PagedTensor
from recstack.core.kernels import HAS_TRITON, record_launch
from recstack.core.kernels.paged_rows import _TABLE_KIND

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.paged_rows import _row_pointers, _to_table_dtype

__all__ = [
    "FUSED_STEP_DEFAULTS",
    "OPT_ADAGRAD",
    "OPT_ADAM",
    "OPT_FTRL",
    "OPT_ROWWISE",
    "OPT_SGD",
    "FusedStep",
    "fused_step",
]

OPT_SGD, OPT_ADAGRAD, OPT_ROWWISE, OPT_ADAM, OPT_FTRL = 0, 1, 2, 3, 4

#: Kernel tile defaults: rows per program, the column tile cap, warps per program. A
#: benchmark sweep (``benchmarks/sparse_optim.py --sweep``) edits this dict.
FUSED_STEP_DEFAULTS: dict[str, int] = {"block_r": 16, "max_block_d": 128, "num_warps": 4}


@dataclass(frozen=True)
class FusedStep:
    """One optimizer's step, as the kernel takes it.

    Attributes:
        opt: ``OPT_SGD``, ``OPT_ADAGRAD``, ``OPT_ROWWISE``, ``OPT_ADAM`` or ``OPT_FTRL``.
        lr: the step's learning rate (Adagrad's already decayed).
        params: up to six floats whose meaning depends on ``opt`` (see :func:`fused_step`).
        flags: up to three booleans whose meaning depends on ``opt``.
    """

    opt: int
    lr: float
    params: tuple[float, ...] = ()
    flags: tuple[bool, ...] = ()


if HAS_TRITON:

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    @triton.jit
    def _fused_step_kernel(
        rows_ptr,
        grad_ptr,
        grad_stride,
        n,
        dim,
        w_table,
        w_shift,
        w_mask,
        s0_table,
        s0_shift,
        s0_mask,
        s1_table,
        s1_shift,
        s1_mask,
        s2_table,
        s2_shift,
        s2_mask,
        lr,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        OPT: tl.constexpr,
        W_KIND: tl.constexpr,
        W_ALIGNED: tl.constexpr,
        S_ALIGNED: tl.constexpr,
        FLAG_A: tl.constexpr,
        FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < n
        row = tl.load(rows_ptr + r, mask=ok, other=0)
        wp = _row_pointers(w_table, row, ok, w_shift, w_mask, dim, W_KIND, W_ALIGNED)
        s0 = _row_pointers(s0_table, row, ok, s0_shift, s0_mask, dim, 0, S_ALIGNED)
        s1 = _row_pointers(s1_table, row, ok, s1_shift, s1_mask, dim, 0, S_ALIGNED)
        gp = grad_ptr + r * grad_stride
        if OPT == 2:
            # Row-wise Adagrad: the row's mean square first (one pass), then the update.
            acc_p = _row_pointers(s0_table, row, ok, s0_shift, s0_mask, 1, 0, False)
            sq = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, dim, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                m2 = ok[:, None] & (cols < dim)[None, :]
                g = tl.load(gp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                if p2 != 0.0:
                    w = tl.load(wp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                    g = g + p2 * w
                sq += tl.sum(g * g, axis=1)
            acc = tl.load(acc_p, mask=ok, other=0.0) + sq / dim
            tl.store(acc_p, acc, mask=ok)
            denom = tl.sqrt(acc) + p1
        if OPT == 3:
            if FLAG_C:
                # Per-row step counts: t and the bias corrections per row.
                t_p = _row_pointers(s2_table, row, ok, s2_shift, s2_mask, 1, 0, False)
                t = tl.load(t_p, mask=ok, other=0.0) + 1.0
                tl.store(t_p, t, mask=ok)
                bc1 = 1.0 - tl.exp2(t * p5)
                bc2 = 1.0 - tl.exp2(t * p6)
            else:
                bc1 = tl.zeros([BLOCK_R], dtype=tl.float32) + p5
                bc2 = tl.zeros([BLOCK_R], dtype=tl.float32) + p6
        for c0 in range(0, dim, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            m2 = ok[:, None] & (cols < dim)[None, :]
            g = tl.load(gp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            w = tl.load(wp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            a0 = s0[:, None] + cols[None, :]
            a1 = s1[:, None] + cols[None, :]
            if OPT == 0:
                if p2 != 0.0:
                    g = g + p2 * w
                if FLAG_A:
                    buf = p1 * tl.load(a0, mask=m2, other=0.0) + g
                    tl.store(a0, buf, mask=m2)
                    upd = buf
                    if FLAG_B:  # Nesterov
                        upd = g + p1 * buf
                    w = w - lr * upd
                else:
                    w = w - lr * g
            elif OPT == 1:
                if p2 != 0.0:
                    g = g + p2 * w
                acc = tl.load(a0, mask=m2, other=0.0) + g * g
                tl.store(a0, acc, mask=m2)
                w = w - lr * g / (tl.sqrt(acc) + p1)
            elif OPT == 2:
                if p2 != 0.0:
                    g = g + p2 * w
                w = w - lr * g / denom[:, None]
            elif OPT == 3:
                if p4 != 0.0:
                    if FLAG_A:
                        w = w * (1.0 - lr * p4)
                    else:
                        g = g + p4 * w
                m = p1 * tl.load(a0, mask=m2, other=0.0) + (1.0 - p1) * g
                v = p2 * tl.load(a1, mask=m2, other=0.0) + (1.0 - p2) * g * g
                tl.store(a0, m, mask=m2)
                tl.store(a1, v, mask=m2)
                if FLAG_B:
                    step = (lr * tl.sqrt(bc2) / bc1)[:, None]
                    w = w - step * m / (tl.sqrt(v) + p3)
                else:
                    w = w - (lr / bc1)[:, None] * m / (tl.sqrt(v) / tl.sqrt(bc2)[:, None] + p3)
            else:
                z = tl.load(a0, mask=m2, other=0.0)
                nacc = tl.load(a1, mask=m2, other=0.0)
                n_new = nacc + g * g
                sigma = (tl.sqrt(n_new) - tl.sqrt(nacc)) / lr
                z = z + g - sigma * w
                tl.store(a0, z, mask=m2)
                tl.store(a1, n_new, mask=m2)
                shrunk = z - _sign(z) * p2
                w = tl.where(tl.abs(z) <= p2, 0.0, -shrunk / ((p1 + tl.sqrt(n_new)) / lr + p3))
            tl.store(wp[:, None] + cols[None, :], _to_table_dtype(w, W_KIND), mask=m2)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def log2_beta(beta: float) -> float:
    """``log2(beta)`` for the kernel's per-row ``beta**t = exp2(t * log2(beta))``."""
    return math.log2(beta) if beta > 0 else float("-inf")


def fused_step(
    step: FusedStep,
    weight: PagedTensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    slots: list[PagedTensor],
) -> None:
    """Apply ``step`` to ``rows`` of ``weight`` and its ``slots`` in one launch.

    Args:
        step: the optimizer and its scalars. ``params`` by optimizer: SGD ``(momentum,
            weight_decay)``, flags ``(has_momentum, nesterov)``; Adagrad ``(eps,
            weight_decay)``; row-wise Adagrad ``(eps, weight_decay)``; Adam ``(beta1,
            beta2, eps, weight_decay, bc1, bc2)`` with the global bias corrections, or
            ``log2(beta1), log2(beta2)`` in their place with per-row steps, flags
            ``(decoupled, tf_compat, per_row_step)``; FTRL ``(beta, l1, l2)``.
        weight: the parameter's rows (fp32, bf16 or fp16).
        rows: int64 ``[U]`` unique rows in range (trusted: the optimizer checked them).
        grad: ``[U, dim]`` float gradient rows (unit column stride).
        slots: the state slots in the optimizer's order (fp32; per-row slots are 1 wide).
    """
    n, dim = rows.numel(), weight.dim
    if not n:
        return
    if grad.stride(1) != 1 and dim > 1:
        grad = grad.contiguous()
    tables = [(s.page_table, s.page_shift, s.page_mask) for s in slots]
    while len(tables) < 3:
        tables.append((weight.page_table, weight.page_shift, weight.page_mask))  # unused
    params = tuple(step.params) + (0.0,) * (6 - len(step.params))
    flags = tuple(step.flags) + (False,) * (3 - len(step.flags))
    aligned = all(bool(getattr(s, "_pages_aligned", False)) for s in slots)
    block_r = FUSED_STEP_DEFAULTS["block_r"]
    block_d = min(_pow2_ceil(dim), FUSED_STEP_DEFAULTS["max_block_d"])
    record_launch("sparse_optim_fused_step")
    _fused_step_kernel[(triton.cdiv(n, block_r),)](
        rows,
        grad,
        grad.stride(0),
        n,
        dim,
        weight.page_table,
        weight.page_shift,
        weight.page_mask,
        *tables[0],
        *tables[1],
        *tables[2],
        float(step.lr),
        *(float(p) for p in params),
        OPT=step.opt,
        W_KIND=_TABLE_KIND[weight.dtype],
        W_ALIGNED=bool(getattr(weight, "_pages_aligned", False)),
        S_ALIGNED=aligned,
        FLAG_A=bool(flags[0]),
        FLAG_B=bool(flags[1]),
        FLAG_C=bool(flags[2]),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=FUSED_STEP_DEFAULTS["num_warps"],
    )
