"""Collection state export/import: round trips, regrouping, resharding and bad chunks."""

from __future__ import annotations

import json

import pytest
import torch
from embedding_testdata import VOCAB, bags_kjt, fixed_collection

from recstack.core import KeyedJaggedTensor, KeyedState, PagedTensor, ShardSpec, owner
from recstack.core.keyed_state import check_json_metadata
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, TableConfig
from recstack.embedding_engine.state import (
    STATE_FORMAT,
    CollectionTableState,
    collection_state_metadata,
    collection_table_states,
    export_collection_chunks,
    import_collection_chunk,
)

TABLES = [
    TableConfig("item", dim=4),
    TableConfig("user", dim=4),
    TableConfig("cat", dim=3, dtype=torch.float16),
    TableConfig("tag", dim=4, dtype="bfloat16"),
]
FEATURES = [
    FeatureConfig("clicks", "item", pooling="mean"),
    FeatureConfig("hist", "item", pooling="none"),
    FeatureConfig("uid", "user"),
    FeatureConfig("cid", "cat"),
    FeatureConfig("tid", "tag", pooling="sum"),
]


def make(merge: bool = True) -> EmbeddingCollection:
    return EmbeddingCollection(TABLES, FEATURES, merge_tables=merge)


def batch(seed: int, n_bags: int = 4, vocab: int = 16) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    names = [f.name for f in FEATURES]
    lengths = torch.randint(0, 4, (len(names) * n_bags,), generator=gen)
    lengths[0], lengths[1] = 0, 1
    values = torch.randint(0, vocab, (int(lengths.sum()),), generator=gen)
    return KeyedJaggedTensor(names, values, lengths=lengths)


def trained(merge: bool = True, seed: int = 0) -> EmbeddingCollection:
    ec = make(merge)
    for s in range(3):
        ec(batch(seed * 10 + s))
    # Make rows differ from their initializer rows, so a missed write would show.
    for phys in ec.physical_tables.values():
        n = phys.values.num_rows
        gen = torch.Generator().manual_seed(seed + n)
        phys.values.scatter_rows(torch.arange(n), torch.randn(n, phys.dim, generator=gen))
    return ec


def as_dict(ec: EmbeddingCollection) -> dict[tuple[str, int], torch.Tensor]:
    """``{(table, id): row}`` of every stored id."""
    out = {}
    for table, keys, slots in export_collection_chunks(ec, chunk_rows=1000):
        for k, row in zip(keys.tolist(), slots["values"], strict=True):
            out[(table, k)] = row
    return out


def assert_same_outputs(a: EmbeddingCollection, b: EmbeddingCollection, seed: int) -> None:
    a.eval()
    b.eval()
    kjt = batch(seed, vocab=24)  # some ids unseen: both read their initializer rows
    out_a, out_b = a(kjt), b(kjt)
    for name in out_a:
        x, y = out_a[name], out_b[name]
        if hasattr(x, "values") and not isinstance(x, torch.Tensor):
            x, y = x.values, y.values
        assert torch.equal(x, y), name


def copy_state(src, dst, chunk_rows: int, **kw) -> int:
    meta = collection_state_metadata(src)
    return sum(
        import_collection_chunk(dst, t, k, s, metadata=meta, **kw)
        for t, k, s in export_collection_chunks(src, chunk_rows)
    )


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("chunk_rows", [1, 7, 1 << 20])
@pytest.mark.parametrize(("merge_src", "merge_dst"), [(True, True), (True, False), (False, True)])
def test_round_trip(chunk_rows: int, merge_src: bool, merge_dst: bool) -> None:
    src = trained(merge_src, seed=chunk_rows)
    dst = make(merge_dst)
    n = copy_state(src, dst, chunk_rows)
    expect = as_dict(src)
    assert n == len(expect) > 0
    got = as_dict(dst)
    assert got.keys() == expect.keys()
    for key, row in expect.items():
        assert torch.equal(got[key], row), key
    assert_same_outputs(src, dst, seed=99)


