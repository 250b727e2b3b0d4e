"""The lookup's gradient reduced by row: sort_ids, lookup_grad_sums and lookup_backward.

Triton kernels and torch references against a dense oracle (every id's contribution added
into a ``[num_rows, dim]`` array one at a time), on fresh random ragged inputs.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import PagedTensor, kernels
from recstack.embedding_engine.autograd import LookupPlan, RowSort, lookup_backward
from recstack.embedding_engine.dedup import sort_ids
from recstack.embedding_engine.kernels.lookup_grad import lookup_grad_sums
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def ragged_lookup(gen: torch.Generator, num_keys: int, batch: int, max_len: int, n_seq: int):
    """Key-major bag offsets (some empty) over ``N_p`` pooled ids, then ``n_seq`` sequence ids."""
    lengths = torch.randint(0, max_len + 1, (num_keys * batch,), generator=gen)
    offsets = torch.zeros(num_keys * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return offsets, int(offsets[-1]) + n_seq


def oracle(rows, offsets, batch, modes, weights, grad_pooled, grad_seq, num_rows, dim):
    """Dense ``[num_rows, dim]``: each id's gradient added in one at a time."""
    dense = torch.zeros(num_rows, dim, dtype=torch.float64)
    n_pooled = int(offsets[-1])
    for bag in range(offsets.numel() - 1):
        k, b = divmod(bag, batch)
        lo, hi = int(offsets[bag]), int(offsets[bag + 1])
        for j in range(lo, hi):
            if grad_pooled is None or rows[j] < 0:
                continue
            scale = 1.0 / (hi - lo) if modes[k] == MODE_MEAN else 1.0
            if weights is not None:
                scale *= float(weights[j])
            dense[rows[j]] += grad_pooled[b, k].double() * scale
    if grad_seq is not None:
        for j in range(n_pooled, rows.numel()):
            dense[rows[j]] += grad_seq[j - n_pooled].double()
    return dense


