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

:func:`lookup_backward` is that reduction, usable on its own: one
:func:`~recstack.embedding_engine.kernels.lookup_grad.lookup_grad_sums` over all the ids of
the lookup, pooled and sequence alike, grouped by row. The grouping is the forward's: the
collection deduplicates the ids with one sort (:func:`~recstack.embedding_engine.dedup.
sort_ids`) and hands the sort to the backward in :attr:`LookupPlan.row_sort`, so the backward
sorts nothing of size ``N`` (a plan without one is sorted here). No per-id ``[N, dim]``
gradient is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import PagedTensor, SparseGrad, kernels
from recstack.embedding_engine.dedup import sort_ids
from recstack.embedding_engine.kernels.lookup_grad import lookup_grad_sums
from recstack.embedding_engine.kernels.pooling import _bag_lengths, _bag_scale, pooled_lookup

__all__ = [
    "EmbeddingLookupFunction",
    "LookupPlan",
    "RowSort",
    "lookup_backward",
    "lookup_forward",
    "merge_sparse_grads",
]


@dataclass
class RowSort:
    """The ids of a :class:`LookupPlan` (pooled ids, then sequence ids) grouped by row.

    Args:
        order: int64 ``[N]`` permutation of the ids listing them grouped by row.
        sorted_seg: int32/int64 ``[N]``: the row label of each sorted position; each label's
            positions are contiguous, and every label in ``[0, U)`` occurs.
        seg_rows: int64 ``[U]``: the table row of each label (distinct, ``>= 0``), or
            ``None`` when the labels are the rows themselves.
        num_segments: ``U``, the number of labels.
        rows_sorted: whether ``seg_rows`` ascends (then the gradient needs no reordering).
    """

    order: torch.Tensor
    sorted_seg: torch.Tensor
    seg_rows: torch.Tensor | None
    num_segments: int
    rows_sorted: bool = True


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
        row_sort: the forward's grouping of the ids by row, or ``None`` (the backward
            sorts them).
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
    row_sort: RowSort | None = None

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

    Every row the lookup read is in it, zeros where the ids' outputs did not reach the loss
    (a ``None`` gradient) or got zero gradient (e.g. ids cut off by padding); when neither
    output reached the loss the gradient has no rows. One reduction over all the ids, no
    sync when ``plan.row_sort`` is set.
    """
    dim, device = plan.table.dim, plan.table.device
    n_pooled, n_seq = plan.pooled_rows.numel(), plan.sequence_rows.numel()
    if not (plan.num_pooled and n_pooled):
        grad_pooled = None
    if not n_seq:
        grad_sequence = None
    if grad_pooled is None and grad_sequence is None:
        return _empty_grad(dim, device)
    rs, min_seg = (plan.row_sort, 0) if plan.row_sort is not None else _sort_rows(plan)
    seg_dest = None
    if rs.seg_rows is None:
        rows = torch.arange(rs.num_segments, dtype=torch.int64, device=device)
    elif rs.rows_sorted:
        rows = rs.seg_rows
    else:
        # Labels follow the ids' (key) order; the kernel writes each at its row's rank.
        rows, perm = torch.sort(rs.seg_rows)
        seg_dest = torch.empty_like(perm)
        seg_dest[perm] = torch.arange(perm.numel(), dtype=torch.int64, device=device)
    bag_of = bag_scale = None
    if grad_pooled is not None:
        offsets = plan.pooled_offsets
        bag_of = torch.repeat_interleave(_bag_lengths(offsets), output_size=n_pooled)
        bag_scale = _bag_scale(offsets, plan.modes, plan.batch_size)
    values = lookup_grad_sums(
        rs.order,
        rs.sorted_seg,
        rs.num_segments,
        seg_dest,
        dim,
        grad_pooled=grad_pooled,
        bag_of=bag_of,
        bag_scale=bag_scale,
        weights=plan.weights,
        batch_size=plan.batch_size,
        n_pooled=n_pooled,
        grad_sequence=grad_sequence,
        min_seg=min_seg,
    )
    return SparseGrad(rows[min_seg:], values[min_seg:], is_coalesced=True)


def _sort_rows(plan: LookupPlan) -> tuple[RowSort, int]:
    """Group a plan's ids by row here (one sort, one sync); ``min_seg`` skips the -1 row."""
    rows = torch.cat([plan.pooled_rows, plan.sequence_rows]).to(torch.int64)
    s = sort_ids(rows)
    min_seg = int(bool(s.num_unique) and int(s.unique[0]) < 0)
    return RowSort(s.order, s.sorted_seg, s.unique, s.num_unique), min_seg


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
