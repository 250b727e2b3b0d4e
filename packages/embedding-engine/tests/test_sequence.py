"""Padded and tiled sequence outputs: padded_sequence, PaddedSequence and pooling="tile"."""

from __future__ import annotations

import pytest
import torch
from embedding_testdata import bags_kjt, random_bags, seed

from recstack.core import JaggedTensor
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, TableConfig
from recstack.embedding_engine.sequence import PaddedSequence, padded_sequence

DIM = 4


def jagged(bags: list[list[float]], dim: int = 2) -> JaggedTensor:
    """Rows ``[value] * dim`` of each bag's values, with the bags' offsets."""
    flat = torch.tensor([v for bag in bags for v in bag], dtype=torch.float32)
    lengths = torch.tensor([len(b) for b in bags], dtype=torch.int64)
    return JaggedTensor.from_lengths(flat.unsqueeze(1).repeat(1, dim), lengths)


@pytest.mark.parametrize(
    ("truncate", "expected"),
    [
        ("left", [[2.0, 3.0, 4.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]),
        ("right", [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]),
    ],
)
def test_padded_sequence_cuts_the_named_end(truncate, expected) -> None:
    rows = jagged([[1.0, 2.0, 3.0, 4.0], [], [5.0]])
    padded = padded_sequence(rows, 3, truncate)
    assert isinstance(padded, torch.Tensor) and padded.shape == (3, 3, 2)
    assert padded[..., 0].tolist() == expected
    assert torch.equal(padded[..., 0], padded[..., 1])


def test_padded_sequence_with_lengths_and_mask() -> None:
    rows = jagged([[1.0, 2.0, 3.0, 4.0], [], [5.0]])
    seq = padded_sequence(rows, 2, "left", with_lengths=True)
    assert isinstance(seq, PaddedSequence) and seq.max_len == 2
    values, lengths = seq
    assert lengths.tolist() == [2, 0, 1] and lengths.dtype == torch.int64
    assert seq.mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(values, padded_sequence(rows, 2, "left"))


def test_padded_sequence_of_no_rows() -> None:
    seq = padded_sequence(jagged([]), 3, "right", with_lengths=True)
    assert seq.values.shape == (0, 3, 2) and seq.lengths.numel() == 0
    assert seq.mask.shape == (0, 3)


@pytest.mark.parametrize("max_len", [1, 3])
def test_tile_equals_reshaped_padded(backend, device, max_len) -> None:
    gen = torch.Generator().manual_seed(seed("tile", backend, max_len))
    tables = [TableConfig("t", dim=DIM)]
    features = [
        FeatureConfig("pad", "t", pooling="none", max_len=max_len),
        FeatureConfig("tile", "t", pooling="tile", max_len=max_len),
    ]
    ec = EmbeddingCollection(tables, features, device=device)
    for batch in (0, 1, 4):
        bags = random_bags(gen, batch, 5, 30)
        out = ec(bags_kjt({"pad": bags, "tile": bags}, device))
        assert out["tile"].shape == (batch, max_len * DIM) == (batch, features[1].output_dim(DIM))
        torch.testing.assert_close(out["tile"], out["pad"].reshape(batch, max_len * DIM))
        if not any(bags):
            continue  # no id was looked up; padded "none" has no graph either
        w = torch.randn(batch, max_len, DIM, generator=gen).to(device)
        out["tile"].backward(w.reshape(batch, max_len * DIM))
        g_tile = ec.sparse_grads().get("t")
        out = ec(bags_kjt({"pad": bags, "tile": bags}, device))
        out["pad"].backward(w)
        g_pad = ec.sparse_grads().get("t")
        assert g_tile is not None and g_pad is not None
        assert torch.equal(g_tile.rows, g_pad.rows)
        torch.testing.assert_close(g_tile.values, g_pad.values)
