"""Pooled lookup and its SparseGrad backward: Triton vs torch reference vs a plain loop oracle."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad, kernels
from recstack.embedding_engine.kernels.pooling import (
    MODE_MEAN,
    MODE_SUM,
    pooled_lookup,
    pooled_lookup_backward,
    pooled_lookup_backward_reference,
    pooled_lookup_reference,
)

# ---------------------------------------------------------------------------------- inputs


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_table(
    num_rows: int,
    dim: int,
    dtype: torch.dtype,
    paged: bool,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> PagedTensor:
    """Random rows, either in 4-row pages (several pages) or a wrapped plain tensor."""
    values = torch.randn(num_rows, dim, generator=gen).to(dtype).to(device)
    if not paged:
        return PagedTensor.wrap(values.contiguous(), name="wrapped")
    table = PagedTensor(dim, dtype=dtype, device=device, page_rows=4, name="paged")
    table.append_rows(num_rows)
    if num_rows:
        table.scatter_rows(torch.arange(num_rows, device=device), values)
    return table


def make_bags(
    num_keys: int,
    batch: int,
    max_len: int,
    num_rows: int,
    gen: torch.Generator,
    *,
    no_row: float = 0.15,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-major ragged bags (some empty) of rows drawn from a small vocabulary (duplicates)."""
    lengths = torch.randint(0, max_len + 1, (num_keys * batch,), generator=gen)
    if lengths.numel() > 2:
        lengths[torch.randint(0, lengths.numel(), (2,), generator=gen)] = 0
    offsets = torch.zeros(num_keys * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n = int(offsets[-1])
    vocab = min(num_rows, vocab or num_rows)
    rows = torch.randint(0, max(vocab, 1), (n,), generator=gen)
    missing = torch.rand(n, generator=gen) < no_row
    rows[missing] = -1
    if num_rows == 0:
        rows.fill_(-1)
    return rows, offsets


def loop_forward(table, rows, offsets, batch, modes, weights) -> torch.Tensor:
    """Plain-loop oracle, float64: one bag at a time, one id at a time."""
    dense = table.to_dense().double().cpu()
    num_keys = len(modes)
    out = torch.zeros(batch, num_keys, table.dim, dtype=torch.float64)
    for k in range(num_keys):
        for b in range(batch):
            lo, hi = int(offsets[k * batch + b]), int(offsets[k * batch + b + 1])
            for i in range(lo, hi):
                r = int(rows[i])
                if r >= 0:
                    w = 1.0 if weights is None else float(weights[i])
                    out[b, k] += dense[r] * w
            if int(modes[k]) == MODE_MEAN and hi > lo:
                out[b, k] /= hi - lo
    return out


def loop_backward(grad_out, rows, offsets, batch, modes, weights, num_rows) -> torch.Tensor:
    """Plain-loop oracle of the dense table gradient, float64."""
    g = grad_out.double()
    dense = torch.zeros(num_rows, g.shape[2], dtype=torch.float64)
    for k in range(len(modes)):
        for b in range(batch):
            lo, hi = int(offsets[k * batch + b]), int(offsets[k * batch + b + 1])
            for i in range(lo, hi):
                r = int(rows[i])
                if r < 0:
                    continue
                s = 1.0 if weights is None else float(weights[i])
                if int(modes[k]) == MODE_MEAN:
                    s /= hi - lo
                dense[r] += g[b, k] * s
    return dense


def densify(grad: SparseGrad, num_rows: int) -> torch.Tensor:
    dense = torch.zeros(num_rows, grad.dim, dtype=torch.float64)
    dense[grad.rows.cpu()] = grad.values.double().cpu()
    return dense


def needs_triton(device: torch.device) -> None:
    """Skip unless the Triton kernel can run on tensors of ``device``."""
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {"atol": 1e-5, "rtol": 1e-5}


# --------------------------------------------------------------------------------- forward

FORWARD_CASES = [
    # (K, B, dim, max_len, weighted, paged, dtype, modes)
    (1, 1, 1, 5, False, False, torch.float32, [MODE_SUM]),
    (1, 7, 64, 9, True, True, torch.float32, [MODE_MEAN]),
    (3, 5, 7, 6, False, True, torch.float32, [MODE_SUM, MODE_MEAN, MODE_SUM]),
    (2, 4, 130, 4, True, False, torch.float32, [MODE_MEAN, MODE_SUM]),
    (4, 3, 16, 40, False, True, torch.bfloat16, [MODE_MEAN, MODE_SUM, MODE_SUM, MODE_MEAN]),
    (2, 6, 7, 3, True, False, torch.bfloat16, [MODE_SUM, MODE_MEAN]),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: f"K{c[0]}B{c[1]}d{c[2]}")
def test_forward_matches_loop_oracle(backend, device, case) -> None:
    num_keys, batch, dim, max_len, weighted, paged, dtype, modes = case
    gen = torch.Generator().manual_seed(seed(case))
    table = make_table(23, dim, dtype, paged, gen, device)
    rows, offsets = make_bags(num_keys, batch, max_len, 23, gen)
    weights = torch.rand(rows.numel(), generator=gen) if weighted else None
    want = loop_forward(table, rows, offsets, batch, modes, weights)
    assert table.num_pages > 1 or not paged
    dev = {"device": device}
    got = pooled_lookup(
        table,
        rows.to(**dev),
        offsets.to(**dev),
        batch,
        torch.tensor(modes, **dev),
        None if weights is None else weights.to(**dev),
    )
    assert got.shape == (batch, num_keys, dim) and got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, **tol(dtype))
    # fp32 output from a 16-bit table keeps the fp32 sums.
    wide = pooled_lookup(
        table,
        rows.to(**dev),
        offsets.to(**dev),
        batch,
        modes,
        None if weights is None else weights.to(**dev),
        out_dtype=torch.float32,
    )
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.double().cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "dim,block_n,max_block_d,tile_elems",
    [(64, 2, None, 256), (130, 4, 64, 512), (7, 1, None, 64), (64, 8, None, 512)],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_tiles_match_reference(
    device, dim, block_n, max_block_d, tile_elems, weighted
) -> None:
    """Bags longer than BLOCK_N, several bags per program, several column tiles."""
    needs_triton(device)
    gen = torch.Generator().manual_seed(dim * 31 + block_n)
    table = make_table(40, dim, torch.float32, True, gen, device)
    rows, offsets = make_bags(3, 6, 19, 40, gen)
    weights = torch.rand(rows.numel(), generator=gen) if weighted else None
    modes = torch.tensor([MODE_MEAN, MODE_SUM, MODE_MEAN])
    want = loop_forward(table, rows, offsets, 6, modes, weights)
    rows, offsets, modes = rows.to(device), offsets.to(device), modes.to(device)
    weights = None if weights is None else weights.to(device)
    with kernels.use_backend("triton"), kernels.count_launches() as launches:
        got = pooled_lookup(
            table,
            rows,
            offsets,
            6,
            modes,
            weights,
            block_n=block_n,
            max_block_d=max_block_d,
            tile_elems=tile_elems,
        )
    assert launches["pooled_lookup"] == 1 and "pooled_lookup_reference" not in launches
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
    with kernels.use_backend("torch"):
        ref = pooled_lookup(table, rows, offsets, 6, modes, weights)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_forward_empty_inputs(backend, device) -> None:
    gen = torch.Generator().manual_seed(1)
    table = make_table(5, 4, torch.float32, True, gen, device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    # Empty batch, and no features.
    out = pooled_lookup(table, empty, one, 0, [MODE_SUM, MODE_MEAN])
    assert out.shape == (0, 2, 4)
    out = pooled_lookup(table, empty, one, 3, [])
    assert out.shape == (3, 0, 4)
    # Bags but no ids: zeros, also into a dirty `out`.
    dirty = torch.full((3, 2, 4), 7.0, device=device)
    seven = torch.zeros(7, dtype=torch.int64, device=device)
    res = pooled_lookup(table, empty, seven, 3, [0, 1], out=dirty)
    assert res is dirty and not dirty.any()
    # Only -1 rows, on an empty table: zeros (mean still divides by the bag length).
    nothing = PagedTensor(4, device=device, page_rows=4)
    rows = torch.full((3,), -1, device=device)
    got = pooled_lookup(nothing, rows, torch.tensor([0, 3], device=device), 1, [MODE_MEAN])
    assert got.shape == (1, 1, 4) and not got.any()


def test_forward_mean_counts_missing_rows(backend, device) -> None:
    table = PagedTensor.wrap(torch.tensor([[2.0, 4.0], [6.0, 8.0]], device=device))
    rows = torch.tensor([0, -1, 1, -1, -1], device=device)
    offsets = torch.tensor([0, 4, 5], device=device)
    got = pooled_lookup(table, rows, offsets, 1, [MODE_MEAN, MODE_SUM])
    assert got.tolist() == [[[2.0, 3.0], [0.0, 0.0]]]
    w = torch.tensor([0.5, 9.0, 2.0, 1.0, 1.0], device=device)
    modes = torch.tensor([MODE_MEAN, MODE_SUM], device=device)
    got = pooled_lookup(table, rows, offsets, 1, modes, w)
    assert got.tolist() == [[[3.25, 4.5], [0.0, 0.0]]]


def test_forward_into_wide_buffer(backend, device) -> None:
    """``out`` may be a strided view, e.g. columns of a wider dense-tower input."""
    gen = torch.Generator().manual_seed(3)
    table = make_table(30, 8, torch.float32, False, gen, device)
    rows, offsets = make_bags(2, 5, 6, 30, gen)
    buffer = torch.full((5, 2 * 8 + 3), -5.0, device=device)
    out = buffer[:, 3:].view(5, 2, 8)
    got = pooled_lookup(
        table, rows.to(device), offsets.to(device), 5, [MODE_SUM, MODE_MEAN], out=out
    )
    assert got.data_ptr() == out.data_ptr()
    want = loop_forward(table, rows, offsets, 5, [MODE_SUM, MODE_MEAN], None)
    torch.testing.assert_close(buffer[:, 3:].double().view(5, 2, 8).cpu(), want)
    assert (buffer[:, :3] == -5.0).all()


def test_forward_int32_rows_and_launch_count(device) -> None:
    needs_triton(device)
    gen = torch.Generator().manual_seed(4)
    table = make_table(10, 4, torch.float32, True, gen, device)
    rows, offsets = make_bags(2, 3, 4, 10, gen)
    rows, offsets = rows.to(device), offsets.to(device)
    with kernels.use_backend("torch"):
        want = pooled_lookup(table, rows, offsets, 3, [0, 1])
    with kernels.use_backend("triton"), kernels.count_launches() as launches:
        got = pooled_lookup(table, rows.to(torch.int32), offsets, 3, [0, 1], check_bounds=False)
    assert dict(launches) == {"pooled_lookup": 1}
    torch.testing.assert_close(got, want)


def test_forward_validation() -> None:
    table = PagedTensor.wrap(torch.zeros(4, 2), name="items")
    rows = torch.tensor([0, 1, 2])
    offsets = torch.tensor([0, 1, 3])
    with pytest.raises(TypeError, match="PagedTensor"):
        pooled_lookup(torch.zeros(4, 2), rows, offsets, 2, [0])
    with pytest.raises(ValueError, match=r"K \* B \+ 1"):
        pooled_lookup(table, rows, offsets, 3, [0])
    with pytest.raises(ValueError, match="modes"):
        pooled_lookup(table, rows, offsets, 2, [2])
    with pytest.raises(ValueError, match="modes"):
        pooled_lookup(table, rows, offsets, 2, torch.tensor([3]))
    with pytest.raises(TypeError, match="int64 or int32"):
        pooled_lookup(table, rows.float(), offsets, 2, [0])
    with pytest.raises(TypeError, match="offsets must be int64"):
        pooled_lookup(table, rows, offsets.int(), 2, [0])
    with pytest.raises(ValueError, match="weights must have shape"):
        pooled_lookup(table, rows, offsets, 2, [0], torch.ones(2))
    with pytest.raises(TypeError, match="weights must be a float"):
        pooled_lookup(table, rows, offsets, 2, [0], torch.ones(3, dtype=torch.int64))
    with pytest.raises(IndexError, match="row 4 is out of range"):
        pooled_lookup(table, torch.tensor([0, 4, 1]), offsets, 2, [0])
    with pytest.raises(IndexError, match="row -2"):
        pooled_lookup(table, torch.tensor([0, -2, 1]), offsets, 2, [0])
    with pytest.raises(ValueError, match="non-decreasing"):
        pooled_lookup(table, rows, torch.tensor([0, 3, 2, 3]), 3, [0])
    with pytest.raises(ValueError, match=r"offsets\[-1\]"):
        pooled_lookup(table, rows, torch.tensor([0, 1, 2]), 2, [0])
    with pytest.raises(ValueError, match="out must have shape"):
        pooled_lookup(table, rows, offsets, 2, [0], out=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="output dtype"):
        pooled_lookup(table, rows, offsets, 2, [0], out_dtype=torch.float16)
    with pytest.raises(ValueError, match="batch_size"):
        pooled_lookup(table, rows, offsets, -1, [0])


# -------------------------------------------------------------------------------- backward

BACKWARD_CASES = [
    # (K, B, dim, max_len, weighted, modes, vocab)
    (1, 1, 1, 6, False, [MODE_SUM], 3),
    (2, 5, 7, 8, True, [MODE_MEAN, MODE_SUM], 6),
    (3, 4, 64, 12, False, [MODE_SUM, MODE_MEAN, MODE_MEAN], 40),
    (2, 3, 130, 5, True, [MODE_MEAN, MODE_MEAN], 9),
]


def unique_and_inverse(rows: torch.Tensor, convention: str):
    """(unique_rows, inverse) in one of the accepted conventions for ids with row -1."""
    uniq, inv = torch.unique(rows, sorted=True, return_inverse=True)
    if convention == "leading_minus_one" or not (uniq.numel() and int(uniq[0]) == -1):
        return uniq, inv
    # inverse -1 for ids without a row, unique_rows without -1.
    return uniq[1:], torch.where(rows < 0, -1, inv - 1)


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: f"K{c[0]}B{c[1]}d{c[2]}")
@pytest.mark.parametrize("convention", ["leading_minus_one", "inverse_minus_one"])
def test_backward_matches_loop_oracle(backend, device, case, convention) -> None:
    num_keys, batch, dim, max_len, weighted, modes, vocab = case
    gen = torch.Generator().manual_seed(seed(case, convention))
    rows, offsets = make_bags(num_keys, batch, max_len, 50, gen, vocab=vocab)
    weights = torch.rand(rows.numel(), generator=gen) if weighted else None
    grad_out = torch.randn(batch, num_keys, dim, generator=gen)
    uniq, inv = unique_and_inverse(rows, convention)
    want = loop_backward(grad_out, rows, offsets, batch, modes, weights, 50)

    dev = {"device": device}
    got = pooled_lookup_backward(
        grad_out.to(**dev),
        rows.to(**dev),
        offsets.to(**dev),
        batch,
        torch.tensor(modes, **dev),
        None if weights is None else weights.to(**dev),
        uniq.to(**dev),
        inv.to(**dev),
        tile_elems=64,  # many tiles: segments cross tile boundaries
    )
    assert got.is_coalesced and got.values.dtype == torch.float32
    assert got.rows.tolist() == sorted(set(rows.tolist()) - {-1})
    torch.testing.assert_close(densify(got, 50), want, atol=1e-5, rtol=1e-5)


