"""HashTable and its kernels: one test per API call, a dict oracle, torch vs Triton identity."""

from __future__ import annotations

import heapq
import random

import pytest
import torch

from recstack.core import kernels
from recstack.embedding_engine.hash_table import EMPTY, TOMBSTONE, HashTable
from recstack.embedding_engine.kernels import hash_table as K

I64_MAX = 2**63 - 1
# Keys at the edges of int64. Every int64 is a key: the two smallest are the slot markers'
# bit patterns (stored remapped to the next two, which are keys of their own).
EXTREMES = [I64_MAX, I64_MAX - 1, EMPTY, TOMBSTONE, TOMBSTONE + 1, TOMBSTONE + 2, -1, 0, 1]


class Oracle:
    """The table's contract as a dict: exact rows, lowest free row first, batch order.

    Keys are ints, or ``(key, tag)`` pairs for a tagged table.
    """

    def __init__(self) -> None:
        self.rows: dict[object, int] = {}
        self.free: list[int] = []  # a heap
        self.next_row = 0

    def find(self, keys: list) -> list[int]:
        return [self.rows.get(k, -1) for k in keys]

    def find_or_insert(self, keys: list) -> tuple[list[int], list[bool]]:
        rows, new = [], []
        for k in keys:
            is_new = k not in self.rows
            if is_new:
                if self.free:
                    self.rows[k] = heapq.heappop(self.free)
                else:
                    self.rows[k] = self.next_row
                    self.next_row += 1
            rows.append(self.rows[k])
            new.append(is_new)
        return rows, new

    def erase(self, keys: list) -> int:
        gone = {k for k in keys if k in self.rows}
        for k in gone:
            heapq.heappush(self.free, self.rows.pop(k))
        return len(gone)


def _pool(g: torch.Generator, m: int) -> torch.Tensor:
    """``m`` random int64 keys (negatives included) plus the int64 extremes."""
    rand = torch.randint(-(2**62), 2**62, (m,), generator=g) * 2
    rand += torch.randint(0, 2, (m,), generator=g)
    return torch.cat([rand, torch.tensor(EXTREMES)])


def _draw(g: torch.Generator, pool: torch.Tensor, n: int) -> torch.Tensor:
    return pool[torch.randint(0, pool.numel(), (n,), generator=g)]


def _items(table: HashTable, chunk: int = 1 << 20) -> tuple[list[int], list[int]]:
    keys, rows = [], []
    for k, r in table.items(chunk):
        keys += k.tolist()
        rows += r.tolist()
    return keys, rows


def _check_against(table: HashTable, oracle: Oracle, device: torch.device) -> None:
    assert len(table) == len(oracle.rows)
    assert table.num_rows_allocated == oracle.next_row
    keys, rows = _items(table, 7)
    # Ascending rows: no two keys share a row; the dict: no key lost, none with two rows.
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    assert dict(zip(keys, rows, strict=True)) == oracle.rows
    assert all(0 <= r < oracle.next_row for r in rows)
    if oracle.rows:
        present = torch.tensor(list(oracle.rows), device=device)
        assert table.find(present).tolist() == list(oracle.rows.values())
    # Live keys plus tombstones never pass the limit, so every probe ends at an EMPTY slot.
    assert len(table) + table._tombstones <= table.max_load * table.capacity


def _sorted_slots(slots: torch.Tensor) -> torch.Tensor:
    """The ``(key word, row word)`` pairs in lexicographic order (a key word may repeat)."""
    slots = slots[torch.argsort(slots[:, 1], stable=True)]
    return slots[torch.argsort(slots[:, 0], stable=True)]


