"""Bucketize float values per feature, each against its own boundary list, in one launch.

Feature ``f`` owns a slice of one float32/float64 values buffer (``value_offsets``) and a
float64 boundary list (``boundaries[bound_offsets[f]:bound_offsets[f + 1]]``, non-empty,
strictly increasing, no NaN) with its own ``right`` flag. Each value becomes
``torch.bucketize(float64(x), its list, right=right)``, compared in float64; NaN goes past
the last boundary (the list's length). Each element finds its feature with a binary search
over ``value_offsets``, so there is one launch whatever the number of features.

The boundary tables are validated on the host once per tensor version
(:func:`~recstack.feature_engine.kernels.host.cached`); :func:`compile_float_boundaries`
builds them from per-feature lists in pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.feature_engine.kernels import host, program_tables

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.feature_engine.kernels.device import bucket_of, feature_of

__all__ = ["bucketize_float", "bucketize_float_reference", "compile_float_boundaries"]

_BLOCK = 1024


def compile_float_boundaries(
    boundary_lists: Sequence[Sequence[float]],
    right: bool | Sequence[bool] = False,
    *,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``(boundaries, bound_offsets, right)`` for :func:`bucketize_float` (CPU tensors).

    Args:
        boundary_lists: feature ``f``'s strictly increasing, non-empty, NaN-free list.
        right: one ``torch.bucketize`` ``right`` flag for all features, or one per feature.
        names: feature names for error messages.

    Returns:
        ``boundaries`` float64 ``[M]``, ``bound_offsets`` int64 ``[F + 1]`` and ``right``
        int64 ``[F]``, checked like the launcher does.

    Examples:
        >>> b, off, r = compile_float_boundaries([[0.5, 1.5], [10.0]], right=[False, True])
        >>> off.tolist(), r.tolist()
        ([0, 2, 3], [0, 1])
    """
    f = len(boundary_lists)
    flags = [right] * f if isinstance(right, bool | int) else list(right)
    if len(flags) != f:
        raise ValueError(f"right has {len(flags)} flags for {f} features")
    flat: list[float] = []
    offsets = [0]
    for i, bl in enumerate(boundary_lists):
        try:
            flat.extend(float(b) for b in bl)
        except (TypeError, ValueError):
            raise TypeError(
                f"{program_tables.feature_label(i, None, names)}: boundaries must be floats"
            ) from None
        offsets.append(len(flat))
        if flags[i] not in (0, 1):
            where = program_tables.feature_label(i, None, names)
            raise ValueError(f"{where}: right must be a bool, got {flags[i]!r}")
    b = torch.tensor(flat, dtype=torch.float64)
    off = torch.tensor(offsets, dtype=torch.int64)
    r = torch.tensor([int(x) for x in flags], dtype=torch.int64)
    _tables_check(b, off, r, "compile_float_boundaries", names)
    return b, off, r


def _tables_check(
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
    op: str,
    names: Sequence[str] | None = None,
) -> int:
    """Validate per-feature float boundary lists; return the longest list's length."""
    b = boundaries.detach().cpu()
    off = bound_offsets.detach().cpu()
    r = right.detach().cpu()
    m = b.numel()
    if off.numel() > 1:
        counts = off[1:] - off[:-1]
        if int(off[0]) < 0 or int(off[-1]) > m or bool((counts < 1).any()):
            empty = (counts < 1).nonzero()
            detail = (
                f"; {program_tables.feature_label(int(empty[0, 0]), None, names)} has no boundaries"
                if empty.numel()
                else ""
            )
            raise ValueError(
                f"{op}: bound_offsets must be strictly increasing within [0, len(boundaries)="
                f"{m}] (every feature needs a boundary), got first={int(off[0])}, "
                f"last={int(off[-1])}{detail}"
            )
    bad = (r != 0) & (r != 1)
    if bad.any():
        where = program_tables.feature_label(host.first_true(bad)[0], None, names)
        raise ValueError(f"{op}: {where}: right must be 0 or 1")
    if b.isnan().any():
        raise ValueError(
            f"{op}: boundaries must not be NaN (at index {host.first_true(b.isnan())[0]})"
        )
    if off.numel() > 1 and m > 1:
        descents = torch.zeros(m, dtype=torch.int64)
        torch.cumsum((b[1:] <= b[:-1]).to(torch.int64), 0, out=descents[1:])
        bad = descents[off[1:] - 1] != descents[off[:-1]]
        if bad.any():
            where = program_tables.feature_label(host.first_true(bad)[0], None, names)
            raise ValueError(f"{op}: {where}: boundaries must be strictly increasing")
    return int((off[1:] - off[:-1]).max()) if off.numel() > 1 else 0


