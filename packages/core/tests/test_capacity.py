"""JaggedTensor capacity layouts: the sync-free ``from_padded(compact=False)``, checked
against the syncing ``from_padded`` on fresh random inputs, and the consumers that must
read only the items (views, padding, lengths, compact, validate, from_jagged_dict)."""

from __future__ import annotations

import pytest
import torch

from recstack.core.capacity import count_mask, items_first_index, padded_item_mask
from recstack.core.jagged import JaggedTensor
from recstack.core.keyed_jagged import KeyedJaggedTensor

SIDES = ["right", "left"]


def random_lengths(gen: torch.Generator, batch: int, width: int, pattern: str) -> torch.Tensor:
    if pattern == "zeros":
        return torch.zeros(batch, dtype=torch.int64)
    if pattern == "full":
        return torch.full((batch,), width, dtype=torch.int64)
    return torch.randint(0, width + 1, (batch,), generator=gen)


def test_items_first_index_is_a_stable_partition():
    gen = torch.Generator().manual_seed(7)
    for n in (0, 1, 2, 17, 100):
        valid = torch.rand(n, generator=gen) < 0.4
        order = items_first_index(valid)
        want = torch.cat([torch.nonzero(valid).flatten(), torch.nonzero(~valid).flatten()])
        assert torch.equal(order, want)


def test_layout_helpers():
    lengths = torch.tensor([0, 2, 3])
    assert padded_item_mask(lengths, 3, "right").tolist() == [
        [False, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert padded_item_mask(lengths, 3, "left").tolist() == [
        [False, False, False],
        [False, True, True],
        [True, True, True],
    ]
    assert count_mask(4, torch.tensor(2)).tolist() == [True, True, False, False]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("batch", "width"), [(0, 3), (1, 1), (1, 0), (5, 0), (9, 6)])
@pytest.mark.parametrize("pattern", ["ragged", "zeros", "full"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
def test_capacity_from_padded_matches_syncing_one(device, side, batch, width, pattern, dtype):
    gen = torch.Generator().manual_seed(batch * 1000 + width * 10 + len(pattern))
    padded = torch.randint(-50, 50, (batch, width), generator=gen).to(dtype).to(device)
    w_padded = torch.rand((batch, width), generator=gen).to(device)
    lengths = random_lengths(gen, batch, width, pattern).to(device)
    want = JaggedTensor.from_padded(padded, lengths, side=side, weights=w_padded)
    got = JaggedTensor.from_padded(padded, lengths, side=side, weights=w_padded, compact=False)

    assert got.values.shape[0] == batch * width  # the capacity, known without a sync
    assert got.is_compact == (batch * width == 0)
    assert torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.lengths(), want.lengths())
    assert got.numel() == want.numel()
    total = want.numel()
    assert torch.equal(got.values[:total], want.values)
    assert torch.equal(got.weights[:total], want.weights)
    # The tail is exactly the padding slots, in order.
    item = padded_item_mask(lengths, width, side)
    assert torch.equal(got.values[total:], padded[~item])
    assert got.to_list() == want.to_list()
    assert torch.equal(got.to_padded(max_len=width, side=side), padded.masked_fill(~item, 0))
    assert torch.equal(got.padding_mask(max_len=width, side=side), item)
    for b in range(batch):
        assert torch.equal(got[b], want[b])
    assert got.validate() is got
    trimmed = got.compact()
    assert trimmed.is_compact
    assert torch.equal(trimmed.values, want.values) and torch.equal(trimmed.weights, want.weights)
    trimmed.validate()


def test_capacity_from_padded_trailing_dims(device):
    padded = torch.arange(24, dtype=torch.float32, device=device).view(2, 3, 4)
    lengths = torch.tensor([1, 3], device=device)
    want = JaggedTensor.from_padded(padded, lengths)
    got = JaggedTensor.from_padded(padded, lengths, compact=False)
    assert got.values.shape == (6, 4)
    assert torch.equal(got.compact().values, want.values)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([1, 4], "from_padded: a length of 4 exceeds the padded width L=3"),
        ([-1, 2], "from_padded: lengths must be >= 0, got a length of -1"),
    ],
)
def test_capacity_from_padded_reports_bad_lengths_at_the_next_sync(device, lengths, match):
    padded = torch.zeros(2, 3, dtype=torch.int64, device=device)
    bad = torch.tensor(lengths, device=device)
    with pytest.raises(ValueError, match=match):
        JaggedTensor.from_padded(padded, bad, compact=False, validate=True)
    for check in ("validate", "compact"):
        jt = JaggedTensor.from_padded(padded, bad, compact=False)
        # Until the check runs the rows stay consistent (clamped into [0, L]).
        assert jt.lengths().tolist() == [min(max(n, 0), 3) for n in lengths]
        with pytest.raises(ValueError, match=match):
            getattr(jt, check)()
    moved = JaggedTensor.from_padded(padded, bad, compact=False).to(device)
    with pytest.raises(ValueError, match=match):
        moved.validate()
    # The syncing constructor names the same problem at once.
    with pytest.raises(ValueError, match=match):
        JaggedTensor.from_padded(padded, bad)


def test_capacity_validate_and_constructor(device):
    values = torch.arange(5, device=device)
    offsets = torch.tensor([0, 2, 3], device=device)
    with pytest.raises(ValueError, match="must equal the number of items"):
        JaggedTensor(values, offsets).validate()
    jt = JaggedTensor(values, offsets, compact=False)
    assert jt.validate() is jt and jt.numel() == 3
    assert jt.compact().values.tolist() == [0, 1, 2]
    over = JaggedTensor(values, torch.tensor([0, 4, 6], device=device), compact=False)
    with pytest.raises(ValueError, match="exceeds the capacity of values"):
        over.validate()
    assert "capacity layout" in repr(jt)
    assert jt.to(device).is_compact is False
    assert JaggedTensor(values, torch.tensor([0, 5], device=device)).compact().is_compact


def test_capacity_weights_carry_gradients():
    padded = torch.tensor([[1, 2, 0], [3, 0, 0]])
    w = torch.rand(2, 3, requires_grad=True)
    jt = JaggedTensor.from_padded(padded, torch.tensor([2, 1]), weights=w, compact=False)
    (jt.weights[: jt.numel()] * 2).sum().backward()
    assert w.grad.tolist() == [[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]]


def test_from_jagged_dict_packs_capacity_jagged_tensors(device):
    gen = torch.Generator().manual_seed(3)
    padded = torch.randint(1, 100, (4, 5), generator=gen).to(device)
    lengths = torch.tensor([0, 5, 2, 3], device=device)
    cap = JaggedTensor.from_padded(padded, lengths, compact=False)
    plain = JaggedTensor.from_lengths(torch.arange(6, device=device), torch.tensor([1, 2, 0, 3]))
    got = KeyedJaggedTensor.from_jagged_dict({"a": plain, "b": cap, "c": plain})
    want = KeyedJaggedTensor.from_jagged_dict({"a": plain, "b": cap.compact(), "c": plain})
    assert not got.is_compact and got.values().shape[0] == 6 + 20 + 6
    assert got.validate() is got
    assert torch.equal(got.compact().values(), want.values())
    for key in "abc":
        assert got[key].to_list() == want[key].to_list()
