"""SparseGradStore: the gradients a backward stores per physical table, and the fused step."""

from __future__ import annotations

import pytest
import torch

from recstack.core import PagedTensor, RowUpdater, SparseGrad
from recstack.embedding_engine.sparse_grads import SparseGradStore, merge_sparse_grads


def grad(rows: list[int], value: float, dim: int = 2) -> SparseGrad:
    return SparseGrad(torch.tensor(rows, dtype=torch.int64), torch.full((len(rows), dim), value))


def test_merge_sums_rows_into_one_coalesced_fp32_gradient() -> None:
    half = SparseGrad(torch.tensor([3]), torch.ones(1, 2, dtype=torch.float16))
    merged = merge_sparse_grads([grad([5, 3], 1.0), half])
    assert merged.is_coalesced and merged.rows.tolist() == [3, 5]
    assert merged.values.dtype == torch.float32
    assert merged.values.tolist() == [[2.0, 2.0], [1.0, 1.0]]


def test_add_accumulates_and_reading_marks_read() -> None:
    store = SparseGradStore()
    store.add("a", grad([1], 1.0))
    store.add("a", grad([1, 2], 1.0))
    store.add("b", grad([4], 3.0))
    with pytest.raises(RuntimeError, match=r"physical table\(s\) \['a', 'b'\] were never read"):
        store.drop_read()
    assert store.read("a").values.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        store.drop_read()
    assert set(store.read_all()) == {"a", "b"}
    store.drop_read()
    assert store.read_all() == {} and store.read("a") is None


def test_clear_and_empty_gradients() -> None:
    store = SparseGradStore()
    store.add("a", grad([1], 1.0))
    store.clear("a")
    store.add("b", grad([], 1.0))  # no rows: nothing to lose, so it does not block
    store.drop_read()
    store.add("c", grad([2], 1.0))
    store.clear_all()
    store.drop_read()


class OneTableUpdater:
    """Trains one table (core's RowUpdater); the store must not ask it about others."""

    def __init__(self, table: PagedTensor) -> None:
        self.table = table
        self.asked: list[PagedTensor] = []

    def begin_row_update(self, values: PagedTensor) -> None:
        self.asked.append(values)
        assert values is not self.table, "a gradient without rows needs no step"

    def end_row_update(self, values: PagedTensor, gate: torch.Tensor | None = None) -> None:
        raise AssertionError("no update was begun")


def test_apply_update_stores_what_the_optimizer_does_not_train() -> None:
    store = SparseGradStore()
    table = PagedTensor.wrap(torch.zeros(4, 2))
    other = PagedTensor.wrap(torch.zeros(4, 2))
    updater = OneTableUpdater(table)
    assert isinstance(updater, RowUpdater)
    store.updater = updater
    store.apply_update(other, "other", grad([1], 1.0))  # not trained: stored
    assert store.read("other").rows.tolist() == [1] and updater.asked == [other]
    store.apply_update(table, "t", grad([], 1.0))  # no rows: no step, stored as is
    assert store.read("t").rows.numel() == 0 and updater.asked == [other]


def test_move_keeps_the_gradients() -> None:
    store = SparseGradStore()
    store.add("a", grad([1], 1.0))
    store.move_to_(torch.device("cpu"))
    assert store.read("a").rows.device == torch.device("cpu")
