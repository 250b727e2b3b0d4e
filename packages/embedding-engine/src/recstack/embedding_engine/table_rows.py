"""A jagged sequence feature's ids as rows of their table, not yet gathered.

A ``FeatureConfig(..., pooling="none", gather=False)`` feature comes out of the
collection as a :class:`TableRows`: the (paged) table, the row of each of the batch's ids
and the batch's offsets. A consumer that reads embedding rows inside its own kernel (DIN's
fused target attention) takes them as they are, so the feature's ``[n_ids, dim]`` rows
are never copied out of the table and never kept for the backward.

The gradient comes back through :attr:`TableRows.grad_sink`: the consumer's backward
calls it once with the fp32 gradient of every id's row, ``[n_ids, dim]``, and the
collection's lookup backward reduces it into the table's sparse gradient with the other
features' (one reduction, as for gathered rows). To make autograd run that lookup
backward only after the consumer's, the consumer takes :attr:`TableRows.depends_on` (a
zero-size tensor the lookup produced) as an input of its autograd function and gives it a
zero-size gradient. :meth:`TableRows.gather` does all of that for a consumer that wants
the plain rows after all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import JaggedTensor, PagedTensor
from recstack.core.kernels import carry_backend

__all__ = ["RowGradSink", "TableRows"]

#: ``sink(rows, grad)``: the fp32 ``[n_ids, dim]`` gradient of the rows of ``rows``.
RowGradSink = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class TableRows:
    """A jagged sequence feature's ids as rows of a table.

    Attributes:
        table: the rows' table (a physical table's values, or in an eval lookup of ids
            not all in the table a compact per-batch table).
        rows: int64 ``[n_ids]``: each id's row of ``table``; ``-1`` for an id without one
            (it reads as a zero row).
        offsets: int64 ``[B + 1]``: row ``b`` of the batch holds ids
            ``offsets[b]:offsets[b + 1]``.
        depends_on: a zero-size tensor in the lookup's autograd graph (training with
            gradients), to take as an input of the consumer's autograd function; ``None``
            when no gradient is taken.
        grad_sink: receives ``(rows, grad)`` once in the consumer's backward; ``None`` when
            no gradient is taken.

    Examples:
        >>> import torch
        >>> from recstack.core import PagedTensor
        >>> table = PagedTensor.wrap(torch.arange(12.0).reshape(4, 3))
        >>> seq = TableRows(table, torch.tensor([3, -1, 0]), torch.tensor([0, 2, 3]))
        >>> seq.gather().values.tolist()
        [[9.0, 10.0, 11.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]]
    """

    table: PagedTensor
    rows: torch.Tensor
    offsets: torch.Tensor
    depends_on: torch.Tensor | None = None
    grad_sink: RowGradSink | None = None

    @property
    def dim(self) -> int:
        """The rows' width."""
        return self.table.dim

    @property
    def num_ids(self) -> int:
        """``n_ids``, the batch's ids of this feature."""
        return self.rows.numel()

    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: each row's id count (no host sync)."""
        return self.offsets[1:] - self.offsets[:-1]

    def gather(self) -> JaggedTensor:
        """The rows gathered: a ``JaggedTensor`` of ``[n_ids, dim]`` rows (zeros for row
        ``-1``) whose gradient goes to :attr:`grad_sink`."""
        if self.depends_on is None or self.grad_sink is None or not torch.is_grad_enabled():
            return JaggedTensor(_gather(self.table, self.rows), self.offsets)
        values = _GatherToSink.apply(self.depends_on, self.table, self.rows, self.grad_sink)
        return JaggedTensor(values, self.offsets)


def _gather(table: PagedTensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` with zero rows for ``rows < 0``."""
    if not rows.numel():
        return torch.zeros((0, table.dim), dtype=table.dtype, device=table.device)
    found = rows >= 0
    values = table.gather_rows(torch.where(found, rows, 0), check_bounds=False)
    return values * found.unsqueeze(1).to(values.dtype)


@carry_backend
class _GatherToSink(torch.autograd.Function):
    """Rows gathered from a table whose backward hands their gradient to a sink."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        depends_on: torch.Tensor,
        table: PagedTensor,
        rows: torch.Tensor,
        sink: RowGradSink,
    ) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.sink = sink
        ctx.depends_shape = depends_on.shape
        return _gather(table, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[Any, ...]:
        (rows,) = ctx.saved_tensors
        if grad is not None:
            ctx.sink(rows, grad.float())
        zero = torch.zeros(ctx.depends_shape, device=rows.device)
        return zero, None, None, None
