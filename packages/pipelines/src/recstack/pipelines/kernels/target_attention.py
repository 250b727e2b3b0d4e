"""DIN target attention over jagged behaviour sequences: one fused forward kernel, one fused
backward kernel, and the plain-torch reference beside them.

Per batch row ``b`` with candidate ``q`` (``[D]``) and behaviours ``k_l`` (``[D]``, ``l <
len_b``), an MLP scores each behaviour from ``x = [q, k, q - k, q * k]``::

    h1 = act(x @ W1 + b1); h2 = act(h1 @ W2 + b2)   (h2 only with two hidden layers)
    s_l = h2 @ w3 + b3;    w = softmax(s) over the row's positions, or w = s
    out_b = sum_l w_l * k_l                          -> [B, D]

Row ``b``'s behaviours are the positions ``offsets[b]:offsets[b+1]`` (jagged), or
``starts[b]:starts[b] + lengths[b]`` (spans: any disjoint ranges, e.g. a padded ``[B, L, D]``
tensor used in place as ``values = keys.reshape(B * L, D)``, ``starts = arange(B) * L``,
``lengths = lengths.clamp(0, L)``: no packing, no host sync). The kernels read each row's
start and length; offsets become ``starts = offsets[:-1]`` (a view) and ``lengths =
diff(offsets)``. At those positions the behaviours are either ``values`` rows or rows of a
``table`` gathered by ``row_ids`` inside the kernels (a plain ``[R, D]`` tensor, or a
:class:`~recstack.core.paged.PagedTensor` read through its page table with core's
``tl_row_pointers``; a negative id reads a zero row), so an embedding lookup fuses into the
op: no ``[N, D]`` copy of the rows, no ``[N, 4D]`` or ``[N, H]`` intermediate. Memory beyond
inputs and outputs is ``O(B * (D + H1))`` plus the backward's per-program weight-gradient
partials; the backward's ``d_rows`` (``[N, D]``, the gradient of each gathered row, aligned
with ``row_ids``) is an output. With spans, positions no row covers (the padding) get zero
gradient: ``d_rows`` starts zeroed and the kernel writes only covered positions.

The first layer is split per row: ``x @ W1 = k @ M_b + c_b`` with ``M_b = (Wk - Wd) + diag(q)
Wp`` (``[D, H1]``) and ``c_b = q @ (Wq + Wd) + b1``, where ``Wq, Wk, Wd, Wp`` are the
``[D, H1]`` blocks of ``W1`` that meet ``q, k, q - k, q * k``. A program builds ``M_b`` once per
row and each block of ``BLOCK_L`` behaviours costs one ``[BLOCK_L, D] x [D, H1]`` ``tl.dot``;
``c`` for all rows is one ``[B, D] x [D, H1]`` matmul on the host side.

Forward (:func:`target_attention_forward`): one program per row loops over its behaviours in
blocks; with softmax it keeps an online (running max, running sum) pair so one pass suffices,
and saves ``(max, sum)`` per row and the fp32 output for the backward.

Backward (:func:`target_attention_backward`): ``P`` persistent programs (one per SM by
default) take the rows longest first, dealt in snake order, so each gets a similar share of
behaviours. A program recomputes the scores of a block (activations are never stored), then
back-propagates through the MLP: ``d_rows`` is written per behaviour, ``d_query`` and ``dc_b``
per row. The second and output layers' gradients accumulate in registers over all the rows
of the program; the first layer's row sums ``dM_b`` are added to the program's own fp32
partials after each row. The partials are summed after the launch (``P`` fixed per device:
deterministic, no atomics). ``dW1`` is reassembled from ``sum_b dM_b`` (the ``Wk``/``Wd``
blocks), ``sum_b q_b * dM_b`` (the ``Wp`` block) and ``Q^T dC`` (the ``Wq``/``Wd`` blocks, a
matmul).

Numerics: everything accumulates in fp32. fp32 inputs use fp32 ``tl.dot`` (``"ieee"``, or TF32
when ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's own matmuls do); bf16 inputs
use bf16 operands with fp32 accumulation on the GPU (like autocast), and fp32 dots under
Triton's interpreter, whose bf16 dot is not usable. Supported activations:
:data:`FUSED_ACTIVATIONS` (PReLU and Dice, which learn parameters or batch statistics, are
not: use the unfused module for them).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from recstack.core.kernels import HAS_TRITON, interpret_mode, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.paged import PagedTensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_row_pointers, tl_to_table_dtype

__all__ = [
    "FUSED_ACTIVATIONS",
    "MAX_FUSED_WIDTH",
    "TARGET_ATTENTION_DEFAULTS",
    "TargetAttentionGrads",
    "TargetAttentionSaved",
    "activation_code",
    "gather_table_rows",
    "target_attention_backward",
    "target_attention_forward",
    "padded_target_attention_reference",
    "target_attention_reference",
]

#: Activations the fused kernels compute, with the code the kernels take.
FUSED_ACTIVATIONS: dict[str, int] = {
    "sigmoid": 0,
    "relu": 1,
    "tanh": 2,
    "leaky_relu": 3,
    "silu": 4,
    "gelu": 5,
}
_LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default, which the unfused MLP uses

#: The widest ``D``, ``H1`` or ``H2`` the kernels take: a row's ``[D, H1]`` first-layer
#: matrix and the weight-gradient accumulators live in registers.
MAX_FUSED_WIDTH = 256

#: Tile defaults (override per call with keywords, or here for every call). ``block_l``:
#: behaviours per step (the mean row length's power of two when smaller, at least 16 for
#: ``tl.dot``); ``programs_per_sm``: the backward's persistent programs per SM.
#:
#: Chosen from sm_90 compiles (registers / spills per thread, D 32 and 64, hidden (80, 40),
#: two layers, softmax, gathered rows): the forward at 32 x 8 warps takes 80 (fp32) to 101
#: (bf16) registers, no spills (4 warps spill kilobytes with fp32 products); the backward at
#: 16 x 8 warps takes 246-255 registers and spills 0-64 bytes in bf16 and TF32, 350-550
#: bytes with full fp32 products (32 behaviours a step, or 4 warps, spill 1-9 KB). At 255
#: registers x 8 warps one program fills an SM's register file, hence one per SM.
TARGET_ATTENTION_DEFAULTS: dict[str, int] = {
    "block_l": 32,
    "num_warps": 8,
    "backward_block_l": 16,
    "backward_num_warps": 8,
    "programs_per_sm": 1,
}

_DTYPES = (torch.float32, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CPU_PROGRAMS = 4  # the interpreter runs programs one by one: a few partials suffice


class TargetAttentionSaved(NamedTuple):
    """What the forward keeps for the backward (all ``None`` without softmax).

    Attributes:
        stats: fp32 ``[B, 2]``: each row's score max and sum of ``exp(s - max)``.
        out_f32: fp32 ``[B, D]``: the output before rounding to the input dtype.
        prepared: the layers' weights as the kernels read them and each row's first-layer
            bias, as the forward computed them (the backward reuses them instead of
            recomputing; ``None``: recompute). Valid while the weights and query are
            unchanged.
    """

    stats: torch.Tensor | None
    out_f32: torch.Tensor | None
    prepared: _Prepared | None = None


class TargetAttentionGrads(NamedTuple):
    """Gradients of :func:`target_attention_forward`'s inputs.

    Attributes:
        query: ``[B, D]`` in the query's dtype.
        rows: ``[N, D]``: the gradient of each behaviour row, aligned with ``values`` /
            ``row_ids`` (fp32 or the rows' dtype, as asked); zero at positions no span
            covers.
        layers: ``(weight, bias)`` gradients of each linear layer, in the layers' dtypes.
    """

    query: torch.Tensor
    rows: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor]]


if HAS_TRITON:

    @triton.jit
    def _activate(z, ACT: tl.constexpr):
        if ACT == 0:
            y = tl.sigmoid(z)
        elif ACT == 1:
            y = tl.maximum(z, 0.0)
        elif ACT == 2:
            y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        elif ACT == 3:
            y = tl.where(z > 0, z, z * 0.01)
        elif ACT == 4:
            y = z * tl.sigmoid(z)
        else:
            y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return y

    @triton.jit
    def _activate_grad(z, y, ACT: tl.constexpr):
        # d act(z) / dz from the pre-activation z and the activation y.
        if ACT == 0:
            d = y * (1.0 - y)
        elif ACT == 1:
            d = tl.where(z > 0, 1.0, 0.0)
        elif ACT == 2:
            d = 1.0 - y * y
        elif ACT == 3:
            d = tl.where(z > 0, 1.0, 0.01)
        elif ACT == 4:
            sg = tl.sigmoid(z)
            d = sg * (1.0 + z * (1.0 - sg))
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            d = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return d

    @triton.jit
    def _dot(a, b, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
        if DOT_BF16:
            c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            c = tl.dot(a, b, input_precision=PRECISION)
        return c

    @triton.jit
    def _load_rows(
        src_ptr,
        row_ids_ptr,
        pos,
        ok,
        cols,
        col_ok,
        src_stride,
        page_shift,
        page_mask,
        dim,
        GATHER: tl.constexpr,
        PAGED: tl.constexpr,
        ROWS_KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        # A block of behaviour rows (int64 offsets): values[pos], or table[row_ids[pos]] from
        # a plain [R, D] table or, with PAGED, through a PagedTensor's page table (src_ptr).
        # A negative row id (an id the embedding's admission filter left out) reads zeros.
        if GATHER:
            rows = tl.load(row_ids_ptr + pos, mask=ok, other=-1).to(tl.int64)
            ok = ok & (rows >= 0)
            if PAGED:
                row_ptrs = tl_row_pointers(
                    src_ptr, rows, ok, page_shift, page_mask, dim, ROWS_KIND, ALIGNED
                )
                x = tl.load(
                    row_ptrs[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0
                )
            else:
                x = tl.load(
                    src_ptr + rows[:, None] * src_stride + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
        else:
            x = tl.load(
                src_ptr + pos[:, None] * src_stride + cols[None, :],
                mask=ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        return x

    @triton.jit
    def _row_matrix(base_ptr, prod_ptr, q, cols, col_ok, hid, hid_ok, hidden1):
        # M_b = (Wk - Wd) + diag(q) Wp, [BLOCK_D, BLOCK_H1] fp32 (zero outside D x H1).
        at = cols[:, None] * hidden1 + hid[None, :]
        m = col_ok[:, None] & hid_ok[None, :]
        base = tl.load(base_ptr + at, mask=m, other=0.0)
        prod = tl.load(prod_ptr + at, mask=m, other=0.0)
        return base + q[:, None] * prod

    @triton.jit
    def _target_attention_fwd_kernel(
        query_ptr,
        src_ptr,
        row_ids_ptr,
        starts_ptr,
        lengths_ptr,
        base_ptr,
        prod_ptr,
        bias1_ptr,
        w2_ptr,
        b2_ptr,
        w3_ptr,
        b3_ptr,
        out_ptr,
        out_f32_ptr,
        stats_ptr,
        dim,
        hidden1,
        hidden2,
        query_stride,
        src_stride,
        out_stride,
        page_shift,
        page_mask,
        ACT: tl.constexpr,
        SOFTMAX: tl.constexpr,
        GATHER: tl.constexpr,
        PAGED: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS_KIND: tl.constexpr,
        TWO_LAYERS: tl.constexpr,
        OUT_KIND: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_H1: tl.constexpr,
        BLOCK_H2: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        start = tl.load(starts_ptr + b)
        end = start + tl.load(lengths_ptr + b)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        hid1 = tl.arange(0, BLOCK_H1)
        hid1_ok = hid1 < hidden1
        q = tl.load(query_ptr + b * query_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        m_op = _row_matrix(base_ptr, prod_ptr, q, cols, col_ok, hid1, hid1_ok, hidden1)
        if DOT_BF16:
            m_op = m_op.to(tl.bfloat16)
        c = tl.load(bias1_ptr + b * hidden1 + hid1, mask=hid1_ok, other=0.0)
        b3 = tl.load(b3_ptr)
        if TWO_LAYERS:
            hid2 = tl.arange(0, BLOCK_H2)
            hid2_ok = hid2 < hidden2
            w2 = tl.load(
                w2_ptr + hid1[:, None] * hidden2 + hid2[None, :],
                mask=hid1_ok[:, None] & hid2_ok[None, :],
                other=0.0,
            )
            if DOT_BF16:
                w2 = w2.to(tl.bfloat16)
            b2 = tl.load(b2_ptr + hid2, mask=hid2_ok, other=0.0)
            w3 = tl.load(w3_ptr + hid2, mask=hid2_ok, other=0.0)
        else:
            w3 = tl.load(w3_ptr + hid1, mask=hid1_ok, other=0.0)

        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        run_max = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)
        run_sum = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
        lane = tl.arange(0, BLOCK_L)
        for l0 in range(0, end - start, BLOCK_L):
            pos = start + l0 + lane
            ok = pos < end
            k = _load_rows(
                src_ptr, row_ids_ptr, pos, ok, cols, col_ok, src_stride, page_shift, page_mask,
                dim, GATHER, PAGED, ROWS_KIND, ALIGNED,
            )  # fmt: skip
            kf = k.to(tl.float32)
            a1 = _activate(_dot(kf, m_op, DOT_BF16, PRECISION) + c[None, :], ACT)
            if TWO_LAYERS:
                a2 = _activate(_dot(a1, w2, DOT_BF16, PRECISION) + b2[None, :], ACT)
                s = tl.sum(a2 * w3[None, :], axis=1) + b3
            else:
                s = tl.sum(a1 * w3[None, :], axis=1) + b3
            if SOFTMAX:
                s = tl.where(ok, s, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(s, axis=0))
                # The first block has a valid position, so new_max is finite from then on.
                scale = tl.exp(run_max - new_max)
                p = tl.where(ok, tl.exp(s - new_max), 0.0)
                run_sum = run_sum * scale + tl.sum(p, axis=0)
                acc = acc * scale + tl.sum(p[:, None] * kf, axis=0)
                run_max = new_max
            else:
                acc += tl.sum(tl.where(ok, s, 0.0)[:, None] * kf, axis=0)
        if SOFTMAX:
            acc = acc / tl.where(run_sum > 0, run_sum, 1.0)
            tl.store(stats_ptr + 2 * b, run_max)
            tl.store(stats_ptr + 2 * b + 1, run_sum)
            tl.store(out_f32_ptr + b * dim + cols, acc, mask=col_ok)
        tl.store(out_ptr + b * out_stride + cols, tl_to_table_dtype(acc, OUT_KIND), mask=col_ok)

    @triton.jit(do_not_specialize=["batch"])
    def _target_attention_bwd_kernel(
        grad_ptr,
        query_ptr,
        src_ptr,
        row_ids_ptr,
        starts_ptr,
        lengths_ptr,
        row_order_ptr,
        base_ptr,
        prod_ptr,
        bias1_ptr,
        w2_ptr,
        b2_ptr,
        w3_ptr,
        b3_ptr,
        stats_ptr,
        out_f32_ptr,
        d_rows_ptr,
        d_query_ptr,
        d_bias1_ptr,
        part_base_ptr,
        part_prod_ptr,
        part_w2_ptr,
        part_b2_ptr,
        part_w3_ptr,
        part_b3_ptr,
        batch,
        dim,
        hidden1,
        hidden2,
        grad_stride,
        query_stride,
        src_stride,
        page_shift,
        page_mask,
        ACT: tl.constexpr,
        SOFTMAX: tl.constexpr,
        GATHER: tl.constexpr,
        PAGED: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS_KIND: tl.constexpr,
        TWO_LAYERS: tl.constexpr,
        D_ROWS_KIND: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_H1: tl.constexpr,
        BLOCK_H2: tl.constexpr,
    ):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        hid1 = tl.arange(0, BLOCK_H1)
        hid1_ok = hid1 < hidden1
        hid2 = tl.arange(0, BLOCK_H2)
        hid2_ok = hid2 < hidden2
        lane = tl.arange(0, BLOCK_L)
        b3 = tl.load(b3_ptr)
        if TWO_LAYERS:
            w2 = tl.load(
                w2_ptr + hid1[:, None] * hidden2 + hid2[None, :],
                mask=hid1_ok[:, None] & hid2_ok[None, :],
                other=0.0,
            )
            if DOT_BF16:
                w2 = w2.to(tl.bfloat16)
            b2 = tl.load(b2_ptr + hid2, mask=hid2_ok, other=0.0)
            w3 = tl.load(w3_ptr + hid2, mask=hid2_ok, other=0.0)
            acc_w2 = tl.zeros((BLOCK_H1, BLOCK_H2), dtype=tl.float32)
            acc_b2 = tl.zeros((BLOCK_H2,), dtype=tl.float32)
            acc_w3 = tl.zeros((BLOCK_H2,), dtype=tl.float32)
        else:
            w3 = tl.load(w3_ptr + hid1, mask=hid1_ok, other=0.0)
            acc_w3 = tl.zeros((BLOCK_H1,), dtype=tl.float32)
        acc_b3 = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
        p = pid.to(tl.int64)
        at = cols[:, None] * hidden1 + hid1[None, :]
        at_ok = col_ok[:, None] & hid1_ok[None, :]
        own_base = part_base_ptr + p * dim * hidden1 + at
        own_prod = part_prod_ptr + p * dim * hidden1 + at

        for i in range(pid, batch, programs):
            b = tl.load(row_order_ptr + i)
            start = tl.load(starts_ptr + b)
            end = start + tl.load(lengths_ptr + b)
            q = tl.load(query_ptr + b * query_stride + cols, mask=col_ok, other=0.0)
            q = q.to(tl.float32)
            g = tl.load(grad_ptr + b * grad_stride + cols, mask=col_ok, other=0.0)
            g = g.to(tl.float32)
            m_op = _row_matrix(base_ptr, prod_ptr, q, cols, col_ok, hid1, hid1_ok, hidden1)
            if DOT_BF16:
                m_op = m_op.to(tl.bfloat16)
            c = tl.load(bias1_ptr + b * hidden1 + hid1, mask=hid1_ok, other=0.0)
            if SOFTMAX:
                row_max = tl.load(stats_ptr + 2 * b)
                row_sum = tl.load(stats_ptr + 2 * b + 1)
                inv_sum = 1.0 / tl.where(row_sum > 0, row_sum, 1.0)
                out = tl.load(out_f32_ptr + b * dim + cols, mask=col_ok, other=0.0)
                # d s_l = w_l (g . k_l - g . out): the softmax's Jacobian applied to g . k.
                delta = tl.sum(g * out, axis=0)
            # dM_b = sum_l k_l^T dz1_l over the row, and dc_b = sum_l dz1_l.
            d_m = tl.zeros((BLOCK_D, BLOCK_H1), dtype=tl.float32)
            d_c = tl.zeros((BLOCK_H1,), dtype=tl.float32)
            for l0 in range(0, end - start, BLOCK_L):
                pos = start + l0 + lane
                ok = pos < end
                k = _load_rows(
                    src_ptr, row_ids_ptr, pos, ok, cols, col_ok, src_stride, page_shift,
                    page_mask, dim, GATHER, PAGED, ROWS_KIND, ALIGNED,
                )  # fmt: skip
                kf = k.to(tl.float32)
                z1 = _dot(kf, m_op, DOT_BF16, PRECISION) + c[None, :]
                a1 = _activate(z1, ACT)
                if TWO_LAYERS:
                    z2 = _dot(a1, w2, DOT_BF16, PRECISION) + b2[None, :]
                    a2 = _activate(z2, ACT)
                    s = tl.sum(a2 * w3[None, :], axis=1) + b3
                else:
                    s = tl.sum(a1 * w3[None, :], axis=1) + b3
                d_w = tl.sum(kf * g[None, :], axis=1)
                if SOFTMAX:
                    w = tl.exp(s - row_max) * inv_sum
                    d_s = w * (d_w - delta)
                else:
                    w = s
                    d_s = d_w
                w = tl.where(ok, w, 0.0)
                d_s = tl.where(ok, d_s, 0.0)
                acc_b3 += tl.sum(d_s, axis=0)
                if TWO_LAYERS:
                    acc_w3 += tl.sum(d_s[:, None] * a2, axis=0)
                    d_z2 = d_s[:, None] * w3[None, :] * _activate_grad(z2, a2, ACT)
                    acc_b2 += tl.sum(d_z2, axis=0)
                    acc_w2 += _dot(tl.trans(a1), d_z2, DOT_BF16, PRECISION)
                    d_a1 = _dot(d_z2, tl.trans(w2), DOT_BF16, PRECISION)
                else:
                    acc_w3 += tl.sum(d_s[:, None] * a1, axis=0)
                    d_a1 = d_s[:, None] * w3[None, :]
                d_z1 = d_a1 * _activate_grad(z1, a1, ACT)
                d_c += tl.sum(d_z1, axis=0)
                d_m += _dot(tl.trans(kf), d_z1, DOT_BF16, PRECISION)
                d_k = w[:, None] * g[None, :] + _dot(d_z1, tl.trans(m_op), DOT_BF16, PRECISION)
                tl.store(
                    d_rows_ptr + pos[:, None] * dim + cols[None, :],
                    tl_to_table_dtype(d_k, D_ROWS_KIND),
                    mask=ok[:, None] & col_ok[None, :],
                )
            # The W1 sums go to this program's own partials (zeroed, L2-resident) row by
            # row: two more [D, H1] accumulators held across rows would spill registers.
            tl.store(own_base, tl.load(own_base, mask=at_ok, other=0.0) + d_m, mask=at_ok)
            tl.store(
                own_prod, tl.load(own_prod, mask=at_ok, other=0.0) + q[:, None] * d_m, mask=at_ok
            )
            # The next row's loads may run on other threads of the program: a CTA barrier
            # orders them after these stores.
            tl.debug_barrier()
            # q meets Wp through M_b: d q_i = sum_h dM_b[i, h] Wp[i, h] (+ the c_b part,
            # dc_b @ (Wq + Wd)^T, added on the host).
            prod = tl.load(prod_ptr + at, mask=at_ok, other=0.0)
            tl.store(d_query_ptr + b * dim + cols, tl.sum(d_m * prod, axis=1), mask=col_ok)
            tl.store(d_bias1_ptr + b * hidden1 + hid1, d_c, mask=hid1_ok)

        tl.store(part_b3_ptr + p, acc_b3)
        if TWO_LAYERS:
            at2 = hid1[:, None] * hidden2 + hid2[None, :]
            m2 = hid1_ok[:, None] & hid2_ok[None, :]
            tl.store(part_w2_ptr + p * hidden1 * hidden2 + at2, acc_w2, mask=m2)
            tl.store(part_b2_ptr + p * hidden2 + hid2, acc_b2, mask=hid2_ok)
            tl.store(part_w3_ptr + p * hidden2 + hid2, acc_w3, mask=hid2_ok)
        else:
            tl.store(part_w3_ptr + p * hidden1 + hid1, acc_w3, mask=hid1_ok)

    # About 40 arguments each: Triton's own launcher binds them in more host time than a
    # small batch's kernel takes.
    _FWD = FastKernel(_target_attention_fwd_kernel)
    _BWD = FastKernel(_target_attention_bwd_kernel)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    """Checked inputs: the behaviour source and its layout, the layers, the sizes.

    ``starts`` / ``lengths`` are what the kernels read; ``offsets`` is kept when the layout
    came as offsets (``None`` for spans, whose uncovered positions get zero gradient).
    """

    query: torch.Tensor
    offsets: torch.Tensor | None
    starts: torch.Tensor
    lengths: torch.Tensor
    source: torch.Tensor | PagedTensor
    row_ids: torch.Tensor | None
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    batch: int
    dim: int
    num_rows: int
    hidden: tuple[int, ...]
    act: int


def activation_code(activation: str, what: str = "target_attention") -> int:
    """The kernel code of ``activation`` (any case).

    Args:
        activation: an activation name.
        what: the caller's name, for the message.

    Raises:
        ValueError: an activation the fused kernels do not compute (PReLU, Dice, ...).
    """
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in FUSED_ACTIVATIONS:
        raise ValueError(
            f"{what}: activation {activation!r} is not supported by the fused kernels; use "
            f"one of {sorted(FUSED_ACTIVATIONS)} (PReLU and Dice need the unfused "
            "models.din.TargetAttention)"
        )
    return FUSED_ACTIVATIONS[key]


def _check_tensor(what: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_layers(
    what: str, layers: object, dim: int, device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, ...]]:
    if not isinstance(layers, Sequence) or len(layers) not in (2, 3):
        raise ValueError(
            f"{what}: layers must be 2 or 3 (weight, bias) pairs (1 or 2 hidden layers, then "
            f"the output layer), got {layers!r:.80}"
        )
    checked = []
    width = 4 * dim
    for i, pair in enumerate(layers):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{what}: layers[{i}] must be a (weight, bias) pair")
        weight = _check_tensor(what, f"layers[{i}] weight", pair[0])
        bias = _check_tensor(what, f"layers[{i}] bias", pair[1])
        out_width = 1 if i == len(layers) - 1 else (weight.shape[0] if weight.dim() else -1)
        if weight.dim() != 2 or tuple(weight.shape) != (out_width, width) or out_width < 1:
            raise ValueError(
                f"{what}: layers[{i}] weight must be [{'1' if i == len(layers) - 1 else 'H'}, "
                f"{width}] (a Linear weight; the first layer takes 4 * D = {width} inputs), "
                f"got shape {tuple(weight.shape)}"
            )
        if tuple(bias.shape) != (out_width,):
            raise ValueError(
                f"{what}: layers[{i}] bias must have shape ({out_width},), got {tuple(bias.shape)}"
            )
        for name, t in (("weight", weight), ("bias", bias)):
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{what}: layers[{i}] {name} must be a float tensor, got {t.dtype}")
            if t.device != device:
                raise ValueError(
                    f"{what}: layers[{i}] {name} is on device {t.device} but query is on {device}"
                )
        checked.append((weight, bias))
        width = out_width
    hidden = tuple(w.shape[0] for w, _ in checked[:-1])
    return checked, hidden


def _check_index(
    what: str, name: str, t: object, batch: int, extra: int, device: torch.device
) -> torch.Tensor:
    # A 1-D int64 tensor of B + extra entries on the query's device.
    t = _check_tensor(what, name, t)
    if t.dtype != torch.int64 or t.dim() != 1:
        raise TypeError(
            f"{what}: {name} must be a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}"
        )
    if t.numel() != batch + extra:
        raise ValueError(
            f"{what}: {name} has {t.numel()} entries but query has B = {batch} rows "
            f"({name} needs B{f' + {extra}' if extra else ''})"
        )
    if t.device != device:
        raise ValueError(f"{what}: {name} is on device {t.device} but query is on {device}")
    return t if t.is_contiguous() else t.contiguous()


def _check_layout_args(
    what: str, offsets: object, starts: object, lengths: object, batch: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(offsets or None, starts, lengths)``: offsets turn into a view and one small op."""
    if offsets is not None:
        if starts is not None or lengths is not None:
            raise ValueError(f"{what}: give either offsets or starts and lengths, not both")
        offsets = _check_index(what, "offsets", offsets, batch, 1, device)
        return offsets, offsets[:-1], offsets[1:] - offsets[:-1]
    if starts is None or lengths is None:
        raise ValueError(f"{what}: give either offsets or both starts and lengths")
    starts = _check_index(what, "starts", starts, batch, 0, device)
    lengths = _check_index(what, "lengths", lengths, batch, 0, device)
    return None, starts, lengths


def _check_inputs(
    what: str,
    query: object,
    offsets: object,
    layers: object,
    values: object,
    table: object,
    row_ids: object,
    activation: str,
    starts: object = None,
    lengths: object = None,
) -> _Inputs:
    act = activation_code(activation, what)
    query = _check_tensor(what, "query", query)
    if query.dim() != 2:
        raise ValueError(f"{what}: query must be 2-D [B, D], got shape {tuple(query.shape)}")
    if query.dtype not in _DTYPES:
        raise TypeError(f"{what}: query must be float32 or bfloat16, got {query.dtype}")
    batch, dim = query.shape
    device = query.device
    if dim < 1:
        raise ValueError(f"{what}: query must have D >= 1 columns, got shape {tuple(query.shape)}")
    offsets, starts, lengths = _check_layout_args(what, offsets, starts, lengths, batch, device)
    if (values is None) == (table is None):
        raise ValueError(f"{what}: give either values or table (with row_ids), not both or none")
    if values is not None:
        if row_ids is not None:
            raise ValueError(f"{what}: row_ids goes with table, not with values")
        source = _check_tensor(what, "values", values)
        name = "values"
        num_rows = source.shape[0] if source.dim() == 2 else -1
    else:
        if isinstance(table, PagedTensor):
            source, name = table, f"table {table.name!r}"
        elif isinstance(table, torch.Tensor):
            source, name = table, "table"
        else:
            raise TypeError(
                f"{what}: table must be a torch.Tensor or a PagedTensor, got {type(table).__name__}"
            )
        row_ids = _check_tensor(what, "row_ids", row_ids)
        if row_ids.dim() != 1 or row_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{what}: row_ids must be a 1-D int64 tensor, got {row_ids.dtype} of shape "
                f"{tuple(row_ids.shape)}"
            )
        if row_ids.device != device:
            raise ValueError(
                f"{what}: row_ids is on device {row_ids.device} but query is on {device}"
            )
        row_ids = row_ids.to(torch.int64).contiguous()
        num_rows = row_ids.numel()
    if isinstance(source, PagedTensor):
        if source.dim != dim:
            raise ValueError(
                f"{what}: {name} (a PagedTensor) has rows of width {source.dim} but query has "
                f"D = {dim}; they must match"
            )
    elif source.dim() != 2 or source.shape[1] != dim:
        raise ValueError(
            f"{what}: {name} must be 2-D [{'N' if name == 'values' else 'R'}, D = {dim}] like "
            f"query, got shape {tuple(source.shape)}"
        )
    if source.dtype != query.dtype:
        raise TypeError(
            f"{what}: {name} has dtype {source.dtype} but query has {query.dtype}; they must match"
        )
    if source.device != device:
        raise ValueError(f"{what}: {name} is on device {source.device} but query is on {device}")
    checked, hidden = _check_layers(what, layers, dim, device)
    for size, label in ((dim, "D"), *((h, f"hidden[{i}]") for i, h in enumerate(hidden))):
        if size > MAX_FUSED_WIDTH:
            raise ValueError(
                f"{what}: {label} = {size} is wider than the fused kernels take "
                f"({MAX_FUSED_WIDTH}); use the unfused models.din.TargetAttention"
            )
    if query.stride(1) != 1:
        query = query.contiguous()
    if isinstance(source, torch.Tensor) and source.stride(1) != 1:
        source = source.contiguous()
    return _Inputs(
        query, offsets, starts, lengths, source, row_ids, checked, batch, dim, num_rows, hidden,
        act,
    )  # fmt: skip


