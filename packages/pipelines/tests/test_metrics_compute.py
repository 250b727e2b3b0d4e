"""recstack.pipelines.metrics.compute: undefined metrics are nan with a warning, the
probability metrics refuse logits, and bad metric names or weightings are named."""

from __future__ import annotations

import math

import pytest
import torch
from metrics_testdata import nan_with_warning
from sklearn.exceptions import UndefinedMetricWarning as SkUndefinedMetricWarning
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recstack.pipelines.metrics import (
    BinaryMetrics,
    UndefinedMetricWarning,
    auc,
    calibration,
    gauc,
    log_loss,
    normalized_entropy,
)


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


def test_calibration_without_positives_and_ne_single_class() -> None:
    p, y = torch.tensor([0.1, 0.3]), torch.tensor([0, 0])
    assert math.isnan(nan_with_warning(calibration, p, y))
    assert math.isnan(nan_with_warning(normalized_entropy, p, y))
    assert log_loss(p, y) == pytest.approx(sk_log_loss([0, 0], p.numpy(), labels=[0, 1]))


def test_gauc_with_no_usable_group_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no group holds both classes"):
        r = gauc(torch.tensor([0.1, 0.5]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert math.isnan(r.value) and (r.groups, r.skipped_groups) == (2, 2)


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
