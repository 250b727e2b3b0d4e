"""recstack.pipelines.metrics against scikit-learn (and a per-group loop for GAUC).

Every case draws fresh random inputs; quantized predictions make many ties.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import UndefinedMetricWarning as SkUndefinedMetricWarning
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recstack.pipelines.metrics import (
    METRIC_NAMES,
    BinaryMetrics,
    GAUCResult,
    MetricCollection,
    UndefinedMetricWarning,
    auc,
    calibration,
    gauc,
    log_loss,
    normalized_entropy,
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


def _nan_with_warning(fn, *args, **kwargs):
    with pytest.warns(UndefinedMetricWarning):
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ AUC


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


@pytest.mark.parametrize("labels", [[1], [0], [1, 1, 1], [0, 0]])
def test_auc_single_class_is_nan_with_warning(labels: list[int]) -> None:
    p = torch.rand(len(labels))
    with pytest.warns(UndefinedMetricWarning, match="only one class"):
        assert math.isnan(auc(p, torch.tensor(labels)))
    with pytest.warns(SkUndefinedMetricWarning):  # scikit-learn agrees
        assert math.isnan(roc_auc_score(labels, p.numpy()))


def test_zero_weight_class_is_single_class() -> None:
    p, y = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0, 1, 1])
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(auc(p, y, torch.tensor([0.0, 1.0, 2.0])))


@pytest.mark.parametrize(
    "fn", [auc, log_loss, calibration, normalized_entropy], ids=lambda f: f.__name__
)
def test_empty_inputs_are_nan_with_warning(fn) -> None:
    with pytest.warns(UndefinedMetricWarning, match="no examples"):
        assert math.isnan(fn(torch.empty(0), torch.empty(0)))


def test_empty_gauc_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning):
        r = gauc(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert math.isnan(r.value) and (r.groups, r.skipped_groups) == (0, 0)


def test_all_zero_weights_are_nan_with_warning() -> None:
    p, y = torch.tensor([0.2, 0.7]), torch.tensor([0, 1])
    with pytest.warns(UndefinedMetricWarning, match="weights are 0"):
        assert math.isnan(log_loss(p, y, torch.zeros(2)))


# ------------------------------------------------------------ log-loss, calibration, NE


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


def test_calibration_without_positives_and_ne_single_class() -> None:
    p, y = torch.tensor([0.1, 0.3]), torch.tensor([0, 0])
    assert math.isnan(_nan_with_warning(calibration, p, y))
    assert math.isnan(_nan_with_warning(normalized_entropy, p, y))
    assert log_loss(p, y) == pytest.approx(sk_log_loss([0, 0], p.numpy(), labels=[0, 1]))


# --------------------------------------------------------------------------- GAUC


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


def test_gauc_with_no_usable_group_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no group holds both classes"):
        r = gauc(torch.tensor([0.1, 0.5]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert math.isnan(r.value) and (r.groups, r.skipped_groups) == (2, 2)


def test_gauc_group_ids_are_any_int64() -> None:
    d = case(400, random.randrange(2**31), groups=10)
    huge = d["groups"] * (2**40) - 2**62  # negative and huge ids
    a = gauc(d["preds"], d["labels"], d["groups"])
    b = gauc(d["preds"], d["labels"], huge.to(torch.int64))
    assert a == b
    assert gauc(d["preds"], d["labels"], d["groups"].to(torch.int32)) == a


# ---------------------------------------------------------------- accumulation, dtypes


def _split(n: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(n + 1), k=min(6, n + 1)))
    cuts = [0, *cuts, n, n]  # repeated cuts give empty batches
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@pytest.mark.parametrize("weights_on", ["none", "all", "some"])
def test_batched_accumulation_equals_one_shot(weights_on: str) -> None:
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    d = case(2_500, seed, levels=13, groups=60)
    p, y, grp, w = d["preds"], d["labels"], d["groups"], d["weights"]
    m = BinaryMetrics(ALL, name="ctr")
    used_w = w.clone()
    for i, (lo, hi) in enumerate(_split(len(p), rng)):
        give = weights_on == "all" or (weights_on == "some" and i % 2 == 0)
        if not give:
            used_w[lo:hi] = 1.0
        m.update(p[lo:hi], y[lo:hi], groups=grp[lo:hi], weights=w[lo:hi] if give else None)
    got = m.compute()
    ow = None if weights_on == "none" else used_w
    assert list(got) == [
        "auc",
        "gauc",
        "gauc_groups",
        "gauc_skipped_groups",
        "logloss",
        "calibration",
        "ne",
    ]
    assert got["auc"] == pytest.approx(sk_auc(p, y, ow), abs=1e-12)
    want_g = gauc(p, y, grp, ow)
    assert got["gauc"] == pytest.approx(want_g.value, abs=1e-12)
    assert (got["gauc_groups"], got["gauc_skipped_groups"]) == want_g[1:]
    assert got["logloss"] == pytest.approx(log_loss(p, y, ow), rel=1e-12)
    assert got["calibration"] == pytest.approx(calibration(p, y, ow), rel=1e-12)
    assert got["ne"] == pytest.approx(normalized_entropy(p, y, ow), rel=1e-12)
    assert m.compute() == got  # computing again changes nothing


def test_update_after_compute_and_reset() -> None:
    d = case(600, random.randrange(2**31))
    p, y = d["preds"], d["labels"]
    m = BinaryMetrics(["auc", "logloss"])
    m.update(p[:100], y[:100])
    m.compute()
    m.update(p[100:], y[100:])
    assert m.compute()["auc"] == pytest.approx(sk_auc(p, y), abs=1e-12)
    m.reset()
    assert m.num_batches == 0
    with pytest.warns(UndefinedMetricWarning, match="no examples"):
        out = m.compute()
    assert math.isnan(out["auc"]) and math.isnan(out["logloss"])
    m.update(p[:50], y[:50])
    assert m.compute()["logloss"] == pytest.approx(log_loss(p[:50], y[:50]), rel=1e-12)


def test_update_keeps_a_copy() -> None:
    p, y = torch.tensor([0.2, 0.8, 0.4]), torch.tensor([0, 1, 1])
    m = BinaryMetrics(["auc"])
    m.update(p, y)
    p.fill_(0.5)  # a trainer reusing its output buffer
    y.zero_()
    assert m.compute()["auc"] == 1.0


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


# ------------------------------------------------------------------------ bad input


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"auc: 3 preds but 2 labels"):
        auc(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, 1\).*\(4, 2\).*MetricCollection"):
        auc(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="3 preds but 2 weights"):
        log_loss(torch.rand(3), torch.tensor([0, 1, 1]), torch.ones(2))
    m = BinaryMetrics(["gauc"], name="ctr")
    with pytest.raises(ValueError, match="task 'ctr'.*3 preds but 4 groups"):
        m.update(torch.rand(3), torch.tensor([0, 1, 1]), groups=torch.arange(4))


def test_dtype_errors() -> None:
    with pytest.raises(TypeError, match="preds must be float16"):
        auc(torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="groups must be integer ids.*hash64"):
        gauc(torch.rand(2), torch.tensor([0, 1]), torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="weights must be"):
        auc(torch.rand(2), torch.tensor([0, 1]), torch.tensor([True, False]))


def test_value_errors_name_the_task_and_wait_for_compute() -> None:
    m = BinaryMetrics(name="ctr")
    m.update(torch.tensor([0.1, float("nan"), 0.5]), torch.tensor([0, 1, 1]))  # no sync: no raise
    with pytest.raises(ValueError, match="task 'ctr': 1 predictions are NaN"):
        m.compute()
    with pytest.raises(ValueError, match="auc: 2 labels are not 0 or 1"):
        auc(torch.rand(4), torch.tensor([0, 2, 1, 0.5]))
    with pytest.raises(ValueError, match="labels are not 0 or 1"):
        auc(torch.rand(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="labels are not 0 or 1"):
        auc(torch.rand(2), torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="1 weights are negative"):
        auc(torch.rand(3), torch.tensor([0, 1, 1]), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="weights are negative, infinite or NaN"):
        auc(torch.rand(2), torch.tensor([0, 1]), torch.tensor([1.0, float("inf")]))


def test_probability_metrics_reject_logits_but_auc_accepts_them() -> None:
    logits = torch.tensor([-2.0, 0.5, 3.0])
    y = torch.tensor([0, 1, 1])
    for fn in (log_loss, calibration, normalized_entropy):
        with pytest.raises(ValueError, match=r"outside \[0, 1\].*sigmoid"):
            fn(logits, y)
    assert auc(logits, y) == 1.0
    m = BinaryMetrics(["auc", "gauc"])
    m.update(logits, y, groups=torch.zeros(3, dtype=torch.int64))
    assert m.compute()["gauc"] == 1.0


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown metric 'aucc'"):
        BinaryMetrics(["aucc"])
    with pytest.raises(ValueError, match="repeat"):
        BinaryMetrics(["auc", "auc"])
    with pytest.raises(ValueError, match="weighting must be"):
        BinaryMetrics(["gauc"], gauc_weighting="users")
    with pytest.raises(ValueError, match="weighting must be"):
        gauc(torch.rand(2), torch.tensor([0, 1]), torch.tensor([0, 0]), weighting="users")
    with pytest.raises(ValueError, match="gauc needs groups"):
        BinaryMetrics(["gauc"]).update(torch.rand(2), torch.tensor([0, 1]))


def test_device_must_not_change() -> None:
    m = BinaryMetrics(["auc"], name="ctr", device="meta")
    with pytest.raises(ValueError, match="task 'ctr': this batch is on cpu.*meta"):
        m.update(torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="preds are on cpu but labels on meta"):
        auc(torch.rand(2), torch.tensor([0, 1], device="meta"))


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch):
    """Fail on any read of tensor values back to Python (a device sync on CUDA)."""

    def boom(*args, **kwargs):
        raise AssertionError("host sync during update")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            mp.setattr(torch.Tensor, name, boom)
        mp.setattr(torch, "nonzero", boom)
        mp.setattr(torch, "masked_select", boom)
        yield


def test_update_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    d = case(300, random.randrange(2**31))
    m = BinaryMetrics(ALL)
    mc = MetricCollection(["a", "b"], ALL)
    two = torch.stack([d["preds"], d["preds"]], dim=1)
    with no_host_reads(monkeypatch):
        for lo in range(0, 300, 64):
            sl = slice(lo, lo + 64)
            m.update(d["preds"][sl], d["labels"][sl], d["groups"][sl], d["weights"][sl])
            mc.update(two[sl], {"a": d["labels"][sl], "b": d["labels"][sl]}, d["groups"][sl])
    assert m.compute()["auc"] == pytest.approx(sk_auc(d["preds"], d["labels"], d["weights"]))


# -------------------------------------------------------------------- multi-task


def test_metric_collection_per_task() -> None:
    seed = random.randrange(2**31)
    a, b = case(800, seed), case(800, seed + 1)
    preds = torch.stack([a["preds"], b["preds"]], dim=1)
    mc = MetricCollection({"ctr": ["auc", "gauc"], "cvr": ["auc", "logloss"]})
    assert mc.tasks == ("ctr", "cvr")
    for lo in range(0, 800, 300):
        sl = slice(lo, lo + 300)
        mc.update(
            preds[sl],
            {"ctr": a["labels"][sl], "cvr": b["labels"][sl], "unused": a["labels"][sl]},
            groups={"ctr": a["groups"][sl]},
            weights={"cvr": b["weights"][sl]},
        )
    got = mc.compute()
    assert list(got) == [
        "ctr/auc",
        "ctr/gauc",
        "ctr/gauc_groups",
        "ctr/gauc_skipped_groups",
        "cvr/auc",
        "cvr/logloss",
    ]
    assert got["ctr/auc"] == pytest.approx(sk_auc(a["preds"], a["labels"]), abs=1e-12)
    assert got["ctr/gauc"] == pytest.approx(gauc(a["preds"], a["labels"], a["groups"]).value)
    assert got["cvr/auc"] == pytest.approx(sk_auc(b["preds"], b["labels"], b["weights"]), abs=1e-12)
    assert got["cvr/logloss"] == pytest.approx(log_loss(b["preds"], b["labels"], b["weights"]))
    assert mc["cvr"].num_batches == 3
    mc.reset()
    assert mc["ctr"].num_batches == 0


def test_metric_collection_dict_preds_and_shared_inputs() -> None:
    d = case(500, random.randrange(2**31))
    mc = MetricCollection(["x", "y"], ["auc", "gauc"])
    mc.update(
        {"x": d["preds"], "y": 1 - d["preds"]}, {"x": d["labels"], "y": d["labels"]}, d["groups"]
    )
    got = mc.compute()
    assert got["x/auc"] == pytest.approx(1 - got["y/auc"], abs=1e-12)
    single = MetricCollection(["only"], ["auc"])
    single.update(d["preds"], d["labels"])
    assert single.compute()["only/auc"] == got["x/auc"]


def test_metric_collection_errors() -> None:
    mc = MetricCollection(["ctr", "cvr"], ["auc"])
    with pytest.raises(KeyError, match=r"labels has no entry for tasks \['cvr'\]"):
        mc.update(torch.rand(4, 2), {"ctr": torch.tensor([0, 1, 0, 1])})
    with pytest.raises(ValueError, match=r"shape \(N, 2\).*\['ctr', 'cvr'\].*\(4, 3\)"):
        mc.update(torch.rand(4, 3), torch.zeros(4, 2))
    with pytest.raises(KeyError, match="no task 'ctcvr'"):
        mc["ctcvr"]
    with pytest.raises(TypeError, match="sequence of names"):
        MetricCollection("ctr")
    with pytest.raises(ValueError, match="repeat"):
        MetricCollection(["ctr", "ctr"])
    with pytest.raises(ValueError, match="task 'cvr'.*unknown metric"):
        MetricCollection({"ctr": ["auc"], "cvr": ["roc"]})


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_matches_cpu_without_syncs_in_update() -> None:
    d = case(50_000, random.randrange(2**31), levels=200, groups=3_000)
    cpu = BinaryMetrics(ALL)
    gpu = BinaryMetrics(ALL)
    cuda = {k: v.cuda() for k, v in d.items()}
    cpu.update(d["preds"], d["labels"], d["groups"], d["weights"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lo in range(0, 50_000, 4_096):
            sl = slice(lo, lo + 4_096)
            gpu.update(
                cuda["preds"][sl].float(),
                cuda["labels"][sl],
                cuda["groups"][sl],
                cuda["weights"][sl],
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, got = cpu.compute(), gpu.compute()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


# ------------------------------------------------------------------- multi-process

WORKER = Path(__file__).with_name("metrics_dist_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("metrics_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every case of the worker, run once by two gloo ranks: {case: [rank 0, rank 1]}."""
    tmp = tmp_path_factory.mktemp("gloo")
    world = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    outs = [tmp / f"rank{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(tmp / "init"), str(outs[r])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r}:\n{logs[r][-4000:]}"
    per_rank = [json.loads(o.read_text()) for o in outs]
    return {case: [ranks[case] for ranks in per_rank] for case in per_rank[0]}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["ok", "empty_rank"])