def _check_layout(what: str, inputs: _Inputs) -> None:
    """One host sync. Offsets: start at 0, end at N, never decrease. Spans: in ``[0, N)``,
    lengths >= 0, no two rows share a position (the backward writes each position's
    gradient once). Row ids: below the table's rows (with spans, only at covered positions);
    negative ids are zero rows, not errors."""
    n = inputs.num_rows
    if inputs.offsets is not None:
        offsets = inputs.offsets
        flags = [offsets[0] == 0, offsets[-1] == n, (offsets[1:] >= offsets[:-1]).all()]
        messages = [
            "offsets[0] must be 0",
            "offsets[-1] must equal the number of behaviour rows "
            f"(len({'values' if inputs.row_ids is None else 'row_ids'}) = {n})",
            "offsets must be non-decreasing",
        ]
        covered = None
    else:
        flags, covered = _span_flags(inputs.starts, inputs.lengths, n)
        messages = [
            "lengths must be >= 0",
            "starts must be >= 0",
            f"starts + lengths must be at most the number of behaviour rows ({n})",
            "the rows' spans starts[b]:starts[b] + lengths[b] must not overlap",
        ]
    extra = []
    if inputs.row_ids is not None and n:
        ids = inputs.row_ids
        # Only the largest id can be out of range (negative ids read zero rows); with spans,
        # no covered position leaves -1: nothing to report.
        extra = [ids.amax() if covered is None else torch.where(covered, ids, -1).amax()]
    host = torch.stack([f.to(torch.int64) for f in flags] + extra).tolist()
    for ok, message in zip(host[: len(flags)], messages, strict=True):
        if not ok:
            raise ValueError(f"{what}: {message}")
    if extra:
        hi, rows = host[-1], _table_rows(inputs.source)
        if hi >= rows:
            raise IndexError(
                f"{what}: row_ids holds {hi}, past the table's rows [0, {rows}) (a negative id "
                "reads a zero row)"
            )


