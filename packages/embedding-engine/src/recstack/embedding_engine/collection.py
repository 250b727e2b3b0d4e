"""``EmbeddingCollection``: many features over dynamic hash embedding tables, one module.

Tables with the same ``(dim, dtype)`` are merged into one *physical table*: one
:class:`~recstack.embedding_engine.hash_table.HashTable` and one
:class:`~recstack.core.PagedTensor` of rows, so a forward costs a few launches per physical
table whatever the number of features (dedup, find_or_insert, one pooled lookup for all
pooled features, one gather for all sequence features).

**Hash keys and the id range.** Id ``x`` of logical table ``t`` (its index among the
``T`` tables of its physical table, in config order) is stored under one int64 key, without
collisions:

* ``T == 1``: the key is the id itself; any int64 id works except the hash table's two
  reserved sentinels ``-2**63`` and ``-2**63 + 1``.
* ``T >= 2``: the top ``b = (T - 1).bit_length()`` bits below the sign bit hold ``t``:
  ``key = (t << (63 - b)) | x``. Ids must lie in ``[0, 2**(63 - b))`` (``[0, 2**62)`` for
  two tables, ``[0, 2**61)`` for three or four, ...). An id outside raises a ValueError
  naming the feature and the table; nothing is ever folded onto another id. Pass
  ``merge_tables=False`` to keep every table separate (full int64 range).

Merging never changes values: a new row is initialized from the *logical* id with the
logical table's initializer and seed (:func:`~recstack.embedding_engine.kernels.init_rows.
init_rows_into`), so merged and unmerged collections give bit-identical initial rows.

**Training vs eval.** In training mode a forward inserts unseen ids (find_or_insert, the
value store grown to ``num_rows_allocated``, new rows initialized). In eval mode it is
read-only: unknown ids read their initializer row (``eval_default="initializer"``, computed,
not inserted) or zeros (``eval_default="zeros"``); zeros count in a mean's denominator.

**Gradients.** Rows are not ``nn.Parameter``s and no dense table gradient is ever built. In
training mode with grad enabled the outputs require grad (through a zero-size anchor, see
:mod:`recstack.embedding_engine.autograd`), and ``backward`` stores one coalesced fp32
:class:`~recstack.core.SparseGrad` per physical table: :meth:`EmbeddingCollection.sparse_grads`.
They are cleared by :meth:`EmbeddingCollection.zero_grad_sparse` and at the start of every
forward; several backwards before that (``retain_graph`` or several forwards' outputs in one
loss) accumulate.

Not in this increment (a config asking for them raises NotImplementedError naming the
field): ``fixed_size`` tables, ``eviction``, ``admission``, ``pooling="tile"``.

Example:
    >>> import torch
    >>> from recstack.core import KeyedJaggedTensor
    >>> from recstack.embedding_engine.config import FeatureConfig, TableConfig
    >>> ec = EmbeddingCollection(
    ...     [TableConfig("item", dim=4), TableConfig("user", dim=4)],
    ...     [FeatureConfig("clicks", "item", pooling="mean"),
    ...      FeatureConfig("hist", "item", pooling="none"),
    ...      FeatureConfig("uid", "user")],
    ... )
    >>> list(ec.physical_tables)
    ['item+user']
    >>> kjt = KeyedJaggedTensor(
    ...     ["clicks", "hist", "uid"], torch.tensor([1, 2, 3, 1, 9, 7]),
    ...     lengths=torch.tensor([2, 0, 1, 2, 1, 0]))
    >>> out = ec(kjt)
    >>> out["clicks"].shape, out["hist"].values.shape, out["uid"].requires_grad
    (torch.Size([2, 4]), torch.Size([3, 4]), True)
    >>> (out["clicks"].sum() + out["hist"].values.sum() + out["uid"].sum()).backward()
    >>> ec.sparse_grads()["item+user"].rows.tolist()  # item ids 1, 2, 3, 9 and user id 7
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor, PagedTensor, SparseGrad
from recstack.embedding_engine.autograd import (
    EmbeddingLookupFunction,
    LookupPlan,
    lookup_forward,
    merge_sparse_grads,
)
from recstack.embedding_engine.config import FeatureConfig, TableConfig, check_configs
from recstack.embedding_engine.hash_table import TOMBSTONE, HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows, init_rows_into
from recstack.embedding_engine.kernels.pooling import MODE_MEAN, MODE_SUM

__all__ = ["DEFAULT_PAGE_ROWS", "EmbeddingCollection", "PhysicalTable"]

#: Rows per page of a physical table's value store (see :class:`~recstack.core.PagedTensor`).
DEFAULT_PAGE_ROWS = 65536
_DEFAULT_SLOTS = 1024
_MAX_LOAD = 0.75


@dataclass
class PhysicalTable:
    """The storage of one or more logical tables with the same ``(dim, dtype)``.

    Attributes:
        name: the logical table names joined by ``"+"`` (table names are identifiers, so
            the join is unambiguous), e.g. ``"item+user"``.
        tables: the logical tables, in config order; ``tables[t]`` has table index ``t``.
        dim, dtype: the row width and dtype.
        tag_bits: bits of the key holding the table index (0 for one table).
        hash_table: key -> row.
        values: the rows (``values.num_rows == hash_table.num_rows_allocated``).
    """

    name: str
    tables: tuple[TableConfig, ...]
    dim: int
    dtype: torch.dtype
    tag_bits: int
    hash_table: HashTable
    values: PagedTensor

    @property
    def table_names(self) -> tuple[str, ...]:
        """Names of the logical tables it holds."""
        return tuple(t.name for t in self.tables)

    @property
    def id_bits(self) -> int:
        """Ids of a merged table must lie in ``[0, 2**id_bits)``; 64 means any int64 id."""
        return 64 if self.tag_bits == 0 else 63 - self.tag_bits

    def id_range(self) -> str:
        """The valid ids, in words (for errors and docs)."""
        if self.tag_bits == 0:
            return "any int64 except the reserved -2**63 and -2**63 + 1"
        return f"[0, 2**{self.id_bits})"

    def encode(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        """Hash keys of int64 ``ids`` of logical table ``index`` (ids assumed in range)."""
        if self.tag_bits == 0 or index == 0:
            return ids
        return ids | (index << self.id_bits)

    def decode(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table index, id)`` of each key."""
        if self.tag_bits == 0:
            return torch.zeros_like(keys), keys
        return keys >> self.id_bits, keys & ((1 << self.id_bits) - 1)

    def bad_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of ids that cannot be encoded."""
        if self.tag_bits == 0:
            return ids <= TOMBSTONE
        return (ids < 0) | (ids >= (1 << self.id_bits))


@dataclass
class _Feature:
    config: FeatureConfig
    index: int  # logical table index within the physical table


class EmbeddingCollection(nn.Module):
    """Dynamic hash embeddings for many features: ``forward(kjt) -> {feature: output}``.

    Args:
        tables: the embedding tables (each read by at least one feature).
        features: the features; every one must be a key of the forward's
            ``KeyedJaggedTensor`` (extra keys are ignored).
        device: where rows and hash tables live (default CPU); it does not follow
            ``module.to()``: build the collection on its device.
        merge_tables: merge tables of equal ``(dim, dtype)`` into one physical table (see
            the module docs for the id range it implies).
        page_rows: rows per page of each physical table's value store (a power of two).

    Outputs, per feature:

    * ``pooling="sum"``/``"mean"``: a ``[B, dim]`` tensor (a view of one ``[B, K, dim]``
      buffer per physical table), in the table dtype. ``weighted`` features multiply each
      row by the KJT's weight (a weighted mean divides by the bag length); empty bags give
      zeros.
    * ``pooling="none"``: a :class:`~recstack.core.JaggedTensor` of ``[n_ids, dim]`` rows
      with the feature's offsets; with ``max_len``, a padded ``[B, max_len, dim]`` tensor
      instead (zeros on the right; a longer bag keeps its first ``max_len`` ids, all of
      which are still looked up and inserted).

    Raises:
        ConfigError: invalid configs (:func:`check_configs`).
        NotImplementedError: ``fixed_size``, ``eviction``, ``admission`` or
            ``pooling="tile"``, which later increments add.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        features: Sequence[FeatureConfig],
        device: torch.device | str | None = None,
        *,
        merge_tables: bool = True,
        page_rows: int = DEFAULT_PAGE_ROWS,
    ) -> None:
        super().__init__()
        by_name = check_configs(tables, features)
        for t in by_name.values():
            _check_supported_table(t)
        for f in features:
            if f.pooling == "tile":
                raise NotImplementedError(
                    f"EmbeddingCollection: FeatureConfig {f.name!r}: pooling='tile' is not "
                    "implemented yet; use pooling='none' with max_len and reshape"
                )
        self._device = torch.device("cpu" if device is None else device)
        groups: dict[object, list[TableConfig]] = {}
        for t in by_name.values():
            group = (t.dim, t.dtype) if merge_tables else t.name
            groups.setdefault(group, []).append(t)
        self._physical: dict[str, PhysicalTable] = {}
        self._physical_of: dict[str, tuple[str, int]] = {}  # logical -> (physical, index)
        for members in groups.values():
            phys = self._make_physical(members, page_rows)
            self._physical[phys.name] = phys
            for i, t in enumerate(members):
                self._physical_of[t.name] = (phys.name, i)
        self._features = list(features)
        # Per physical table: its pooled features, then its sequence features.
        self._pooled: dict[str, list[_Feature]] = {p: [] for p in self._physical}
        self._sequence: dict[str, list[_Feature]] = {p: [] for p in self._physical}
        for f in features:
            pname, index = self._physical_of[f.table]
            dest = self._sequence if f.is_sequence else self._pooled
            dest[pname].append(_Feature(f, index))
        self._modes = {
            p: torch.tensor(
                [MODE_MEAN if f.config.pooling == "mean" else MODE_SUM for f in fs],
                dtype=torch.int64,
                device=self._device,
            )
            for p, fs in self._pooled.items()
        }
        self._grads: dict[str, SparseGrad] = {}

    def _make_physical(self, members: list[TableConfig], page_rows: int) -> PhysicalTable:
        name = "+".join(t.name for t in members)
        hint = sum(t.capacity or 0 for t in members)
        slots = max(_DEFAULT_SLOTS, int(hint / _MAX_LOAD) + 1)
        n = len(members)
        return PhysicalTable(
            name=name,
            tables=tuple(members),
            dim=members[0].dim,
            dtype=members[0].dtype,
            tag_bits=0 if n == 1 else (n - 1).bit_length(),
            hash_table=HashTable(slots, self._device, max_load=_MAX_LOAD),
            values=PagedTensor(
                members[0].dim,
                dtype=members[0].dtype,
                device=self._device,
                page_rows=page_rows,
                capacity=hint,
                name=name,
            ),
        )

    # ------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the rows and hash tables live."""
        return self._device

    @property
    def physical_tables(self) -> dict[str, PhysicalTable]:
        """Physical tables by name (e.g. ``"item+user"``), in config order."""
        return dict(self._physical)

    @property
    def table_groups(self) -> dict[str, tuple[str, ...]]:
        """The logical tables each physical table holds: ``{physical: (logical, ...)}``."""
        return {name: p.table_names for name, p in self._physical.items()}

    def physical_table_of(self, table: str) -> str:
        """The name of the physical table holding logical table ``table``."""
        if table not in self._physical_of:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        return self._physical_of[table][0]

    def find_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows (in its physical table's values) of ``ids`` of logical table ``table``.

        Read-only: ``-1`` for ids without a row. Raises ValueError for ids out of range.
        """
        pname, index = self._physical_of.get(table, (None, 0))
        if pname is None:
            raise KeyError(f"EmbeddingCollection: unknown table {table!r}")
        phys = self._physical[pname]
        ids = _as_ids(ids, f"EmbeddingCollection.find_rows({table!r})", self._device)
        if ids.numel() and bool(phys.bad_ids(ids).any()):
            _raise_bad_ids(phys, f"find_rows of table {table!r}", table, ids)
        return phys.hash_table.find(phys.encode(index, ids), check_keys=False)

    # ------------------------------------------------------------------------------------
    # Sparse gradients
    # ------------------------------------------------------------------------------------

    def sparse_grads(self) -> dict[str, SparseGrad]:
        """Coalesced fp32 gradients by physical table name, for a sparse optimizer.

        Rows index the physical table's ``values``. A physical table no backward reached
        since the last forward (or :meth:`zero_grad_sparse`) has no entry.
        """
        return dict(self._grads)

    def zero_grad_sparse(self) -> None:
        """Drop the stored sparse gradients (every forward does this too)."""
        self._grads.clear()

    def _sink(self, name: str, grad: SparseGrad) -> None:
        prev = self._grads.get(name)
        self._grads[name] = grad if prev is None else merge_sparse_grads([prev, grad])

    # ------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor | JaggedTensor]:
        """Look up and pool every feature of ``kjt``; see the class docs for the outputs.

        Raises:
            TypeError: ``kjt`` is not a KeyedJaggedTensor or its ids are not integers.
            ValueError: a feature is missing, the KJT is on another device, a weighted
                feature has no weights, or an id is out of its table's range.
        """
        self._check_kjt(kjt)
        self._grads.clear()
        batch = kjt.stride()
        track = self.training and torch.is_grad_enabled()
        anchor = torch.empty(0, device=self._device, requires_grad=True) if track else None
        out: dict[str, torch.Tensor | JaggedTensor] = {}
        for pname, phys in self._physical.items():
            pooled_fs, seq_fs = self._pooled[pname], self._sequence[pname]
            jts = {f.config.name: kjt[f.config.name] for f in pooled_fs + seq_fs}
            plan = self._plan(phys, pooled_fs, seq_fs, jts, batch)
            if track:
                pooled, seq = EmbeddingLookupFunction.apply(anchor, plan)
            else:
                pooled, seq = lookup_forward(plan)
            for k, f in enumerate(pooled_fs):
                out[f.config.name] = pooled[:, k, :]
            start = 0
            for f in seq_fs:
                jt = jts[f.config.name]
                n = jt.values.shape[0]
                rows = JaggedTensor(seq[start : start + n], jt.offsets)
                start += n
                max_len = f.config.max_len
                out[f.config.name] = rows if max_len is None else rows.to_padded(max_len)
        return {f.name: out[f.name] for f in self._features}

    def _check_kjt(self, kjt: object) -> None:
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(
                f"EmbeddingCollection: expected a KeyedJaggedTensor, got {type(kjt).__name__}"
            )
        missing = [f.name for f in self._features if f.name not in kjt]
        if missing:
            raise ValueError(
                f"EmbeddingCollection: the KeyedJaggedTensor lacks feature(s) {missing} "
                f"(it has {kjt.keys()})"
            )
        if kjt.device != self._device:
            raise ValueError(
                f"EmbeddingCollection: the KeyedJaggedTensor is on {kjt.device} but the "
                f"tables are on {self._device}"
            )
        dtype = kjt.values().dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"EmbeddingCollection: ids must be integers, got {dtype}")

    def _plan(
        self,
        phys: PhysicalTable,
        pooled_fs: list[_Feature],
        seq_fs: list[_Feature],
        jts: dict[str, JaggedTensor],
        batch: int,
    ) -> LookupPlan:
        feats = pooled_fs + seq_fs
        ids = [jts[f.config.name].values.to(torch.int64) for f in feats]
        self._check_ids(phys, feats, ids)
        keys = torch.cat([phys.encode(f.index, x) for f, x in zip(feats, ids, strict=True)])
        n_pooled = sum(x.numel() for x in ids[: len(pooled_fs)])
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        if self.training:
            table = phys.values
            rows = self._insert(phys, unique)[inverse]
        else:
            table = self._eval_table(phys, unique)
            rows = inverse
        offsets, weights = self._pooled_layout(pooled_fs, jts)
        return LookupPlan(
            name=phys.name,
            table=table,
            batch_size=batch,
            pooled_rows=rows[:n_pooled],
            pooled_offsets=offsets,
            modes=self._modes[phys.name],
            weights=weights,
            sequence_rows=rows[n_pooled:],
            sink=self._sink,
        )

    def _check_ids(
        self, phys: PhysicalTable, feats: list[_Feature], ids: list[torch.Tensor]
    ) -> None:
        flags = [phys.bad_ids(x).any() for x in ids if x.numel()]
        if not flags or not any(torch.stack(flags).tolist()):  # one sync per physical table
            return
        for f, x in zip(feats, ids, strict=True):
            if x.numel() and bool(phys.bad_ids(x).any()):
                _raise_bad_ids(phys, f"feature {f.config.name!r}", f.config.table, x)

    def _insert(self, phys: PhysicalTable, unique: torch.Tensor) -> torch.Tensor:
        """Rows of the unique keys, inserting and initializing the new ones."""
        if not unique.numel():
            return unique
        rows, is_new = phys.hash_table.find_or_insert(unique)
        phys.values.ensure_rows(phys.hash_table.num_rows_allocated)
        new_rows, new_keys = rows[is_new], unique[is_new]
        if not new_keys.numel():
            return rows
        tags, logical = phys.decode(new_keys)
        for t, cfg in enumerate(phys.tables):
            mine = tags == t if len(phys.tables) > 1 else slice(None)
            keys_t = logical[mine]
            if keys_t.numel():
                init_rows_into(
                    phys.values,
                    new_rows[mine],
                    keys_t,
                    cfg.initializer,
                    seed=cfg.init_seed,
                    check_bounds=False,
                )
        return rows

    def _eval_table(self, phys: PhysicalTable, unique: torch.Tensor) -> PagedTensor:
        """A compact ``[U, dim]`` table of the unique keys' rows (read-only lookup)."""
        if not unique.numel():
            return phys.values  # nothing is read
        rows = phys.hash_table.find(unique, check_keys=False)
        vals = torch.zeros((unique.numel(), phys.dim), dtype=phys.dtype, device=self._device)
        found = rows >= 0
        vals[found] = phys.values.gather_rows(rows[found], check_bounds=False)
        tags, logical = phys.decode(unique)
        for t, cfg in enumerate(phys.tables):
            if cfg.eval_default != "initializer":
                continue  # "zeros": already zero
            need = ~found if len(phys.tables) == 1 else ~found & (tags == t)
            keys_t = logical[need]
            if keys_t.numel():
                assert cfg.initializer is not None and cfg.init_seed is not None
                vals[need] = init_rows(
                    keys_t, phys.dim, cfg.initializer, seed=cfg.init_seed, dtype=phys.dtype
                )
        return PagedTensor.wrap(vals, name=f"{phys.name}.eval")

    def _pooled_layout(
        self, pooled_fs: list[_Feature], jts: dict[str, JaggedTensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key-major offsets ``[K_p * B + 1]`` and per-id weights of the pooled features."""
        zero = torch.zeros(1, dtype=torch.int64, device=self._device)
        if not pooled_fs:
            return zero, None
        lengths = [jts[f.config.name].lengths() for f in pooled_fs]
        offsets = torch.cat([zero, torch.cat(lengths).cumsum(0)])
        if not any(f.config.weighted for f in pooled_fs):
            return offsets, None
        weights = []
        for f in pooled_fs:
            jt = jts[f.config.name]
            if not f.config.weighted:
                weights.append(torch.ones(jt.values.shape[0], device=self._device))
            elif jt.weights is None:
                raise ValueError(
                    f"EmbeddingCollection: feature {f.config.name!r} is weighted but the "
                    "KeyedJaggedTensor has no weights"
                )
            else:
                weights.append(jt.weights.to(torch.float32))
        return offsets, torch.cat(weights)


def _check_supported_table(t: TableConfig) -> None:
    owner = f"EmbeddingCollection: TableConfig {t.name!r}"
    if t.fixed_size is not None:
        raise NotImplementedError(f"{owner}: fixed_size tables are not implemented yet")
    if t.eviction.enabled:
        raise NotImplementedError(f"{owner}: eviction is not implemented yet")
    if t.admission.enabled:
        raise NotImplementedError(f"{owner}: admission (min_count > 1) is not implemented yet")


def _as_ids(ids: object, what: str, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what}: ids must be integers, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{what}: ids are on {ids.device} but the tables on {device}")
    return ids.reshape(-1).to(torch.int64)


def _raise_bad_ids(phys: PhysicalTable, where: str, table: str, ids: torch.Tensor) -> None:
    bad = int(ids[phys.bad_ids(ids)][0])
    if phys.tag_bits == 0:
        raise ValueError(
            f"EmbeddingCollection: {where} (table {table!r}): id {bad} is reserved by the "
            "hash table (ids may be any int64 except -2**63 and -2**63 + 1)"
        )
    raise ValueError(
        f"EmbeddingCollection: {where} (table {table!r}): id {bad} is out of range; table "
        f"{table!r} shares physical table {phys.name!r} with {len(phys.tables) - 1} other "
        f"table(s), whose table index takes the top {phys.tag_bits} bit(s) of the key, so "
        f"its ids must lie in {phys.id_range()} (pass merge_tables=False to keep the full "
        "int64 range)"
    )
