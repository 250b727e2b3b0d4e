"""The optimizers' row math as one Triton tile function, for core's row-update kernels.

:func:`optimizer_tile` follows core's tile-function convention
(:mod:`recstack.core.row_update`): given fp32 tiles of weight rows and their summed
gradients and pointers to the rows' state, it loads and stores the state and returns the new
weights. Core runs it in :func:`~recstack.core.kernels.row_update.apply_row_update` (one
launch per step per parameter: each touched row of weight, gradient and state read once and
written once) and, through the :class:`~recstack.core.RowUpdater` protocol, inside the
embedding engine's fused backward, which never writes the gradient out.

Core's convention hands a tile function anonymous slots: the learning rate, six scalars
``p1..p6``, a constexpr ``VARIANT`` and three constexpr flags. Each optimizer names them
once, in a small structure whose fields fill the slots in order: :class:`SgdTile`,
:class:`AdagradTile`, :class:`RowWiseAdagradTile`, :class:`AdamTile` and :class:`FtrlTile`
(the learning rate, then the scalars, then the flags; :func:`tile_slots` splits them).
:func:`optimizer_tile` branches on the named variants (``OPT_SGD``...) and passes each
optimizer's math its slots by the same names. State slots by variant: SGD the momentum
buffer; Adagrad the sum of squares; row-wise Adagrad one sum per row (whole rows); Adam
``m``, ``v`` and (per-row steps) ``t``; FTRL ``z`` and ``n``.

The equations are those of :mod:`recstack.sparse_optim.rules`, the reference the tests hold
this function to.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from recstack.core.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "OPT_ADAGRAD",
    "OPT_ADAM",
    "OPT_FTRL",
    "OPT_ROWWISE",
    "OPT_SGD",
    "AdagradTile",
    "AdamTile",
    "FtrlTile",
    "OptimizerTile",
    "RowWiseAdagradTile",
    "SgdTile",
    "log2_beta",
    "optimizer_tile",
    "tile_slots",
]

#: :func:`optimizer_tile`'s variants, one per optimizer.
OPT_SGD, OPT_ADAGRAD, OPT_ROWWISE, OPT_ADAM, OPT_FTRL = 0, 1, 2, 3, 4


class SgdTile(NamedTuple):
    """A step of SGD (with momentum) in :func:`optimizer_tile`'s slots.

    Attributes:
        lr: the learning rate.
        momentum: ``p1``.
        weight_decay: ``p2``, the L2 penalty added to the gradient.
        has_momentum: ``FLAG_A``: keep a momentum buffer (state slot 0).
        nesterov: ``FLAG_B``: Nesterov momentum.
    """

    lr: float
    momentum: float
    weight_decay: float
    has_momentum: bool
    nesterov: bool

    VARIANT = OPT_SGD
    SCALARS = 2


class AdagradTile(NamedTuple):
    """A step of Adagrad in :func:`optimizer_tile`'s slots (state slot 0: the sum of squares).

    Attributes:
        lr: the learning rate (already decayed).
        eps: ``p1``, added to the accumulator's square root.
        weight_decay: ``p2``, the L2 penalty added to the gradient.
    """

    lr: float
    eps: float
    weight_decay: float

    VARIANT = OPT_ADAGRAD
    SCALARS = 2


class RowWiseAdagradTile(NamedTuple):
    """A step of row-wise Adagrad in :func:`optimizer_tile`'s slots (state slot 0: one sum
    per row; the tiles hold whole rows).

    Attributes:
        lr: the learning rate.
        eps: ``p1``, added to the accumulator's square root.
        weight_decay: ``p2``, the L2 penalty added to the gradient.
        dim: ``p3``, the row width (the mean square divides by it).
    """

    lr: float
    eps: float
    weight_decay: float
    dim: float

    VARIANT = OPT_ROWWISE
    SCALARS = 3


class AdamTile(NamedTuple):
    """A step of Adam / AdamW in :func:`optimizer_tile`'s slots (state slots: ``m``, ``v``
    and, with per-row steps, ``t``).

    Attributes:
        lr: the learning rate.
        beta1: ``p1``.
        beta2: ``p2``.
        eps: ``p3``.
        weight_decay: ``p4``.
        correction1: ``p5``: ``1 - beta1**t`` for a global step ``t``, or ``log2(beta1)``
            with per-row steps (the kernel then takes ``beta1**t`` per row).
        correction2: ``p6``: the same for ``beta2``.
        decoupled: ``FLAG_A``: AdamW's decoupled weight decay.
        tf_compat: ``FLAG_B``: TensorFlow's form of the update (epsilon outside the
            correction).
        per_row_steps: ``FLAG_C``: every row counts its own steps (state slot 2).
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    correction1: float
    correction2: float
    decoupled: bool
    tf_compat: bool
    per_row_steps: bool

    VARIANT = OPT_ADAM
    SCALARS = 6