def _table_rows(table: torch.Tensor | PagedTensor) -> int:
    return table.num_rows if isinstance(table, PagedTensor) else table.shape[0]


def _span_flags(
    starts: torch.Tensor, lengths: torch.Tensor, n: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Device-side validity flags of spans, and which of the ``n`` positions they cover."""
    ends = starts + lengths
    flags = [(lengths >= 0).all(), (starts >= 0).all(), (ends <= n).all()]
    # Sorted by start, each non-empty span must end before the next begins; empty spans
    # sort last (both ends past n) so they never count as overlapping.
    nonempty = lengths > 0
    key_start = torch.where(nonempty, starts, n + 1)
    key_end = torch.where(nonempty, ends, n + 1)
    order = torch.argsort(key_start, stable=True)
    s, e = key_start[order], key_end[order]
    flags.append((e[:-1] <= s[1:]).all())  # True for fewer than two rows
    return flags, _covered_positions(starts, lengths, n)


def _covered_positions(starts: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[n]``: the positions some span covers (no host sync)."""
    # A difference array: +1 at each start, -1 at each end, running sum > 0.
    delta = torch.zeros(n + 1, dtype=torch.int64, device=starts.device)
    one = (lengths > 0).to(torch.int64)
    delta.index_add_(0, starts.clamp(0, n), one)
    delta.index_add_(0, (starts + lengths).clamp(0, n), -one)
    return torch.cumsum(delta[:n], 0) > 0


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def _torch_activation(z: torch.Tensor, act: int) -> torch.Tensor:
    if act == FUSED_ACTIVATIONS["sigmoid"]:
        return torch.sigmoid(z)
    if act == FUSED_ACTIVATIONS["relu"]:
        return torch.relu(z)
    if act == FUSED_ACTIVATIONS["tanh"]:
        return torch.tanh(z)
    if act == FUSED_ACTIVATIONS["leaky_relu"]:
        return torch.nn.functional.leaky_relu(z, _LEAKY_SLOPE)
    if act == FUSED_ACTIVATIONS["silu"]:
        return torch.nn.functional.silu(z)
    return torch.nn.functional.gelu(z)


def _scoring_mlp(
    x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], act: int
) -> torch.Tensor:
    # [M, 4D] -> [M] fp32 scores (autocast may run the layers in bf16).
    h = x
    for weight, bias in layers[:-1]:
        h = _torch_activation(torch.nn.functional.linear(h, weight.float(), bias.float()), act)
    weight, bias = layers[-1]
    return torch.nn.functional.linear(h, weight.float(), bias.float()).squeeze(-1).float()


