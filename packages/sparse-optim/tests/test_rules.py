"""The row update rules against trusted references.

With every row touched on every step the rules must equal torch.optim's dense updates;
TensorFlow's Adam form and FTRL-Proximal are checked against NumPy transcriptions of
their published equations (float64).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from recstack.sparse_optim.rules import (
    adagrad_rows,
    adam_rows,
    ftrl_rows,
    rowwise_adagrad_rows,
    sgd_rows,
)

STEPS = 6


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def start(name: object, rows: int = 7, dim: int = 5):
    gen = torch.Generator().manual_seed(seed(name))
    w = torch.randn(rows, dim, generator=gen)
    grads = [torch.randn(rows, dim, generator=gen) for _ in range(STEPS)]
    return w, grads


def dense_run(opt_cls, w0: torch.Tensor, grads: list[torch.Tensor], **hp) -> torch.Tensor:
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize(
    "hp",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
    ],
)
def test_sgd_matches_torch(hp) -> None:
    w, grads = start(("sgd", hp))
    want = dense_run(torch.optim.SGD, w, grads, **hp)
    buf = torch.zeros_like(w) if hp.get("momentum") else None
    for g in grads:
        w, buf = sgd_rows(w, g, buf, **hp)
    assert rel_err(w, want) < 1e-6


@pytest.mark.parametrize(
    "hp", [{"lr": 0.1}, {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.02, "eps": 1e-6}]
)
def test_adagrad_matches_torch(hp) -> None:
    w, grads = start(("adagrad", hp))
    want = dense_run(torch.optim.Adagrad, w, grads, **hp)
    acc = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w, acc = adagrad_rows(w, g, acc, step=t, **hp)
    assert rel_err(w, want) < 1e-6


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_and_adamw_match_torch(decoupled, weight_decay) -> None:
    w, grads = start(("adam", decoupled, weight_decay))
    hp = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": weight_decay}
    want = dense_run(torch.optim.AdamW if decoupled else torch.optim.Adam, w, grads, **hp)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w, m, v = adam_rows(
            w, g, m, v, t, lr=0.01, beta1=0.8, beta2=0.95, eps=1e-7,
            weight_decay=weight_decay, decoupled=decoupled,
        )  # fmt: skip
    assert rel_err(w, want) < 1e-6


def tf_adam_numpy(w, grads, lr, b1, b2, eps):
    """TensorFlow's documented Adam update (tf.compat.v1.train.AdamOptimizer), float64."""
    w = w.astype(np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr_t * m / (np.sqrt(v) + eps)
    return w


def test_adam_tf_compat_matches_tensorflow_equations() -> None:
    w, grads = start("tf")
    want = tf_adam_numpy(w.numpy(), [g.numpy() for g in grads], 0.01, 0.9, 0.999, 1e-3)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w, m, v = adam_rows(w, g, m, v, t, lr=0.01, eps=1e-3, tf_compat=True)
    assert rel_err(w, torch.from_numpy(want)) < 1e-6


def test_adam_per_row_step_counts() -> None:
    # Rows at different step counts update as each would alone with its own count.
    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    m, v = torch.randn(4, 3, generator=gen), torch.rand(4, 3, generator=gen)
    t = torch.tensor([[1.0], [2.0], [7.0], [40.0]])
    got, _, _ = adam_rows(w, g, m, v, t, lr=0.1)
    for r in range(4):
        alone, _, _ = adam_rows(
            w[r : r + 1], g[r : r + 1], m[r : r + 1], v[r : r + 1], float(t[r]), lr=0.1
        )
        assert rel_err(got[r : r + 1], alone) < 1e-6


def ftrl_numpy(w, grads, alpha, beta, l1, l2):
    """McMahan et al. (2013), Algorithm 1, one coordinate at a time, float64."""
    w = w.astype(np.float64).copy()
    z, n = np.zeros_like(w), np.zeros_like(w)
    for g in grads:
        for i in np.ndindex(w.shape):
            gi = float(g[i])
            sigma = (np.sqrt(n[i] + gi * gi) - np.sqrt(n[i])) / alpha
            z[i] += gi - sigma * w[i]
            n[i] += gi * gi
            if abs(z[i]) <= l1:
                w[i] = 0.0
            else:
                w[i] = -(z[i] - np.sign(z[i]) * l1) / ((beta + np.sqrt(n[i])) / alpha + l2)
    return w


@pytest.mark.parametrize("l1", [0.0, 0.5])
def test_ftrl_matches_the_paper(l1) -> None:
    w, grads = start(("ftrl", l1))
    want = ftrl_numpy(w.numpy(), [g.numpy() for g in grads], 0.1, 1.0, l1, 0.3)
    z, n = torch.zeros_like(w), torch.zeros_like(w)
    for g in grads:
        w, z, n = ftrl_rows(w, g, z, n, lr=0.1, beta=1.0, l1=l1, l2=0.3)
    assert rel_err(w, torch.from_numpy(want)) < 1e-6
    if l1:
        assert int((w == 0).sum()) > 0  # L1 zeroes coordinates exactly


def test_rowwise_adagrad_matches_numpy() -> None:
    w, grads = start("rowwise")
    ref = w.numpy().astype(np.float64)
    acc_ref = np.zeros((ref.shape[0], 1))
    acc = torch.zeros(w.shape[0], 1)
    for g in grads:
        gd = g.numpy().astype(np.float64)
        acc_ref += (gd * gd).mean(axis=1, keepdims=True)
        ref = ref - 0.1 * gd / (np.sqrt(acc_ref) + 1e-10)
        w, acc = rowwise_adagrad_rows(w, g, acc, lr=0.1)
    assert rel_err(w, torch.from_numpy(ref)) < 1e-6
    assert acc.shape == (w.shape[0], 1)
