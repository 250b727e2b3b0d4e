"""PagedTensor's two tiers: pages past ``device_pages`` in host memory (pinned on a GPU),
row swaps across tiers, and the moves announced to whoever holds row numbers."""

from __future__ import annotations

import pytest
import torch

from recstack.core import PagedTensor, kernels, move_rows


def filled(device: torch.device, rows: int = 20, page_rows: int = 4) -> PagedTensor:
    t = PagedTensor(3, device=device, page_rows=page_rows, name="emb")
    t.append_rows(rows)
    t.scatter_rows(torch.arange(rows, device=device), torch.randn(rows, 3, device=device))
    return t


def host_pages(t: PagedTensor) -> list[torch.Tensor]:
    assert t.device_pages is not None
    return list(t.pages[t.device_pages :])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_rows_read_and_write_alike_in_either_tier(device, backend):
    t = filled(device)
    before = t.to_dense()
    t.place_pages(2)
    assert t.device_pages == 2 and t.device_rows == 8
    assert all(p.device == t.device for p in t.pages[:2])
    for page in host_pages(t):
        assert page.device.type == "cpu"
        assert page.is_pinned() == (device.type == "cuda")
    assert t.page_table.tolist() == [p.data_ptr() for p in t.pages]
    assert torch.equal(t.to_dense(), before)
    rows = torch.tensor([19, 0, 9, 9, 3, 12], device=device)  # both tiers, a repeat
    with kernels.use_backend(backend):
        assert torch.equal(t.gather_rows(rows), before[rows])
        assert t.gather_rows(rows[:0]).shape == (0, 3)
        t.scatter_rows(rows[:1], torch.ones(1, 3, device=device), reduce="add")
    before[19] += 1
    assert torch.equal(t.to_dense(), before)


def test_growth_lands_in_the_host_tier_and_companions_follow(device):
    t = PagedTensor(2, device=device, page_rows=4, name="emb")
    t.place_pages(1)
    t.reserve(6)
    assert t.num_rows == 0 and t.num_pages == 2
    m = PagedTensor.like(t, name="m")
    t.add_companion("m", m, init=0.5)
    t.append_rows(10)
    assert m.num_pages == t.num_pages == 3 and m.device_pages == 1
    assert [p.device.type for p in m.pages] == [p.device.type for p in t.pages]
    t.place_pages(None)  # everything back on the device
    assert m.device_pages is None and all(p.device == t.device for p in m.pages)
    assert torch.equal(m.to_dense(), torch.full((10, 2), 0.5, device=device))


def test_swap_rows_moves_companions_and_announces(device):
    t = filled(device)
    m = PagedTensor.like(t, name="m")
    t.add_companion("m", m)
    m.scatter_rows(torch.arange(20, device=device), -t.to_dense())
    t.place_pages(2)
    seen = []
    t.on_rows_moved(lambda src, dst: seen.append((src.tolist(), dst.tolist())))
    before, before_m = t.to_dense(), m.to_dense()
    a = torch.tensor([1, 5, 7], device=device)
    b = torch.tensor([17, 5, 10], device=device)  # 5 with itself: left alone
    t.swap_rows(a, b)
    want = before.clone()
    want[[1, 17, 7, 10]] = before[[17, 1, 10, 7]]
    assert torch.equal(t.to_dense(), want)
    assert torch.equal(m.to_dense(), -want)
    assert torch.equal(before_m, -before)
    assert seen == [([1, 5, 7, 17, 5, 10], [17, 5, 10, 1, 5, 7])]
    t.swap_rows(a[:0], b[:0])
    assert len(seen) == 1
    t.swap_rows(torch.tensor([2, -1], device=device), torch.tensor([-1, 3], device=device))
    assert torch.equal(t.to_dense(), want)  # a -1 skips its pair
    assert seen[-1] == ([-1, -1, -1, -1], [-1, -1, -1, -1])


