"""Random metric inputs and slow reference metrics (scikit-learn, a per-group loop) shared by
the metrics tests."""

from __future__ import annotations

import math
import random

import pytest
import torch
from sklearn.metrics import roc_auc_score

from recstack.pipelines.metrics import (
    METRIC_NAMES,
    GAUCResult,
    UndefinedMetricWarning,
)

ALL = METRIC_NAMES


def case(n: int, seed: int, levels: int | None = 16, groups: int = 20) -> dict[str, torch.Tensor]:
    """Random predictions (quantized to ``levels`` values for ties; continuous with None),
    labels drawn from them, group ids and weights."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64)
    if levels is not None:
        p = torch.round(p * (levels - 1)) / (levels - 1)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < 0.2 + 0.6 * p).long()
    grp = torch.randint(0, max(groups, 1), (n,), generator=g) * 1_000_003 - 7
    w = torch.rand(n, generator=g, dtype=torch.float64) * 3
    return {"preds": p, "labels": y, "groups": grp, "weights": w}


def sk_auc(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> float:
    sw = None if w is None else w.double().numpy()
    return roc_auc_score(y.numpy(), p.double().numpy(), sample_weight=sw)


def loop_gauc(
    p: torch.Tensor, y: torch.Tensor, grp: torch.Tensor, w: torch.Tensor | None, weighting: str
) -> GAUCResult:
    """GAUC the slow way: one scikit-learn AUC per group."""
    total, weight_sum, skipped = 0.0, 0.0, 0
    ids = sorted(set(grp.tolist()))
    for gid in ids:
        m = grp == gid
        gw = torch.ones(int(m.sum()), dtype=torch.float64) if w is None else w[m].double()
        gy = y[m]
        w_pos, w_neg = float(gw[gy == 1].sum()), float(gw[gy == 0].sum())
        if w_pos == 0 or w_neg == 0:
            skipped += 1
            continue
        a = sk_auc(p[m], gy, None if w is None else gw)
        k = {"impressions": w_pos + w_neg, "clicks": w_pos, "uniform": 1.0}[weighting]
        total += k * a
        weight_sum += k
    value = total / weight_sum if weight_sum else math.nan
    return GAUCResult(value, len(ids), skipped)


def nan_with_warning(fn, *args, **kwargs):
    with pytest.warns(UndefinedMetricWarning):
        return fn(*args, **kwargs)


def random_batches(n: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(n + 1), k=min(6, n + 1)))
    cuts = [0, *cuts, n, n]  # repeated cuts give empty batches
    return list(zip(cuts[:-1], cuts[1:], strict=True))
