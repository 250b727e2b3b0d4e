"""GateBook: per-device check gates and the order and outcome of deferred reads (CPU; the
GPU's pinned copies and events are exercised by the deferred-step tests on a GPU)."""

from __future__ import annotations

import torch

from recstack.sparse_optim.gates import GateBook

CPU = torch.device("cpu")


def test_a_gate_is_cleared_for_each_step_unless_read_clear() -> None:
    book = GateBook()
    gate = book.take(CPU, skip=False)
    assert gate.dtype == torch.int32 and gate.tolist() == [0, 0]
    gate[1] = 1
    assert book.read(gate) == (False, True)
    assert book.take(CPU, skip=False) is gate and gate.tolist() == [0, 0]
    assert book.read(gate) == (False, False)
    gate[0] = 5  # a clean read means no clearing launch: the book trusts it
    assert book.take(CPU, skip=False).tolist() == [5, 0]


def test_deferred_reads_come_back_in_order_with_their_flags() -> None:
    book = GateBook()
    gate = book.take(CPU, skip=False)
    book.defer(["a"], gate)
    gate = book.take(CPU, skip=False)
    gate[1] = 1
    book.defer(["b"], gate)
    assert book.pending_on(CPU) and len(book.queue) == 2
    first, second = book.pop(), book.pop()
    assert (first.params, first.out_of_range, first.nonfinite) == (["a"], False, False)
    assert (second.params, second.out_of_range, second.nonfinite) == (["b"], False, True)
    assert not book.pending_on(CPU)


def test_flags_carry_over_to_a_step_queued_behind_an_unread_one() -> None:
    book = GateBook()
    gate = book.take(CPU, skip=False)
    gate.copy_(torch.tensor([1, 1], dtype=torch.int32))
    book.defer(["bad"], gate)
    assert book.take(CPU, skip=False).tolist() == [1, 1]  # the next step writes nothing
    # Skipping non-finite steps: a carried non-finite flag must not hold the next back,
    # a carried out-of-range flag still does.
    assert book.take(CPU, skip=True).tolist() == [1, 0]
    assert book.queue[0].host.tolist() == [1, 1]  # the copy was taken before


def test_dropping_a_device_returns_the_unread_steps() -> None:
    book = GateBook()
    for name in ("x", "y", "z"):
        book.defer([name], book.take(CPU, skip=False))
    assert book.pop().params == ["x"]
    assert book.drop(CPU) == [["y"], ["z"]]
    assert not book.queue and not book.pending_on(CPU)
    assert book.take(CPU, skip=False).tolist() == [0, 0]
