"""Exact AUC and GAUC (recstack.pipelines.metrics.ranking) against scikit-learn and a
per-group loop; every case draws fresh random inputs, quantized to make many ties."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from metrics_testdata import ALL, case, loop_gauc, sk_auc
from sklearn.metrics import log_loss as sk_log_loss

from recstack.pipelines.metrics import (
    BinaryMetrics,
    GAUCResult,
    UndefinedMetricWarning,
    auc,
    gauc,
    log_loss,
)


@pytest.mark.parametrize("n", [2, 3, 17, 1_000, 4_099])
@pytest.mark.parametrize("levels", [None, 2, 11])
@pytest.mark.parametrize("weighted", [False, True])
def test_auc_matches_sklearn(n: int, levels: int | None, weighted: bool) -> None:
    seed = random.randrange(2**31)
    d = case(n, seed, levels)
    d["labels"][0], d["labels"][1] = 0, 1  # both classes present
    w = d["weights"] if weighted else None
    got = auc(d["preds"], d["labels"], w)
    assert got == pytest.approx(sk_auc(d["preds"], d["labels"], w), abs=1e-12), seed


def test_auc_known_values() -> None:
    y = torch.tensor([0, 0, 1, 1])
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == 0.75
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == 0.5  # every pair tied
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    # Only the order matters: logits and probabilities give the same AUC.
    logits = torch.randn(300, dtype=torch.float64)
    labels = (torch.rand(300) < 0.5).long()
    labels[:2] = torch.tensor([0, 1])
    assert auc(logits, labels) == pytest.approx(auc(torch.sigmoid(logits), labels), abs=1e-12)


def test_auc_accepts_bool_float_and_column_labels() -> None:
    d = case(200, random.randrange(2**31))
    d["labels"][:2] = torch.tensor([0, 1])
    want = sk_auc(d["preds"], d["labels"])
    p, y = d["preds"], d["labels"]
    assert auc(p, y.bool()) == pytest.approx(want, abs=1e-12)
    assert auc(p, y.float()) == pytest.approx(want, abs=1e-12)
    assert auc(p[:, None], y[:, None]) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("weighting", ["impressions", "clicks", "uniform"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "groups"), [(1, 1), (7, 3), (500, 40), (3_001, 200)])
def test_gauc_matches_per_group_loop(n: int, groups: int, weighted: bool, weighting: str) -> None:
    seed = random.randrange(2**31)
    d = case(n, seed, levels=9, groups=groups)
    w = d["weights"] if weighted else None
    want = loop_gauc(d["preds"], d["labels"], d["groups"], w, weighting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # tiny n: maybe no group
        got = gauc(d["preds"], d["labels"], d["groups"], w, weighting=weighting)
    assert (got.groups, got.skipped_groups) == (want.groups, want.skipped_groups), seed
    if math.isnan(want.value):
        assert math.isnan(got.value)
    else:
        assert got.value == pytest.approx(want.value, abs=1e-12), seed


def test_gauc_skips_and_counts_single_class_groups() -> None:
    p = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.6, 0.4])
    y = torch.tensor([0, 1, 1, 1, 0, 1, 0])
    grp = torch.tensor([5, 5, 6, 6, 9, 9, 9])  # group 6 holds only positives
    r = gauc(p, y, grp)
    # group 5: AUC 1 over 2 rows; group 9: positive 0.6 beats 0.4, loses to 0.8 -> 1/2.
    assert r == GAUCResult((2 * 1.0 + 3 * 0.5) / 5, 3, 1)
    assert gauc(p, y, grp, weighting="uniform").value == pytest.approx(0.75)
    assert gauc(p, y, grp, weighting="clicks").value == pytest.approx(0.75)


def test_gauc_group_ids_are_any_int64() -> None:
    d = case(400, random.randrange(2**31), groups=10)
    huge = d["groups"] * (2**40) - 2**62  # negative and huge ids
    a = gauc(d["preds"], d["labels"], d["groups"])
    b = gauc(d["preds"], d["labels"], huge.to(torch.int64))
    assert a == b
    assert gauc(d["preds"], d["labels"], d["groups"].to(torch.int32)) == a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    seed = random.randrange(2**31)
    d = case(3_000, seed, levels=None, groups=50)
    p = d["preds"].to(dtype)  # rounding to bf16/fp16 makes many ties
    exact = p.double()  # the values the metrics see
    y = d["labels"]
    y[:2] = torch.tensor([0, 1])
    assert auc(p, y) == pytest.approx(sk_auc(exact, y), abs=1e-12)
    assert auc(p, y, d["weights"]) == pytest.approx(sk_auc(exact, y, d["weights"]), abs=1e-12)
    g = gauc(p, y, d["groups"])
    want = loop_gauc(exact, y, d["groups"], None, "impressions")
    assert g.value == pytest.approx(want.value, abs=1e-12)
    kept = (exact > 1e-6) & (exact < 1 - 1e-6)  # away from the dtype-dependent clipping
    assert log_loss(p[kept], y[kept]) == pytest.approx(
        sk_log_loss(y[kept].numpy(), exact[kept].numpy(), labels=[0, 1]), rel=1e-10
    )
    m = BinaryMetrics(ALL)
    m.update(p[:1000], y[:1000], groups=d["groups"][:1000])
    m.update(p[1000:], y[1000:], groups=d["groups"][1000:])
    assert m.compute()["auc"] == pytest.approx(sk_auc(exact, y), abs=1e-12)
