"""Autograd glue of :class:`~recstack.embedding_engine.collection.EmbeddingCollection`.

Embedding rows are not ``nn.Parameter``s: they live in a :class:`~recstack.core.PagedTensor`
that grows with the ids seen, and their gradient must never be materialized as a dense
``[num_rows, dim]`` tensor. So the lookup of one physical table runs inside
:class:`EmbeddingLookupFunction`, whose only differentiable input is a zero-size *anchor*
tensor with ``requires_grad=True``: it puts the outputs into the autograd graph (so
``loss.backward()`` through a dense tower reaches them), and the backward, instead of
returning a gradient for the table, reduces the output gradients into one coalesced
:class:`~recstack.core.SparseGrad` (unique rows, fp32 sums) and hands it to a sink (the
collection stores it for a sparse optimizer). The anchor gets no gradient (``None``).

:func:`lookup_backward` is that reduction, usable on its own:

* pooled features (sum / mean / weighted): :func:`pooled_lookup_backward` over the unique
  rows of the pooled ids (no per-id ``[N, dim]`` gradient);
* sequence features (one output row per id): the per-id output gradients summed by row
  (core's sort + segment sum, :func:`~recstack.core.kernels.segment_sum.coalesce_rows`);
* both: the two coalesced parts concatenated and coalesced once more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import PagedTensor, SparseGrad, kernels
from recstack.core.kernels.segment_sum import coalesce_rows
from recstack.embedding_engine.kernels.pooling import pooled_lookup, pooled_lookup_backward

__all__ = [
    "EmbeddingLookupFunction",
    "LookupPlan",
    "lookup_backward",
    "lookup_forward",
    "merge_sparse_grads",
]


@dataclass
class LookupPlan:
    """One physical table's lookup for one batch: what the forward reads and backward needs.

    Args:
        name: the physical table's name (errors, the sink's key).
        table: the rows read: the physical table's values, or in eval a compact per-batch
            table (gradients are only taken through the real one).
        batch_size: ``B``.
        pooled_rows: int64 ``[N_p]`` rows of the pooled features' ids, key-major as
            :func:`pooled_lookup` takes them.
        pooled_offsets: int64 ``[K_p * B + 1]`` bag offsets into ``pooled_rows``.
        modes: int64 ``[K_p]`` pooling modes (0 sum, 1 mean), on the table's device.
        weights: float ``[N_p]`` per-id weights, or ``None``.
        sequence_rows: int64 ``[N_s]`` rows of the sequence features' ids (one output row
            each).
        sink: receives the physical table's :class:`SparseGrad` in backward.
    """

    name: str
    table: PagedTensor
    batch_size: int
    pooled_rows: torch.Tensor
    pooled_offsets: torch.Tensor
    modes: torch.Tensor
    weights: torch.Tensor | None
    sequence_rows: torch.Tensor
    sink: Callable[[str, SparseGrad], None] | None = None

    @property
    def num_pooled(self) -> int:
        """``K_p``, the number of pooled features."""
        return self.modes.numel()


def lookup_forward(plan: LookupPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, K_p, dim], sequence rows [N_s, dim])`` in the table's dtype."""
    table = plan.table
    shape = (plan.batch_size, plan.num_pooled, table.dim)
    if plan.num_pooled:
        pooled = pooled_lookup(
            table,
            plan.pooled_rows,
            plan.pooled_offsets,
            plan.batch_size,
            plan.modes,
            plan.weights,
            check_bounds=False,
        )
    else:
        pooled = torch.zeros(shape, dtype=table.dtype, device=table.device)
    if plan.sequence_rows.numel():
        seq = table.gather_rows(plan.sequence_rows, check_bounds=False)
    else:
        seq = torch.zeros((0, table.dim), dtype=table.dtype, device=table.device)
    return pooled, seq


def _empty_grad(dim: int, device: torch.device) -> SparseGrad:
    return SparseGrad(
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros((0, dim), dtype=torch.float32, device=device),
        is_coalesced=True,
    )


def lookup_backward(
    plan: LookupPlan, grad_pooled: torch.Tensor | None, grad_sequence: torch.Tensor | None
) -> SparseGrad:
    """The table gradient of :func:`lookup_forward` as one coalesced fp32 :class:`SparseGrad`.

    ``None`` gradients (an output that did not reach the loss) contribute nothing. Rows an
    id was looked up for but whose gradient is zero (e.g. ids cut off by padding) are kept
    with zero values.
    """
    dim, device = plan.table.dim, plan.table.device
    parts: list[SparseGrad] = []
    if grad_pooled is not None and plan.num_pooled and plan.pooled_rows.numel():
        unique, inverse = torch.unique(plan.pooled_rows, sorted=True, return_inverse=True)
        parts.append(
            pooled_lookup_backward(
                grad_pooled,
                plan.pooled_rows,
                plan.pooled_offsets,
                plan.batch_size,
                plan.modes,
                plan.weights,
                unique,
                inverse,
                leading_invalid=False,
                check_inputs=False,
            )
        )
    if grad_sequence is not None and plan.sequence_rows.numel():
        rows, values = coalesce_rows(plan.sequence_rows, grad_sequence, out_dtype=torch.float32)
        parts.append(SparseGrad(rows, values, is_coalesced=True))
    if not parts:
        return _empty_grad(dim, device)
    if len(parts) == 1:
        return parts[0]
    return merge_sparse_grads(parts)


def merge_sparse_grads(parts: list[SparseGrad]) -> SparseGrad:
    """Sum several gradients of one table into one coalesced fp32 :class:`SparseGrad`."""
    rows = torch.cat([p.rows for p in parts])
    values = torch.cat([p.values.to(torch.float32) for p in parts])
    return SparseGrad(rows, values).coalesce()


class EmbeddingLookupFunction(torch.autograd.Function):
    """``apply(anchor, plan) -> (pooled, sequence)``: a lookup with a sparse backward.

    ``anchor`` is any tensor with ``requires_grad=True`` (a zero-size one is enough); it only
    ties the outputs into the graph and receives no gradient. The backward sends
    :func:`lookup_backward`'s :class:`SparseGrad` to ``plan.sink``.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, plan: LookupPlan) -> Any:  # type: ignore[override]
        ctx.plan = plan
        # Autograd runs a CUDA backward in its own thread, where this thread's forced
        # backend (kernels.use_backend) does not hold: carry it over.
        ctx.backend = kernels.get_backend()
        # Unused outputs get None, not a materialized [B, K, dim] zero gradient.
        ctx.set_materialize_grads(False)
        return lookup_forward(plan)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_pooled: torch.Tensor | None, grad_sequence: torch.Tensor | None
    ) -> tuple[None, None]:
        plan: LookupPlan = ctx.plan
        with kernels.use_backend(ctx.backend):
            grad = lookup_backward(plan, grad_pooled, grad_sequence)
        if plan.sink is not None:
            plan.sink(plan.name, grad)
        return None, None
