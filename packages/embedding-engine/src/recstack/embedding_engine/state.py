"""Checkpoint state of an :class:`~recstack.embedding_engine.collection.EmbeddingCollection`.

The collection's rows leave and come back through core's
:class:`~recstack.core.keyed_state.KeyedState` chunk format, one *logical* table at a time:

* keys are the table's **logical ids** (int64, the full range), never hash-table internals,
  so a checkpoint does not depend on how tables were merged: state exported with
  ``merge_tables=True`` loads into ``merge_tables=False`` and back;
* slots are ``{"values": [n, dim] rows in the table dtype}`` plus, when the physical table
  keeps per-row metadata (last-seen step, hit count), one slot per metadata store under
  its own name, ``[n, ...]``, plus one slot per *companion* of the value store (core's
  ``PagedTensor.add_companion``: a sparse optimizer's moments and per-row step counts),
  so optimizer state travels with its ids;
* chunks hold at most ``chunk_rows`` keys, gathered from the value store one chunk at a
  time (the only full-size buffers are the key -> row index, 16 bytes per key);
* resharding uses core's :func:`~recstack.core.sharding.owner` on the logical ids: a rank
  importing with ``world_size=M, rank=r`` keeps the ids with ``owner(id, M) == r``;
* deltas: after :meth:`CollectionTableState.mark_clean`, the table exports only the ids
  looked up in training, inserted or imported since (their rows are flagged in the row
  metadata), and lists the ids evicted or erased since as tombstones;
* the admission filter's counters are the table's auxiliary state: saved per rank, and
  summed (saturating) on load, so an id seen before a checkpoint counts after it.

:func:`collection_table_states` wraps each logical table as a ``KeyedState`` for the saver.

Examples:
    >>> import torch
    >>> from recstack.core import KeyedJaggedTensor
    >>> from recstack.embedding_engine.collection import EmbeddingCollection
    >>> from recstack.embedding_engine.config import FeatureConfig, TableConfig
    >>> def make():
    ...     return EmbeddingCollection([TableConfig("item", dim=4)], [FeatureConfig("f", "item")])
    >>> ec = make()
    >>> _ = ec(KeyedJaggedTensor(["f"], torch.tensor([3, 5, 3]), lengths=torch.tensor([2, 1])))
    >>> chunks = list(export_collection_chunks(ec, chunk_rows=1))
    >>> [(table, keys.tolist()) for table, keys, _ in chunks]
    [('item', [3]), ('item', [5])]
    >>> fresh = make()
    >>> sum(import_collection_chunk(fresh, t, k, s) for t, k, s in chunks)
    2
    >>> torch.equal(fresh.physical_tables["item"].values.to_dense(),
    ...             ec.physical_tables["item"].values.to_dense())
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from recstack.core import Companion, PagedTensor
from recstack.core.checks import check_int
from recstack.core.keyed_state import check_json_metadata, select_owned, validate_chunk
from recstack.core.sharding import ShardSpec
from recstack.embedding_engine.config import TABLE_DTYPES
from recstack.embedding_engine.kernels.init_rows import init_rows_into

if TYPE_CHECKING:
    from recstack.embedding_engine.collection import EmbeddingCollection
    from recstack.embedding_engine.physical import PhysicalTable

__all__ = [
    "ADMISSION_COUNTERS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "VALUES_SLOT",
    "CollectionTableState",
    "collection_state_metadata",
    "collection_table_states",
    "export_collection_chunks",
    "import_collection_chunk",
]

#: ``metadata["format"]`` of a collection's state.
STATE_FORMAT = "recstack.embedding_engine.EmbeddingCollection"
#: ``metadata["version"]``; bumped when the chunk format changes.
STATE_VERSION = 1
#: The slot holding the embedding rows.
VALUES_SLOT = "values"
#: The auxiliary tensor holding a table's admission counters.
ADMISSION_COUNTERS = "admission_counters"

_DTYPE_NAMES = {v: k for k, v in TABLE_DTYPES.items()}
# Per-row metadata stores a physical table may expose (besides a ``row_metadata`` mapping):
# looked up with getattr so this module works with tables that keep none.
_METADATA_ATTRS = ("last_seen", "hit_count")

_RowStore = PagedTensor | torch.Tensor


# ------------------------------------------------------------------------------------------
# Introspection
# ------------------------------------------------------------------------------------------


def _row_metadata(phys: PhysicalTable) -> dict[str, _RowStore]:
    """The per-row metadata stores of ``phys``, by slot name (empty if it keeps none).

    A store is a :class:`~recstack.core.PagedTensor` or a tensor indexed by row on dim 0.
    """
    found: dict[str, _RowStore] = {}
    meta = getattr(phys, "meta", None)  # the collection's RowMetadata (eviction.py)
    if meta is not None:
        found["last_seen"] = meta.last_seen
        found["hit_count"] = meta.counts
    mapping = getattr(phys, "row_metadata", None)
    if isinstance(mapping, Mapping):
        found.update(
            (str(k), v) for k, v in mapping.items() if isinstance(v, (PagedTensor, torch.Tensor))
        )
    for attr in _METADATA_ATTRS:
        store = getattr(phys, attr, None)
        if attr not in found and isinstance(store, (PagedTensor, torch.Tensor)):
            found[attr] = store
    found.pop(VALUES_SLOT, None)
    return found


def _companions(phys: PhysicalTable) -> dict[str, Companion]:
    """The value store's companions (optimizer slots), by slot name."""
    found = dict(phys.values.companions)
    taken = sorted(set(found) & {VALUES_SLOT, *_row_metadata(phys)})
    if taken:
        raise ValueError(
            f"physical table {phys.name!r}: companion(s) {taken} of its value store are "
            "named like its own slots; rename them"
        )
    return found


