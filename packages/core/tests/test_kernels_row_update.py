"""Core's row-update kernel against torch, with a tile function from the test data: the gate,
whole rows, paged and bf16 tables, empty / one-row / ragged sizes, and the checks."""

from __future__ import annotations

import pytest
import torch
from row_update_testdata import make_tables, make_update, run_updates, seed

from recstack.core import kernels
from recstack.core.kernels.row_update import apply_row_update, check_rows, new_gate


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows, dim", [(0, 4), (1, 1), (17, 5), (40, 130)])
def test_apply_row_update_matches_reference(device, per_row, dtype, n_rows, dim) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    s = seed(per_row, dtype, n_rows, dim)
    args = (device, s, dim, n_rows, n_rows + 9, dtype, per_row)
    w_ref, s_ref, _ = run_updates("torch", *args)
    w_got, s_got, launches = run_updates("triton", *args)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(w_got, w_ref, **tol)
    for a, b in zip(s_got, s_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert launches["row_update"] == (3 if n_rows else 0)


def test_set_gate_writes_nothing(device, backend) -> None:
    gen = torch.Generator().manual_seed(3)
    table, slots = make_tables(6, 20, torch.float32, device, gen, False)
    before = table.to_dense().clone()
    gate = new_gate(device)
    gate[1] = 1
    rows = torch.tensor([0, 5, 19], device=device)
    update = make_update(table, slots, False, 6)
    apply_row_update(update, table, rows, torch.ones(3, 6, device=device), gate)
    assert torch.equal(table.to_dense(), before)
    assert torch.all(slots[0].to_dense() == 0)


def test_gradient_shape_is_checked(device) -> None:
    gen = torch.Generator().manual_seed(4)
    table, slots = make_tables(6, 20, torch.float32, device, gen, False)
    with pytest.raises(ValueError, match="table 't' of width 6"):
        update = make_update(table, slots, False, 6)
        rows = torch.tensor([1], device=device)
        apply_row_update(update, table, rows, torch.ones(1, 5, device=device))


@pytest.mark.parametrize("n, dim", [(0, 3), (1, 1), (300, 70)])
def test_check_rows(device, backend, n, dim) -> None:
    gen = torch.Generator().manual_seed(seed(n, dim))
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


@pytest.mark.parametrize("n_real", [0, 1, 13])
def test_count_skips_the_padding(device, backend, n_real) -> None:
    # Rows past the device-side count hold -1 and NaN (padding): never checked or written.
    gen = torch.Generator().manual_seed(seed("count", n_real))
    table, slots = make_tables(5, 30, torch.float32, device, gen, True)
    ref_table, ref_slots = make_tables(5, 30, torch.float32, device, torch.Generator().manual_seed(
        seed("count", n_real)), True)  # fmt: skip
    real = torch.randperm(30, generator=gen)[:n_real].to(device)
    grad = torch.randn(n_real, 5, generator=gen).to(device)
    rows = torch.cat([real, torch.full((7,), -1, device=device, dtype=torch.int64)])
    padded = torch.cat([grad, torch.full((7, 5), float("nan"), device=device)])
    count = torch.tensor([n_real], device=device)
    gate = new_gate(device)
    check_rows(gate, padded, rows, 30, count)
    assert gate.tolist() == [0, 0]
    apply_row_update(make_update(table, slots, True, 5), table, rows, padded, gate, count)
    with kernels.use_backend("torch"):
        apply_row_update(make_update(ref_table, ref_slots, True, 5), ref_table, real, grad)
    torch.testing.assert_close(table.to_dense(), ref_table.to_dense(), rtol=1e-5, atol=1e-6)
    for a, b in zip(slots, ref_slots, strict=True):
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-5, atol=1e-6)
    # The count bounds the check, not the launch: a bad real row is still found.
    if n_real:
        rows[0] = 99
        check_rows(gate, padded, rows, 30, count)
        assert gate.tolist() == [1, 0]
