"""Softmax cross-entropy over a block of logits rows, its gradient written over the block.

This is the one kernel of :func:`recstack.pipelines.ops.cross_entropy.linear_cross_entropy`,
which multiplies a chunk of tokens' hidden states by the item table into a ``[rows, V]``
block (cuBLAS), runs this kernel on the block, and multiplies the block (now the gradient
of the logits) back into the hidden and weight gradients (cuBLAS again). The block is never
kept: the next chunk overwrites it.

For each row ``r`` with target ``t`` (smoothing ``eps``, ``V`` columns), in fp32:

* ``lse[r] = logsumexp(z[r])``;
* ``loss[r] = lse[r] - (1 - eps) * z[r, t] - eps / V * sum(z[r])`` (``F.cross_entropy``'s
  per-row loss with ``label_smoothing=eps``);
* with ``grad_scale`` given, the row is overwritten by its gradient
  ``(softmax(z[r]) - (1 - eps) * onehot(t) - eps / V) * scale[r]`` in the block's dtype;
  ``scale`` is one value for every row (``1 / count`` for a mean, ``1`` for a sum) or one
  per row (the upstream gradient of ``reduction="none"``).

A row whose target is ``ignore_index`` is not read at all: its loss and lse are 0 and its
gradient row is written as zeros (padding tokens cost one write, not a softmax). A row whose
target is outside ``[0, V)`` (and not ``ignore_index``) never reads out of bounds: its loss
and gradient row are NaN, and its index (plus ``row_offset``) is stored in ``bad_row`` for
the caller to report with one host read.

The Triton kernel runs one program per row and walks the row twice in ``BLOCK_V`` tiles:
pass one keeps a running maximum and the sum of exponentials relative to it, rescaled once a
tile (one ``exp`` per element; a running maximum per lane would spend two, which at bf16
read speed comes close to what an H100's exponential units issue), pass two recomputes
``softmax`` and stores the gradient. It therefore reads the block twice and writes it once:
``3 * rows * V * element bytes``, ``rows * V * element bytes`` for the loss alone. No row is
split over programs: the op's chunks hold hundreds of rows or more, which fill the GPU; a
block of fewer rows than the GPU has SMs leaves some of it idle.

``cross_entropy_rows`` picks the kernel or ``cross_entropy_rows_reference`` (plain torch, the
same outputs) by the tensors' device, as every RecStack kernel does.
"""

from __future__ import annotations

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_to_table_dtype

__all__ = [
    "CROSS_ENTROPY_DEFAULTS",
    "cross_entropy_rows",
    "cross_entropy_rows_reference",
    "cross_entropy_rows_triton",
]

