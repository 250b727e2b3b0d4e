"""Self-attention inside each sequence of a jagged batch, without padding.

Sequence ``b`` of a batch is rows ``offsets[b]:offsets[b + 1]`` of ``q``, ``k`` and ``v``
(``[N, heads, head_dim]``, core's ``JaggedTensor`` layout); position ``i`` of a sequence
attends to positions ``j`` of the same sequence only. Two kinds:

* ``"softmax"``: ``out_i = sum_j softmax_j(scale * q_i.k_j) v_j`` over the allowed ``j``
  (SASRec, BERT4Rec);
* ``"pointwise"``: HSTU's pointwise aggregated attention,
  ``out_i = sum_j silu(scale * q_i.k_j) / n * v_j`` with ``n`` the sequence's length, or
  ``max_len`` for every sequence when given (HSTU divides by the padded length); no
  normalisation over ``j``.

Masks (``hist = length - num_targets[b]``, the history part of the sequence): ``i`` may
attend to ``j`` when ``j < hist`` and (without ``causal``, or ``j <= i``), or when ``j == i``.
So history positions attend causally (or bidirectionally) to history; the last
``num_targets[b]`` positions (candidate items of generative ranking) attend to the whole
history and to themselves, never to each other, and no history position attends to them.

Kernels (one family, ``KIND`` a constexpr):

* forward: one program per (query block, head) keeps a ``[BLOCK_M, head_dim]`` accumulator
  and walks the key blocks of the history it may see (up to its diagonal when causal),
  flash-attention style: the ``[L, L]`` scores never exist in memory. Softmax keeps a
  running max and sum (base 2) and stores the row's log-sum-exp for the backward. A target
  row's own key (its only key past the history) is a row-wise dot product, not a tile.
* backward, deterministic, no atomics: a dq pass over query blocks (which, for softmax,
  first writes ``delta_i = do_i.o_i``) and a dk/dv pass over key blocks that walks the query
  blocks attending to its keys; both recompute the scores (softmax from the saved
  log-sum-exp).

Schedule: programs do not run over ``(max_len / BLOCK, batch)``, which wastes most of the
grid on Zipf-skewed lengths. A block list is built on the device (no host sync): one entry
``(sequence, block)`` per non-empty tile of every sequence, ``N // BLOCK + B`` slots (an upper
bound of the tiles, so the grid is known on the host; spare slots exit at once), sorted
heaviest first (a causal query block ``t`` costs ``t + 1`` key blocks) so the long
sequences' work starts first and the grid's tail is short programs.

Precision: dot products accumulate in fp32; fp32 inputs multiply in IEEE fp32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set; bf16 probabilities are rounded to bf16
before the ``p @ v`` product, as flash attention does. Outputs and gradients have the
inputs' dtype. ``head_dim`` is padded to a power of two >= 16 inside the kernels (masked
loads), never in memory.

Bytes that must move (``E`` element bytes, ``N`` tokens, ``H`` heads, ``D`` head_dim):
forward ``4 * N * H * D * E`` (q, k, v read, out written); backward ``8 * N * H * D * E``
(q, k, v, out, dout read; dq, dk, dv written), the counts the benchmark's MBU uses. Softmax
adds fp32 rows of ``4 * N * H`` bytes: the log-sum-exp (written forward, read backward)
and ``delta`` (written and read backward). K and V tiles are re-read by every query block
of their sequence (from L2 when it holds them), so real traffic grows with the lengths.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from recstack.core import JaggedTensor
from recstack.core.kernels import HAS_TRITON, interpret_mode, record_launch
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "ATTENTION_KINDS",
    "AttentionKind",
    "attention_blocks",
    "check_jagged_attention_inputs",
    "jagged_attention_backward_triton",
    "jagged_attention_forward_triton",
    "jagged_attention_mask",
    "jagged_attention_reference",
    "jagged_block_schedule",
]

AttentionKind = Literal["softmax", "pointwise"]
#: The attention kinds the kernels compute.
ATTENTION_KINDS: tuple[str, ...] = ("softmax", "pointwise")

_KIND_CODE = {"softmax": 0, "pointwise": 1}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256


def attention_blocks(
    head_dim: int, backward: bool = False, element_size: int = 2
) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the kernels for ``head_dim``.

    ``BLOCK_M`` tiles queries, ``BLOCK_N`` keys. Chosen so no variant spills registers on
    sm_90 (the compile check's report): wider heads and fp32 tiles (twice the registers of
    bf16 ones) take smaller tiles. Not tuned for speed beyond that.

    Args:
        head_dim: the head size (padded to a power of two >= 16 inside the kernels).
        backward: the backward kernels' blocks (they hold two accumulators per program).
        element_size: bytes per element of q, k, v (4 for fp32).
    """
    block_d = max(16, next_pow2(head_dim))
    if element_size >= 4:
        return (32, 32, 4) if block_d <= 64 else (16, 16, 4 if block_d <= 128 else 8)
    if block_d <= 64:
        return 64, 64, 4
    if block_d <= 128:
        return (64, 32, 8) if backward else (64, 32, 4)
    return (32, 32, 8) if backward else (64, 32, 8)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    # Triton's interpreter multiplies the raw bits of bf16 operands in tl.dot; interpreted
    # (CPU) runs multiply them as fp32 instead, which is exact for bf16 values.
    _UPCAST_DOTS = tl.constexpr(interpret_mode())

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        if _UPCAST_DOTS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _tile_ptrs(ptr, tokens, head, stride_row, stride_head, cols):
        # [tokens, cols] of one head of a [N, heads, head_dim] tensor; tokens are int64.
        return ptr + tokens[:, None] * stride_row + head * stride_head + cols[None, :]

    @triton.jit
    def _silu_grad(x):
        sig = tl.sigmoid(x)
        return sig * (1.0 + x * (1.0 - sig))

    @triton.jit(do_not_specialize=["num_seqs", "total"])
    def _jagged_attention_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        lse_ptr,
        offsets_ptr,
        targets_ptr,
        schedule_ptr,
        num_seqs,
        total,
        stride_q_row,
        stride_q_head,
        stride_k_row,
        stride_k_head,
        stride_v_row,
        stride_v_head,
        stride_out_row,
        stride_out_head,
        scale,
        inv_norm,
        KIND: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.load(schedule_ptr + 2 * slot)
        if seq >= num_seqs:
            return
        block = tl.load(schedule_ptr + 2 * slot + 1)
        start = tl.load(offsets_ptr + seq)
        length = tl.load(offsets_ptr + seq + 1) - start
        hist = length
        if HAS_TARGETS:
            hist = length - tl.load(targets_ptr + seq)

        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        tile_ok = row_ok[:, None] & col_ok[None, :]
        q = tl.load(
            _tile_ptrs(q_ptr, start + rows, head, stride_q_row, stride_q_head, cols),
            mask=tile_ok,
            other=0.0,
        )
        inv_n = tl.where(inv_norm > 0.0, inv_norm, 1.0 / length.to(tl.float32))
        qk_scale = scale * 1.4426950408889634  # softmax runs in base 2

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if HAS_TARGETS:
            # A target row's own key is its only key past the history: a row-wise dot.
            is_target = row_ok & (rows >= hist)
            self_ok = is_target[:, None] & col_ok[None, :]
            k_self = tl.load(
                _tile_ptrs(k_ptr, start + rows, head, stride_k_row, stride_k_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            v_self = tl.load(
                _tile_ptrs(v_ptr, start + rows, head, stride_v_row, stride_v_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            s_self = tl.sum(q.to(tl.float32) * k_self, axis=1)
            if KIND == 0:
                m_i = tl.where(is_target, s_self * qk_scale, float("-inf"))
                l_i = tl.where(is_target, 1.0, 0.0)
                acc = v_self
            else:
                x_self = s_self * scale
                w_self = tl.where(is_target, x_self * tl.sigmoid(x_self) * inv_n, 0.0)
                acc = v_self * w_self[:, None]

        kv_end = hist
        if CAUSAL:
            kv_end = tl.minimum(hist, (block + 1) * BLOCK_M)
        for j0 in range(0, kv_end, BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            key_ok = keys < hist
            key_tile_ok = key_ok[:, None] & col_ok[None, :]
            k = tl.load(
                _tile_ptrs(k_ptr, start + keys, head, stride_k_row, stride_k_head, cols),
                mask=key_tile_ok,
                other=0.0,
            )
            v = tl.load(
                _tile_ptrs(v_ptr, start + keys, head, stride_v_row, stride_v_head, cols),
                mask=key_tile_ok,
                other=0.0,
            )
            qk = _dot(q, tl.trans(k), PRECISION)
            allowed = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (keys[None, :] <= rows[:, None])
            if KIND == 0:
                s = tl.where(allowed, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # A row with no key yet keeps m = -inf; subtracting 0 keeps exp2 at 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
                m_i = m_new
            else:
                x = qk * scale
                w = tl.where(allowed, x * tl.sigmoid(x) * inv_n, 0.0)
                acc += _dot(w.to(v.dtype), v, PRECISION)

        if KIND == 0:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            acc = acc / l_safe[:, None]
            tl.store(lse_ptr + head * total + start + rows, m_i + tl.log2(l_safe), mask=row_ok)
        tl.store(
            _tile_ptrs(out_ptr, start + rows, head, stride_out_row, stride_out_head, cols),
            acc.to(out_ptr.dtype.element_ty),
            mask=tile_ok,
        )

    @triton.jit(do_not_specialize=["num_seqs", "total"])
    def _jagged_attention_dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        dq_ptr,
        offsets_ptr,
        targets_ptr,
        schedule_ptr,
        num_seqs,
        total,
        stride_q_row,
        stride_q_head,
        stride_k_row,
        stride_k_head,
        stride_v_row,
        stride_v_head,
        stride_out_row,
        stride_out_head,
        stride_dout_row,
        stride_dout_head,
        stride_dq_row,
        stride_dq_head,
        scale,
        inv_norm,
        KIND: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.load(schedule_ptr + 2 * slot)
        if seq >= num_seqs:
            return
        block = tl.load(schedule_ptr + 2 * slot + 1)
        start = tl.load(offsets_ptr + seq)
        length = tl.load(offsets_ptr + seq + 1) - start
        hist = length
        if HAS_TARGETS:
            hist = length - tl.load(targets_ptr + seq)

        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        tile_ok = row_ok[:, None] & col_ok[None, :]
        q = tl.load(
            _tile_ptrs(q_ptr, start + rows, head, stride_q_row, stride_q_head, cols),
            mask=tile_ok,
            other=0.0,
        )
        do = tl.load(
            _tile_ptrs(dout_ptr, start + rows, head, stride_dout_row, stride_dout_head, cols),
            mask=tile_ok,
            other=0.0,
        )
        inv_n = tl.where(inv_norm > 0.0, inv_norm, 1.0 / length.to(tl.float32))
        qk_scale = scale * 1.4426950408889634
        if KIND == 0:
            o = tl.load(
                _tile_ptrs(out_ptr, start + rows, head, stride_out_row, stride_out_head, cols),
                mask=tile_ok,
                other=0.0,
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            tl.store(delta_ptr + head * total + start + rows, delta, mask=row_ok)
            lse = tl.load(lse_ptr + head * total + start + rows, mask=row_ok, other=0.0)

        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if HAS_TARGETS:
            # A target row's own key, outside the key loop (see the forward).
            is_target = row_ok & (rows >= hist)
            self_ok = is_target[:, None] & col_ok[None, :]
            k_self = tl.load(
                _tile_ptrs(k_ptr, start + rows, head, stride_k_row, stride_k_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            v_self = tl.load(
                _tile_ptrs(v_ptr, start + rows, head, stride_v_row, stride_v_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            s_self = tl.sum(q.to(tl.float32) * k_self, axis=1)
            dp_self = tl.sum(do.to(tl.float32) * v_self, axis=1)
            if KIND == 0:
                p_self = tl.exp2(tl.where(is_target, s_self * qk_scale - lse, float("-inf")))
                ds_self = p_self * (dp_self - delta)
            else:
                ds_self = tl.where(is_target, dp_self * _silu_grad(s_self * scale) * inv_n, 0.0)
            dq = k_self * ds_self[:, None]

        kv_end = hist
        if CAUSAL:
            kv_end = tl.minimum(hist, (block + 1) * BLOCK_M)
        for j0 in range(0, kv_end, BLOCK_N):
            keys = j0 + tl.arange(0, BLOCK_N)
            key_ok = keys < hist
            key_tile_ok = key_ok[:, None] & col_ok[None, :]
            k = tl.load(
                _tile_ptrs(k_ptr, start + keys, head, stride_k_row, stride_k_head, cols),
                mask=key_tile_ok,
                other=0.0,
            )
            v = tl.load(
                _tile_ptrs(v_ptr, start + keys, head, stride_v_row, stride_v_head, cols),
                mask=key_tile_ok,
                other=0.0,
            )
            qk = _dot(q, tl.trans(k), PRECISION)
            dp = _dot(do, tl.trans(v), PRECISION)
            allowed = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (keys[None, :] <= rows[:, None])
            if KIND == 0:
                p = tl.exp2(tl.where(allowed, qk * qk_scale - lse[:, None], float("-inf")))
                ds = p * (dp - delta[:, None])
            else:
                ds = tl.where(allowed, dp * _silu_grad(qk * scale) * inv_n, 0.0)
            dq += _dot(ds.to(k.dtype), k, PRECISION)

        dq = dq * scale
        tl.store(
            _tile_ptrs(dq_ptr, start + rows, head, stride_dq_row, stride_dq_head, cols),
            dq.to(dq_ptr.dtype.element_ty),
            mask=tile_ok,
        )

    @triton.jit(do_not_specialize=["num_seqs", "total"])
    def _jagged_attention_dkdv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        dk_ptr,
        dv_ptr,
        offsets_ptr,
        targets_ptr,
        schedule_ptr,
        num_seqs,
        total,
        stride_q_row,
        stride_q_head,
        stride_k_row,
        stride_k_head,
        stride_v_row,
        stride_v_head,
        stride_dout_row,
        stride_dout_head,
        stride_dk_row,
        stride_dk_head,
        stride_dv_row,
        stride_dv_head,
        scale,
        inv_norm,
        KIND: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.load(schedule_ptr + 2 * slot)
        if seq >= num_seqs:
            return
        block = tl.load(schedule_ptr + 2 * slot + 1)
        start = tl.load(offsets_ptr + seq)
        length = tl.load(offsets_ptr + seq + 1) - start
        hist = length
        if HAS_TARGETS:
            hist = length - tl.load(targets_ptr + seq)

        keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        tile_ok = key_ok[:, None] & col_ok[None, :]
        k = tl.load(
            _tile_ptrs(k_ptr, start + keys, head, stride_k_row, stride_k_head, cols),
            mask=tile_ok,
            other=0.0,
        )
        v = tl.load(
            _tile_ptrs(v_ptr, start + keys, head, stride_v_row, stride_v_head, cols),
            mask=tile_ok,
            other=0.0,
        )
        inv_n = tl.where(inv_norm > 0.0, inv_norm, 1.0 / length.to(tl.float32))
        qk_scale = scale * 1.4426950408889634

        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        if HAS_TARGETS:
            # A target key is seen by its own row only.
            is_target = key_ok & (keys >= hist)
            self_ok = is_target[:, None] & col_ok[None, :]
            q_self = tl.load(
                _tile_ptrs(q_ptr, start + keys, head, stride_q_row, stride_q_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            do_self = tl.load(
                _tile_ptrs(dout_ptr, start + keys, head, stride_dout_row, stride_dout_head, cols),
                mask=self_ok,
                other=0.0,
            ).to(tl.float32)
            s_self = tl.sum(q_self * k.to(tl.float32), axis=1)
            dp_self = tl.sum(do_self * v.to(tl.float32), axis=1)
            if KIND == 0:
                lse_self = tl.load(lse_ptr + head * total + start + keys, mask=is_target, other=0.0)
                delta_self = tl.load(
                    delta_ptr + head * total + start + keys, mask=is_target, other=0.0
                )
                p_self = tl.exp2(tl.where(is_target, s_self * qk_scale - lse_self, float("-inf")))
                ds_self = p_self * (dp_self - delta_self)
            else:
                x_self = s_self * scale
                p_self = tl.where(is_target, x_self * tl.sigmoid(x_self) * inv_n, 0.0)
                ds_self = tl.where(is_target, dp_self * _silu_grad(x_self) * inv_n, 0.0)
            dv = do_self * p_self[:, None]
            dk = q_self * ds_self[:, None]

        # History keys are seen by the rows at or after them (causal) or by every row.
        hist_key = key_ok & (keys < hist)
        first_key = block * BLOCK_N
        q_start = 0
        if CAUSAL:
            q_start = first_key
        q_end = tl.where(first_key < hist, length, q_start)
        for i0 in range(q_start, q_end, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            row_ok = rows < length
            row_tile_ok = row_ok[:, None] & col_ok[None, :]
            q = tl.load(
                _tile_ptrs(q_ptr, start + rows, head, stride_q_row, stride_q_head, cols),
                mask=row_tile_ok,
                other=0.0,
            )
            do = tl.load(
                _tile_ptrs(dout_ptr, start + rows, head, stride_dout_row, stride_dout_head, cols),
                mask=row_tile_ok,
                other=0.0,
            )
            # Scores transposed, [keys, queries]: the accumulators are per key.
            qk_t = _dot(k, tl.trans(q), PRECISION)
            dp_t = _dot(v, tl.trans(do), PRECISION)
            allowed = hist_key[:, None] & row_ok[None, :]
            if CAUSAL:
                allowed = allowed & (keys[:, None] <= rows[None, :])
            if KIND == 0:
                lse = tl.load(lse_ptr + head * total + start + rows, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + head * total + start + rows, mask=row_ok, other=0.0)
                p_t = tl.exp2(tl.where(allowed, qk_t * qk_scale - lse[None, :], float("-inf")))
                ds_t = p_t * (dp_t - delta[None, :])
            else:
                x = qk_t * scale
                p_t = tl.where(allowed, x * tl.sigmoid(x) * inv_n, 0.0)
                ds_t = tl.where(allowed, dp_t * _silu_grad(x) * inv_n, 0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION)
            dk += _dot(ds_t.to(q.dtype), q, PRECISION)

        dk = dk * scale
        tl.store(
            _tile_ptrs(dk_ptr, start + keys, head, stride_dk_row, stride_dk_head, cols),
            dk.to(dk_ptr.dtype.element_ty),
            mask=tile_ok,
        )
        tl.store(
            _tile_ptrs(dv_ptr, start + keys, head, stride_dv_row, stride_dv_head, cols),
            dv.to(dv_ptr.dtype.element_ty),
            mask=tile_ok,
        )

    _FWD = FastKernel(_jagged_attention_fwd_kernel)
    _DQ = FastKernel(_jagged_attention_dq_kernel)
    _DKDV = FastKernel(_jagged_attention_dkdv_kernel)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def check_jagged_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: str = "softmax",
    num_targets: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
    check_values: bool = True,
    what: str = "jagged_attention",
) -> float:
    """Check the arguments of a jagged attention call; return the scale to use.

    Shapes, dtypes and devices are checked on the host. With ``check_values`` the offsets
    and target counts are read back (one host sync) and checked too.

    Args:
        q: ``[N, heads, head_dim]`` queries.
        k: keys, shaped like ``q``.
        v: values, shaped like ``q``.
        offsets: int64 ``[B + 1]`` sequence boundaries.
        kind: ``"softmax"`` or ``"pointwise"``.
        num_targets: optional int64 ``[B]`` target counts.
        scale: the score scale, ``None`` for ``1 / sqrt(head_dim)``.
        max_len: optional bound of every sequence's length.
        check_values: also check the offsets' and targets' values (one host sync).
        what: the op named in error messages.

    Returns:
        The scale, resolved.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: shapes, devices or values that disagree.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"{what}: kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{what}: {name} must be 3-D [tokens, heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{what}: {name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: {name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device} but q is on {q.device}")
    head_dim = q.shape[2]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"{what}: head_dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if q.shape[1] < 1:
        raise ValueError(f"{what}: q needs at least one head, got shape {tuple(q.shape)}")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{what}: offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{what}: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{what}: offsets must be 1-D [B + 1], got shape {tuple(offsets.shape)}")
    if offsets.device != q.device:
        raise ValueError(f"{what}: offsets is on {offsets.device} but q is on {q.device}")
    num_seqs = offsets.numel() - 1
    if num_targets is not None:
        if not isinstance(num_targets, torch.Tensor):
            raise TypeError(
                f"{what}: num_targets must be a torch.Tensor, got {type(num_targets).__name__}"
            )
        if num_targets.dtype != torch.int64:
            raise TypeError(f"{what}: num_targets must be int64, got {num_targets.dtype}")
        if num_targets.shape != (num_seqs,):
            raise ValueError(
                f"{what}: num_targets must be [B] = [{num_seqs}] (one per sequence), got "
                f"shape {tuple(num_targets.shape)}"
            )
        if num_targets.device != q.device:
            raise ValueError(
                f"{what}: num_targets is on {num_targets.device} but q is on {q.device}"
            )
    if max_len is not None and (
        isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0
    ):
        raise ValueError(f"{what}: max_len must be a non-negative int or None, got {max_len!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what}: scale must be a finite float or None, got {scale!r}")
    if check_values:
        _check_values(q.shape[0], offsets, num_targets, max_len, what)
    return float(scale)


def _check_values(
    total: int,
    offsets: torch.Tensor,
    num_targets: torch.Tensor | None,
    max_len: int | None,
    what: str,
) -> None:
    """The value checks of :func:`check_jagged_attention_inputs`, in one host sync."""
    lengths = offsets[1:] - offsets[:-1]
    zero = torch.zeros((), dtype=torch.int64, device=offsets.device)
    longest = lengths.max() if lengths.numel() else zero
    flags = [offsets[0], offsets[-1], (lengths < 0).any().to(torch.int64), longest]
    if num_targets is not None and num_targets.numel():
        flags.append((num_targets < 0).any().to(torch.int64))
        flags.append((num_targets > lengths).any().to(torch.int64))
    first, last, decreasing, longest_len, *target_flags = torch.stack(flags).tolist()
    if first != 0:
        raise ValueError(f"{what}: offsets[0] must be 0, got {first}")
    if decreasing:
        raise ValueError(f"{what}: offsets must be non-decreasing (a sequence has length < 0)")
    if last != total:
        raise ValueError(
            f"{what}: offsets[-1]={last} must equal the number of tokens in q ({total})"
        )
    if max_len is not None and longest_len > max_len:
        raise ValueError(
            f"{what}: a sequence has {longest_len} tokens, more than max_len={max_len}"
        )
    if target_flags and target_flags[0]:
        raise ValueError(f"{what}: num_targets must be >= 0")
    if target_flags and target_flags[1]:
        raise ValueError(
            f"{what}: num_targets[b] must be <= the length of sequence b "
            "(offsets[b + 1] - offsets[b])"
        )


# ----------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------


def jagged_attention_mask(
    lengths: torch.Tensor,
    max_len: int,
    *,
    causal: bool = True,
    num_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[B, max_len, max_len]``: True where query ``i`` may attend to key ``j``.

    Allowed: ``j < hist`` and (``j <= i`` when causal), or ``j == i``, with
    ``hist = lengths - num_targets``. Padding rows (``i >= length``) see themselves only,
    so a softmax over a padded row stays finite; padding keys are never seen by a real row.

    Args:
        lengths: int64 ``[B]`` sequence lengths.
        max_len: the padded length (at least the longest sequence).
        causal: mask future positions.
        num_targets: optional int64 ``[B]``: the last ``num_targets[b]`` positions are
            targets.
    """
    pos = torch.arange(max_len, device=lengths.device)
    hist = lengths if num_targets is None else lengths - num_targets
    allowed = (pos[None, None, :] < hist[:, None, None]).expand(-1, max_len, -1)
    if causal:
        allowed = allowed & (pos[None, None, :] <= pos[None, :, None])
    return allowed | torch.eye(max_len, dtype=torch.bool, device=lengths.device)


def jagged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: AttentionKind = "softmax",
    causal: bool = True,
    num_targets: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Torch reference (differentiable): pad to the longest sequence, mask, attend, unpad.

    Computes in fp32 (fp64 for fp64 inputs) and returns ``q``'s dtype. Memory:
    ``B * heads * L * L`` fp32 scores for the longest length ``L`` (``max_len`` when given).
    No argument checks: the public op checks first.

    Args:
        q: ``[N, heads, head_dim]`` queries.
        k: keys, shaped like ``q``.
        v: values, shaped like ``q``.
        offsets: int64 ``[B + 1]`` sequence boundaries.
        kind: ``"softmax"`` or ``"pointwise"``.
        causal: mask future positions.
        num_targets: optional int64 ``[B]`` target counts.
        scale: the score scale, ``None`` for ``1 / sqrt(head_dim)``.
        max_len: pad to this length (no host sync); also the pointwise divisor ``n``.
    """
    record_launch("jagged_attention_reference")
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    lengths = offsets[1:] - offsets[:-1]
    pad_len = max_len
    if pad_len is None:
        pad_len = int(lengths.max()) if lengths.numel() else 0
    num_seqs = lengths.numel()
    if num_seqs == 0 or pad_len == 0:
        return (q * 0 + k.sum() * 0 + v.sum() * 0).to(q.dtype)  # zero, connected to inputs

    # Under autocast the matmuls would run in bf16: the reference keeps its fp32 math.
    with torch.autocast(q.device.type, enabled=False):
        out = _attend_padded(
            q, k, v, offsets, lengths, pad_len,
            kind=kind, causal=causal, num_targets=num_targets, scale=scale, max_len=max_len,
        )  # fmt: skip
    return out.to(q.dtype)


def _attend_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    pad_len: int,
    *,
    kind: str,
    causal: bool,
    num_targets: torch.Tensor | None,
    scale: float,
    max_len: int | None,
) -> torch.Tensor:
    compute = torch.promote_types(q.dtype, torch.float32)

    def padded(t: torch.Tensor) -> torch.Tensor:
        dense = JaggedTensor(t, offsets).to_padded(pad_len)  # [B, L, heads, head_dim]
        return dense.permute(0, 2, 1, 3).to(compute)

    qp, kp, vp = padded(q), padded(k), padded(v)
    mask = jagged_attention_mask(lengths, pad_len, causal=causal, num_targets=num_targets)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # [B, heads, L, L]
    if kind == "softmax":
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)
    else:
        n = lengths.clamp(min=1) if max_len is None else torch.full_like(lengths, max_len)
        n = n.to(compute)
        weights = torch.nn.functional.silu(scores) * mask[:, None] / n[:, None, None, None]
    out = torch.matmul(weights, vp).permute(0, 2, 1, 3)  # [B, L, heads, head_dim]
    valid = torch.arange(pad_len, device=q.device)[None, :] < lengths[:, None]
    return out[valid]


# ----------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------


def jagged_block_schedule(
    offsets: torch.Tensor, total: int, block: int, *, causal: bool, by_key: bool = False
) -> torch.Tensor:
    """The block list of a launch: int64 ``[N // block + B, 2]`` rows ``(sequence, block)``.

    One row per ``block``-token tile of every sequence, heaviest first; spare rows (the
    count is an upper bound known without a host sync) hold ``sequence = B`` and come last.
    Cost of a tile: causal query tile ``t`` sees ``t + 1`` key tiles, causal key tile ``t``
    is seen by ``tiles - t`` query tiles, and without ``causal`` every tile of a sequence
    costs its tile count. Built with a few torch ops on the device.

    Args:
        offsets: int64 ``[B + 1]`` sequence boundaries.
        total: ``N``, the number of tokens.
        block: the tile size in tokens.
        causal: order by the causal cost.
        by_key: tiles of keys (the dk/dv pass) rather than of queries.
    """
    num_seqs = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    tiles = torch.div(lengths + (block - 1), block, rounding_mode="floor")
    ends = torch.cumsum(tiles, 0)
    slots = total // block + num_seqs
    slot = torch.arange(slots, device=offsets.device)
    seq = torch.searchsorted(ends, slot, right=True)
    seq_at = seq.clamp(max=max(num_seqs - 1, 0))
    local = slot - (ends - tiles)[seq_at]
    if not causal:
        cost = tiles[seq_at]
    elif by_key:
        cost = tiles[seq_at] - local
    else:
        cost = local + 1
    cost = torch.where(seq < num_seqs, cost, -1)
    order = torch.sort(cost, descending=True, stable=True).indices
    return torch.stack([seq[order], local[order]], dim=1).contiguous()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 or t.shape[2] == 1 else t.contiguous()


def jagged_attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kind: AttentionKind = "softmax",
    causal: bool = True,
    num_targets: torch.Tensor | None = None,
    scale: float,
    max_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward kernel on checked inputs: ``(out, lse)``.

    ``lse`` is fp32 ``[heads, N]`` (base-2 log-sum-exp of the scaled scores, for the
    backward) for ``kind="softmax"``, ``None`` for ``"pointwise"``. ``q``, ``k``, ``v`` may
    have any token and head strides; the last dim is made contiguous if it is not.

    Args:
        q: ``[N, heads, head_dim]`` queries.
        k: keys, shaped like ``q``.
        v: values, shaped like ``q``.
        offsets: int64 ``[B + 1]`` sequence boundaries (checked).
        kind: ``"softmax"`` or ``"pointwise"``.
        causal: mask future positions.
        num_targets: optional int64 ``[B]`` target counts (checked).
        scale: the score scale.
        max_len: the pointwise divisor for every sequence; ``None``: each sequence's length.
        block_m: query tile (default :func:`attention_blocks`).
        block_n: key tile (default :func:`attention_blocks`).
        num_warps: warps per program (default :func:`attention_blocks`).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total, heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = None
    if kind == "softmax":
        lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    num_seqs = offsets.numel() - 1
    if total == 0 or num_seqs == 0:
        return out, lse
    bm, bn, warps = attention_blocks(head_dim, element_size=q.element_size())
    block_m, block_n, num_warps = block_m or bm, block_n or bn, num_warps or warps
    schedule = jagged_block_schedule(offsets, total, block_m, causal=causal)
    targets = num_targets if num_targets is not None else offsets
    _FWD(
        (schedule.shape[0], heads),
        q, k, v, out, lse if lse is not None else out, offsets, targets, schedule,
        num_seqs, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        float(scale), 1.0 / max_len if max_len else 0.0,
        _KIND_CODE[kind], bool(causal), num_targets is not None,
        head_dim, max(16, next_pow2(head_dim)), block_m, block_n, _precision(q.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    record_launch("jagged_attention_fwd")
    return out, lse


def jagged_attention_backward_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    offsets: torch.Tensor,
    *,
    kind: AttentionKind = "softmax",
    causal: bool = True,
    num_targets: torch.Tensor | None = None,
    scale: float,
    max_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels (dq pass, then dk/dv pass) on checked inputs: ``(dq, dk, dv)``.

    Deterministic: every gradient row is written by one program, no atomics.

    Args:
        dout: gradient of the output, ``[N, heads, head_dim]``.
        q: the forward's queries.
        k: the forward's keys.
        v: the forward's values.
        out: the forward's output (read for softmax only).
        lse: the forward's log-sum-exp (softmax), or ``None`` (pointwise).
        offsets: int64 ``[B + 1]`` sequence boundaries.
        kind: ``"softmax"`` or ``"pointwise"``.
        causal: mask future positions.
        num_targets: optional int64 ``[B]`` target counts.
        scale: the score scale.
        max_len: the pointwise divisor, as in the forward.
        block_m: query tile (default :func:`attention_blocks` with ``backward=True``).
        block_n: key tile (default :func:`attention_blocks` with ``backward=True``).
        num_warps: warps per program (default :func:`attention_blocks`).
    """
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    total, heads, head_dim = q.shape
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    num_seqs = offsets.numel() - 1
    if total == 0 or num_seqs == 0:
        return dq, dk, dv
    bm, bn, warps = attention_blocks(head_dim, True, q.element_size())
    block_m, block_n, num_warps = block_m or bm, block_n or bn, num_warps or warps
    is_softmax = kind == "softmax"
    # delta_i = dout_i . out_i, written by the dq pass for the dk/dv pass (softmax only).
    delta = torch.empty((heads, total if is_softmax else 0), dtype=torch.float32, device=q.device)
    lse_arg = lse if is_softmax and lse is not None else delta
    targets = num_targets if num_targets is not None else offsets
    consts = (
        _KIND_CODE[kind], bool(causal), num_targets is not None,
        head_dim, max(16, next_pow2(head_dim)), block_m, block_n, _precision(q.dtype),
    )  # fmt: skip
    schedule = jagged_block_schedule(offsets, total, block_m, causal=causal)
    _DQ(
        (schedule.shape[0], heads),
        q, k, v, out, dout, lse_arg, delta, dq, offsets, targets, schedule,
        num_seqs, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1),
        float(scale), 1.0 / max_len if max_len else 0.0,
        *consts,
        num_warps=num_warps,
    )  # fmt: skip
    record_launch("jagged_attention_dq")
    schedule = jagged_block_schedule(offsets, total, block_n, causal=causal, by_key=True)
    _DKDV(
        (schedule.shape[0], heads),
        q, k, v, dout, lse_arg, delta, dk, dv, offsets, targets, schedule,
        num_seqs, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        float(scale), 1.0 / max_len if max_len else 0.0,
        *consts,
        num_warps=num_warps,
    )  # fmt: skip
    record_launch("jagged_attention_dkdv")
    return dq, dk, dv