def test_chunk_shapes_and_order() -> None:
    ec = trained()
    meta = collection_state_metadata(ec)
    chunks = list(export_collection_chunks(ec, chunk_rows=7))
    assert [t for t, _, _ in chunks] == sorted(t for t, _, _ in chunks)
    for table, keys, slots in chunks:
        info = meta["tables"][table]
        assert 1 <= keys.numel() <= 7 and keys.dtype == torch.int64
        assert set(slots) == set(info["slots"]) == {"values", "last_seen", "hit_count"}
        assert slots["values"].shape == (keys.numel(), info["dim"])
        assert str(slots["values"].dtype) == "torch." + info["dtype"]
    for table, info in meta["tables"].items():
        keys = torch.cat([k for t, k, _ in chunks if t == table])
        assert keys.unique().numel() == keys.numel() == info["num_keys"]


def test_export_only_one_table_and_bad_chunk_rows() -> None:
    ec = trained()
    only = list(export_collection_chunks(ec, 5, table="user"))
    assert only and {t for t, _, _ in only} == {"user"}
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        export_collection_chunks(ec, 5, table="nope")
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
        export_collection_chunks(ec, 0)
    with pytest.raises(TypeError, match="chunk_rows must be an int"):
        export_collection_chunks(ec, 2.0)


def test_empty_collection() -> None:
    ec = make()
    assert list(export_collection_chunks(ec, 3)) == []
    meta = collection_state_metadata(ec)
    assert all(info["num_keys"] == 0 for info in meta["tables"].values())
    empty = torch.empty(0, dtype=torch.int64)
    assert import_collection_chunk(ec, "item", empty, {"values": torch.empty(0, 4)}) == 0
    assert list(export_collection_chunks(ec, 3)) == []


def test_one_table_empty_others_not() -> None:
    ec = make()
    kjt = KeyedJaggedTensor(
        [f.name for f in FEATURES],
        torch.tensor([5, 2**40]),
        lengths=torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
    )
    ec(kjt)
    chunks = list(export_collection_chunks(ec, 1))
    assert [(t, k.tolist()) for t, k, _ in chunks] == [("item", [5]), ("tag", [2**40])]


def test_import_overwrites_existing_rows() -> None:
    ec = trained()
    ids = torch.tensor([0, 1, 2, 12345])
    vals = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    assert import_collection_chunk(ec, "user", ids, {"values": vals}) == 4
    rows = ec.find_rows("user", ids)
    phys = ec.physical_tables[ec.physical_table_of("user")]
    assert torch.equal(phys.values.gather_rows(rows), vals)
    assert len(set(rows.tolist())) == 4


def test_import_casts_float_values() -> None:
    ec = make()
    vals = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    import_collection_chunk(ec, "cat", torch.tensor([1, 2, 3]), {"values": vals})
    phys = ec.physical_tables[ec.physical_table_of("cat")]
    got = phys.values.gather_rows(ec.find_rows("cat", torch.tensor([1, 2, 3])))
    assert got.dtype == torch.float16 and torch.equal(got, vals.to(torch.float16))


# ------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("merge", [True, False])
def test_metadata_is_json(merge: bool) -> None:
    ec = trained(merge)
    meta = collection_state_metadata(ec)
    check_json_metadata(meta)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["format"] == STATE_FORMAT and meta["key"] == "logical_id"
    assert set(meta["tables"]) == {t.name for t in TABLES}
    for t in TABLES:
        info = meta["tables"][t.name]
        assert TableConfig.from_dict(info["config"]) == t
        assert info["physical"] == ec.physical_table_of(t.name)
    total = sum(p["num_keys"] for p in meta["physical_tables"].values())
    assert total == sum(info["num_keys"] for info in meta["tables"].values()) == len(as_dict(ec))
    if merge:
        assert meta["physical_tables"]["item+user"]["tag_bits"] == 1


# ------------------------------------------------------------------------------ resharding


