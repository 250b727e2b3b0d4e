"""Dice with autograd: :func:`dice`, the op behind :class:`~recstack.pipelines.models.Dice`.

On CUDA (or under ``TRITON_INTERPRET=1``) it runs the kernels of
:mod:`recstack.pipelines.kernels.dice`: two launches forward and two backward, where the
same function in torch ops is a couple of dozen launches each way. Elsewhere it runs the
torch reference.
"""

from __future__ import annotations

from typing import Any

import torch

from recstack.core.kernels import carry_backend, use_triton
from recstack.pipelines.kernels.dice import DiceSaved, dice_backward, dice_forward, dice_reference

__all__ = ["dice"]


@carry_backend
class _DiceFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        alpha: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        training: bool,
        eps: float,
        momentum: float,
    ) -> torch.Tensor:
        y, saved = dice_forward(
            x, alpha, running_mean, running_var, training=training, eps=eps, momentum=momentum
        )
        ctx.save_for_backward(x, alpha, saved.mean, saved.rstd)
        ctx.batch_stats = training and x.shape[0] > 0
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, alpha, mean, rstd = ctx.saved_tensors
        dx, dalpha = dice_backward(dy, x, alpha, DiceSaved(mean, rstd), batch_stats=ctx.batch_stats)
        return dx, dalpha.to(alpha.dtype), None, None, None, None, None


def dice(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    eps: float = 1e-8,
    momentum: float = 0.01,
) -> torch.Tensor:
    """Dice of ``x`` (``[..., C]``, channels last): ``x * (alpha + (1 - alpha) * p)`` with
    ``p = sigmoid((x - mean) / sqrt(var + eps))``, in ``x``'s dtype.

    In training ``mean`` and ``var`` are the batch's (over every dim but the last, biased
    variance) and ``running_mean`` / ``running_var`` move towards them by ``momentum``, in
    place; in eval they are the running ones. Statistics are float32.

    Args:
        x: the input.
        alpha: float32 ``[C]`` (a parameter: it gets a gradient).
        running_mean: float32 ``[C]`` buffer.
        running_var: float32 ``[C]`` buffer.
        training: batch statistics or the running ones.
        eps: added to the variance.
        momentum: weight of the batch in the running averages.

    Examples:
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> alpha = torch.zeros(4, requires_grad=True)
        >>> y = dice(x, alpha, torch.zeros(4), torch.ones(4), training=True)
        >>> y.sum().backward()
        >>> x.grad.shape, alpha.grad.shape
        (torch.Size([8, 4]), torch.Size([4]))
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if not use_triton(flat, op="dice"):
        kw = {"training": training, "eps": eps, "momentum": momentum}
        return dice_reference(flat, alpha, running_mean, running_var, **kw).reshape(shape)
    y = _DiceFunction.apply(
        flat.contiguous(), alpha, running_mean, running_var, training, eps, momentum
    )
    return y.reshape(shape)
