"""The physical tables of an ``EmbeddingCollection`` as core ``SparseParameter``\\ s.

Embedding rows are not ``nn.Parameter``\\ s, so ``model.parameters()`` (and a
``torch.optim`` optimizer built from it) never sees them. A sparse optimizer
(``recstack.sparse_optim``) built from :meth:`EmbeddingCollection.sparse_parameters
<recstack.embedding_engine.collection.EmbeddingCollection.sparse_parameters>` trains them
and finds their gradients itself::

    opt = SparseAdam(ec.sparse_parameters(), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

Each :class:`EmbeddingSparseParameter` is one physical table: its ``values`` (core
:class:`~recstack.core.PagedTensor`) and the coalesced :class:`~recstack.core.SparseGrad`
the collection's backward stored for it. It holds the collection weakly, so an optimizer
does not keep a deleted collection's hash tables alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from recstack.core import PagedTensor, SparseGrad

if TYPE_CHECKING:
    from recstack.embedding_engine.collection import EmbeddingCollection

__all__ = ["EmbeddingSparseParameter", "sparse_parameters"]


class EmbeddingSparseParameter:
    """One physical table of an :class:`EmbeddingCollection` as core's ``SparseParameter``.

    Args:
        collection: the collection holding the table.
        name: the physical table's name (e.g. ``"item+user"``).

    Raises:
        KeyError: ``collection`` has no physical table ``name``.
    """

    def __init__(self, collection: EmbeddingCollection, name: str) -> None:
        tables = collection.physical_tables
        if name not in tables:
            raise KeyError(
                f"EmbeddingSparseParameter: the collection has no physical table {name!r} "
                f"(it has {list(tables)})"
            )
        self._collection = weakref.ref(collection)
        self._name = name
        self._table = tables[name].values

    @property
    def name(self) -> str:
        """The physical table's name."""
        return self._name

    @property
    def table(self) -> PagedTensor:
        """The table's rows (``physical_tables[name].values``), which the optimizer trains."""
        return self._table

    def pending_grad(self) -> SparseGrad | None:
        """The coalesced fp32 gradient the backward passes since the last training forward
        (or :meth:`clear_grad`) stored for this table, or ``None``.

        Reading it marks it read: the next training forward drops it instead of refusing
        to start (see :meth:`EmbeddingCollection.sparse_grads`).
        """
        ec = self._collection()
        return None if ec is None else ec._read_grad(self._name)

    def clear_grad(self) -> None:
        """Drop this table's stored gradient."""
        ec = self._collection()
        if ec is not None:
            ec._clear_grad(self._name)

    def __repr__(self) -> str:
        return f"EmbeddingSparseParameter({self._name!r}, {self._table!r})"


def sparse_parameters(module: nn.Module) -> Iterator[EmbeddingSparseParameter]:
    """The sparse parameters of every :class:`EmbeddingCollection` in ``module`` (itself
    included, and the collection a ``DynamicEmbedding`` holds) and of every
    ``ShardedEmbeddingCollection`` (this rank's shard), in ``module.modules()`` order:
    what a sparse optimizer trains while ``module.parameters()`` goes to a ``torch.optim``
    optimizer.

    Args:
        module: a model.
    """
    from recstack.embedding_engine.collection import EmbeddingCollection
    from recstack.embedding_engine.sharded import ShardedEmbeddingCollection

    for m in module.modules():
        if isinstance(m, (EmbeddingCollection, ShardedEmbeddingCollection)):
            yield from m.sparse_parameters()
