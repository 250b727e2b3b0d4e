"""recstack.pipelines.models.din: DIN's attention sees each row's valid history only."""

from __future__ import annotations

import pytest
import torch
from model_testdata import MAX_LEN, ROWS, din, make_batch

from recstack.pipelines.models import TargetAttention


@pytest.mark.parametrize("softmax", [False, True])
def test_din_output_ignores_ids_past_each_rows_length(softmax: bool) -> None:
    torch.manual_seed(0)
    model = din(softmax)
    other = [dict(r) for r in ROWS]
    # Older ids than the last MAX_LEN: cut by the collection (it keeps the most recent).
    other[1] = {**ROWS[1], "hist": [40, 41, 42] + ROWS[1]["hist"][-MAX_LEN:]}
    model(make_batch(other))  # training mode: the other ids get rows too
    model.eval()
    with torch.no_grad():
        a, b = model(make_batch(ROWS)), model(make_batch(other))
    assert torch.equal(a, b)
    # The history matters at all: a different valid prefix changes the output.
    changed = [dict(r) for r in ROWS]
    changed[2] = {**ROWS[2], "hist": [21, 22]}
    with torch.no_grad():
        assert not torch.equal(a, model(make_batch(changed)))


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_masks_padding(softmax: bool) -> None:
    torch.manual_seed(0)
    att = TargetAttention(dim=4, hidden=[8], activation="prelu", softmax=softmax)
    query, keys = torch.randn(3, 4), torch.randn(3, 5, 4)
    lengths = torch.tensor([0, 5, 2])
    mask = torch.arange(5) < lengths.unsqueeze(1)
    garbage = torch.where(mask.unsqueeze(-1), keys, torch.randn(3, 5, 4) * 100)
    out = att(query, keys, mask)
    assert torch.allclose(att(query, garbage, mask), out, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(4))  # an empty history attends to nothing
    # Row by row on the valid prefix only: the padding takes no share of the weights.
    for b in (1, 2):
        n = int(lengths[b])
        alone = att(query[b : b + 1], keys[b : b + 1, :n], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(alone[0], out[b], atol=1e-6)