def _span_positions(
    starts: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segment, position)`` of every covered position, row by row (one host sync)."""
    batch = starts.numel()
    total = int(lengths.sum()) if batch else 0
    rows = torch.arange(batch, device=starts.device)
    segment = torch.repeat_interleave(rows, lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths  # each row's first index in the packed order
    within = torch.arange(total, device=starts.device) - first.index_select(0, segment)
    return segment, starts.index_select(0, segment) + within


def gather_table_rows(table: torch.Tensor | PagedTensor, row_ids: torch.Tensor) -> torch.Tensor:
    """``table[row_ids]`` as the kernels read it: a zero row for each negative id.

    A plain table is gathered with ``index_select`` (differentiable: the negative ids' rows
    get no gradient), a :class:`~recstack.core.paged.PagedTensor` with its own
    ``gather_rows`` (no gradient). Ids are not bounds-checked.

    Args:
        table: ``[R, D]`` rows, a tensor or a PagedTensor.
        row_ids: int64 ``[N]`` rows to read; negative ids read zeros.

    Returns:
        ``[N, D]`` in the table's dtype.
    """
    valid = row_ids >= 0
    # Negative ids read row 0 (masked out below) so no gather sees them; an empty table has
    # no row 0, and then every id is negative (or out of range, which is not checked here).
    safe = torch.where(valid, row_ids, 0)
    if isinstance(table, PagedTensor):
        if table.num_rows == 0:
            return torch.zeros((row_ids.numel(), table.dim), dtype=table.dtype, device=table.device)
        rows = table.gather_rows(safe, check_bounds=False)
    else:
        if table.shape[0] == 0:
            return table.new_zeros((row_ids.numel(), table.shape[1]))
        rows = table.index_select(0, safe)
    return rows.masked_fill(~valid.unsqueeze(1), 0)


def target_attention_reference(
    query: torch.Tensor,
    offsets: torch.Tensor | None,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    values: torch.Tensor | None = None,
    table: torch.Tensor | PagedTensor | None = None,
    row_ids: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str = "sigmoid",
    softmax: bool = False,
) -> torch.Tensor:
    """Plain-torch target attention on jagged rows, differentiable by autograd.

    The CPU path of the op and the kernels' test oracle. Segment ops over the rows instead
    of padding: the query repeated per behaviour, the MLP on ``[N, 4D]``, a segment softmax
    (``scatter_reduce`` max, ``index_add`` sums) and an ``index_add`` of the weighted rows.
    With ``starts`` / ``lengths`` the covered positions are gathered first (one host sync
    for their count); positions no row covers get no gradient. Computes in fp32; returns the
    query's dtype. Not validated.

    Args:
        query: ``[B, D]`` candidates.
        offsets: int64 ``[B + 1]``: row ``b``'s behaviours are positions
            ``offsets[b]:offsets[b + 1]``; ``None`` with ``starts`` and ``lengths``.
        layers: ``(weight, bias)`` of each linear layer of the scoring MLP, as
            ``nn.Linear`` stores them: ``[H1, 4D]``, (``[H2, H1]``,) ``[1, H_last]``.
        values: ``[N, D]`` behaviour rows (or give ``table`` and ``row_ids``).
        table: ``[R, D]`` rows to gather from, a tensor (differentiable) or a
            :class:`~recstack.core.paged.PagedTensor` (read with its ``gather_rows``).
        row_ids: int64 ``[N]``: the table row of each behaviour position; a negative id
            reads a zero row (:func:`gather_table_rows`).
        starts: int64 ``[B]``: row ``b``'s first position (instead of ``offsets``).
        lengths: int64 ``[B]``: row ``b``'s behaviour count (with ``starts``).
        activation: the hidden layers' activation (:data:`FUSED_ACTIVATIONS`).
        softmax: normalize the scores over each row's positions.

    Returns:
        ``[B, D]`` in the query's dtype.
    """
    record_launch("target_attention_reference")
    act = activation_code(activation, "target_attention_reference")
    batch = query.shape[0]
    if offsets is not None:
        positions = None
        n = values.shape[0] if values is not None else row_ids.numel()
        segment = torch.repeat_interleave(
            torch.arange(batch, device=query.device), offsets[1:] - offsets[:-1], output_size=n
        )
    else:
        segment, positions = _span_positions(starts, lengths)
    if values is not None:
        rows = values if positions is None else values.index_select(0, positions)
    else:
        ids = row_ids if positions is None else row_ids.index_select(0, positions)
        rows = gather_table_rows(table, ids)
    k = rows.float()
    q = query.float().index_select(0, segment)
    scores = _scoring_mlp(torch.cat([q, k, q - k, q * k], dim=-1), layers, act)
    if softmax:
        # Any per-row shift leaves the softmax unchanged, so the max needs no gradient.
        row_max = torch.full((batch,), float("-inf"), device=query.device)
        row_max = row_max.scatter_reduce(0, segment, scores.detach(), "amax")
        e = torch.exp(scores - row_max.index_select(0, segment))
        sums = torch.zeros(batch, device=query.device).index_add(0, segment, e)
        scores = e / sums.index_select(0, segment)
    out = torch.zeros((batch, query.shape[1]), device=query.device)
    out = out.index_add(0, segment, scores.unsqueeze(-1) * k)
    return out.to(query.dtype)


def padded_target_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    activation: str = "sigmoid",
    softmax: bool = False,
) -> torch.Tensor:
    """Plain-torch target attention on padded behaviours, differentiable by autograd.

    The unfused module's computation (the MLP on every ``[B, L]`` position, the padding
    masked out of the weights): the op's padded mode on CUDA tensors when the ``torch``
    backend is forced, since unlike the jagged reference it needs no host sync. The
    padding gets zero gradient. Not validated.

    Args:
        query: ``[B, D]`` candidates.
        keys: ``[B, L, D]`` behaviours, row ``b``'s in ``keys[b, :lengths[b]]``.
        lengths: int ``[B]``: row ``b``'s behaviour count, at most ``L``.
        layers: ``(weight, bias)`` of each linear layer of the scoring MLP.
        activation: the hidden layers' activation (:data:`FUSED_ACTIVATIONS`).
        softmax: normalize the scores over each row's positions.

    Returns:
        ``[B, D]`` in the query's dtype.
    """
    record_launch("target_attention_padded_reference")
    act = activation_code(activation, "padded_target_attention_reference")
    batch, max_len, dim = keys.shape
    mask = torch.arange(max_len, device=keys.device) < lengths.unsqueeze(1)
    k = keys.float()
    q = query.float().unsqueeze(1).expand_as(k)
    x = torch.cat([q, k, q - k, q * k], dim=-1).reshape(-1, 4 * dim)
    scores = _scoring_mlp(x, layers, act).reshape(batch, max_len)
    if softmax:
        # A finite fill, not -inf: a row of padding only must give zeros, not NaN.
        scores = scores.float()
        fill = torch.finfo(scores.dtype).min
        scores = torch.softmax(scores.masked_fill(~mask, fill), dim=-1)
    weights = scores.float() * mask
    return torch.einsum("bl,bld->bd", weights, k).to(query.dtype)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


class _Prepared(NamedTuple):
    """fp32 weights as the kernels read them, and each row's first-layer bias ``c``."""

    base: torch.Tensor  # (Wk - Wd)^T [D, H1]
    prod: torch.Tensor  # Wp^T [D, H1]
    cq: torch.Tensor  # (Wq + Wd)^T [D, H1]
    bias1: torch.Tensor  # c = q @ cq + b1 [B, H1]
    w2: torch.Tensor | None  # W2^T [H1, H2]
    b2: torch.Tensor | None
    w3: torch.Tensor  # [H_last]
    b3: torch.Tensor  # [1]


