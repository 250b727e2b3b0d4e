"""The embedding engine and the sparse optimizers composed (neither imports the other),
unfused (backward, then step) and fused (the backward applies the step through core)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import KeyedJaggedTensor, RowUpdater, SparseGrad
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.sparse_optim import RowWiseAdagrad, SparseAdam, SparseFTRL, SparseSGD


def batch(ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        ["f"], torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64)
    )


def test_training_moves_rows_toward_targets() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05)
    ids = [3, 10**12, 7]
    target = torch.ones(3, 4)
    losses = []
    for _ in range(30):
        loss = ((ec(batch(ids))["f"] - target) ** 2).sum()
        loss.backward()
        opt.step(grads={values: ec.sparse_grads()["t"]})
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]


def test_rows_reused_after_eviction_get_fresh_optimizer_state() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, step_count="per_row")
    for _ in range(3):
        ec(batch([1, 2]))["f"].sum().backward()
        opt.step(grads={values: ec.sparse_grads()["t"]})
    row = int(ec.find_rows("t", torch.tensor([1]))[0])
    state = opt.state[values]
    assert float(state["row_step"].to_dense()[row, 0]) == 3.0
    assert ec.evict(min_count=10) == {"t": 2}
    ec(batch([99]))  # a new id takes a freed row
    new_row = int(ec.find_rows("t", torch.tensor([99]))[0])
    assert new_row in (0, 1)
    assert float(state["row_step"].to_dense()[new_row, 0]) == 0.0
    assert torch.all(state["exp_avg"].to_dense()[new_row] == 0)
    assert torch.all(state["exp_avg_sq"].to_dense()[new_row] == 0)


def test_rows_reused_by_an_import_get_fresh_optimizer_state_and_metadata() -> None:
    from recstack.embedding_engine.state import import_collection_chunk

    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, step_count="per_row")
    for _ in range(3):
        ec(batch([11, 22]))["f"].sum().backward()
        opt.step(grads={values: ec.sparse_grads()["t"]})
    freed = sorted(ec.find_rows("t", torch.tensor([11, 22])).tolist())
    assert ec.evict(min_count=10) == {"t": 2}
    step = ec.step
    imported = torch.randn(2, 4)
    assert import_collection_chunk(ec, "t", torch.tensor([44, 55]), {"values": imported}) == 2
    rows = ec.find_rows("t", torch.tensor([44, 55]))
    assert sorted(rows.tolist()) == freed  # the import reused the evicted ids' rows
    state = opt.state[values]
    for slot in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.all(state[slot].to_dense()[rows] == 0), slot
    meta = ec.physical_tables["t"].meta
    assert meta.counts[rows].tolist() == [0, 0]
    assert meta.last_seen[rows].tolist() == [step, step]
    assert torch.equal(values.to_dense()[rows], imported)
    # The fresh state trains exactly as a never-seen id's would.
    ec(batch([44]))["f"].sum().backward()
    opt.step(grads={values: ec.sparse_grads()["t"]})
    assert float(state["row_step"].to_dense()[rows[0], 0]) == 1.0


def _train(fused: bool, make_opt, steps: int = 4):
    ec = EmbeddingCollection([TableConfig("t", dim=5)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = make_opt(values)
    if fused:
        ec.fuse_optimizer(opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, 9, (12,), generator=gen).tolist()
        (ec(batch(ids))["f"] ** 2).sum().backward()
        if not fused:
            opt.step(grads={values: ec.sparse_grads()["t"]})
    return values.to_dense(), {k: v for k, v in opt.state[values].items()}


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda v: SparseAdam([v], lr=0.05),
        lambda v: SparseAdam([v], lr=0.05, step_count="per_row", tf_compat=True),
        lambda v: RowWiseAdagrad([v], lr=0.1),
        lambda v: SparseFTRL([v], lr=0.1, l1=0.01),
        lambda v: SparseSGD([v], lr=0.1, momentum=0.9),
    ],
    ids=["adam", "adam-per-row-tf", "rowwise-adagrad", "ftrl", "sgd-momentum"],
)
def test_fused_backward_equals_backward_then_step(make_opt) -> None:
    w_fused, s_fused = _train(True, make_opt)
    w_plain, s_plain = _train(False, make_opt)
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-5, atol=1e-6)
    assert s_fused["step"] == s_plain["step"] == 4
    for k, v in s_plain.items():
        if k != "step":
            torch.testing.assert_close(s_fused[k].to_dense(), v.to_dense(), rtol=1e-5, atol=1e-6)


def test_fused_backward_nonfinite_policy() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, on_nonfinite="skip")
    ec.fuse_optimizer(opt)
    (ec(batch([1, 2]))["f"].sum() * float("nan")).backward()
    assert opt.skipped_steps == 1 and opt.state[values]["step"] == 0
    opt.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="'t' holds NaN or Inf; nothing was updated"):
        (ec(batch([1, 2]))["f"].sum() * float("inf")).backward()
    # Gradients accumulated for step() cannot be mixed into a fused update.
    opt.accumulate({values: SparseGrad(torch.tensor([0]), torch.ones(1, 4))})
    with pytest.raises(RuntimeError, match="accumulate\\(\\) and the fused mode do not mix"):
        ec(batch([1]))["f"].sum().backward()


def test_sparse_optimizers_speak_the_row_updater_protocol() -> None:
    assert isinstance(SparseAdam([torch.zeros(3, 2)], lr=0.1), RowUpdater)


def test_fused_backward_with_deferred_checks_on_cpu_checks_at_once() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    opt = SparseAdam([ec.physical_tables["t"].values], lr=0.05, deferred_checks=True)
    ec.fuse_optimizer(opt)
    with pytest.raises(FloatingPointError, match="'t' holds NaN or Inf; nothing was updated"):
        (ec(batch([1, 2]))["f"].sum() * float("nan")).backward()


def _gpu_collection() -> EmbeddingCollection:
    return EmbeddingCollection(
        [TableConfig("t", dim=8, fixed_size=64), TableConfig("u", dim=4)],
        [FeatureConfig("f", "t"), FeatureConfig("g", "u")],
        device="cuda",
    )


def _gpu_batch(gen: torch.Generator) -> KeyedJaggedTensor:
    ids = torch.randint(0, 64, (2 * 40,), device="cuda", generator=gen)
    return KeyedJaggedTensor(
        ["f", "g"], ids, lengths=torch.full((2 * 8,), 5, dtype=torch.int64, device="cuda")
    )


def _gpu_loss(ec: EmbeddingCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    out = ec(kjt)
    return (out["f"] ** 2).sum() + (out["g"] ** 3).sum()


@pytest.mark.gpu
def test_a_deferred_fused_backward_matches_checked_and_never_waits_for_the_gpu() -> None:
    ec_now, ec_later = _gpu_collection(), _gpu_collection()
    tables = [ec.physical_tables[t].values for ec in (ec_now, ec_later) for t in ("t", "u")]
    now = SparseAdam(tables[:2], lr=0.01)
    later = SparseAdam(tables[2:], lr=0.01, deferred_checks=True)
    ec_now.fuse_optimizer(now)
    ec_later.fuse_optimizer(later)
    gen = torch.Generator(device="cuda").manual_seed(21)
    for i in range(5):
        kjt = _gpu_batch(gen)
        _gpu_loss(ec_now, kjt).backward()
        loss = _gpu_loss(ec_later, kjt)
        if i >= 2:  # state exists by now: the backward queues its updates and returns
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    later.flush_checks()
    for a, b in zip(tables[:2], tables[2:], strict=True):
        torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=0, atol=0)
        assert later.state[b]["step"] == now.state[a]["step"] == 5
        for slot in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                later.state[b][slot].to_dense(), now.state[a][slot].to_dense(), rtol=0, atol=0
            )


@pytest.mark.gpu
def test_a_bad_deferred_fused_step_is_reported_later_and_writes_nothing() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=4, fixed_size=16)], [FeatureConfig("f", "t")],
                             device="cuda")  # fmt: skip
    values = ec.physical_tables["t"].values
    opt = SparseAdam([values], lr=0.05, deferred_checks=True)
    ec.fuse_optimizer(opt)
    ids = KeyedJaggedTensor(["f"], torch.tensor([1, 2, 3], device="cuda"),
                            lengths=torch.ones(3, dtype=torch.int64, device="cuda"))  # fmt: skip
    ec(ids)["f"].sum().backward()
    opt.flush_checks()
    after_first = values.to_dense().clone()
    (ec(ids)["f"].sum() * float("nan")).backward()  # returns; its update wrote nothing
    # The next backward's update is queued behind it, inherits its flag, then the bad
    # step's checks are read (one backward's steps stay unread) and raise.
    with pytest.raises(FloatingPointError, match="nor of the 1 step.s. queued after it"):
        ec(ids)["f"].sum().backward()
    assert opt.state[values]["step"] == 1 and torch.equal(values.to_dense(), after_first)
    ec(ids)["f"].sum().backward()
    opt.flush_checks()
    assert opt.state[values]["step"] == 2 and not torch.equal(values.to_dense(), after_first)
    opt.on_nonfinite = "skip"
    (ec(ids)["f"].sum() * float("inf")).backward()
    ec(ids)["f"].sum().backward()  # a skipped step does not hold the next one back
    assert opt.skipped_steps == 1 and opt.state[values]["step"] == 3
