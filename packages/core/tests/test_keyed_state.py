"""Tests for the KeyedState protocol and its helpers.

``DictState`` below is a minimal KeyedState (one tensor per slot, aligned with a key
tensor) showing that export -> import through ``ShardSpec`` reshards N ranks onto M.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from recstack.core.keyed_state import (
    KeyedState,
    check_json_metadata,
    iter_chunks,
    select_owned,
    validate_chunk,
)
from recstack.core.sharding import ShardSpec

SLOTS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "weight": (torch.float32, (4,)),
    "exp_avg_sq": (torch.bfloat16, (4,)),
    "step": (torch.int64, ()),
}


class DictState:
    """A dict of slot tensors aligned with one int64 key tensor; imports overwrite."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.keys = torch.empty(0, dtype=torch.int64, device=device)
        self.slots = {
            slot: torch.empty((0, *shape), dtype=dtype, device=device)
            for slot, (dtype, shape) in SLOTS.items()
        }

    def state_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": 4,
            "count": int(self.keys.numel()),
            "slots": {
                slot: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                for slot, t in self.slots.items()
            },
        }

    def export_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return iter_chunks(self.keys, self.slots, chunk_rows)

    def import_chunk(
        self,
        keys: torch.Tensor,
        slots: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        shard: ShardSpec | None = None,
    ) -> int:
        validate_chunk(keys, slots, self.name)
        if set(slots) != set(metadata["slots"]) or set(slots) != set(self.slots):
            raise ValueError(f"table {self.name!r}: slots {sorted(slots)} do not match")
        keys, slots = select_owned(keys, slots, shard)
        merged = torch.cat([self.keys, keys])
        # Overwrite semantics: for each distinct key keep its last occurrence.
        unique, inverse = torch.unique(merged, return_inverse=True)
        positions = torch.arange(merged.numel(), device=merged.device)
        last = torch.full_like(unique, -1).scatter_reduce(0, inverse, positions, "amax")
        self.keys = merged[last]
        self.slots = {s: torch.cat([self.slots[s], slots[s]])[last] for s in self.slots}
        return int(keys.numel())


def _filled_state(n: int, device: torch.device) -> DictState:
    state = DictState("user_id", device)
    keys = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, device=device).unique()
    keys = keys[torch.randperm(keys.numel(), device=device)]  # unsorted, as a hash table is
    slots = {
        "weight": torch.randn(keys.numel(), 4, device=device),
        "exp_avg_sq": torch.rand(keys.numel(), 4, device=device).to(torch.bfloat16),
        "step": torch.randint(0, 1000, (keys.numel(),), device=device),
    }
    state.import_chunk(keys, slots, state.state_metadata())
    assert state.keys.numel() == keys.numel()
    return state


