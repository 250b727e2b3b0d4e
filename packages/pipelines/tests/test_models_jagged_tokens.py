"""recstack.pipelines.models.jagged_tokens: the appended-candidate layout and the
successor mask agree with a row-by-row construction on ragged batches, empty rows too."""

from __future__ import annotations

import pytest
import torch

from recstack.pipelines.models.jagged_tokens import append_layout, has_next


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])


CASES = [[], [0], [1], [3], [0, 0], [2, 0, 3, 1, 0], [5, 1, 1, 0, 7]]


@pytest.mark.parametrize("lengths", CASES, ids=[str(c) for c in CASES])
def test_append_layout_matches_building_each_sequence(lengths: list[int]) -> None:
    offsets = _offsets(lengths)
    num = sum(lengths)
    history = torch.randn(num, 3)
    candidates = torch.randn(len(lengths), 3)
    layout = append_layout(offsets, num)
    built = torch.cat([history, candidates])[layout.source]
    expected, start = [], 0
    for b, n in enumerate(lengths):
        expected += [history[start : start + n], candidates[b : b + 1]]
        start += n
    want = torch.cat(expected) if expected else torch.zeros(0, 3)
    assert torch.equal(built, want)
    assert layout.offsets.tolist() == _offsets([n + 1 for n in lengths]).tolist()
    assert torch.equal(built[layout.candidates], candidates)
    assert torch.equal(built[layout.history], history)
    from_end = [n - i for n in lengths for i in range(n + 1)]
    assert layout.from_end.tolist() == from_end
    assert layout.row.tolist() == [b for b, n in enumerate(lengths) for _ in range(n)]


def test_append_layout_gradients_reach_both_inputs() -> None:
    offsets = _offsets([2, 0, 1])
    history = torch.randn(3, 2, requires_grad=True)
    candidates = torch.randn(3, 2, requires_grad=True)
    layout = append_layout(offsets, 3)
    weight = torch.randn(6, 2)
    (torch.cat([history, candidates])[layout.source] * weight).sum().backward()
    assert history.grad is not None and candidates.grad is not None
    assert torch.equal(history.grad, weight[layout.history])
    assert torch.equal(candidates.grad, weight[layout.candidates])


@pytest.mark.parametrize("lengths", CASES, ids=[str(c) for c in CASES])
def test_has_next_is_false_on_each_sequences_last_token(lengths: list[int]) -> None:
    expected = [i < n - 1 for n in lengths for i in range(n)]
    assert has_next(_offsets(lengths), sum(lengths)).tolist() == expected


def test_random_ragged_batches() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        size = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = torch.randint(0, 6, (size,), generator=gen).tolist()
        offsets, num = _offsets(lengths), sum(lengths)
        layout = append_layout(offsets, num)
        assert sorted(layout.source.tolist()) == list(range(num + len(lengths)))
        assert has_next(offsets, num).sum().item() == sum(max(n - 1, 0) for n in lengths)
