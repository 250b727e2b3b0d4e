"""recstack.pipelines.metrics.BinaryMetrics: batch by batch equals one shot, updates
never read the device, state resets."""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch
from metrics_testdata import ALL, case, random_batches, sk_auc

from recstack.pipelines.metrics import (
    BinaryMetrics,
    MetricCollection,
    UndefinedMetricWarning,
    calibration,
    gauc,
    log_loss,
    normalized_entropy,
)


@pytest.mark.parametrize("weights_on", ["none", "all", "some"])
def test_batched_accumulation_equals_one_shot(weights_on: str) -> None:
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    d = case(2_500, seed, levels=13, groups=60)
    p, y, grp, w = d["preds"], d["labels"], d["groups"], d["weights"]
    m = BinaryMetrics(ALL, name="ctr")
    used_w = w.clone()
    for i, (lo, hi) in enumerate(random_batches(len(p), rng)):
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
