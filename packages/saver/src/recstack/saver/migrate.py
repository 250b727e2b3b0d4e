"""Migration in: dense embedding weights (``nn.Embedding``, TorchRec) into dynamic tables.

A dense embedding weight is a table whose id ``i`` is row ``i``; a dynamic table (any core
``KeyedState``, e.g. a table of an embedding collection) takes it as chunks of
``(ids, {"values": rows})`` through ``import_chunk``, in bounded chunks, keeping only the
ids a rank owns when given a ``ShardSpec``.

Examples:
    >>> import torch
    >>> from recstack.saver.migrate import import_embedding_weight
    >>> class Table:  # any KeyedState: here a dict of rows
    ...     rows = {}
    ...     def state_metadata(self):
    ...         return {"table": "item", "dim": 2}
    ...     def export_chunks(self, chunk_rows):
    ...         yield from ()
    ...     def import_chunk(self, keys, slots, metadata, shard=None):
    ...         self.rows.update(zip(keys.tolist(), slots["values"].tolist()))
    ...         return keys.numel()
    >>> table = Table()
    >>> weight = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    >>> import_embedding_weight(table, weight, ids=torch.tensor([7, 9]))
    2
    >>> table.rows[9]
    [2.0, 3.0]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recstack.core import HasKeyedStates, KeyedState, ShardSpec
from recstack.core.checks import check_int
from recstack.saver.stateful import declared_dim

__all__ = ["import_embedding_weight", "import_torchrec_state_dict"]

_VALUES = "values"
# TorchRec: EmbeddingBagCollection keeps ``embedding_bags.<table>.weight``,
# EmbeddingCollection ``embeddings.<table>.weight``, under the module's own prefix.
_TORCHREC_KEY = re.compile(
    r"^(?:(?P<prefix>.+)\.)?(?P<kind>embedding_bags|embeddings)\.(?P<table>[^.]+)\.weight$"
)


def _table_name(state: KeyedState, meta: object) -> str:
    name = meta.get("table") if isinstance(meta, Mapping) else None
    return str(name) if isinstance(name, str) else type(state).__name__


def _as_weight(weight: object, where: str) -> torch.Tensor:
    if isinstance(weight, nn.Module) and isinstance(getattr(weight, "weight", None), torch.Tensor):
        weight = weight.weight  # an nn.Embedding / nn.EmbeddingBag itself
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: the weight must be a tensor, got {type(weight).__name__}")
    if hasattr(weight, "local_shards") or hasattr(weight, "full_tensor"):
        raise TypeError(
            f"{where}: the weight is a sharded tensor ({type(weight).__name__}); gather the "
            "full weight first (e.g. the unsharded model's state_dict)"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{where}: the weight must be 2-D [num_ids, dim], got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{where}: the weight must be floating point, got {weight.dtype}")
    return weight.detach()


def _check(
    state: KeyedState, weight: object, ids: object, chunk_rows: object, where: str | None = None
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None, int]:
    """Everything :func:`import_embedding_weight` checks, before anything is imported."""
    if not isinstance(state, KeyedState):
        raise TypeError(
            f"import_embedding_weight: expected a KeyedState, got {type(state).__name__}"
        )
    meta = state.state_metadata()
    if where is None:
        where = f"import_embedding_weight: table {_table_name(state, meta)!r}"
    w = _as_weight(weight, where)
    dim = declared_dim(meta)
    if dim is not None and w.shape[1] != dim:
        raise ValueError(
            f"{where}: the weight has rows of width {w.shape[1]} but the table has dim {dim}"
        )
    rows = check_int(chunk_rows, f"{where}: chunk_rows", minimum=1)
    if ids is None:
        return meta, w, None, rows
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{where}: ids must be a tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{where}: ids must be int64, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != w.shape[0]:
        raise ValueError(
            f"{where}: ids must be 1-D with one id per weight row ({w.shape[0]}), got shape "
            f"{tuple(ids.shape)}"
        )
    ids = ids.to(w.device)
    if ids.numel() > 1:
        ordered = torch.sort(ids).values
        repeated = ordered[1:] == ordered[:-1]
        if bool(repeated.any()):
            dup = int(ordered[1:][repeated][0])
            raise ValueError(f"{where}: ids must be distinct; id {dup} appears more than once")
    return meta, w, ids, rows


def import_embedding_weight(
    state: KeyedState,
    weight: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    chunk_rows: int = 1 << 16,
    shard: ShardSpec | None = None,
) -> int:
    """Import a dense embedding weight into the dynamic table ``state``; return the ids kept.

    Args:
        state: the table (a core ``KeyedState``, e.g. ``ec.keyed_states()["item"]``).
        weight: ``[num_ids, dim]`` floating rows (an ``nn.Embedding`` /
            ``nn.EmbeddingBag`` weight, or the module itself); row ``i`` is id ``i``.
        ids: int64 ``[num_ids]`` distinct ids, row ``i`` going to ``ids[i]`` (e.g. the
            vocabulary a dense table was indexed by).
        chunk_rows: rows imported per ``import_chunk`` call (bounds the memory a chunk
            takes in the table's device).
        shard: keep only the ids this rank owns (core's ``owner``), as a checkpoint load
            does; every rank calls with the whole weight.

    Rows are imported as they are (a ``padding_idx`` row included) through
    ``state.import_chunk(keys, {"values": rows}, state.state_metadata(), shard)``; rows of
    another float dtype are cast by the table.

    Raises:
        TypeError, ValueError: a weight that is not 2-D floating, of another width than the
            table's dim, ids that are not 1-D int64 of the weight's length or not distinct,
            a bad ``chunk_rows``; the message names the table. Nothing is imported then.
    """
    meta, w, ids_t, rows = _check(state, weight, ids, chunk_rows)
    return _import(state, meta, w, ids_t, rows, shard)


def _import(
    state: KeyedState,
    meta: dict[str, Any],
    w: torch.Tensor,
    ids: torch.Tensor | None,
    chunk_rows: int,
    shard: ShardSpec | None,
) -> int:
    kept = 0
    n = w.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        if ids is None:
            keys = torch.arange(start, stop, dtype=torch.int64, device=w.device)
        else:
            keys = ids[start:stop]
        kept += int(state.import_chunk(keys, {_VALUES: w[start:stop]}, meta, shard))
    return kept


def import_torchrec_state_dict(
    states: Mapping[str, KeyedState] | HasKeyedStates,
    state_dict: Mapping[str, torch.Tensor],
    *,
    table_names: Mapping[str, str] | None = None,
    shard: ShardSpec | None = None,
    strict: bool = True,
    chunk_rows: int = 1 << 16,
) -> dict[str, int]:
    """Import the embedding tables of a TorchRec model's ``state_dict`` into dynamic tables.

    TorchRec keeps an ``EmbeddingBagCollection``'s table ``t`` as
    ``embedding_bags.t.weight`` and an ``EmbeddingCollection``'s as
    ``embeddings.t.weight``, under the module's prefix
    (``sparse_arch.embedding_bag_collection.embedding_bags.t.weight``). Each such weight
    (row ``i`` = id ``i``) goes to ``states[table_names.get(t, t)]`` through
    :func:`import_embedding_weight`.

    Args:
        states: the tables to import into, by name (``ec.keyed_states()``, or the object
            with ``keyed_states()`` itself).
        state_dict: the TorchRec model's (unsharded) state dict, or the part of it holding
            the embedding weights.
        table_names: ``{torchrec table: table in states}`` where the names differ.
        shard: keep only the ids this rank owns (see :func:`import_embedding_weight`).
        strict: refuse (before importing anything) keys that are not TorchRec embedding
            weights and tables ``states`` lacks; ``False`` skips them.
        chunk_rows: rows per ``import_chunk`` call.

    Returns:
        The ids kept, by table name in ``states`` (tables of ``states`` the state dict
        does not hold are left as they are and are absent).

    Raises:
        ValueError: (``strict``) keys that are not embedding weights or tables ``states``
            lacks, listing them with the tables found and the tables ``states`` has; one
            table under two keys, two tables mapped onto one, or a weight that does not fit
            its table (see :func:`import_embedding_weight`). Nothing is imported then.
        TypeError: a weight that is not a floating tensor, or a sharded one.
    """
    if isinstance(states, HasKeyedStates) and not isinstance(states, Mapping):
        states = states.keyed_states()
    if not isinstance(states, Mapping):
        raise TypeError(
            "import_torchrec_state_dict: states must be a dict of KeyedStates (e.g. "
            f"ec.keyed_states()), got {type(states).__name__}"
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"import_torchrec_state_dict: state_dict must be a mapping, got "
            f"{type(state_dict).__name__}"
        )
    names = dict(table_names or {})
    found: dict[str, str] = {}  # torchrec table -> key
    targets: dict[str, str] = {}  # table in states -> torchrec table
    other_keys: list[str] = []
    unknown: list[str] = []
    for key in state_dict:
        m = _TORCHREC_KEY.match(key) if isinstance(key, str) else None
        if m is None:
            other_keys.append(str(key))
            continue
        table = m["table"]
        if table in found:
            raise ValueError(
                f"import_torchrec_state_dict: table {table!r} appears under two keys, "
                f"{found[table]!r} and {key!r}; pass the state dict of one module (or filter "
                "it by prefix)"
            )
        found[table] = key
        target = names.get(table, table)
        if target not in states:
            unknown.append(f"{table} (key {key})" if target == table else f"{table} -> {target}")
            continue
        if target in targets:
            raise ValueError(
                f"import_torchrec_state_dict: tables {targets[target]!r} and {table!r} both "
                f"map onto table {target!r}"
            )
        targets[target] = table
    unused = sorted(set(names) - set(found))
    if strict and (other_keys or unknown or unused):
        problems = []
        if other_keys:
            problems.append(
                "keys that are not TorchRec embedding weights (<prefix>.embedding_bags.<table>"
                f".weight or <prefix>.embeddings.<table>.weight): {', '.join(sorted(other_keys))}"
            )
        if unknown:
            problems.append(f"tables the states lack: {', '.join(unknown)}")
        if unused:
            problems.append(
                f"table_names entries for tables the state dict lacks: {', '.join(unused)}"
            )
        raise ValueError(
            "import_torchrec_state_dict: "
            + "; ".join(problems)
            + f". Found tables: {', '.join(sorted(found)) or 'none'}; the states have: "
            f"{', '.join(sorted(states)) or 'none'}. Pass table_names to map names, or "
            "strict=False to skip what does not match."
        )
    # Check every table before importing any, so a bad one leaves all untouched.
    plans = []
    for target, table in targets.items():
        key = found[table]
        where = f"import_torchrec_state_dict: {key!r} -> table {target!r}"
        meta, w, _, rows = _check(states[target], state_dict[key], None, chunk_rows, where)
        plans.append((target, meta, w, rows))
    return {
        target: _import(states[target], meta, w, None, rows, shard)
        for target, meta, w, rows in plans
    }