@pytest.mark.parametrize("world", [2, 3])
def test_reshard_one_to_many(world: int) -> None:
    src = trained(seed=5)
    expect = as_dict(src)
    ranks = [make() for _ in range(world)]
    kept = [copy_state(src, ranks[r], 7, world_size=world, rank=r) for r in range(world)]
    assert sum(kept) == len(expect)
    parts = [as_dict(ec) for ec in ranks]
    union: dict = {}
    for r, part in enumerate(parts):
        assert not union.keys() & part.keys()  # no id on two ranks
        union.update(part)
        for (_, k), _row in part.items():
            assert int(owner(torch.tensor([k]), world)[0]) == r
    assert union.keys() == expect.keys()
    for key, row in expect.items():
        assert torch.equal(union[key], row)


def test_reshard_many_to_one_with_shardspec() -> None:
    src = trained(seed=6)
    halves = [make(merge=False) for _ in range(2)]
    for r in range(2):
        copy_state(src, halves[r], 16, shard=ShardSpec(2, r))
    merged = make()
    for half in halves:
        copy_state(half, merged, 16)
    assert as_dict(merged).keys() == as_dict(src).keys()
    assert_same_outputs(src, merged, seed=7)


# ------------------------------------------------------------------------------ KeyedState


def test_table_states_are_keyed_state() -> None:
    src, dst = trained(seed=8), make(merge=False)
    states = collection_table_states(src)
    assert list(states) == sorted(t.name for t in TABLES)
    for name, state in states.items():
        assert isinstance(state, KeyedState) and state.table == name
        meta = state.state_metadata()
        check_json_metadata(meta, name)
        target = CollectionTableState(dst, name)
        for keys, slots in state.export_chunks(5):
            target.import_chunk(keys, slots, meta, ShardSpec(1, 0))
    assert_same_outputs(src, dst, seed=9)
    with pytest.raises(KeyError, match="unknown table"):
        CollectionTableState(src, "nope")


# ------------------------------------------------------------------------------ bad chunks


def bad(ec, table="item", keys=None, slots=None, **kw):
    keys = torch.tensor([1, 2]) if keys is None else keys
    slots = {"values": torch.zeros(2, 4)} if slots is None else slots
    return import_collection_chunk(ec, table, keys, slots, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"table": "nope"}, KeyError, "unknown table 'nope'"),
        ({"keys": torch.tensor([1.0, 2.0])}, TypeError, "keys must be int64"),
        ({"keys": torch.tensor([[1, 2]])}, ValueError, "keys must be 1-D"),
        ({"slots": {"values": torch.zeros(3, 4)}}, ValueError, "first dimension"),
        ({"slots": {"values": torch.zeros(2, 5)}}, ValueError, "dim mismatch"),
        ({"slots": {"values": torch.zeros(2, 4, dtype=torch.int32)}}, TypeError, "cast"),
        ({"slots": {"weights": torch.zeros(2, 4)}}, ValueError, "no 'values' slot"),
        (
            {"slots": {"values": torch.zeros(2, 4), "exp_avg": torch.zeros(2, 4)}},
            ValueError,
            "unknown slot",
        ),
        ({"keys": torch.tensor([3, 3])}, ValueError, "repeats ids"),
        ({"world_size": 2, "rank": 2}, ValueError, "rank must be in"),
        ({"shard": ShardSpec(2, 0), "world_size": 2}, ValueError, "not both"),
        ({"metadata": {"format": "x"}}, ValueError, "metadata format"),
    ],
)
def test_bad_chunks(kwargs, error, match) -> None:
    ec = make()
    with pytest.raises(error, match=match):
        bad(ec, **kwargs)
    assert list(export_collection_chunks(ec, 10)) == []  # nothing loaded half-way