def test_swap_rows_announces_only_to_listeners_holding_rows(device):
    t = filled(device)
    t.place_pages(2)
    seen, holding = [], [False]
    t.on_rows_moved(lambda src, dst: seen.append(src.tolist()), holds=lambda: holding[0])
    a, b = torch.tensor([1], device=device), torch.tensor([17], device=device)
    before = t.to_dense()
    t.swap_rows(a, b)
    assert seen == []  # nobody held a row: no announcement
    assert torch.equal(t.to_dense()[[1, 17]], before[[17, 1]])  # the rows still moved
    holding[0] = True
    t.swap_rows(a, b)
    assert seen == [[1, 17]]
    t.rows_moved(a, b)  # an explicit announcement reaches every listener
    assert seen == [[1, 17], [1]]
    with pytest.raises(TypeError, match="holds is not callable"):
        t.on_rows_moved(lambda src, dst: None, holds=True)


@pytest.mark.parametrize("n", [0, 1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_kernel_matches_its_reference(device, n, dtype):
    from recstack.core.kernels.paged_swap import swap_paged_rows, swap_paged_rows_reference

    g = torch.Generator().manual_seed(n)
    tables = []
    for _ in range(2):
        t = PagedTensor(37, dtype=dtype, device=device, page_rows=64, name="emb")
        t.append_rows(2 * n + 5)
        tables.append(t)
    values = torch.randn(2 * n + 5, 37, generator=g).to(device)
    perm = torch.randperm(2 * n + 5, generator=g)[: 2 * n].to(device)
    a, b = perm[:n].clone(), perm[n:].clone()
    a[torch.rand(n, generator=g).to(device) < 0.3] = -1  # skipped pairs, ragged
    for t in tables:
        t.scatter_rows(torch.arange(2 * n + 5, device=device), values)
        t.place_pages(1)
    with kernels.use_backend("auto"):
        swap_paged_rows(tables[0], a, b)
    swap_paged_rows_reference(tables[1], a, b)
    assert torch.equal(tables[0].to_dense(), tables[1].to_dense())
    with pytest.raises(ValueError, match="differ in length"):
        swap_paged_rows(tables[0], a, torch.cat([b, b.new_zeros(1)]))


def test_move_rows_follows_a_permutation():
    rows = torch.tensor([[4, 1], [7, 4]])
    out = move_rows(rows, torch.tensor([7, 4, 9]), torch.tensor([4, 9, 7]))
    assert out.tolist() == [[9, 1], [4, 9]]
    assert move_rows(rows, rows[:0, 0], rows[:0, 0]) is rows


def test_place_pages_errors(device):
    t = filled(device)
    m = PagedTensor.like(t, name="m")
    t.add_companion("m", m)
    with pytest.raises(ValueError, match="companion of table 'emb'"):
        m.place_pages(1)
    with pytest.raises(ValueError, match="int >= 0"):
        t.place_pages(-1)
    w = PagedTensor.wrap(torch.zeros(4, 2, device=device), name="w")
    with pytest.raises(ValueError, match="wrapped"):
        w.place_pages(0)
    with pytest.raises(ValueError, match="reserve"):
        w.reserve(9)
    assert "device_pages=1" in repr(t.place_pages(1))


@pytest.mark.gpu
def test_moving_keeps_the_host_tier_pinned():
    t = filled(torch.device("cpu"))
    m = PagedTensor.like(t, name="m")
    t.add_companion("m", m)
    t.place_pages(1)
    before = t.to_dense()
    t.move_to_("cuda")
    assert t.pages[0].is_cuda and all(p.is_pinned() for p in host_pages(t))
    assert m.pages[0].is_cuda and all(p.is_pinned() for p in host_pages(m))
    assert torch.equal(t.to_dense().cpu(), before)
    t.move_to_("cpu")
    assert all(p.device.type == "cpu" for p in t.pages)
    assert torch.equal(t.to_dense(), before)
