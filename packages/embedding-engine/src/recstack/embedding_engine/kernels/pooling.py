"""Fused pooled embedding lookup over a PagedTensor, and its backward to a SparseGrad.

The forward of an EmbeddingCollection's pooled features (TorchRec's EmbeddingBagCollection)
in one launch for all features: ``K`` features x batch ``B`` bags laid out key-major like a
``KeyedJaggedTensor`` -- bag ``(k, b)`` is ``rows[offsets[k * B + b]:offsets[k * B + b + 1]]``
-- where ``rows`` are the table rows the hash table gave for the ids.

Semantics (both kernels and the torch references):

* a row id of ``-1`` ("no row": an id not admitted yet, or unknown in eval) contributes zeros
  but still counts in a mean's denominator, as TorchRec counts every id of a bag;
* an empty bag pools to zeros (sum and mean alike);
* ``modes[k]`` is ``0`` (sum) or ``1`` (mean); ``weights`` (per id) multiply each row, and a
  weighted mean divides the weighted sum by the bag length;
* accumulation is fp32; the output dtype is the table's by default (TorchRec's choice: a
  bf16 table gives bf16 pooled outputs) or ``out_dtype``/``out``'s (fp32 or the table dtype);
* the output is ``[B, K, dim]`` so feature ``k`` is the view ``out[:, k, :]`` and the whole
  is the dense-tower-ready ``out.view(B, K * dim)``; any ``out`` view with unit column stride
  works (e.g. a slice of a wider dense-input buffer).

Forward kernel (:func:`pooled_lookup`): each program pools ``G`` consecutive bags for one
column tile. Per step it loads ``G x BLOCK_N`` row ids, their page pointers (core's
:func:`~recstack.core.kernels.device.tl_row_pointers`, 16-byte hinted when every page is
aligned) and one ``[G * BLOCK_N, BLOCK_D]`` masked load of the rows -- ``G * BLOCK_N`` rows
in flight, each a coalesced ``dim``-wide read -- reduces it over the ids and loops while any
bag of the group has ids left. ``BLOCK_N`` follows the mean bag length (known on the host as
``N / (K * B)``, no sync) and ``G`` fills the tile: one bag per program at 20 ids/bag and
dim 64, 32 bags per program for one-hot features. No atomics: a bag belongs to one program.

Backward (:func:`pooled_lookup_backward`): the gradient of row ``u`` is
``sum over ids i with inverse[i] == u of grad_out[bag(i)] * scale(i)`` (``scale`` = weight,
divided by the bag length for mean). No per-id ``[N, dim]`` gradient is built: the ids are
sorted by ``inverse`` once (an int32 radix sort when it fits, or the caller's ``order``)
and :func:`~recstack.embedding_engine.kernels.lookup_grad.lookup_grad_sums` reduces the
gradient rows of each run of equal rows (a segmented scan, stores for runs inside a tile,
one atomic per tile boundary a run crosses). ``bag(i)`` comes from an int64 array
``repeat_interleave(lengths)`` built once in original id order (one coalesced write, no
sync) and read through the sort permutation: one 32-byte sector per id. A binary search
over ``offsets`` instead would be ~log2(K * B) = 21 dependent loads per id at the benchmark
size.

Bytes moved per call (``E`` = table element bytes, ``O`` = output element bytes, ``D`` = dim,
``N`` ids, ``V`` = ids with a row, ``U`` unique rows; for benchmark MBU formulas):

* forward: ``N * 8`` (row ids, int64) ``+ (K * B + 1) * 8`` (offsets) ``+ V * D * E``
  (one table row per id) ``+ N * 4`` if weighted ``+ B * K * D * O`` (output).
  Benchmark (26 features, B 65536, 20 ids/bag, D 64 fp32, no -1):
  272.6 MB + 13.6 MB + 8724.2 MB + 436.2 MB = 9.45 GB.
* backward, per-id count (the forward's mirror: one gradient row read per id, where the
  forward reads one table row per id): ``N * 8`` (sorted position) ``+ N * 4`` (sorted
  label) ``+ N * D * 4`` (one ``grad_out`` row per id) ``+ N * 4`` if weighted
  ``+ U * (D * 4 + 8)`` (values and rows written). The "must move" count reads
  ``grad_out`` once instead (``B * K * D * 4``); no reduce-by-row design reaches it, as
  ``grad_out`` (436 MB at the benchmark size) does not fit in L2 and each row's ids lie in
  random bags. Sorting here (no caller ``order``) adds about 100 bytes per id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recstack.core import PagedTensor, SparseGrad
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.host import next_pow2, prev_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.kernels.paged_rows import gather_paged_rows_reference
from recstack.embedding_engine.kernels.lookup_grad import GRAD_DEFAULTS, lookup_grad_sums

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_row_pointers, tl_to_table_dtype

__all__ = [
    "MODE_MEAN",
    "MODE_SUM",
    "POOLING_BACKWARD_DEFAULTS",
    "POOLING_DEFAULTS",
    "bag_lengths",
    "bag_scale",
    "pooled_lookup",
    "pooled_lookup_backward",
    "pooled_lookup_backward_reference",
    "pooled_lookup_reference",
]

MODE_SUM = 0
MODE_MEAN = 1

#: Forward tile defaults (override per call with keywords). ``tile_elems`` is the target
#: ``G * BLOCK_N * BLOCK_D`` of one load; ``max_block_d`` caps the column tile; ``block_n``
#: (ids per bag per step) 0 means "next power of two of the mean bag length".
POOLING_DEFAULTS: dict[str, int] = {
    "tile_elems": 2048,
    "max_block_d": 256,
    "block_n": 0,
    "num_warps": 0,
}

#: Backward tile defaults (the same dict as the reduction's, so a change reaches both).
POOLING_BACKWARD_DEFAULTS: dict[str, int] = GRAD_DEFAULTS

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)
_INT32_MAX = 2**31 - 1


if HAS_TRITON:

    @triton.jit
    def _pooled_fwd_kernel(
        page_table_ptr,
        rows_ptr,
        offsets_ptr,
        modes_ptr,
        weights_ptr,
        out_ptr,
        num_bags,
        batch_size,
        dim,
        out_stride_b,
        out_stride_k,
        page_shift,
        page_mask,
        KIND: tl.constexpr,
        OUT_KIND: tl.constexpr,
        ALIGNED: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bag = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
        bag_ok = bag < num_bags
        start = tl.load(offsets_ptr + bag, mask=bag_ok, other=0)
        end = tl.load(offsets_ptr + bag + 1, mask=bag_ok, other=0)
        length = end - start
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        lane = tl.arange(0, BLOCK_N)
        acc = tl.zeros((G, BLOCK_D), dtype=tl.float32)
        # The group loops while its longest bag has ids left; shorter bags' lanes are masked
        # (masked lanes issue no memory traffic).
        steps = tl.max((length + BLOCK_N - 1) // BLOCK_N, axis=0)
        for step in range(0, steps):
            # Flat [G * BLOCK_N] ids: tl_row_pointers (and its 16-byte hint) works on 1-D rows.
            idx2 = start[:, None] + step * BLOCK_N + lane[None, :]
            idx = tl.reshape(idx2, (G * BLOCK_N,))
            ok = tl.reshape(idx2 < end[:, None], (G * BLOCK_N,))
            rows = tl.load(rows_ptr + idx, mask=ok, other=-1).to(tl.int64)
            row_ok = ok & (rows >= 0)
            src = tl_row_pointers(
                page_table_ptr, rows, row_ok, page_shift, page_mask, dim, KIND, ALIGNED
            )
            x = tl.load(
                src[:, None] + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + idx, mask=ok, other=0.0).to(tl.float32)
                x = x * w[:, None]
            if G == 1:
                acc += tl.sum(x, axis=0)[None, :]
            else:
                acc += tl.sum(tl.reshape(x, (G, BLOCK_N, BLOCK_D)), axis=1)
        k = bag // batch_size
        b = bag - k * batch_size
        mode = tl.load(modes_ptr + k, mask=bag_ok, other=0)
        # Mean divides by every id of the bag (-1 rows included); empty bags stay zero.
        denom = tl.where((mode == 1) & (length > 0), length, 1).to(tl.float32)
        acc = acc / denom[:, None]
        dst = out_ptr + b[:, None] * out_stride_b + k[:, None] * out_stride_k + cols[None, :]
        tl.store(dst, tl_to_table_dtype(acc, OUT_KIND), mask=bag_ok[:, None] & col_ok[None, :])

    _POOLED_FWD = FastKernel(_pooled_fwd_kernel)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _check_int_tensor(what: str, name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{what}: {name} must be int64 or int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on device {t.device} but expected {device}")
    return t.contiguous()


def _check_modes(what: str, modes: object, device: torch.device):
    """``modes`` as an int64 device tensor; values of host sequences are checked here."""
    if isinstance(modes, torch.Tensor):
        if modes.dtype not in _INT_DTYPES:
            raise TypeError(f"{what}: modes must be an int64 tensor, got {modes.dtype}")
        if modes.dim() != 1:
            raise ValueError(f"{what}: modes must be 1-D [K], got shape {tuple(modes.shape)}")
        if modes.device != device:
            raise ValueError(f"{what}: modes is on device {modes.device} but expected {device}")
        return modes.to(torch.int64).contiguous(), False
    if not isinstance(modes, Sequence) or isinstance(modes, str):
        raise TypeError(
            f"{what}: modes must be an int64 tensor or a sequence of ints, "
            f"got {type(modes).__name__}"
        )
    values = list(modes)
    for k, m in enumerate(values):
        if isinstance(m, bool) or m not in (MODE_SUM, MODE_MEAN):
            raise ValueError(
                f"{what}: modes[{k}] = {m!r}; use {MODE_SUM} (sum) or {MODE_MEAN} (mean)"
            )
    return torch.tensor(values, dtype=torch.int64, device=device), True


def _check_bags(
    what: str,
    device: torch.device,
    rows: object,
    offsets: object,
    batch_size: object,
    modes: object,
    weights: object,
):
    """Validate the bag layout shared by forward and backward (no device sync)."""
    check_int(batch_size, f"{what}: batch_size", minimum=0)
    rows = _check_int_tensor(what, "rows", rows, device)
    offsets = _check_int_tensor(what, "offsets", offsets, device)
    if offsets.dtype != torch.int64:
        raise TypeError(f"{what}: offsets must be int64, got {offsets.dtype}")
    modes, modes_checked = _check_modes(what, modes, device)
    num_keys = modes.numel()
    num_bags = num_keys * batch_size
    if offsets.numel() != num_bags + 1:
        raise ValueError(
            f"{what}: offsets has {offsets.numel()} entries but K * B + 1 = "
            f"{num_keys} * {batch_size} + 1 = {num_bags + 1} (K = len(modes), B = batch_size)"
        )
    if num_bags > _INT32_MAX:
        raise ValueError(f"{what}: K * B = {num_bags} bags exceeds 2**31 - 1")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(
                f"{what}: weights must be a torch.Tensor or None, got {type(weights).__name__}"
            )
        if weights.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what}: weights must be a float tensor, got {weights.dtype}")
        if tuple(weights.shape) != (rows.numel(),):
            raise ValueError(
                f"{what}: weights must have shape ({rows.numel()},) like rows, "
                f"got {tuple(weights.shape)}"
            )
        if weights.device != device:
            raise ValueError(f"{what}: weights is on device {weights.device} but expected {device}")
        weights = weights.contiguous()
    return rows, offsets, modes, modes_checked, weights, num_keys, num_bags


def _layout_checks(rows, offsets, modes, modes_checked) -> list[torch.Tensor]:
    """Device-side flags (each must be 1) for one batched host read."""
    n = rows.numel()
    flags = [
        (offsets[0] == 0),
        (offsets[-1] == n),
        (offsets[1:] >= offsets[:-1]).all(),
    ]
    if not modes_checked and modes.numel():
        flags.append(((modes == MODE_SUM) | (modes == MODE_MEAN)).all())
    return flags


def _raise_layout(what: str, names: list[str], values: list[int]) -> None:
    for name, ok in zip(names, values, strict=False):
        if not ok:
            raise ValueError(f"{what}: {name}")


_LAYOUT_NAMES = [
    "offsets[0] must be 0",
    "offsets[-1] must equal len(rows)",
    "offsets must be non-decreasing",
    f"modes values must be {MODE_SUM} (sum) or {MODE_MEAN} (mean)",
]


def _index_checks(
    rows: torch.Tensor,
    unique_rows: torch.Tensor,
    inverse: torch.Tensor,
    order: torch.Tensor | None,
) -> list[tuple[torch.Tensor, str]]:
    """Device-side flags for the backward's index arrays, each with its error message."""
    device, n, num_unique = rows.device, rows.numel(), unique_rows.numel()
    checks = []
    if num_unique:
        checks += [
            (unique_rows[0] >= -1, "unique_rows must not hold values below -1"),
            ((unique_rows[1:] > unique_rows[:-1]).all(), "unique_rows must be sorted and unique"),
        ]
    if not n:
        if num_unique:
            empty = torch.zeros((), dtype=torch.bool, device=device)
            checks.append((empty, "unique_rows must be empty when there are no ids"))
        return checks
    inv = inverse.to(torch.int64)
    if not num_unique:
        none = (inv == -1).all() & (rows == -1).all()
        checks.append((none, "with no unique_rows every row and inverse entry must be -1"))
        return checks
    in_range = (inv >= -1) & (inv < num_unique)
    looked = unique_rows.index_select(0, inv.clamp(0, num_unique - 1))
    consistent = torch.where(inv >= 0, looked == rows, rows == -1)
    # Slot num_unique absorbs the -1 entries (no boolean indexing: no extra sync).
    seen = torch.zeros(num_unique + 1, dtype=torch.bool, device=device)
    seen.index_fill_(0, torch.where(inv >= 0, inv.clamp(0, num_unique - 1), num_unique), True)
    checks += [
        (in_range.all(), f"inverse must lie in [-1, {num_unique})"),
        (
            (in_range & consistent).all(),
            "inverse must map each id to its row: unique_rows[inverse] == rows "
            "(and inverse == -1 only where rows == -1)",
        ),
        (seen[:num_unique].all(), "every index of unique_rows must occur in inverse"),
    ]
    if order is not None:
        order = order.to(torch.int64)
        order_ok = ((order >= 0) & (order < n)).all()
        hit = torch.zeros(n, dtype=torch.bool, device=device)
        hit.index_fill_(0, order.clamp(0, n - 1), True)
        by_order = inv.index_select(0, order.clamp(0, n - 1))
        checks += [
            (order_ok & hit.all(), f"order must be a permutation of [0, {n})"),
            (
                (by_order[1:] >= by_order[:-1]).all(),
                "order must sort inverse: inverse[order] must be non-decreasing",
            ),
        ]
    return checks


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


