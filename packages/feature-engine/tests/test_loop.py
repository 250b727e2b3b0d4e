"""run_per_feature: the plain per-feature PyTorch loop the engine is checked against."""

from __future__ import annotations

import torch

from recstack.core import JaggedTensor, hash64
from recstack.feature_engine import ops
from recstack.feature_engine.feature import Feature
from recstack.feature_engine.loop import run_per_feature, umod


def test_umod_reads_the_64_bits_unsigned() -> None:
    h = torch.tensor([-1, 5, -(2**63)])
    assert umod(h, 10).tolist() == [(2**64 - 1) % 10, 5, 2**63 % 10]


def test_each_feature_by_name() -> None:
    batch = {
        "user": torch.tensor([7, -3]),
        "hist": JaggedTensor.from_list([[1, 2, 3], []]),
        "price": torch.tensor([float("nan"), 4.0]),
    }
    features = [
        Feature("u", "user", [ops.Hash(seed=1, buckets=100)]),
        Feature("h", "hist", [ops.Truncate(2), ops.FillMissing(-1)]),
        Feature("p", "price", [ops.FillMissing(0.0), ops.Log1p()]),
        Feature("m", "u", [ops.MultiHash(2, seed=5)]),
    ]
    out = run_per_feature(features, batch)
    assert out["u"].values.tolist() == umod(hash64(batch["user"], 1), 100).tolist()
    assert out["h"].to_list() == [[2, 3], [-1]]
    assert torch.equal(out["p"], torch.log1p(torch.tensor([0.0, 4.0])))
    assert out["m/1"].values.tolist() == hash64(out["u"].values, 6).tolist()