def _prepare(inputs: _Inputs) -> _Prepared:
    dim = inputs.dim
    w1, b1 = inputs.layers[0]
    w1 = w1.float()
    wq, wk, wd, wp = (w1[:, i * dim : (i + 1) * dim] for i in range(4))
    base = (wk - wd).t().contiguous()
    prod = wp.t().contiguous()
    cq = (wq + wd).t().contiguous()
    bias1 = torch.addmm(b1.float(), inputs.query.float(), cq)
    if len(inputs.layers) == 3:
        w2, b2 = inputs.layers[1]
        w2, b2 = w2.float().t().contiguous(), b2.float().contiguous()
    else:
        w2 = b2 = None
    w3, b3 = inputs.layers[-1]
    return _Prepared(
        base, prod, cq, bias1.contiguous(), w2, b2, w3.float().reshape(-1).contiguous(),
        b3.float().reshape(1).contiguous(),
    )  # fmt: skip


def _dot_options(dtype: torch.dtype, bf16_dots: bool = False) -> tuple[bool, str]:
    """``(DOT_BF16, PRECISION)``: bf16 operands for bf16 inputs (or fp32 inputs with
    ``bf16_dots``, as under bf16 autocast: the tiles are rounded in registers, so the rows
    need no bf16 copy) on a GPU, else fp32 dots, TF32 only where torch's own matmuls may
    use it. The interpreter's bf16 dot is wrong, so it always gets fp32 dots."""
    if (dtype == torch.bfloat16 or bf16_dots) and not interpret_mode():
        return True, "ieee"
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not interpret_mode()
    return False, "tf32" if tf32 else "ieee"


