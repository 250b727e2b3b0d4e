"""SparseOptimizer, the base of every sparse optimizer: the fused Triton step against the
torch path, the step's kernels compiled with wide row loads, loading (and refusing) state,
and core SparseParameters as parameters."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad, SparseParameter, kernels
from recstack.core.kernels import HAS_TRITON, interpret_mode
from recstack.core.kernels.launch_log import record_launches
from recstack.sparse_optim import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseSGD,
)

# The fused Triton step against the torch path, optimizer by optimizer, on fresh random
# rows: one row, ragged row counts, dims past one column tile, paged and bf16 weights.

CONFIGS = [
    (SparseSGD, {"lr": 0.1}),
    (SparseSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (SparseAdagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (RowWiseAdagrad, {"lr": 0.1, "weight_decay": 0.02}),
    (SparseAdam, {"lr": 0.01, "weight_decay": 0.01}),
    (SparseAdam, {"lr": 0.01, "tf_compat": True, "step_count": "per_row"}),
    (SparseAdamW, {"lr": 0.01, "betas": (0.0, 0.99)}),
    (SparseFTRL, {"lr": 0.1, "l1": 0.2, "l2": 0.1}),
]


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_table(w: torch.Tensor) -> PagedTensor:
    t = PagedTensor(w.shape[1], w.dtype, w.device, page_rows=8, name="table")
    t.append_rows(w.shape[0])
    t.scatter_rows(torch.arange(w.shape[0], device=w.device), w)
    return t


def run(cls, hp, backend, w0, grads, device):
    table = make_table(w0.to(device))
    opt = cls([table], **hp)
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        for rows, values in grads:
            opt.step(grads=SparseGrad(rows.to(device), values.to(device), is_coalesced=True))
    state = {k: v.to_dense().cpu() for k, v in opt.state[table].items() if k != "step"}
    return table.to_dense().cpu(), state, launches


@pytest.mark.parametrize("cls, hp", CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("n_rows, dim", [(1, 1), (17, 5), (40, 130)])
def test_fused_step_matches_torch_path(device, cls, hp, n_rows, dim) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(seed(cls.__name__, hp, n_rows, dim))
    table_rows = n_rows + 7
    w0 = torch.randn(table_rows, dim, generator=gen)
    grads = []
    for _ in range(3):
        rows = torch.randperm(table_rows, generator=gen)[:n_rows].sort().values
        grads.append((rows, torch.randn(n_rows, dim, generator=gen)))
    grads.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim)))  # an empty step
    w_ref, s_ref, _ = run(cls, hp, "torch", w0, grads, device)
    w_got, s_got, launches = run(cls, hp, "triton", w0, grads, device)
    torch.testing.assert_close(w_got, w_ref, rtol=1e-5, atol=1e-6)
    assert s_got.keys() == s_ref.keys()
    for k in s_ref:
        torch.testing.assert_close(s_got[k], s_ref[k], rtol=1e-5, atol=1e-6)
    assert launches["row_update"] == 3  # one per non-empty step


def test_fused_step_bf16_weights(device) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(20, 9, generator=gen).to(torch.bfloat16)
    grads = [(torch.arange(0, 20, 2), torch.randn(10, 9, generator=gen)) for _ in range(2)]
    w_ref, _, _ = run(SparseAdam, {"lr": 0.01}, "torch", w0, grads, device)
    w_got, _, _ = run(SparseAdam, {"lr": 0.01}, "triton", w0, grads, device)
    assert w_got.dtype == torch.bfloat16
    # fp32 math, one round-to-nearest-even on the way back, on both paths.
    assert (w_got.float() - w_ref.float()).abs().max() <= 2**-7 * w_ref.float().abs().max()


@pytest.mark.parametrize("cls, hp", CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_step_over_many_tables_is_one_launch_pair_per_class(device, cls, hp) -> None:
    # Three fp32 tables of width 6 (one paged, one a plain tensor, one stepped less often,
    # so its Adam step count differs), one bf16 table: two classes.
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(seed("many", cls.__name__, hp))
    w0 = [torch.randn(30, 6, generator=gen) for _ in range(3)]
    w0.append(torch.randn(30, 6, generator=gen).to(torch.bfloat16))
    steps = []
    for i in range(3):
        step = []
        for k in range(4):
            n = 0 if (k == 2 and i == 1) else int(torch.randint(1, 30, (1,), generator=gen))
            rows = torch.randperm(30, generator=gen)[:n].sort().values
            step.append((rows, torch.randn(n, 6, generator=gen)))
        steps.append(step)

    def train(backend: str):
        params = [make_table(w0[0].to(device)), w0[1].clone().to(device),
                  make_table(w0[2].to(device)), make_table(w0[3].to(device))]  # fmt: skip
        opt = cls(params, **hp)
        with kernels.use_backend(backend), kernels.count_launches() as launches:
            for step in steps:
                grads = {p: SparseGrad(r.to(device), v.to(device), is_coalesced=True)
                         for p, (r, v) in zip(params, step, strict=True)}  # fmt: skip
                opt.step(grads=grads)
        dense = [p.to_dense() if isinstance(p, PagedTensor) else p for p in params]
        state = [v.to_dense() for p in params for k, v in opt.state[p].items() if k != "step"]
        return [t.float().cpu() for t in dense + state], launches

    want, _ = train("torch")
    got, launches = train("triton")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2 if a.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if a.dtype == torch.bfloat16 else 1e-6)  # fmt: skip
    assert launches["row_update_many"] == launches["check_rows_many"] == 3 * 2
    assert launches["row_update"] == launches["check_rows"] == 0


# The fused step's kernels keep their 128-bit row loads when compiled for sm_90.
#
# A step is bound by memory, and its rows are read whole: with 16-byte loads it runs at
# about 80% of the copy bandwidth on an H200, with 4-byte ones at about half of that. The
# loads are wide only when the compiler can prove the row pointers aligned, which rests on
# hints one compiler version kept and another dropped (an H200 run saw the step 0.3 ms
# slower from that alone). Recorded under the interpreter, compiled in a child process.

UPDATE_KERNELS = ("row_update:_row_update_kernel", "row_update_many:_update_many_kernel")

_COMPILE = """
import json, sys
from recstack.core.kernels.compile_check import compile_signatures
from recstack.core.kernels.launch_log import load_signatures
out = {}
for r in compile_signatures(load_signatures(sys.argv[1])):
    out.setdefault(r.signature.kernel, []).append([r.error, r.global_loads, r.wide_loads])