def _store_info(store: _RowStore) -> dict[str, Any]:
    if isinstance(store, PagedTensor):
        return {"dtype": str(store.dtype).removeprefix("torch."), "shape": [store.dim]}
    return {"dtype": str(store.dtype).removeprefix("torch."), "shape": list(store.shape[1:])}


def _locate(ec: EmbeddingCollection, table: object, what: str) -> tuple[PhysicalTable, int]:
    """``(physical table, index)`` of logical ``table``; KeyError naming the known ones."""
    groups = ec.table_groups
    for pname, names in groups.items():
        if table in names:
            return ec.physical_tables[pname], names.index(table)
    known = [t for names in groups.values() for t in names]
    raise KeyError(f"{what}: unknown table {table!r}; the collection has tables {known}")


def _table_slots(phys: PhysicalTable) -> dict[str, dict[str, Any]]:
    slots = {VALUES_SLOT: {"dtype": _DTYPE_NAMES[phys.dtype], "shape": [phys.dim]}}
    slots.update((name, _store_info(s)) for name, s in _row_metadata(phys).items())
    for name, c in _companions(phys).items():
        slots[name] = {**_store_info(c.store), "companion": True, "init": c.init}
    return slots


def collection_state_metadata(ec: EmbeddingCollection) -> dict[str, Any]:
    """A JSON-able description of the collection's state (no scan of the tables: key
    counts are the ones the collection keeps).

    Returns:
        ``{"format", "version", "key": "logical_id", "tables": {name: {...}},
        "physical_tables": {name: {...}}}``. Each logical table entry holds its
        ``config`` (``TableConfig.to_dict()``), ``dim``, ``dtype``, ``physical`` (the
        physical table holding it), ``index`` (its table index there), ``num_keys`` and
        ``slots`` (``{slot: {"dtype", "shape"}}``, shape without the key dimension).
        Each physical table entry holds ``tables``, ``dim``, ``dtype``, ``tag_bits``,
        ``num_keys`` and ``num_rows_allocated``.
    """
    tables: dict[str, Any] = {}
    physical: dict[str, Any] = {}
    for pname, phys in ec.physical_tables.items():
        counts = [ec.num_ids(cfg.name) for cfg in phys.tables]
        slots = _table_slots(phys)
        for index, cfg in enumerate(phys.tables):
            tables[cfg.name] = {
                "config": cfg.to_dict(),
                "dim": phys.dim,
                "dtype": _DTYPE_NAMES[phys.dtype],
                "physical": pname,
                "index": index,
                "num_keys": int(counts[index]),
                "slots": slots,
            }
        for index, cfg in enumerate(phys.tables):
            sketch = phys.sketches.get(index)
            if sketch is not None:
                tables[cfg.name]["admission"] = {
                    "depth": sketch.depth,
                    "width": sketch.width,
                    "min_count": cfg.admission.min_count,
                }
        physical[pname] = {
            "tables": list(phys.table_names),
            "dim": phys.dim,
            "dtype": _DTYPE_NAMES[phys.dtype],
            "tag_bits": phys.tag_bits,
            "num_keys": len(phys.hash_table),
            "num_rows_allocated": phys.hash_table.num_rows_allocated,
        }
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "key": "logical_id",
        "tables": tables,
        "physical_tables": physical,
    }
    check_json_metadata(meta)
    return meta


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def _gather(store: _RowStore, rows: torch.Tensor) -> torch.Tensor:
    if isinstance(store, PagedTensor):
        return store.gather_rows(rows, check_bounds=False)
    return store.index_select(0, rows)