class _Source(NamedTuple):
    """How the kernels reach the behaviour rows (the arguments after ``row_ids_ptr`` that
    depend on the source; see :func:`_source`)."""

    ptr: torch.Tensor  # values, a plain table, or a PagedTensor's page table
    stride: int  # row stride of values / a plain table (a page's rows are dim apart)
    page_shift: int
    page_mask: int
    paged: bool
    aligned: bool  # every page 16-byte aligned (the row loads' vector hint)
    rows_kind: int  # TABLE_KINDS of the rows' dtype


# A PagedTensor's page alignment, cached per page table: the page table is rebuilt
# whenever pages are added or moved, so an unchanged one means unchanged pages.
_PAGE_ALIGNMENT: weakref.WeakKeyDictionary[PagedTensor, tuple[torch.Tensor, bool]] = (
    weakref.WeakKeyDictionary()
)


def _pages_aligned(table: PagedTensor) -> bool:
    cached = _PAGE_ALIGNMENT.get(table)
    if cached is None or cached[0] is not table.page_table:
        cached = (table.page_table, all(p.data_ptr() % 16 == 0 for p in table.pages))
        _PAGE_ALIGNMENT[table] = cached
    return cached[1]


def _source(inputs: _Inputs) -> _Source:
    """The kernels' view of the rows. A plain table keeps its own path (``PAGED`` off)
    rather than going through ``PagedTensor.wrap``: wrapping builds a one-entry page table
    on the device every call (a host-to-device copy, which synchronizes), needs a contiguous
    table (a strided one would be copied), and adds a dependent page-pointer load before
    every row load; the constexpr switch compiles the plain and values kernels unchanged."""
    src = inputs.source
    kind = TABLE_KINDS[src.dtype]
    if isinstance(src, PagedTensor):
        return _Source(
            src.page_table, 0, src.page_shift, src.page_mask, True, _pages_aligned(src), kind
        )
    return _Source(src, src.stride(0), 0, 0, False, False, kind)