def _same_table(a: HashTable, b: HashTable) -> None:
    assert len(a) == len(b) and a.num_rows_allocated == b.num_rows_allocated
    assert a.capacity == b.capacity
    assert torch.equal(a._free.cpu(), b._free.cpu())
    sa, sb = a._slots.cpu(), b._slots.cpu()
    if not torch.cuda.is_available():
        # The interpreter resolves one program's lanes lowest first, like the reference.
        assert torch.equal(sa, sb)
    # On a GPU, new keys of one batch may race for slots: the occupied set and the
    # (key, row) pairs still match.
    assert torch.equal(sa[:, 0] == EMPTY, sb[:, 0] == EMPTY)
    assert torch.equal(_sorted_slots(sa), _sorted_slots(sb))


# ----------------------------------------------------------------------------------------
# One test per API call
# ----------------------------------------------------------------------------------------


def test_constructor(device: torch.device) -> None:
    table = HashTable(10, device)
    assert table.capacity == 16 and len(table) == 0 and table.load_factor == 0.0
    assert table.num_rows_allocated == 0 and table.max_load == 0.75
    assert table.device.type == device.type
    assert HashTable(1, device).capacity == 1
    assert list(table.items()) == []
    with pytest.raises(ValueError, match="HashTable: capacity must be an int >= 1 and <="):
        HashTable(0, device)
    with pytest.raises(TypeError, match="capacity must be an int"):
        HashTable(4.0, device)  # type: ignore[arg-type]
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_load must be in"):
            HashTable(16, device, max_load=bad)
    assert "HashTable(len=0, capacity=16" in repr(table)