@pytest.mark.parametrize("merge", [True, False])
def test_full_int64_range_round_trips(merge: bool) -> None:
    # Merged or not, every int64 id loads, exports and reloads (the hash table's slot
    # markers -2**63 and -2**63 + 1 included), and one id in two tables is two entries.
    keys = torch.tensor([-(2**63), -(2**63) + 1, -(2**63) + 2, 2**63 - 1, -5, 2**62])
    values = torch.arange(24, dtype=torch.float32).view(6, 4)
    src = make(merge=merge)
    for table, vals in (("item", values), ("user", -values)):
        assert bad(src, table=table, keys=keys, slots={"values": vals}) == 6
    want = {(t, k) for t in ("item", "user") for k in keys.tolist()}
    assert as_dict(src).keys() == want
    for other in (True, False):
        dst = make(merge=other)
        copy_state(src, dst, 4)
        got = as_dict(dst)
        assert got.keys() == want
        for i, k in enumerate(keys.tolist()):
            assert torch.equal(got[("item", k)], values[i])
            assert torch.equal(got[("user", k)], -values[i])
    # remove_keys erases one table's ids only.
    state = CollectionTableState(src, "user")
    assert state.remove_keys(keys[:2]) == 2
    assert as_dict(src).keys() == want - {("user", k) for k in keys[:2].tolist()}


def test_metadata_dim_mismatch() -> None:
    src = trained()
    meta = collection_state_metadata(src)
    meta["tables"]["item"]["dim"] = 8
    with pytest.raises(ValueError, match="dim 8"):
        bad(make(), metadata=meta)
    meta = collection_state_metadata(src)
    with pytest.raises(ValueError, match="version"):
        bad(make(), metadata={**meta, "version": 99})


# ------------------------------------------------------------------------------ row metadata


def test_row_metadata_stores_travel() -> None:
    """The collection's per-row metadata (last-seen step, hit count) is exported and loaded."""
    src, dst = trained(seed=3), make()
    slots_info = collection_state_metadata(src)["tables"]["item"]["slots"]
    assert slots_info["last_seen"] == {"dtype": "int64", "shape": []}
    assert slots_info["hit_count"] == {"dtype": "int64", "shape": []}
    copy_state(src, dst, 5)
    expect, got = {}, {}
    for ec, out in ((src, expect), (dst, got)):
        for table, keys, slots in export_collection_chunks(ec, 100):
            assert slots["last_seen"].shape == slots["hit_count"].shape == (keys.numel(),)
            for k, seen, hits in zip(
                keys.tolist(), slots["last_seen"].tolist(), slots["hit_count"].tolist(), strict=True
            ):
                out[(table, k)] = (seen, hits)
    assert got == expect and min(h for _, h in expect.values()) >= 1
    for table in ("item", "user"):
        assert dst.num_ids(table) == src.num_ids(table)
    with pytest.raises(TypeError, match="slot 'last_seen'"):
        bad(dst, slots={"values": torch.zeros(2, 4), "last_seen": torch.zeros(2)})


def test_import_into_rows_freed_by_eviction_starts_them_fresh() -> None:
    """Rows that imported ids take are announced as reset (so per-row state kept
    elsewhere restarts) and get fresh metadata unless the chunk carries it."""
    ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
    kjt = KeyedJaggedTensor(["f"], torch.tensor([11, 22, 11]), lengths=torch.tensor([2, 1]))
    for _ in range(3):
        ec(kjt)
    reset: list[list[int]] = []
    ec.physical_tables["t"].values.on_rows_reset(lambda rows: reset.append(rows.tolist()))
    freed = sorted(ec.find_rows("t", torch.tensor([11, 22])).tolist())
    assert ec.evict(min_count=100) == {"t": 2}
    keys = torch.tensor([44, 55])
    assert import_collection_chunk(ec, "t", keys, {"values": torch.randn(2, 4)}) == 2
    rows = ec.find_rows("t", keys)
    assert sorted(rows.tolist()) == freed
    assert [sorted(r) for r in reset] == [freed]
    meta = ec.physical_tables["t"].meta
    assert meta.counts[rows].tolist() == [0, 0]
    assert meta.last_seen[rows].tolist() == [ec.step, ec.step]
    # Overwriting ids the table holds resets nothing; carried metadata is kept as given.
    reset.clear()
    slots = {"values": torch.randn(2, 4), "hit_count": torch.tensor([5, 6])}
    assert import_collection_chunk(ec, "t", keys, slots) == 2
    assert reset == [] and meta.counts[rows].tolist() == [5, 6]
    slots = {"values": torch.randn(1, 4), "hit_count": torch.tensor([9])}
    assert import_collection_chunk(ec, "t", torch.tensor([77]), slots) == 1
    row = ec.find_rows("t", torch.tensor([77]))
    assert meta.counts[row].tolist() == [9] and len(reset) == 1