def _source_tensor(inputs: _Inputs) -> torch.Tensor:
    """A tensor on the rows' device, for the backend choice."""
    src = inputs.source
    return src.page_table if isinstance(src, PagedTensor) else src


def _blocks(inputs: _Inputs, block_l: int) -> tuple[int, int, int, int]:
    hidden = inputs.hidden
    mean_len = -(-inputs.num_rows // max(inputs.batch, 1))
    block_l = max(16, min(next_pow2(block_l), next_pow2(mean_len)))
    block_d = max(16, next_pow2(inputs.dim))
    block_h1 = max(16, next_pow2(hidden[0]))
    block_h2 = max(16, next_pow2(hidden[1])) if len(hidden) == 2 else 16
    return block_l, block_d, block_h1, block_h2


def target_attention_forward(
    query: torch.Tensor,
    offsets: torch.Tensor | None,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    values: torch.Tensor | None = None,
    table: torch.Tensor | PagedTensor | None = None,
    row_ids: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str = "sigmoid",
    softmax: bool = False,
    check_bounds: bool = True,
    bf16_dots: bool = False,
    block_l: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, TargetAttentionSaved]:
    """Fused target attention forward: ``[B, D]`` and what the backward needs.

    Runs the Triton kernel on CUDA tensors (and under ``TRITON_INTERPRET=1``), else
    :func:`target_attention_reference`.

    Args:
        query: float32 or bfloat16 ``[B, D]`` candidates (unit column stride preferred).
        offsets: int64 ``[B + 1]``: row ``b``'s behaviours are positions
            ``offsets[b]:offsets[b + 1]`` (``offsets[0] == 0``, ``offsets[-1] == N``); or
            ``None`` and give ``starts`` and ``lengths``.
        layers: ``(weight, bias)`` of each linear layer of the scoring MLP as ``nn.Linear``
            stores them: ``[H1, 4D]``, optionally ``[H2, H1]``, then ``[1, H_last]``.
        values: ``[N, D]`` behaviour rows, the query's dtype; or give ``table`` and
            ``row_ids``.
        table: ``[R, D]`` rows (the query's dtype), gathered by ``row_ids`` in the kernel:
            a tensor, or a :class:`~recstack.core.paged.PagedTensor` read through its page
            table.
        row_ids: int64 ``[N]`` table row of each behaviour position (repeats allowed; a
            negative id reads a zero row, still scored and still given a row gradient).
        starts: int64 ``[B]``: row ``b``'s behaviours are positions ``starts[b]:starts[b] +
            lengths[b]`` (disjoint spans in ``[0, N)``; positions outside every span, such
            as padding, are never read).
        lengths: int64 ``[B]``, with ``starts``.
        activation: the hidden layers' activation, one of :data:`FUSED_ACTIVATIONS`.
        softmax: normalize the scores over each row's positions (else raw scores weight
            the sum, as in DIN).
        check_bounds: one host sync to check the layout (offsets, or spans in range and
            disjoint) and that no row id is past the table's rows (negative ids are zero
            rows); pass ``False`` for trusted inputs (no sync).
        bf16_dots: multiply in bf16 (fp32 accumulation) even for fp32 inputs, rounding
            the tiles in registers: what bf16 autocast asks of the dense side, without a
            bf16 copy of the rows. GPU only (the interpreter multiplies in fp32).
        block_l: behaviours per step (default :data:`TARGET_ATTENTION_DEFAULTS`).
        num_warps: warps per program.

    Returns:
        ``(out, saved)``: ``out`` ``[B, D]`` in the query's dtype (a row without behaviours
        gives zeros) and the :class:`TargetAttentionSaved` for the backward.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices, layers or activation (the
            message names the argument); with ``check_bounds``, a bad layout.
        IndexError: with ``check_bounds``, a row id past the table's rows.
    """
    what = "target_attention"
    inputs = _check_inputs(
        what, query, offsets, layers, values, table, row_ids, activation, starts, lengths
    )
    if check_bounds:
        _check_layout(what, inputs)
    batch, dim = inputs.batch, inputs.dim
    device, dtype = inputs.query.device, inputs.query.dtype
    if not use_triton(inputs.query, inputs.starts, _source_tensor(inputs), op=what):
        out = target_attention_reference(
            inputs.query, inputs.offsets, inputs.layers,
            values=inputs.source if table is None else None,
            table=inputs.source if table is not None else None, row_ids=inputs.row_ids,
            starts=inputs.starts, lengths=inputs.lengths, activation=activation,
            softmax=softmax,
        )  # fmt: skip
        return out, TargetAttentionSaved(None, None)
    out = torch.empty((batch, dim), dtype=dtype, device=device)
    stats = torch.empty((batch, 2), dtype=torch.float32, device=device) if softmax else None
    out_f32 = torch.empty((batch, dim), dtype=torch.float32, device=device) if softmax else None
    if batch == 0:
        return out, TargetAttentionSaved(stats, out_f32)
    prep = _prepare(inputs)
    block_l, block_d, block_h1, block_h2 = _blocks(
        inputs, block_l or TARGET_ATTENTION_DEFAULTS["block_l"]
    )
    dot_bf16, precision = _dot_options(dtype, bf16_dots)
    two = len(inputs.hidden) == 2
    src = _source(inputs)
    _FWD(
        (batch,),
        inputs.query,
        src.ptr,
        inputs.row_ids if inputs.row_ids is not None else inputs.starts,
        inputs.starts,
        inputs.lengths,
        prep.base,
        prep.prod,
        prep.bias1,
        prep.w2 if two else prep.w3,
        prep.b2 if two else prep.w3,
        prep.w3,
        prep.b3,
        out,
        out_f32 if softmax else out,
        stats if softmax else out,
        dim,
        inputs.hidden[0],
        inputs.hidden[1] if two else 1,
        inputs.query.stride(0),
        src.stride,
        out.stride(0),
        src.page_shift,
        src.page_mask,
        inputs.act,
        bool(softmax),
        inputs.row_ids is not None,
        src.paged,
        src.aligned,
        src.rows_kind,
        two,
        TABLE_KINDS[dtype],
        dot_bf16,
        precision,
        block_l,
        block_d,
        block_h1,
        block_h2,
        num_warps=num_warps or TARGET_ATTENTION_DEFAULTS["num_warps"],
    )
    record_launch("target_attention_fwd")
    return out, TargetAttentionSaved(stats, out_f32, prep)


def _row_order(lengths: torch.Tensor, programs: int) -> torch.Tensor:
    """Rows longest first, dealt to ``programs`` in snake order (0..P-1, P-1..0, ...):
    program ``p`` takes positions ``p, p + P, ...`` of the result."""
    batch = lengths.numel()
    by_length = torch.sort(lengths, descending=True, stable=True).indices
    i = torch.arange(batch, device=lengths.device)
    rnd, lane = i // programs, i % programs
    snake = rnd * programs + torch.where(rnd % 2 == 0, lane, programs - 1 - lane)
    # The last round may be partial: it keeps the plain order.
    snake = torch.where(snake < batch, snake, i)
    return by_length.index_select(0, snake)


def _programs(device: torch.device, batch: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(batch, sms * per_sm))
    return max(1, min(batch, _CPU_PROGRAMS))


def target_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    offsets: torch.Tensor | None,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    saved: TargetAttentionSaved,
    *,
    values: torch.Tensor | None = None,
    table: torch.Tensor | PagedTensor | None = None,
    row_ids: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str = "sigmoid",
    softmax: bool = False,
    rows_dtype: torch.dtype | None = None,
    bf16_dots: bool = False,
    block_l: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
) -> TargetAttentionGrads:
    """Fused target attention backward (Triton; the inputs as given to the forward).

    Scores and activations are recomputed from the rows; nothing of size ``[N, H]`` is
    stored. Weight gradients are per-program fp32 partials summed here (deterministic for a
    fixed ``programs``). With ``starts`` / ``lengths``, positions no span covers get zero row
    gradient. Use autograd on :func:`target_attention_reference` for the torch path.

    Args:
        grad_out: ``[B, D]`` gradient of the output.
        query: as given to :func:`target_attention_forward`.
        offsets: as given to the forward.
        layers: as given to the forward.
        saved: the forward's :class:`TargetAttentionSaved`.
        values: as given to the forward.
        table: as given to the forward.
        row_ids: as given to the forward.
        starts: as given to the forward.
        lengths: as given to the forward.
        activation: as given to the forward.
        softmax: as given to the forward.
        rows_dtype: dtype of the returned row gradients: the rows' dtype (default) or
            float32 (to accumulate them without rounding first).
        bf16_dots: as given to the forward.
        block_l: behaviours per step (default :data:`TARGET_ATTENTION_DEFAULTS`).
        num_warps: warps per program.
        programs: persistent programs (default: ``programs_per_sm`` per SM, at most ``B``).

    Returns:
        :class:`TargetAttentionGrads`.

    Raises:
        TypeError, ValueError: bad inputs, or a ``grad_out`` not ``[B, D]``.
        RuntimeError: the tensors cannot run the Triton kernel.
    """
    what = "target_attention backward"
    inputs = _check_inputs(
        what, query, offsets, layers, values, table, row_ids, activation, starts, lengths
    )
    grad_out = _check_tensor(what, "grad_out", grad_out)
    batch, dim = inputs.batch, inputs.dim
    if tuple(grad_out.shape) != (batch, dim) or grad_out.device != inputs.query.device:
        raise ValueError(
            f"{what}: grad_out must be [{batch}, {dim}] on {inputs.query.device}, got "
            f"{tuple(grad_out.shape)} on {grad_out.device}"
        )
    if softmax and (saved.stats is None or saved.out_f32 is None):
        raise ValueError(f"{what}: softmax needs the forward's saved stats and out_f32")
    if not use_triton(inputs.query, inputs.starts, _source_tensor(inputs), op=what):
        raise RuntimeError(
            f"{what}: the Triton kernel cannot run on these tensors; differentiate "
            "target_attention_reference instead"
        )
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    device, dtype = inputs.query.device, inputs.query.dtype
    rows_dtype = rows_dtype or inputs.source.dtype
    if rows_dtype not in (torch.float32, inputs.source.dtype):
        raise TypeError(
            f"{what}: rows_dtype must be float32 or the rows' dtype {inputs.source.dtype}, "
            f"got {rows_dtype}"
        )
    hidden = inputs.hidden
    two = len(hidden) == 2
    h_last = hidden[-1]
    prep = saved.prepared if saved.prepared is not None else _prepare(inputs)
    # Offsets cover every position; spans may leave some (padding) that must read zero.
    alloc = torch.empty if inputs.offsets is not None else torch.zeros
    d_rows = alloc((inputs.num_rows, dim), dtype=rows_dtype, device=device)
    d_query_part = torch.empty((batch, dim), dtype=torch.float32, device=device)
    d_bias1 = torch.empty((batch, hidden[0]), dtype=torch.float32, device=device)
    defaults = TARGET_ATTENTION_DEFAULTS
    n_prog = programs or _programs(device, batch, defaults["programs_per_sm"])
    n_prog = max(1, min(n_prog, max(batch, 1)))
    f32 = {"dtype": torch.float32, "device": device}
    part_base = torch.zeros((n_prog, dim, hidden[0]), **f32)
    part_prod = torch.zeros((n_prog, dim, hidden[0]), **f32)
    part_w2 = torch.empty((n_prog, hidden[0], hidden[1]), **f32) if two else None
    part_b2 = torch.empty((n_prog, hidden[1]), **f32) if two else None
    part_w3 = torch.empty((n_prog, h_last), **f32)
    part_b3 = torch.empty((n_prog,), **f32)
    if batch:
        block_l, block_d, block_h1, block_h2 = _blocks(
            inputs, block_l or defaults["backward_block_l"]
        )
        dot_bf16, precision = _dot_options(dtype, bf16_dots)
        row_order = _row_order(inputs.lengths, n_prog)
        src = _source(inputs)
        _BWD(
            (n_prog,),
            grad_out,
            inputs.query,
            src.ptr,
            inputs.row_ids if inputs.row_ids is not None else inputs.starts,
            inputs.starts,
            inputs.lengths,
            row_order,
            prep.base,
            prep.prod,
            prep.bias1,
            prep.w2 if two else prep.w3,
            prep.b2 if two else prep.w3,
            prep.w3,
            prep.b3,
            saved.stats if softmax else prep.b3,
            saved.out_f32 if softmax else prep.b3,
            d_rows,
            d_query_part,
            d_bias1,
            part_base,
            part_prod,
            part_w2 if two else part_base,
            part_b2 if two else part_w3,
            part_w3,
            part_b3,
            batch,
            dim,
            hidden[0],
            hidden[1] if two else 1,
            grad_out.stride(0),
            inputs.query.stride(0),
            src.stride,
            src.page_shift,
            src.page_mask,
            inputs.act,
            bool(softmax),
            inputs.row_ids is not None,
            src.paged,
            src.aligned,
            src.rows_kind,
            two,
            TABLE_KINDS[rows_dtype],
            dot_bf16,
            precision,
            block_l,
            block_d,
            block_h1,
            block_h2,
            num_warps=num_warps or defaults["backward_num_warps"],
        )
        record_launch("target_attention_bwd")
    else:
        for t in (part_base, part_prod, part_w2, part_b2, part_w3, part_b3):
            if t is not None:
                t.zero_()
    return _assemble(inputs, prep, grad_out, d_rows, d_query_part, d_bias1,
                     (part_base, part_prod, part_w2, part_b2, part_w3, part_b3))  # fmt: skip


