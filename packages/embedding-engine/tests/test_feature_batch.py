"""FeatureBatch: one physical table's features of a batch, read as views of the KJT."""

from __future__ import annotations

import pytest
import torch

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine.feature_batch import FeatureBatch


def _kjt(device, keys, batch, gen, weighted=False):
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    n = int(lengths.sum())
    values = torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32)
    weights = torch.rand(n, generator=gen) if weighted else None
    return KeyedJaggedTensor(
        keys, values.to(device), lengths=lengths.to(device),
        weights=None if weights is None else weights.to(device),
    )  # fmt: skip


@pytest.mark.parametrize("names", [["a", "b", "c"], ["b", "c"], ["c", "a"], ["b"], []])
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_ids_and_lengths_match_the_features(device, names, batch) -> None:
    gen = torch.Generator().manual_seed(batch + len(names))
    kjt = _kjt(device, ["a", "b", "c", "d"], batch, gen, weighted=True)
    pooled = max(len(names) - 1, 0)
    fb = FeatureBatch(kjt, names, pooled)
    assert list(fb) == names and len(fb) == len(names)
    for n, ids, size in zip(names, fb.ids, fb.sizes, strict=True):
        assert ids.dtype == torch.int64 and torch.equal(ids, kjt[n].values.long())
        assert size == kjt[n].values.numel()
    want_keys = [kjt[n].values.long() for n in names]
    assert fb.keys.dtype == torch.int64
    assert fb.keys.tolist() == (torch.cat(want_keys).tolist() if want_keys else [])
    want_lengths = [kjt[n].lengths() for n in names[:pooled]]
    assert fb.pooled_lengths.tolist() == (torch.cat(want_lengths).tolist() if want_lengths else [])
    for n in names:
        jt = fb[n]
        assert torch.equal(jt.offsets, kjt[n].offsets) and torch.equal(jt.weights, kjt[n].weights)


def test_consecutive_features_are_views_of_the_kjt(device) -> None:
    gen = torch.Generator().manual_seed(0)
    kjt = _kjt(device, ["a", "b", "c"], 4, gen)
    kjt = KeyedJaggedTensor(["a", "b", "c"], kjt.values().long(), lengths=kjt.lengths())
    fb = FeatureBatch(kjt, ["a", "b"], 2)
    assert fb.keys.data_ptr() == kjt.values().data_ptr()
    assert fb.pooled_lengths.data_ptr() == kjt.lengths().data_ptr()


def test_unknown_feature(device) -> None:
    kjt = _kjt(device, ["a"], 2, torch.Generator().manual_seed(1))
    with pytest.raises(KeyError, match="no feature 'zz'"):
        FeatureBatch(kjt, ["a"], 1)["zz"]
    with pytest.raises(KeyError, match="unknown feature 'zz'"):
        FeatureBatch(kjt, ["zz"], 1)
