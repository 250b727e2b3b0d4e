"""recstack.pipelines.metrics.MetricCollection: one BinaryMetrics per task."""

from __future__ import annotations

import random

import pytest
import torch
from metrics_testdata import case, sk_auc

from recstack.pipelines.metrics import (
    MetricCollection,
    gauc,
    log_loss,
)


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
