"""SparseParameter: the protocol a sparse optimizer reads a table's pending gradient by."""

from __future__ import annotations

import torch

from recstack.core import PagedTensor, SparseGrad, SparseParameter


class Held:
    def __init__(self, table: PagedTensor) -> None:
        self.table = table
        self.grad: SparseGrad | None = None

    def pending_grad(self) -> SparseGrad | None:
        return self.grad

    def clear_grad(self) -> None:
        self.grad = None


class NoClear:
    def __init__(self, table: PagedTensor) -> None:
        self.table = table

    def pending_grad(self) -> SparseGrad | None:
        return None


def test_a_producer_with_the_three_members_is_one() -> None:
    p = Held(PagedTensor.wrap(torch.zeros(3, 2), name="w"))
    assert isinstance(p, SparseParameter)
    p.grad = SparseGrad(torch.tensor([1]), torch.ones(1, 2))
    assert p.pending_grad() is p.grad
    p.clear_grad()
    assert p.pending_grad() is None


def test_tables_tensors_and_partial_producers_are_not() -> None:
    table = PagedTensor.wrap(torch.zeros(3, 2), name="w")
    assert not isinstance(table, SparseParameter)
    assert not isinstance(torch.zeros(3, 2), SparseParameter)
    assert not isinstance(NoClear(table), SparseParameter)
