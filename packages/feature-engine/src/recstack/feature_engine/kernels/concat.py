"""Concatenate many 1-D tensors in one launch through a pointer table.

``concat_1d(tensors)`` is ``torch.cat`` for 1-D tensors (with an optional on-the-fly cast),
but on the Triton path it costs one kernel launch and one small host-to-device copy however
many inputs there are: the host builds one int64 table holding, per input, its data pointer,
its output offset (prefix sums of the numels, known on the host: no device sync), its stride
and its dtype code, plus the prefix sums of each input's number of ``BLOCK``-sized tiles.

Kernel layout (bandwidth-bound): the grid has one program per output tile, tiles never
straddle two inputs. A program finds its input with one scalar binary search over the tile
prefix sums (tiles of an empty input are zero, so it lands on the next non-empty one), then
moves one contiguous, masked tile. This beats a per-element search (one search per tile,
not per element) and a dense ``(input, tile)`` grid (no idle programs when one input is
much longer than the rest: 1 input of 10M elements and 200 of 8192 both keep every
program busy).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON

__all__ = ["CONCAT_DTYPES", "concat_1d", "concat_1d_reference"]

#: The dtypes ``concat_1d`` reads and writes, and the codes the kernel's table stores.
CONCAT_DTYPES: dict[torch.dtype, int] = {
    torch.int64: 0,
    torch.int32: 1,
    torch.uint8: 2,
    torch.float32: 3,
    torch.float64: 4,
}

_BLOCK = 2048
_NUM_WARPS = 4
# The table has five sections of ``n + 1`` int64 entries each: tile starts (prefix sums),
# output offsets (prefix sums), data pointers, strides, dtype codes.


if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.feature_engine.kernels.device import last_le, load_as

    @triton.jit(do_not_specialize=["n_inputs"])
    def _concat_kernel(
        table_ptr,
        out_ptr,
        n_inputs,
        SRC_KIND: tl.constexpr,
        UNIT_STRIDE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        sec = n_inputs.to(tl.int64) + 1
        i = last_le(table_ptr, pid, pid * 0, n_inputs.to(tl.int64))
        tile0 = tl.load(table_ptr + i)
        out0 = tl.load(table_ptr + sec + i)
        numel = tl.load(table_ptr + sec + i + 1) - out0
        addr = tl.load(table_ptr + 2 * sec + i)
        local = (pid - tile0) * BLOCK + tl.arange(0, BLOCK)
        mask = local < numel
        if UNIT_STRIDE:  # noqa: SIM108  (a constexpr branch: the stride load compiles away)
            src = local
        else:
            src = local * tl.load(table_ptr + 3 * sec + i)
        out_ty = out_ptr.dtype.element_ty
        if SRC_KIND >= 0:
            x = load_as(addr, src, mask, SRC_KIND, ALIGNED).to(out_ty)
        else:
            # Mixed input dtypes: the branch is uniform per program (one input per tile).
            kind = tl.load(table_ptr + 4 * sec + i)
            x = tl.zeros([BLOCK], dtype=out_ty)
            if kind == 0:
                x = load_as(addr, src, mask, 0, ALIGNED).to(out_ty)
            elif kind == 1:
                x = load_as(addr, src, mask, 1, ALIGNED).to(out_ty)
            elif kind == 2:
                x = load_as(addr, src, mask, 2, ALIGNED).to(out_ty)
            elif kind == 3:
                x = load_as(addr, src, mask, 3, ALIGNED).to(out_ty)
            else:
                x = load_as(addr, src, mask, 4, ALIGNED).to(out_ty)
        tl.store(out_ptr + out0 + local, x, mask=mask)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtype(dtype: object, what: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"concat_1d: {what} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in CONCAT_DTYPES:
        supported = ", ".join(_dtype_name(d) for d in CONCAT_DTYPES)
        raise TypeError(f"concat_1d: {what} {_dtype_name(dtype)} is not supported; use {supported}")
    return dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    # ``cuda`` without an index means the current device: match it to any index.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_inputs(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype | None, device: object
) -> tuple[list[torch.Tensor], torch.dtype, torch.device]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError("concat_1d: tensors must be a sequence of 1-D tensors, not one tensor")
    items = list(tensors)
    if dtype is not None:
        dtype = _check_dtype(dtype, "dtype")
    want_device = torch.device(device) if device is not None else None
    if not items:
        if dtype is None:
            raise ValueError(
                "concat_1d: the list of tensors is empty, so the output dtype is unknown; "
                "pass dtype="
            )
        return items, dtype, want_device or torch.device("cpu")
    first = items[0]
    dev = None
    dtypes: set[torch.dtype] = set()
    for k, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"concat_1d: tensors[{k}] must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() != 1:
            raise ValueError(f"concat_1d: tensors[{k}] must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype not in CONCAT_DTYPES:
            _check_dtype(t.dtype, f"tensors[{k}] dtype")
        dtypes.add(t.dtype)
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(
                f"concat_1d: tensors[{k}] is on {t.device} but tensors[0] is on {first.device}"
            )
    if want_device is not None and not _same_device(want_device, dev):
        raise ValueError(f"concat_1d: device={want_device} but the tensors are on {dev}")
    if dtype is None:
        if len(dtypes) > 1:
            names = ", ".join(sorted(_dtype_name(d) for d in dtypes))
            raise TypeError(
                f"concat_1d: the tensors have mixed dtypes ({names}); pass dtype= to cast them"
            )
        dtype = first.dtype
    return items, dtype, dev


def concat_1d_reference(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Torch reference of :func:`concat_1d`: ``torch.cat`` with each input cast to ``dtype``."""
    if not tensors:
        return torch.empty(0, dtype=dtype)
    src = tensors[0].dtype
    if all(t.dtype == src for t in tensors):
        if src == dtype:
            return torch.cat(list(tensors))
        if torch.can_cast(src, dtype):
            # One pass: torch.cat converts while it copies into a wider/same-kind output.
            n = sum(t.numel() for t in tensors)
            out = torch.empty(n, dtype=dtype, device=tensors[0].device)
            return torch.cat(list(tensors), out=out)
        return torch.cat(list(tensors)).to(dtype)
    # Cast each input on its own: torch.cat would promote mixed inputs to a common dtype
    # first (int32 + float32 -> float32), which can round before the final cast.
    return torch.cat([t.to(dtype) for t in tensors])


