"""The lookup's autograd glue: lookup_forward and EmbeddingLookupFunction's sparse backward.

(The reduction itself, lookup_backward and its fused form are tested with their kernels in
test_lookup_grad.py and test_fused_backward.py.)
"""

from __future__ import annotations

import torch

from recstack.core import PagedTensor, SparseGrad
from recstack.embedding_engine.autograd import EmbeddingLookupFunction, LookupPlan, lookup_forward
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM

DIM = 3


def plan(device: torch.device, sink=None) -> LookupPlan:
    """Two pooled features (sum, mean) over a batch of 2, and two sequence ids."""
    table = PagedTensor.wrap(torch.arange(5 * DIM, dtype=torch.float32, device=device).view(5, DIM))
    return LookupPlan(
        name="t",
        table=table,
        batch_size=2,
        pooled_rows=torch.tensor([0, 1, 2, 4, 4], device=device),
        pooled_offsets=torch.tensor([0, 2, 3, 5, 5], device=device),
        modes=torch.tensor([MODE_SUM, MODE_MEAN], device=device),
        weights=None,
        sequence_rows=torch.tensor([3, 0], device=device),
        sink=sink,
    )


def test_forward_pools_and_gathers(device) -> None:
    p = plan(device)
    pooled, seq = lookup_forward(p)
    rows = p.table.to_dense()
    assert pooled.shape == (2, 2, DIM) and p.num_pooled == 2
    torch.testing.assert_close(pooled[0, 0], rows[0] + rows[1])
    torch.testing.assert_close(pooled[0, 1], rows[4])  # mean of [4, 4]
    assert not pooled[1, 1].any()  # an empty bag
    torch.testing.assert_close(seq, rows[[3, 0]])


def test_forward_without_ids(device) -> None:
    p = plan(device)
    p.modes, p.pooled_rows = p.modes[:0], p.pooled_rows[:0]
    p.pooled_offsets, p.sequence_rows = p.pooled_offsets[:1], p.sequence_rows[:0]
    pooled, seq = lookup_forward(p)
    assert pooled.shape == (2, 0, DIM) and seq.shape == (0, DIM)


def test_backward_hands_one_coalesced_gradient_to_the_sink(device) -> None:
    got: list[tuple[str, SparseGrad]] = []
    p = plan(device, sink=lambda name, grad: got.append((name, grad)))
    anchor = torch.empty(0, device=device, requires_grad=True)
    pooled, seq, _ = EmbeddingLookupFunction.apply(anchor, p)
    assert pooled.requires_grad and seq.requires_grad
    (pooled.sum() + 2 * seq.sum()).backward()
    assert anchor.grad is None  # the anchor only ties the outputs into the graph
    assert len(got) == 1 and got[0][0] == "t"
    grad = got[0][1]
    assert grad.is_coalesced and grad.rows.tolist() == [0, 1, 2, 3, 4]
    want = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0], device=device)  # row 4: mean of 2, twice
    torch.testing.assert_close(grad.values, want.unsqueeze(1).expand(5, DIM))
