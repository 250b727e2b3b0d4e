"""One dynamic embedding table as a module: ``nn.Embedding`` / ``nn.EmbeddingBag`` for any id.

:class:`DynamicEmbedding` is the single-table face of
:class:`~recstack.embedding_engine.collection.EmbeddingCollection`: the same hash table,
initializers, eviction, admission, sparse backward and state, called like torch's
embedding modules instead of through a ``KeyedJaggedTensor``. Ids are any int64, never
wrapped or collided.

Examples:
    >>> import torch
    >>> from recstack.embedding_engine import DynamicEmbedding, TableConfig
    >>> emb = DynamicEmbedding(TableConfig("item", dim=4))
    >>> out = emb(torch.tensor([[10**15, 7], [7, -3]]))  # rows made on first sight
    >>> out.shape, len(emb)
    (torch.Size([2, 2, 4]), 3)
    >>> out.sum().backward()
    >>> emb.sparse_grad().rows.tolist()  # the rows of the three ids, coalesced
    [0, 1, 2]
    >>> bag = DynamicEmbedding(TableConfig("tag", dim=4), mode="mean")
    >>> bag(torch.tensor([5, 6, 5]), torch.tensor([0, 2])).shape  # bags [5, 6] and [5]
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor, PagedTensor, RowUpdater, SparseGrad
from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import FeatureConfig, TableConfig
from recstack.embedding_engine.parameters import EmbeddingSparseParameter
from recstack.embedding_engine.physical import DEFAULT_PAGE_ROWS

__all__ = ["BagMode", "DynamicEmbedding"]

#: How a :class:`DynamicEmbedding` with a mode pools each bag, as ``nn.EmbeddingBag``.
BagMode = Literal["sum", "mean"]

_FEATURE = "ids"
_MODES = (None, *get_args(BagMode))


class DynamicEmbedding(nn.Module):
    """A dynamic hash embedding table with torch's embedding-module calling convention.

    Args:
        table: the table (its name names it in errors, gradients and saved state).
        mode: ``None``: ``forward(ids)`` returns one row per id, ``[*ids.shape, dim]``, like
            ``nn.Embedding``. ``"sum"`` or ``"mean"``: ``forward(ids, offsets,
            per_sample_weights)`` pools bags into ``[B, dim]``, like ``nn.EmbeddingBag``.
        device: where the rows and the hash table live (default CPU).
        page_rows: rows per page of the value store.
        evict_every: run the table's ``ttl_steps``/``min_count`` eviction every this many
            training forwards (see :class:`EmbeddingCollection`).

    Training forwards insert new ids (initialized by the table's initializer) and stamp
    their rows; eval forwards are read-only (unknown ids read the table's ``eval_default``).
    The backward leaves one coalesced :class:`~recstack.core.SparseGrad` in
    :meth:`sparse_grad`, for a sparse optimizer (the rows are not ``nn.Parameter`` objects).
    For state export and import, pass :attr:`collection` to the functions of
    :mod:`recstack.embedding_engine.state`.

    Raises:
        ValueError: an unknown ``mode``.
        ConfigError: an invalid table config.
    """

    def __init__(
        self,
        table: TableConfig,
        mode: BagMode | None = None,
        device: torch.device | str | None = None,
        *,
        page_rows: int = DEFAULT_PAGE_ROWS,
        evict_every: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"DynamicEmbedding: mode must be None, 'sum' or 'mean', got {mode!r}")
        self._mode = mode
        if mode is None:
            feature = FeatureConfig(_FEATURE, table.name, pooling="none")
        else:
            # Weighted so one feature serves calls with and without per_sample_weights
            # (ones stand in when none are given: 4 bytes per id).
            feature = FeatureConfig(_FEATURE, table.name, pooling=mode, weighted=True)
        self.collection = EmbeddingCollection(
            [table], [feature], device, page_rows=page_rows, evict_every=evict_every
        )
        self._table = table

    @property
    def table(self) -> TableConfig:
        """The table's config."""
        return self._table

    @property
    def dim(self) -> int:
        """The row width."""
        return self._table.dim

    @property
    def mode(self) -> BagMode | None:
        """``None`` (one row per id), ``"sum"`` or ``"mean"`` (pooled bags)."""
        return self._mode

    @property
    def device(self) -> torch.device:
        """Where the rows live (``module.to(device)`` moves them)."""
        return self.collection.device

    def __len__(self) -> int:
        """How many ids have a row."""
        return self.collection.num_ids(self._table.name)

    def extra_repr(self) -> str:
        return f"{self._table.name!r}, dim={self.dim}, mode={self._mode!r}, device={self.device}"

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Look the ids up (and pool them into bags when :attr:`mode` is set).

        Args:
            ids: integer ids; any shape without a mode, 1-D with one.
            offsets: with a mode, the ``[B]`` start of each bag in ``ids`` (as
                ``nn.EmbeddingBag`` takes them: ``offsets[0] == 0``, non-decreasing); one
                sync checks them.
            per_sample_weights: with a mode, float ``[len(ids)]`` weights of the ids (a
                weighted mean divides the weighted sum by the bag length).

        Returns:
            ``[*ids.shape, dim]`` rows without a mode, ``[B, dim]`` pooled bags with one, in
            the table's dtype.

        Raises:
            TypeError: ids are not integers.
            ValueError: bad offsets or weights, or ids on another device.
        """
        if not isinstance(ids, torch.Tensor):
            raise TypeError(
                f"DynamicEmbedding: ids must be a torch.Tensor, got {type(ids).__name__}"
            )
        if self._mode is None:
            if offsets is not None or per_sample_weights is not None:
                raise ValueError(
                    "DynamicEmbedding: offsets and per_sample_weights need mode='sum' or 'mean'"
                )
            flat = ids.reshape(-1)
            n = flat.numel()
            lengths = torch.full((1,), n, dtype=torch.int64, device=flat.device)
            kjt = KeyedJaggedTensor([_FEATURE], flat, lengths, length_per_key=[n])
            rows = self.collection(kjt)[_FEATURE].values
            return rows.reshape(*ids.shape, self.dim)
        return self._bags(ids, offsets, per_sample_weights)

    def _bags(
        self, ids: torch.Tensor, offsets: torch.Tensor | None, weights: torch.Tensor | None
    ) -> torch.Tensor:
        what = f"DynamicEmbedding(mode={self._mode!r})"
        if ids.dim() != 1:
            raise ValueError(f"{what}: ids must be 1-D with offsets, got shape {tuple(ids.shape)}")
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"{what}: offsets must be a torch.Tensor of bag starts")
        if offsets.dim() != 1 or offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
            raise TypeError(f"{what}: offsets must be a 1-D integer tensor of bag starts")
        if offsets.device != ids.device:
            raise ValueError(f"{what}: offsets are on {offsets.device} but ids on {ids.device}")
        n = ids.numel()
        bounds = torch.cat([offsets.to(torch.int64), offsets.new_full((1,), n, dtype=torch.int64)])
        if offsets.numel():
            ok = (bounds[0] == 0) & (bounds[1:] >= bounds[:-1]).all()
            if not bool(ok):
                raise ValueError(
                    f"{what}: offsets must start at 0, be non-decreasing and stay within "
                    f"len(ids) = {n}"
                )
        elif n:
            raise ValueError(f"{what}: {n} ids but no bags (offsets is empty)")
        if weights is None:
            weights = torch.ones(n, dtype=torch.float32, device=ids.device)
        elif not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n,):
            raise ValueError(f"{what}: per_sample_weights must be a tensor of shape ({n},)")
        elif not weights.dtype.is_floating_point:
            raise TypeError(f"{what}: per_sample_weights must be float, got {weights.dtype}")
        kjt = KeyedJaggedTensor(
            [_FEATURE], ids, weights=weights, offsets=bounds, length_per_key=[n]
        )
        return self.collection(kjt)[_FEATURE]

    def sparse_grad(self) -> SparseGrad | None:
        """The table's coalesced fp32 gradient from the last backward (``None`` before one).

        Rows index the table's values (:meth:`find_rows` maps ids to them).
        """
        return self.collection.sparse_grads().get(self._table.name)

    def zero_grad_sparse(self) -> None:
        """Drop the stored gradient (every training forward drops a read one too)."""
        self.collection.zero_grad_sparse()

    def sparse_parameters(self) -> Iterator[EmbeddingSparseParameter]:
        """The table as a core ``SparseParameter``, for a sparse optimizer (see
        :meth:`EmbeddingCollection.sparse_parameters`)."""
        return self.collection.sparse_parameters()

    def fuse_optimizer(self, optimizer: RowUpdater | None, *, one_pass: bool = False) -> None:
        """Apply ``optimizer``'s updates to the table inside the backward (``None``: stop);
        see :meth:`EmbeddingCollection.fuse_optimizer`. ``optimizer`` must train
        :attr:`table_values`."""
        self.collection.fuse_optimizer(optimizer, one_pass=one_pass)

    @property
    def table_values(self) -> PagedTensor:
        """The table's rows as the ``PagedTensor`` an optimizer trains."""
        return self.collection.physical_tables[self._table.name].values

    def find_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape), ``-1`` for ids without a row; read-only."""
        return self.collection.find_rows(self._table.name, ids).view(ids.shape)

    @property
    def values(self) -> torch.Tensor:
        """A dense ``[rows, dim]`` copy of the table's values (for inspection)."""
        return self.collection.physical_tables[self._table.name].values.to_dense()

    @property
    def step(self) -> int:
        """The step the next training forward stamps on its rows."""
        return self.collection.step

    def set_step(self, step: int) -> None:
        """Set :attr:`step` (e.g. to the trainer's global step after a restore)."""
        self.collection.set_step(step)

    def evict(self, *, older_than_step: int | None = None, min_count: int | None = None) -> int:
        """Erase ids last seen before ``older_than_step`` or seen fewer than ``min_count``
        times; returns how many (see :meth:`EmbeddingCollection.evict`)."""
        out = self.collection.evict(
            self._table.name, older_than_step=older_than_step, min_count=min_count
        )
        return out[self._table.name]

    def maybe_evict(self) -> int:
        """Apply the table's ``Eviction`` rules now; returns how many ids were evicted."""
        return self.collection.maybe_evict().get(self._table.name, 0)
