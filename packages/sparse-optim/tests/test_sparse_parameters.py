"""Core SparseParameters as optimizer parameters: step() pulls, zero_grad() clears, the
explicit grads= path and the state dict are unchanged, accumulate() takes gradients over."""

from __future__ import annotations

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad, SparseParameter
from recstack.sparse_optim import SparseAdam, SparseSGD


class Held:
    """A minimal SparseParameter: a table and the gradient a backward handed it."""

    def __init__(self, table: PagedTensor) -> None:
        self._table = table
        self.grad: SparseGrad | None = None
        self.reads = 0

    @property
    def table(self) -> PagedTensor:
        return self._table

    def pending_grad(self) -> SparseGrad | None:
        self.reads += 1
        return self.grad

    def clear_grad(self) -> None:
        self.grad = None


def table(rows: int = 4, dim: int = 2, name: str = "t") -> PagedTensor:
    t = PagedTensor(dim, page_rows=4, name=name)
    t.append_rows(rows)
    return t


def grad(rows: list[int], value: float = 1.0, dim: int = 2) -> SparseGrad:
    return SparseGrad(torch.tensor(rows, dtype=torch.int64), torch.full((len(rows), dim), value))


def test_fake_is_a_sparse_parameter() -> None:
    assert isinstance(Held(table()), SparseParameter)
    assert not isinstance(table(), SparseParameter)
    assert not isinstance(torch.zeros(2, 2), SparseParameter)


def test_step_pulls_the_pending_gradient_and_zero_grad_clears_it() -> None:
    p = Held(table())
    opt = SparseSGD([p], lr=1.0)
    assert opt.param_groups[0]["params"] == [p.table]  # unwrapped to its table
    opt.step()  # no gradient yet: nothing moves
    assert torch.equal(p.table.to_dense(), torch.zeros(4, 2))
    p.grad = grad([1, 3, 1])
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [0.0, -2.0, 0.0, -1.0]
    assert p.grad is not None  # a step reads, as torch's, and leaves it to zero_grad
    opt.zero_grad()
    assert p.grad is None
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [0.0, -2.0, 0.0, -1.0]


def test_empty_pending_gradient_is_no_step() -> None:
    p = Held(table())
    opt = SparseAdam([p], lr=0.1)
    p.grad = SparseGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))
    opt.step()
    assert p.table not in opt.state or opt.state[p.table].get("step", 0) == 0


def test_explicit_grads_win_and_may_be_keyed_by_either() -> None:
    p, q = Held(table(name="p")), Held(table(name="q"))
    opt = SparseSGD([p, q], lr=1.0)
    p.grad, q.grad = grad([0], 5.0), grad([0], 7.0)
    opt.step(grads={p: grad([2])})  # keyed by the sparse parameter: p's pending is unused
    assert p.table.to_dense()[:, 0].tolist() == [0.0, 0.0, -1.0, 0.0]
    assert q.table.to_dense()[:, 0].tolist() == [-7.0, 0.0, 0.0, 0.0]  # q's pending
    opt.step(grads={p.table: grad([3]), q.table: grad([3])})  # keyed by the table
    assert p.table.to_dense()[3, 0] == q.table.to_dense()[3, 0] == -1.0
    with pytest.raises(KeyError, match="not one of its parameters"):
        opt.step(grads={Held(table()): grad([0])})


def test_state_dict_is_the_bare_tables() -> None:
    p = Held(table())
    bare = table()
    opt, ref = SparseAdam([p], lr=0.1), SparseAdam([bare], lr=0.1)
    p.grad = grad([1, 2])
    opt.step()
    ref.step(grads=grad([1, 2]))
    a, b = opt.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    assert torch.equal(a["state"][0]["exp_avg"].to_dense(), b["state"][0]["exp_avg"].to_dense())
    assert torch.equal(p.table.to_dense(), bare.to_dense())


def test_accumulate_takes_the_pending_gradient_over() -> None:
    p = Held(table())
    opt = SparseSGD([p], lr=1.0)
    p.grad = grad([0])
    opt.accumulate()
    assert p.grad is None  # taken over: the next backward starts afresh
    p.grad = grad([0, 1])
    opt.step()  # accumulated + pending
    assert p.table.to_dense()[:, 0].tolist() == [-2.0, -1.0, 0.0, 0.0]


def test_accumulated_rows_a_new_id_takes_are_dropped() -> None:
    p = Held(table())
    opt = SparseSGD([p], lr=1.0)
    p.grad = grad([0, 2])
    opt.accumulate()
    p.table.rows_reset(torch.tensor([2]))  # an evicted id's row 2 went to a new id
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    p.table.rows_reset(torch.tensor([0]))  # nothing pending: nothing to drop
    p.grad = grad([0])
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [-2.0, 0.0, 0.0, 0.0]


def test_bad_sparse_parameters_are_refused() -> None:
    p = Held(table())
    with pytest.raises(TypeError, match="wrap it in a list"):
        SparseSGD(p, lr=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than one place"):
        SparseSGD([p, Held(p.table)], lr=1.0)
    with pytest.raises(ValueError, match="more than one place"):
        SparseSGD([p, p.table], lr=1.0)
    bad = Held(table())
    bad._table = torch.zeros(2, 2)  # type: ignore[assignment]
    with pytest.raises(TypeError, match="table must be a PagedTensor"):
        SparseSGD([bad], lr=1.0)


def test_groups_and_fused_backward_find_the_table() -> None:
    p, q = Held(table(name="p")), Held(table(name="q"))
    opt = SparseSGD([{"params": [p], "lr": 1.0}, {"params": q, "lr": 0.5}], lr=9.0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    p.grad, q.grad = grad([1]), grad([1])
    opt.step()
    assert p.table.to_dense()[1, 0] == -1.0 and q.table.to_dense()[1, 0] == -0.5
    update = opt.begin_row_update(q.table)  # what a fused backward asks for
    assert update is not None and update.lr == 0.5
