"""Core's row-update kernels against torch, with a tile function defined here: the gate,
whole rows, paged and bf16 tables, empty / one-row / ragged sizes, and the checks."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import PagedTensor, RowUpdate, RowUpdater, kernels
from recstack.core.kernels.row_update import apply_row_update, check_rows, new_gate
from recstack.core.kernels.row_update_many import RowJob, check_and_apply_row_updates

if kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(
        w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
        VARIANT: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
    ):  # fmt: skip
        # Momentum SGD (slot 0) plus, for VARIANT 1, a per-row count and the row's mean g.
        a0 = s0[:, None] + cols[None, :]
        buf = p1 * tl.load(a0, mask=mask, other=0.0) + g
        tl.store(a0, buf, mask=mask)
        w = w - lr * buf
        if VARIANT == 1:
            cnt = tl.load(s1, mask=row_ok, other=0.0) + 1.0
            tl.debug_barrier()  # every thread holding a row's count reads it before a store
            tl.store(s1, cnt, mask=row_ok)
            mean = tl.sum(tl.where(mask, g, 0.0), axis=1) / p2
            w = w - (p3 * mean * cnt)[:, None]
        return w
else:
    _tile = None


def _reference_update(
    table: PagedTensor, slots: list[PagedTensor], lr: float, momentum: float, scale: float,
    per_row: bool,
):  # fmt: skip
    def apply(rows: torch.Tensor, grad: torch.Tensor) -> None:
        w = table.gather_rows(rows).to(torch.float32)
        buf = momentum * slots[0].gather_rows(rows) + grad
        w = w - lr * buf
        slots[0].scatter_rows(rows, buf)
        if per_row:
            cnt = slots[1].gather_rows(rows) + 1
            slots[1].scatter_rows(rows, cnt)
            w = w - scale * grad.mean(dim=1, keepdim=True) * cnt
        table.scatter_rows(rows, w)

    return apply


def _make(dim: int, rows: int, dtype: torch.dtype, device: torch.device, gen, per_row: bool):
    table = PagedTensor(dim, dtype, device, page_rows=8, name="t")
    table.append_rows(rows)
    table.scatter_rows(
        torch.arange(rows, device=device), torch.randn(rows, dim, generator=gen).to(device)
    )
    slots = [PagedTensor(dim, torch.float32, device, page_rows=8, name="t.m")]
    slots[0].append_rows(rows)
    if per_row:
        slots.append(PagedTensor(1, torch.float32, device, page_rows=8, name="t.n"))
        slots[1].append_rows(rows)
    for s in slots:
        s.scatter_rows(torch.arange(rows, device=device), torch.zeros(rows, s.dim, device=device))
    return table, slots


def _update(table, slots, per_row: bool, dim: int) -> RowUpdate:
    return RowUpdate(
        name="test",
        tile_fn=_tile,
        reference=_reference_update(table, slots, 0.1, 0.9, 0.5, per_row),
        lr=0.1,
        params=(0.9, float(dim), 0.5),
        variant=int(per_row),
        slots=tuple(slots),
        whole_rows=per_row,
    )


def _run(backend: str, device, seed_, dim, n_rows, table_rows, dtype, per_row, steps=3):
    gen = torch.Generator().manual_seed(seed_)
    table, slots = _make(dim, table_rows, dtype, device, gen, per_row)
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        for _ in range(steps):
            rows = torch.randperm(table_rows, generator=gen)[:n_rows].to(device)
            grad = torch.randn(n_rows, dim, generator=gen).to(device)
            apply_row_update(_update(table, slots, per_row, dim), table, rows, grad)
    return table.to_dense().float().cpu(), [s.to_dense().cpu() for s in slots], launches


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows, dim", [(0, 4), (1, 1), (17, 5), (40, 130)])
def test_apply_row_update_matches_reference(device, per_row, dtype, n_rows, dim) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    s = _seed(per_row, dtype, n_rows, dim)
    w_ref, s_ref, _ = _run("torch", device, s, dim, n_rows, n_rows + 9, dtype, per_row)
    w_got, s_got, launches = _run("triton", device, s, dim, n_rows, n_rows + 9, dtype, per_row)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(w_got, w_ref, **tol)
    for a, b in zip(s_got, s_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert launches["row_update"] == (3 if n_rows else 0)


def test_set_gate_writes_nothing(device, backend) -> None:
    gen = torch.Generator().manual_seed(3)
    table, slots = _make(6, 20, torch.float32, device, gen, False)
    before = table.to_dense().clone()
    gate = new_gate(device)
    gate[1] = 1
    rows = torch.tensor([0, 5, 19], device=device)
    apply_row_update(_update(table, slots, False, 6), table, rows, torch.ones(3, 6, device=device),
                     gate)  # fmt: skip
    assert torch.equal(table.to_dense(), before)
    assert torch.all(slots[0].to_dense() == 0)


def test_gradient_shape_is_checked(device) -> None:
    gen = torch.Generator().manual_seed(4)
    table, slots = _make(6, 20, torch.float32, device, gen, False)
    with pytest.raises(ValueError, match="table 't' of width 6"):
        apply_row_update(_update(table, slots, False, 6), table, torch.tensor([1], device=device),
                         torch.ones(1, 5, device=device))  # fmt: skip


@pytest.mark.parametrize("n, dim", [(0, 3), (1, 1), (300, 70)])
def test_check_rows(device, backend, n, dim) -> None:
    gen = torch.Generator().manual_seed(_seed(n, dim))
    values = torch.randn(n, dim, generator=gen).to(device)
    rows = torch.randint(0, 50, (n,), generator=gen).to(device)
    gate = new_gate(device)
    check_rows(gate, values, rows, 50)
    assert gate.tolist() == [0, 0]
    if not n:
        return
    for bad_row, bad_value, expect in ((50, 0.0, [1, 0]), (-1, float("inf"), [1, 1]),
                                       (7, float("nan"), [0, 1])):  # fmt: skip
        r, v = rows.clone(), values.clone()
        r[n // 2] = bad_row
        v[n - 1, dim - 1] = bad_value
        gate = new_gate(device)
        check_rows(gate, v, r, 50)
        assert gate.tolist() == expect, (bad_row, bad_value)
    # A dense 3-D gradient (no rows) and a gate that stays set once set.
    dense = torch.randn(4, 3, dim, generator=gen).to(device)
    dense[2, 1, 0] = float("-inf")
    gate = new_gate(device)
    check_rows(gate, dense)
    check_rows(gate, values)
    assert gate.tolist() == [0, 1]


def test_row_update_validates_its_fields() -> None:
    table = PagedTensor(2, torch.float32, "cpu", name="t")
    with pytest.raises(ValueError, match="at most 6 params"):
        RowUpdate("x", None, lambda r, g: None, 0.1, params=(0.0,) * 7)
    half = PagedTensor(2, torch.float16, "cpu", name="h")
    with pytest.raises(ValueError, match="slot 'h' is torch.float16"):
        RowUpdate("x", None, lambda r, g: None, 0.1, slots=(table, half))
    with pytest.raises(ValueError, match="gate must be an int32 tensor of shape"):
        RowUpdate("x", None, lambda r, g: None, 0.1, gate=torch.zeros(2))
    assert RowUpdate("x", None, lambda r, g: None, 0.1, gate=new_gate("cpu")).gate is not None


def test_row_updater_protocol_is_runtime_checkable() -> None:
    class Updater:
        def begin_row_update(self, table):
            return None

        def end_row_update(self, table, *, gate):
            return None

    assert isinstance(Updater(), RowUpdater)
    assert not isinstance(object(), RowUpdater)


@pytest.mark.parametrize("n_real", [0, 1, 13])
def test_count_skips_the_padding(device, backend, n_real) -> None:
    # Rows past the device-side count hold -1 and NaN (padding): never checked or written.
    gen = torch.Generator().manual_seed(_seed("count", n_real))
    table, slots = _make(5, 30, torch.float32, device, gen, True)
    ref_table, ref_slots = _make(5, 30, torch.float32, device, torch.Generator().manual_seed(
        _seed("count", n_real)), True)  # fmt: skip
    real = torch.randperm(30, generator=gen)[:n_real].to(device)
    grad = torch.randn(n_real, 5, generator=gen).to(device)
    rows = torch.cat([real, torch.full((7,), -1, device=device, dtype=torch.int64)])
    padded = torch.cat([grad, torch.full((7, 5), float("nan"), device=device)])
    count = torch.tensor([n_real], device=device)
    gate = new_gate(device)
    check_rows(gate, padded, rows, 30, count)
    assert gate.tolist() == [0, 0]
    apply_row_update(_update(table, slots, True, 5), table, rows, padded, gate, count)
    with kernels.use_backend("torch"):
        apply_row_update(_update(ref_table, ref_slots, True, 5), ref_table, real, grad)
    torch.testing.assert_close(table.to_dense(), ref_table.to_dense(), rtol=1e-5, atol=1e-6)
    for a, b in zip(slots, ref_slots, strict=True):
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-5, atol=1e-6)
    # The count bounds the check, not the launch: a bad real row is still found.
    if n_real:
        rows[0] = 99
        check_rows(gate, padded, rows, 30, count)
        assert gate.tolist() == [1, 0]


# (dim, dtype, per_row, real rows, padding rows) of each table of a grouped step: ragged
# sizes, an empty table, two widths, a bf16 weight, per-row state, padded gradients.
_MANY = [(5, torch.float32, False, 37, 0), (5, torch.float32, False, 1, 0),
         (5, torch.float32, False, 0, 0), (5, torch.bfloat16, False, 20, 0),
         (130, torch.float32, False, 40, 0), (5, torch.float32, True, 25, 7),
         (5, torch.float32, False, 12, 5)]  # fmt: skip


def _many_jobs(device, seed_: int, bad: tuple[int, str] | None = None):
    gen = torch.Generator().manual_seed(seed_)
    jobs, real = [], []
    for i, (dim, dtype, per_row, n, pad) in enumerate(_MANY):
        table, slots = _make(dim, 60, dtype, device, gen, per_row)
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
        update = _update(table, slots, per_row, dim)
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