class FtrlTile(NamedTuple):
    """A step of FTRL-Proximal in :func:`optimizer_tile`'s slots (state slots ``z``, ``n``).

    Attributes:
        lr: ``alpha``, the learning rate.
        beta: ``p1``.
        l1: ``p2``, the L1 strength.
        l2: ``p3``, the L2 strength.
    """

    lr: float
    beta: float
    l1: float
    l2: float

    VARIANT = OPT_FTRL
    SCALARS = 3


#: Any optimizer's step, as :func:`tile_slots` takes it.
OptimizerTile = SgdTile | AdagradTile | RowWiseAdagradTile | AdamTile | FtrlTile


def tile_slots(step: OptimizerTile) -> tuple[int, float, tuple[float, ...], tuple[bool, ...]]:
    """``(variant, lr, scalars, flags)`` of core's ``RowUpdate`` for ``step``: after the
    learning rate, its fields fill ``p1..`` and then ``FLAG_A..`` in order.

    Args:
        step: one optimizer's step (:class:`SgdTile`, :class:`AdamTile`...).

    Examples:
        >>> tile_slots(FtrlTile(lr=0.1, beta=1.0, l1=0.5, l2=0.0))
        (4, 0.1, (1.0, 0.5, 0.0), ())
    """
    end = 1 + step.SCALARS
    return step.VARIANT, step[0], step[1:end], step[end:]  # type: ignore[return-value]


def log2_beta(beta: float) -> float:
    """``log2(beta)`` for the kernel's per-row ``beta**t = exp2(t * log2(beta))``."""
    return math.log2(beta) if beta > 0 else float("-inf")


#: The tile function (``None`` without Triton: then only the torch path runs).
optimizer_tile = None