# ------------------------------------------------------------------------------ companions


def with_companions(ec: EmbeddingCollection, seed: int) -> None:
    """Give every physical table two companions (as a sparse optimizer's slots)."""
    gen = torch.Generator().manual_seed(seed)
    for phys in ec.physical_tables.values():
        n = phys.values.num_rows
        m = PagedTensor(phys.dim, page_rows=phys.values.page_rows)
        step = PagedTensor(1, page_rows=phys.values.page_rows)
        phys.values.add_companion("m", m)
        phys.values.add_companion("row_step", step, init=0.25)
        m.scatter_rows(torch.arange(n), torch.randn(n, phys.dim, generator=gen))
        step.scatter_rows(torch.arange(n), torch.randint(0, 9, (n, 1), generator=gen).float())


def by_key(ec: EmbeddingCollection, slot: str) -> dict[tuple[str, int], list[float]]:
    out = {}
    for table, keys, slots in export_collection_chunks(ec, chunk_rows=7):
        for k, row in zip(keys.tolist(), slots[slot].tolist(), strict=True):
            out[(table, k)] = row
    return out


@pytest.mark.parametrize(("merge_src", "merge_dst"), [(True, False), (False, True)])
def test_companions_travel_with_their_keys(merge_src: bool, merge_dst: bool) -> None:
    src, dst = trained(merge_src, seed=4), make(merge_dst)
    with_companions(src, seed=4)
    meta = collection_state_metadata(src)
    assert meta["tables"]["item"]["slots"]["row_step"] == {
        "dtype": "float32",
        "shape": [1],
        "companion": True,
        "init": 0.25,
    }
    copy_state(src, dst, 5)
    for phys in dst.physical_tables.values():
        assert list(phys.values.companions) == ["m", "row_step"]
        assert phys.values.companions["row_step"].init == 0.25
        assert phys.values.companions["m"].store.num_rows == phys.values.num_rows
    for slot in ("values", "m", "row_step"):
        assert by_key(dst, slot) == by_key(src, slot), slot
    # A new id in the destination gets the companions' initial values.
    dst(batch(50, vocab=40))
    phys = dst.physical_tables[dst.physical_table_of("user")]
    fresh = set(by_key(dst, "values")) - set(by_key(src, "values"))
    steps = by_key(dst, "row_step")
    assert fresh and all(steps[k] == [0.25] for k in fresh if k[0] in phys.table_names)


def test_undeclared_companion_slots_are_refused() -> None:
    src = trained(seed=5)
    with_companions(src, seed=5)
    table, keys, slots = next(export_collection_chunks(src, chunk_rows=4))
    with pytest.raises(ValueError, match=r"unknown slot\(s\) \['m', 'row_step'\]"):
        import_collection_chunk(make(), table, keys, slots)  # no metadata declares them
    dst = make()
    meta = collection_state_metadata(src)
    bad = {**slots, "m": slots["m"][:, :2]}
    with pytest.raises(ValueError, match="slot 'm'"):
        import_collection_chunk(dst, table, keys, bad, metadata=meta)
    assert not dst.physical_tables[dst.physical_table_of(table)].values.companions
    import_collection_chunk(dst, table, keys, slots, metadata=meta)
    wrong = {**slots, "m": torch.zeros(keys.numel(), 9)}
    with pytest.raises(ValueError, match="slot 'm'.*dim mismatch"):
        import_collection_chunk(dst, table, keys, wrong, metadata=meta)


# ------------------------------------------------------------------------------ deltas


