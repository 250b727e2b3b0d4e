"""Tiered tables (``TableConfig(hbm_budget=...)``): the same training as an all-GPU table.

On a CPU the two tiers are two sets of host pages; on a GPU the host tier is pinned memory
the kernels read in place. Either way every result must equal the untiered table's.
"""

from __future__ import annotations

import pytest
import torch

from recstack.core import KeyedJaggedTensor, kernels
from recstack.embedding_engine import (
    ConfigError,
    EmbeddingCollection,
    Eviction,
    FeatureConfig,
    TableConfig,
)
from recstack.sparse_optim import SparseAdam

VOCAB = 3000
DIM = 8


@pytest.fixture(autouse=True)
def _torch_ops_on_cpu(device):
    """The tier logic is what these tests check; on a CPU the torch references stand in
    for the kernels (which their own tests check under the interpreter) to keep it quick."""
    if device.type == "cpu":
        with kernels.use_backend("torch"):
            yield
    else:
        yield


def batches(device: torch.device, n: int, batch: int = 16, seed: int = 0) -> list:
    """Zipf(1.05) ids in a pooled feature, a sequence feature and a one-id feature."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** 1.05
    out = []
    for _ in range(n):
        lengths = [
            torch.randint(0, 5, (batch,), generator=g),  # includes empty bags
            torch.randint(0, 9, (batch,), generator=g),
            torch.ones(batch, dtype=torch.int64),
        ]
        total = int(sum(x.sum() for x in lengths))
        ids = torch.multinomial(zipf, total, replacement=True, generator=g) * 7919 - 10**12
        out.append(
            KeyedJaggedTensor(
                ["bag", "seq", "one"], ids.to(device), lengths=torch.cat(lengths).to(device)
            )
        )
    return out


def collection(
    device: torch.device, budget: int | str | None, eviction: Eviction | None = None
) -> EmbeddingCollection:
    ev = eviction or Eviction()
    tables = [
        TableConfig("item", dim=DIM, hbm_budget=budget, eviction=ev),
        TableConfig("other", dim=DIM, hbm_budget=None if budget is None else 10**9),
    ]
    features = [
        FeatureConfig("bag", "item", pooling="mean"),
        FeatureConfig("seq", "item", pooling="none"),
        FeatureConfig("one", "other"),
    ]
    return EmbeddingCollection(tables, features, device=device, page_rows=64)


def loss_of(out: dict) -> torch.Tensor:
    seq = out["seq"].values
    return (out["bag"] ** 2).sum() + (seq.sum(1) ** 2).sum() + out["one"].sum()


def train(
    ec: EmbeddingCollection,
    data: list,
    *,
    prefetch: bool = False,
    micro: int = 1,
    evict_at: int | None = None,
) -> list[float]:
    opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
    losses = []
    for i in range(0, len(data), micro):
        group = data[i : i + micro]
        for j, kjt in enumerate(group):
            loss = loss_of(ec(kjt))
            loss.backward()
            losses.append(float(loss.detach()))
            if micro > 1:
                opt.accumulate()
            if prefetch and j == len(group) - 1 and i + micro < len(data):
                ec.prefetch(data[i + micro])
        opt.step()
        opt.zero_grad()
        if evict_at is not None and i == evict_at:
            ec.evict(older_than_step=ec.step - 3)
    return losses


def state(ec: EmbeddingCollection, table: str = "item") -> dict[str, torch.Tensor]:
    chunks = list(ec.keyed_states()[table].export_chunks(10**6))
    out = {"ids": torch.cat([c[0] for c in chunks]).cpu()}
    for slot in chunks[0][1]:
        out[slot] = torch.cat([c[1][slot] for c in chunks]).cpu()
    return out


def same(a: torch.Tensor | list[float], b: torch.Tensor | list[float], what: str = "") -> None:
    """Bit-equal on a CPU. On a GPU, sums of several gradients of a row may be added in
    another order when the row sits in another slot (the reductions group by slot), so
    there the last bits may differ."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.is_cuda or b.is_cuda or torch.cuda.is_available():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)
    else:
        assert torch.equal(a, b), what