def concat_1d(
    tensors: Sequence[torch.Tensor],
    dtype: torch.dtype | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Concatenate 1-D tensors into one new tensor, cast to ``dtype`` on the fly if given.

    Supported dtypes (inputs and output): int64, int32, uint8, float32, float64. Without
    ``dtype`` every input must have the same dtype; with it, inputs may mix dtypes and each
    is converted as ``Tensor.to(dtype)`` would (int64 -> int32 wraps, float -> int
    truncates). An empty list needs ``dtype`` and returns an empty tensor on ``device``
    (default CPU); ``device``, when given with inputs, must be theirs. Inputs may be
    strided 1-D views (the kernel reads through each input's stride; no copy is made).

    On the Triton path this is one kernel launch whatever the number of inputs, plus one
    host-to-device copy of the pointer table; no device sync. The inputs are referenced
    until the launch has been queued, and on CUDA the launch is ordered on the current
    stream like any torch op, so callers may drop their inputs afterwards without a sync
    (the caching allocator only reuses their memory for later work on the same stream).

    Examples:
        >>> import torch
        >>> concat_1d([torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3])],
        ...           dtype=torch.int64).tolist()
        [1, 2, 3]
    """
    items, out_dtype, dev = _check_inputs(tensors, dtype, device)
    if not items:
        return torch.empty(0, dtype=out_dtype, device=dev)
    if not kernels.use_triton(*items, op="concat_1d"):
        kernels.record_launch("concat_1d_reference")
        return concat_1d_reference(items, out_dtype)
    numels = [t.numel() for t in items]
    offsets = [0, *itertools.accumulate(numels)]
    out = torch.empty(offsets[-1], dtype=out_dtype, device=dev)
    if offsets[-1] == 0:
        return out
    tiles = [0, *itertools.accumulate(-(-m // _BLOCK) for m in numels)]
    ptrs = [t.data_ptr() for t in items]
    # A length-0/1 input reads at most element 0, so its stride does not matter.
    strides = [t.stride(0) if m > 1 else 1 for t, m in zip(items, numels, strict=True)]
    kinds = [CONCAT_DTYPES[t.dtype] for t in items]
    src_kind = kinds[0] if all(k == kinds[0] for k in kinds) else -1
    aligned = all(p % 16 == 0 for p, m in zip(ptrs, numels, strict=True) if m) and all(
        s == 1 for s in strides
    )
    table = torch.tensor(
        tiles + offsets + ptrs + [0] + strides + [0] + kinds + [0], dtype=torch.int64
    )
    # From pinned memory the upload is asynchronous; a pageable one would stall the host
    # until the stream drained, once per concatenation. The caching host allocator keeps
    # the pinned block alive until the copy has run.
    pinned = dev.type == "cuda"
    table = (table.pin_memory() if pinned else table).to(dev, non_blocking=pinned)
    kernels.record_launch("concat_1d")
    _concat_kernel[(tiles[-1],)](
        table,
        out,
        len(items),
        SRC_KIND=src_kind,
        UNIT_STRIDE=all(s == 1 for s in strides),
        ALIGNED=aligned,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    # ``items`` kept every input referenced until the launch above was queued.
    return out