def test_changed_rows_and_removed_keys_since_a_mark() -> None:
    ec = EmbeddingCollection(
        [TableConfig("a", dim=4), TableConfig("b", dim=4)],
        [FeatureConfig("fa", "a"), FeatureConfig("fb", "b")],
    )
    kjt = KeyedJaggedTensor(
        ["fa", "fb"], torch.tensor([1, 2, 3, 7, 8]), lengths=torch.tensor([3, 0, 2, 0])
    )
    ec(kjt)
    states = ec.keyed_states()
    assert set(states) == {"a", "b"} and all(isinstance(s, KeyedState) for s in states.values())
    a, b = states["a"], states["b"]
    assert sorted(torch.cat([k for k, _ in a.export_changed_chunks(10)]).tolist()) == [1, 2, 3]
    assert a.removed_keys().tolist() == []  # no log before the first mark
    a.mark_clean()
    b.mark_clean()
    assert list(a.export_changed_chunks(10)) == [] and list(b.export_changed_chunks(10)) == []
    ec(KeyedJaggedTensor(["fa", "fb"], torch.tensor([2, 4, 8]), lengths=torch.tensor([2, 1])))
    changed = {k: v for k, v in (
        (int(key), row) for keys, slots in a.export_changed_chunks(1)
        for key, row in zip(keys, slots["values"], strict=True))}  # fmt: skip
    assert sorted(changed) == [2, 4]
    assert sorted(torch.cat([k for k, _ in b.export_changed_chunks(10)]).tolist()) == [8]
    assert a.remove_keys(torch.tensor([1, 4, 99])) == 2
    assert a.removed_keys().tolist() == [1, 4]
    assert sorted(torch.cat([k for k, _ in a.export_changed_chunks(10)]).tolist()) == [2]
    assert b.removed_keys().tolist() == []
    # An import marks its rows changed; a mark of one table leaves the other's flags.
    a.mark_clean()
    assert a.removed_keys().tolist() == []
    import_collection_chunk(ec, "a", torch.tensor([50]), {"values": torch.ones(1, 4)})
    assert [k.tolist() for k, _ in a.export_changed_chunks(10)] == [[50]]
    assert sorted(torch.cat([k for k, _ in b.export_changed_chunks(10)]).tolist()) == [8]
    assert a.remove_keys(torch.tensor([2, 3]), shard=ShardSpec(2, 0)) == sum(
        int(owner(torch.tensor([k]), 2)[0] == 0) for k in (2, 3)
    )


def test_evictions_are_logged_as_removed_keys() -> None:
    ec = EmbeddingCollection([TableConfig("t", dim=2)], [FeatureConfig("f", "t")])
    state = ec.keyed_states()["t"]
    ec(KeyedJaggedTensor(["f"], torch.tensor([5, 6, 7]), lengths=torch.tensor([3])))
    state.mark_clean()
    ec(KeyedJaggedTensor(["f"], torch.tensor([5]), lengths=torch.tensor([1])))
    assert ec.evict(older_than_step=1) == {"t": 2}
    assert state.removed_keys().tolist() == [6, 7]


def test_removing_keys_of_a_fixed_table_resets_their_rows() -> None:
    from recstack.sparse_optim import SparseAdam

    def make() -> EmbeddingCollection:
        return EmbeddingCollection(
            [TableConfig("t", dim=2, fixed_size=4)], [FeatureConfig("f", "t")]
        )

    ec, fresh = make(), make()
    opt = SparseAdam(ec.sparse_parameters(), lr=0.1)
    ec(KeyedJaggedTensor(["f"], torch.tensor([1, 2]), lengths=torch.tensor([2])))[
        "f"
    ].sum().backward()
    opt.step()
    state = ec.keyed_states()["t"]
    state.mark_clean()
    assert state.remove_keys(torch.tensor([1, 3, 1])) == 2  # every id has a row: all reset
    values = ec.physical_tables["t"].values
    initial = fresh.physical_tables["t"].values
    ids = torch.arange(4)
    assert torch.equal(values.gather_rows(ids[[0, 1, 3]]), initial.gather_rows(ids[[0, 1, 3]]))
    assert not torch.equal(values.gather_rows(ids[2:3]), initial.gather_rows(ids[2:3]))
    moments = values.companions["exp_avg"].store.gather_rows(ids)
    assert bool((moments[1] == 0).all()) and bool((moments[2] != 0).any())
    assert ec.physical_tables["t"].meta.counts[1] == 0
    changed = [k for keys, _ in state.export_changed_chunks(16) for k in keys.tolist()]
    assert changed == [1, 3]  # a delta carries the reset rows
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        state.remove_keys(torch.tensor([4]))


