"""Self-attention over jagged sequences, with autograd: the functional op and a module.

:func:`jagged_attention` attends within each sequence of a jagged batch (core's
``JaggedTensor`` layout: ``[N, heads, head_dim]`` rows and int64 ``offsets``), softmax
(SASRec-style) or HSTU's pointwise ``silu(q.k) / n``, causal and/or with target rows for
generative ranking. CUDA tensors run the Triton kernels of
:mod:`recstack.pipelines.kernels.jagged_attention` (no padding, no ``[L, L]`` tensor);
CPU tensors run the padded torch reference, differentiated by autograd.

:class:`JaggedSelfAttention` adds the projections: HSTU's block for ``kind="pointwise"``
(one linear to ``u, v, q, k`` through silu, the attention normalised and gated by ``u``,
an output linear) and a standard multi-head block for ``kind="softmax"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from recstack.core import JaggedTensor
from recstack.core.kernels import carry_backend, use_triton
from recstack.pipelines.kernels.jagged_attention import (
    ATTENTION_KINDS,
    AttentionKind,
    check_jagged_attention_inputs,
    jagged_attention_backward_triton,
    jagged_attention_forward_triton,
    jagged_attention_reference,
)

__all__ = ["JaggedAttentionFunction", "JaggedSelfAttention", "jagged_attention"]


@carry_backend
class JaggedAttentionFunction(torch.autograd.Function):
    """Autograd glue of the Triton kernels: the forward saves ``q, k, v`` (and for softmax
    the output and its fp32 log-sum-exp, ``4 * N * heads`` bytes); the backward recomputes
    the scores tile by tile. Inputs must be checked already (:func:`jagged_attention`
    does)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        offsets: torch.Tensor,
        num_targets: torch.Tensor | None,
        kind: AttentionKind,
        causal: bool,
        scale: float,
        max_len: int | None,
    ) -> torch.Tensor:
        out, lse = jagged_attention_forward_triton(
            q, k, v, offsets,
            kind=kind, causal=causal, num_targets=num_targets, scale=scale, max_len=max_len,
        )  # fmt: skip
        saved_out = out if kind == "softmax" else None
        ctx.save_for_backward(q, k, v, saved_out, lse, offsets, num_targets)
        ctx.options = {
            "kind": kind, "causal": causal, "scale": scale, "max_len": max_len,
        }  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, offsets, num_targets = ctx.saved_tensors
        dq, dk, dv = jagged_attention_backward_triton(
            dout, q, k, v, out if out is not None else q, lse, offsets,
            num_targets=num_targets, **ctx.options,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def jagged_attention(
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
    check_inputs: bool = True,
) -> torch.Tensor:
    """Self-attention within each sequence of a jagged batch.

    Sequence ``b`` is rows ``offsets[b]:offsets[b + 1]`` of ``q``, ``k`` and ``v``;
    position ``i`` attends to key ``j`` of its own sequence when ``j < hist`` and (``j <= i``
    if ``causal``), or when ``j == i``, with ``hist`` the sequence's length minus its
    targets. So the last ``num_targets[b]`` positions (candidates) see the whole history
    and themselves, not each other, and history positions never see them.

    * ``kind="softmax"``: ``out_i = sum_j softmax_j(scale * q_i.k_j) v_j``.
    * ``kind="pointwise"`` (HSTU): ``out_i = sum_j silu(scale * q_i.k_j) / n * v_j``, no
      normalisation over ``j``; ``n`` is the sequence's length, or ``max_len`` for every
      sequence when given (HSTU's original choice: the padded length).

    Examples:
        >>> import torch
        >>> q = k = v = torch.randn(5, 2, 16)
        >>> offsets = torch.tensor([0, 2, 5])  # two sequences, of 2 and 3 tokens
        >>> jagged_attention(q, k, v, offsets).shape
        torch.Size([5, 2, 16])

    Args:
        q: queries ``[N, heads, head_dim]``, float32 or bfloat16 (float16 works too);
            ``head_dim`` up to 256 (not a power of two or below 16: padded inside the
            kernels). Token and head strides are free; the last dim should be contiguous.
        k: keys, shaped and typed like ``q``.
        v: values, shaped and typed like ``q``.
        offsets: int64 ``[B + 1]``, ``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == N``; empty sequences are allowed.
        kind: ``"softmax"`` or ``"pointwise"``.
        causal: position ``i`` sees keys ``j <= i`` only (else the whole history).
        num_targets: optional int64 ``[B]``, ``0 <= num_targets[b] <=`` length of ``b``.
        scale: the score scale; ``None``: ``1 / sqrt(head_dim)``.
        max_len: a bound of every sequence's length (checked), the pointwise divisor
            ``n`` when given, and the padded length of the CPU reference (which then does
            not read the lengths back).
        check_inputs: read ``offsets`` and ``num_targets`` back to check their values
            (one host sync). ``False`` for trusted inputs: the CUDA path then never syncs.

    Returns:
        ``[N, heads, head_dim]`` in ``q``'s dtype.

    Raises:
        TypeError: an argument of the wrong type or dtype (e.g. offsets not int64).
        ValueError: shapes, devices or values that disagree, naming the argument.
    """
    scale = check_jagged_attention_inputs(
        q, k, v, offsets,
        kind=kind, num_targets=num_targets, scale=scale, max_len=max_len,
        check_values=check_inputs,
    )  # fmt: skip
    if use_triton(q, k, v, offsets, op="jagged_attention"):
        return JaggedAttentionFunction.apply(
            q, k, v, offsets, num_targets, kind, bool(causal), scale, max_len
        )
    return jagged_attention_reference(
        q, k, v, offsets,
        kind=kind, causal=causal, num_targets=num_targets, scale=scale, max_len=max_len,
    )  # fmt: skip


class JaggedSelfAttention(nn.Module):
    """Multi-head self-attention block on a jagged ``[N, dim]`` input.

    ``kind="pointwise"`` is HSTU's block: ``u, v, q, k = split(silu(W1 x))``,
    ``a = jagged_attention(q, k, v, kind="pointwise")``,
    ``out = W2(layer_norm(a) * u)``. ``kind="softmax"`` is the standard block:
    ``q, k, v = split(W1 x)``, ``out = W2(jagged_attention(q, k, v))``. Neither adds the
    residual or an input norm: wrap it as the model's block needs (``x + attn(norm(x),
    offsets)`` for a pre-norm transformer or HSTU).

    Examples:
        >>> import torch
        >>> attn = JaggedSelfAttention(32, heads=2, kind="pointwise")
        >>> x, offsets = torch.randn(7, 32), torch.tensor([0, 3, 3, 7])
        >>> attn(x, offsets).shape
        torch.Size([7, 32])

    Args:
        dim: the model width (last dim of the input and of the output).
        heads: attention heads.
        kind: ``"softmax"`` or ``"pointwise"``.
        causal: mask future positions.
        head_dim: width of one head's q, k and v (and u); default ``dim // heads``.
        bias: biases in the projections.
        scale: the score scale; ``None``: ``1 / sqrt(head_dim)``.
        eps: the layer norm's epsilon (pointwise).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kind: AttentionKind = "pointwise",
        causal: bool = True,
        *,
        head_dim: int | None = None,
        bias: bool = True,
        scale: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(
                f"JaggedSelfAttention: kind must be one of {ATTENTION_KINDS}, got {kind!r}"
            )
        if dim < 1 or heads < 1:
            raise ValueError(f"JaggedSelfAttention: dim and heads must be >= 1, got {dim}, {heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(
                    f"JaggedSelfAttention: dim={dim} is not a multiple of heads={heads}; "
                    "pass head_dim"
                )
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.kind, self.causal, self.scale = kind, bool(causal), scale
        inner = heads * head_dim
        self.norm: nn.LayerNorm | None
        if kind == "pointwise":
            self.in_proj = nn.Linear(dim, 4 * inner, bias=bias)  # u, v, q, k
            self.norm = nn.LayerNorm(inner, eps=eps)
        else:
            self.in_proj = nn.Linear(dim, 3 * inner, bias=bias)  # q, k, v
            self.norm = None
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor | JaggedTensor,
        offsets: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        max_len: int | None = None,
        check_inputs: bool = True,
    ) -> Any:
        """Attend within each sequence of ``x``.

        Args:
            x: ``[N, dim]`` tokens, or a ``JaggedTensor`` of them (then ``offsets`` is
                taken from it and a ``JaggedTensor`` is returned).
            offsets: int64 ``[B + 1]`` sequence boundaries (with a plain tensor ``x``).
            num_targets: optional int64 ``[B]`` target counts (see :func:`jagged_attention`).
            max_len: optional bound of the lengths (the pointwise divisor when given).
            check_inputs: read ``offsets`` and ``num_targets`` back to check them (one
                host sync); ``False`` for offsets the caller built itself.

        Returns:
            ``[N, dim]`` in the projections' output dtype, or a ``JaggedTensor`` of it.
        """
        jagged = isinstance(x, JaggedTensor)
        if jagged:
            if offsets is not None:
                raise ValueError("JaggedSelfAttention: pass offsets or a JaggedTensor, not both")
            values, offsets = x.values, x.offsets
        else:
            values = x
        if offsets is None:
            raise ValueError("JaggedSelfAttention: offsets is required with a plain tensor x")
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != self.dim:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise ValueError(f"JaggedSelfAttention: x must be [N, {self.dim}], got {shape}")
        n, inner = values.shape[0], self.heads * self.head_dim
        projected = self.in_proj(values)
        if self.kind == "pointwise":
            u, v, q, k = nn.functional.silu(projected).split(inner, dim=1)
        else:
            q, k, v = projected.split(inner, dim=1)
        shape = (n, self.heads, self.head_dim)
        attended = jagged_attention(
            q.view(shape), k.view(shape), v.view(shape), offsets,
            kind=self.kind, causal=self.causal, num_targets=num_targets,
            scale=self.scale, max_len=max_len, check_inputs=check_inputs,
        ).reshape(n, inner)  # fmt: skip
        if self.norm is not None:
            attended = self.norm(attended) * u
        out = self.out_proj(attended)
        return JaggedTensor(out, offsets) if jagged else out
