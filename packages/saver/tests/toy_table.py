"""A small keyed state for the saver's tests: a dict of rows that tracks its changes.

It speaks core's ``KeyedState`` (with deltas and auxiliary state) and nothing else, so the
saver is tested without any other RecStack package.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from recstack.core import ShardSpec
from recstack.core.keyed_state import iter_chunks, select_owned, validate_chunk


class ToyTable:
    """Rows ``{"values": [dim] float32, "m": [dim] float32}`` by int64 key, plus a
    ``counts`` auxiliary tensor that loads as the sum of the saved ranks' counts."""

    def __init__(self, name: str = "toy", dim: int = 4, dtype: torch.dtype = torch.float32) -> None:
        self.name, self.dim, self.dtype = name, dim, dtype
        self.rows: dict[int, dict[str, torch.Tensor]] = {}
        self.changed: set[int] = set()
        self.removed: set[int] = set()
        self.counts = torch.zeros(8, dtype=torch.int64)

    # ------------------------------------------------------------------ editing
    def put(self, key: int, values: torch.Tensor, m: torch.Tensor | None = None) -> None:
        self.rows[key] = {
            "values": values.to(self.dtype).clone(),
            "m": (torch.zeros(self.dim) if m is None else m).float().clone(),
        }
        self.changed.add(key)

    def drop(self, key: int) -> None:
        if self.rows.pop(key, None) is not None:
            self.removed.add(key)

    def as_dict(self) -> dict[int, tuple[list[float], list[float]]]:
        return {k: (r["values"].tolist(), r["m"].tolist()) for k, r in self.rows.items()}

    # ------------------------------------------------------------------ KeyedState
    def state_metadata(self) -> dict[str, Any]:
        return {
            "format": "toy",
            "table": self.name,
            "num_keys": len(self.rows),
            "slots": {
                "values": {"dtype": str(self.dtype).removeprefix("torch."), "shape": [self.dim]},
                "m": {"dtype": "float32", "shape": [self.dim]},
            },
        }

    def _chunks(self, keys: list[int], chunk_rows: int) -> Iterator[tuple[torch.Tensor, dict]]:
        keys = sorted(keys)
        if not keys:
            return
        k = torch.tensor(keys, dtype=torch.int64)
        slots = {
            "values": torch.stack([self.rows[i]["values"] for i in keys]),
            "m": torch.stack([self.rows[i]["m"] for i in keys]),
        }
        yield from iter_chunks(k, slots, chunk_rows)

    def export_chunks(self, chunk_rows: int) -> Iterator[tuple[torch.Tensor, dict]]:
        return self._chunks(list(self.rows), chunk_rows)

    def import_chunk(
        self,
        keys: torch.Tensor,
        slots: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        shard: ShardSpec | None = None,
    ) -> int:
        validate_chunk(keys, slots, name=self.name)
        if slots["values"].shape[1:] != (self.dim,):
            raise ValueError(f"table {self.name!r}: dim mismatch")
        keys, slots = select_owned(keys, slots, shard)
        for i, k in enumerate(keys.tolist()):
            self.put(k, slots["values"][i], slots.get("m", torch.zeros(1, self.dim))[i])
        return int(keys.numel())

    # ------------------------------------------------------------------ deltas
    def mark_clean(self) -> None:
        self.changed.clear()
        self.removed.clear()

    def export_changed_chunks(self, chunk_rows: int) -> Iterator[tuple[torch.Tensor, dict]]:
        return self._chunks([k for k in self.changed if k in self.rows], chunk_rows)

    def removed_keys(self) -> torch.Tensor:
        return torch.tensor(sorted(self.removed), dtype=torch.int64)

    def remove_keys(self, keys: torch.Tensor, shard: ShardSpec | None = None) -> int:
        keys, _ = select_owned(keys, {}, shard)
        held = [k for k in keys.tolist() if k in self.rows]
        for k in held:
            self.drop(k)
        return len(held)

    # ------------------------------------------------------------------ auxiliary
    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.clone()}

    def load_auxiliary_state(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.counts = sum((p["counts"] for p in parts), torch.zeros(8, dtype=torch.int64))


def filled(name: str, keys: Sequence[int], seed: int, dim: int = 4) -> ToyTable:
    """A table holding ``keys`` with random rows."""
    t = ToyTable(name, dim)
    gen = torch.Generator().manual_seed(seed)
    for k in keys:
        t.put(int(k), torch.randn(dim, generator=gen), torch.randn(dim, generator=gen))
    t.counts = torch.randint(0, 5, (8,), generator=gen)
    return t


def evolve(table: ToyTable, seed: int) -> None:
    """One 'training window': some rows change, some keys are new, some are evicted."""
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(table.rows)
    for k in keys[::5]:
        table.put(k, torch.randn(4, generator=gen), torch.randn(4, generator=gen))
    for k in keys[1::7]:
        table.drop(k)
    for k in range(1000 + 10 * seed, 1000 + 10 * seed + 4):
        table.put(k, torch.randn(4, generator=gen))
    table.counts += seed
