"""The fused backward (an optimizer's row update applied where the gradient is reduced)
against the unfused one followed by the same update, with an updater defined here (the
engine never imports the sparse optimizers): kernel level on ragged lookups whose hot rows
cross tile boundaries, and through EmbeddingCollection / DynamicEmbedding."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import KeyedJaggedTensor, PagedTensor, RowUpdate, kernels
from recstack.core.kernels.row_update import apply_row_update
from recstack.embedding_engine import (
    Admission,
    DynamicEmbedding,
    EmbeddingCollection,
    FeatureConfig,
    TableConfig,
)
from recstack.embedding_engine.autograd import (
    LookupPlan,
    RowSort,
    lookup_backward,
    lookup_backward_fused,
)
from recstack.embedding_engine.dedup import sort_ids
from recstack.embedding_engine.kernels import lookup_grad, lookup_grad_update
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM

if kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(
        w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
        VARIANT: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr,
        FLAG_C: tl.constexpr,
    ):  # fmt: skip
        # Momentum SGD; VARIANT 1 adds a per-row update count scaling the step (whole rows).
        a0 = s0[:, None] + cols[None, :]
        buf = p1 * tl.load(a0, mask=mask, other=0.0) + g
        tl.store(a0, buf, mask=mask)
        step = lr * buf
        if VARIANT == 1:
            cnt = tl.load(s1, mask=row_ok, other=0.0) + 1.0
            tl.debug_barrier()  # every thread holding a row's count reads it before a store
            tl.store(s1, cnt, mask=row_ok)
            step = step * cnt[:, None]
        return w - step
else:
    _tile = None


class MomentumUpdater:
    """A core RowUpdater training one table: momentum SGD (+ a per-row step count)."""

    def __init__(self, table: PagedTensor, per_row: bool = False, lr: float = 0.1) -> None:
        self.table, self.per_row, self.lr = table, per_row, lr
        self.slots = [PagedTensor(table.dim, torch.float32, table.device, name="m")]
        if per_row:
            self.slots.append(PagedTensor(1, torch.float32, table.device, name="n"))
        self.began = 0
        self.ended: list[bool] = []

    def begin_row_update(self, table: PagedTensor) -> RowUpdate | None:
        if table is not self.table:
            return None
        for s in self.slots:
            s.ensure_rows(table.num_rows)
        self.began += 1
        return RowUpdate(
            "MomentumUpdater", _tile, self.reference, self.lr, (0.9,), int(self.per_row),
            slots=tuple(self.slots), whole_rows=self.per_row,
        )  # fmt: skip

    def end_row_update(self, table: PagedTensor, *, gate: torch.Tensor) -> None:
        self.ended.append(bool(gate[1]))

    def reference(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        buf = 0.9 * self.slots[0].gather_rows(rows) + grad
        self.slots[0].scatter_rows(rows, buf)
        step = self.lr * buf
        if self.per_row:
            cnt = self.slots[1].gather_rows(rows) + 1
            self.slots[1].scatter_rows(rows, cnt)
            step = step * cnt
        w = self.table.gather_rows(rows).to(torch.float32) - step
        self.table.scatter_rows(rows, w)

    def dense(self) -> list[torch.Tensor]:
        return [self.table.to_dense().float().cpu()] + [s.to_dense().cpu() for s in self.slots]


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few ids, so hot rows span tiles and take the crossing path."""
    monkeypatch.setitem(lookup_grad.GRAD_DEFAULTS, "tile_elems", 64)
    monkeypatch.setitem(lookup_grad_update.FUSED_GRAD_DEFAULTS, "tile_elems", 64)