CASES = [
    # num_keys, batch, max_len, n_seq, dim, weighted, pooled grad, sequence grad
    (0, 3, 0, 0, 4, False, True, True),  # no ids at all
    (1, 1, 1, 0, 1, False, True, False),  # a length-1 bag
    (0, 2, 0, 1, 3, False, False, True),  # one sequence id
    (3, 5, 7, 9, 8, True, True, True),  # ragged, weighted, both kinds
    (2, 9, 12, 0, 70, False, True, False),  # dim past one column tile
    (2, 4, 6, 11, 5, False, False, True),  # the pooled output did not reach the loss
    (4, 16, 20, 40, 16, True, True, True),  # many tiles
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relabel", [False, True])
def test_lookup_grad_sums_matches_dense_oracle(backend, device, case, relabel) -> None:
    num_keys, batch, max_len, n_seq, dim, weighted, has_p, has_s = case
    gen = torch.Generator().manual_seed(seed(case, relabel))
    offsets, n = ragged_lookup(gen, num_keys, batch, max_len, n_seq)
    n_pooled = int(offsets[-1])
    num_rows = 23
    rows = torch.randint(0, num_rows, (n,), generator=gen)
    if n > 3:
        rows[torch.randint(0, n, (n // 3,), generator=gen)] = 5  # a hot row
    modes = torch.randint(0, 2, (num_keys,), generator=gen)
    weights = torch.rand(n_pooled, generator=gen) if weighted else None
    grad_pooled = torch.randn(batch, num_keys, dim, generator=gen) if has_p else None
    grad_seq = torch.randn(n_seq, dim, generator=gen) if has_s else None
    want = oracle(rows, offsets, batch, modes, weights, grad_pooled, grad_seq, num_rows, dim)

    s = sort_ids(rows)
    seg_dest = None
    out_rows = s.unique
    if relabel:
        # Labels in some other order than the rows (as a hash table hands rows out).
        perm = torch.randperm(s.num_unique, generator=gen)
        seg_rows = s.unique[perm]
        out_rows, rank = torch.sort(seg_rows)
        seg_dest = torch.empty_like(rank)
        seg_dest[rank] = torch.arange(rank.numel())
        relabelled = torch.argsort(perm)  # old label -> new label
        sorted_seg = relabelled[s.sorted_seg.long()].to(s.sorted_seg.dtype)
    else:
        sorted_seg = s.sorted_seg
    bag_of = torch.repeat_interleave(offsets[1:] - offsets[:-1], output_size=n_pooled)
    lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).float()
    mean = modes.repeat_interleave(batch) == MODE_MEAN
    bag_scale = torch.where(mean, 1.0 / lengths, torch.ones_like(lengths))

    def dev(t):
        return None if t is None else t.to(device)

    got = lookup_grad_sums(
        dev(s.order),
        dev(sorted_seg),
        s.num_unique,
        dev(seg_dest),
        dim,
        grad_pooled=dev(grad_pooled),
        bag_of=dev(bag_of),
        bag_scale=dev(bag_scale),
        weights=dev(weights),
        batch_size=batch,
        n_pooled=n_pooled,
        grad_sequence=dev(grad_seq),
        tile_elems=64,  # many tiles: runs of the hot row cross tile boundaries
    )
    assert got.shape == (s.num_unique, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want[out_rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 2, 257])
def test_sort_ids_matches_torch_unique(device, n) -> None:
    gen = torch.Generator().manual_seed(seed("sort", n))
    ids = torch.randint(-(2**62), 2**62, (n,), generator=gen)
    if n > 2:
        ids[torch.randint(0, n, (n // 2,), generator=gen)] = int(ids[0])
    s = sort_ids(ids.to(device))
    unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    assert s.unique.tolist() == unique.tolist() and s.num_unique == unique.numel()
    assert s.inverse.tolist() == inverse.tolist() and s.counts.tolist() == counts.tolist()
    assert sorted(s.order.tolist()) == list(range(n))
    assert s.sorted_seg.tolist() == inverse[s.order.cpu()].tolist()
    assert s.sorted_seg.dtype == torch.int32


def test_sort_ids_reads_the_callers_flags_in_its_sync(device) -> None:
    ids = torch.tensor([5, -1, 5], device=device)
    flags = [(ids < 0).any(), (ids > 9).any()]
    assert sort_ids(ids, read_with=flags).read == (1, 0)
    assert sort_ids(ids[:0], read_with=flags).read == (1, 0)
    assert sort_ids(ids).read == ()


def test_sort_ids_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="1-D int64"):
        sort_ids(torch.tensor([1, 2], dtype=torch.int32))


def test_lookup_backward_with_and_without_the_forward_sort(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("plan", backend))
    num_keys, batch, dim, n_seq = 3, 6, 4, 13
    offsets, n = ragged_lookup(gen, num_keys, batch, 9, n_seq)
    n_pooled = int(offsets[-1])
    # Rows handed out in no particular order, like a hash table's.
    keys = torch.randint(0, 40, (n,), generator=gen)
    row_of_key = torch.randperm(40, generator=gen)
    rows = row_of_key[keys]
    modes = torch.tensor([MODE_SUM, MODE_MEAN, MODE_SUM])
    weights = torch.rand(n_pooled, generator=gen)
    grad_p = torch.randn(batch, num_keys, dim, generator=gen)
    grad_s = torch.randn(n_seq, dim, generator=gen)
    want = oracle(rows, offsets, batch, modes, weights, grad_p, grad_s, 40, dim)
    s = sort_ids(keys.to(device))
    row_sort = RowSort(
        s.order, s.sorted_seg, row_of_key.to(device)[s.unique], s.num_unique, rows_sorted=False
    )
    table = PagedTensor.wrap(torch.zeros(40, dim, device=device))
    for given in (None, row_sort):
        plan = LookupPlan(
            name="t",
            table=table,
            batch_size=batch,
            pooled_rows=rows[:n_pooled].to(device),
            pooled_offsets=offsets.to(device),
            modes=modes.to(device),
            weights=weights.to(device),
            sequence_rows=rows[n_pooled:].to(device),
            row_sort=given,
        )
        with kernels.count_launches() as launches:
            g = lookup_backward(plan, grad_p.to(device), grad_s.to(device))
        assert g.is_coalesced and g.rows.tolist() == sorted(set(rows.tolist()))
        torch.testing.assert_close(g.values.cpu().double(), want[g.rows.cpu()], atol=1e-5, rtol=0)
        suffix = "" if backend == "triton" else "_reference"
        assert launches[f"lookup_grad_sums{suffix}"] == 1
        # Neither output reached the loss: no rows at all.
        assert lookup_backward(plan, None, None).rows.numel() == 0


def test_narrow_tiles_get_a_warp_per_128_rows():
    # A warp scanning more rows spills registers on sm_90 (core's compile check); tables
    # of dim 16 and wider keep the tuned default.
    from recstack.embedding_engine.kernels.lookup_grad import GRAD_DEFAULTS, lookup_grad_warps

    for dim in (1, 2, 4, 8, 16, 64, 256):
        block_n = max(2, GRAD_DEFAULTS["tile_elems"] // dim)
        warps = lookup_grad_warps(block_n)
        assert (block_n // warps <= 128 or warps == 8) and warps <= 8
        if dim >= 16:
            assert warps == GRAD_DEFAULTS["num_warps"]