#: Tile defaults of the row kernel (override per call with keywords): ``block_v`` columns a
#: tile (capped by the next power of two of ``V``) and ``num_warps`` warps a program (at
#: most one per 256 columns of a tile, at least one).
CROSS_ENTROPY_DEFAULTS: dict[str, int] = {"block_v": 4096, "num_warps": 8}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["row_offset"])
    def _cross_entropy_rows_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        loss_ptr,
        lse_ptr,
        scale_ptr,
        bad_row_ptr,
        n_cols,
        ignore_index,
        smoothing,
        row_offset,
        KIND: tl.constexpr,
        STORE_GRAD: tl.constexpr,
        SCALE_PER_ROW: tl.constexpr,
        SMOOTHING: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        lane = tl.arange(0, BLOCK_V)
        target = tl.load(target_ptr + row)
        if target == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if STORE_GRAD:
                zero = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + lane
                    tl.store(base + cols, tl_to_table_dtype(zero, KIND), mask=cols < n_cols)
        else:
            bad = (target < 0) | (target >= n_cols)
            if bad:
                tl.store(bad_row_ptr, row + row_offset)
            m = float("-inf")
            s = 0.0
            z_sum = 0.0
            for start in range(0, n_cols, BLOCK_V):
                cols = start + lane
                ok = cols < n_cols
                x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # -inf logits (items masked by a -inf bias) must not turn -inf - -inf into NaN.
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
                m = m_new
                if SMOOTHING:
                    z_sum += tl.sum(tl.where(ok, x, 0.0), axis=0)
            # lse = m + log_s, kept apart: at |logits| ~ 1e4 the fp32 sum alone loses the
            # 1e-3 that x - lse needs, while x - m is exact.
            log_s = tl.log(s)
            z_target = tl.load(base + tl.where(bad, 0, target)).to(tl.float32)
            loss = (m - z_target) + log_s
            if SMOOTHING:
                loss = loss + smoothing * (z_target - z_sum / n_cols)
            loss = tl.where(bad, float("nan"), loss)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, m + log_s)
            if STORE_GRAD:
                if SCALE_PER_ROW:
                    scale = tl.load(scale_ptr + row).to(tl.float32)
                else:
                    scale = tl.load(scale_ptr).to(tl.float32)
                on = 1.0 - smoothing
                off = smoothing / n_cols
                poison = tl.where(bad, float("nan"), 0.0)
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + lane
                    ok = cols < n_cols
                    x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
                    g = tl.exp((x - m) - log_s) - tl.where(cols == target, on, 0.0)
                    if SMOOTHING:
                        g = g - off
                    g = g * scale + poison
                    tl.store(base + cols, tl_to_table_dtype(g, KIND), mask=ok)

    _CROSS_ENTROPY_ROWS = FastKernel(_cross_entropy_rows_kernel)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _check(
    what: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    grad_scale: torch.Tensor | None,
    bad_row: torch.Tensor | None,
) -> torch.Tensor:
    """Validate the row kernel's arguments; returns ``target`` as int64."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{what}: logits must be a 2-D [rows, V] tensor, got {shape}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    rows, vocab = logits.shape
    if vocab < 1:
        raise ValueError(f"{what}: logits must have at least one column (V >= 1)")
    if rows and logits.stride(1) != 1:
        raise ValueError(f"{what}: logits must have unit column stride (it is written in place)")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.numel() != rows:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"{what}: target must be a 1-D tensor of {rows} entries, got {shape}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{what}: target must be an integer tensor, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(
            f"{what}: target is on device {target.device} but logits is on {logits.device}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if grad_scale is not None:
        if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() not in (1, rows):
            raise ValueError(
                f"{what}: grad_scale must be a tensor of 1 or {rows} (rows) values, got "
                f"{tuple(grad_scale.shape) if isinstance(grad_scale, torch.Tensor) else grad_scale}"
            )
        if grad_scale.device != logits.device:
            raise ValueError(
                f"{what}: grad_scale is on device {grad_scale.device} but logits is on "
                f"{logits.device}"
            )
    if bad_row is not None and (
        not isinstance(bad_row, torch.Tensor)
        or bad_row.dtype != torch.int64
        or bad_row.numel() != 1
        or bad_row.device != logits.device
    ):
        raise ValueError(
            f"{what}: bad_row must be an int64 tensor of one value on the logits' device"
        )
    return target.to(torch.int64)


def _outputs(
    rows: int, device: torch.device, loss_out: torch.Tensor | None, lse_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("loss_out", loss_out), ("lse_out", lse_out)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (rows,) or t.stride(0) != 1):
            raise ValueError(f"cross_entropy_rows: {name} must be a contiguous float32 [{rows}]")
    loss = (
        loss_out if loss_out is not None else torch.empty(rows, dtype=torch.float32, device=device)
    )
    lse = lse_out if lse_out is not None else torch.empty(rows, dtype=torch.float32, device=device)
    return loss, lse


# ----------------------------------------------------------------------------------------
# Kernel path, reference, dispatch
# ----------------------------------------------------------------------------------------


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    bad_row: torch.Tensor | None = None,
    row_offset: int = 0,
    loss_out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_rows`'s kernel path, for callers already on it: no validation,
    no backend choice (``target`` int64, ``grad_scale`` float32).

    Args:
        logits: float ``[rows, V]`` block, unit column stride; overwritten by the gradient
            when ``grad_scale`` is given.
        target: int64 ``[rows]``.
        ignore_index: target value of rows that contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``.
        grad_scale: float32 ``[1]`` or ``[rows]``: store the gradient times it; ``None``:
            loss and lse only (one read of the block, no write).
        bad_row: int64 ``[1]``: receives ``row_offset + r`` for a row ``r`` whose target is
            out of range (untouched otherwise).
        row_offset: added to the row index stored in ``bad_row``.
        loss_out: float32 ``[rows]`` to write the losses into (else a new tensor).
        lse_out: float32 ``[rows]`` to write the log-sum-exps into (else a new tensor).
        block_v: columns a tile (:data:`CROSS_ENTROPY_DEFAULTS`).
        num_warps: warps a program (default: :data:`CROSS_ENTROPY_DEFAULTS`, at most one per
            256 columns of the tile).

    Returns:
        ``(loss, lse)``, float32 ``[rows]`` each.
    """
    rows, vocab = logits.shape
    loss, lse = _outputs(rows, logits.device, loss_out, lse_out)
    if rows == 0:
        return loss, lse
    if bad_row is None:
        bad_row = torch.empty(1, dtype=torch.int64, device=logits.device)
    block = min(next_pow2(vocab), next_pow2(block_v or CROSS_ENTROPY_DEFAULTS["block_v"]))
    warps = num_warps or max(1, min(CROSS_ENTROPY_DEFAULTS["num_warps"], block // 256))
    scale = grad_scale if grad_scale is not None else loss  # never read without STORE_GRAD
    _CROSS_ENTROPY_ROWS(
        (rows,),
        logits,
        logits.stride(0),
        target,
        loss,
        lse,
        scale,
        bad_row,
        vocab,
        int(ignore_index),
        float(label_smoothing),
        int(row_offset),
        TABLE_KINDS[logits.dtype],
        grad_scale is not None,
        grad_scale is not None and grad_scale.numel() == rows and rows > 1,
        float(label_smoothing) != 0.0,
        block,
        num_warps=warps,
    )
    record_launch("cross_entropy_rows")
    return loss, lse


def cross_entropy_rows_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    bad_row: torch.Tensor | None = None,
    row_offset: int = 0,
    loss_out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`cross_entropy_rows` (fp32 ``logsumexp`` and ``softmax``):
    the same outputs, the same in-place gradient and ``bad_row`` semantics, no host sync.

    Args:
        logits: float ``[rows, V]`` block; overwritten by the gradient when ``grad_scale``
            is given.
        target: int64 ``[rows]``.
        ignore_index: target value of rows that contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``.
        grad_scale: float32 ``[1]`` or ``[rows]``, or ``None`` for the loss alone.
        bad_row: int64 ``[1]`` receiving ``row_offset +`` the first row with an
            out-of-range target.
        row_offset: added to the row index stored in ``bad_row``.
        loss_out: float32 ``[rows]`` for the losses.
        lse_out: float32 ``[rows]`` for the log-sum-exps.

    Returns:
        ``(loss, lse)``, float32 ``[rows]`` each.
    """
    record_launch("cross_entropy_rows_reference")
    rows, vocab = logits.shape
    loss, lse = _outputs(rows, logits.device, loss_out, lse_out)
    eps = float(label_smoothing)
    z = logits.float()
    ignored = target == ignore_index
    bad = ~ignored & ((target < 0) | (target >= vocab))
    safe = torch.where(ignored | bad, 0, target)
    row_lse = torch.logsumexp(z, dim=1)
    row_loss = row_lse - (1.0 - eps) * z.gather(1, safe[:, None])[:, 0]
    if eps:
        row_loss = row_loss - eps / vocab * z.sum(dim=1)
    nan = torch.tensor(float("nan"), device=z.device)
    loss.copy_(torch.where(ignored, 0.0, torch.where(bad, nan, row_loss)))
    lse.copy_(torch.where(ignored, 0.0, row_lse))
    if bad_row is not None and rows:
        first = torch.argmax(bad.to(torch.int32)) + row_offset
        bad_row.copy_(torch.where(bad.any(), first, bad_row[0]).reshape(1))
    if grad_scale is not None:
        g = torch.softmax(z, dim=1)
        if eps:
            g -= eps / vocab
        g.scatter_add_(1, safe[:, None], torch.full((rows, 1), eps - 1.0, device=z.device))
        g *= grad_scale.float().reshape(-1, 1)
        g = torch.where(ignored[:, None], 0.0, torch.where(bad[:, None], nan, g))
        logits.copy_(g)
    return loss, lse


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    bad_row: torch.Tensor | None = None,
    row_offset: int = 0,
    loss_out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row softmax cross-entropy of a logits block, the gradient written over the block.

    The Triton kernel on CUDA tensors (or under ``TRITON_INTERPRET=1``), the torch reference
    otherwise. Losses and log-sum-exps are float32 whatever the block's dtype; the gradient
    is stored in the block's dtype.

    Args:
        logits: float32/bfloat16/float16 ``[rows, V]`` block with unit column stride.
            Overwritten by ``d loss[r] / d logits[r] * scale[r]`` when ``grad_scale`` is
            given; left as is otherwise.
        target: integer ``[rows]`` target column of each row.
        ignore_index: target value of rows that contribute nothing (loss 0, lse 0, gradient
            row 0; the row is not read).
        label_smoothing: ``eps`` in ``[0, 1]``: the target distribution is
            ``(1 - eps) * onehot + eps / V``, as in ``F.cross_entropy``.
        grad_scale: float32 ``[1]`` (one scale for every row) or ``[rows]`` (one a row):
            store the scaled gradient. ``None``: compute the loss alone (the block is read
            once and not written).
        bad_row: int64 ``[1]`` tensor: a row whose target is outside ``[0, V)`` and is not
            ``ignore_index`` stores ``row_offset +`` its index here (its loss and gradient
            are NaN). Left untouched when every target is valid, so initialise it to ``-1``.
        row_offset: added to the row index stored in ``bad_row`` (a chunk's first row).
        loss_out: float32 contiguous ``[rows]`` to write the losses into.
        lse_out: float32 contiguous ``[rows]`` to write the log-sum-exps into.
        block_v: columns a kernel tile (:data:`CROSS_ENTROPY_DEFAULTS`).
        num_warps: warps a kernel program.

    Returns:
        ``(loss, lse)``: float32 ``[rows]`` per-row losses (before any reduction or scale)
        and log-sum-exps of the logits.

    Raises:
        ValueError: a shape, device, ``label_smoothing`` or buffer that does not fit.
        TypeError: a non-float ``logits`` or non-integer ``target``.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> loss, lse = cross_entropy_rows(z, torch.tensor([0, -100]), grad_scale=torch.ones(1))
        >>> [round(v, 4) for v in loss.tolist()], z.tolist()
        ([0.6931, 0.0], [[-0.5, 0.5], [0.0, 0.0]])
    """
    what = "cross_entropy_rows"
    target = _check(what, logits, target, label_smoothing, grad_scale, bad_row)
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32).reshape(-1).contiguous()
    if use_triton(logits, target, op=what):
        return cross_entropy_rows_triton(
            logits,
            target.contiguous(),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            grad_scale=grad_scale,
            bad_row=bad_row,
            row_offset=row_offset,
            loss_out=loss_out,
            lse_out=lse_out,
            block_v=block_v,
            num_warps=num_warps,
        )
    return cross_entropy_rows_reference(
        logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        grad_scale=grad_scale,
        bad_row=bad_row,
        row_offset=row_offset,
        loss_out=loss_out,
        lse_out=lse_out,
    )