if HAS_TRITON:
    _SGD = tl.constexpr(OPT_SGD)
    _ADAGRAD = tl.constexpr(OPT_ADAGRAD)
    _ROWWISE = tl.constexpr(OPT_ROWWISE)
    _ADAM = tl.constexpr(OPT_ADAM)

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    @triton.jit
    def _sgd(w, g, mask, buf_at, lr, momentum, weight_decay, HAS_MOMENTUM: tl.constexpr,
             NESTEROV: tl.constexpr):  # fmt: skip
        if weight_decay != 0.0:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            buf = momentum * tl.load(buf_at, mask=mask, other=0.0) + g
            tl.store(buf_at, buf, mask=mask)
            upd = buf
            if NESTEROV:
                upd = g + momentum * buf
            w = w - lr * upd
        else:
            w = w - lr * g
        return w

    @triton.jit
    def _adagrad(w, g, mask, sum_at, lr, eps, weight_decay):
        if weight_decay != 0.0:
            g = g + weight_decay * w
        acc = tl.load(sum_at, mask=mask, other=0.0) + g * g
        tl.store(sum_at, acc, mask=mask)
        return w - lr * g / (tl.sqrt(acc) + eps)

    @triton.jit
    def _rowwise_adagrad(w, g, mask, row_ok, row_sum, lr, eps, weight_decay, dim):
        # The tile holds whole rows, so the mean square is one sum.
        if weight_decay != 0.0:
            g = g + weight_decay * w
        g = tl.where(mask, g, 0.0)
        acc = tl.load(row_sum, mask=row_ok, other=0.0) + tl.sum(g * g, axis=1) / dim
        tl.debug_barrier()  # per-row values are held by several threads: all read first
        tl.store(row_sum, acc, mask=row_ok)
        return w - lr * g / (tl.sqrt(acc) + eps)[:, None]

    @triton.jit
    def _adam(w, g, mask, row_ok, m_at, v_at, row_step, lr, beta1, beta2, eps, weight_decay,
              correction1, correction2, DECOUPLED: tl.constexpr, TF_COMPAT: tl.constexpr,
              PER_ROW_STEPS: tl.constexpr):  # fmt: skip
        if weight_decay != 0.0:
            if DECOUPLED:
                w = w * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = beta1 * tl.load(m_at, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_at, mask=mask, other=0.0) + (1.0 - beta2) * g * g
        tl.store(m_at, m, mask=mask)
        tl.store(v_at, v, mask=mask)
        if PER_ROW_STEPS:
            # Per-row step counts (whole rows): t and the bias corrections per row.
            t = tl.load(row_step, mask=row_ok, other=0.0) + 1.0
            tl.debug_barrier()  # per-row values are held by several threads: all read first
            tl.store(row_step, t, mask=row_ok)
            bc1 = (1.0 - tl.exp2(t * correction1))[:, None]
            bc2 = (1.0 - tl.exp2(t * correction2))[:, None]
            if TF_COMPAT:
                w = w - (lr * tl.sqrt(bc2) / bc1) * m / (tl.sqrt(v) + eps)
            else:
                w = w - (lr / bc1) * m / (tl.sqrt(v) / tl.sqrt(bc2) + eps)
        elif TF_COMPAT:
            w = w - (lr * tl.sqrt(correction2) / correction1) * m / (tl.sqrt(v) + eps)
        else:
            w = w - (lr / correction1) * m / (tl.sqrt(v) / tl.sqrt(correction2) + eps)
        return w

    @triton.jit
    def _ftrl(w, g, mask, z_at, n_at, lr, beta, l1, l2):
        z = tl.load(z_at, mask=mask, other=0.0)
        nacc = tl.load(n_at, mask=mask, other=0.0)
        n_new = nacc + g * g
        sigma = (tl.sqrt(n_new) - tl.sqrt(nacc)) / lr
        z = z + g - sigma * w
        tl.store(z_at, z, mask=mask)
        tl.store(n_at, n_new, mask=mask)
        shrunk = z - _sign(z) * l1
        return tl.where(tl.abs(z) <= l1, 0.0, -shrunk / ((beta + tl.sqrt(n_new)) / lr + l2))

    @triton.jit  # type: ignore[no-redef]
    def optimizer_tile(
        w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
        VARIANT: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
    ):  # fmt: skip
        # Each optimizer's slots by the names of its *Tile structure, in the same order.
        a0 = s0[:, None] + cols[None, :]
        a1 = s1[:, None] + cols[None, :]
        if VARIANT == _SGD:
            w = _sgd(w, g, mask, a0, lr, momentum=p1, weight_decay=p2, HAS_MOMENTUM=FLAG_A,
                     NESTEROV=FLAG_B)  # fmt: skip
        elif VARIANT == _ADAGRAD:
            w = _adagrad(w, g, mask, a0, lr, eps=p1, weight_decay=p2)
        elif VARIANT == _ROWWISE:
            w = _rowwise_adagrad(w, g, mask, row_ok, s0, lr, eps=p1, weight_decay=p2, dim=p3)
        elif VARIANT == _ADAM:
            w = _adam(
                w, g, mask, row_ok, a0, a1, s2, lr, beta1=p1, beta2=p2, eps=p3, weight_decay=p4,
                correction1=p5, correction2=p6, DECOUPLED=FLAG_A, TF_COMPAT=FLAG_B,
                PER_ROW_STEPS=FLAG_C,
            )  # fmt: skip
        else:  # OPT_FTRL
            w = _ftrl(w, g, mask, a0, a1, lr, beta=p1, l1=p2, l2=p3)
        return w