def bucketize_float_reference(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`bucketize_float` (one ``torch.bucketize`` per feature).

    Args:
        values: float32 or float64 ``[N]``.
        value_offsets: int64 ``[F + 1]``.
        boundaries: float64 ``[M]``, valid lists.
        bound_offsets: int64 ``[F + 1]``.
        right: int64 ``[F]`` of 0/1.
    """
    x = values.to(torch.float64)
    out = torch.empty(x.shape, dtype=torch.int64, device=x.device)
    vo = value_offsets.tolist()
    bo = bound_offsets.tolist()
    flags = right.tolist()
    for f in range(len(vo) - 1):
        s, e = vo[f], vo[f + 1]
        if s == e:
            continue
        xs = x[s:e]
        ids = torch.bucketize(xs, boundaries[bo[f] : bo[f + 1]], right=bool(flags[f]))
        out[s:e] = torch.where(xs.isnan(), bo[f + 1] - bo[f], ids)
    return out


if HAS_TRITON:

    @triton.jit(do_not_specialize=["num_features", "f_steps", "b_steps"])
    def _bucketize_float_kernel(
        values_ptr,
        offsets_ptr,
        bounds_ptr,
        bound_offsets_ptr,
        right_ptr,
        out_ptr,
        n,
        num_features,
        f_steps,
        b_steps,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = i < n
        x = tl.load(values_ptr + i, mask=in_range, other=0).to(tl.float64)
        feat = feature_of(offsets_ptr, i, num_features, f_steps)
        start = tl.load(bound_offsets_ptr + feat)
        count = tl.load(bound_offsets_ptr + feat + 1) - start
        right = tl.load(right_ptr + feat) != 0
        lo = bucket_of(bounds_ptr + start, x, count, right, b_steps)
        tl.store(out_ptr + i, tl.where(x != x, count, lo), mask=in_range)


def bucketize_float(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
    *,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Bucketize each feature's float values against its own boundaries, one launch.

    Args:
        values: float32 or float64 ``[N]``; feature ``f`` owns
            ``values[value_offsets[f]:value_offsets[f + 1]]``.
        value_offsets: int64 ``[F + 1]``, non-decreasing from 0 to ``N``.
        boundaries: float64 ``[M]``; feature ``f``'s list is
            ``boundaries[bound_offsets[f]:bound_offsets[f + 1]]`` (non-empty, strictly
            increasing, no NaN; checked once per table version).
        bound_offsets: int64 ``[F + 1]``.
        right: int64 ``[F]`` of 0/1, ``torch.bucketize``'s ``right`` per feature.
        check_offsets: check ``value_offsets`` (one host sync on CUDA).

    Returns:
        int64 ``[N]``: ``torch.bucketize`` of each value in float64 against its feature's
        list; NaN gets the list's length (past the last boundary).

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape, offsets or list, naming the feature.

    Examples:
        >>> import torch
        >>> bucketize_float(torch.tensor([0.5, 2.0, float("nan")]), torch.tensor([0, 3]),
        ...                 torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...                 torch.tensor([0, 2]), torch.tensor([0])).tolist()
        [0, 1, 2]
    """
    op = "bucketize_float"
    host.check_tensor(values, "values", op, (torch.float32, torch.float64), 1)
    host.check_tensor(value_offsets, "value_offsets", op, (torch.int64,), 1)
    host.check_tensor(boundaries, "boundaries", op, (torch.float64,), 1)
    host.check_tensor(bound_offsets, "bound_offsets", op, (torch.int64,), 1)
    host.check_tensor(right, "right", op, (torch.int64,), 1)
    host.check_same_device(
        op,
        values=values,
        value_offsets=value_offsets,
        boundaries=boundaries,
        bound_offsets=bound_offsets,
        right=right,
    )
    num_features = value_offsets.numel() - 1
    if num_features < 0:
        raise ValueError(f"{op}: value_offsets must have F + 1 >= 1 entries, got 0")
    if bound_offsets.numel() != num_features + 1:
        raise ValueError(
            f"{op}: bound_offsets must have F + 1 = {num_features + 1} entries (F from "
            f"value_offsets), got {bound_offsets.numel()}"
        )
    if right.numel() != num_features:
        raise ValueError(f"{op}: right must have F = {num_features} entries, got {right.numel()}")
    max_count = host.cached(
        op,
        (bound_offsets, boundaries, right),
        lambda: _tables_check(boundaries, bound_offsets, right, op),
    )
    n = program_tables.check_values_span(values, value_offsets, num_features, op, check_offsets)
    values, value_offsets, boundaries, bound_offsets, right = host.contiguous(
        values, value_offsets, boundaries, bound_offsets, right
    )
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("bucketize_float_reference")
        return bucketize_float_reference(values, value_offsets, boundaries, bound_offsets, right)
    out = torch.empty(n, dtype=torch.int64, device=values.device)
    if n:
        kernels.record_launch(op)
        _bucketize_float_kernel[(triton.cdiv(n, _BLOCK),)](
            values,
            value_offsets,
            host.nonempty(boundaries, torch.float64),
            bound_offsets,
            right,
            out,
            n,
            num_features,
            program_tables.search_steps(num_features),
            max_count.bit_length(),
            BLOCK=_BLOCK,
            num_warps=4,
        )
    return out
