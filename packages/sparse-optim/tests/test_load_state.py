"""Loading a sparse optimizer's state refuses corrupt state, names what is wrong, and
leaves the optimizer unchanged; non-finite hyper-parameters are refused everywhere."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad
from recstack.sparse_optim import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseSGD,
)

ROWS, DIM = 6, 3


def table(seed: int) -> PagedTensor:
    gen = torch.Generator().manual_seed(seed)
    t = PagedTensor(DIM, page_rows=4, name="emb")
    t.append_rows(ROWS)
    t.scatter_rows(torch.arange(ROWS), torch.randn(ROWS, DIM, generator=gen))
    return t


def grad(seed: int) -> SparseGrad:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(ROWS, generator=gen)[:3].sort().values
    return SparseGrad(rows, torch.randn(3, DIM, generator=gen))


def trained_adam(seed: int = 0) -> tuple[PagedTensor, SparseAdam]:
    w = table(seed)
    opt = SparseAdam([w], lr=0.05, step_count="per_row")
    for s in range(3):
        opt.step(grads=grad(seed * 10 + s))
    return w, opt


def dense_state(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with its slots as plain tensors (so a test can corrupt them)."""
    out = copy.deepcopy({k: v for k, v in saved.items() if k != "state"})
    out["state"] = {
        k: {n: (v.to_dense().clone() if isinstance(v, PagedTensor) else v) for n, v in st.items()}
        for k, st in saved["state"].items()
    }
    return out


def snapshot(opt: SparseAdam) -> tuple[Any, ...]:
    st = opt.state_dict()
    groups = json.dumps(st["param_groups"], sort_keys=True)
    slots = {
        k: {n: (v.to_dense().clone() if isinstance(v, PagedTensor) else v) for n, v in s.items()}
        for k, s in st["state"].items()
    }
    return groups, slots, st["skipped_steps"]


def assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        for n, v in a[1][k].items():
            w = b[1][k][n]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, n)


def corrupt_rows(st: dict[str, Any]) -> None:
    st["state"][0]["exp_avg"] = st["state"][0]["exp_avg"][:4]


def corrupt_width(st: dict[str, Any]) -> None:
    st["state"][0]["exp_avg"] = torch.zeros(ROWS, DIM + 1)


def corrupt_nan(st: dict[str, Any]) -> None:
    st["state"][0]["exp_avg"][2, 1] = float("nan")


def corrupt_negative_sq(st: dict[str, Any]) -> None:
    st["state"][0]["exp_avg_sq"][1, 0] = -1.0


