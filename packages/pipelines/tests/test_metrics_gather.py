"""recstack.pipelines.metrics.gather: two gloo ranks compute the metrics of the whole
evaluation set, and a bad value on one rank raises on every rank."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from metrics_testdata import loop_gauc, sk_auc
from rank_processes import run_ranks
from sklearn.metrics import log_loss as sk_log_loss

from recstack.pipelines.metrics import (
    calibration,
    normalized_entropy,
)

WORKER = Path(__file__).with_name("metrics_dist_worker.py")


def worker_module():
    spec = importlib.util.spec_from_file_location("metrics_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every case of the worker, run once by two gloo ranks: {case: [rank 0, rank 1]}."""
    tmp = tmp_path_factory.mktemp("gloo")
    world = 2
    outs = [tmp / f"rank{r}.json" for r in range(world)]
    run_ranks(
        WORKER, world, lambda r: [str(tmp / "init"), str(outs[r])], env={"PYTHONUNBUFFERED": "1"}
    )
    per_rank = [json.loads(o.read_text()) for o in outs]
    return {case: [ranks[case] for ranks in per_rank] for case in per_rank[0]}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["ok", "empty_rank"])
def test_two_gloo_ranks_get_the_global_metrics(
    case_name: str, two_rank_results: dict[str, list[dict]]
) -> None:
    mod = worker_module()
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
