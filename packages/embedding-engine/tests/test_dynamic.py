"""DynamicEmbedding: nn.Embedding / nn.EmbeddingBag calling conventions over a hash table."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.embedding_engine import DynamicEmbedding, Eviction, TableConfig, init_rows
from recstack.embedding_engine.config import Initializer

DIM = 6


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def table(name: str = "t", **kw) -> TableConfig:
    return TableConfig(name, dim=DIM, initializer=Initializer("normal", std=0.5), **kw)


def test_rows_per_id(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("rows", backend))
    emb = DynamicEmbedding(table(), device=device)
    ids = torch.randint(-(10**12), 10**12, (4, 5), generator=gen)
    ids[1, 2] = ids[0, 0]  # a repeat maps to the same row
    out = emb(ids.to(device))
    assert out.shape == (4, 5, DIM) and out.dtype == torch.float32
    assert len(emb) == len(set(ids.flatten().tolist()))
    cfg = emb.table
    # On the table's device: the backend this test forces must run there (init_rows gives
    # the same rows on every device; test_init_rows checks that bit for bit).
    want = init_rows(ids.flatten().to(device), DIM, cfg.initializer, seed=cfg.init_seed)
    want = want.cpu().view(4, 5, DIM)
    torch.testing.assert_close(out.cpu(), want)
    rows = emb.find_rows(ids.to(device))
    assert rows.shape == (4, 5) and int(rows[1, 2]) == int(rows[0, 0])
    torch.testing.assert_close(emb.values[rows.cpu()].cpu(), want)
    # Scalars and empty batches keep torch's shapes.
    assert emb(torch.tensor(7, device=device)).shape == (DIM,)
    assert emb(torch.zeros((0, 3), dtype=torch.int64, device=device)).shape == (0, 3, DIM)


def test_backward_sums_per_row(backend, device) -> None:
    gen = torch.Generator().manual_seed(seed("grad", backend))
    emb = DynamicEmbedding(table(), device=device)
    ids = torch.randint(0, 9, (30,), generator=gen)
    g = torch.randn(30, DIM, generator=gen)
    (emb(ids.to(device)) * g.to(device)).sum().backward()
    grad = emb.sparse_grad()
    assert grad is not None and grad.is_coalesced
    rows = emb.find_rows(ids.to(device)).cpu()
    dense = torch.zeros(len(emb), DIM).index_add_(0, rows, g)
    assert grad.rows.tolist() == sorted(set(rows.tolist()))
    torch.testing.assert_close(grad.values.cpu(), dense[grad.rows.cpu()], atol=1e-5, rtol=1e-5)
    emb.zero_grad_sparse()
    assert emb.sparse_grad() is None


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bags_match_embedding_bag(backend, device, mode) -> None:
    gen = torch.Generator().manual_seed(seed("bags", backend, mode))
    emb = DynamicEmbedding(table("bags"), mode=mode, device=device)
    lengths = torch.tensor([3, 0, 1, 5, 2])  # ragged, one empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    ids = torch.randint(0, 2**40, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(ids.numel(), generator=gen)
    for w in (None, weights):
        got = emb(ids.to(device), offsets.to(device), None if w is None else w.to(device)).cpu()
        rows = emb.find_rows(ids.to(device)).cpu()
        ref_mode = "sum" if w is not None else mode
        bag = torch.nn.EmbeddingBag.from_pretrained(emb.values.cpu(), mode=ref_mode)
        want = bag(rows, offsets, per_sample_weights=w)
        if w is not None and mode == "mean":  # EmbeddingBag has no weighted mean
            want = want / lengths.clamp(min=1)[:, None]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_eval_is_read_only(device) -> None:
    emb = DynamicEmbedding(table(), device=device)
    emb(torch.tensor([1, 2], device=device))
    emb.eval()
    out = emb(torch.tensor([2, 99], device=device))
    assert len(emb) == 2  # 99 was not inserted
    cfg = emb.table
    want = init_rows(torch.tensor([99]), DIM, cfg.initializer, seed=cfg.init_seed)
    torch.testing.assert_close(out[1:].cpu(), want)


def test_eviction_and_steps(device) -> None:
    emb = DynamicEmbedding(table(eviction=Eviction(ttl_steps=1)), device=device)
    emb(torch.tensor([1, 2], device=device))
    emb(torch.tensor([2], device=device))
    assert emb.step == 2
    assert emb.maybe_evict() == 1 and len(emb) == 1  # id 1 was last seen 2 steps ago
    assert emb.evict(min_count=5) == 1 and len(emb) == 0
    emb.set_step(10)
    assert emb.step == 10


def test_errors(device) -> None:
    emb = DynamicEmbedding(table(), device=device)
    with pytest.raises(ValueError, match="need mode='sum' or 'mean'"):
        emb(torch.tensor([1], device=device), torch.tensor([0], device=device))
    with pytest.raises(TypeError, match="ids must be integers"):
        emb(torch.tensor([1.0], device=device))
    # Every int64 is an id (the hash table's slot markers too): nothing is reserved.
    assert emb(torch.tensor([-(2**63), -(2**63) + 2], device=device)).shape == (2, emb.dim)
    assert emb.find_rows(torch.tensor([-(2**63), -(2**63) + 2], device=device)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="mode must be None, 'sum' or 'mean'"):
        DynamicEmbedding(table(), mode="max")
    bag = DynamicEmbedding(table(), mode="sum", device=device)
    ids = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(ValueError, match="offsets must start at 0, be non-decreasing"):
        bag(ids, torch.tensor([0, 2, 1], device=device))
    with pytest.raises(ValueError, match="offsets must start at 0"):
        bag(ids, torch.tensor([1], device=device))
    with pytest.raises(ValueError, match="stay within len"):
        bag(ids, torch.tensor([0, 5], device=device))
    with pytest.raises(TypeError, match="offsets must be a torch.Tensor"):
        bag(ids)
    with pytest.raises(ValueError, match=r"per_sample_weights must be a tensor of shape \(3,\)"):
        bag(ids, torch.tensor([0], device=device), torch.ones(2, device=device))
    with pytest.raises(ValueError, match="ids must be 1-D"):
        bag(ids.view(1, 3), torch.tensor([0], device=device))
