"""The update rules of the sparse optimizers, on the rows a gradient touches (torch reference).

Each function takes the touched rows of the weight ``w`` and their gradient ``g`` (fp32
``[U, dim]``), the matching rows of the optimizer's state slots and the hyper-parameters,
and returns the new weight rows and state rows. Rows the gradient does not touch never
reach these functions: that is the *lazy* semantics of every optimizer here (TensorFlow's
``LazyAdam``, TorchRec's row-wise fused optimizers), where a row's moments decay only on
the steps that touch it.

These are the references the fused kernels are tested against, and the equations the docs
state. With every row touched on every step they equal ``torch.optim``'s dense updates
(SGD with ``dampening=0``, Adagrad, Adam, AdamW), which the tests check.

Bias correction of Adam / AdamW takes a step count ``t`` (a scalar for one global count
per parameter group, as TensorFlow's ``LazyAdam``; or one count per row, ``[U, 1]``, for
rows that see few updates). ``tf_compat`` uses TensorFlow's form
``lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``, ``w -= lr_t * m / (sqrt(v) + eps)``,
with epsilon outside the correction.
"""

from __future__ import annotations

import torch

__all__ = [
    "adagrad_rows",
    "adam_rows",
    "ftrl_rows",
    "rowwise_adagrad_rows",
    "sgd_rows",
]


def sgd_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    momentum_buf: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SGD (with momentum) -> ``(w, momentum_buf)``.

    ``g += weight_decay * w``; ``buf = momentum * buf + g`` (a row's buffer starts at zero,
    which equals ``torch.optim.SGD``'s first-step copy with ``dampening=0``);
    ``w -= lr * (g + momentum * buf if nesterov else buf)``; without momentum
    ``w -= lr * g``.
    """
    if weight_decay:
        g = g + weight_decay * w
    if not momentum:
        return w - lr * g, momentum_buf
    assert momentum_buf is not None
    buf = momentum * momentum_buf + g
    step = g + momentum * buf if nesterov else buf
    return w - lr * step, buf


def adagrad_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    acc: torch.Tensor,
    *,
    lr: float,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    lr_decay: float = 0.0,
    step: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adagrad -> ``(w, acc)``, as ``torch.optim.Adagrad``.

    ``g += weight_decay * w``; ``acc += g**2``;
    ``w -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(acc) + eps)``.
    """
    if weight_decay:
        g = g + weight_decay * w
    acc = acc + g * g
    clr = lr / (1 + (step - 1) * lr_decay)
    return w - clr * g / (acc.sqrt() + eps), acc


def rowwise_adagrad_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    acc: torch.Tensor,
    *,
    lr: float,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Adagrad (one accumulator per row, ``acc`` is ``[U, 1]``) -> ``(w, acc)``.

    ``g += weight_decay * w``; ``acc += mean(g**2)`` over the row;
    ``w -= lr * g / (sqrt(acc) + eps)``. The state is ``1 / dim`` of Adagrad's, the form
    FBGEMM and TorchRec use for large tables.
    """
    if weight_decay:
        g = g + weight_decay * w
    acc = acc + (g * g).mean(dim=1, keepdim=True)
    return w - lr * g / (acc.sqrt() + eps), acc


def adam_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: float | torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    tf_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam / AdamW -> ``(w, m, v)``; ``t`` is the step count of this update (>= 1).

    ``decoupled`` (AdamW): ``w *= 1 - lr * weight_decay`` first; otherwise (Adam)
    ``g += weight_decay * w``. Then ``m = beta1 * m + (1 - beta1) * g``,
    ``v = beta2 * v + (1 - beta2) * g**2`` and, as ``torch.optim.Adam``,
    ``w -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``; with
    ``tf_compat``, ``w -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)``.
    """
    if weight_decay:
        if decoupled:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    t = torch.as_tensor(t, dtype=torch.float64, device=w.device)
    bc1 = (1 - beta1**t).to(torch.float32)
    bc2 = (1 - beta2**t).to(torch.float32)
    if tf_compat:
        return w - lr * bc2.sqrt() / bc1 * m / (v.sqrt() + eps), m, v
    return w - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps), m, v


def ftrl_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    z: torch.Tensor,
    n: torch.Tensor,
    *,
    lr: float,
    beta: float = 1.0,
    l1: float = 0.0,
    l2: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FTRL-Proximal (McMahan et al., 2013, Algorithm 1), per coordinate -> ``(w, z, n)``.

    ``sigma = (sqrt(n + g**2) - sqrt(n)) / lr``; ``z += g - sigma * w``; ``n += g**2``;
    ``w = 0`` where ``|z| <= l1``, else
    ``w = -(z - sign(z) * l1) / ((beta + sqrt(n)) / lr + l2)``.
    """
    n_new = n + g * g
    sigma = (n_new.sqrt() - n.sqrt()) / lr
    z = z + g - sigma * w
    shrunk = z - torch.sign(z) * l1
    w_new = torch.where(
        z.abs() <= l1, torch.zeros_like(z), -shrunk / ((beta + n_new.sqrt()) / lr + l2)
    )
    return w_new, z, n_new