def test_backward_hot_row_and_given_order(device) -> None:
    """A row repeated thousands of times spans many tiles (atomics only at tile edges)."""
    needs_triton(device)
    gen = torch.Generator().manual_seed(7)
    num_keys, batch, dim = 2, 40, 8
    lengths = torch.randint(30, 70, (num_keys * batch,), generator=gen)
    offsets = torch.zeros(num_keys * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n = int(offsets[-1])
    rows = torch.randint(0, 30, (n,), generator=gen)
    rows[torch.rand(n, generator=gen) < 0.8] = 11  # the hot row, ~3000 times
    rows[torch.rand(n, generator=gen) < 0.02] = -1
    weights = torch.rand(n, generator=gen)
    modes = torch.tensor([MODE_MEAN, MODE_SUM])
    grad_out = torch.randn(batch, num_keys, dim, generator=gen)
    uniq, inv = torch.unique(rows, return_inverse=True)
    assert int((rows == 11).sum()) > 2000
    want = loop_backward(grad_out, rows, offsets, batch, modes, weights, 30)
    grad_out, rows, offsets, modes, weights, uniq, inv = (
        t.to(device) for t in (grad_out, rows, offsets, modes, weights, uniq, inv)
    )
    with kernels.use_backend("triton"), kernels.count_launches() as launches:
        got = pooled_lookup_backward(
            grad_out, rows, offsets, batch, modes, weights, uniq, inv, tile_elems=256
        )
    assert launches["lookup_grad_sums"] == 1
    assert launches["lookup_grad_sums_zero"] == 1
    assert "lookup_grad_sums_reference" not in launches
    torch.testing.assert_close(densify(got, 30), want, atol=1e-4, rtol=1e-5)
    # The caller's own sort order (e.g. from sorting rows) replaces the sort here.
    _, order = torch.sort(rows, stable=True)
    with kernels.use_backend("triton"):
        again = pooled_lookup_backward(
            grad_out, rows, offsets, batch, modes, weights, uniq, inv, order=order
        )
    torch.testing.assert_close(densify(again, 30), want, atol=1e-4, rtol=1e-5)
    with kernels.use_backend("torch"):
        ref = pooled_lookup_backward(grad_out, rows, offsets, batch, modes, weights, uniq, inv)
    assert torch.equal(ref.rows, got.rows)
    torch.testing.assert_close(ref.values, got.values, atol=1e-4, rtol=1e-5)


def test_backward_bf16_grad_and_strided(backend, device) -> None:
    gen = torch.Generator().manual_seed(8)
    rows, offsets = make_bags(2, 4, 5, 12, gen)
    wide = torch.randn(4, 2, 10, generator=gen).to(torch.bfloat16)
    grad_out = wide.to(device)[:, :, 1:7]  # non-contiguous view
    assert not grad_out.is_contiguous()
    uniq, inv = torch.unique(rows, return_inverse=True)
    dev = [t.to(device) for t in (rows, offsets)]
    got = pooled_lookup_backward(grad_out, *dev, 4, [1, 0], None, uniq.to(device), inv.to(device))
    want = loop_backward(wide[:, :, 1:7].float(), rows, offsets, 4, [1, 0], None, 12)
    torch.testing.assert_close(densify(got, 12), want, atol=1e-5, rtol=1e-5)


def test_backward_empty(backend, device) -> None:
    dim = 3
    dev = {"device": device}
    empty = torch.zeros(0, dtype=torch.int64, **dev)
    g = pooled_lookup_backward(
        torch.zeros(0, 2, dim, **dev), empty, torch.zeros(1, dtype=torch.int64, **dev), 0,
        [0, 1], None, empty, empty,
    )  # fmt: skip
    assert g.num_rows == 0 and g.values.shape == (0, dim)
    # Ids that all lack a row: nothing to update.
    rows = torch.full((4,), -1, **dev)
    offsets = torch.tensor([0, 1, 4], **dev)
    uniq, inv = torch.unique(rows, return_inverse=True)
    g = pooled_lookup_backward(torch.ones(2, 1, dim, **dev), rows, offsets, 2, [1], None, uniq, inv)
    assert g.num_rows == 0 and g.values.shape == (0, dim)
    g = pooled_lookup_backward(
        torch.ones(2, 1, dim, **dev), rows, offsets, 2, [1], None, empty, inv * 0 - 1
    )
    assert g.num_rows == 0


def test_backward_validation() -> None:
    rows = torch.tensor([3, 1, 3])
    offsets = torch.tensor([0, 2, 3])
    uniq, inv = torch.unique(rows, return_inverse=True)
    grad = torch.ones(2, 1, 4)

    def call(**kw):
        args = {
            "grad_out": grad,
            "rows": rows,
            "offsets": offsets,
            "batch_size": 2,
            "modes": [0],
            "weights": None,
            "unique_rows": uniq,
            "inverse": inv,
        }
        args.update(kw)
        return pooled_lookup_backward(**args)

    with pytest.raises(ValueError, match=r"shape \[B, K, dim\]"):
        call(grad_out=torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="inverse has 2 entries"):
        call(inverse=inv[:2])
    with pytest.raises(ValueError, match="sorted and unique"):
        call(unique_rows=uniq.flip(0), inverse=1 - inv)
    with pytest.raises(ValueError, match="map each id to its row"):
        call(inverse=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"lie in \[-1, 2\)"):
        call(inverse=torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="every index of unique_rows"):
        call(unique_rows=torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match="permutation"):
        call(order=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(order=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="modes"):
        call(modes=torch.tensor([4]))
    with pytest.raises(ValueError, match="weights must have shape"):
        call(weights=torch.ones(4))


# ------------------------------------------------------------- autograd (test-only glue)


class PooledLookupFunction(torch.autograd.Function):
    """Test glue: forward = pooled_lookup, backward = SparseGrad scattered into a dense grad."""

    @staticmethod
    def forward(ctx, weight, table, rows, offsets, batch, modes, weights):  # type: ignore[override]
        ctx.save_for_backward(rows, offsets, modes, weights)
        ctx.batch, ctx.num_rows = batch, weight.shape[0]
        return pooled_lookup(table, rows, offsets, batch, modes, weights)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, offsets, modes, weights = ctx.saved_tensors
        uniq, inv = torch.unique(rows, return_inverse=True)
        sparse = pooled_lookup_backward(
            grad_out, rows, offsets, ctx.batch, modes, weights, uniq, inv
        )
        dense = torch.zeros(
            ctx.num_rows, grad_out.shape[2], dtype=torch.float32, device=grad_out.device
        )
        dense.index_add_(0, sparse.rows, sparse.values)
        return dense, None, None, None, None, None, None


def dense_pooling(weight, rows, offsets, batch, modes, weights) -> torch.Tensor:
    """Differentiable dense reference (EmbeddingBag semantics, -1 rows as zeros)."""
    num_keys, dim = modes.numel(), weight.shape[1]
    valid = (rows >= 0).to(weight.dtype)[:, None]
    emb = weight[rows.clamp(min=0)] * valid
    if weights is not None:
        emb = emb * weights[:, None]
    lengths = offsets[1:] - offsets[:-1]
    bag_of = torch.repeat_interleave(torch.arange(num_keys * batch), lengths)
    pooled = torch.zeros(num_keys * batch, dim).index_add(0, bag_of, emb)
    mean = (modes.repeat_interleave(batch) == MODE_MEAN) & (lengths > 0)
    pooled = pooled / torch.where(mean, lengths, 1).to(pooled.dtype)[:, None]
    return pooled.view(num_keys, batch, dim).transpose(0, 1)


@pytest.mark.parametrize("weighted", [False, True])
def test_backward_agrees_with_autograd(backend, device, weighted) -> None:
    gen = torch.Generator().manual_seed(11 + weighted)
    num_keys, batch, dim, num_rows = 3, 6, 5, 14
    weight = torch.randn(num_rows, dim, generator=gen)
    rows, offsets = make_bags(num_keys, batch, 7, num_rows, gen)
    weights = torch.rand(rows.numel(), generator=gen) if weighted else None
    modes = torch.tensor([MODE_SUM, MODE_MEAN, MODE_MEAN])
    cotangent = torch.randn(batch, num_keys, dim, generator=gen)

    # The dense autograd oracle runs on the CPU; the ops under test on `device`.
    dense = weight.clone().requires_grad_(True)
    ref_out = dense_pooling(dense, rows, offsets, batch, modes, weights)
    (want,) = torch.autograd.grad((ref_out * cotangent).sum(), dense)

    param = weight.to(device, copy=True).requires_grad_(True)
    table = PagedTensor.wrap(weight.to(device, copy=True))
    args = [t.to(device) for t in (rows, offsets)] + [batch, modes.to(device)]
    args.append(None if weights is None else weights.to(device))
    out = PooledLookupFunction.apply(param, table, *args)
    torch.testing.assert_close(out.cpu(), ref_out.detach(), atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad((out * cotangent.to(device)).sum(), param)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_references_agree_with_oracle() -> None:
    """The public references on their own (no dispatch), paged fp32."""
    gen = torch.Generator().manual_seed(12)
    table = make_table(17, 6, torch.float32, True, gen)
    rows, offsets = make_bags(2, 5, 6, 17, gen)
    weights = torch.rand(rows.numel(), generator=gen)
    modes = torch.tensor([MODE_MEAN, MODE_SUM])
    got = pooled_lookup_reference(table, rows, offsets, 5, modes, weights)
    torch.testing.assert_close(got.double(), loop_forward(table, rows, offsets, 5, modes, weights))
    grad_out = torch.randn(5, 2, 6, generator=gen)
    uniq, inv = torch.unique(rows, return_inverse=True)
    g = pooled_lookup_backward_reference(grad_out, rows, offsets, 5, modes, weights, uniq, inv)
    want = loop_backward(grad_out, rows, offsets, 5, modes, weights, 17)
    torch.testing.assert_close(densify(g, 17), want)


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_benchmark_shape_small(dtype) -> None:
    """Benchmark-like layout (20 ids/bag, dim 64) at a small batch, Triton vs reference."""
    gen = torch.Generator().manual_seed(13)
    num_keys, batch, dim, num_rows = 26, 512, 64, 100_000
    table = PagedTensor(dim, dtype=dtype, device="cuda", page_rows=16384)
    table.append_rows(num_rows)
    table.scatter_rows(
        torch.arange(num_rows, device="cuda"), torch.randn(num_rows, dim, generator=gen).cuda()
    )
    lengths = torch.randint(0, 41, (num_keys * batch,), generator=gen)
    offsets = torch.zeros(num_keys * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n = int(offsets[-1])
    zipf = (torch.rand(n, generator=gen) ** 4 * num_rows).long()
    zipf[torch.rand(n, generator=gen) < 0.01] = -1
    rows, offsets = zipf.cuda(), offsets.cuda()
    weights = torch.rand(n, generator=gen).cuda()
    modes = torch.randint(0, 2, (num_keys,), generator=gen).cuda()
    with kernels.use_backend("torch"):
        ref = pooled_lookup(table, rows, offsets, batch, modes, weights)
    with kernels.use_backend("triton"):
        got = pooled_lookup(table, rows, offsets, batch, modes, weights)
    torch.testing.assert_close(got.float(), ref.float(), **tol(dtype))
    grad_out = torch.randn(batch, num_keys, dim, device="cuda")
    uniq, inv = torch.unique(rows, return_inverse=True)
    with kernels.use_backend("torch"):
        gref = pooled_lookup_backward(grad_out, rows, offsets, batch, modes, weights, uniq, inv)
    with kernels.use_backend("triton"):
        gtri = pooled_lookup_backward(grad_out, rows, offsets, batch, modes, weights, uniq, inv)
    assert torch.equal(gref.rows, gtri.rows)
    torch.testing.assert_close(gtri.values, gref.values, atol=1e-3, rtol=1e-4)