def _sorted_rows(keys: torch.Tensor, slots: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    order = torch.argsort(keys)
    return keys[order].cpu(), {s: t[order].cpu() for s, t in slots.items()}


@pytest.mark.parametrize("n", [0, 1, 29])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_round_trip_reshards(device: torch.device, n: int, chunk_rows: int) -> None:
    source = _filled_state(n, device)
    meta = json.loads(json.dumps(source.state_metadata()))  # what a checkpoint holds
    check_json_metadata(meta, source.name)
    chunks = list(source.export_chunks(chunk_rows))
    assert all(0 < k.numel() <= chunk_rows for k, _ in chunks)
    assert sum(k.numel() for k, _ in chunks) == source.keys.numel()
    assert len(chunks) == math.ceil(source.keys.numel() / chunk_rows)

    want_keys, want_slots = _sorted_rows(source.keys, source.slots)
    for world in (1, 2, 3):
        ranks = [DictState("user_id", device) for _ in range(world)]
        kept = [0] * world
        for keys, slots in chunks:
            validate_chunk(keys, slots, "user_id")
            for r, target in enumerate(ranks):
                kept[r] += target.import_chunk(keys, slots, meta, ShardSpec(world, r))
        assert sum(kept) == want_keys.numel()
        for r, target in enumerate(ranks):
            assert target.keys.numel() == kept[r]
            assert bool(ShardSpec(world, r).owns(target.keys).all())
        # The union is the original state: no key lost, none duplicated, rows intact.
        got_keys, got_slots = _sorted_rows(
            torch.cat([t.keys for t in ranks]),
            {s: torch.cat([t.slots[s] for t in ranks]) for s in SLOTS},
        )
        assert torch.equal(got_keys, want_keys), world
        for s in SLOTS:
            assert torch.equal(got_slots[s], want_slots[s]), (world, s)


def test_import_without_shard_keeps_all_and_overwrites(device: torch.device) -> None:
    state = _filled_state(10, device)
    keys = state.keys[:3].clone()
    new = {s: torch.zeros_like(t[:3]) for s, t in state.slots.items()}
    assert state.import_chunk(keys, new, state.state_metadata(), None) == 3
    assert state.keys.numel() == 10  # overwritten, not duplicated
    at = torch.isin(state.keys, keys)
    for s, t in state.slots.items():
        assert bool((t[at] == 0).all()) and bool((t[~at] != 0).any()), s


def test_isinstance_protocol() -> None:
    assert isinstance(DictState("t", torch.device("cpu")), KeyedState)

    class ExportOnly:
        def state_metadata(self) -> dict[str, Any]:
            return {}

        def export_chunks(self, chunk_rows: int) -> Iterator[Any]:
            return iter(())

    assert not isinstance(ExportOnly(), KeyedState)
    assert not isinstance(object(), KeyedState)


def test_select_owned(device: torch.device) -> None:
    keys = torch.randint(-(2**40), 2**40, (50,), device=device)
    slots = {"weight": torch.randn(50, 3, device=device)}
    same_keys, same_slots = select_owned(keys, slots, None)
    assert same_keys is keys and same_slots["weight"] is slots["weight"]

    class EvenOwner:  # anything with ShardSpec's ``owns`` works
        def owns(self, k: torch.Tensor) -> torch.Tensor:
            return k % 2 == 0

    got_keys, got_slots = select_owned(keys, slots, EvenOwner())  # type: ignore[arg-type]
    mask = keys % 2 == 0
    assert torch.equal(got_keys, keys[mask])
    assert torch.equal(got_slots["weight"], slots["weight"][mask])

    empty_keys, empty_slots = select_owned(keys[:0], {"w": slots["weight"][:0]}, ShardSpec(2, 1))
    assert empty_keys.shape == (0,) and empty_slots["w"].shape == (0, 3)

    class BadOwner:
        def owns(self, k: torch.Tensor) -> torch.Tensor:
            return (k % 2).to(torch.int64)

    with pytest.raises(ValueError, match="bool mask"):
        select_owned(keys, slots, BadOwner())  # type: ignore[arg-type]


def test_iter_chunks_views_and_errors() -> None:
    keys = torch.arange(7)
    slots = {"w": torch.arange(14.0).reshape(7, 2)}
    chunks = list(iter_chunks(keys, slots, 3))
    assert [k.tolist() for k, _ in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks[2][1]["w"].tolist() == [[12.0, 13.0]]
    assert chunks[0][0].data_ptr() == keys.data_ptr()  # views, no copy
    assert list(iter_chunks(keys[:0], {"w": slots["w"][:0]}, 5)) == []
    for bad, err in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="chunk_rows"):
            list(iter_chunks(keys, slots, bad))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "slots", "err", "match"),
    [
        ([1, 2], {}, TypeError, "keys must be a torch.Tensor"),
        (torch.arange(3, dtype=torch.int32), {}, TypeError, "int64"),
        (torch.zeros(2, 2, dtype=torch.int64), {}, ValueError, "1-D"),
        (torch.arange(3), [torch.zeros(3)], TypeError, "dict"),
        (torch.arange(3), {"w": torch.zeros(2, 4)}, ValueError, "slot 'w'.*3 keys"),
        (torch.arange(3), {"w": torch.tensor(1.0)}, ValueError, "slot 'w'"),
        (torch.arange(3), {"w": [0, 1, 2]}, TypeError, "slot 'w'"),
        (torch.arange(3), {1: torch.zeros(3)}, TypeError, "slot names"),
        (torch.arange(3), {"": torch.zeros(3)}, TypeError, "slot names"),
    ],
)
def test_validate_chunk_errors(keys: Any, slots: Any, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match) as info:
        validate_chunk(keys, slots, "item_id")
    assert "item_id" in str(info.value)


def test_validate_chunk_accepts_good_chunks() -> None:
    validate_chunk(torch.arange(3), {"w": torch.zeros(3, 2), "step": torch.zeros(3)}, "t")
    validate_chunk(torch.arange(0), {"w": torch.zeros(0, 2)})
    validate_chunk(torch.arange(2), {})


def test_check_json_metadata() -> None:
    good = {"name": "t", "dim": 4, "lr": 0.1, "slots": ["w", "m"], "x": None, "ok": True}
    check_json_metadata(good, "t")
    check_json_metadata({"shape": (3, 4)}, "t")  # tuples are written as lists
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    bad = [
        ([1, 2], TypeError, "must be a dict"),
        ({"dtype": torch.float32}, TypeError, r"metadata\['dtype'\] is a dtype"),
        ({"count": torch.tensor(3)}, TypeError, "Tensor"),
        ({"slots": {"w": {1, 2}}}, TypeError, r"metadata\['slots'\]\['w'\] is a set"),
        ({"nested": [1, [2, float("nan")]]}, ValueError, r"metadata\['nested'\]\[1\]\[1\]"),
        ({"inf": float("inf")}, ValueError, "inf"),
        ({"by_rank": {0: 1}}, TypeError, "non-str key 0"),
        ({"blob": b"\x00"}, TypeError, "bytes"),
        (cyclic, ValueError, "contains itself"),
    ]
    for meta, err, match in bad:
        with pytest.raises(err, match=match) as info:
            check_json_metadata(meta, "user_id")
        assert "user_id" in str(info.value)


def test_state_metadata_is_json(device: torch.device) -> None:
    state = _filled_state(5, device)
    meta = state.state_metadata()
    check_json_metadata(meta, state.name)
    assert json.loads(json.dumps(meta)) == meta