# ------------------------------------------------------------------------------ admission


def test_admission_counters_are_auxiliary_state_and_merge() -> None:
    from recstack.embedding_engine import Admission

    def make_adm() -> EmbeddingCollection:
        table = TableConfig("t", dim=2, admission=Admission(min_count=2, counter_slots=64))
        return EmbeddingCollection([table], [FeatureConfig("f", "t")])

    def see(ec: EmbeddingCollection, ids: list[int]) -> None:
        ec(KeyedJaggedTensor(["f"], torch.tensor(ids), lengths=torch.tensor([len(ids)])))

    src = make_adm()
    see(src, [10, 11])  # seen once: not admitted yet
    aux = src.keyed_states()["t"].auxiliary_state()
    assert set(aux) == {"admission_counters"} and int(aux["admission_counters"].max()) == 1
    dst = make_adm()
    dst.keyed_states()["t"].load_auxiliary_state([aux])
    see(dst, [10])  # the second sighting, across the restore: admitted now
    assert dst.num_ids("t") == 1
    # Two ranks' counters add up (saturating at the threshold).
    merged = make_adm()
    merged.keyed_states()["t"].load_auxiliary_state([aux, aux, aux])
    assert int(merged.keyed_states()["t"].auxiliary_state()["admission_counters"].max()) == 2
    other = EmbeddingCollection(
        [TableConfig("t", dim=2, admission=Admission(min_count=2, counter_slots=32))],
        [FeatureConfig("f", "t")],
    )
    with pytest.raises(ValueError, match="table 't'.*shape"):
        other.keyed_states()["t"].load_auxiliary_state([aux])
    assert make().keyed_states()["item"].auxiliary_state() == {}


def test_step_counters_are_module_state() -> None:
    ec = trained(seed=6)
    sd = ec.state_dict()
    assert sd["_extra_state"] == {"step": 3, "forwards": 3}
    fresh = make()
    fresh.load_state_dict(sd)
    assert fresh.step == 3
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        fresh.load_state_dict({"_extra_state": {"step": -1, "forwards": 0}})


def test_fixed_table_state_round_trip(device) -> None:
    src = fixed_collection(device)
    dim = src.physical_tables["cat"].dim
    with torch.no_grad():
        src.physical_tables["cat"].values.scatter_rows(
            torch.arange(VOCAB, device=device), torch.randn(VOCAB, dim).to(device)
        )
    src(bags_kjt({"c_sum": [[3]], "c_mean": [[]], "c_seq": [[]], "c_tile": [[]],
                  "items": [[11, 12]]}, device))  # fmt: skip
    meta = collection_state_metadata(src)
    assert meta["tables"]["cat"]["num_keys"] == VOCAB
    chunks = list(export_collection_chunks(src, 4, table="cat"))
    assert [c[1].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dst = fixed_collection(device)
    for t, k, s in export_collection_chunks(src, 4):
        import_collection_chunk(dst, t, k, s, metadata=meta)
    for name in ("cat", "item"):
        torch.testing.assert_close(
            dst.physical_tables[name].values.to_dense(),
            src.physical_tables[name].values.to_dense(),
        )
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        import_collection_chunk(
            dst,
            "cat",
            torch.tensor([VOCAB], device=device),
            {"values": torch.ones(1, dim, device=device)},
        )