def bag_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """int64 ``[K * B]``: each bag's length, from the ``[K * B + 1]`` offsets."""
    return offsets[1:] - offsets[:-1]


def _bag_modes(modes: torch.Tensor, batch_size: int) -> torch.Tensor:
    return modes.repeat_interleave(batch_size)


def pooled_lookup_reference(
    table: PagedTensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    modes: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`pooled_lookup` (materializes ``[N, dim]``); no validation."""
    record_launch("pooled_lookup_reference")
    out_dtype = out_dtype or table.dtype
    dim, n = table.dim, rows.numel()
    num_keys = modes.numel()
    num_bags = num_keys * batch_size
    rows = rows.to(torch.int64)
    vals = torch.zeros((n, dim), dtype=torch.float32, device=table.device)
    valid = rows >= 0
    if n and bool(valid.any()):
        vals[valid] = gather_paged_rows_reference(table, rows[valid]).to(torch.float32)
    if weights is not None:
        vals = vals * weights.to(torch.float32)[:, None]
    lengths = bag_lengths(offsets)
    bag_of = torch.repeat_interleave(lengths, output_size=n)
    pooled = torch.zeros((num_bags, dim), dtype=torch.float32, device=table.device)
    pooled.index_add_(0, bag_of, vals)
    mean = (_bag_modes(modes, batch_size) == MODE_MEAN) & (lengths > 0)
    denom = torch.where(mean, lengths, torch.ones_like(lengths)).to(torch.float32)
    pooled = pooled / denom[:, None]
    return pooled.view(num_keys, batch_size, dim).transpose(0, 1).to(out_dtype)


def pooled_lookup(
    table: PagedTensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    modes: torch.Tensor | Sequence[int],
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    check_bounds: bool = True,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Pool table rows per bag for ``K`` features at once: ``[B, K, dim]``.

    Args:
        table: the embedding rows (a wrapped plain tensor works: one page).
        rows: int64/int32 ``[N]`` table rows of the ids, ``-1`` for "no row" (zeros that
            still count in a mean's denominator).
        offsets: int64 ``[K * B + 1]`` key-major bag offsets (``offsets[0] == 0``,
            ``offsets[-1] == N``): bag ``(k, b)`` is ``rows[offsets[k*B+b]:offsets[k*B+b+1]]``.
        batch_size: ``B``.
        modes: ``[K]`` pooling per feature, ``0`` sum or ``1`` mean: an int64 tensor on the
            table's device (keep one cached), or a host sequence (copied per call).
        weights: optional float ``[N]`` per-id weights (weighted sum / weighted mean).
        out: optional ``[B, K, dim]`` destination (fp32 or the table dtype, unit column
            stride; any other strides, e.g. a slice of a wider buffer).
        out_dtype: output dtype when ``out`` is None: the table dtype (default) or fp32.
        check_bounds: one device sync to check rows in ``[-1, num_rows)``, the offsets and
            the modes; callers with known-good inputs pass ``False`` (no sync).
        tile_elems, max_block_d, block_n, num_warps: kernel tile tuning.

    Returns:
        ``[B, K, dim]``: ``out[b, k]`` is the pooled bag ``(k, b)``, fp32-accumulated.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or modes.
        IndexError: with ``check_bounds``, a row outside ``[-1, table.num_rows)``.

    Examples:
        >>> import torch
        >>> t = PagedTensor.wrap(torch.arange(6.0).view(3, 2))
        >>> rows = torch.tensor([0, 2, -1, 1])
        >>> offsets = torch.tensor([0, 2, 2, 4])  # K = 1 feature, B = 3 bags
        >>> pooled_lookup(t, rows, offsets, 3, [0]).tolist()
        [[[4.0, 6.0]], [[0.0, 0.0]], [[2.0, 3.0]]]
    """
    what = f"pooled_lookup on {getattr(table, 'name', '?')!r}"
    if not isinstance(table, PagedTensor):
        raise TypeError(f"pooled_lookup: table must be a PagedTensor, got {type(table).__name__}")
    device = table.device
    rows, offsets, modes, modes_checked, weights, num_keys, num_bags = _check_bags(
        what, device, rows, offsets, batch_size, modes, weights
    )
    dim = table.dim
    shape = (batch_size, num_keys, dim)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{what}: out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape:
            raise ValueError(f"{what}: out must have shape {shape}, got {tuple(out.shape)}")
        if out.device != device:
            raise ValueError(f"{what}: out is on device {out.device} but the table on {device}")
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"{what}: out has dtype {out.dtype} but out_dtype is {out_dtype}")
        out_dtype = out.dtype
        if out.stride(2) != 1 and dim > 1:
            raise ValueError(f"{what}: out must have unit stride on its last (dim) axis")
    out_dtype = out_dtype or table.dtype
    if out_dtype not in (torch.float32, table.dtype):
        raise TypeError(
            f"{what}: the output dtype must be torch.float32 or the table dtype "
            f"{table.dtype}, got {out_dtype}"
        )
    n = rows.numel()
    if check_bounds:
        flags = _layout_checks(rows, offsets, modes, modes_checked)
        bounds = [rows.amin(), rows.amax()] if n else []
        host = torch.stack([f.to(torch.int64) for f in flags] + bounds).tolist()
        _raise_layout(what, _LAYOUT_NAMES, host[: len(flags)])
        if n:
            lo, hi = host[len(flags) :]
            bad = lo if lo < -1 else hi if hi >= table.num_rows else None
            if bad is not None:
                raise IndexError(
                    f"{what}: row {bad} is out of range; valid rows are -1 (no row) and "
                    f"[0, {table.num_rows})"
                )
    if num_bags == 0:
        return out if out is not None else torch.empty(shape, dtype=out_dtype, device=device)
    if not use_triton(rows, offsets, op="pooled_lookup"):
        result = pooled_lookup_reference(
            table, rows, offsets, batch_size, modes, weights, out_dtype=out_dtype
        )
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    if n == 0:
        out.zero_()
        return out
    tile_elems = prev_pow2(tile_elems or POOLING_DEFAULTS["tile_elems"])
    max_block_d = max_block_d or POOLING_DEFAULTS["max_block_d"]
    block_d = min(next_pow2(dim), next_pow2(max_block_d))
    max_n = max(1, tile_elems // block_d)
    block_n = block_n or POOLING_DEFAULTS["block_n"] or next_pow2(-(-n // num_bags))
    block_n = min(next_pow2(block_n), max_n)
    group = min(max(1, tile_elems // (block_n * block_d)), next_pow2(num_bags))
    tile = group * block_n * block_d
    num_warps = num_warps or POOLING_DEFAULTS["num_warps"] or max(1, min(8, tile // 1024))
    grid = (triton.cdiv(num_bags, group), triton.cdiv(dim, block_d))
    _POOLED_FWD(
        grid,
        table.page_table,
        rows,
        offsets,
        modes,
        weights if weights is not None else rows,
        out,
        num_bags,
        batch_size,
        dim,
        out.stride(0),
        out.stride(1),
        table.page_shift,
        table.page_mask,
        TABLE_KINDS[table.dtype],
        TABLE_KINDS[out_dtype],
        bool(getattr(table, "_pages_aligned", False)),
        weights is not None,
        group,
        block_n,
        block_d,
        num_warps=num_warps,
    )
    record_launch("pooled_lookup")
    return out


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


def bag_scale(offsets: torch.Tensor, modes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fp32 ``[K * B]``: ``1 / length`` for mean bags, ``1`` otherwise."""
    lengths = bag_lengths(offsets)
    mean = (_bag_modes(modes, batch_size) == MODE_MEAN) & (lengths > 0)
    return torch.where(mean, 1.0 / lengths.clamp(min=1).to(torch.float32), 1.0)


def pooled_lookup_backward_reference(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    modes: torch.Tensor,
    weights: torch.Tensor | None,
    unique_rows: torch.Tensor,
    inverse: torch.Tensor,
) -> SparseGrad:
    """Torch reference of :func:`pooled_lookup_backward`: per-id gradients + ``index_add_``.

    Ids with ``rows == -1`` or ``inverse == -1`` get no gradient; a leading ``-1`` in
    ``unique_rows`` is dropped. No validation.
    """
    record_launch("pooled_lookup_backward_reference")
    device, dim = grad_out.device, grad_out.shape[2]
    num_keys, n = modes.numel(), rows.numel()
    num_bags = num_keys * batch_size
    per_bag = grad_out.to(torch.float32).transpose(0, 1).reshape(num_bags, dim)
    bag_of = torch.repeat_interleave(bag_lengths(offsets), output_size=n)
    scale = bag_scale(offsets, modes, batch_size).index_select(0, bag_of)
    if weights is not None:
        scale = scale * weights.to(torch.float32)
    inverse = inverse.to(torch.int64)
    live = (rows >= 0) & (inverse >= 0)
    per_id = per_bag.index_select(0, bag_of[live]) * scale[live][:, None]
    values = torch.zeros((unique_rows.numel(), dim), dtype=torch.float32, device=device)
    values.index_add_(0, inverse[live], per_id)
    unique_rows = unique_rows.to(torch.int64)
    keep = unique_rows >= 0
    return SparseGrad(unique_rows[keep], values[keep], is_coalesced=True)


def pooled_lookup_backward(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    modes: torch.Tensor | Sequence[int],
    weights: torch.Tensor | None,
    unique_rows: torch.Tensor,
    inverse: torch.Tensor,
    *,
    order: torch.Tensor | None = None,
    leading_invalid: bool | None = None,
    check_inputs: bool = True,
    tile_elems: int | None = None,
    max_block_d: int | None = None,
    num_warps: int | None = None,
) -> SparseGrad:
    """Gradient of :func:`pooled_lookup` w.r.t. the table, as a coalesced :class:`SparseGrad`.

    Args:
        grad_out: ``[B, K, dim]`` float gradient of the pooled output (unit column stride).
        rows, offsets, batch_size, modes, weights: as given to :func:`pooled_lookup`.
        unique_rows: int64 ``[U]`` sorted unique rows; may start with one ``-1`` (the "row"
            of ids that have none, as ``torch.unique`` of rows with ``-1`` returns), which is
            dropped from the result.
        inverse: int64/int32 ``[N]``: ``unique_rows[inverse[i]] == rows[i]``; ``-1`` for an
            id with no row is also accepted. Every index in ``[0, U)`` must occur.
        order: optional permutation of ``[0, N)`` with ``inverse[order]`` non-decreasing (the
            caller's sort, e.g. from its ``torch.sort`` of rows), saving the sort here.
        leading_invalid: whether ``unique_rows[0] == -1``; ``None`` finds out with one small
            device read (folded into the ``check_inputs`` sync when that is on).
        check_inputs: one device sync validating offsets, modes, ``unique_rows``, ``inverse``
            (range, coverage, consistency with ``rows``) and ``order``'s sortedness.
        tile_elems, max_block_d, num_warps: kernel tile tuning.

    Returns:
        ``SparseGrad(unique_rows without -1, fp32 [U', dim], is_coalesced=True)``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or inconsistent indices.
    """
    what = "pooled_lookup_backward"
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{what}: grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    device = grad_out.device
    rows, offsets, modes, modes_checked, weights, num_keys, num_bags = _check_bags(
        what, device, rows, offsets, batch_size, modes, weights
    )
    if grad_out.dim() != 3 or tuple(grad_out.shape[:2]) != (batch_size, num_keys):
        raise ValueError(
            f"{what}: grad_out must have shape [B, K, dim] = [{batch_size}, {num_keys}, dim], "
            f"got {tuple(grad_out.shape)}"
        )
    if grad_out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: grad_out must be a float tensor, got {grad_out.dtype}")
    dim = grad_out.shape[2]
    if dim == 0:
        raise ValueError(f"{what}: grad_out has zero columns")
    if grad_out.stride(2) != 1 and dim > 1:
        grad_out = grad_out.contiguous()
    unique_rows = _check_int_tensor(what, "unique_rows", unique_rows, device)
    inverse = _check_int_tensor(what, "inverse", inverse, device)
    n, num_unique = rows.numel(), unique_rows.numel()
    if inverse.numel() != n:
        raise ValueError(f"{what}: inverse has {inverse.numel()} entries but rows has {n}")
    if order is not None:
        order = _check_int_tensor(what, "order", order, device)
        if order.numel() != n:
            raise ValueError(f"{what}: order has {order.numel()} entries but rows has {n}")
    triton_path = use_triton(grad_out, rows, inverse, op=what)

    if check_inputs or (num_unique and leading_invalid is None):
        flags: list[torch.Tensor] = []
        names: list[str] = []
        if check_inputs:
            flags = _layout_checks(rows, offsets, modes, modes_checked)
            names = _LAYOUT_NAMES[: len(flags)]
            more = _index_checks(rows, unique_rows, inverse, order)
            flags += [f for f, _ in more]
            names += [m for _, m in more]
        # The last entry reads unique_rows[0] (is it the -1 "row"?) in the same sync.
        head = unique_rows[:1].to(torch.int64) if num_unique else torch.zeros(1, device=device)
        host = torch.stack([f.to(torch.int64) for f in flags] + [head[0]]).tolist()
        _raise_layout(what, names, host[:-1])
        leading_invalid = bool(num_unique) and host[-1] == -1
    first = 1 if (num_unique and leading_invalid) else 0

    if not triton_path:
        return pooled_lookup_backward_reference(
            grad_out, rows, offsets, batch_size, modes, weights, unique_rows, inverse
        )
    unique_rows = unique_rows.to(torch.int64)
    if n == 0 or num_unique == 0:
        values = torch.zeros((num_unique - first, dim), dtype=torch.float32, device=device)
        return SparseGrad(unique_rows[first:], values, is_coalesced=True)

    if order is None:
        # int32 keys halve the radix-sort passes of int64 ones (torch sorts every bit).
        keys = inverse.to(torch.int32) if num_unique <= _INT32_MAX else inverse
        sorted_seg, order = torch.sort(keys, stable=True)
    else:
        sorted_seg = inverse.index_select(0, order)
    # repeat_interleave(lengths) *is* the bag of each id: one int64 write, no sync.
    values = lookup_grad_sums(
        order,
        sorted_seg,
        num_unique,
        None,
        dim,
        grad_pooled=grad_out,
        bag_of=torch.repeat_interleave(bag_lengths(offsets), output_size=n),
        bag_scale=bag_scale(offsets, modes, batch_size),
        weights=weights,
        batch_size=batch_size,
        n_pooled=n,
        min_seg=first,
        tile_elems=tile_elems or POOLING_BACKWARD_DEFAULTS["tile_elems"],
        max_block_d=max_block_d or POOLING_BACKWARD_DEFAULTS["max_block_d"],
        num_warps=num_warps,  # None: lookup_grad_sums picks by tile (no spills)
    )
    return SparseGrad(unique_rows[first:], values[first:], is_coalesced=True)
