"""recstack.pipelines.metrics.batch_checks: shapes, dtypes and devices raise at once,
bad values when the metrics are computed, each naming the task."""

from __future__ import annotations

import pytest
import torch

from recstack.pipelines.metrics import (
    BinaryMetrics,
    auc,
    gauc,
    log_loss,
)


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


def test_device_must_not_change() -> None:
    m = BinaryMetrics(["auc"], name="ctr", device="meta")
    with pytest.raises(ValueError, match="task 'ctr': this batch is on cpu.*meta"):
        m.update(torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="preds are on cpu but labels on meta"):
        auc(torch.rand(2), torch.tensor([0, 1], device="meta"))
