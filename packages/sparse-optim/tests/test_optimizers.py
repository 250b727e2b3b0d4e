"""The sparse optimizers end to end: against torch.optim, lazily, and their API contracts."""

from __future__ import annotations

import json
import zlib

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
from recstack.sparse_optim.rules import adam_rows

ROWS, DIM, STEPS = 11, 5, 5


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def paged(w: torch.Tensor) -> PagedTensor:
    """``w`` in 4-row pages: several pages, as a growing embedding table has."""
    t = PagedTensor(w.shape[1], w.dtype, w.device, page_rows=4, name="table")
    t.append_rows(w.shape[0])
    t.scatter_rows(torch.arange(w.shape[0], device=w.device), w)
    return t


PAIRS = [
    (SparseSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (SparseSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "nesterov": True}),
    (SparseAdagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (SparseAdam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.02}),
    (SparseAdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("ours_cls, torch_cls, hp", PAIRS)
@pytest.mark.parametrize("kind", ["paged", "tensor"])
def test_every_row_touched_matches_torch(ours_cls, torch_cls, hp, kind) -> None:
    gen = torch.Generator().manual_seed(seed(ours_cls.__name__, hp, kind))
    w0 = torch.randn(ROWS, DIM, generator=gen)
    grads = [torch.randn(ROWS, DIM, generator=gen) for _ in range(STEPS)]
    ref = torch.nn.Parameter(w0.clone())
    ref_opt = torch_cls([ref], **hp)
    param = paged(w0) if kind == "paged" else w0.clone()
    opt = ours_cls([param], **hp)
    rows = torch.randperm(ROWS, generator=gen)  # any order: the optimizer coalesces
    for g in grads:
        ref.grad = g.clone()
        ref_opt.step()
        opt.step(grads=SparseGrad(rows, g[rows]))
    got = param.to_dense() if kind == "paged" else param
    assert rel_err(got, ref.detach()) < 1e-6


def test_lazy_rows_match_torch_sparse_adam() -> None:
    # torch.optim.SparseAdam is lazy Adam with one step count per parameter and
    # TensorFlow's form of the update (epsilon outside the bias correction): ours with
    # step_count="global" and tf_compat=True must match it through nn.Embedding(sparse=True).
    gen = torch.Generator().manual_seed(5)
    emb_ref = torch.nn.Embedding(ROWS, DIM, sparse=True)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(emb_ref.weight)
    ref_opt = torch.optim.SparseAdam(emb_ref.parameters(), lr=0.05)
    opt = SparseAdam(emb.parameters(), lr=0.05, tf_compat=True)
    untouched = emb.weight.detach()[ROWS - 1].clone()
    for _ in range(STEPS):
        ids = torch.randint(0, ROWS - 1, (7,), generator=gen)  # the last row is never hit
        target = torch.randn(7, DIM, generator=gen)
        for module, o in ((emb_ref, ref_opt), (emb, opt)):
            o.zero_grad()
            ((module(ids) - target) ** 2).sum().backward()
            o.step()
    assert rel_err(emb.weight.detach(), emb_ref.weight.detach()) < 1e-6
    assert torch.equal(emb.weight.detach()[ROWS - 1], untouched)
    state = opt.state[emb.weight]
    assert torch.all(state["exp_avg"].to_dense()[ROWS - 1] == 0)


def test_per_row_step_counts() -> None:
    w = PagedTensor.wrap(torch.ones(3, 2))
    opt = SparseAdam([w], lr=0.1, step_count="per_row")
    g = torch.ones(1, 2)
    opt.step(grads=SparseGrad(torch.tensor([0]), g))
    opt.step(grads=SparseGrad(torch.tensor([0]), g))
    opt.step(grads=SparseGrad(torch.tensor([1]), g))  # row 1's first update: t = 1
    assert opt.state[w]["row_step"].to_dense().view(-1).tolist() == [2.0, 1.0, 0.0]
    first, _, _ = adam_rows(torch.ones(1, 2), g, torch.zeros(1, 2), torch.zeros(1, 2), 1, lr=0.1)
    torch.testing.assert_close(w.to_dense()[1:2], first)


def test_rowwise_adagrad_and_ftrl_touch_only_their_rows() -> None:
    for cls, hp in ((RowWiseAdagrad, {"lr": 0.1}), (SparseFTRL, {"lr": 0.1, "l1": 0.01})):
        w0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(9))
        w = PagedTensor.wrap(w0.clone())
        opt = cls([w], **hp)
        opt.step(grads=SparseGrad(torch.tensor([1, 4]), torch.randn(2, 3)))
        dense = w.to_dense()
        assert torch.equal(dense[[0, 2, 3, 5]], w0[[0, 2, 3, 5]])
        assert not torch.equal(dense[[1, 4]], w0[[1, 4]])
    assert opt.state[w]["z"].num_rows == 6


def test_accumulation_sums_micro_batches() -> None:
    g1 = SparseGrad(torch.tensor([0, 2]), torch.ones(2, 3))
    g2 = SparseGrad(torch.tensor([2, 3]), 2 * torch.ones(2, 3))
    a, b = PagedTensor.wrap(torch.zeros(4, 3)), PagedTensor.wrap(torch.zeros(4, 3))
    opt_a, opt_b = SparseAdagrad([a], lr=0.5), SparseAdagrad([b], lr=0.5)
    opt_a.accumulate(g1)
    opt_a.step(grads=g2)
    summed = SparseGrad(torch.tensor([0, 2, 3]), torch.tensor([[1.0] * 3, [3.0] * 3, [2.0] * 3]))
    opt_b.step(grads=summed)
    assert torch.equal(a.to_dense(), b.to_dense())
    # Duplicate rows in one gradient are summed too (the optimizer coalesces).
    c = PagedTensor.wrap(torch.zeros(4, 3))
    SparseAdagrad([c], lr=0.5).step(grads=SparseGrad(torch.tensor([2, 0, 2, 3, 2]), torch.tensor(
        [[1.0] * 3, [1.0] * 3, [1.0] * 3, [2.0] * 3, [1.0] * 3])))  # fmt: skip
    assert torch.equal(c.to_dense(), b.to_dense())


def test_nonfinite_raises_or_skips() -> None:
    w = PagedTensor.wrap(torch.ones(4, 2), name="emb")
    bad = SparseGrad(torch.tensor([1, 3]), torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
    opt = SparseSGD([w], lr=0.1)
    with pytest.raises(FloatingPointError, match=r"'emb' holds NaN or Inf \(row 3\)"):
        opt.step(grads=bad)
    assert torch.equal(w.to_dense(), torch.ones(4, 2))  # nothing half-updated
    skip = SparseSGD([w], lr=0.1, on_nonfinite="skip")
    skip.step(grads=bad)
    assert skip.skipped_steps == 1 and torch.equal(w.to_dense(), torch.ones(4, 2))


def test_empty_grad_and_bf16_weights() -> None:
    w = PagedTensor.wrap(torch.ones(4, 2))
    opt = SparseAdam([w], lr=0.1)
    opt.step(grads=SparseGrad(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2)))
    assert torch.equal(w.to_dense(), torch.ones(4, 2))
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(8, 4, generator=gen)
    g = torch.randn(8, 4, generator=gen)
    lo = PagedTensor.wrap(w0.to(torch.bfloat16))
    hi = PagedTensor.wrap(w0.to(torch.bfloat16).float())
    for t in (lo, hi):
        SparseAdam([t], lr=0.01).step(grads=SparseGrad(torch.arange(8), g))
    assert lo.dtype == torch.bfloat16
    # fp32 math on the bf16 rows, one rounding on the way back.
    assert torch.equal(lo.to_dense(), hi.to_dense().to(torch.bfloat16))


def test_state_dict_round_trip_and_scheduler() -> None:
    gen = torch.Generator().manual_seed(6)
    grads = [SparseGrad(torch.randperm(ROWS, generator=gen)[:4].sort().values,
                        torch.randn(4, DIM, generator=gen)) for _ in range(4)]  # fmt: skip
    w0 = torch.randn(ROWS, DIM, generator=gen)
    a = paged(w0)
    opt_a = SparseAdam([a], lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    for g in grads:
        opt_a.step(grads=g)
        sched.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.05 / 16)
    b = paged(w0)
    opt_b = SparseAdam([b], lr=0.05)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    for g in grads[:2]:
        opt_b.step(grads=g)
        sched_b.step()
    saved = opt_b.state_dict()
    json.dumps(saved["param_groups"])  # JSON-able hyper-parameters, no pickle needed
    assert all(isinstance(v, (int, PagedTensor)) for v in saved["state"][0].values())
    c = paged(b.to_dense())
    opt_c = SparseAdam([c], lr=1.0)
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[0]["lr"] == pytest.approx(0.05 / 4)
    for g in grads[2:]:
        opt_c.step(grads=g)
        opt_c.param_groups[0]["lr"] /= 2
    torch.testing.assert_close(c.to_dense(), a.to_dense())


def test_growing_parameter_and_reset_rows() -> None:
    w = PagedTensor(2, page_rows=4, name="grow")
    w.append_rows(3)
    opt = SparseAdagrad([w], lr=0.1, initial_accumulator_value=0.5)
    opt.step(grads=SparseGrad(torch.tensor([1]), torch.ones(1, 2)))
    w.append_rows(6)  # the table grew (new ids)
    opt.step(grads=SparseGrad(torch.tensor([7]), torch.ones(1, 2)))
    acc = opt.state[w]["sum"]
    assert acc.num_rows == 9
    assert acc.to_dense()[:, 0].tolist() == [0.5, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 0.5]
    opt.reset_rows(w, torch.tensor([1]))  # row 1 went to a new id after an eviction
    assert float(acc.to_dense()[1, 0]) == 0.5


def test_errors() -> None:
    w = PagedTensor.wrap(torch.zeros(4, 2), name="emb")
    v = PagedTensor.wrap(torch.zeros(4, 2), name="other")
    with pytest.raises(TypeError, match="wrap it in a list"):
        SparseSGD(w)
    with pytest.raises(ValueError, match="2-D fp32/bf16/fp16"):
        SparseSGD([torch.zeros(3)])
    with pytest.raises(ValueError, match="lr must be a float >= 0"):
        SparseAdam([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas must be two floats"):
        SparseAdam([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="step_count must be"):
        SparseAdam([w], step_count="row")
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        SparseAdam([w], on_nonfinite="ignore")
    with pytest.raises(ValueError, match="more than one place"):
        SparseSGD([w, w])
    opt = SparseSGD([w, v])
    g = SparseGrad(torch.tensor([1]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="needs exactly one parameter"):
        opt.step(grads=g)
    with pytest.raises(KeyError, match="not one of its parameters"):
        opt.step(grads={PagedTensor.wrap(torch.zeros(2, 2)): g})
    with pytest.raises(IndexError, match="'emb' has row 9, outside its 4 rows"):
        opt.step(grads={w: SparseGrad(torch.tensor([9]), torch.ones(1, 2))})
    with pytest.raises(ValueError, match="rows of width 3"):
        opt.step(grads={w: SparseGrad(torch.tensor([1]), torch.ones(1, 3))})
    dense = torch.nn.Parameter(torch.zeros(4, 2))
    dense.grad = torch.ones(4, 2)
    with pytest.raises(ValueError, match="has a dense gradient"):
        SparseAdam([dense]).step()


def test_deferred_checks_on_cpu_check_at_once() -> None:
    w = PagedTensor.wrap(torch.ones(4, 2), name="w")
    opt = SparseSGD([w], lr=1.0, deferred_checks=True)
    with pytest.raises(FloatingPointError, match="'w' holds NaN or Inf"):
        opt.step(grads=SparseGrad(torch.tensor([1]), torch.full((1, 2), float("nan"))))


@pytest.mark.gpu
def test_deferred_checks_raise_or_count_at_the_next_call() -> None:
    w = PagedTensor.wrap(torch.ones(4, 2, device="cuda"), name="w")
    bad = SparseGrad(
        torch.tensor([1], device="cuda"), torch.full((1, 2), float("inf"), device="cuda")
    )
    good = SparseGrad(torch.tensor([0], device="cuda"), torch.ones(1, 2, device="cuda"))
    opt = SparseAdam([w], lr=0.1, deferred_checks=True)
    opt.step(grads=good)
    after_first = w.to_dense().cpu()
    opt.step(grads=bad)  # returns without waiting; nothing of it is written
    # The next step is queued behind it, inherits its flag (writes nothing), then the
    # bad step's checks are read and raise.
    with pytest.raises(FloatingPointError, match="nor of the 1 step.s. queued after it"):
        opt.step(grads=good)
    assert opt.state[w]["step"] == 1 and torch.equal(w.to_dense().cpu(), after_first)
    opt.step(grads=good)  # training goes on after the error: the gate was cleared
    opt.flush_checks()
    assert opt.state[w]["step"] == 2 and not torch.equal(w.to_dense().cpu(), after_first)
    opt.step(grads=bad)
    with pytest.raises(FloatingPointError, match="nothing of that step was written"):
        opt.flush_checks()
    skip = SparseAdam([w], lr=0.1, deferred_checks=True, on_nonfinite="skip")
    skip.step(grads=bad)
    skip.step(grads=good)  # a skipped step does not hold the next one back
    assert skip.skipped_steps == 1 and skip.state[w]["step"] == 1
    oob = SparseGrad(torch.tensor([9], device="cuda"), torch.ones(1, 2, device="cuda"))
    skip.step(grads=oob)
    with pytest.raises(IndexError, match="row outside its parameter"):
        skip.flush_checks()
    assert torch.equal(w.to_dense()[1].cpu(), torch.ones(2))


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SparseSGD, SparseAdam])
def test_deferred_steps_match_checked_steps(cls) -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    w0 = torch.randn(500, 16, device="cuda", generator=gen)
    a, b = PagedTensor.wrap(w0.clone(), name="a"), PagedTensor.wrap(w0.clone(), name="b")
    kw = {"momentum": 0.9} if cls is SparseSGD else {}
    now = cls([a], lr=0.01, **kw)
    later = cls([b], lr=0.01, deferred_checks=True, on_nonfinite="skip", **kw)
    for i in range(6):
        rows = torch.randperm(500, device="cuda", generator=gen)[: 50 + i].sort().values
        g = torch.randn(rows.numel(), 16, device="cuda", generator=gen)
        if i == 3:
            g[0, 0] = float("nan")
        grad = SparseGrad(rows, g, is_coalesced=True)
        if i == 4:
            # Documented: the step right after a skipped deferred step was queued before
            # the skip was known, so it runs with the step count the skipped step gave it.
            now.state[a]["step"] += 1
        if i != 3:
            now.step(grads=grad)
        if i == 4:
            now.state[a]["step"] -= 1
        later.step(grads=grad)
    assert later.skipped_steps == 1 and later.state[b]["step"] == now.state[a]["step"] == 5
    torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=0, atol=0)


@pytest.mark.gpu
def test_a_bad_gradient_on_one_device_holds_back_the_other() -> None:
    cpu_w = PagedTensor.wrap(torch.ones(4, 2), name="cpu_w")
    gpu_w = PagedTensor.wrap(torch.ones(4, 2, device="cuda"), name="gpu_w")
    opt = SparseSGD([cpu_w, gpu_w], lr=1.0, on_nonfinite="skip")
    good = SparseGrad(torch.tensor([0], device="cuda"), torch.ones(1, 2, device="cuda"))
    bad = SparseGrad(torch.tensor([0]), torch.full((1, 2), float("nan")))
    opt.step(grads={cpu_w: bad, gpu_w: good})
    assert opt.skipped_steps == 1
    assert torch.equal(gpu_w.to_dense().cpu(), torch.ones(4, 2))
    opt.step(grads={cpu_w: SparseGrad(torch.tensor([1]), torch.ones(1, 2)), gpu_w: good})
    assert gpu_w.to_dense()[0].tolist() == [0.0, 0.0] and cpu_w.to_dense()[1].tolist() == [0.0, 0.0]


@pytest.mark.gpu
def test_a_deferred_step_from_an_embedding_gradient_never_waits_for_the_gpu() -> None:
    # The uncoalesced gradient is summed with its unique-row count left on the device.
    emb = torch.nn.Embedding(1000, 8, sparse=True).cuda()
    ref = torch.nn.Embedding.from_pretrained(emb.weight.detach().clone(), freeze=False,
                                             sparse=True)  # fmt: skip
    opt = SparseAdam(emb.parameters(), lr=0.01, deferred_checks=True)
    ref_opt = SparseAdam(ref.parameters(), lr=0.01)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for i in range(4):
        ids = torch.randint(0, 1000, (700,), device="cuda", generator=gen)
        emb(ids).square().sum().backward()
        ref(ids).square().sum().backward()
        if i >= 2:  # slots exist by now; the step must queue its work and return
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    opt.flush_checks()
    torch.testing.assert_close(emb.weight, ref.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_a_deferred_step_over_many_tables_never_waits_for_the_gpu() -> None:
    # One check and one update launch for all tables; their descriptors go up in a copy
    # from pinned memory, without a sync.
    gen = torch.Generator(device="cuda").manual_seed(8)
    w0 = [torch.randn(300, 16, device="cuda", generator=gen) for _ in range(3)]
    now = [PagedTensor.wrap(w.clone(), name=f"now{i}") for i, w in enumerate(w0)]
    later = [PagedTensor.wrap(w.clone(), name=f"later{i}") for i, w in enumerate(w0)]
    opt_now, opt_later = SparseAdam(now, lr=0.01), SparseAdam(later, lr=0.01, deferred_checks=True)
    for i in range(5):
        grads = []
        for _ in w0:
            rows = torch.randperm(300, device="cuda", generator=gen)[: 40 + i].sort().values
            grads.append(
                SparseGrad(
                    rows,
                    torch.randn(rows.numel(), 16, device="cuda", generator=gen),
                    is_coalesced=True,
                )
            )
        opt_now.step(grads=dict(zip(now, grads, strict=True)))
        if i >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt_later.step(grads=dict(zip(later, grads, strict=True)))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    opt_later.flush_checks()
    for a, b in zip(now, later, strict=True):
        torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=0, atol=0)


def test_deferred_steps_sum_duplicates_like_checked_steps() -> None:
    # deferred_checks sums an uncoalesced gradient without a host sync (padded, with the
    # unique-row count on the device); the result is the same, errors name the row.
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(50, 6, generator=gen)
    a, b = PagedTensor.wrap(w0.clone(), name="a"), PagedTensor.wrap(w0.clone(), name="b")
    now, later = SparseAdam([a], lr=0.01), SparseAdam([b], lr=0.01, deferred_checks=True)
    for n in (1, 80, 7):
        rows = torch.randint(0, 50, (n,), generator=gen)
        g = torch.randn(n, 6, generator=gen)
        now.step(grads=SparseGrad(rows, g))
        later.step(grads=SparseGrad(rows, g))
    later.flush_checks()
    torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=1e-6, atol=1e-7)
    with pytest.raises(IndexError, match="has row 99, outside its 50 rows"):
        later.step(grads=SparseGrad(torch.tensor([3, 99, 3]), torch.ones(3, 6)))
        later.flush_checks()
    bad = torch.ones(3, 6)
    bad[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"holds NaN or Inf|held NaN or Inf"):
        later.step(grads=SparseGrad(torch.tensor([3, 9, 3]), bad))
        later.flush_checks()
    torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=1e-6, atol=1e-7)