def test_find(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    pool = _pool(g, 300)
    table = HashTable(64, device)
    inserted = _draw(g, pool, 120)
    table.find_or_insert(inserted.to(device))
    oracle = Oracle()
    oracle.find_or_insert(inserted.tolist())
    for n in (0, 1, 5, 257):
        query = _draw(g, pool, n)
        got = table.find(query.to(device))
        assert got.dtype == torch.int64 and got.device == table.device
        assert got.cpu().tolist() == oracle.find(query.tolist())
    # Any shape; a key absent from a fresh table reads -1.
    query = _draw(g, pool, 12).view(3, 4)
    assert table.find(query.to(device)).shape == (3, 4)
    assert HashTable(8, device).find(torch.tensor([5, I64_MAX], device=device)).tolist() == [-1, -1]


def test_find_or_insert(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    pool = _pool(g, 200)
    table = HashTable(16, device)
    oracle = Oracle()
    rows, is_new = table.find_or_insert(torch.empty(0, dtype=torch.int64, device=device))
    assert rows.shape == (0,) and is_new.dtype == torch.bool and len(table) == 0
    for n in (1, 1, 9, 40, 300, 0, 33):
        keys = _draw(g, pool, n)
        rows, is_new = table.find_or_insert(keys.to(device))
        want_rows, want_new = oracle.find_or_insert(keys.tolist())
        assert rows.dtype == torch.int64 and is_new.dtype == torch.bool
        assert rows.cpu().tolist() == want_rows
        assert is_new.cpu().tolist() == want_new
    # Duplicates in one batch map to one row; only the first occurrence is new.
    keys = torch.tensor([I64_MAX, 5, I64_MAX, TOMBSTONE + 1, 5, I64_MAX], device=device)
    fresh = HashTable(4, device)
    rows, is_new = fresh.find_or_insert(keys)
    assert rows.tolist() == [0, 1, 0, 2, 1, 0]
    assert is_new.tolist() == [True, True, False, True, False, False]
    rows, is_new = fresh.find_or_insert(keys.view(2, 3))
    assert rows.tolist() == [[0, 1, 0], [2, 1, 0]] and not is_new.any()


def test_erase(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(3)
    pool = _pool(g, 100)
    table = HashTable(32, device)
    oracle = Oracle()
    keys = _draw(g, pool, 80)
    table.find_or_insert(keys.to(device))
    oracle.find_or_insert(keys.tolist())
    assert table.erase(torch.empty(0, dtype=torch.int64, device=device)) == 0
    for n in (1, 7, 30, 50):
        gone = _draw(g, pool, n)  # absent keys and duplicates included
        assert table.erase(gone.to(device)) == oracle.erase(gone.tolist())
        _check_against(table, oracle, device)
    # Erased rows go to new keys first, lowest first, then the high-water mark grows.
    new = torch.tensor([10**18 + i for i in range(len(oracle.free) + 2)])
    rows, is_new = table.find_or_insert(new.to(device))
    want_rows, _ = oracle.find_or_insert(new.tolist())
    assert rows.cpu().tolist() == want_rows and bool(is_new.all())
    _check_against(table, oracle, device)


def test_items(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(4)
    table = HashTable(8, device)
    oracle = Oracle()
    keys = _draw(g, _pool(g, 150), 200)
    table.find_or_insert(keys.to(device))
    oracle.find_or_insert(keys.tolist())
    gone = keys[::3]
    table.erase(gone.to(device))
    oracle.erase(gone.tolist())
    n = len(oracle.rows)
    for chunk in (1, 7, n, 1 << 20):
        chunks = list(table.items(chunk))
        assert [k.numel() for k, _ in chunks][:-1] == [chunk] * (len(chunks) - 1)
        assert 1 <= chunks[-1][0].numel() <= chunk
        assert all(k.device == table.device and r.dtype == torch.int64 for k, r in chunks)
        got_keys, got_rows = _items(table, chunk)
        assert got_rows == sorted(oracle.rows.values())
        assert dict(zip(got_keys, got_rows, strict=True)) == oracle.rows
    # A snapshot: changing the table after items() does not change what it yields.
    it = table.items(5)
    table.find_or_insert(torch.tensor([123456789], device=device))
    assert sum(k.numel() for k, _ in it) == n
    with pytest.raises(ValueError, match="HashTable.items: chunk_size must be an int >= 1"):
        table.items(0)


def test_len_capacity_load_factor_and_growth(backend: str, device: torch.device) -> None:
    table = HashTable(16, device)  # limit 0.75 * 16 = 12 used slots
    for i in range(12):
        table.find_or_insert(torch.tensor([1000 + i], device=device))
    assert table.capacity == 16 and len(table) == 12 and table.load_factor == 12 / 16
    # The insert that could pass the limit grows first (2x), keeping every row.
    rows, _ = table.find_or_insert(torch.tensor([1000 + 12], device=device))
    assert table.capacity == 32 and len(table) == 13 and table.load_factor == 13 / 32
    assert rows.tolist() == [12]
    every = torch.arange(1000, 1013, device=device)
    assert table.find(every).tolist() == list(range(13))
    # A batch much larger than the table grows it enough in one step.
    big = torch.arange(5000, 5400, device=device)
    rows, is_new = table.find_or_insert(big)
    assert rows.tolist() == list(range(13, 413)) and bool(is_new.all())
    assert table.capacity == 1024 and 413 + 400 > 0.75 * 512
    assert table.find(every).tolist() == list(range(13))
    # The limit counts the batch size, not how many keys turn out to be new.
    table = HashTable(16, device)
    table.find_or_insert(torch.arange(10, device=device))
    table.find_or_insert(torch.arange(3, device=device))
    assert table.capacity == 32 and len(table) == 10


def test_tombstones_are_reclaimed_without_growing(backend: str, device: torch.device) -> None:
    table = HashTable(64, device)
    table.find_or_insert(torch.arange(5, device=device))
    for step in range(12):
        keys = torch.arange(100 + 10 * step, 110 + 10 * step, device=device)
        rows, is_new = table.find_or_insert(keys)
        assert rows.tolist() == list(range(5, 15)) and bool(is_new.all())
        assert table.erase(keys) == 10
    # 120 tombstones passed through a 64-slot table: it was rebuilt in place, never grown.
    assert table.capacity == 64 and len(table) == 5 and table.num_rows_allocated == 15
    assert table.find(torch.arange(5, device=device)).tolist() == list(range(5))


def test_every_int64_is_a_key(backend: str, device: torch.device) -> None:
    # The slot markers' bit patterns are keys like any other, distinct from the keys their
    # remapped key words equal (-2**63 + 2 and + 3), through inserts, erases and rehashes.
    table = HashTable(4, device)
    keys = torch.tensor([EMPTY, TOMBSTONE + 1, TOMBSTONE, TOMBSTONE + 2, EMPTY], device=device)
    rows, is_new = table.find_or_insert(keys)
    assert rows.tolist() == [0, 1, 2, 3, 0] and is_new.tolist() == [True] * 4 + [False]
    assert table.find(keys).tolist() == [0, 1, 2, 3, 0]
    assert _items(table) == ([EMPTY, TOMBSTONE + 1, TOMBSTONE, TOMBSTONE + 2], [0, 1, 2, 3])
    assert table.erase(torch.tensor([TOMBSTONE, EMPTY], device=device)) == 2
    assert table.find(keys).tolist() == [-1, 1, -1, 3, -1]
    table.find_or_insert(torch.arange(10, device=device))  # grows: a rehash
    assert table.find(keys).tolist() == [-1, 1, -1, 3, -1]
    rows, _ = table.find_or_insert(torch.tensor([TOMBSTONE, EMPTY], device=device))
    assert table.find(keys).tolist() == [rows[1], 1, rows[0], 3, rows[1]]


def test_tags(backend: str, device: torch.device) -> None:
    # One key under several tags is several entries; tags are None (tag 0), one int or a
    # tensor, and the remapped keys stay apart under every tag.
    table = HashTable(8, device, num_tags=3)
    assert table.num_tags == 3 and table.max_rows == 2**60
    keys = torch.tensor([5, 5, 5, EMPTY, TOMBSTONE + 2, EMPTY], device=device)
    tags = torch.tensor([0, 2, 1, 2, 2, 0], device=device)
    rows, is_new = table.find_or_insert(keys, tags)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5] and bool(is_new.all())
    assert table.find(keys, tags.to(torch.int32)).tolist() == [0, 1, 2, 3, 4, 5]
    assert table.find(torch.tensor([5, EMPTY], device=device)).tolist() == [0, 5]
    assert table.find(torch.tensor([5, EMPTY], device=device), 2).tolist() == [1, 3]
    entries = [tuple(map(int, e)) for c in table.tagged_items(4) for e in zip(*c, strict=True)]
    assert entries == [(5, 0, 0), (5, 2, 1), (5, 1, 2), (EMPTY, 2, 3), (TOMBSTONE + 2, 2, 4),
                       (EMPTY, 0, 5)]  # fmt: skip
    assert table.erase(torch.tensor([5, 5], device=device), 2) == 1
    assert table.find(keys, tags).tolist() == [0, -1, 2, 3, 4, 5]
    rows, is_new = table.find_or_insert(torch.tensor([7, 5], device=device), 2)
    assert rows.tolist() == [1, 6] and bool(is_new.all())
    with pytest.raises(ValueError, match=r"tag 3 is outside \[0, 3\)"):
        table.find(keys, 3)


def test_bad_tags_are_rejected(backend: str, device: torch.device) -> None:
    table = HashTable(16, device, num_tags=2)
    table.find_or_insert(torch.tensor([1, 2, 3], device=device), 1)
    before = list(table.tagged_items())
    keys = torch.tensor([7, 1, 8, 2], device=device)
    tags = torch.tensor([0, 2, 1, -1], device=device)
    match = r"tags\[1\] = 2 is outside \[0, 2\) .*2 bad tags in all"
    with pytest.raises(ValueError, match=match):
        table.find_or_insert(keys, tags)
    with pytest.raises(ValueError, match=match):
        table.find(keys, tags)
    with pytest.raises(ValueError, match=match):
        erase_tags = torch.tensor([1, 2, 1, -1], device=device)
        table.erase(torch.tensor([1, 1, 2, 2], device=device), erase_tags)
    # All or nothing: the other keys were neither inserted nor erased.
    after = list(table.tagged_items())
    pairs = zip(before, after, strict=True)
    assert all(torch.equal(a, b) for x, y in pairs for a, b in zip(x, y, strict=True))
    assert len(table) == 3 and table.num_rows_allocated == 3
    assert table.find(keys, tags, check_keys=False).tolist() == [-1, -1, -1, -1]
    for bad, err in ((torch.tensor([0.5]), TypeError), (torch.tensor([[0]]), ValueError)):
        with pytest.raises(err, match="tags must"):
            table.find(torch.tensor([1], device=device), bad.to(device))
    with pytest.raises(TypeError, match="tags must be None, an int or a tensor"):
        table.find(torch.tensor([1], device=device), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="HashTable: num_tags must be an int >= 1 and <="):
        HashTable(4, device, num_tags=0)
    rows, is_new = table.find_or_insert(torch.tensor([7, 8, 3], device=device), 1)
    assert rows.tolist() == [3, 4, 2] and is_new.tolist() == [True, True, False]


def test_bad_arguments(backend: str, device: torch.device) -> None:
    table = HashTable(8, device)
    with pytest.raises(TypeError, match="keys must be int64, got torch.int32"):
        table.find(torch.tensor([1], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        table.find_or_insert([1, 2])  # type: ignore[arg-type]
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="keys are on meta but the table is on"):
        table.erase(meta)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        table.items(2.5)  # type: ignore[arg-type]


def test_launch_counts(backend: str, device: torch.device) -> None:
    table = HashTable(64, device)
    keys = torch.tensor([3, 1, 3, 9], device=device)
    suffix = "_reference" if backend == "torch" else ""
    with kernels.count_launches() as launches:
        table.find_or_insert(keys)
    if backend == "torch":
        assert dict(launches) == {"hash_table_find_or_insert_reference": 1}
    else:
        assert dict(launches) == {
            "hash_table_claim": 1,
            "hash_table_first": 1,
            "hash_table_assign": 1,
        }
    for op, call in (("find", table.find), ("erase", table.erase)):
        with kernels.count_launches() as launches:
            call(keys)
        assert dict(launches) == {f"hash_table_{op}{suffix}": 1}
    with kernels.count_launches() as launches:
        table.find_or_insert(torch.empty(0, dtype=torch.int64, device=device))
        table.find(torch.empty(0, dtype=torch.int64, device=device))
    assert sum(launches.values()) == (2 if backend == "torch" else 0)


# ----------------------------------------------------------------------------------------
# Properties against the dict oracle
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [5, 6])
def test_random_ops_match_dict_oracle(backend: str, device: torch.device, seed: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    pool = _pool(g, 90)  # a small key space: many duplicates, hits, re-inserts
    table = HashTable(rng.choice([1, 4, 8]), device, max_load=rng.choice([0.5, 0.75, 0.9]))
    oracle = Oracle()
    for _ in range(250):
        op = rng.random()
        if op < 0.45:
            n = rng.choice([0, 1, 2, rng.randrange(3, 40)])
            keys = _draw(g, pool, n)
            rows, is_new = table.find_or_insert(keys.to(device))
            want_rows, want_new = oracle.find_or_insert(keys.tolist())
            assert rows.cpu().tolist() == want_rows and is_new.cpu().tolist() == want_new
        elif op < 0.55:
            # Fill exactly to the growth limit with new keys, one batch.
            room = int(table.max_load * table.capacity) - len(table) - table._tombstones
            fresh = [k for k in pool.tolist() if k not in oracle.rows][: max(room, 0)]
            capacity = table.capacity
            rows, _ = table.find_or_insert(torch.tensor(fresh, dtype=torch.int64, device=device))
            assert rows.cpu().tolist() == oracle.find_or_insert(fresh)[0]
            assert table.capacity == capacity
        elif op < 0.8:
            keys = _draw(g, pool, rng.randrange(0, 25))
            assert table.erase(keys.to(device)) == oracle.erase(keys.tolist())
        else:
            keys = _draw(g, pool, rng.randrange(0, 30))
            assert table.find(keys.to(device)).cpu().tolist() == oracle.find(keys.tolist())
        _check_against(table, oracle, device)


@pytest.mark.parametrize("seed", [11])
def test_random_tagged_ops_match_dict_oracle(backend: str, device: torch.device, seed: int) -> None:
    # Few keys under 3 tags: one key word is often several entries (the same id in several
    # merged tables), including the slot markers' bit patterns and their remap targets.
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    pool = _pool(g, 20)
    table = HashTable(4, device, max_load=0.8, num_tags=3)
    oracle = Oracle()

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        keys = _draw(g, pool, n)
        tags = torch.randint(0, 3, (n,), generator=g)
        pairs = list(zip(keys.tolist(), tags.tolist(), strict=True))
        return keys.to(device), tags.to(device), pairs

    for _ in range(120):
        op = rng.random()
        keys, tags, pairs = draw(rng.randrange(0, 40))
        if op < 0.5:
            rows, is_new = table.find_or_insert(keys, tags)
            want_rows, want_new = oracle.find_or_insert(pairs)
            assert rows.cpu().tolist() == want_rows and is_new.cpu().tolist() == want_new
        elif op < 0.75:
            assert table.erase(keys, tags) == oracle.erase(pairs)
        else:
            assert table.find(keys, tags).cpu().tolist() == oracle.find(pairs)
        got = {}
        for k, t, r in table.tagged_items(13):
            got.update(zip(zip(k.tolist(), t.tolist(), strict=True), r.tolist(), strict=True))
        assert got == oracle.rows and len(table) == len(oracle.rows)


# ----------------------------------------------------------------------------------------
# torch reference vs Triton kernels
# ----------------------------------------------------------------------------------------


def _triton_runs() -> bool:
    return kernels.HAS_TRITON and (torch.cuda.is_available() or kernels.interpret_mode())


@pytest.mark.skipif(not _triton_runs(), reason="Triton cannot run here")
@pytest.mark.parametrize(("num_tags", "seed"), [(1, 7), (3, 3), (3, 8)])
def test_reference_and_triton_tables_are_identical(
    monkeypatch: pytest.MonkeyPatch, num_tags: int, seed: int
) -> None:
    # One program holds every batch and every old table, so even slots match the
    # reference exactly (across programs only the slots of racing new keys may differ).
    # With tags, one key word is often several entries: a lane meeting its key word under
    # another tag looks on after it, as the reference does.
    monkeypatch.setattr(K, "_BLOCK", 1024)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    pool = _pool(g, 250 if num_tags == 1 else 60)
    tables = {b: HashTable(4, dev, max_load=0.8, num_tags=num_tags) for b in ("torch", "triton")}
    for step in range(60):
        erase = step % 4 == 3
        keys = _draw(g, pool, int(torch.randint(0, 60, (1,), generator=g))).to(dev)
        tags = None
        if num_tags > 1:
            tags = torch.randint(0, num_tags, keys.shape, generator=g).to(dev)
        out = {}
        for b, table in tables.items():
            with kernels.use_backend(b):
                out[b] = table.erase(keys, tags) if erase else table.find_or_insert(keys, tags)
        if erase:
            assert out["torch"] == out["triton"]
        else:
            assert all(torch.equal(x, y) for x, y in zip(out["torch"], out["triton"], strict=True))
        _same_table(tables["torch"], tables["triton"])
    assert tables["torch"].capacity >= 256  # it grew several times on the way


@pytest.mark.skipif(not _triton_runs(), reason="Triton cannot run here")
@pytest.mark.parametrize("num_tags", [1, 5])
def test_many_programs_give_the_reference_rows(
    monkeypatch: pytest.MonkeyPatch, num_tags: int
) -> None:
    # Tiny programs: new keys of one batch race for slots across programs. Rows, is_new
    # and the set of occupied slots still match the reference exactly.
    monkeypatch.setattr(K, "_BLOCK", 16)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(8)
    pool = _pool(g, 400 if num_tags == 1 else 60)
    slots = {b: K.empty_slots(1024, dev) for b in ("torch", "triton")}
    free = {b: torch.empty(0, dtype=torch.int64, device=dev) for b in slots}
    next_row = 0
    nt = {"num_tags": num_tags}
    for step in range(6):
        keys = _draw(g, pool, 150).to(dev)
        tags = torch.randint(0, num_tags, keys.shape, generator=g).to(dev)
        got = {}
        for b in slots:
            with kernels.use_backend(b):
                if step % 3 == 2:
                    free[b], got[b] = K.table_erase(slots[b], keys, free[b], tags, **nt)
                else:
                    got[b] = K.table_find_or_insert(slots[b], keys, free[b], next_row, tags, **nt)
        if step % 3 == 2:
            assert got["torch"] == got["triton"]
            assert torch.equal(free["torch"], free["triton"])
        else:
            (rows_a, new_a, n_a), (rows_b, new_b, n_b) = got["torch"], got["triton"]
            assert n_a == n_b and torch.equal(rows_a, rows_b) and torch.equal(new_a, new_b)
            reused = min(n_a, free["torch"].numel())
            free = {b: f[reused:] for b, f in free.items()}
            next_row += n_a - reused
        for b in slots:  # rows read back through find agree too
            with kernels.use_backend(b):
                got[b] = K.table_find(slots[b], keys, tags, **nt)
        assert torch.equal(got["torch"], got["triton"])
        assert torch.equal(slots["torch"][:, 0] == EMPTY, slots["triton"][:, 0] == EMPTY)
    for b in slots:
        with kernels.use_backend(b):
            slots[b] = K.table_rehash(slots[b], 2048, **nt)
    key_a, key_b = slots["torch"][:, 0], slots["triton"][:, 0]
    assert torch.equal(key_a == EMPTY, key_b == EMPTY) and not bool((key_a == TOMBSTONE).any())
    assert torch.equal(_sorted_slots(slots["torch"]), _sorted_slots(slots["triton"]))


# ----------------------------------------------------------------------------------------
# GPU scale
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_million_keys_on_gpu_match_cpu() -> None:
    g = torch.Generator().manual_seed(9)
    pool = torch.randint(-(2**62), 2**62, (4_000_000,), generator=g)
    gpu = HashTable(1 << 16, "cuda")
    cpu = HashTable(1 << 16, "cpu")
    for step in range(5):
        keys = pool[torch.randint(0, pool.numel(), (600_000,), generator=g)]
        if step == 3:
            assert gpu.erase(keys.cuda()) == cpu.erase(keys)
            continue
        rows_g, new_g = gpu.find_or_insert(keys.cuda())
        rows_c, new_c = cpu.find_or_insert(keys)
        assert torch.equal(rows_g.cpu(), rows_c) and torch.equal(new_g.cpu(), new_c)
    assert len(gpu) == len(cpu) > 1_000_000 and gpu.capacity == cpu.capacity
    assert gpu.num_rows_allocated == cpu.num_rows_allocated
    assert torch.equal(gpu.find(pool.cuda()).cpu(), cpu.find(pool))
    for (kg, rg), (kc, rc) in zip(gpu.items(1 << 18), cpu.items(1 << 18), strict=True):
        assert torch.equal(kg.cpu(), kc) and torch.equal(rg.cpu(), rc)


@pytest.mark.gpu
def test_hot_keys_on_gpu_match_cpu() -> None:
    # Heavy contention: a million lanes over a few thousand keys, most of them new at once.
    g = torch.Generator().manual_seed(10)
    pool = torch.randint(-(2**62), 2**62, (3000,), generator=g)
    gpu, cpu = HashTable(1024, "cuda"), HashTable(1024, "cpu")
    for _ in range(3):
        keys = pool[torch.randint(0, pool.numel(), (1_000_000,), generator=g)]
        rows_g, new_g = gpu.find_or_insert(keys.cuda())
        rows_c, new_c = cpu.find_or_insert(keys)
        assert torch.equal(rows_g.cpu(), rows_c) and torch.equal(new_g.cpu(), new_c)
        gone = keys[:1000]
        assert gpu.erase(gone.cuda()) == cpu.erase(gone)
    _same_table(gpu, cpu)


@pytest.mark.gpu
def test_hot_tagged_keys_on_gpu_match_cpu() -> None:
    # Every key under 4 tags, most entries new at once: lanes of one key word but other
    # tags race for the same slots (the row-word publish decides) across programs.
    g = torch.Generator().manual_seed(12)
    pool = torch.cat([torch.randint(-(2**62), 2**62, (2000,), generator=g), torch.tensor(EXTREMES)])
    gpu, cpu = HashTable(1024, "cuda", num_tags=4), HashTable(1024, "cpu", num_tags=4)
    for _ in range(3):
        keys = pool[torch.randint(0, pool.numel(), (1_000_000,), generator=g)]
        tags = torch.randint(0, 4, keys.shape, generator=g)
        rows_g, new_g = gpu.find_or_insert(keys.cuda(), tags.cuda())
        rows_c, new_c = cpu.find_or_insert(keys, tags)
        assert torch.equal(rows_g.cpu(), rows_c) and torch.equal(new_g.cpu(), new_c)
        assert torch.equal(gpu.find(keys.cuda(), tags.cuda()).cpu(), rows_c)
        gone, gone_tags = keys[:3000], tags[:3000]
        assert gpu.erase(gone.cuda(), gone_tags.cuda()) == cpu.erase(gone, gone_tags)
    _same_table(gpu, cpu)
    for a, b in zip(gpu.tagged_items(), cpu.tagged_items(), strict=True):
        assert all(torch.equal(x.cpu(), y) for x, y in zip(a, b, strict=True))


def test_unplaced_keys_undo_the_call(backend: str, device: torch.device) -> None:
    # The caller (HashTable) always leaves an EMPTY slot; called directly on a full table
    # the op reports the keys it could not place and leaves the table as it was.
    slots = K.empty_slots(8, device)
    rows, _, n_new = K.table_find_or_insert(
        slots, torch.arange(7, device=device), torch.zeros(0, dtype=torch.int64, device=device), 0
    )
    assert n_new == 7
    before = slots.clone()
    keys = torch.tensor([3, 100, 101, 100, 102], device=device)
    with pytest.raises(RuntimeError, match="keys found no free slot"):
        K.table_find_or_insert(slots, keys, torch.zeros(0, dtype=torch.int64, device=device), 7)
    if backend == "triton":  # the torch reference stops mid-call (an internal invariant)
        assert torch.equal(slots, before)


def test_huge_batches_run_in_chunks(
    backend: str, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches past 2**31 - 1 keys run chunk by chunk; a chunk of 5 shows the same results
    # (rows by first occurrence across chunks, the free list spent across chunks).
    monkeypatch.setattr(K, "_CHUNK", 5)
    keys = torch.tensor([4, 9, 4, 1, 7, 9, 2, 8, 1, 3, 5, 5, 6], device=device)
    free = torch.tensor([10, 11], device=device)
    slots = K.empty_slots(64, device)
    rows, is_new, n_new = K.table_find_or_insert(slots, keys, free, 20)
    assert n_new == 9
    assert rows.tolist() == [10, 11, 10, 20, 21, 11, 22, 23, 20, 24, 25, 25, 26]
    first = [True, True, False, True, True, False, True, True, False, True, True, False, True]
    assert is_new.tolist() == first
    with pytest.raises(ValueError, match=r"tags\[6\] = 1 is outside \[0, 1\)"):
        K.table_find_or_insert(slots, torch.tensor([1, 2, 3, 4, 5, 6, EMPTY], device=device),
                               free, 30, torch.tensor([0] * 6 + [1], device=device))  # fmt: skip
    assert int((slots[:, 0] > TOMBSTONE).sum()) == 9  # nothing of the bad batch went in
