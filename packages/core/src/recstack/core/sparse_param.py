"""SparseParameter: a row store plus the gradient its backward left, for a sparse optimizer.

Embedding rows are not ``nn.Parameter``\\ s: they live in a :class:`~recstack.core.PagedTensor`
and their backward yields a :class:`~recstack.core.SparseGrad` that the producer keeps
(the embedding engine stores one per physical table). A sparse optimizer
(``recstack.sparse_optim``) given such producers' :class:`SparseParameter`\\ s can then be
driven like a ``torch.optim`` optimizer: ``step()`` fetches every parameter's pending
gradient and ``zero_grad()`` clears it, with neither package importing the other.

Examples:
    >>> import torch
    >>> from recstack.core import PagedTensor, SparseGrad
    >>> class Held:  # the smallest producer: one table and the gradient it was handed
    ...     def __init__(self, table):
    ...         self.table, self.grad = table, None
    ...     def pending_grad(self):
    ...         return self.grad
    ...     def clear_grad(self):
    ...         self.grad = None
    >>> p = Held(PagedTensor.wrap(torch.zeros(4, 2), name="w"))
    >>> isinstance(p, SparseParameter)
    True
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from recstack.core.paged import PagedTensor
from recstack.core.sparse_grad import SparseGrad

__all__ = ["SparseParameter"]


@runtime_checkable
class SparseParameter(Protocol):
    """A :class:`~recstack.core.PagedTensor` trained row-sparsely, and its pending gradient.

    A sparse optimizer trains :attr:`table` (its state is keyed by the table, so the
    optimizer's ``state_dict`` is the same as for the bare table); it calls
    :meth:`pending_grad` in a step that is not handed the gradient explicitly, and
    :meth:`clear_grad` in ``zero_grad()`` (and when ``accumulate()`` takes the gradient
    over).
    """

    @property
    def table(self) -> PagedTensor:
        """The rows the optimizer updates (its state slots are this table's companions)."""
        ...

    def pending_grad(self) -> SparseGrad | None:
        """The gradient of :attr:`table` that backward passes left since the last
        :meth:`clear_grad`, or ``None``; rows index :attr:`table`. Reading it does not
        clear it."""
        ...

    def clear_grad(self) -> None:
        """Drop the pending gradient (``pending_grad()`` is ``None`` until the next
        backward)."""
        ...
