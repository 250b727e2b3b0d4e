"""Many tables' row updates in one launch per class against a launch each: ragged sizes,
padded gradients, a bad table holding back the whole step, and the argument checks."""

from __future__ import annotations

import pytest
import torch
from row_update_testdata import make_tables, make_update

from recstack.core import kernels
from recstack.core.kernels.row_update import apply_row_update, new_gate
from recstack.core.kernels.row_update_many import RowJob, check_and_apply_row_updates

# sizes, an empty table, two widths, a bf16 weight, per-row state, padded gradients.
_MANY = [(5, torch.float32, False, 37, 0), (5, torch.float32, False, 1, 0),
         (5, torch.float32, False, 0, 0), (5, torch.bfloat16, False, 20, 0),
         (130, torch.float32, False, 40, 0), (5, torch.float32, True, 25, 7),
         (5, torch.float32, False, 12, 5)]  # fmt: skip


def _many_jobs(device, seed_: int, bad: tuple[int, str] | None = None):
    gen = torch.Generator().manual_seed(seed_)
    jobs, real = [], []
    for i, (dim, dtype, per_row, n, pad) in enumerate(_MANY):
        table, slots = make_tables(dim, 60, dtype, device, gen, per_row)
        rows = torch.randperm(60, generator=gen)[:n].to(device)
        grad = torch.randn(n, dim, generator=gen).to(device)
        if bad is not None and bad[0] == i:
            if bad[1] == "nan":
                grad[n // 2, 0] = float("nan")
            else:
                rows[0] = 60
        real.append((rows, grad))
        count = None
        if pad:
            rows = torch.cat([rows, torch.full((pad,), -1, dtype=torch.int64, device=device)])
            grad = torch.cat([grad, torch.full((pad, dim), float("nan"), device=device)])
            count = torch.tensor([n], device=device)
        if i == 0:  # a strided gradient and int32 rows are taken as they come
            wide = torch.zeros(grad.shape[0], dim + 3, device=device)
            wide[:, :dim] = grad
            grad, rows = wide[:, :dim], rows.to(torch.int32)
        update = make_update(table, slots, per_row, dim)
        jobs.append(RowJob(update, table, rows, grad, 60, count))
    return jobs, real


def _state(jobs) -> list[torch.Tensor]:
    out = []
    for j in jobs:
        out.append(j.table.to_dense().float().cpu())
        out += [s.to_dense().cpu() for s in j.update.slots]
    return out


def test_many_tables_in_one_launch_match_a_launch_each(device, backend) -> None:
    jobs, _ = _many_jobs(device, 11)
    ref_jobs, real = _many_jobs(device, 11)
    gate = new_gate(device)
    with kernels.count_launches() as launches:
        for _ in range(2):
            check_and_apply_row_updates(jobs, gate)
    assert gate.tolist() == [0, 0]
    with kernels.use_backend("torch"):
        for _ in range(2):
            for j, (rows, grad) in zip(ref_jobs, real, strict=True):
                apply_row_update(j.update, j.table, rows, grad)
    for got, want in zip(_state(jobs), _state(ref_jobs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if backend == "triton":
        # Classes: the fp32 width-5 momentum tables, bf16, width 130, per-row state.
        assert launches["row_update_many"] == launches["check_rows_many"] == 2 * 4
        assert launches["row_update"] == launches["check_rows"] == 0


@pytest.mark.parametrize("bad", [(1, "nan"), (4, "row"), (5, "nan")])
def test_a_bad_table_holds_back_every_table_of_the_step(device, backend, bad) -> None:
    jobs, _ = _many_jobs(device, 12, bad)
    before = _state(jobs)
    gate = new_gate(device)
    check_and_apply_row_updates(jobs, gate)
    assert gate.tolist() == ([0, 1] if bad[1] == "nan" else [1, 0])
    for got, want in zip(_state(jobs), before, strict=True):
        assert torch.equal(got, want)


def test_many_tables_check_their_arguments(device) -> None:
    jobs, _ = _many_jobs(device, 13)
    j = jobs[0]
    with pytest.raises(ValueError, match="table 't' of width 5"):
        check_and_apply_row_updates([j._replace(grad=j.grad[:, :4])], new_gate(device))
    with pytest.raises(ValueError, match="a table is in more than one job"):
        check_and_apply_row_updates([j, j], new_gate(device))
    check_and_apply_row_updates([], new_gate(device))  # nothing to do
