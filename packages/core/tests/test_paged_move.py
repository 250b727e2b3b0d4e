"""PagedTensor.move_to_: in-place device moves that keep the object, rows and companions."""

from __future__ import annotations

import pytest
import torch

from recstack.core.paged import PagedTensor


def _table(device: torch.device | str = "cpu", rows: int = 5) -> PagedTensor:
    t = PagedTensor(3, device=device, page_rows=4, name="emb")
    t.append_rows(rows)
    t.scatter_rows(torch.arange(rows, device=t.device), torch.randn(rows, 3, device=t.device))
    return t


def test_move_to_same_device_changes_nothing() -> None:
    t = _table()
    pages, table = t.pages, t.page_table
    assert t.move_to_("cpu") is t
    assert t.pages == pages and t.page_table is table


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_move_to_keeps_rows_and_companions(rows: int) -> None:
    t = _table(rows=rows)
    slot = PagedTensor(1, page_rows=4, name="emb.acc")
    t.add_companion("acc", slot, init=0.5)
    seen: list[list[int]] = []
    t.on_rows_reset(lambda r: seen.append(r.tolist()))
    before, before_slot = t.to_dense(), slot.to_dense()
    # A CPU-only host has no second device: mark the stores as elsewhere so the move runs
    # its copy-and-swap path (test_move_to_cuda_and_back moves for real).
    t._device = slot._device = torch.device("meta")
    assert t.move_to_("cpu") is t
    assert t.device == slot.device == torch.device("cpu")
    assert torch.equal(t.to_dense(), before) and torch.equal(slot.to_dense(), before_slot)
    assert t.page_table.tolist() == [p.data_ptr() for p in t.pages]
    assert t.companions["acc"].store is slot and slot.companion_of is t
    t.append_rows(2)  # the companion still grows with its table
    assert slot.num_rows == t.num_rows == rows + 2
    t.rows_reset(torch.tensor([0]))
    assert seen == [[0]] and slot.gather_rows(torch.tensor([0])).tolist() == [[0.5]]


def test_move_to_refuses_companions_and_wrapped_views() -> None:
    t = _table()
    slot = PagedTensor(3, page_rows=4, name="emb.m")
    t.add_companion("m", slot)
    with pytest.raises(ValueError, match="companion of table 'emb'"):
        slot.move_to_("cpu")
    w = PagedTensor.wrap(torch.zeros(2, 2), name="w")
    with pytest.raises(ValueError, match="'w' wraps"):
        w.move_to_("cpu")
    t.add_companion("wrapped", PagedTensor.wrap(torch.zeros(t.num_rows, 1), name="emb.w"))
    with pytest.raises(ValueError, match="'emb.w' wraps"):
        t.move_to_("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_move_to_cuda_and_back() -> None:
    t = _table(rows=9)
    slot = PagedTensor(3, page_rows=4, name="emb.m")
    t.add_companion("m", slot, init=1.0)
    before = t.to_dense()
    t.move_to_("cuda")
    assert t.device.type == slot.device.type == "cuda" and t.page_table.device == t.device
    rows = torch.tensor([8, 0, 3], device=t.device)
    assert torch.equal(t.gather_rows(rows).cpu(), before[[8, 0, 3]])
    assert slot.gather_rows(rows).cpu().eq(1.0).all()
    t.move_to_("cpu")
    assert t.device == slot.device == torch.device("cpu")
    assert torch.equal(t.to_dense(), before)