def set_group(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def corrupt(st: dict[str, Any]) -> None:
        st["param_groups"][0][key] = value

    return corrupt


def set_state(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def corrupt(st: dict[str, Any]) -> None:
        st["state"][0][key] = value

    return corrupt


def bad_key(st: dict[str, Any]) -> None:
    st["state"][7] = st["state"].pop(0)


def bad_skipped(st: dict[str, Any]) -> None:
    st["skipped_steps"] = -2


CORRUPTIONS = [
    (corrupt_rows, ValueError, r"'emb'.*slot 'exp_avg'.*shape \(4, 3\).*\(6, 3\)"),
    (corrupt_width, ValueError, r"slot 'exp_avg'.*shape \(6, 4\)"),
    (corrupt_nan, ValueError, r"'emb'.*slot 'exp_avg'.*NaN"),
    (corrupt_negative_sq, ValueError, r"slot 'exp_avg_sq'.*negative"),
    (set_state("step", -1), ValueError, r"'emb'.*'step' must be an int >= 0, got -1"),
    (set_state("step", "abc"), ValueError, r"'emb'.*'step' must be an int >= 0, got 'abc'"),
    (set_state("step", 2.5), ValueError, r"'step'"),
    (set_state("momentum", torch.zeros(ROWS, DIM)), ValueError, r"unknown: \['momentum'\]"),
    (bad_key, ValueError, r"state key 7"),
    (bad_skipped, ValueError, r"skipped_steps"),
    (set_group("eps", -1), ValueError, r"param group 0: eps must be a float >= 0, got -1"),
    (set_group("eps", float("inf")), ValueError, r"param group 0: eps must be finite"),
    (set_group("lr", "fast"), ValueError, r"param group 0: lr must be a float >= 0, got 'fast'"),
    (set_group("lr", float("nan")), ValueError, r"param group 0: lr must be finite"),
    (set_group("betas", [0.9]), ValueError, r"param group 0: betas must be two floats"),
    (set_group("betas", ["a", 0.9]), ValueError, r"betas"),
    (set_group("betas", [0.9, float("nan")]), ValueError, r"betas"),
    (set_group("tf_compat", "yes"), ValueError, r"tf_compat must be True or False"),
    (set_group("weight_decay", None), ValueError, r"weight_decay must be a float"),
]


@pytest.fixture(scope="module")
def saved_state() -> dict[str, Any]:
    return dense_state(trained_adam(seed=1)[1].state_dict())


@pytest.fixture(scope="module")
def target() -> tuple[PagedTensor, SparseAdam]:
    """One trained optimizer every corruption is tried on: a refused load changes nothing."""
    return trained_adam(seed=2)


@pytest.mark.parametrize(("corrupt", "error", "match"), CORRUPTIONS)
def test_corrupt_state_is_refused_and_changes_nothing(
    corrupt, error, match, saved_state, target
) -> None:
    saved = copy.deepcopy(saved_state)
    corrupt(saved)
    w, opt = target
    weights, before = w.to_dense().clone(), snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    assert_same(snapshot(opt), before)
    assert torch.equal(w.to_dense(), weights)


def test_a_refused_load_leaves_the_optimizer_stepping_as_before() -> None:
    saved = dense_state(trained_adam(seed=1)[1].state_dict())
    corrupt_rows(saved)
    w, opt = trained_adam(seed=2)
    w2, twin = trained_adam(seed=2)
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    opt.step(grads=grad(99))
    twin.step(grads=grad(99))
    assert torch.equal(w.to_dense(), w2.to_dense())


def test_good_state_still_loads_from_paged_dense_and_json_keys() -> None:
    w_src, source = trained_adam(seed=3)
    saved = source.state_dict()
    for variant in (saved, dense_state(saved)):
        variant = {**variant, "state": {str(k): v for k, v in variant["state"].items()}}
        w, opt = trained_adam(seed=4)
        w.scatter_rows(torch.arange(ROWS), w_src.to_dense())
        opt.load_state_dict(variant)
        w_src2, source2 = trained_adam(seed=3)
        opt.step(grads=grad(7))
        source2.step(grads=grad(7))
        assert torch.equal(w.to_dense(), w_src2.to_dense())


def test_state_of_a_grown_parameter_round_trips() -> None:
    """Rows a table gained after its last step are in the saved slots (at their initial
    value), so the state loads back into the same optimizer."""
    w, opt = trained_adam(seed=5)
    w.append_rows(5)
    saved = opt.state_dict()
    assert saved["state"][0]["exp_avg"].num_rows == ROWS + 5
    opt.load_state_dict(saved)
    assert opt.state[w]["exp_avg"].num_rows == ROWS + 5


def test_sgd_slots_follow_the_loaded_momentum() -> None:
    w = table(0)
    opt = SparseSGD([w], lr=0.1)
    opt.step(grads=grad(0))
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step"}
    other = SparseSGD([table(0)], lr=0.1, momentum=0.9)
    other.load_state_dict(saved)  # a state without a buffer, momentum 0 loaded with it
    assert other.param_groups[0]["momentum"] == 0
    saved["param_groups"][0]["momentum"] = 0.9  # momentum but no buffer in the state
    with pytest.raises(ValueError, match=r"missing: \['momentum_buffer'\]"):
        SparseSGD([table(0)], lr=0.1).load_state_dict(saved)


NONFINITE = [
    (SparseSGD, {"lr": float("nan")}, "lr must be finite"),
    (SparseSGD, {"lr": 0.1, "momentum": float("inf")}, "momentum must be finite"),
    (SparseSGD, {"lr": 0.1, "weight_decay": float("nan")}, "weight_decay must be finite"),
    (SparseAdagrad, {"lr": float("inf")}, "lr must be finite"),
    (SparseAdagrad, {"eps": float("nan")}, "eps must be finite"),
    (SparseAdagrad, {"lr_decay": float("nan")}, "lr_decay must be finite"),
    (SparseAdagrad, {"initial_accumulator_value": float("inf")}, "initial_accumulator"),
    (RowWiseAdagrad, {"lr": float("nan")}, "lr must be finite"),
    (RowWiseAdagrad, {"eps": float("-inf")}, "eps must be finite"),
    (SparseAdam, {"lr": float("nan")}, "lr must be finite"),
    (SparseAdam, {"eps": float("nan")}, "eps must be finite"),
    (SparseAdam, {"betas": (float("nan"), 0.9)}, "betas"),
    (SparseAdamW, {"weight_decay": float("inf")}, "weight_decay must be finite"),
    (SparseFTRL, {"lr": float("nan")}, "lr must be finite"),
    (SparseFTRL, {"beta": float("nan")}, "beta must be finite"),
    (SparseFTRL, {"l1": float("inf")}, "l1 must be finite"),
    (SparseFTRL, {"l2": float("nan")}, "l2 must be finite"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), NONFINITE)
def test_nonfinite_hyper_parameters_are_refused(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls([table(0)], **kwargs)


def test_nonfinite_lr_in_a_param_group_is_refused() -> None:
    opt = SparseAdam([table(0)], lr=0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.add_param_group({"params": [table(1)], "lr": float("nan")})
    assert len(opt.param_groups) == 1


def test_a_slot_left_out_must_be_a_companion_of_the_table() -> None:
    """A table's slots travel with its keys (companions), so a state may leave them out;
    a plain tensor parameter has no companions and its slots must all be there."""
    w, opt = trained_adam(seed=6)
    kept = opt.state[w]["exp_avg_sq"].to_dense().clone()
    saved = dense_state(opt.state_dict())
    del saved["state"][0]["exp_avg_sq"]
    saved["state"][0]["exp_avg"] += 1
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[w]["exp_avg_sq"].to_dense(), kept)
    assert torch.equal(opt.state[w]["exp_avg"].to_dense(), saved["state"][0]["exp_avg"])
    plain = torch.randn(ROWS, DIM)
    opt2 = SparseAdam([plain], lr=0.1)
    opt2.step(grads=grad(1))
    saved = dense_state(opt2.state_dict())
    del saved["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"param 0 of group 0.*missing: \['exp_avg_sq'\]"):
        opt2.load_state_dict(saved)


def test_slots_are_companions_of_a_paged_parameter() -> None:
    w, opt = trained_adam(seed=7)
    assert list(w.companions) == ["exp_avg", "exp_avg_sq", "row_step"]
    assert w.companions["exp_avg"].store is opt.state[w]["exp_avg"]
    # A new optimizer of the same table takes the state over: it lives with the rows.
    again = SparseAdam([w], lr=0.05, step_count="per_row")
    again.load_state_dict({**opt.state_dict(), "state": {0: {"step": 3}}})
    assert again.state[w]["exp_avg"] is opt.state[w]["exp_avg"]
    w2, twin = trained_adam(seed=7)
    again.step(grads=grad(5))
    twin.step(grads=grad(5))
    assert torch.equal(w.to_dense(), w2.to_dense())
    # An optimizer whose slot of that name has another shape is refused, naming it.
    w.add_companion("sum", PagedTensor(1, page_rows=4))
    with pytest.raises(ValueError, match="'emb' has a companion 'sum' of width 1"):
        SparseAdagrad([w], lr=0.1).step(grads=grad(1))