def test_two_gloo_ranks_get_the_global_metrics(
    case_name: str, two_rank_results: dict[str, list[dict]]
) -> None:
    mod = _worker_module()
    world = 2
    results = two_rank_results[case_name]
    assert results[0] == results[1]  # every rank gets the same global values
    d = mod.make_data()
    p, y, grp = d["preds"], d["labels"], d["groups"]
    w = mod.global_weights(case_name, world)
    single = results[0]["single"]
    assert single["auc"] == pytest.approx(sk_auc(p, y, w), abs=1e-12)
    want_g = loop_gauc(p, y, grp, w, "impressions")
    assert single["gauc"] == pytest.approx(want_g.value, abs=1e-12)
    assert (single["gauc_groups"], single["gauc_skipped_groups"]) == want_g[1:]
    assert single["logloss"] == pytest.approx(
        sk_log_loss(y.numpy(), p.numpy(), sample_weight=w.numpy()), rel=1e-12
    )
    assert single["calibration"] == pytest.approx(calibration(p, y, w), rel=1e-12)
    assert single["ne"] == pytest.approx(normalized_entropy(p, y, w), rel=1e-12)
    multi = results[0]["multi"]
    for task in ("a", "b"):
        for key, value in single.items():
            assert multi[f"{task}/{key}"] == value


@pytest.mark.slow
def test_bad_value_on_one_rank_raises_on_every_rank(
    two_rank_results: dict[str, list[dict]],
) -> None:
    for r in two_rank_results["nan"]:
        assert r == {"error": "task 'ctr': 1 predictions are NaN"}