def assert_same_state(a: EmbeddingCollection, b: EmbeddingCollection) -> None:
    for table in ("item", "other"):
        sa, sb = state(a, table), state(b, table)
        assert sa.keys() == sb.keys()
        assert torch.equal(sa["ids"], sb["ids"])
        for slot in sa:
            same(sa[slot], sb[slot], f"{table}.{slot} differs")


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_tenth_on_the_gpu_trains_exactly_like_all_of_it(device, prefetch):
    data = batches(device, 30)
    full = collection(device, 10**9)
    tiered = collection(device, 80)  # about a tenth of the rows the run makes
    same(train(full, data), train(tiered, data, prefetch=prefetch))
    assert_same_state(full, tiered)
    stats = tiered.tier_stats()["item"]
    assert stats.rows > 9 * stats.device_rows  # most rows live in the host tier
    assert stats.promoted > 0 and stats.host_bytes > 0
    assert 0.0 < stats.hit_rate <= 1.0 and (prefetch or stats.hit_rate < 1.0)
    values = tiered.physical_tables["item"].values
    assert values.device_pages is not None and values.num_pages > values.device_pages
    if device.type == "cuda":
        assert values.pages[0].is_cuda and values.pages[-1].is_pinned()
        for companion in values.companions.values():  # the optimizer's moments too
            assert companion.store.pages[-1].is_pinned()


def test_prefetch_raises_the_hit_rate(device):
    data = batches(device, 30)
    rates = []
    for prefetch in (False, True):
        ec = collection(device, 480)
        train(ec, data, prefetch=prefetch)
        rates.append(ec.tier_stats()["item"].hit_rate)
    assert rates[1] > rates[0]


def test_micro_batches_keep_their_gradients_through_moves(device):
    """Gradients a sparse optimizer accumulates follow the rows a promotion moves."""
    data = batches(device, 24)
    full, tiered = collection(device, 10**9), collection(device, 128)
    same(train(full, data, micro=3), train(tiered, data, micro=3, prefetch=True))
    assert_same_state(full, tiered)


def test_eviction_covers_both_tiers(device):
    data = batches(device, 30)
    full, tiered = collection(device, 10**9), collection(device, 192)
    same(train(full, data, evict_at=15), train(tiered, data, evict_at=15))
    assert_same_state(full, tiered)
    cap = Eviction(policy="lfu", max_rows=700)
    full, tiered = collection(device, 10**9, cap), collection(device, 192, cap)
    same(train(full, data), train(tiered, data))
    assert_same_state(full, tiered)
    assert tiered.num_ids("item") == 700


def test_save_load_and_resume_across_tiers(device):
    data = batches(device, 30)
    tiered = collection(device, 192)
    train(tiered, data[:15])
    # The tiered table's state loads into an all-GPU table and into a tiered one alike.
    loaded = []
    for budget in (10**9, 192):
        target = collection(device, budget)
        for table in ("item", "other"):
            ks = tiered.keyed_states()[table]
            meta = ks.state_metadata()
            for ids, slots in ks.export_chunks(100):
                target.keyed_states()[table].import_chunk(ids, slots, meta)
        target.set_step(tiered.step)
        assert_same_state(tiered, target)
        loaded.append(target)
    # Resumed, both train on exactly alike.
    same(train(loaded[0], data[15:]), train(loaded[1], data[15:], prefetch=True))
    assert_same_state(*loaded)


def test_a_budget_smaller_than_a_batch_reads_the_rest_in_place(device):
    """It degrades, never fails: rows that find no free GPU slot stay in host memory."""
    data = batches(device, 12, batch=64)
    full, tiered = collection(device, 10**9), collection(device, 8)
    same(train(full, data), train(tiered, data, prefetch=True))
    assert_same_state(full, tiered)
    stats = tiered.tier_stats()["item"]
    assert stats.device_rows == 8 and stats.hit_rate < 0.5


def test_lfu_victims_and_restarted_claims_train_alike(device, monkeypatch):
    """An ``lfu`` policy picks victims by counts; when the promotions' claim numbers run
    out they start again (the claims reset) and training goes on unchanged."""
    from recstack.embedding_engine import tiers as tiers_module

    monkeypatch.setattr(tiers_module, "_MAX_TOKEN", 5)
    lfu = Eviction(policy="lfu", max_rows=2000)
    data = batches(device, 20)
    full, tiered = collection(device, 10**9, lfu), collection(device, 96, lfu)
    same(train(full, data), train(tiered, data, prefetch=True))
    assert_same_state(full, tiered)
    rt = tiered.physical_tables["item"].tiers
    assert rt is not None and rt.policy == "lfu" and 1 <= rt._token <= 5
    assert tiered.tier_stats()["item"].promoted > 0
    # The maps are still inverse permutations of each other.
    assert torch.equal(rt.owner[rt.loc], torch.arange(rt.loc.numel(), device=device))


