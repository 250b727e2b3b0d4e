"""Initial rows of a merged table's new ids, every logical table's in one launch.

A merged physical table holds the rows of several logical tables, each with its own
initializer and seed. :func:`init_rows_tagged` gives row ``i`` exactly
:func:`~recstack.embedding_engine.kernels.init_rows.init_rows` ``(keys[i], dim,
initializers[tags[i]], seed=seeds[tags[i]])``, bit for bit, from one kernel that reads each
row's initializer kind, float64 parameters and salt from small per-table arrays. A
training step that inserts new ids into a merged table of 26 features makes one launch
here instead of, per table, a mask, two gathers and a launch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import as_int64, next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.embedding_engine.config import Initializer
from recstack.embedding_engine.kernels.init_rows import (
    _NORMAL,
    _NPARAMS,
    _UNIFORM,
    INIT_ROWS_DEFAULTS,
    _check_args,
    _check_keys,
    _plan,
    _salt,
    init_rows_reference,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_to_table_dtype
    from recstack.core.kernels.hash import tl_fmix64
    from recstack.embedding_engine.kernels.init_rows import _GOLDEN_C, _f64, _tl_ndtri

__all__ = ["init_rows_tagged", "init_rows_tagged_reference"]


def _check(
    keys: object,
    tags: object,
    dim: object,
    initializers: Sequence[Initializer],
    seeds: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    op = "init_rows_tagged"
    keys = _check_keys(keys, op)
    if not isinstance(tags, torch.Tensor) or tags.dim() != 1 or tags.numel() != keys.numel():
        shape = tuple(tags.shape) if isinstance(tags, torch.Tensor) else type(tags).__name__
        raise ValueError(f"{op}: tags must be a 1-D tensor with one tag per key, got {shape}")
    if tags.dtype not in (torch.int32, torch.int64) or tags.device != keys.device:
        raise TypeError(
            f"{op}: tags must be int32 or int64 on the keys' device ({keys.device}), got "
            f"{tags.dtype} on {tags.device}"
        )
    if len(initializers) != len(seeds) or not initializers:
        raise ValueError(
            f"{op}: one initializer and one seed per logical table, got "
            f"{len(initializers)} initializers and {len(seeds)} seeds"
        )
    checked = [
        _check_args(dim, init, seed, dtype, op)
        for init, seed in zip(initializers, seeds, strict=True)
    ]
    return keys, tags.contiguous(), checked[0][0], tuple(seed for _, seed in checked)


def init_rows_tagged_reference(
    keys: torch.Tensor,
    tags: torch.Tensor,
    dim: int,
    initializers: Sequence[Initializer],
    seeds: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`init_rows_tagged`: :func:`init_rows_reference` table by
    table (any device)."""
    keys, tags, dim, seeds = _check(keys, tags, dim, initializers, seeds, dtype)
    out = torch.empty((keys.numel(), dim), dtype=dtype, device=keys.device)
    for t, (init, seed) in enumerate(zip(initializers, seeds, strict=True)):
        mine = tags == t
        out[mine] = init_rows_reference(keys[mine], dim, init, seed=seed, dtype=dtype)
    return out


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)
def _table_plans(
    plans: tuple[tuple[int, tuple[float, ...], int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-table kinds (int32), float64 parameters ``[T, 8]`` and salts (int64) on the device,
    kept per plan and device (kernels only read them): no host-to-device copies a call."""
    kinds = torch.tensor([k for k, _, _ in plans], dtype=torch.int32, device=device)
    params = torch.tensor([p for _, p, _ in plans], dtype=torch.float64, device=device)
    salts = torch.tensor([as_int64(s) for _, _, s in plans], dtype=torch.int64, device=device)
    return kinds, params, salts


if HAS_TRITON:
    _UNIFORM_K = tl.constexpr(_UNIFORM)
    _NORMAL_K = tl.constexpr(_NORMAL)

    @triton.jit(do_not_specialize=["n", "dim"])
    def _init_rows_tagged_kernel(
        keys_ptr,
        tags_ptr,
        kinds_ptr,
        params_ptr,
        salts_ptr,
        out_ptr,
        n,
        dim,
        NPARAMS: tl.constexpr,
        ANY_UNIFORM: tl.constexpr,
        ANY_NORMAL: tl.constexpr,
        OUT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < n
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        tag = tl.load(tags_ptr + r, mask=row_ok, other=0).to(tl.int64)
        kind = tl.load(kinds_ptr + tag, mask=row_ok, other=0)[:, None]
        p = params_ptr + tag * NPARAMS
        p0 = tl.load(p, mask=row_ok, other=0.0)[:, None]
        # A constant row: the same splat as init_rows' kernel.
        v = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64) + p0
        if ANY_UNIFORM or ANY_NORMAL:
            keys = tl.load(keys_ptr + r, mask=row_ok, other=0).to(tl.uint64, bitcast=True)
            salt = tl.load(salts_ptr + tag, mask=row_ok, other=0).to(tl.uint64, bitcast=True)
            base = tl_fmix64(keys ^ salt)
            ctr = (cols + 1).to(tl.uint64, bitcast=True) * _GOLDEN_C
            bits = tl_fmix64(base[:, None] + ctr[None, :])
            p1 = tl.load(p + 1, mask=row_ok, other=0.0)[:, None]
            if ANY_UNIFORM:
                u = (bits >> 11).to(tl.int64, bitcast=True).to(tl.float64) * _f64(2.0**-53)
                v = tl.where(kind == _UNIFORM_K, u * p1 + p0, v)
            if ANY_NORMAL:
                u = (bits >> 12).to(tl.int64, bitcast=True).to(tl.float64) + 0.5
                u = u * _f64(2.0**-52)
                z = _tl_ndtri(u * p1 + p0)
                z_lo = tl.load(p + 4, mask=row_ok, other=0.0)[:, None]
                z_hi = tl.load(p + 5, mask=row_ok, other=0.0)[:, None]
                z = tl.minimum(tl.maximum(z, z_lo), z_hi)
                z = z * tl.load(p + 6, mask=row_ok, other=0.0)[:, None]
                std = tl.load(p + 3, mask=row_ok, other=0.0)[:, None]
                mean = tl.load(p + 2, mask=row_ok, other=0.0)[:, None]
                v = tl.where(kind == _NORMAL_K, z * std + mean, v)
        out = tl_to_table_dtype(v.to(tl.float32), OUT)
        tl.store(out_ptr + r[:, None] * dim + cols[None, :], out, mask=mask)

    _INIT_ROWS_TAGGED = FastKernel(_init_rows_tagged_kernel)


def init_rows_tagged(
    keys: torch.Tensor,
    tags: torch.Tensor,
    dim: int,
    initializers: Sequence[Initializer],
    seeds: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial rows ``[len(keys), dim]`` of ids from several logical tables at once.

    Row ``i`` is :func:`~recstack.embedding_engine.kernels.init_rows.init_rows` of
    ``keys[i]`` with ``initializers[tags[i]]`` and ``seeds[tags[i]]``, bit for bit, on every
    backend and device; one kernel launch (no host sync) whatever the number of tables.

    Args:
        keys: int64 ``[N]`` ids.
        tags: int32 or int64 ``[N]``: each id's logical table, an index into
            ``initializers`` (not bounds-checked: the caller's tags come from its tables).
        dim: row width (> 0).
        initializers: each logical table's initializer.
        seeds: each logical table's seed, in ``[0, 2**64)``.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        A new ``[N, dim]`` tensor of ``dtype`` on ``keys``' device.

    Raises:
        TypeError, ValueError: as :func:`init_rows`; tags not one per key, or a different
            number of initializers and seeds.

    Examples:
        >>> import torch
        >>> from recstack.embedding_engine import Initializer, init_rows
        >>> inits = [Initializer.normal(std=0.1), Initializer.uniform(-0.5, 0.5)]
        >>> rows = init_rows_tagged(
        ...     torch.tensor([7, 7]), torch.tensor([0, 1]), 4, inits, seeds=[1, 2]
        ... )
        >>> torch.equal(rows[1], init_rows(torch.tensor([7]), 4, inits[1], seed=2)[0])
        True
    """
    keys, tags, dim, seeds = _check(keys, tags, dim, initializers, seeds, dtype)
    if not kernels.use_triton(keys, tags, op="init_rows_tagged"):
        kernels.record_launch("init_rows_tagged_reference")
        return init_rows_tagged_reference(keys, tags, dim, initializers, seeds, dtype=dtype)
    out = torch.empty((keys.numel(), dim), dtype=dtype, device=keys.device)
    if not keys.numel():
        return out
    plans = tuple(
        (*_plan(init, dim), _salt(seed)) for init, seed in zip(initializers, seeds, strict=True)
    )
    kinds, params, salts = _table_plans(plans, keys.device)
    block_d = min(next_pow2(dim), INIT_ROWS_DEFAULTS["max_block_d"])
    block_r = next_pow2(max(1, INIT_ROWS_DEFAULTS["tile_elems"] // block_d))
    grid = (triton.cdiv(keys.numel(), block_r), triton.cdiv(dim, block_d))
    kernels.record_launch("init_rows_tagged")
    _INIT_ROWS_TAGGED(
        grid,
        keys,
        tags,
        kinds,
        params,
        salts,
        out,
        keys.numel(),
        dim,
        _NPARAMS,
        any(kind == _UNIFORM for kind, _, _ in plans),
        any(kind == _NORMAL for kind, _, _ in plans),
        TABLE_KINDS[dtype],
        block_r,
        block_d,
        num_warps=INIT_ROWS_DEFAULTS["num_warps"],
        # Contracting a*b + c into an FMA would round differently from the reference.
        enable_fp_fusion=False,
    )
    return out
