"""Softmax cross-entropy over large item vocabularies, without the full logits.

:func:`linear_cross_entropy` is ``F.cross_entropy(hidden @ weight.T + bias, target)`` for
next-item prediction over ``V`` items (``V`` up to millions): the ``[T, V]`` logits of
``T`` tokens never exist at once. The tokens go in chunks of ``chunk_size`` rows; for each
chunk:

1. ``z = hidden[chunk] @ weight.T (+ bias)`` into one reused ``[chunk, V]`` block (cuBLAS);
2. one kernel (:func:`~recstack.pipelines.kernels.cross_entropy.cross_entropy_rows`) takes
   each row's log-sum-exp and loss and overwrites the block with the gradient of the logits,
   already divided by the number of counted tokens for a mean;
3. ``d hidden[chunk] = z @ weight`` and ``d weight += z.T @ hidden[chunk]`` (cuBLAS, the
   weight gradient accumulated in fp32 over the chunks), ``d bias += z.sum(0)``.

The gradients are thus made during the forward, while the block is at hand, and kept for
the backward, which only multiplies them by the upstream gradient (a scalar for
``reduction="mean"`` / ``"sum"``): nothing is recomputed. With ``reduction="none"`` the
upstream gradient has one value per token and does not factor out of the weight gradient,
so the forward computes the losses alone (one read of each block, no write) and the
backward runs the chunks again with each row's gradient scaled by its upstream value: one
more ``hidden @ weight.T`` product than the other reductions. Without gradients (eval,
``torch.no_grad``) the forward computes the losses alone too.

Memory: one ``[chunk, V]`` block in the compute dtype, an fp32 ``[V, H]`` weight-gradient
accumulator, and the gradients of ``hidden`` / ``weight`` / ``bias`` (in their dtypes) held
from the forward to the backward. The default chunk keeps the block under
:data:`LOGITS_BLOCK_BYTES`.

:func:`sampled_softmax_loss` is the sampled alternative: a softmax over each token's
positive item and ``S`` shared sampled negatives, with the logit of each item corrected by
``- log Q`` (its sampling probability) and negatives equal to the token's positive masked
(accidental hits). :func:`in_batch_softmax_loss` uses the other tokens' positives as the
negatives. Both are plain torch (their ``[T, 1 + S]`` logits are small).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from recstack.core.kernels import carry_backend
from recstack.pipelines.kernels.cross_entropy import cross_entropy_rows

__all__ = [
    "LOGITS_BLOCK_BYTES",
    "LinearCrossEntropy",
    "Reduction",
    "in_batch_softmax_loss",
    "linear_cross_entropy",
    "logits_chunk_rows",
    "sampled_softmax_loss",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Default size bound of the ``[chunk, V]`` logits block of :func:`linear_cross_entropy`
#: (2 GiB: up to 1,073 bf16 or 536 fp32 rows at a million items). Larger chunks make fewer
#: passes over the fp32 weight-gradient accumulator (read and written once a chunk).
LOGITS_BLOCK_BYTES: int = 2 * 2**30

# Rows of the logits block start on 16-element boundaries: aligned rows give the kernel
# 128-bit loads and cuBLAS aligned leading dimensions whatever V is.
_ROW_ALIGN = 16


def logits_chunk_rows(
    num_rows: int, vocab: int, dtype: torch.dtype, budget_bytes: int | None = None
) -> int:
    """Rows a chunk of :func:`linear_cross_entropy` takes so its logits block fits a budget.

    The chunks are balanced (a 1,100-row batch with room for 1,000 rows a chunk goes as two
    chunks of 552, not 1,000 + 100) and, when more than 8 rows fit, a multiple of 8 rows.

    Args:
        num_rows: tokens in the batch (``T``).
        vocab: items (``V``).
        dtype: the logits' dtype (that of ``hidden`` and ``weight``).
        budget_bytes: the block's size bound (default :data:`LOGITS_BLOCK_BYTES`).

    Returns:
        The rows of a chunk, at least 1.

    Examples:
        >>> import torch
        >>> logits_chunk_rows(8192, 1_000_000, torch.bfloat16)
        1024
        >>> logits_chunk_rows(1100, 1_000_000, torch.bfloat16)
        552
    """
    budget = LOGITS_BLOCK_BYTES if budget_bytes is None else int(budget_bytes)
    row_bytes = _row_stride(vocab) * torch.empty((), dtype=dtype).element_size()
    fit = max(1, budget // max(1, row_bytes))
    if num_rows <= fit:
        return max(1, num_rows)
    chunks = -(-num_rows // fit)
    rows = -(-num_rows // chunks)
    if fit >= 8:
        rows = min(fit, -(-rows // 8) * 8)
    return rows


def _row_stride(vocab: int) -> int:
    return -(-vocab // _ROW_ALIGN) * _ROW_ALIGN


# ----------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    reduction: str
    label_smoothing: float
    chunk_rows: int
    check_target: bool


# Whether cuBLAS takes a bf16/fp16 product into an fp32 accumulator in one call here
# (addmm's out_dtype overload), per (device type, dtype); probed once, on the first call.
_FP32_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def _fp32_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe ``addmm(acc, a, b, out_dtype=float32, out=acc)`` on a tiny product (one host
    read, once a process): older torch lacks the overload or wants ``acc`` in the inputs'
    dtype, and a wrong sum must never reach a weight gradient."""
    key = (device.type, dtype)
    if key not in _FP32_ADDMM:
        try:
            acc = torch.ones(2, 2, dtype=torch.float32, device=device)
            a = torch.ones(3, 2, dtype=dtype, device=device).t()  # transposed, as z.T is
            torch.addmm(
                acc,
                a,
                torch.ones(3, 2, dtype=dtype, device=device),
                out_dtype=torch.float32,
                out=acc,
            )
            _FP32_ADDMM[key] = bool((acc == 4.0).all())
        except (RuntimeError, TypeError):
            _FP32_ADDMM[key] = False
    return _FP32_ADDMM[key]


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32, whatever the dtype of ``a`` and ``b``."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_addmm_works(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        # Each chunk's product rounded to the inputs' dtype, the sum over chunks in fp32.
        acc.add_(a @ b)


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    opts: _Options,
    *,
    grad_scale: torch.Tensor | None,
    want: tuple[bool, bool, bool],
    loss_rows: torch.Tensor | None,
    bad_row: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run every chunk: per-row losses into ``loss_rows`` and, with ``grad_scale``, the
    gradients ``want``-ed of hidden, weight (fp32) and bias (fp32)."""
    num_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    store = grad_scale is not None
    d_hidden = torch.empty_like(hidden) if store and want[0] else None
    d_weight = (
        torch.zeros((vocab, dim), dtype=torch.float32, device=device) if store and want[1] else None
    )
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if store and want[2] else None
    if num_rows == 0:
        return d_hidden, d_weight, d_bias
    rows = min(num_rows, opts.chunk_rows)
    block = torch.empty((rows, _row_stride(vocab)), dtype=hidden.dtype, device=device)[:, :vocab]
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    weight_t = weight.t()
    per_row = store and grad_scale.numel() > 1
    for start in range(0, num_rows, rows):
        stop = min(num_rows, start + rows)
        z = block[: stop - start]
        h = hidden[start:stop]
        if bias is None:
            torch.mm(h, weight_t, out=z)
        else:
            torch.addmm(bias, h, weight_t, out=z)
        cross_entropy_rows(
            z,
            target[start:stop],
            ignore_index=opts.ignore_index,
            label_smoothing=opts.label_smoothing,
            grad_scale=grad_scale[start:stop] if per_row else grad_scale,
            bad_row=bad_row,
            row_offset=start,
            loss_out=loss_rows[start:stop] if loss_rows is not None else None,
            lse_out=lse[: stop - start],
        )
        if not store:
            continue
        if d_hidden is not None:
            torch.mm(z, weight, out=d_hidden[start:stop])
        if d_weight is not None:
            _accumulate_product(d_weight, z.t(), h)
        if d_bias is not None:
            d_bias += z.sum(dim=0, dtype=torch.float32)
    return d_hidden, d_weight, d_bias


def _raise_bad_target(
    bad_row: torch.Tensor, target: torch.Tensor, opts: _Options, vocab: int
) -> None:
    if not opts.check_target:
        return
    row = int(bad_row.item())  # the one host read of the forward
    if row >= 0:
        raise ValueError(
            f"linear_cross_entropy: target[{row}] = {int(target[row])} is outside "
            f"[0, {vocab}) (the rows of weight) and is not ignore_index ({opts.ignore_index})"
        )


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    opts: _Options,
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """The reduced loss and, unless ``want`` is all False or the reduction is ``none``,
    the gradients of a unit upstream gradient in the inputs' dtypes."""
    device = hidden.device
    num_rows = hidden.shape[0]
    loss_rows = torch.empty(num_rows, dtype=torch.float32, device=device)
    bad_row = torch.full((1,), -1, dtype=torch.int64, device=device)
    grad_scale = None
    counted = None
    if opts.reduction != "none":
        counted = (target != opts.ignore_index).sum()
        if any(want):
            if opts.reduction == "mean":
                grad_scale = (1.0 / counted.to(torch.float32)).reshape(1)
            else:
                grad_scale = torch.ones(1, dtype=torch.float32, device=device)
    grads = _chunked_pass(
        hidden, weight, bias, target, opts,
        grad_scale=grad_scale, want=want, loss_rows=loss_rows, bad_row=bad_row,
    )  # fmt: skip
    _raise_bad_target(bad_row, target, opts, weight.shape[0])
    if opts.reduction == "none":
        loss = loss_rows
    elif opts.reduction == "sum":
        loss = loss_rows.sum()
    else:
        # 0 / 0 = NaN when every target is ignored, as F.cross_entropy gives.
        loss = loss_rows.sum() / counted
    d_hidden, d_weight, d_bias = grads
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None and bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return loss.to(hidden.dtype), (d_hidden, d_weight, d_bias)


