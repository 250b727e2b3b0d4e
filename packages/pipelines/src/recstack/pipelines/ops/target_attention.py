"""DIN target attention over jagged behaviour sequences, with autograd.

:func:`target_attention` scores each behaviour ``k`` of a row against the row's candidate
``q`` with an MLP over ``[q, k, q - k, q * k]`` and returns the score-weighted sum of the
behaviours, ``[B, D]``. The behaviours are jagged (``offsets``, no padding) or spans
(``starts`` and ``lengths`` per row) and come either as ``values`` rows or as rows of an
embedding ``table`` picked by ``row_ids``, gathered inside the kernels so the lookup itself
fuses into the op. :func:`padded_target_attention` takes padded ``[B, L, D]`` behaviours in
place (spans over ``keys.reshape(B * L, D)``): no packing copy, no host sync.

:class:`FusedTargetAttention` is the module: its parameters are those of
:class:`~recstack.pipelines.models.din.TargetAttention` (``score.layers.*``, the same
:class:`~recstack.pipelines.models.layers.MLP`), so a checkpoint of one loads into the other.

On CUDA (and under ``TRITON_INTERPRET=1``) the forward and the backward are one Triton kernel
each (:mod:`recstack.pipelines.kernels.target_attention`); on the CPU the torch reference runs
under ordinary autograd.

The ``table`` is a plain ``[R, D]`` tensor or a :class:`~recstack.core.paged.PagedTensor`
(an embedding table's row store, read through its page table inside the kernels). A negative
row id reads a zero row: it is scored like any behaviour (the MLP sees ``[q, 0, q, 0]``) and
adds nothing to the sum.

Gradients of the behaviour rows: with ``values``, ``values.grad`` (``[N, D]``). With ``table``
and ``row_ids``, either a dense ``table.grad`` (an fp32 ``index_add`` of the row gradients,
then the table's dtype; negative ids add nothing; a PagedTensor gets none), or, given
``grad_sink``, nothing for the table: the backward calls ``grad_sink(row_ids, d_rows)`` with
the fp32 ``[N, D]`` gradient of each gathered row, aligned with ``row_ids`` (repeats not
summed, negative ids included), for a sparse optimizer or an embedding engine's own
reduction. ``depends_on`` makes whatever produced it (that embedding lookup) run its
backward only after the sink was called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from recstack.core.kernels import carry_backend, use_triton
from recstack.core.paged import PagedTensor
from recstack.pipelines.kernels.target_attention import (
    TargetAttentionSaved,
    _check_inputs,
    _check_layout,
    _covered_positions,
    _source_tensor,
    activation_code,
    gather_table_rows,
    padded_target_attention_reference,
    target_attention_backward,
    target_attention_forward,
    target_attention_reference,
)
from recstack.pipelines.models.layers import MLP, Activation

__all__ = ["FusedTargetAttention", "GradSink", "padded_target_attention", "target_attention"]

#: Receives ``(row_ids, d_rows)`` in backward: int64 ``[N]`` and fp32 ``[N, D]``.
GradSink = Callable[[torch.Tensor, torch.Tensor], None]


def _dense_table_grad(
    table: torch.Tensor, row_ids: torch.Tensor, d_rows: torch.Tensor
) -> torch.Tensor:
    """``table``'s gradient from its gathered rows' (fp32 sums, then the table's dtype);
    rows read by a negative id belong to no table row."""
    dense = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    valid = row_ids >= 0
    d_rows = d_rows.float().masked_fill(~valid.unsqueeze(1), 0)
    if dense.shape[0]:
        dense.index_add_(0, torch.where(valid, row_ids, 0), d_rows)
    return dense.to(table.dtype)


def _depends_on_grad(depends_on: tuple[Any, ...] | None) -> torch.Tensor | None:
    """Zeros for ``depends_on`` (kept as its shape, dtype and device)."""
    if depends_on is None:
        return None
    shape, dtype, device = depends_on
    return torch.zeros(shape, dtype=dtype, device=device)


def _depends_on_meta(depends_on: torch.Tensor | None) -> tuple[Any, ...] | None:
    if depends_on is None:
        return None
    return (depends_on.shape, depends_on.dtype, depends_on.device)


@carry_backend
class _TargetAttentionFunction(torch.autograd.Function):
    """Fused forward and backward; the layer tensors follow the fixed arguments.

    ``source`` is ``values``, a plain table, or a PagedTensor (not a tensor: no gradient of
    its own, kept on ``ctx``). ``depends_on`` is an input only so that autograd orders its
    producer's backward after this one (after ``grad_sink`` was called); its gradient is
    zeros."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        source: torch.Tensor | PagedTensor,
        row_ids: torch.Tensor | None,
        offsets: torch.Tensor | None,
        starts: torch.Tensor | None,
        lengths: torch.Tensor | None,
        activation: str,
        softmax: bool,
        grad_sink: GradSink | None,
        depends_on: torch.Tensor | None,
        *flat_layers: torch.Tensor,
    ) -> torch.Tensor:
        layers = list(zip(flat_layers[0::2], flat_layers[1::2], strict=True))
        gather = row_ids is not None
        # Under bf16 autocast the kernels multiply in bf16 (tiles rounded in registers, fp32
        # accumulation), as the unfused module's linears would; autocast itself is turned
        # off around them, or it would round the small host-side matmuls (the first
        # layer's per-row bias) too.
        device_type = query.device.type
        bf16_dots = (
            torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16
        )
        with torch.autocast(device_type, enabled=False):
            out, saved = target_attention_forward(
                query, offsets, layers,
                values=None if gather else source, table=source if gather else None,
                row_ids=row_ids, starts=starts, lengths=lengths, activation=activation,
                softmax=softmax, check_bounds=False, bf16_dots=bf16_dots,
            )  # fmt: skip
        paged = source if isinstance(source, PagedTensor) else None
        ctx.save_for_backward(
            query, None if paged is not None else source, row_ids, offsets, starts, lengths,
            saved.stats, saved.out_f32, *flat_layers,
        )  # fmt: skip
        ctx.paged = paged
        ctx.prepared = saved.prepared  # fresh tensors of the forward's: no version to check
        ctx.options = (activation, softmax, grad_sink, bf16_dots, _depends_on_meta(depends_on))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, source, row_ids, offsets, starts, lengths, stats, out_f32, *flat_layers = (
            ctx.saved_tensors
        )
        if ctx.paged is not None:
            source = ctx.paged
        activation, softmax, grad_sink, bf16_dots, depends_on = ctx.options
        layers = list(zip(flat_layers[0::2], flat_layers[1::2], strict=True))
        gather = row_ids is not None
        with torch.autocast(query.device.type, enabled=False):
            grads = target_attention_backward(
                grad_out, query, offsets, layers,
                TargetAttentionSaved(stats, out_f32, ctx.prepared),
                values=None if gather else source, table=source if gather else None,
                row_ids=row_ids, starts=starts, lengths=lengths, activation=activation,
                softmax=softmax, rows_dtype=torch.float32 if gather else None,
                bf16_dots=bf16_dots,
            )  # fmt: skip
        d_source = None
        if not gather:
            d_source = grads.rows
        elif grad_sink is not None:
            grad_sink(row_ids, grads.rows)
        elif ctx.paged is None and ctx.needs_input_grad[1]:
            d_source = _dense_table_grad(source, row_ids, grads.rows)
        flat_grads = [g for pair in grads.layers for g in pair]
        return (
            grads.query, d_source, *([None] * 7), _depends_on_grad(depends_on), *flat_grads,
        )  # fmt: skip