def _export_physical(
    phys: PhysicalTable, only: int | None, chunk_rows: int, changed: bool = False
) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    ids, tags, rows = phys.entries()
    meta = _row_metadata(phys)
    stores = {name: c.store for name, c in _companions(phys).items()}
    for index, cfg in enumerate(phys.tables):
        if only is not None and index != only:
            continue
        keep = None
        if len(phys.tables) > 1:
            keep = tags == index
        if changed:
            dirty = phys.meta.dirty.index_select(0, rows)
            keep = dirty if keep is None else keep & dirty
        if keep is not None:
            mine = keep.nonzero().squeeze(1)
            ids_t, rows_t = ids.index_select(0, mine), rows.index_select(0, mine)
        else:
            ids_t, rows_t = ids, rows
        for start in range(0, ids_t.numel(), chunk_rows):
            r = rows_t[start : start + chunk_rows]
            # Values and optimizer slots sit at a tiered table's slots, metadata at rows.
            at = phys.physical(r)
            slots = {VALUES_SLOT: phys.values.gather_rows(at, check_bounds=False)}
            slots.update((name, _gather(store, at)) for name, store in stores.items())
            slots.update((name, _gather(store, r)) for name, store in meta.items())
            yield cfg.name, ids_t[start : start + chunk_rows], slots


def export_collection_chunks(
    ec: EmbeddingCollection, chunk_rows: int, *, table: str | None = None
) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(table, ids, {slot: rows})`` for every logical table, tables by name.

    Args:
        ec: the collection.
        chunk_rows: at most this many ids per chunk (>= 1).
        table: export only this logical table.

    Within a table, ids come by ascending row and each id appears in exactly one chunk;
    an empty table yields nothing. ``ids`` is int64 ``[n]`` (logical ids, on the
    collection's device); ``rows["values"]`` is ``[n, dim]`` in the table dtype, gathered
    when the chunk is produced (a copy; later forwards do not change it). The key -> row
    index of a physical table is snapshotted when its first chunk is produced, so finish
    the iteration before the collection changes.

    Raises:
        TypeError, ValueError: ``chunk_rows`` is not an int >= 1.
        KeyError: ``table`` is unknown.
    """
    chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
    if table is not None:
        phys, index = _locate(ec, table, "export_collection_chunks")
        return _export_physical(phys, index, chunk_rows)
    return _export_all(ec, chunk_rows)


def _export_all(
    ec: EmbeddingCollection, chunk_rows: int
) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    by_table = {
        name: (phys, index)
        for phys in ec.physical_tables.values()
        for index, name in enumerate(phys.table_names)
    }
    # By name, so the order does not depend on how tables were grouped.
    for name in sorted(by_table):
        phys, index = by_table[name]
        yield from _export_physical(phys, index, chunk_rows)


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------


def _check_rows(
    where: str, slot: str, rows: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """``rows`` must be ``[n, *shape]`` and of the same kind as ``dtype`` (float, int, bool)."""
    if tuple(rows.shape[1:]) != shape:
        raise ValueError(
            f"{where}, slot {slot!r}: rows have shape {tuple(rows.shape)} but the table "
            f"stores [n, {', '.join(map(str, shape))}] (dim mismatch)"
        )
    if _kind(rows.dtype) != _kind(dtype):
        raise TypeError(
            f"{where}, slot {slot!r}: rows are {rows.dtype} but the table stores {dtype}; "
            "rows are cast only within a kind (any float to the table's float dtype, any "
            "integer to its integer dtype)"
        )


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def _check_metadata(where: str, table: str, phys: PhysicalTable, metadata: object) -> None:
    """Check the exporting side's metadata against this table (format, dim)."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{where}: metadata format is {metadata.get('format')!r}, expected {STATE_FORMAT!r}"
        )
    version = metadata.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(
            f"{where}: metadata version {version!r} is not supported (this build reads "
            f"versions up to {STATE_VERSION})"
        )
    tables = metadata.get("tables")
    info = tables.get(table) if isinstance(tables, Mapping) else None
    if not isinstance(info, Mapping):
        raise ValueError(f"{where}: the exported metadata has no table {table!r}")
    if info.get("dim") != phys.dim:
        raise ValueError(
            f"{where}: the checkpoint's table has dim {info.get('dim')} but this "
            f"collection's has dim {phys.dim}"
        )


