"""recstack.pipelines.metrics.functional: log-loss, calibration and NE against
scikit-learn and their definitions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from metrics_testdata import case
from sklearn.metrics import log_loss as sk_log_loss

from recstack.pipelines.metrics import (
    calibration,
    log_loss,
    normalized_entropy,
)


@pytest.mark.parametrize("n", [1, 2, 31, 2_000])
@pytest.mark.parametrize("weighted", [False, True])
def test_log_loss_matches_sklearn(n: int, weighted: bool) -> None:
    seed = random.randrange(2**31)
    d = case(n, seed, levels=None)
    w = d["weights"] if weighted else None
    want = sk_log_loss(
        d["labels"].numpy(),
        d["preds"].numpy(),
        labels=[0, 1],
        sample_weight=None if w is None else w.numpy(),
    )
    assert log_loss(d["preds"], d["labels"], w) == pytest.approx(want, rel=1e-12), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_loss_clips_like_sklearn(dtype: torch.dtype) -> None:
    p = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5], dtype=dtype)
    y = torch.tensor([1, 0, 1, 0, 1])
    want = sk_log_loss(y.numpy(), p.numpy(), labels=[0, 1])
    assert math.isfinite(want)
    assert log_loss(p, y) == pytest.approx(want, rel=1e-6)


def test_calibration_and_ne_match_their_definitions() -> None:
    seed = random.randrange(2**31)
    d = case(3_000, seed, levels=None)
    p, y, w = d["preds"], d["labels"], d["weights"]
    for weights in (None, w):
        ww = torch.ones_like(p) if weights is None else weights
        ctr = float((ww * y).sum() / ww.sum())
        want_cal = float((ww * p).sum() / (ww * y).sum())
        assert calibration(p, y, weights) == pytest.approx(want_cal, rel=1e-12)
        sw = None if weights is None else weights.numpy()
        background = sk_log_loss(y.numpy(), np.full(len(y), ctr), labels=[0, 1], sample_weight=sw)
        model = sk_log_loss(y.numpy(), p.numpy(), labels=[0, 1], sample_weight=sw)
        assert normalized_entropy(p, y, weights) == pytest.approx(model / background, rel=1e-10)
    # Predicting the background CTR itself scores NE 1 and calibration 1.
    flat = torch.full_like(p, float(y.double().mean()))
    assert normalized_entropy(flat, y) == pytest.approx(1.0, rel=1e-12)
    assert calibration(flat, y) == pytest.approx(1.0, rel=1e-12)
