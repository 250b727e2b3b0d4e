"""Paged gather/scatter kernels against their torch references (and a dense mirror)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels
from recstack.core.kernels.paged_rows import (
    gather_paged_rows,
    gather_paged_rows_reference,
    scatter_paged_rows,
    scatter_paged_rows_reference,
)
from recstack.core.paged import PagedTensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _table(device, dim, dtype=torch.float32, num_rows=45, page_rows=8, wrapped=False):
    """A PagedTensor holding fresh random rows, and a dense copy of them."""
    dense = torch.randn(num_rows, dim, device=device).to(dtype)
    if wrapped:
        return PagedTensor.wrap(dense.clone(), name="wrapped"), dense
    t = PagedTensor(dim, dtype=dtype, device=device, page_rows=page_rows, name="paged")
    t.append_rows(num_rows)
    for p, page in enumerate(t.pages):  # fill pages directly: independent of the kernels
        chunk = dense[p * page_rows : (p + 1) * page_rows]
        page[: chunk.shape[0]].copy_(chunk)
    return t, dense


def _name(backend: str, op: str) -> str:
    return f"paged_{op}_rows" if backend == "triton" else f"paged_{op}_rows_reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 7, 64, 300])
@pytest.mark.parametrize("layout", ["paged", "wrapped"])
def test_gather_matches_dense(device, backend, dtype, dim, layout):
    t, dense = _table(device, dim, dtype, page_rows=4, wrapped=layout == "wrapped")
    for n in (0, 1, 3, 77):
        rows = torch.randint(0, t.num_rows, (n,), device=device)
        with kernels.count_launches() as launches:
            got = t.gather_rows(rows)
        assert got.dtype == dtype and got.shape == (n, dim)
        assert torch.equal(got, dense[rows])
        assert launches[_name(backend, "gather")] == (1 if n else 0)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_gather_any_integer_rows_and_poisoned_out(device, backend, index_dtype):
    t, dense = _table(device, 33, num_rows=40, page_rows=8)
    rows = torch.randint(0, 40, (29,), device=device)
    out = torch.full((29, 33), float("nan"), device=device)
    got = t.gather_rows(rows.to(index_dtype), out=out)
    assert got is out
    assert not torch.isnan(out).any()
    assert torch.equal(out, dense[rows])


def test_gather_into_strided_out(device, backend):
    t, dense = _table(device, 5, num_rows=20, page_rows=4)
    rows = torch.randint(0, 20, (9,), device=device)
    wide = torch.full((9, 8), float("nan"), device=device)
    t.gather_rows(rows, out=wide[:, 2:7])
    assert torch.equal(wide[:, 2:7], dense[rows])
    assert torch.isnan(wide[:, :2]).all() and torch.isnan(wide[:, 7:]).all()


@pytest.mark.parametrize("dim", [1, 7, 64, 300])
def test_tile_parameters_do_not_change_results(device, backend, dim):
    t, dense = _table(device, dim, num_rows=50, page_rows=8)
    rows = torch.randint(0, 50, (61,), device=device)
    for tile in ({"tile_elems": 16, "max_block_d": 4, "num_warps": 1}, {"tile_elems": 8192}):
        assert torch.equal(t.gather_rows(rows, **tile), dense[rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 7, 64, 300])
@pytest.mark.parametrize("layout", ["paged", "wrapped"])
def test_scatter_set_unique_rows(device, backend, dtype, dim, layout):
    t, dense = _table(device, dim, dtype, page_rows=4, wrapped=layout == "wrapped")
    for n in (0, 1, 19):
        rows = torch.randperm(t.num_rows, device=device)[:n]
        values = torch.randn(n, dim, device=device)  # fp32 values, cast on store
        with kernels.count_launches() as launches:
            t.scatter_rows(rows, values)
        dense[rows] = values.to(dtype)
        assert torch.equal(t.to_dense(), dense)
        assert launches[_name(backend, "scatter")] == (1 if n else 0)


def test_scatter_set_duplicates_stores_one_of_them(device, backend):
    t, _ = _table(device, 6, num_rows=10, page_rows=4)
    rows = torch.tensor([3, 3, 3, 7, 7], device=device)
    values = torch.arange(5, device=device, dtype=torch.float32)[:, None].expand(5, 6)
    t.scatter_rows(rows, values)
    got = t.to_dense()
    assert got[3, 0].item() in (0.0, 1.0, 2.0) and got[7, 0].item() in (3.0, 4.0)
    assert bool((got[3] == got[3, 0]).all()) and bool((got[7] == got[7, 0]).all())


@pytest.mark.parametrize("table_dtype", DTYPES)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_casts_values(device, backend, table_dtype, value_dtype):
    t, dense = _table(device, 9, table_dtype, num_rows=12, page_rows=4)
    rows = torch.randperm(12, device=device)[:7]
    values = torch.randn(7, 9, device=device).to(value_dtype)
    t.scatter_rows(rows, values)
    dense[rows] = values.to(table_dtype)
    assert torch.equal(t.to_dense(), dense)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_scatter_add_sums_duplicates(device, backend, dtype, dim):
    t, dense = _table(device, dim, dtype, num_rows=30, page_rows=8)
    for n in (1, 40):
        rows = torch.randint(0, 30, (n,), device=device)
        rows[: n // 2] = 5  # a hot row
        values = torch.randn(n, dim, device=device)
        t.scatter_rows(rows, values, reduce="add")
        expect = dense.float().index_add(0, rows, values).to(dtype)
        torch.testing.assert_close(t.to_dense(), expect, rtol=TOL[dtype], atol=TOL[dtype])
        dense = t.to_dense()


def test_scatter_add_bf16_values_into_fp32_table(device, backend):
    t, dense = _table(device, 4, torch.float32, num_rows=10, page_rows=4)
    rows = torch.tensor([1, 1, 9], device=device)
    values = torch.randn(3, 4, device=device).to(torch.bfloat16)
    t.scatter_rows(rows, values, reduce="add")
    expect = dense.index_add(0, rows, values.float())
    torch.testing.assert_close(t.to_dense(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_references(device, dtype):
    """Triton launchers against the reference functions on identical copies."""
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    t, dense = _table(device, 20, dtype, num_rows=37, page_rows=8)
    ref, _ = _table(device, 20, dtype, num_rows=37, page_rows=8)
    for page, src in zip(ref.pages, t.pages, strict=True):
        page.copy_(src)
    rows = torch.randint(0, 37, (50,), device=device)
    values = torch.randn(50, 20, device=device)
    with kernels.use_backend("triton"):
        assert torch.equal(gather_paged_rows(t, rows), gather_paged_rows_reference(ref, rows))
        scatter_paged_rows(t, rows, values, reduce="add")
    scatter_paged_rows_reference(ref, rows, values, reduce="add")
    torch.testing.assert_close(t.to_dense(), ref.to_dense(), rtol=TOL[dtype], atol=TOL[dtype])
    for page, src in zip(ref.pages, t.pages, strict=True):  # resync: sums may round apart
        page.copy_(src)
    uniq = torch.randperm(37, device=device)[:20]
    with kernels.use_backend("triton"):
        scatter_paged_rows(t, uniq, values[:20])
    scatter_paged_rows_reference(ref, uniq, values[:20])
    assert torch.equal(t.to_dense(), ref.to_dense())


def test_scatter_add_16bit_coalesces_then_writes_once(device, backend):
    t, dense = _table(device, 8, torch.bfloat16, num_rows=10, page_rows=4)
    rows = torch.tensor([2, 2, 9, 2], device=device)
    with kernels.count_launches() as launches:
        t.scatter_rows(rows, torch.full((4, 8), 0.25, device=device), reduce="add")
    if backend == "triton":
        assert launches == {"segment_sum": 1, "paged_scatter_rows": 1}
    expect = dense.clone()
    expect[2] = (dense[2].float() + 0.75).to(torch.bfloat16)  # summed in fp32, rounded once
    expect[9] = (dense[9].float() + 0.25).to(torch.bfloat16)
    assert torch.equal(t.to_dense(), expect)


def test_growth_between_calls(device, backend):
    t = PagedTensor(6, device=device, page_rows=4, name="growing")
    dense = torch.empty(0, 6, device=device)
    for step in range(4):
        new = t.append_rows(3 + 2 * step)
        values = torch.randn(new.numel(), 6, device=device)
        t.scatter_rows(new, values)
        dense = torch.cat([dense, values])
        rows = torch.randint(0, t.num_rows, (17,), device=device)
        assert torch.equal(t.gather_rows(rows), dense[rows])
    assert t.num_pages == 6
    assert torch.equal(t.to_dense(), dense)


def test_misaligned_wrapped_tensor(device, backend):
    # A view starting one element in: page pointer not 16-byte aligned, no alignment hint.
    storage = torch.randn(20 * 7 + 2, device=device)
    before = storage.clone()
    view = storage[1:-1].view(20, 7)
    w = PagedTensor.wrap(view, name="offset_view")
    assert not w._pages_aligned
    rows = torch.randint(0, 20, (13,), device=device)
    assert torch.equal(w.gather_rows(rows), before[1:-1].view(20, 7)[rows])
    values = torch.randn(13, 7, device=device)
    w.scatter_rows(rows, values, reduce="add")
    expect = before[1:-1].view(20, 7).index_add(0, rows, values)
    torch.testing.assert_close(view, expect, rtol=1e-5, atol=1e-5)
    assert storage[0] == before[0] and storage[-1] == before[-1]  # neighbours untouched


def test_check_bounds_false_skips_check(device, backend):
    t, dense = _table(device, 3, num_rows=9, page_rows=4)
    rows = torch.tensor([8, 0], device=device)
    assert torch.equal(t.gather_rows(rows, check_bounds=False), dense[rows])