def test_eval_reads_rows_in_either_tier(device):
    data = batches(device, 12)
    full, tiered = collection(device, 10**9), collection(device, 64)
    train(full, data)
    train(tiered, data)
    full.eval()
    tiered.eval()
    with torch.no_grad():
        a, b = full(data[3]), tiered(data[3])
    assert torch.equal(a["bag"], b["bag"]) and torch.equal(a["seq"].values, b["seq"].values)
    ids = data[3]["seq"].values
    rows = tiered.find_rows("item", ids)
    want = tiered.physical_tables["item"].values.gather_rows(rows)
    assert torch.equal(want, b["seq"].values)


def test_a_backward_ten_forwards_late_raises(device):
    data = batches(device, 10)
    ec = collection(device, 16)
    # The ninth forward gives up on the first one, the tenth may move its rows.
    outs = [ec(kjt) for kjt in data]
    sum(loss_of(o) for o in outs[2:]).backward()  # the eight in flight are fine
    with pytest.raises(RuntimeError, match="tiered"):
        loss_of(outs[0]).backward()


@pytest.mark.parametrize("forwards", [2, 5])
def test_several_forwards_then_one_backward_are_fine(device, forwards):
    """Rows of forwards whose backward is pending never move, even when the next forward
    wants them (a row in both batches in host memory stays there)."""
    data = batches(device, 4 * forwards)
    full, tiered = collection(device, 10**9), collection(device, 32)
    for ec in (full, tiered):
        opt = SparseAdam(ec.sparse_parameters(), lr=0.05)
        for i in range(0, len(data), forwards):
            group = data[i : i + forwards]
            sum(loss_of(ec(kjt)) for kjt in group).backward()
            if i + forwards < len(data):
                ec.prefetch(data[i + forwards])
            opt.step()
            opt.zero_grad()
    assert_same_state(full, tiered)
    assert tiered.tier_stats()["item"].promoted > 0


def test_a_byte_budget_counts_the_optimizer_slots(device):
    ec = collection(device, "16KiB")
    values = ec.physical_tables["item"].values
    train(ec, batches(device, 4))
    tiers = ec.physical_tables["item"].tiers
    assert tiers is not None
    # values (8 fp32) + Adam's two moments (16 fp32) + bookkeeping per row
    assert tiers.row_bytes() == (8 + 16) * 4 + 49
    assert tiers.device_rows == (16 * 1024 // tiers.row_bytes()) // values.page_rows * (
        values.page_rows
    )
    stats = ec.memory_stats()["item"]
    assert stats.host > 0


def test_budget_config_errors():
    with pytest.raises(ConfigError, match="'item'.*size"):
        TableConfig("item", dim=4, hbm_budget="lots")
    with pytest.raises(ConfigError, match="'item'.*hbm_budget"):
        TableConfig("item", dim=4, hbm_budget=0)
    with pytest.raises(ConfigError, match="fixed-size"):
        TableConfig("item", dim=4, fixed_size=10, hbm_budget=5)
    t = TableConfig("item", dim=4, hbm_budget=" 2GiB")
    assert t.hbm_budget == "2GiB" and TableConfig.from_dict(t.to_dict()) == t


def test_a_tiered_table_is_its_own_physical_table():
    ec = EmbeddingCollection(
        [TableConfig("a", dim=4), TableConfig("b", dim=4), TableConfig("c", dim=4, hbm_budget=9)],
        [FeatureConfig("a", "a"), FeatureConfig("b", "b"), FeatureConfig("c", "c")],
    )
    assert list(ec.physical_tables) == ["a+b", "c"] and ec.tiered_tables == ("c",)
    assert ec.physical_tables["c"].tiers is not None
    assert ec.physical_tables["a+b"].tiers is None
    assert ec.tier_stats()["c"].lookups == 0
    ec.prefetch(KeyedJaggedTensor(["a", "b", "c"], torch.tensor([1, 2]), torch.tensor([1, 0, 1])))


def test_moving_a_tiered_collection_keeps_its_placement():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = torch.device("cpu")
    data = batches(cpu, 6)
    ec = collection(cpu, 64)
    train(ec, data)
    before = state(ec)
    ec.cuda()
    values = ec.physical_tables["item"].values
    assert values.pages[0].is_cuda and values.pages[-1].is_pinned()
    after = state(ec)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_kernels_read_and_update_both_tiers(device):
    """The same check with the Triton kernels (the interpreter on a CPU)."""
    data = batches(device, 5, batch=6)
    with kernels.use_backend("auto"):
        full, tiered = collection(device, 10**9), collection(device, 16)
        same(train(full, data), train(tiered, data, prefetch=True))
    assert_same_state(full, tiered)
    assert tiered.tier_stats()["item"].promoted > 0
