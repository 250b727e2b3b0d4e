"""The ``KeyedState`` protocol: keyed sparse state that a checkpoint saver can write and load.

Anything holding rows addressed by int64 keys (a hash table with its optimizer slots)
speaks this protocol, so the saver writes it without knowing its type:

- ``state_metadata()`` describes it in JSON (table name, dim, dtypes, slot names, counts);
- ``export_chunks(chunk_rows)`` yields ``(keys, {slot_name: rows})`` in chunks of at most
  ``chunk_rows`` keys, so memory stays bounded however large the table is;
- ``import_chunk(keys, slots, metadata, shard)`` inserts or overwrites rows and, given a
  :class:`~recstack.core.sharding.ShardSpec`, keeps only the keys this rank owns. That is
  how a checkpoint written by N ranks loads on M: every rank reads every chunk and keeps
  the keys with ``owner(key, M) == rank``.

Examples:
    >>> import torch
    >>> from recstack.core.keyed_state import iter_chunks, select_owned
    >>> from recstack.core.sharding import ShardSpec
    >>> keys = torch.arange(10)
    >>> slots = {"weight": torch.randn(10, 4)}
    >>> [k.numel() for k, _ in iter_chunks(keys, slots, chunk_rows=4)]
    [4, 4, 2]
    >>> owned = [select_owned(keys, slots, ShardSpec(2, r))[0] for r in range(2)]
    >>> sorted(torch.cat(owned).tolist()) == keys.tolist()
    True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from recstack.core.sharding import ShardSpec

__all__ = [
    "AuxiliaryState",
    "HasKeyedStates",
    "IncrementalKeyedState",
    "KeyedState",
    "check_json_metadata",
    "iter_chunks",
    "select_owned",
    "validate_chunk",
]


@runtime_checkable
class KeyedState(Protocol):
    """Keyed sparse state: rows addressed by int64 keys, with named slots.

    A slot is one row store aligned with the keys: the embedding values and each
    optimizer state (e.g. ``"weight"``, ``"exp_avg"``, ``"exp_avg_sq"``). Every slot's rows
    for a chunk have the chunk's key count as their first dimension.

    ``isinstance(obj, KeyedState)`` checks that the three methods exist (not their
    signatures).
    """

    def state_metadata(self) -> dict[str, Any]:
        """JSON-serialisable description: table name, dim, dtypes, slot names, counts."""
        ...

    def export_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield ``(keys, {slot_name: rows})`` with at most ``chunk_rows`` keys each.

        ``keys`` is int64 ``[n]``, each slot ``[n, ...]``; every key appears in exactly one
        chunk. An empty state yields nothing. Chunks may be views of live storage: the
        consumer finishes with a chunk before the state changes.
        """
        ...

    def import_chunk(
        self,
        keys: torch.Tensor,
        slots: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        shard: ShardSpec | None = None,
    ) -> int:
        """Insert or overwrite the rows of ``keys``; return how many keys were kept.

        ``metadata`` is what ``state_metadata()`` returned when the chunk was exported (so
        an implementation can check dims and slot names, or convert dtypes). With
        ``shard`` given, only keys with ``shard.owns(keys)`` are kept (see
        :func:`select_owned`).
        """
        ...