@carry_backend
class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients made in the forward (mean / sum) or by a second pass (none)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        opts: _Options,
    ) -> torch.Tensor:
        want = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        ctx.opts = opts
        if opts.reduction == "none":
            loss, _ = _forward(hidden, weight, bias, target, opts, (False, False, False))
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.grads = None
        else:
            loss, ctx.grads = _forward(hidden, weight, bias, target, opts, want)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        opts: _Options = ctx.opts
        if ctx.grads is not None:
            scale = grad_loss.reshape(())
            grads = tuple(None if g is None else g * scale.to(g.dtype) for g in ctx.grads)
        else:
            hidden, weight, bias, target = ctx.saved_tensors
            want = tuple(bool(n) for n in ctx.needs_input_grad[:3])
            d_hidden, d_weight, d_bias = _chunked_pass(
                hidden, weight, bias, target, opts,
                grad_scale=grad_loss.reshape(-1).to(torch.float32).contiguous(),
                want=want, loss_rows=None, bad_row=None,
            )  # fmt: skip
            grads = (
                d_hidden,
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None or bias is None else d_bias.to(bias.dtype),
            )
        return grads[0], grads[1], grads[2], None, None


def _check_linear(
    hidden: Any, weight: Any, target: Any, bias: Any, reduction: Any, label_smoothing: Any
) -> None:
    what = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{what}: weight must be [V, H] with V >= 1, got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(
            f"{what}: hidden must be [..., H] with H = {dim} (weight's columns), got "
            f"{tuple(hidden.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{what}: weight is {weight.dtype} but hidden is {hidden.dtype}; cast them to one "
            "dtype (the logits are computed in it)"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{what}: target must be an integer tensor, got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{what}: target has shape {tuple(target.shape)} but hidden's leading shape is "
            f"{tuple(hidden.shape[:-1])}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{what}: bias must be a [{vocab}] tensor, got {shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{what}: bias is {bias.dtype} but hidden is {hidden.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{what}: {name} is on {t.device} but hidden is on {hidden.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1], got {label_smoothing}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    check_target: bool = True,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target)`` without the full logits.

    Gradients flow to ``hidden``, ``weight`` and ``bias`` (those that require them). The
    per-row loss is ``F.cross_entropy``'s: ``logsumexp(z) - (1 - eps) * z[target] - eps / V
    * sum(z)`` in fp32, and so are the reductions: ``"mean"`` divides by the number of
    targets that are not ``ignore_index`` (NaN when there are none, with zero gradients,
    as torch gives), ``"sum"`` adds them (0 for an empty or all-ignored batch), ``"none"``
    returns one loss per token (0 where ignored).

    Target check: a target outside ``[0, V)`` that is not ``ignore_index`` raises. The
    kernel never reads out of bounds for it: it records the row on the device, and the
    forward reads that record back once, after all chunks are queued (one host sync a
    call). ``check_target=False`` skips the read: such rows then give a NaN loss and NaN
    gradients instead of an error.

    Args:
        hidden: float ``[..., H]`` token states (``[T, H]``, or ``[B, L, H]`` with
            ``target`` ``[B, L]``).
        weight: ``[V, H]`` item table (the output projection or tied item embeddings), the
            dtype of ``hidden``.
        target: integer ``[...]`` item of each token, ``hidden``'s leading shape.
        bias: optional ``[V]`` per-item bias, the dtype of ``hidden``.
        ignore_index: target of tokens that contribute nothing (padding).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]`` as in ``F.cross_entropy``.
        chunk_size: tokens a chunk (default :func:`logits_chunk_rows`, a block under
            :data:`LOGITS_BLOCK_BYTES`).
        check_target: raise on an out-of-range target (one host read a call).

    Returns:
        The loss in ``hidden``'s dtype: a scalar, or ``target``'s shape for ``"none"``.

    Raises:
        TypeError: a non-tensor argument, a dtype mismatch or a non-integer ``target``.
        ValueError: shapes that do not match, a bad ``reduction``, ``label_smoothing`` or
            ``chunk_size``, or a target outside ``[0, V)`` (naming the token and value).

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> hidden = torch.randn(6, 4, requires_grad=True)
        >>> weight = torch.randn(10, 4, requires_grad=True)
        >>> target = torch.tensor([1, 3, -100, 9, 0, 3])
        >>> loss = linear_cross_entropy(hidden, weight, target, chunk_size=4)
        >>> loss.backward()
        >>> ref = F.cross_entropy(hidden @ weight.T, target)
        >>> torch.allclose(loss, ref)
        True
    """
    _check_linear(hidden, weight, target, bias, reduction, label_smoothing)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"linear_cross_entropy: chunk_size must be an int >= 1, got {chunk_size!r}"
        )
    vocab, dim = weight.shape
    lead = target.shape
    flat_hidden = hidden.reshape(-1, dim).contiguous()
    flat_target = target.reshape(-1).to(torch.int64)
    num_rows = flat_target.numel()
    opts = _Options(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        chunk_rows=chunk_size or logits_chunk_rows(num_rows, vocab, hidden.dtype),
        check_target=bool(check_target),
    )
    weight = weight.contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad:
        loss = _LinearCrossEntropyFunction.apply(flat_hidden, weight, bias, flat_target, opts)
    else:
        loss, _ = _forward(flat_hidden, weight, bias, flat_target, opts, (False, False, False))
    return loss.reshape(lead) if reduction == "none" else loss


class LinearCrossEntropy(nn.Module):
    """:func:`linear_cross_entropy` as a loss module (like ``nn.CrossEntropyLoss``, with the
    output projection folded in).

    The item table is an argument of ``forward``, not a parameter of the module, so it can
    be the model's own output layer or its item embedding table (tied weights).

    Args:
        ignore_index: target of tokens that contribute nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``.
        chunk_size: tokens a chunk (``None``: from :data:`LOGITS_BLOCK_BYTES`).
        check_target: raise on an out-of-range target (one host read a call).

    Examples:
        >>> import torch
        >>> loss_fn = LinearCrossEntropy(reduction="sum")
        >>> loss = loss_fn(torch.randn(5, 8), torch.randn(100, 8), torch.randint(0, 100, (5,)))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        check_target: bool = True,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"LinearCrossEntropy: reduction must be one of {_REDUCTIONS}")
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.check_target = check_target

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``hidden @ weight.T + bias`` against ``target``.

        Args:
            hidden: float ``[..., H]`` token states.
            weight: ``[V, H]`` item table.
            target: integer ``[...]`` item of each token.
            bias: optional ``[V]`` per-item bias.

        Returns:
            The loss (see :func:`linear_cross_entropy`).
        """
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
            check_target=self.check_target,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
        )


# ----------------------------------------------------------------------------------------
# Sampled softmax
# ----------------------------------------------------------------------------------------


def _vector(what: str, name: str, t: Any, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: {name} must be a 1-D tensor of {n} entries, got {shape}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device} but hidden is on {device}")
    return t


def _ids(what: str, name: str, t: Any, n: int, device: torch.device) -> torch.Tensor:
    t = _vector(what, name, t, n, device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what}: {name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int64)


def _rows(what: str, name: str, t: Any, n: int | None, hidden: torch.Tensor) -> torch.Tensor:
    dim = hidden.shape[1]
    if (
        not isinstance(t, torch.Tensor)
        or t.dim() != 2
        or t.shape[1] != dim
        or (n is not None and t.shape[0] != n)
    ):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        rows = n if n is not None else "S"
        raise ValueError(f"{what}: {name} must be [{rows}, {dim}], got {shape}")
    if t.device != hidden.device:
        raise ValueError(f"{what}: {name} is on {t.device} but hidden is on {hidden.device}")
    if t.dtype != hidden.dtype:
        raise TypeError(f"{what}: {name} is {t.dtype} but hidden is {hidden.dtype}")
    return t


def _gather(
    what: str, item_weight: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None, name: str
) -> torch.Tensor:
    """Rows ``item_weight[ids]``; ids of dropped rows (``keep`` False) read row 0."""
    vocab = item_weight.shape[0]
    inside = (ids >= 0) & (ids < vocab)
    if keep is not None:
        inside |= ~keep
    if not bool(inside.all()):  # one host read: a bad id would fault the gather on a GPU
        pos = int(torch.nonzero(~inside)[0, 0])
        raise ValueError(
            f"{what}: {name}[{pos}] = {int(ids[pos])} is outside [0, {vocab}) "
            "(the rows of item_weight)"
        )
    safe = ids if keep is None else torch.where(keep, ids, 0)
    return F.embedding(safe, item_weight)


def _sampled_softmax(
    hidden: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    pos_logq: torch.Tensor | None,
    neg_logq: torch.Tensor | None,
    neg_mask: torch.Tensor | None,
    keep: torch.Tensor | None,
    temperature: float,
    reduction: str,
) -> torch.Tensor:
    """Cross-entropy of ``[pos, negs]`` logits with target 0; ``neg_mask`` [T, S] True
    drops a negative for a token, ``keep`` [T] False drops a token."""
    pos = (hidden.float() * pos_emb.float()).sum(dim=1) / temperature
    neg = (hidden @ neg_emb.t()).float() / temperature
    if pos_logq is not None:
        pos = pos - pos_logq.float()
    if neg_logq is not None:
        neg = neg - neg_logq.float()[None, :]
    if neg_mask is not None:
        neg = neg.masked_fill(neg_mask, float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    ignore = -100
    target = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    if keep is not None:
        target = torch.where(keep, target, ignore)
    loss = F.cross_entropy(logits, target, ignore_index=ignore, reduction=reduction)
    return loss.to(hidden.dtype)


def _check_common(what: str, hidden: Any, temperature: float, reduction: str) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{what}: hidden must be a 2-D [T, H] tensor, got {shape}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if not float(temperature) > 0.0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sampled_softmax_loss(
    hidden: torch.Tensor,
    pos_ids: torch.Tensor | None,
    neg_ids: torch.Tensor | None,
    item_weight: torch.Tensor | None = None,
    *,
    pos_emb: torch.Tensor | None = None,
    neg_emb: torch.Tensor | None = None,
    pos_logq: torch.Tensor | None = None,
    neg_logq: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    temperature: float = 1.0,
    ignore_index: int | None = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Sampled softmax loss: each token's positive against ``S`` shared sampled negatives,
    with the log-Q correction.

    Token ``t``'s logits are ``[s(t, pos_t), s(t, neg_1), ..., s(t, neg_S)]`` with
    ``s(t, i) = <hidden_t, emb_i> / temperature - log Q(i)`` and the loss is the softmax
    cross-entropy with the positive as the target. ``Q(i)`` is the probability that the
    sampler draws item ``i``; subtracting ``log Q`` from every logit (the positive's too:
    pass ``pos_logq``) makes the sampled softmax estimate the full one without the bias
    toward frequent items. With ``remove_accidental_hits``, a negative whose id is the
    token's positive is dropped from that token's softmax (its logit set to ``-inf``).

    The item rows come from ``item_weight`` (``pos_ids`` / ``neg_ids`` index it; its
    gradient is dense, as ``F.embedding``'s) or, for a dynamic embedding table, already
    gathered as ``pos_emb`` / ``neg_emb`` (their gradients flow back to the gather). The
    ids are still needed to remove accidental hits and to find ``ignore_index`` tokens.

    Args:
        hidden: float ``[T, H]`` token (or user) states.
        pos_ids: integer ``[T]`` positive item of each token, or ``None`` when
            ``pos_emb`` is given and neither hits nor ignored tokens are to be found.
        neg_ids: integer ``[S]`` sampled negatives shared by every token, or ``None`` when
            ``neg_emb`` is given and ``remove_accidental_hits`` is False.
        item_weight: ``[V, H]`` item table to gather the rows from, or ``None`` with
            ``pos_emb`` and ``neg_emb``.
        pos_emb: ``[T, H]`` gathered rows of the positives (instead of ``item_weight``).
        neg_emb: ``[S, H]`` gathered rows of the negatives (instead of ``item_weight``).
        pos_logq: ``[T]`` log sampling probability of each positive, or ``None`` (no
            correction of the positives).
        neg_logq: ``[S]`` log sampling probability of each negative, or ``None``.
        remove_accidental_hits: drop negatives equal to the token's positive.
        temperature: logits are divided by it before the correction.
        ignore_index: a ``pos_ids`` value of tokens that contribute nothing; ``None``
            ignores no token (for raw ids, where every value may be a real item).
        reduction: ``"mean"`` (over tokens not ignored; NaN if none, as torch),
            ``"sum"`` or ``"none"``.

    Returns:
        The loss in ``hidden``'s dtype: a scalar, or ``[T]`` for ``"none"``.

    Raises:
        ValueError: missing or misshapen ids, rows or corrections, or (with
            ``item_weight``) an id outside its rows (one host read to check).
        TypeError: non-integer ids or rows of another dtype than ``hidden``.

    Examples:
        >>> import torch
        >>> hidden, table = torch.randn(4, 8), torch.randn(50, 8)
        >>> negs = torch.tensor([3, 7, 7, 20])
        >>> logq = torch.full((50,), 1 / 50).log()
        >>> loss = sampled_softmax_loss(
        ...     hidden, torch.tensor([1, 7, 2, -100]), negs, table,
        ...     pos_logq=logq[[1, 7, 2, 0]], neg_logq=logq[negs],
        ... )
        >>> loss.shape
        torch.Size([])
    """
    what = "sampled_softmax_loss"
    _check_common(what, hidden, temperature, reduction)
    device, num_rows = hidden.device, hidden.shape[0]
    if pos_ids is not None:
        pos_ids = _ids(what, "pos_ids", pos_ids, num_rows, device)
    if neg_ids is not None:
        if not isinstance(neg_ids, torch.Tensor) or neg_ids.dim() != 1:
            raise ValueError(f"{what}: neg_ids must be a 1-D tensor")
        neg_ids = _ids(what, "neg_ids", neg_ids, neg_ids.numel(), device)
    keep = pos_ids != ignore_index if pos_ids is not None and ignore_index is not None else None
    if item_weight is not None:
        if pos_emb is not None or neg_emb is not None:
            raise ValueError(f"{what}: give item_weight or pos_emb/neg_emb, not both")
        if pos_ids is None or neg_ids is None:
            raise ValueError(f"{what}: item_weight needs pos_ids and neg_ids to gather rows")
        _rows(what, "item_weight", item_weight, None, hidden)
        pos_emb = _gather(what, item_weight, pos_ids, keep, "pos_ids")
        neg_emb = _gather(what, item_weight, neg_ids, None, "neg_ids")
    elif pos_emb is None or neg_emb is None:
        raise ValueError(f"{what}: give item_weight, or both pos_emb and neg_emb")
    pos_emb = _rows(what, "pos_emb", pos_emb, num_rows, hidden)
    neg_emb = _rows(what, "neg_emb", neg_emb, None, hidden)
    num_neg = neg_emb.shape[0]
    if neg_ids is not None and neg_ids.numel() != num_neg:
        raise ValueError(
            f"{what}: neg_ids has {neg_ids.numel()} ids but neg_emb has {num_neg} rows"
        )
    if pos_logq is not None:
        pos_logq = _vector(what, "pos_logq", pos_logq, num_rows, device)
    if neg_logq is not None:
        neg_logq = _vector(what, "neg_logq", neg_logq, num_neg, device)
    neg_mask = None
    if remove_accidental_hits:
        if pos_ids is None or neg_ids is None:
            raise ValueError(
                f"{what}: remove_accidental_hits needs pos_ids and neg_ids (or pass "
                "remove_accidental_hits=False)"
            )
        neg_mask = pos_ids[:, None] == neg_ids[None, :]
    return _sampled_softmax(
        hidden, pos_emb, neg_emb, pos_logq, neg_logq, neg_mask, keep, float(temperature), reduction
    )


