"""SparseGrad: construction, validation, coalescing through the segment-sum kernel against
its torch reference, value dtypes and device moves."""

from __future__ import annotations

import pytest
import torch
from segment_sum_testdata import TOL, zipf_rows

from recstack.core.kernels.segment_sum import coalesce_rows, coalesce_rows_reference
from recstack.core.sparse_grad import SparseGrad


def test_sparse_grad_basics(device, backend):
    rows = torch.tensor([4, 1, 4, 4], device=device)
    values = torch.arange(8, dtype=torch.float32, device=device).view(4, 2)
    g = SparseGrad(rows, values)
    assert (g.num_rows, len(g), g.dim, g.dtype) == (4, 4, 2, torch.float32)
    assert not g.is_coalesced and g.device == values.device
    c = g.coalesce()
    assert c.is_coalesced and c.coalesce() is c
    assert c.rows.tolist() == [1, 4]
    assert c.values.tolist() == [[2.0, 3.0], [10.0, 13.0]]
    assert "is_coalesced=True" in repr(c)
    moved = c.to("cpu")
    assert moved.is_coalesced and moved.rows.device.type == "cpu"
    assert torch.equal(moved.values, c.values.cpu())


def test_sparse_grad_empty_and_single(device, backend):
    empty = SparseGrad(
        torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 3, device=device)
    ).coalesce()
    assert empty.is_coalesced and len(empty) == 0 and empty.values.shape == (0, 3)
    one = SparseGrad(torch.tensor([9], device=device), torch.ones(1, 3, device=device))
    c = one.coalesce()
    assert c.rows.tolist() == [9] and c.values.tolist() == [[1.0, 1.0, 1.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_grad_keeps_value_dtype(device, backend, dtype):
    rows = zipf_rows(50, device)
    values = torch.randn(50, 4, device=device).to(dtype)
    c = SparseGrad(rows, values).coalesce()
    ref_u, ref_s = coalesce_rows_reference(rows, values)
    assert c.values.dtype == dtype and torch.equal(c.rows, ref_u)
    torch.testing.assert_close(c.values.float(), ref_s.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_sparse_grad_validation(device):
    rows = torch.tensor([0, 1], device=device)
    values = torch.zeros(2, 3, device=device)
    with pytest.raises(TypeError, match="rows"):
        SparseGrad(rows.float(), values)
    with pytest.raises(ValueError, match="rows must be 1-D"):
        SparseGrad(rows.view(2, 1), values)
    with pytest.raises(TypeError, match="values"):
        SparseGrad(rows, values.long())
    with pytest.raises(ValueError, match="2-D"):
        SparseGrad(rows, values.flatten())
    with pytest.raises(ValueError, match="3 entries|2 rows"):
        SparseGrad(torch.tensor([0, 1, 2], device=device), values)
    with pytest.raises(TypeError, match="rows"):
        SparseGrad([0, 1], values)
    g = SparseGrad(rows.int(), values)
    assert g.rows.dtype == torch.int64
    with pytest.raises(TypeError, match="coalesce_rows.*integer"):
        coalesce_rows(rows.float(), values)
    with pytest.raises(ValueError, match="coalesce_rows.*rows"):
        coalesce_rows(rows, torch.zeros(3, 3, device=device))


def test_a_gradient_follows_moved_rows() -> None:
    g = SparseGrad(torch.tensor([1, 4, 7]), torch.tensor([[1.0], [4.0], [7.0]]), is_coalesced=True)
    moved = g.moved(torch.tensor([4, 9, -1]), torch.tensor([9, 4, -1]))  # 4 <-> 9
    assert moved.is_coalesced and moved.rows.tolist() == [1, 7, 9]
    assert moved.values.squeeze(1).tolist() == [1.0, 7.0, 4.0]
    loose = SparseGrad(torch.tensor([4, 4, 1]), torch.ones(3, 1)).moved(
        torch.tensor([4]), torch.tensor([0])
    )
    assert not loose.is_coalesced and loose.rows.tolist() == [0, 0, 1]
    assert g.moved(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)) is g