@carry_backend
class _GatherWithSink(torch.autograd.Function):
    """The behaviour rows of the reference path, as an autograd node: ``table[read_ids]``
    (a zero row for a negative id; fp32) whose backward hands the row gradients to
    ``grad_sink`` with ``row_ids`` (else a dense gradient for a plain table, none for a
    PagedTensor); or, with ``row_ids=None``, ``values`` themselves. ``read_ids`` is
    ``row_ids`` with -1 where no span covers the position (padding may hold any id).
    ``depends_on`` gets zeros, after the sink was called."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        source: torch.Tensor | PagedTensor,
        row_ids: torch.Tensor | None,
        read_ids: torch.Tensor | None,
        grad_sink: GradSink | None,
        depends_on: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.depends_on = _depends_on_meta(depends_on)
        ctx.grad_sink = grad_sink
        ctx.paged = isinstance(source, PagedTensor)
        if row_ids is None:
            return source.view_as(source)
        ctx.save_for_backward(row_ids, read_ids, None if ctx.paged else source)
        # fp32 rows (the reference computes in fp32 anyway), so the sink gets fp32 gradients
        # not rounded to the table's dtype first, as the kernels give them.
        return gather_table_rows(source, read_ids).float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d_depends_on = _depends_on_grad(ctx.depends_on)
        if not ctx.saved_tensors:  # values
            return grad, None, None, None, d_depends_on
        row_ids, read_ids, table = ctx.saved_tensors
        d_table = None
        if ctx.grad_sink is not None:
            ctx.grad_sink(row_ids, grad.float())
        elif not ctx.paged and ctx.needs_input_grad[0]:
            d_table = _dense_table_grad(table, read_ids, grad)
        return d_table, None, None, None, d_depends_on


def target_attention(
    query: torch.Tensor,
    offsets: torch.Tensor | None,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    values: torch.Tensor | None = None,
    table: torch.Tensor | PagedTensor | None = None,
    row_ids: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str = "sigmoid",
    softmax: bool = False,
    grad_sink: GradSink | None = None,
    check_bounds: bool = True,
    depends_on: torch.Tensor | None = None,
) -> torch.Tensor:
    """DIN target attention of each row's candidate over its jagged behaviours: ``[B, D]``.

    ``out_b = sum_l w_l * k_l`` over row ``b``'s behaviours ``k_l``, with ``w = s`` (or
    ``softmax(s)`` over the row) and ``s_l = MLP([q_b, k_l, q_b - k_l, q_b * k_l])``. A row
    without behaviours gives zeros. Differentiable in ``query``, the rows and every layer.

    Row ``b``'s behaviours are positions ``offsets[b]:offsets[b + 1]`` of the rows, or, with
    ``offsets=None``, ``starts[b]:starts[b] + lengths[b]``: disjoint spans that need not
    cover every position (those left out are never read and get zero gradient). A padded
    ``[B, L, D]`` history is spans over ``keys.reshape(B * L, D)``:
    :func:`padded_target_attention` builds them.

    With ``table`` and ``row_ids`` the rows are read inside the op, from a plain tensor or a
    :class:`~recstack.core.paged.PagedTensor` (through its page table: the ``[N, D]`` rows
    are never materialized). A negative row id (an id an embedding's admission filter did
    not admit) reads a zero row: it is still scored (the MLP sees ``[q, 0, q, 0]``), adds
    nothing to the sum, and still gets its entry in ``grad_sink``'s ``d_rows``. The rows
    must not change between the forward and the backward.

    Args:
        query: float32 or bfloat16 ``[B, D]`` candidates.
        offsets: int64 ``[B + 1]``: row ``b``'s behaviours are positions
            ``offsets[b]:offsets[b + 1]``; ``None`` to give ``starts`` and ``lengths``.
        layers: ``(weight, bias)`` of the scoring MLP's linear layers as ``nn.Linear`` holds
            them: ``[H1, 4D]``, optionally ``[H2, H1]``, then the output ``[1, H_last]``.
        values: ``[N, D]`` behaviour rows in the query's dtype; or give ``table`` and
            ``row_ids``.
        table: ``[R, D]`` embedding rows (the query's dtype and device), read by
            ``row_ids`` inside the kernels: a tensor, or a
            :class:`~recstack.core.paged.PagedTensor` (which gets no gradient: give
            ``grad_sink`` to receive its rows' gradients).
        row_ids: int64 ``[N]``: the table row of each behaviour position (repeats allowed;
            negative: a zero row).
        starts: int64 ``[B]``: the first position of each row (with ``offsets=None``).
        lengths: int64 ``[B]``: each row's behaviour count (with ``starts``).
        activation: the hidden layers' activation, one of ``FUSED_ACTIVATIONS`` (sigmoid,
            relu, tanh, leaky_relu, silu, gelu).
        softmax: normalize the scores over each row's behaviours.
        grad_sink: with ``table``: called in backward as ``grad_sink(row_ids, d_rows)``
            (fp32 ``[N, D]``, one row per position, negative ids included) instead of
            giving ``table`` a dense gradient.
        check_bounds: one host sync checking the layout (offsets, or spans in range and
            disjoint) and that no row id is past the table's rows (negative ids are zero
            rows); ``False`` for trusted inputs.
        depends_on: any tensor (in practice a zero-size one with ``requires_grad``, made by
            the embedding lookup that hands over ``table`` and ``row_ids``) that becomes an
            input of the op's autograd node, with a zero gradient. Autograd then runs the
            backward of whatever produced it only after this op's backward, that is after
            ``grad_sink`` was called: the lookup's backward can read what the sink received.

    Returns:
        ``[B, D]`` in the query's dtype (accumulated in fp32).

    Raises:
        TypeError, ValueError: a bad shape, dtype, device, layer or activation (the
            message names the argument; a PagedTensor ``table`` by its name); with
            ``check_bounds``, a bad layout.
        IndexError: with ``check_bounds``, a row id past the table's rows.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> w1, w2 = nn.Linear(4 * 2, 8), nn.Linear(8, 1)
        >>> layers = [(w1.weight, w1.bias), (w2.weight, w2.bias)]
        >>> query = torch.randn(2, 2)
        >>> values, offsets = torch.randn(3, 2), torch.tensor([0, 3, 3])
        >>> target_attention(query, offsets, layers, values=values).shape
        torch.Size([2, 2])
    """
    what = "target_attention"
    inputs = _check_inputs(
        what, query, offsets, layers, values, table, row_ids, activation, starts, lengths
    )
    if grad_sink is not None and table is None:
        raise ValueError(f"{what}: grad_sink goes with table and row_ids, not with values")
    if grad_sink is not None and not callable(grad_sink):
        raise TypeError(f"{what}: grad_sink must be callable, got {type(grad_sink).__name__}")
    if depends_on is not None and not isinstance(depends_on, torch.Tensor):
        raise TypeError(
            f"{what}: depends_on must be a torch.Tensor or None, got {type(depends_on).__name__}"
        )
    if check_bounds:
        _check_layout(what, inputs)
    anchored = depends_on is not None and depends_on.requires_grad
    if grad_sink is not None and torch.is_grad_enabled() and not anchored:
        # The sink is the table's gradient, so the op must be in the autograd graph even
        # when nothing else it reads needs one (a PagedTensor is no tensor input; the scorer
        # may be frozen): a throwaway zero-size leaf puts it there.
        depends_on = torch.zeros(0, device=inputs.query.device, requires_grad=True)
    if use_triton(inputs.query, inputs.starts, _source_tensor(inputs), op=what):
        flat = [t for pair in inputs.layers for t in pair]
        spans = inputs.offsets is None
        return _TargetAttentionFunction.apply(
            inputs.query, inputs.source, inputs.row_ids, inputs.offsets,
            inputs.starts if spans else None, inputs.lengths if spans else None, activation,
            bool(softmax), grad_sink, depends_on, *flat,
        )  # fmt: skip
    rows, table_rows, ids = inputs.source, None, None
    paged = isinstance(rows, PagedTensor)
    if grad_sink is not None or depends_on is not None or paged:
        # The rows as one autograd node that calls the sink and gates depends_on.
        read_ids = inputs.row_ids
        if read_ids is not None and inputs.offsets is None:
            covered = _covered_positions(inputs.starts, inputs.lengths, inputs.num_rows)
            read_ids = torch.where(covered, read_ids, -1)
        rows = _GatherWithSink.apply(rows, inputs.row_ids, read_ids, grad_sink, depends_on)
    elif inputs.row_ids is not None:
        rows, table_rows, ids = None, inputs.source, inputs.row_ids
    return target_attention_reference(
        inputs.query, inputs.offsets, inputs.layers, values=rows, table=table_rows,
        row_ids=ids, starts=inputs.starts, lengths=inputs.lengths, activation=activation,
        softmax=softmax,
    )  # fmt: skip


def padded_target_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    activation: str = "sigmoid",
    softmax: bool = False,
) -> torch.Tensor:
    """:func:`target_attention` on padded behaviours, read in place: ``[B, D]``.

    Row ``b``'s behaviours are ``keys[b, :lengths[b]]`` (the valid positions first, as an
    embedding collection pads a sequence; ``lengths`` is clamped to ``[0, L]``). The
    kernels take ``keys.reshape(B * L, D)`` as the rows and ``starts = arange(B) * L``: no
    packing copy, no host sync. The padding is never read and its gradient is zero.

    Without the kernels, CPU tensors take the jagged torch reference over the same spans
    (it scores only the valid positions; its one host sync is free on the CPU), and CUDA
    tensors under a forced ``torch`` backend the unfused module's padded computation
    (:func:`~recstack.pipelines.kernels.target_attention.padded_target_attention_reference`,
    no sync).

    Args:
        query: float32 or bfloat16 ``[B, D]`` candidates.
        keys: ``[B, L, D]`` behaviours in the query's dtype.
        lengths: integer ``[B]``: each row's valid behaviours (more than ``L`` means ``L``).
        layers: ``(weight, bias)`` of the scoring MLP's linear layers, as for
            :func:`target_attention`.
        activation: the hidden layers' activation, one of ``FUSED_ACTIVATIONS``.
        softmax: normalize the scores over each row's valid behaviours.

    Returns:
        ``[B, D]`` in the query's dtype (accumulated in fp32).

    Raises:
        TypeError, ValueError: a bad shape, dtype, device, layer or activation.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> w1, w2 = nn.Linear(4 * 2, 8), nn.Linear(8, 1)
        >>> layers = [(w1.weight, w1.bias), (w2.weight, w2.bias)]
        >>> keys = torch.randn(2, 3, 2)  # row 0: 3 behaviours, row 1: 1 (then padding)
        >>> padded_target_attention(torch.randn(2, 2), keys, torch.tensor([3, 1]), layers).shape
        torch.Size([2, 2])
    """
    what = "padded_target_attention"
    _check_padded(what, keys, lengths)
    batch, max_len, dim = keys.shape
    # The spans are valid by construction: disjoint, inside the [B * L] rows.
    lengths = lengths.to(torch.int64).clamp(0, max_len)
    starts = torch.arange(batch, dtype=torch.int64, device=keys.device) * max_len
    values = keys.reshape(batch * max_len, dim)
    inputs = _check_inputs(
        what, query, None, layers, values, None, None, activation, starts, lengths
    )
    if use_triton(inputs.query, starts, values, op=what) or values.device.type == "cpu":
        # On the CPU the jagged reference scores only the valid positions: as fast as the
        # padded computation on full histories, a multiple faster with much padding; its
        # host sync (the number of valid positions) costs nothing there.
        return target_attention(
            query, None, layers, values=values, starts=starts, lengths=lengths,
            activation=activation, softmax=softmax, check_bounds=False,
        )  # fmt: skip
    return padded_target_attention_reference(
        inputs.query, keys, lengths, inputs.layers, activation=activation, softmax=softmax
    )


def _check_padded(what: str, keys: object, lengths: object) -> None:
    """``keys`` must be ``[B, L, D]`` and ``lengths`` integer ``[B]`` on its device (the
    rest is :func:`target_attention`'s check)."""
    for name, t in (("keys", keys), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if keys.dim() != 3:
        raise ValueError(f"{what}: keys must be 3-D [B, L, D], got shape {tuple(keys.shape)}")
    if lengths.dim() != 1 or lengths.numel() != keys.shape[0]:
        raise ValueError(
            f"{what}: lengths must be [B] = [{keys.shape[0]}], got shape {tuple(lengths.shape)}"
        )
    dtype = lengths.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{what}: lengths must be an integer tensor, got {dtype}")
    if lengths.device != keys.device:
        raise ValueError(
            f"{what}: lengths is on device {lengths.device} but keys is on {keys.device}"
        )


class FusedTargetAttention(nn.Module):
    """DIN's attention unit on jagged behaviours, fused: :func:`target_attention` with its
    scoring MLP as parameters.

    The parameters are :class:`~recstack.pipelines.models.din.TargetAttention`'s
    (``score.layers.{0,2[,4]}.weight/bias``), so either loads the other's ``state_dict``.

    Args:
        dim: the embedding width ``D``.
        hidden: the scoring MLP's hidden sizes: one or two layers, each at most 256 wide.
        activation: their activation; one the fused kernels compute (sigmoid, relu, tanh,
            leaky_relu, silu, gelu).
        softmax: normalize the scores over each row's behaviours.

    Raises:
        ValueError: an activation the kernels do not compute (PReLU, Dice: keep
            ``TargetAttention`` for those), or not one or two hidden layers.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        activation: Activation = "sigmoid",
        softmax: bool = False,
    ) -> None:
        super().__init__()
        activation_code(activation, "FusedTargetAttention")
        hidden = tuple(hidden)
        if len(hidden) not in (1, 2):
            raise ValueError(
                f"FusedTargetAttention: hidden must have 1 or 2 sizes, got {list(hidden)}"
            )
        self.activation = activation.lower()
        self.softmax = softmax
        self.score = MLP(4 * dim, hidden, activation, out_dim=1)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The scoring MLP's ``(weight, bias)`` pairs, first layer first."""
        return [(m.weight, m.bias) for m in self.score.layers if isinstance(m, nn.Linear)]

    def forward(
        self,
        query: torch.Tensor,
        offsets: torch.Tensor | None,
        values: torch.Tensor | None = None,
        *,
        table: torch.Tensor | PagedTensor | None = None,
        row_ids: torch.Tensor | None = None,
        starts: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        grad_sink: GradSink | None = None,
        check_bounds: bool = True,
        depends_on: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention-pooled behaviours, ``[B, D]`` in the query's dtype.

        Args:
            query: ``[B, D]`` candidates.
            offsets: int64 ``[B + 1]`` behaviour offsets of each row; ``None`` with
                ``starts`` and ``lengths``.
            values: ``[N, D]`` behaviour rows; or give ``table`` and ``row_ids`` (exactly
                one of the two).
            table: ``[R, D]`` embedding rows to gather from: a tensor or a
                :class:`~recstack.core.paged.PagedTensor`.
            row_ids: int64 ``[N]`` table row of each behaviour (negative: a zero row).
            starts: int64 ``[B]`` first position of each row (instead of ``offsets``).
            lengths: int64 ``[B]`` behaviour count of each row (with ``starts``).
            grad_sink: with ``table``, receives ``(row_ids, d_rows)`` in backward instead of
                a dense table gradient.
            check_bounds: one host sync checking the layout and ``row_ids``.
            depends_on: a tensor whose producer's backward must run after this one's
                (after ``grad_sink`` was called); it gets a zero gradient
                (:func:`target_attention`).
        """
        return target_attention(
            query, offsets, self.layers(), values=values, table=table, row_ids=row_ids,
            starts=starts, lengths=lengths, activation=self.activation, softmax=self.softmax,
            grad_sink=grad_sink, check_bounds=check_bounds, depends_on=depends_on,
        )  # fmt: skip

    def forward_padded(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask_or_lengths: torch.Tensor,
        *,
        check_bounds: bool = False,
    ) -> torch.Tensor:
        """``TargetAttention``'s call on padded behaviours, read in place
        (:func:`padded_target_attention`): no packing copy, no host sync.

        Args:
            query: ``[B, D]`` candidates.
            keys: ``[B, L, D]`` behaviours, each row's valid ones first.
            mask_or_lengths: integer ``[B]`` lengths (clamped to ``[0, L]``), or a bool
                ``[B, L]`` mask, False on padding, whose True positions must come first in
                each row (as ``models.inputs.sequence_mask`` builds it); the lengths are its
                row sums.
            check_bounds: one host sync checking that a mask is such a prefix (a mask with
                holes would silently attend to the wrong positions); nothing to check with
                lengths.

        Raises:
            ValueError: a mask or lengths of the wrong shape; with ``check_bounds``, a mask
                whose valid positions do not come first.
        """
        if mask_or_lengths.dtype == torch.bool:
            mask = mask_or_lengths
            if keys.dim() != 3 or mask.shape != keys.shape[:2]:
                raise ValueError(
                    f"FusedTargetAttention: mask must be [B, L] = {list(keys.shape[:2])}, "
                    f"got {list(mask.shape)}"
                )
            lengths = mask.sum(dim=1)
            if check_bounds:
                positions = torch.arange(mask.shape[1], device=mask.device)
                if not bool((mask == (positions < lengths.unsqueeze(1))).all()):
                    raise ValueError(
                        "FusedTargetAttention: each row's mask must be True on its first "
                        "positions and False after them (pass lengths for other layouts)"
                    )
        else:
            lengths = mask_or_lengths
        return padded_target_attention(
            query, keys, lengths, self.layers(), activation=self.activation,
            softmax=self.softmax,
        )  # fmt: skip

    def extra_repr(self) -> str:
        """The activation and the softmax flag, for ``print(module)``."""
        return f"activation={self.activation!r}, softmax={self.softmax}"
