"""The optimizers' row math as one Triton tile function, for core's row-update kernels.

:func:`optimizer_tile` follows core's tile-function convention
(:mod:`recstack.core.row_update`): given fp32 tiles of weight rows and their summed
gradients and pointers to the rows' state, it loads and stores the state and returns the new
weights. Core runs it in :func:`~recstack.core.kernels.row_update.apply_row_update` (one
launch per step per parameter: each touched row of weight, gradient and state read once and
written once) and, through the :class:`~recstack.core.RowUpdater` protocol, inside the
embedding engine's fused backward, which never writes the gradient out.

``VARIANT`` picks the optimizer; scalars and flags by variant:

* ``OPT_SGD``: ``p1`` momentum, ``p2`` weight decay; flags (has momentum, Nesterov); slot 0
  the momentum buffer.
* ``OPT_ADAGRAD``: ``p1`` eps, ``p2`` weight decay; slot 0 the sum of squares.
* ``OPT_ROWWISE``: ``p1`` eps, ``p2`` weight decay, ``p3`` the row width; slot 0 one sum
  per row (whole rows).
* ``OPT_ADAM``: ``p1``, ``p2`` betas, ``p3`` eps, ``p4`` weight decay, ``p5``, ``p6`` the
  global bias corrections ``1 - beta**t`` or, with per-row steps, ``log2(beta)``; flags
  (decoupled decay, tf_compat, per-row steps); slots m, v and (per-row) t.
* ``OPT_FTRL``: ``p1`` beta, ``p2`` l1, ``p3`` l2; slots z and n.

The equations are those of :mod:`recstack.sparse_optim.rules`, the reference the tests hold
this function to.
"""

from __future__ import annotations

import math

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
    "log2_beta",
    "optimizer_tile",
]

OPT_SGD, OPT_ADAGRAD, OPT_ROWWISE, OPT_ADAM, OPT_FTRL = 0, 1, 2, 3, 4


def log2_beta(beta: float) -> float:
    """``log2(beta)`` for the kernel's per-row ``beta**t = exp2(t * log2(beta))``."""
    return math.log2(beta) if beta > 0 else float("-inf")


#: The tile function (``None`` without Triton: then only the torch path runs).
optimizer_tile = None

if HAS_TRITON:

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    @triton.jit  # type: ignore[no-redef]
    def optimizer_tile(
        w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
        VARIANT: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
    ):  # fmt: skip
        a0 = s0[:, None] + cols[None, :]
        a1 = s1[:, None] + cols[None, :]
        if VARIANT == 0:
            if p2 != 0.0:
                g = g + p2 * w
            if FLAG_A:
                buf = p1 * tl.load(a0, mask=mask, other=0.0) + g
                tl.store(a0, buf, mask=mask)
                upd = buf
                if FLAG_B:  # Nesterov
                    upd = g + p1 * buf
                w = w - lr * upd
            else:
                w = w - lr * g
        elif VARIANT == 1:
            if p2 != 0.0:
                g = g + p2 * w
            acc = tl.load(a0, mask=mask, other=0.0) + g * g
            tl.store(a0, acc, mask=mask)
            w = w - lr * g / (tl.sqrt(acc) + p1)
        elif VARIANT == 2:
            # Row-wise Adagrad: the tile holds whole rows, so the mean square is one sum.
            if p2 != 0.0:
                g = g + p2 * w
            g = tl.where(mask, g, 0.0)
            acc = tl.load(s0, mask=row_ok, other=0.0) + tl.sum(g * g, axis=1) / p3
            tl.debug_barrier()  # per-row values are held by several threads: all read first
            tl.store(s0, acc, mask=row_ok)
            w = w - lr * g / (tl.sqrt(acc) + p1)[:, None]
        elif VARIANT == 3:
            if p4 != 0.0:
                if FLAG_A:
                    w = w * (1.0 - lr * p4)
                else:
                    g = g + p4 * w
            m = p1 * tl.load(a0, mask=mask, other=0.0) + (1.0 - p1) * g
            v = p2 * tl.load(a1, mask=mask, other=0.0) + (1.0 - p2) * g * g
            tl.store(a0, m, mask=mask)
            tl.store(a1, v, mask=mask)
            if FLAG_C:
                # Per-row step counts (whole rows): t and the bias corrections per row.
                t = tl.load(s2, mask=row_ok, other=0.0) + 1.0
                tl.debug_barrier()  # per-row values are held by several threads: all read first
                tl.store(s2, t, mask=row_ok)
                bc1 = (1.0 - tl.exp2(t * p5))[:, None]
                bc2 = (1.0 - tl.exp2(t * p6))[:, None]
                if FLAG_B:
                    w = w - (lr * tl.sqrt(bc2) / bc1) * m / (tl.sqrt(v) + p3)
                else:
                    w = w - (lr / bc1) * m / (tl.sqrt(v) / tl.sqrt(bc2) + p3)
            elif FLAG_B:
                w = w - (lr * tl.sqrt(p6) / p5) * m / (tl.sqrt(v) + p3)
            else:
                w = w - (lr / p5) * m / (tl.sqrt(v) / tl.sqrt(p6) + p3)
        else:
            z = tl.load(a0, mask=mask, other=0.0)
            nacc = tl.load(a1, mask=mask, other=0.0)
            n_new = nacc + g * g
            sigma = (tl.sqrt(n_new) - tl.sqrt(nacc)) / lr
            z = z + g - sigma * w
            tl.store(a0, z, mask=mask)
            tl.store(a1, n_new, mask=mask)
            shrunk = z - _sign(z) * p2
            w = tl.where(tl.abs(z) <= p2, 0.0, -shrunk / ((p1 + tl.sqrt(n_new)) / lr + p3))
        return w