def _scatter(store: _RowStore, rows: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(store, PagedTensor):
        store.scatter_rows(rows, values, check_bounds=False)
    else:
        store.index_copy_(0, rows, values.to(store.dtype))


def _shard(where: str, shard: ShardSpec | None, world_size: int, rank: int) -> ShardSpec | None:
    if shard is not None:
        if not isinstance(shard, ShardSpec):
            raise TypeError(f"{where}: shard must be a ShardSpec, got {type(shard).__name__}")
        if (world_size, rank) != (1, 0):
            raise ValueError(f"{where}: pass either shard or world_size/rank, not both")
        return shard
    spec = ShardSpec(world_size, rank)
    return spec if spec.world_size > 1 else None


def _declared_companions(
    metadata: Mapping[str, Any] | None, table: str
) -> dict[str, tuple[float, list[Any]]]:
    """``{slot: (init, shape)}`` of the companion slots the exporting side's metadata
    declares (shape without the key dimension)."""
    if metadata is None:
        return {}
    info = metadata.get("tables", {}).get(table, {}) if isinstance(metadata, Mapping) else {}
    slots = info.get("slots", {}) if isinstance(info, Mapping) else {}
    out = {}
    for name, spec in slots.items() if isinstance(slots, Mapping) else ():
        if isinstance(spec, Mapping) and spec.get("companion") is True:
            init = spec.get("init", 0.0)
            init = float(init) if isinstance(init, (int, float)) else 0.0
            out[str(name)] = (init, list(spec.get("shape", [])))
    return out


def import_collection_chunk(
    ec: EmbeddingCollection,
    table: str,
    keys: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    *,
    world_size: int = 1,
    rank: int = 0,
    shard: ShardSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Insert or overwrite the rows of logical ids ``keys`` of ``table``; return how many
    ids were kept.

    Args:
        ec: the collection to load into (its device; chunks on another device are moved).
        table: the logical table the chunk was exported from.
        keys: int64 ``[n]`` logical ids, distinct within the chunk.
        tensors: ``{"values": [n, dim] floating rows, metadata slot: [n, ...], companion
            slot: [n, width]}``; rows of another floating dtype are cast to the table
            dtype, integer metadata to the store's integer dtype. A companion slot (an
            optimizer's state) the value store lacks is created, fp32, when ``metadata``
            declares it (``"companion": true`` with its ``"init"``). A metadata slot the
            table keeps but the chunk lacks starts fresh on ids new to the table
            (last-seen step = the collection's current ``step``, hit count 0) and is left
            unchanged on ids it already held.
        world_size: with ``rank``, keep only the ids with ``owner(id, world_size) == rank``
            (core's :func:`~recstack.core.sharding.owner`); or pass ``shard``.
        rank: this rank, in ``[0, world_size)``.
        shard: a :class:`~recstack.core.sharding.ShardSpec` (instead of world_size/rank).
        metadata: :func:`collection_state_metadata` of the exporting collection, checked
            against this one (format, version, dim) when given.

    The whole chunk is validated before anything changes, ranks' shards included, so a
    bad chunk raises on every rank and never loads half-way. Kept ids get a row through
    the hash table's ``find_or_insert`` (no initializer runs) and the imported values are
    written with ``scatter_rows``. Rows that ids new to the table take (possibly rows an
    evicted id freed) are announced through ``PagedTensor.rows_reset``, so a sparse
    optimizer's state of those rows starts afresh, as after a training insert.

    Raises:
        KeyError: unknown ``table``.
        TypeError: keys not int64, rows of a dtype that cannot be cast (integer values).
        ValueError: keys not 1-D, a slot whose first dim is not the key count, a dim
            mismatch, a missing ``"values"`` slot or an unknown slot, duplicate ids, or
            ids outside a fixed-size table's ``[0, fixed_size)`` (a dynamic table, merged
            or not, takes any int64 id).
    """
    where = f"import_collection_chunk: table {table!r}"
    phys, index = _locate(ec, table, "import_collection_chunk")
    spec = _shard(where, shard, world_size, rank)
    if metadata is not None:
        _check_metadata(where, table, phys, metadata)
    validate_chunk(keys, tensors, name=table)
    meta_stores = _row_metadata(phys)
    companions = _companions(phys)
    declared = _declared_companions(metadata, table)
    if VALUES_SLOT not in tensors:
        raise ValueError(f"{where}: the chunk has no {VALUES_SLOT!r} slot (got {list(tensors)})")
    known = {VALUES_SLOT, *meta_stores, *companions, *declared}
    unknown = [s for s in tensors if s not in known]
    if unknown:
        raise ValueError(
            f"{where}: unknown slot(s) {unknown}; this table stores "
            f"{[VALUES_SLOT, *meta_stores, *companions]} (a companion slot it lacks, such "
            "as an optimizer's, is created only when the metadata declares it)"
        )
    _check_rows(where, VALUES_SLOT, tensors[VALUES_SLOT], (phys.dim,), phys.dtype)
    for name, store in meta_stores.items():
        if name in tensors:
            shape = (store.dim,) if isinstance(store, PagedTensor) else tuple(store.shape[1:])
            _check_rows(where, name, tensors[name], shape, store.dtype)
    new_companions: dict[str, tuple[int, float]] = {}
    for name in tensors:
        if name in companions:
            store = companions[name].store
            _check_rows(where, name, tensors[name], (store.dim,), store.dtype)
        elif name in declared:
            init, shape = declared[name]
            if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
                raise ValueError(
                    f"{where}, slot {name!r}: the metadata declares a companion of shape "
                    f"{shape}; companions hold [n, width] rows"
                )
            _check_rows(where, name, tensors[name], (shape[0],), torch.float32)
            new_companions[name] = (shape[0], init)
    if not keys.numel():
        return 0
    device = ec.device
    keys = keys.to(device)
    if bool(phys.bad_ids(keys).any()):
        bad = int(keys[phys.bad_ids(keys)][0])
        raise ValueError(
            f"{where}: id {bad} cannot be stored; ids of this table must lie in "
            f"{phys.id_range()} (physical table {phys.name!r} holds "
            f"{len(phys.tables)} table(s))"
        )
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError(f"{where}: the chunk repeats ids; each id must appear once")
    keys, slots = select_owned(keys, {s: t.to(device) for s, t in tensors.items()}, spec)
    if not keys.numel():
        return 0
    held = len(phys.hash_table)
    rows, is_new = phys.hash_table.find_or_insert(keys, index)
    n_new = len(phys.hash_table) - held  # known on the host: no sync to count new keys
    n_rows = phys.hash_table.num_rows_allocated
    phys.grow(n_rows)
    at = phys.physical(rows)  # values and optimizer slots; metadata is by row
    new_rows = new_slots = rows[:0]
    if n_new:
        new_rows = rows.index_select(0, torch.nonzero_static(is_new, size=n_new).squeeze(1))
        new_slots = phys.physical(new_rows)
        # A new key may take a row an evicted key freed: whatever is kept per row
        # elsewhere (a sparse optimizer's moments) must not carry over to it, exactly as
        # when a training forward inserts the key. Chunk slots written below still win.
        phys.values.rows_reset(new_slots)
    phys.values.scatter_rows(at, slots[VALUES_SLOT], check_bounds=False)
    for name, (width, init) in new_companions.items():
        # The table gets the slot a checkpoint carries (an optimizer's state): the
        # optimizer of this table takes it over when it first needs it.
        store = PagedTensor(
            width,
            torch.float32,
            phys.values.device,
            page_rows=phys.values.page_rows,
            name=f"{phys.values.name}.{name}",
        )
        phys.values.add_companion(name, store, init=init)
        companions[name] = phys.values.companions[name]
    for name, companion in companions.items():
        if name in slots:
            companion.store.scatter_rows(at, slots[name], check_bounds=False)
    if getattr(phys, "meta", None) is not None:
        # The collection's metadata grew with its table (grow): its views changed.
        phys.meta.mark_dirty(rows)
        meta_stores = _row_metadata(phys)
    phys.add_ids(index, n_new)  # capacity caps read the per-table id counts
    for name, store in meta_stores.items():
        if isinstance(store, PagedTensor):
            store.ensure_rows(n_rows)
        elif store.shape[0] < n_rows:
            raise RuntimeError(
                f"{where}: metadata store {name!r} has {store.shape[0]} rows but the table "
                f"needs {n_rows}; it must grow with the hash table"
            )
        if name in slots:
            _scatter(store, rows, slots[name])
        elif n_new:
            _scatter(store, new_rows, _fresh_metadata(ec, name, store, n_new))
    return int(keys.numel())


def _fresh_metadata(ec: EmbeddingCollection, name: str, store: _RowStore, n: int) -> torch.Tensor:
    """Metadata of ``n`` keys imported without it: seen now (so a staleness rule does not
    evict them before any training step could), never looked up, as a fresh insert."""
    shape = (n, store.dim) if isinstance(store, PagedTensor) else (n, *store.shape[1:])
    value = ec.step if name == "last_seen" else 0
    return torch.full(shape, value, dtype=store.dtype, device=store.device)


# ------------------------------------------------------------------------------------------
# KeyedState adapter
# ------------------------------------------------------------------------------------------


class CollectionTableState:
    """One logical table of a collection as a core ``KeyedState`` (for the saver).

    Keys are the table's logical ids; slots as :func:`export_collection_chunks`.

    Args:
        ec: the collection.
        table: a logical table name.
    """

    def __init__(self, ec: EmbeddingCollection, table: str) -> None:
        _locate(ec, table, "CollectionTableState")
        self._ec = ec
        self._table = table

    @property
    def table(self) -> str:
        """The logical table name."""
        return self._table

    def state_metadata(self) -> dict[str, Any]:
        """The collection's metadata with ``"table"`` set to this table's name and, at the
        top level, this table's ``"slots"``, ``"dim"``, ``"dtype"`` and ``"num_keys"`` (what
        a saver checks a checkpoint's table against)."""
        meta = collection_state_metadata(self._ec)
        meta["table"] = self._table
        info = meta["tables"][self._table]
        meta.update(slots=info["slots"], dim=info["dim"], dtype=info["dtype"],
                    num_keys=info["num_keys"])  # fmt: skip
        return meta

    def export_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(ids, {slot: rows})`` chunks of this table (see :func:`export_collection_chunks`)."""
        for _, keys, slots in export_collection_chunks(self._ec, chunk_rows, table=self._table):
            yield keys, slots

    def import_chunk(
        self,
        keys: torch.Tensor,
        slots: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        shard: ShardSpec | None = None,
    ) -> int:
        """Load one chunk (see :func:`import_collection_chunk`); returns the ids kept."""
        return import_collection_chunk(
            self._ec, self._table, keys, slots, shard=shard, metadata=metadata
        )

    # ------------------------------------------------------------------ deltas
    def mark_clean(self) -> None:
        """Start a new change window for this table: its rows count as unchanged and its
        removal log restarts (and is kept from now on)."""
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        phys.meta.ensure_rows(phys.hash_table.num_rows_allocated)
        if len(phys.tables) == 1:
            phys.meta.mark_clean()  # every row is this table's: no scan of the keys
        else:
            _, tags, rows = phys.entries()
            phys.meta.mark_clean(rows[tags == index])
        phys.start_removal_log(index)

    def export_changed_chunks(
        self, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Chunks of the ids looked up in training, inserted or imported since the last
        :meth:`mark_clean` (all of them before the first), as :meth:`export_chunks`."""
        chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        for _, keys, slots in _export_physical(phys, index, chunk_rows, changed=True):
            yield keys, slots

    def removed_keys(self) -> torch.Tensor:
        """int64 ids evicted or erased since the last :meth:`mark_clean` (sorted, each
        once; empty before the first mark, when no log is kept)."""
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        return phys.removed_ids(index)

    def remove_keys(self, keys: torch.Tensor, shard: ShardSpec | None = None) -> int:
        """Erase ``keys`` (logical ids; those ``shard`` owns, given one) from the table;
        return how many it held. Their rows go to the free list, as after an eviction. A
        fixed-size table keeps a row for every id: its rows of ``keys`` go back to their
        initial values instead (the initializer's, fresh optimizer state, no hits), which
        is what a load does before it imports a checkpoint's rows."""
        where = f"remove_keys: table {self._table!r}"
        validate_chunk(keys, {}, name=self._table)
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        keys = keys.to(self._ec.device)
        if bool(phys.bad_ids(keys).any()):
            raise ValueError(f"{where}: ids must lie in {phys.id_range()}")
        keys, _ = select_owned(keys, {}, shard)
        if phys.is_fixed_size:
            return _reset_fixed_rows(phys, keys)
        # Only held ids are erased, so only they are logged as removed.
        held = keys[phys.hash_table.find(keys, index, check_keys=False) >= 0]
        return phys.erase(index, held)

    # ------------------------------------------------------------------ auxiliary state
    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        """The admission filter's counters (``{}`` for a table without admission)."""
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        sketch = phys.sketches.get(index)
        return {} if sketch is None else {ADMISSION_COUNTERS: sketch.counters}

    def load_auxiliary_state(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Merge saved ranks' admission counters into this table's: their saturating sum
        (each rank counted the ids it saw; an id's count is the sum over ranks, capped at
        the threshold). Counters are replaced, not added to the table's current ones.

        Raises:
            ValueError: counters of another shape than this table's sketch.
        """
        phys, index = _locate(self._ec, self._table, "CollectionTableState")
        sketch = phys.sketches.get(index)
        saved = [p[ADMISSION_COUNTERS] for p in parts if ADMISSION_COUNTERS in p]
        if sketch is None or not saved:
            return
        total = torch.zeros(sketch.counters.shape, dtype=torch.int64, device=self._ec.device)
        for i, counters in enumerate(saved):
            if tuple(counters.shape) != tuple(sketch.counters.shape):
                raise ValueError(
                    f"load_auxiliary_state: table {self._table!r}: saved part {i} has "
                    f"admission counters of shape {tuple(counters.shape)}, this table's "
                    f"sketch is {tuple(sketch.counters.shape)} (a different counter_slots)"
                )
            total += counters.to(device=self._ec.device, dtype=torch.int64)
        cap = phys.tables[index].admission.min_count
        sketch.counters.copy_(total.clamp_(max=cap).to(sketch.counters.dtype))


def _reset_fixed_rows(phys: PhysicalTable, ids: torch.Tensor) -> int:
    """A fixed-size table's rows of ``ids`` (row = id) as when the table was made."""
    ids = torch.unique(ids)
    if not ids.numel():
        return 0
    (t,) = phys.tables
    assert t.initializer is not None and t.init_seed is not None
    init_rows_into(phys.values, ids, ids, t.initializer, seed=t.init_seed, check_bounds=False)
    phys.values.rows_reset(ids)
    zeros = torch.zeros_like(ids)
    phys.meta.set_rows(ids, zeros, zeros)
    phys.meta.mark_dirty(ids)  # changed: a delta carries them
    return int(ids.numel())


def collection_table_states(ec: EmbeddingCollection) -> dict[str, CollectionTableState]:
    """A :class:`CollectionTableState` per logical table, by table name."""
    names = sorted(t for phys in ec.physical_tables.values() for t in phys.table_names)
    return {name: CollectionTableState(ec, name) for name in names}