def _plan(gen, device, dim: int, relabel: bool, num_rows: int = 30):
    num_keys, batch, n_seq = 3, 7, 23
    lengths = torch.randint(0, 12, (num_keys * batch,), generator=gen)
    offsets = torch.zeros(num_keys * batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n_pooled = int(offsets[-1])
    n = n_pooled + n_seq
    keys = torch.randint(0, num_rows, (n,), generator=gen)
    keys[torch.randint(0, n, (n // 2,), generator=gen)] = 4  # a hot row over many tiles
    if relabel:
        # Rows handed out in no particular order, like a hash table's.
        row_of_key = torch.randperm(num_rows, generator=gen)
        rows = row_of_key[keys]
        s = sort_ids(keys.to(device))
        row_sort = RowSort(
            s.order, s.sorted_seg, row_of_key.to(device)[s.unique], s.num_unique,
            rows_sorted=False,
        )  # fmt: skip
    else:
        # Labels are the rows themselves (every row in [0, U) used).
        rows = torch.unique(keys, return_inverse=True)[1]
        s = sort_ids(rows.to(device))
        row_sort = RowSort(s.order, s.sorted_seg, None, s.num_unique)
    table = PagedTensor(dim, torch.float32, device, page_rows=8, name="t")
    table.append_rows(num_rows)
    table.scatter_rows(
        torch.arange(num_rows, device=device), torch.randn(num_rows, dim, generator=gen).to(device)
    )
    plan = LookupPlan(
        name="t",
        table=table,
        batch_size=batch,
        pooled_rows=rows[:n_pooled].to(device),
        pooled_offsets=offsets.to(device),
        modes=torch.tensor([MODE_SUM, MODE_MEAN, MODE_SUM], device=device),
        weights=torch.rand(n_pooled, generator=gen).to(device),
        sequence_rows=rows[n_pooled:].to(device),
        row_sort=row_sort,
    )
    grad_p = torch.randn(batch, num_keys, dim, generator=gen).to(device)
    grad_s = torch.randn(n_seq, dim, generator=gen).to(device)
    return plan, grad_p, grad_s


def _copy_table(t: PagedTensor) -> PagedTensor:
    c = PagedTensor(t.dim, t.dtype, t.device, page_rows=t.page_rows, name=t.name)
    c.append_rows(t.num_rows)
    c.scatter_rows(torch.arange(t.num_rows, device=t.device), t.to_dense())
    return c


FUSED_CASES = [
    # dim, per-row state (whole rows), rows relabelled, outputs reaching the loss
    (1, False, False, "both"),
    (4, True, True, "both"),
    (4, True, False, "both"),
    (70, False, True, "both"),  # past one column tile
    (4, False, True, "pooled"),
    (70, True, False, "sequence"),
]


@pytest.mark.parametrize("dim, per_row, relabel, outputs", FUSED_CASES)
@pytest.mark.parametrize("one_pass", [False, True])
def test_fused_backward_matches_unfused_then_update(
    backend, device, small_tiles, dim, per_row, relabel, outputs, one_pass
) -> None:
    gen = torch.Generator().manual_seed(seed(dim, per_row, relabel, outputs))
    plan, grad_p, grad_s = _plan(gen, device, dim, relabel)
    if outputs == "pooled":
        grad_s = None
    elif outputs == "sequence":
        grad_p = None
    expect = MomentumUpdater(_copy_table(plan.table), per_row)
    fused = MomentumUpdater(plan.table, per_row)
    for _ in range(2):
        with kernels.use_backend("torch"):
            g = lookup_backward(plan, grad_p, grad_s)
            update = expect.begin_row_update(expect.table)
            assert update is not None
            apply_row_update(update, expect.table, g.rows, g.values)
        update = fused.begin_row_update(plan.table)
        assert update is not None
        gate = lookup_backward_fused(plan, grad_p, grad_s, update, one_pass=one_pass)
        assert gate.tolist() == [0, 0]
    for got, want in zip(fused.dense(), expect.dense(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_pass", [False, True])
def test_fused_backward_with_nonfinite_gradient_writes_nothing(
    backend, device, small_tiles, one_pass
) -> None:
    gen = torch.Generator().manual_seed(5)
    plan, grad_p, grad_s = _plan(gen, device, 4, True)
    updater = MomentumUpdater(plan.table)
    grad_s[3, 1] = float("nan")
    update = updater.begin_row_update(plan.table)
    assert update is not None
    before = updater.dense()
    gate = lookup_backward_fused(plan, grad_p, grad_s, update, one_pass=one_pass)
    assert gate.tolist() == [0, 1]
    for got, want in zip(updater.dense(), before, strict=True):
        assert torch.equal(got, want)


def _kjt(device, batch: list[tuple[list[int], ...]]) -> KeyedJaggedTensor:
    """Per sample: ids of features a (sum), b (weighted mean), c (sequence) of table t and
    d (sum) of table other; key-major."""
    keys = ["a", "b", "c", "d"]
    values, lengths, weights = [], [], []
    for k in range(4):
        for sample in batch:
            values += sample[k]
            lengths.append(len(sample[k]))
            weights += [0.5 + 0.1 * (i % 3) for i in sample[k]]
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64, device=device),
        lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
        weights=torch.tensor(weights, device=device),
    )


def _collection(device, admission: Admission | None = None) -> EmbeddingCollection:
    extra = {"admission": admission} if admission is not None else {}
    return EmbeddingCollection(
        [TableConfig("t", dim=6, **extra), TableConfig("other", dim=3)],
        [
            FeatureConfig("a", "t"),
            FeatureConfig("b", "t", pooling="mean", weighted=True),
            FeatureConfig("c", "t", pooling="none"),
            FeatureConfig("d", "other"),
        ],
        device=device,
    )


def _batches(gen, device, steps: int) -> list[KeyedJaggedTensor]:
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(5):
            sizes = torch.randint(0, 6, (4,), generator=gen).tolist()
            batch.append(tuple(torch.randint(0, 12, (k,), generator=gen).tolist() for k in sizes))
        out.append(_kjt(device, batch))
    return out


def _loss(ec: EmbeddingCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    out = ec(kjt)
    seq = out["c"].values
    return (out["a"] ** 2).sum() + (out["b"] * 3).sum() + (seq**3).sum() + (out["d"] ** 2).sum()


@pytest.mark.parametrize("admission", [None, Admission(min_count=2)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("one_pass", [False, True])
def test_collection_fused_mode_matches_unfused(
    backend, device, small_tiles, admission, per_row, one_pass
) -> None:
    gen = torch.Generator().manual_seed(seed("ec", admission, per_row))
    batches = _batches(gen, device, 3)
    ec_f, ec_u = _collection(device, admission), _collection(device, admission)
    fused = MomentumUpdater(ec_f.physical_tables["t"].values, per_row)
    plain = MomentumUpdater(ec_u.physical_tables["t"].values, per_row)
    ec_f.fuse_optimizer(fused, one_pass=one_pass)
    assert ec_f.fused_optimizer is fused
    for kjt in batches:
        _loss(ec_f, kjt).backward()
        _loss(ec_u, kjt).backward()
        # The fused table stores no gradient; the other table's is kept as usual.
        assert "t" not in ec_f.sparse_grads() and "other" in ec_f.sparse_grads()
        torch.testing.assert_close(
            ec_f.sparse_grads()["other"].values, ec_u.sparse_grads()["other"].values
        )
        g = ec_u.sparse_grads()["t"]
        update = plain.begin_row_update(plain.table)
        assert update is not None
        apply_row_update(update, plain.table, g.rows, g.values)
    assert fused.began == 3 and fused.ended == [False] * 3
    for got, want in zip(fused.dense(), plain.dense(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_collection_fused_mode_nonfinite_and_off_switch(device) -> None:
    ec = _collection(device)
    updater = MomentumUpdater(ec.physical_tables["t"].values)
    ec.fuse_optimizer(updater)
    kjt = _kjt(device, [([1, 2], [3], [4, 4], [1]), ([], [5], [1], [])])
    out = ec(kjt)
    updater.begin_row_update(updater.table)  # grows the state, as the backward will
    updater.began = 0
    before = updater.dense()
    (out["a"].sum() * float("inf")).backward()
    assert updater.ended == [True]
    for got, want in zip(updater.dense(), before, strict=True):
        assert torch.equal(got, want)
    ec.fuse_optimizer(None)
    ec(kjt)["a"].sum().backward()
    assert "t" in ec.sparse_grads() and updater.began == 1


def test_fuse_optimizer_rejects_non_updaters(device) -> None:
    ec = _collection(device)
    with pytest.raises(TypeError, match="RowUpdater protocol"):
        ec.fuse_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))


def test_dynamic_embedding_fused_mode(device) -> None:
    emb = DynamicEmbedding(TableConfig("e", dim=4), device=device)
    updater = MomentumUpdater(emb.table_values)
    emb.fuse_optimizer(updater)
    ids = torch.tensor([[3, 10**12], [3, 7]], device=device)
    emb(ids).sum().backward()
    assert emb.sparse_grad() is None and updater.began == 1
    rows = emb.find_rows(torch.tensor([3, 7], device=device))
    # SGD with lr 0.1 on a gradient of ones: id 3 was read twice.
    assert torch.all(updater.slots[0].gather_rows(rows).cpu() == torch.tensor([[2.0], [1.0]]))