def _assemble(
    inputs: _Inputs,
    prep: _Prepared,
    grad_out: torch.Tensor,
    d_rows: torch.Tensor,
    d_query_part: torch.Tensor,
    d_bias1: torch.Tensor,
    parts: tuple[torch.Tensor | None, ...],
) -> TargetAttentionGrads:
    """The inputs' gradients from the kernel's per-row and per-program results."""
    part_base, part_prod, part_w2, part_b2, part_w3, part_b3 = parts
    q = inputs.query.float()
    d_query = d_query_part + d_bias1 @ prep.cq.t()
    d_cq = q.t() @ d_bias1  # d (Wq + Wd)^T
    d_base = part_base.sum(0)  # d (Wk - Wd)^T
    d_prod = part_prod.sum(0)  # d Wp^T
    d_w1 = torch.cat([d_cq.t(), d_base.t(), (d_cq - d_base).t(), d_prod.t()], dim=1)
    grads = [(d_w1, d_bias1.sum(0))]
    if part_w2 is not None:
        grads.append((part_w2.sum(0).t(), part_b2.sum(0)))
    grads.append((part_w3.sum(0).unsqueeze(0), part_b3.sum(0).reshape(1)))
    layer_grads = [
        (dw.to(w.dtype), db.to(b.dtype))
        for (dw, db), (w, b) in zip(grads, inputs.layers, strict=True)
    ]
    return TargetAttentionGrads(d_query.to(inputs.query.dtype), d_rows, layer_grads)