@runtime_checkable
class IncrementalKeyedState(KeyedState, Protocol):
    """A :class:`KeyedState` that also knows what changed since a mark: what an
    incremental (delta) checkpoint writes.

    After :meth:`mark_clean`, :meth:`export_changed_chunks` yields the rows of every key
    inserted, written or imported since, and :meth:`removed_keys` the keys removed since
    (evicted or erased), so a delta holds upserts *and* tombstones. Loading a delta
    removes its tombstones (:meth:`remove_keys`), then imports its chunks.
    """

    def mark_clean(self) -> None:
        """Start a new change window: nothing has changed or been removed as of now."""
        ...

    def export_changed_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Like ``export_chunks``, for the keys changed since the last :meth:`mark_clean`."""
        ...

    def removed_keys(self) -> torch.Tensor:
        """int64 keys removed since the last :meth:`mark_clean` (each once; a key removed
        and inserted again may be listed: loaders remove before they import)."""
        ...

    def remove_keys(self, keys: torch.Tensor, shard: ShardSpec | None = None) -> int:
        """Remove ``keys`` (those ``shard`` owns, given one); return how many were held."""
        ...


@runtime_checkable
class AuxiliaryState(Protocol):
    """Dense state that belongs to a keyed state but is not keyed by rows, e.g. an
    admission filter's counters. Every rank saves its own; loading hands all the saved
    ranks' tensors to every rank, which merges them (how depends on the state: count
    sketches add), so it reshards like the rows do."""

    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` to save (empty when there is none)."""
        ...

    def load_auxiliary_state(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Merge the saved ranks' :meth:`auxiliary_state` outputs into this state."""
        ...


@runtime_checkable
class HasKeyedStates(Protocol):
    """An object (e.g. an embedding collection inside a model) whose sparse tables a
    checkpoint finds by asking: ``keyed_states()`` gives them by name."""

    def keyed_states(self) -> Mapping[str, KeyedState]:
        """The object's keyed states, by a name unique within the object."""
        ...


def _table(name: str | None) -> str:
    return f"table {name!r}" if name is not None else "keyed state"


def validate_chunk(
    keys: torch.Tensor, slots: Mapping[str, torch.Tensor], name: str | None = None
) -> None:
    """Check one chunk: 1-D int64 ``keys``, and every slot a tensor on the keys' device
    whose first dimension equals the key count. Raises ``TypeError``/``ValueError`` naming
    the table (``name``) and the slot."""
    where = _table(name)
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{where}: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"{where}: keys must be int64, got {keys.dtype}")
    if keys.dim() != 1:
        raise ValueError(f"{where}: keys must be 1-D, got shape {tuple(keys.shape)}")
    if not isinstance(slots, Mapping):
        raise TypeError(f"{where}: slots must be a dict of tensors, got {type(slots).__name__}")
    n = keys.shape[0]
    for slot, rows in slots.items():
        if not isinstance(slot, str) or not slot:
            raise TypeError(f"{where}: slot names must be non-empty strings, got {slot!r}")
        if not isinstance(rows, torch.Tensor):
            raise TypeError(
                f"{where}, slot {slot!r}: rows must be a torch.Tensor, got {type(rows).__name__}"
            )
        if rows.dim() == 0 or rows.shape[0] != n:
            raise ValueError(
                f"{where}, slot {slot!r}: has shape {tuple(rows.shape)} but there are {n} keys "
                "(the first dimension must equal the key count)"
            )
        if rows.device != keys.device:
            raise ValueError(
                f"{where}, slot {slot!r}: rows are on {rows.device} but keys are on {keys.device}"
            )


def select_owned(
    keys: torch.Tensor, slots: Mapping[str, torch.Tensor], shard: ShardSpec | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Keep the keys ``shard`` owns (``shard.owns(keys)``) and their slot rows.

    One mask and one gather per slot, order preserved. With ``shard=None`` everything is
    kept and the inputs come back uncopied.
    """
    if shard is None:
        return keys, dict(slots)
    mask = shard.owns(keys)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != keys.shape:
        raise ValueError(
            f"shard.owns(keys) must return a bool mask of shape {tuple(keys.shape)}, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )
    index = mask.nonzero().squeeze(1)
    return keys.index_select(0, index), {
        slot: rows.index_select(0, index) for slot, rows in slots.items()
    }


def iter_chunks(
    keys: torch.Tensor, slots: Mapping[str, torch.Tensor], chunk_rows: int
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Slice aligned ``keys`` and ``slots`` into chunks of at most ``chunk_rows`` rows.

    The chunks are views (no copy). Empty ``keys`` yield nothing.
    """
    if isinstance(chunk_rows, bool) or not hasattr(chunk_rows, "__index__"):
        raise TypeError(f"chunk_rows must be an int, got {type(chunk_rows).__name__}")
    chunk_rows = operator.index(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    validate_chunk(keys, slots)
    n = keys.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        yield keys[start:stop], {slot: rows[start:stop] for slot, rows in slots.items()}


_JSON_HINT = "metadata must be JSON: dicts with str keys, lists, str, int, finite float, bool, None"


def _check_json(value: object, path: str, where: str, parents: tuple[int, ...] = ()) -> None:
    if isinstance(value, (list, tuple, dict)):
        if id(value) in parents:
            raise ValueError(f"{where}: {path} contains itself; {_JSON_HINT}")
        parents = (*parents, id(value))
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {path} is {value}, which JSON cannot hold; {_JSON_HINT}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", where, parents)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where}: {path} has a non-str key {key!r} ({type(key).__name__}); "
                    f"{_JSON_HINT}"
                )
            _check_json(item, f"{path}[{key!r}]", where, parents)
        return
    raise TypeError(f"{where}: {path} is a {type(value).__name__} ({value!r:.60}); {_JSON_HINT}")


def check_json_metadata(meta: object, name: str | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the table and the offending entry unless
    ``meta`` is a dict that round-trips through JSON (checkpoints hold no pickles).

    Tuples are accepted (they are written as lists); NaN and infinity are not.
    """
    where = _table(name)
    if not isinstance(meta, dict):
        raise TypeError(f"{where}: metadata must be a dict, got {type(meta).__name__}")
    _check_json(meta, "metadata", where)
