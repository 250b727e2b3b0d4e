"""PagedTensor API: construction, growth without moves, wrap, like, errors, device moves."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels
from recstack.core.paged import PagedTensor


def test_construction_and_properties(device):
    t = PagedTensor(5, dtype=torch.bfloat16, device=device, page_rows=8, capacity=20, name="emb")
    assert (t.dim, t.dtype, t.name, t.page_rows) == (5, torch.bfloat16, "emb", 8)
    assert t.device.type == device.type
    assert t.num_rows == len(t) == 0
    assert t.num_pages == 3 and t.capacity == 24
    assert all(p.shape == (8, 5) and p.dtype == torch.bfloat16 for p in t.pages)
    assert t.page_table.dtype == torch.int64 and t.page_table.device == t.device
    assert t.page_table.tolist() == [p.data_ptr() for p in t.pages]
    assert (t.page_shift, t.page_mask) == (3, 7)
    assert not t.is_wrapped
    r = repr(t)
    assert "emb" in r and "num_rows=0" in r and "page_rows=8" in r


@pytest.mark.parametrize("page_rows", [0, 3, 6, -4, 1.0, True])
def test_page_rows_must_be_power_of_two(page_rows):
    with pytest.raises(ValueError, match="power of two"):
        PagedTensor(4, page_rows=page_rows, name="bad_pages")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int8])
def test_unsupported_dtype_names_table(dtype):
    with pytest.raises(TypeError, match="my_table"):
        PagedTensor(4, dtype=dtype, name="my_table")
    with pytest.raises(TypeError, match="wrapped_t"):
        PagedTensor.wrap(torch.zeros(3, 4, dtype=dtype), name="wrapped_t")


@pytest.mark.parametrize("dim", [0, -1, 2.5])
def test_dim_must_be_positive(dim):
    with pytest.raises(ValueError, match="dim"):
        PagedTensor(dim, name="t")


def test_append_rows_grows_without_moving(device):
    t = PagedTensor(3, device=device, page_rows=4, name="grow")
    ids = t.append_rows(6, fill=2.5)
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(6))
    assert t.num_pages == 2
    ptrs = [p.data_ptr() for p in t.pages]
    table_before = t.page_table
    snapshot = t.to_dense().clone()
    assert torch.equal(snapshot, torch.full((6, 3), 2.5, device=t.device))

    ids = t.append_rows(1)  # fits in the existing page: page table untouched
    assert ids.tolist() == [6]
    assert t.page_table is table_before

    ids = t.append_rows(9, fill=None)  # crosses into 3 new pages
    assert ids.tolist() == list(range(7, 16))
    assert t.num_rows == 16 and t.num_pages == 4
    assert [p.data_ptr() for p in t.pages[:2]] == ptrs
    assert t.page_table is not table_before
    assert t.page_table.tolist() == [p.data_ptr() for p in t.pages]
    dense = t.to_dense()
    assert torch.equal(dense[:6], snapshot)
    assert torch.equal(dense[6:], torch.zeros(10, 3, device=t.device))
    assert t.append_rows(0).numel() == 0


def test_unused_capacity_is_zero(device):
    t = PagedTensor(2, device=device, page_rows=8, name="z")
    t.append_rows(3, fill=7.0)
    assert torch.equal(t.pages[0][3:], torch.zeros(5, 2, device=t.device))


def test_ensure_rows_and_like(device):
    t = PagedTensor(4, dtype=torch.float16, device=device, page_rows=8, name="emb")
    t.append_rows(11, fill=1.0)
    t.ensure_rows(5)
    assert t.num_rows == 11
    t.ensure_rows(13, fill=3.0)
    assert t.num_rows == 13
    assert torch.equal(t.to_dense()[11:].float(), torch.full((2, 4), 3.0, device=t.device))

    m = PagedTensor.like(t, dtype=torch.float32, name="emb.adam_m")
    assert (m.num_rows, m.page_rows, m.dim, m.dtype, m.name) == (
        13,
        8,
        4,
        torch.float32,
        "emb.adam_m",
    )
    assert torch.equal(m.to_dense(), torch.zeros(13, 4, device=t.device))
    acc = PagedTensor.like(t, dim=1, name="emb.rowwise")
    assert (acc.dim, acc.dtype, acc.num_rows) == (1, torch.float16, 13)

    w = PagedTensor.wrap(torch.ones(6, 3, device=device), name="w")
    wl = PagedTensor.like(w)
    assert wl.is_wrapped and wl.num_rows == 6 and wl.name == "w.like"
    assert torch.equal(wl.to_dense(), torch.zeros(6, 3, device=t.device))


def test_wrap_writes_through_and_is_fixed(device, backend):
    base = torch.arange(12, dtype=torch.float32, device=device).view(4, 3)
    w = PagedTensor.wrap(base, name="dense_w")
    assert w.is_wrapped and w.num_rows == 4 and w.capacity == 4 and w.num_pages == 1
    assert w.pages[0].data_ptr() == base.data_ptr()
    assert w.page_shift == 62
    w.scatter_rows(torch.tensor([2], device=device), torch.full((1, 3), -1.0, device=device))
    assert base[2].tolist() == [-1.0, -1.0, -1.0]
    assert torch.equal(w.gather_rows(torch.tensor([3, 0], device=device)), base[[3, 0]])
    w.fill_(5.0)
    assert bool((base == 5.0).all())
    with pytest.raises(ValueError, match="dense_w"):
        w.append_rows(1)
    with pytest.raises(ValueError, match="contiguous"):
        PagedTensor.wrap(base.t(), name="tr")
    with pytest.raises(ValueError, match="2-D"):
        PagedTensor.wrap(base.flatten(), name="flat")


def test_wrap_empty(device):
    w = PagedTensor.wrap(torch.zeros(0, 3, device=device), name="empty")
    assert w.num_rows == 0 and w.to_dense().shape == (0, 3)
    assert w.gather_rows(torch.zeros(0, dtype=torch.int64, device=device)).shape == (0, 3)


def test_to_dense_and_fill(device):
    t = PagedTensor(2, device=device, page_rows=2, name="d")
    assert t.to_dense().shape == (0, 2)
    t.append_rows(5)
    t.fill_(4.0)
    assert torch.equal(t.to_dense(), torch.full((5, 2), 4.0, device=t.device))
    assert torch.equal(t.pages[2][1:], torch.zeros(1, 2, device=t.device))  # unused row
    d = t.to_dense()
    d.zero_()
    assert t.to_dense()[0, 0].item() == 4.0  # to_dense is a copy


def test_bounds_errors_name_table_and_row(device, backend):
    t = PagedTensor(3, device=device, page_rows=4, name="users")
    t.append_rows(10)
    for bad in (10, -1, 1 << 40):
        rows = torch.tensor([0, bad, 2], device=device)
        with pytest.raises(IndexError, match=rf"users.*row {bad}.*\[0, 10\)"):
            t.gather_rows(rows)
        with pytest.raises(IndexError, match="users"):
            t.scatter_rows(rows, torch.zeros(3, 3, device=device))
        with pytest.raises(IndexError, match="users"):
            t.scatter_rows(rows, torch.zeros(3, 3, device=device), reduce="add")


def test_argument_errors(device):
    t = PagedTensor(3, device=device, page_rows=4, name="items")
    t.append_rows(4)
    rows = torch.tensor([0, 1], device=device)
    with pytest.raises(TypeError, match="items.*integer"):
        t.gather_rows(rows.float())
    with pytest.raises(TypeError, match="items.*integer"):
        t.gather_rows(rows.bool())
    with pytest.raises(ValueError, match="items.*1-D"):
        t.gather_rows(rows.view(1, 2))
    with pytest.raises(ValueError, match="items.*shape"):
        t.scatter_rows(rows, torch.zeros(2, 4, device=device))
    with pytest.raises(TypeError, match="items.*float"):
        t.scatter_rows(rows, torch.zeros(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="items.*reduce"):
        t.scatter_rows(rows, torch.zeros(2, 3, device=device), reduce="max")
    with pytest.raises(ValueError, match="items.*out"):
        t.gather_rows(rows, out=torch.empty(3, 3, device=device))
    with pytest.raises(TypeError, match="items.*out"):
        t.gather_rows(rows, out=torch.empty(2, 3, dtype=torch.float16, device=device))
    if device.type == "cuda":
        with pytest.raises(ValueError, match="items.*device"):
            t.gather_rows(rows.cpu())


def test_empty_rows_launch_nothing(device, backend):
    t = PagedTensor(3, device=device, page_rows=4, name="e")
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    with kernels.count_launches() as launches:
        out = t.gather_rows(empty)  # valid even on an empty table
        t.scatter_rows(empty, torch.zeros(0, 3, device=device))
        t.scatter_rows(empty, torch.zeros(0, 3, device=device), reduce="add")
    assert out.shape == (0, 3) and out.dtype == torch.float32
    assert sum(launches.values()) == 0


def test_rows_reset_calls_every_listener_in_order() -> None:
    t = PagedTensor(dim=2, page_rows=4, name="emb")
    t.append_rows(6)
    seen: list[tuple[str, list[int]]] = []
    t.on_rows_reset(lambda rows: seen.append(("a", rows.tolist())))
    t.on_rows_reset(lambda rows: seen.append(("b", rows.tolist())))
    t.rows_reset(torch.tensor([5, 1]))
    t.rows_reset(torch.zeros(0, dtype=torch.int64))  # nothing to announce
    assert seen == [("a", [5, 1]), ("b", [5, 1])]
    with pytest.raises(TypeError, match="'emb': on_rows_reset takes a callable"):
        t.on_rows_reset(3)  # type: ignore[arg-type]
    wrapped = PagedTensor.wrap(torch.zeros(3, 2))
    wrapped.rows_reset(torch.tensor([0]))  # no listeners: a no-op


# ------------------------------------------------------------------------------ companions


def test_companions_grow_and_reset_with_their_table() -> None:
    t = PagedTensor(4, page_rows=4, name="emb")
    t.append_rows(3)
    m = PagedTensor(4, page_rows=4, name="emb.m")
    v = PagedTensor(1, page_rows=4, name="emb.v")
    t.add_companion("m", m)
    t.add_companion("v", v, init=0.5)
    assert (m.num_rows, v.num_rows) == (3, 3)  # grown to the table now
    assert v.to_dense().flatten().tolist() == [0.5] * 3
    assert list(t.companions) == ["m", "v"] and t.companions["v"].init == 0.5
    assert m.companion_of is t and t.companion_of is None
    t.append_rows(7)  # past a page boundary
    assert (m.num_rows, v.num_rows) == (10, 10)
    assert v.to_dense()[3:].flatten().tolist() == [0.5] * 7
    m.scatter_rows(torch.arange(10), torch.randn(10, 4))
    v.scatter_rows(torch.arange(10), torch.full((10, 1), 9.0))
    keep = m.to_dense()
    seen = []
    t.on_rows_reset(lambda rows: seen.append(rows.tolist()))
    t.rows_reset(torch.tensor([2, 8]))
    assert seen == [[2, 8]]
    assert torch.equal(m.to_dense()[[2, 8]], torch.zeros(2, 4))
    assert v.to_dense()[[2, 8]].flatten().tolist() == [0.5, 0.5]
    others = [i for i in range(10) if i not in (2, 8)]
    assert torch.equal(m.to_dense()[others], keep[others])
    assert v.to_dense()[others].flatten().tolist() == [9.0] * 8
    t.add_companion("m", m)  # the same registration again: a no-op
    assert t.remove_companion("m") is m and m.companion_of is None
    t.append_rows(1)
    assert m.num_rows == 10 and v.num_rows == 11  # a removed companion no longer follows


def test_companion_registration_errors_name_the_table() -> None:
    t = PagedTensor(2, page_rows=4, name="emb")
    t.append_rows(2)
    t.add_companion("m", PagedTensor(2, page_rows=4))
    with pytest.raises(ValueError, match="'emb'.*already has a companion named 'm'"):
        t.add_companion("m", PagedTensor(2, page_rows=4))
    with pytest.raises(TypeError, match="'emb'.*expected a PagedTensor"):
        t.add_companion("x", torch.zeros(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        t.add_companion("", PagedTensor(2))
    with pytest.raises(ValueError, match="its own companion"):
        t.add_companion("self", t)
    big = PagedTensor(2, page_rows=4)
    big.append_rows(5)
    with pytest.raises(ValueError, match="has 5 rows, more than the table's 2"):
        t.add_companion("big", big)
    other = PagedTensor(2, page_rows=4)
    other.add_companion("taken", taken := PagedTensor(2, page_rows=4))
    with pytest.raises(ValueError, match="companion of another table"):
        t.add_companion("taken", taken)
    with pytest.raises(KeyError, match="no companion named 'nope'"):
        t.remove_companion("nope")
    with pytest.raises(TypeError):
        t.companions["z"] = None  # type: ignore[index]  # a read-only view


# PagedTensor.move_to_: in-place device moves that keep the object, rows and companions.


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
