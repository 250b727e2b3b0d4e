"""host: the launchers' argument checks and the per-version validation cache."""

from __future__ import annotations

import pytest
import torch

from recstack.feature_engine.kernels import host


def test_cached_runs_once_per_table_version() -> None:
    calls = []
    table = torch.tensor([1, 2, 3])

    def compute() -> int:
        calls.append(1)
        return int(table.sum())

    assert host.cached("test", (table,), compute) == 6
    assert host.cached("test", (table,), compute) == 6
    assert len(calls) == 1
    table[0] = 10  # an in-place change bumps the version: computed again
    assert host.cached("test", (table,), compute) == 15
    assert host.cached("other kind", (table,), compute) == 15
    assert len(calls) == 3


def test_cached_skips_inference_tensors() -> None:
    calls = []
    with torch.inference_mode():
        table = torch.tensor([1])
    for _ in range(2):
        host.cached("test", (table,), lambda: calls.append(1))
    assert len(calls) == 2


def test_check_tensor_and_devices() -> None:
    x = torch.zeros(2, 3)
    assert host.check_tensor(x, "x", "op", (torch.float32,), 2) is x
    with pytest.raises(TypeError, match="op: x must be a torch.Tensor, got list"):
        host.check_tensor([1], "x", "op", (torch.float32,), 1)
    with pytest.raises(TypeError, match="op: x must be torch.int64 or torch.int32, got"):
        host.check_tensor(x, "x", "op", (torch.int64, torch.int32), 2)
    with pytest.raises(ValueError, match=r"op: x must be 1-D, got shape \(2, 3\)"):
        host.check_tensor(x, "x", "op", (torch.float32,), 1)
    host.check_same_device("op", a=x, b=torch.ones(1))
    with pytest.raises(ValueError, match="op: all tensors must be on one device, got a on cpu"):
        host.check_same_device("op", a=x, b=torch.ones(1, device="meta"))


def test_small_helpers() -> None:
    assert host.first_true(torch.tensor([[False, False], [False, True]])) == (1, 1)
    empty = torch.empty(0, dtype=torch.int64)
    assert host.nonempty(empty, torch.float64).tolist() == [0.0]
    x = torch.arange(3)
    assert host.nonempty(x, torch.int64) is x
    strided = torch.arange(6)[::2]
    a, b = host.contiguous(strided, x)
    assert a.is_contiguous() and a.tolist() == [0, 2, 4] and b is x
