"""Batch builders and collections shared by the Embedding Engine tests."""

from __future__ import annotations

import zlib

import torch

from recstack.core import KeyedJaggedTensor, SparseGrad
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, Initializer, TableConfig

#: Rows of the fixed-size table of :func:`fixed_collection`.
VOCAB = 10

#: One initializer of every kind (a truncated normal mirrored to the left tail too).
INIT_KINDS = [
    Initializer.zeros(),
    Initializer.constant(-0.75),
    Initializer.uniform(-0.3, 0.5),
    Initializer.normal(0.1, 2.0),
    Initializer.truncated_normal(0.0, 1.0),
    Initializer.truncated_normal(1.0, 0.5, -1.0, 3.0),
    Initializer.xavier_uniform(1.5),
    Initializer.xavier_normal(),
]


def kjt(device: torch.device, **bags: list[int]) -> KeyedJaggedTensor:
    """One bag per feature holding all its ids (batch size 1)."""
    keys = list(bags)
    values = [i for k in keys for i in bags[k]]
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64, device=device),
        lengths=torch.tensor([len(bags[k]) for k in keys], dtype=torch.int64, device=device),
        stride=1,
    )


def seed(*parts: object) -> int:
    """A generator seed that depends on the test's parameters only."""
    return zlib.crc32(repr(parts).encode())


def bags_kjt(
    bags: dict[str, list[list[int]]],
    device: torch.device,
    weights: dict[str, list[list[float]]] | None = None,
) -> KeyedJaggedTensor:
    """A key-major KJT from ``{feature: [bag ids, ...]}`` (every feature has B bags)."""
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    w = None
    if weights is not None:
        flat = [x for k in keys for bag in weights[k] for x in bag]
        w = torch.tensor(flat, dtype=torch.float32, device=device)
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64, device=device),
        lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
        weights=w,
        stride=len(next(iter(bags.values()))) if bags else 0,
    )


def random_bags(
    gen: torch.Generator, batch: int, max_len: int, vocab: int, *, lo: int = 0
) -> list[list[int]]:
    """Ragged bags (empty and length-1 included) over a small vocabulary (many repeats)."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
    if batch > 1:
        lengths[0], lengths[1] = 0, 1
    return [torch.randint(lo, lo + vocab, (n,), generator=gen).tolist() for n in lengths]


def densify(grad: SparseGrad, num_rows: int, dim: int) -> torch.Tensor:
    """A coalesced gradient as a dense ``[num_rows, dim]`` fp32 table gradient."""
    rows = grad.rows
    assert grad.is_coalesced
    if rows.numel() > 1:
        assert bool((rows[1:] > rows[:-1]).all()), "rows must be sorted and unique"
    dense = torch.zeros((num_rows, dim), dtype=torch.float32, device=rows.device)
    dense[rows] = grad.values.to(torch.float32)
    return dense


def fixed_collection(device: torch.device, dim: int = 4, **kw: object) -> EmbeddingCollection:
    """A fixed-size table ``cat`` (``VOCAB`` rows) read by every pooling, and a dynamic
    table ``item`` of the same ``(dim, dtype)``, which it would merge with were it dynamic."""
    tables = [
        TableConfig("cat", dim=dim, fixed_size=VOCAB, initializer=Initializer.normal(std=0.5)),
        TableConfig("item", dim=dim),
    ]
    features = [
        FeatureConfig("c_sum", "cat", pooling="sum"),
        FeatureConfig("c_mean", "cat", pooling="mean"),
        FeatureConfig("c_seq", "cat", pooling="none"),
        FeatureConfig("c_tile", "cat", pooling="tile", max_len=3),
        FeatureConfig("items", "item", pooling="sum"),
    ]
    return EmbeddingCollection(tables, features, device=device, **kw)  # type: ignore[arg-type]
