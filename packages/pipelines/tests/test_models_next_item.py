"""recstack.pipelines.models.next_item: the next-item loss against a token-by-token
reference, for sampled negatives (log-Q corrected, hits removed) and the full softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recstack.pipelines.models import NextItemLoss


def _batch(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
    ids = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    return offsets, ids


def _targets(lengths: list[int]) -> list[int]:
    """The tokens that have a next item of their own sequence."""
    out, start = [], 0
    for n in lengths:
        out += list(range(start, start + n - 1))
        start += n
    return out


LENGTHS = [[4, 0, 1, 3], [1], [2, 2], [6, 1, 0, 0, 5]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=[str(x) for x in LENGTHS])
def test_sampled_loss_matches_a_token_by_token_reference(lengths: list[int]) -> None:
    torch.manual_seed(0)
    dim, item_dim, negs, temp = 6, 5, 7, 0.3
    loss_fn = NextItemLoss(dim, item_dim, "sampled", num_negatives=negs, temperature=temp)
    offsets, ids = _batch(lengths, vocab=4, seed=1)  # a small vocab: repeats and hits
    num = ids.numel()
    hidden = torch.randn(num, dim, requires_grad=True)
    rows = torch.randn(num, item_dim, requires_grad=True)
    torch.manual_seed(9)
    got = loss_fn(hidden, offsets, ids, rows)
    torch.manual_seed(9)
    picks = torch.randint(num, (negs,))
    query = F.normalize(loss_fn.proj(hidden), dim=-1)  # type: ignore[misc]
    items = F.normalize(rows, dim=-1)
    counts = torch.stack([(ids == i).sum() for i in ids]).float()
    losses = []
    for t in _targets(lengths):
        target = ids[t + 1]
        logits = [query[t] @ items[t + 1] / temp - counts[t + 1].log()]
        logits += [query[t] @ items[p] / temp - counts[p].log() for p in picks if ids[p] != target]
        losses.append(-torch.log_softmax(torch.stack(logits), 0)[0])
    want = torch.stack(losses).mean() if losses else torch.zeros(())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    grad_h, grad_r = hidden.grad.clone(), rows.grad.clone()
    hidden.grad = rows.grad = None
    if losses:
        want.backward()
        torch.testing.assert_close(grad_h, hidden.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_r, rows.grad, rtol=1e-4, atol=1e-6)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("lengths", LENGTHS, ids=[str(x) for x in LENGTHS])
def test_full_loss_is_cross_entropy_over_the_vocabulary(lengths: list[int]) -> None:
    torch.manual_seed(0)
    loss_fn = NextItemLoss(6, 6, "full", vocab_size=11)
    offsets, ids = _batch(lengths, vocab=11, seed=2)
    hidden = torch.randn(ids.numel(), 6, requires_grad=True)
    got = loss_fn(hidden, offsets, ids)
    targets = _targets(lengths)
    assert loss_fn.weight is not None
    if targets:
        index = torch.tensor(targets)
        want = F.cross_entropy(hidden[index] @ loss_fn.weight.t(), ids[index + 1])
    else:
        want = torch.zeros(())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert loss_fn.weight.grad is not None


def test_full_loss_names_the_feature_of_an_id_outside_the_vocabulary() -> None:
    loss_fn = NextItemLoss(4, 4, "full", vocab_size=10, feature="clicks")
    offsets = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"feature 'clicks' holds id 12 at token 2 \(0-based\)"):
        loss_fn(torch.randn(3, 4), offsets, torch.tensor([1, 2, 12]))
    # The last token of a sequence is no target: its id is not checked.
    loss_fn(torch.randn(3, 4), offsets, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_an_empty_batch_gives_zero_and_backward_runs(mode: str) -> None:
    loss_fn = NextItemLoss(4, 4, mode, vocab_size=5)  # type: ignore[arg-type]
    hidden = torch.zeros(0, 4, requires_grad=True)
    rows = torch.zeros(0, 4, requires_grad=True)
    loss = loss_fn(hidden, torch.tensor([0, 0, 0]), torch.zeros(0, dtype=torch.int64), rows)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 4)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        NextItemLoss(4, 4, "softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs vocab_size"):
        NextItemLoss(4, 4, "full")
    with pytest.raises(ValueError, match="temperature"):
        NextItemLoss(4, 4, temperature=0.0)
    with pytest.raises(ValueError, match="needs the tokens' item rows"):
        NextItemLoss(4, 4)(torch.randn(2, 4), torch.tensor([0, 2]), torch.tensor([1, 2]))