def in_batch_softmax_loss(
    hidden: torch.Tensor,
    pos_emb: torch.Tensor,
    pos_ids: torch.Tensor,
    *,
    pos_frequency: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives: each token's negatives are the other
    tokens' positives, corrected by their log frequency.

    In-batch negatives are drawn from the training stream itself, so item ``i`` is a
    negative with probability proportional to its frequency ``f(i)``: every logit
    (positives too) is corrected by ``- log f(i)`` (the normalisation of ``f`` adds the
    same constant to every logit and cancels in the softmax, so counts work as well as
    probabilities). A token's own positive is never its negative; with
    ``remove_accidental_hits`` neither is another token's positive with the same id.
    Tokens whose ``pos_ids`` is ``ignore_index`` are neither queries nor negatives.

    Args:
        hidden: float ``[T, H]`` token (or user) states.
        pos_emb: ``[T, H]`` rows of each token's positive item (also the negatives).
        pos_ids: integer ``[T]`` positive item ids.
        pos_frequency: ``[T]`` sampling frequency of each token's positive (a count or a
            probability, > 0; e.g. ``item_counts[pos_ids]`` or a streaming estimate), or
            ``None`` for no correction. Clamped to the smallest positive float so a zero
            does not make an infinite logit.
        remove_accidental_hits: also drop negatives that share the token's positive id.
        temperature: logits are divided by it before the correction.
        ignore_index: a ``pos_ids`` value of tokens that contribute nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss in ``hidden``'s dtype: a scalar, or ``[T]`` for ``"none"``.

    Raises:
        ValueError: misshapen arguments or a non-positive temperature.
        TypeError: non-integer ids or rows of another dtype than ``hidden``.

    Examples:
        >>> import torch
        >>> hidden, pos_emb = torch.randn(4, 8), torch.randn(4, 8)
        >>> ids = torch.tensor([5, 9, 5, 2])
        >>> counts = torch.tensor([10.0, 3.0, 10.0, 1.0])
        >>> in_batch_softmax_loss(hidden, pos_emb, ids, pos_frequency=counts).shape
        torch.Size([])
    """
    what = "in_batch_softmax_loss"
    _check_common(what, hidden, temperature, reduction)
    device, num_rows = hidden.device, hidden.shape[0]
    pos_ids = _ids(what, "pos_ids", pos_ids, num_rows, device)
    pos_emb = _rows(what, "pos_emb", pos_emb, num_rows, hidden)
    logq = None
    if pos_frequency is not None:
        freq = _vector(what, "pos_frequency", pos_frequency, num_rows, device).float()
        logq = freq.clamp_min(torch.finfo(torch.float32).tiny).log()
    keep = pos_ids != ignore_index
    own = torch.eye(num_rows, dtype=torch.bool, device=device)
    same = pos_ids[:, None] == pos_ids[None, :] if remove_accidental_hits else own
    neg_mask = same | own | ~keep[None, :]
    return _sampled_softmax(
        hidden, pos_emb, pos_emb, logq, logq, neg_mask, keep, float(temperature), reduction
    )
