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

Fused mode: a plan with an ``updater`` (core's :class:`~recstack.core.RowUpdater`, e.g. a
sparse optimizer) gets the optimizer's :class:`~recstack.core.RowUpdate` of the table in
backward and applies it to the rows it has just reduced the gradient of
(:func:`lookup_backward_fused`: the row sums, then core's update launch; with
``one_pass`` inside the reduction kernel); no ``SparseGrad`` is made and the sink gets
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recstack.core import PagedTensor, RowUpdate, RowUpdater, SparseGrad, kernels
from recstack.core.kernels import carry_backend, use_triton
from recstack.core.kernels.row_update import apply_row_update, check_rows, new_gate
from recstack.embedding_engine.dedup import sort_ids
from recstack.embedding_engine.kernels.lookup_grad import lookup_grad_sums
from recstack.embedding_engine.kernels.lookup_grad_update import lookup_grad_update
from recstack.embedding_engine.kernels.pooling import bag_lengths, bag_scale, pooled_lookup

__all__ = [
    "EmbeddingLookupFunction",
    "LookupPlan",
    "RowSort",
    "lookup_backward",
    "lookup_backward_fused",
    "lookup_forward",
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
        updater: an optimizer (core :class:`~recstack.core.RowUpdater`) whose update of
            ``table`` the backward applies itself (:func:`lookup_backward_fused`) instead
            of handing a gradient to ``sink``; ``None``: unfused.
        one_pass: with an updater, :func:`lookup_backward_fused`'s one-kernel form.
        sequence_sizes: the ids of each sequence feature, in ``sequence_rows`` order (only
            needed with ``deferred``).
        deferred: per sequence feature, whether its rows are left in the table for the
            consumer to read (a :class:`~recstack.embedding_engine.table_rows.TableRows`)
            instead of gathered; the consumer's backward hands their gradient to
            :meth:`receive` before the lookup's backward runs.
        check: called first by the backward; raises when the rows read cannot be
            trusted any more (a tiered table moved them since).
        done: called when the backward has run (a tiered table may move the rows now).
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
    updater: RowUpdater | None = None
    one_pass: bool = False
    sequence_sizes: tuple[int, ...] = ()
    deferred: tuple[bool, ...] = ()
    deferred_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    check: Callable[[], None] | None = None
    done: Callable[[], None] | None = None

    @property
    def num_pooled(self) -> int:
        """``K_p``, the number of pooled features."""
        return self.modes.numel()

    @property
    def has_deferred(self) -> bool:
        """Whether some sequence feature's rows are left in the table."""
        return any(self.deferred)

    def sequence_slices(self) -> list[tuple[int, int, bool]]:
        """``(start, stop, deferred)`` of each sequence feature in ``sequence_rows``."""
        out, start = [], 0
        for size, deferred in zip(self.sequence_sizes, self.deferred, strict=True):
            out.append((start, start + size, deferred))
            start += size
        return out

    def gathered_rows(self) -> torch.Tensor:
        """The rows of the sequence features whose rows the lookup gathers, concatenated."""
        if not self.has_deferred:
            return self.sequence_rows
        slices = self.sequence_slices()
        parts = [self.sequence_rows[a:b] for a, b, deferred in slices if not deferred]
        return torch.cat(parts) if parts else self.sequence_rows[:0]

    def receive(self, feature: int, grad: torch.Tensor) -> None:
        """Take the fp32 ``[n_ids, dim]`` row gradient of deferred sequence feature
        ``feature`` (its index among the sequence features) from its consumer."""
        if feature in self.deferred_grads:
            raise RuntimeError(
                f"embedding table {self.name!r}: the rows of one sequence feature got two "
                "gradients in one backward; a TableRows output takes one consumer"
            )
        self.deferred_grads[feature] = grad

    def full_sequence_grad(self, gathered: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient of every sequence row, in ``sequence_rows`` order: the gathered
        rows' from autograd, the deferred ones' from :meth:`receive` (zeros where none
        came); ``None`` when none came at all."""
        grads = self.deferred_grads
        if not self.has_deferred or (not grads and gathered is None):
            return gathered
        slices = self.sequence_slices()
        if gathered is None and len(grads) == 1 and len(slices) == 1:
            return next(iter(grads.values()))
        dim, device = self.table.dim, self.table.device
        parts, at = [], 0
        for i, (a, b, deferred) in enumerate(slices):
            n = b - a
            if deferred:
                part = grads.get(i)
            else:
                part = gathered[at : at + n] if gathered is not None else None
                at += n
            if part is None:
                part = torch.zeros((n, dim), dtype=torch.float32, device=device)
            parts.append(part.float())
        return torch.cat(parts) if parts else None


def lookup_forward(plan: LookupPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, K_p, dim], sequence rows [N_s, dim])`` in the table's dtype; the rows
    of deferred sequence features (``plan.deferred``) are left out."""
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
    gathered = plan.gathered_rows()
    if gathered.numel():
        seq = table.gather_rows(gathered, check_bounds=False)
    else:
        seq = torch.zeros((0, table.dim), dtype=table.dtype, device=table.device)
    return pooled, seq


def _empty_grad(dim: int, device: torch.device) -> SparseGrad:
    return SparseGrad(
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros((0, dim), dtype=torch.float32, device=device),
        is_coalesced=True,
    )


def _live_grads(
    plan: LookupPlan, grad_pooled: torch.Tensor | None, grad_sequence: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The output gradients that reach ids (``None`` where no id is behind them)."""
    if not (plan.num_pooled and plan.pooled_rows.numel()):
        grad_pooled = None
    if not plan.sequence_rows.numel():
        grad_sequence = None
    return grad_pooled, grad_sequence


def _bags(plan: LookupPlan, grad_pooled: torch.Tensor | None) -> dict[str, Any]:
    """The pooled ids' bags and bag scales the gradient kernels take."""
    if grad_pooled is None:
        return {"bag_of": None, "bag_scale": None}
    offsets = plan.pooled_offsets
    n_pooled = plan.pooled_rows.numel()
    return {
        "bag_of": torch.repeat_interleave(bag_lengths(offsets), output_size=n_pooled),
        "bag_scale": bag_scale(offsets, plan.modes, plan.batch_size),
    }


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
    grad_pooled, grad_sequence = _live_grads(plan, grad_pooled, grad_sequence)
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
    values = lookup_grad_sums(
        rs.order,
        rs.sorted_seg,
        rs.num_segments,
        seg_dest,
        dim,
        grad_pooled=grad_pooled,
        **_bags(plan, grad_pooled),
        weights=plan.weights,
        batch_size=plan.batch_size,
        n_pooled=plan.pooled_rows.numel(),
        grad_sequence=grad_sequence,
        min_seg=min_seg,
    )
    return SparseGrad(rows[min_seg:], values[min_seg:], is_coalesced=True)


def lookup_backward_fused(
    plan: LookupPlan,
    grad_pooled: torch.Tensor | None,
    grad_sequence: torch.Tensor | None,
    update: RowUpdate,
    *,
    one_pass: bool = False,
) -> torch.Tensor:
    """Apply ``update`` (an optimizer's step of ``plan.table``) to the rows the lookup read,
    with the gradient :func:`lookup_backward` would give; no ``SparseGrad`` is made.

    Two launches by default: the row sums (:func:`lookup_grad_sums`, into a scratch buffer
    freed on return) and core's ``apply_row_update``. ``one_pass=True`` runs
    :func:`~recstack.embedding_engine.kernels.lookup_grad_update.lookup_grad_update`
    instead, which updates each row from the sums in registers and never writes them out
    (the H200 numbers in docs/benchmarks.md say when that pays). The output gradients are
    checked for NaN/Inf on the device first, into ``update.gate`` (or a fresh gate); if
    a flag is set, nothing is written. Returns that gate, unread (no host sync here): the
    caller hands it to the updater's ``end_row_update``.
    """
    device, dim = plan.table.device, plan.table.dim
    grad_pooled, grad_sequence = _live_grads(plan, grad_pooled, grad_sequence)
    gate = update.gate if update.gate is not None else new_gate(device)
    for g in (grad_pooled, grad_sequence):
        if g is not None:
            check_rows(gate, g)
    if grad_pooled is None and grad_sequence is None:
        return gate
    tensors = [t for t in (grad_pooled, grad_sequence, plan.pooled_rows) if t is not None]
    rs, min_seg = (plan.row_sort, 0) if plan.row_sort is not None else _sort_rows(plan)
    sums = {
        "grad_pooled": grad_pooled,
        **_bags(plan, grad_pooled),
        "weights": plan.weights,
        "batch_size": plan.batch_size,
        "n_pooled": plan.pooled_rows.numel(),
        "grad_sequence": grad_sequence,
        "min_seg": min_seg,
    }
    if one_pass and use_triton(*tensors, op="fused embedding backward"):
        lookup_grad_update(
            update, plan.table, gate, rs.order, rs.sorted_seg, rs.num_segments, rs.seg_rows,
            **sums,
        )  # fmt: skip
        return gate
    # Sums by label (any row order will do for the update: no sort of the rows).
    values = lookup_grad_sums(rs.order, rs.sorted_seg, rs.num_segments, None, dim, **sums)
    if rs.seg_rows is None:
        rows = torch.arange(rs.num_segments, dtype=torch.int64, device=device)
    else:
        rows = rs.seg_rows
    apply_row_update(update, plan.table, rows[min_seg:], values[min_seg:], gate)
    return gate


def _sort_rows(plan: LookupPlan) -> tuple[RowSort, int]:
    """Group a plan's ids by row here (one sort, one sync); ``min_seg`` skips the -1 row."""
    rows = torch.cat([plan.pooled_rows, plan.sequence_rows]).to(torch.int64)
    s = sort_ids(rows)
    min_seg = int(bool(s.num_unique) and int(s.unique[0]) < 0)
    return RowSort(s.order, s.sorted_seg, s.unique, s.num_unique), min_seg


@carry_backend
class EmbeddingLookupFunction(torch.autograd.Function):
    """``apply(anchor, plan) -> (pooled, sequence, depends_on)``: a lookup with a sparse
    backward.

    ``anchor`` is any tensor with ``requires_grad=True`` (a zero-size one is enough); it only
    ties the outputs into the graph and receives no gradient. ``depends_on`` is a zero-size
    output for the consumers of deferred sequence rows to take as an input, so this
    backward runs after theirs, once they have handed their rows' gradient to
    ``plan.receive``. The backward sends :func:`lookup_backward`'s :class:`SparseGrad` to
    ``plan.sink``, or, when the plan has an updater that trains the table, applies the
    updater's step itself.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, plan: LookupPlan) -> Any:  # type: ignore[override]
        ctx.plan = plan
        # Autograd runs a CUDA backward in its own thread, where this thread's forced
        # backend (kernels.use_backend) does not hold: carry it over.
        ctx.backend = kernels.get_backend()
        # Unused outputs get None, not a materialized [B, K, dim] zero gradient.
        ctx.set_materialize_grads(False)
        pooled, seq = lookup_forward(plan)
        return pooled, seq, torch.empty(0, device=plan.table.device)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        grad_pooled: torch.Tensor | None,
        grad_sequence: torch.Tensor | None,
        _grad_depends_on: torch.Tensor | None,
    ) -> tuple[None, None]:
        plan: LookupPlan = ctx.plan
        if plan.check is not None:
            plan.check()
        try:
            _backward(plan, grad_pooled, grad_sequence)
        finally:
            if plan.done is not None:
                plan.done()
        return None, None


def _backward(
    plan: LookupPlan, grad_pooled: torch.Tensor | None, grad_sequence: torch.Tensor | None
) -> None:
    """The lookup's backward: a fused update, or a gradient handed to the plan's sink."""
    grad_sequence = plan.full_sequence_grad(grad_sequence)
    plan.deferred_grads.clear()
    live = _live_grads(plan, grad_pooled, grad_sequence)
    has_grad = any(g is not None for g in live)
    update = None
    if plan.updater is not None and has_grad:
        update = plan.updater.begin_row_update(plan.table)
    if update is not None:
        assert plan.updater is not None
        gate = lookup_backward_fused(plan, *live, update, one_pass=plan.one_pass)
        plan.updater.end_row_update(plan.table, gate=gate)
        return
    grad = lookup_backward(plan, grad_pooled, grad_sequence)
    if plan.sink is not None:
        plan.sink(plan.name, grad)