print(json.dumps(out))
"""


@pytest.mark.skipif(not (HAS_TRITON and interpret_mode()), reason="records interpreted launches")
def test_update_kernels_load_rows_128_bits_at_a_time(tmp_path):
    gen = torch.Generator().manual_seed(7)

    def table(name: str) -> PagedTensor:
        return PagedTensor.wrap(torch.randn(512, 64, generator=gen), name=name)

    def grad() -> SparseGrad:
        rows = torch.randperm(512, generator=gen)[:64].sort().values
        return SparseGrad(rows, torch.randn(64, 64, generator=gen), is_coalesced=True)

    with record_launches(keep=lambda sig: sig.kernel.endswith(UPDATE_KERNELS)) as log:
        for cls in (SparseAdam, SparseAdagrad):
            one = table("one")
            cls([one], lr=1e-2).step(grads={one: grad()})
            a, b = table("a"), table("b")
            cls([a, b], lr=1e-2).step(grads={a: grad(), b: grad()})
    assert {s.kernel.rsplit(".", 1)[-1] for s in log.signatures} == set(UPDATE_KERNELS)
    path = tmp_path / "launches.jsonl"
    log.save(path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kernel, variants in results.items():
        for error, loads, wide in variants:
            assert error is None, f"{kernel}: {error}"
            # The gradient, weight and state rows of every slot: at least three wide loads.
            assert wide >= 3, f"{kernel}: {wide} of {loads} global loads are 128-bit"


# Loading a sparse optimizer's state refuses corrupt state, names what is wrong, and
# leaves the optimizer unchanged; non-finite hyper-parameters are refused everywhere.

ROWS, DIM = 6, 3


def state_table(seed: int) -> PagedTensor:
    gen = torch.Generator().manual_seed(seed)
    t = PagedTensor(DIM, page_rows=4, name="emb")
    t.append_rows(ROWS)
    t.scatter_rows(torch.arange(ROWS), torch.randn(ROWS, DIM, generator=gen))
    return t


def state_grad(seed: int) -> SparseGrad:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(ROWS, generator=gen)[:3].sort().values
    return SparseGrad(rows, torch.randn(3, DIM, generator=gen))


def trained_adam(seed: int = 0) -> tuple[PagedTensor, SparseAdam]:
    w = state_table(seed)
    opt = SparseAdam([w], lr=0.05, step_count="per_row")
    for s in range(3):
        opt.step(grads=state_grad(seed * 10 + s))
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
    opt.step(grads=state_grad(99))
    twin.step(grads=state_grad(99))
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
        opt.step(grads=state_grad(7))
        source2.step(grads=state_grad(7))
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
    w = state_table(0)
    opt = SparseSGD([w], lr=0.1)
    opt.step(grads=state_grad(0))
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step"}
    other = SparseSGD([state_table(0)], lr=0.1, momentum=0.9)
    other.load_state_dict(saved)  # a state without a buffer, momentum 0 loaded with it
    assert other.param_groups[0]["momentum"] == 0
    saved["param_groups"][0]["momentum"] = 0.9  # momentum but no buffer in the state
    with pytest.raises(ValueError, match=r"missing: \['momentum_buffer'\]"):
        SparseSGD([state_table(0)], lr=0.1).load_state_dict(saved)


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
        cls([state_table(0)], **kwargs)


def test_nonfinite_lr_in_a_param_group_is_refused() -> None:
    opt = SparseAdam([state_table(0)], lr=0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.add_param_group({"params": [state_table(1)], "lr": float("nan")})
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
    opt2.step(grads=state_grad(1))
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
    again.step(grads=state_grad(5))
    twin.step(grads=state_grad(5))
    assert torch.equal(w.to_dense(), w2.to_dense())
    # An optimizer whose slot of that name has another shape is refused, naming it.
    w.add_companion("sum", PagedTensor(1, page_rows=4))
    with pytest.raises(ValueError, match="'emb' has a companion 'sum' of width 1"):
        SparseAdagrad([w], lr=0.1).step(grads=state_grad(1))


# Core SparseParameters as optimizer parameters: step() pulls, zero_grad() clears, the
# explicit grads= path and the state dict are unchanged, accumulate() takes gradients over.


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


def held_table(rows: int = 4, dim: int = 2, name: str = "t") -> PagedTensor:
    t = PagedTensor(dim, page_rows=4, name=name)
    t.append_rows(rows)
    return t


def held_grad(rows: list[int], value: float = 1.0, dim: int = 2) -> SparseGrad:
    return SparseGrad(torch.tensor(rows, dtype=torch.int64), torch.full((len(rows), dim), value))


def test_fake_is_a_sparse_parameter() -> None:
    assert isinstance(Held(held_table()), SparseParameter)
    assert not isinstance(held_table(), SparseParameter)
    assert not isinstance(torch.zeros(2, 2), SparseParameter)


def test_step_pulls_the_pending_gradient_and_zero_grad_clears_it() -> None:
    p = Held(held_table())
    opt = SparseSGD([p], lr=1.0)
    assert opt.param_groups[0]["params"] == [p.table]  # unwrapped to its table
    opt.step()  # no gradient yet: nothing moves
    assert torch.equal(p.table.to_dense(), torch.zeros(4, 2))
    p.grad = held_grad([1, 3, 1])
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [0.0, -2.0, 0.0, -1.0]
    assert p.grad is not None  # a step reads, as torch's, and leaves it to zero_grad
    opt.zero_grad()
    assert p.grad is None
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [0.0, -2.0, 0.0, -1.0]


def test_empty_pending_gradient_is_no_step() -> None:
    p = Held(held_table())
    opt = SparseAdam([p], lr=0.1)
    p.grad = SparseGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))
    opt.step()
    assert p.table not in opt.state or opt.state[p.table].get("step", 0) == 0


def test_explicit_grads_win_and_may_be_keyed_by_either() -> None:
    p, q = Held(held_table(name="p")), Held(held_table(name="q"))
    opt = SparseSGD([p, q], lr=1.0)
    p.grad, q.grad = held_grad([0], 5.0), held_grad([0], 7.0)
    opt.step(grads={p: held_grad([2])})  # keyed by the sparse parameter: p's pending is unused
    assert p.table.to_dense()[:, 0].tolist() == [0.0, 0.0, -1.0, 0.0]
    assert q.table.to_dense()[:, 0].tolist() == [-7.0, 0.0, 0.0, 0.0]  # q's pending
    opt.step(grads={p.table: held_grad([3]), q.table: held_grad([3])})  # keyed by the table
    assert p.table.to_dense()[3, 0] == q.table.to_dense()[3, 0] == -1.0
    with pytest.raises(KeyError, match="not one of its parameters"):
        opt.step(grads={Held(held_table()): held_grad([0])})


def test_state_dict_is_the_bare_tables() -> None:
    p = Held(held_table())
    bare = held_table()
    opt, ref = SparseAdam([p], lr=0.1), SparseAdam([bare], lr=0.1)
    p.grad = held_grad([1, 2])
    opt.step()
    ref.step(grads=held_grad([1, 2]))
    a, b = opt.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    assert torch.equal(a["state"][0]["exp_avg"].to_dense(), b["state"][0]["exp_avg"].to_dense())
    assert torch.equal(p.table.to_dense(), bare.to_dense())


def test_accumulate_takes_the_pending_gradient_over() -> None:
    p = Held(held_table())
    opt = SparseSGD([p], lr=1.0)
    p.grad = held_grad([0])
    opt.accumulate()
    assert p.grad is None  # taken over: the next backward starts afresh
    p.grad = held_grad([0, 1])
    opt.step()  # accumulated + pending
    assert p.table.to_dense()[:, 0].tolist() == [-2.0, -1.0, 0.0, 0.0]


def test_accumulated_rows_a_new_id_takes_are_dropped() -> None:
    p = Held(held_table())
    opt = SparseSGD([p], lr=1.0)
    p.grad = held_grad([0, 2])
    opt.accumulate()
    p.table.rows_reset(torch.tensor([2]))  # an evicted id's row 2 went to a new id
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    p.table.rows_reset(torch.tensor([0]))  # nothing pending: nothing to drop
    p.grad = held_grad([0])
    opt.step()
    assert p.table.to_dense()[:, 0].tolist() == [-2.0, 0.0, 0.0, 0.0]


def test_bad_sparse_parameters_are_refused() -> None:
    p = Held(held_table())
    with pytest.raises(TypeError, match="wrap it in a list"):
        SparseSGD(p, lr=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than one place"):
        SparseSGD([p, Held(p.table)], lr=1.0)
    with pytest.raises(ValueError, match="more than one place"):
        SparseSGD([p, p.table], lr=1.0)
    bad = Held(held_table())
    bad._table = torch.zeros(2, 2)  # type: ignore[assignment]
    with pytest.raises(TypeError, match="table must be a PagedTensor"):
        SparseSGD([bad], lr=1.0)


def test_groups_and_fused_backward_find_the_table() -> None:
    p, q = Held(held_table(name="p")), Held(held_table(name="q"))
    opt = SparseSGD([{"params": [p], "lr": 1.0}, {"params": q, "lr": 0.5}], lr=9.0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    p.grad, q.grad = held_grad([1]), held_grad([1])
    opt.step()
    assert p.table.to_dense()[1, 0] == -1.0 and q.table.to_dense()[1, 0] == -0.5
    update = opt.begin_row_update(q.table)  # what a fused backward asks for
    assert update is not None and update.lr == 0.5
