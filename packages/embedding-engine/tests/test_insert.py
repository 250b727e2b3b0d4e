"""insert_ids / init_new_rows: a training forward's inserts into a dynamic physical table."""

from __future__ import annotations

import torch

from recstack.embedding_engine.config import Admission, Initializer, TableConfig
from recstack.embedding_engine.insert import init_new_rows, insert_ids
from recstack.embedding_engine.kernels.init_rows import init_rows
from recstack.embedding_engine.physical import PhysicalTable, build_physical_tables

DIM = 4


def table(device: torch.device, *configs: TableConfig) -> PhysicalTable:
    physical, _ = build_physical_tables(configs, device)
    assert len(physical) == 1
    return next(iter(physical.values()))


def ids(device: torch.device, *values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def initial(cfg: TableConfig, keys: torch.Tensor) -> torch.Tensor:
    assert cfg.initializer is not None and cfg.init_seed is not None
    return init_rows(keys, DIM, cfg.initializer, seed=cfg.init_seed)


def test_new_ids_get_initialized_rows_and_metadata(device) -> None:
    cfg = TableConfig("t", dim=DIM, initializer=Initializer.normal(std=0.3))
    phys = table(device, cfg)
    rows, partial = insert_ids(phys, ids(device, 10, 20), None, ids(device, 2, 1), step=7)
    assert rows.tolist() == [0, 1] and not partial
    assert phys.values.num_rows == 2 and phys.num_ids(0) == 2
    assert torch.equal(phys.values.gather_rows(rows), initial(cfg, ids(device, 10, 20)))
    assert phys.meta.last_seen.tolist() == [7, 7] and phys.meta.counts.tolist() == [2, 1]
    # Seen again: the same rows, the hits add up, nothing is re-initialized.
    phys.values.scatter_rows(ids(device, 0), torch.ones(1, DIM, device=device))
    rows, _ = insert_ids(phys, ids(device, 10, 30), None, ids(device, 1, 1), step=8)
    assert rows.tolist() == [0, 2] and phys.meta.counts.tolist() == [3, 1, 1]
    assert bool((phys.values.gather_rows(ids(device, 0)) == 1).all())


def test_merged_tables_use_their_own_initializer(device) -> None:
    a = TableConfig("a", dim=DIM, initializer=Initializer.constant(1.0))
    b = TableConfig("b", dim=DIM, initializer=Initializer.uniform(-1.0, 1.0))
    phys = table(device, a, b)
    keys, tags = ids(device, 5, 5, 6), torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
    rows, _ = insert_ids(phys, keys, tags, ids(device, 1, 1, 1), step=0)
    assert rows.tolist() == [0, 1, 2] and [phys.num_ids(i) for i in (0, 1)] == [1, 2]
    assert bool((phys.values.gather_rows(rows[:1]) == 1).all())
    assert torch.equal(phys.values.gather_rows(rows[1:]), initial(b, keys[1:]))


def test_admission_keeps_ids_out_until_their_count(device) -> None:
    cfg = TableConfig("t", dim=DIM, admission=Admission(min_count=3, counter_slots=64))
    phys = table(device, cfg)
    rows, partial = insert_ids(phys, ids(device, 1, 2), None, ids(device, 2, 1), step=0)
    assert rows.tolist() == [-1, -1] and partial and len(phys.hash_table) == 0
    rows, partial = insert_ids(phys, ids(device, 1, 2), None, ids(device, 1, 1), step=1)
    assert rows.tolist() == [0, -1] and partial  # id 1 reached 3 sightings
    rows, partial = insert_ids(phys, ids(device, 1, 2), None, ids(device, 1, 1), step=2)
    assert rows.tolist() == [0, 1] and not partial


def test_reused_rows_start_afresh(device) -> None:
    cfg = TableConfig("t", dim=DIM)
    phys = table(device, cfg)
    reset: list[list[int]] = []
    phys.values.on_rows_reset(lambda rows: reset.append(rows.tolist()))
    insert_ids(phys, ids(device, 1, 2), None, ids(device, 1, 1), step=0)
    phys.values.scatter_rows(ids(device, 0, 1), torch.zeros(2, DIM, device=device))
    assert phys.erase(0, ids(device, 1)) == 1
    rows, _ = insert_ids(phys, ids(device, 9), None, ids(device, 4), step=3)
    assert rows.tolist() == [0] and reset == [[0, 1], [0]]
    assert torch.equal(phys.values.gather_rows(rows), initial(cfg, ids(device, 9)))
    assert phys.meta.counts[0].item() == 4  # a new key's count restarts at its hits


def test_nothing_to_insert(device) -> None:
    phys = table(device, TableConfig("t", dim=DIM))
    rows, partial = insert_ids(phys, ids(device), None, ids(device), step=0)
    assert rows.numel() == 0 and not partial and phys.values.num_rows == 0
    init_new_rows(phys, ids(device), ids(device), None)
    assert phys.num_ids(0) == 0
