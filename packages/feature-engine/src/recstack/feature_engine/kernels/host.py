"""Host-side helpers every Feature Engine launcher shares: argument checks and a cache.

Each op checks its tensor arguments the same way (type, dtype, rank, one device) and
names the op and the argument in its errors. Its small parameter tables (programs,
boundary lists, id lists) are validated on the host, and :func:`cached` keeps that
result per tensor object and version (``Tensor._version``), so a table built once and
reused costs no device sync after its first call. A table changed through ordinary tensor
ops (in place is fine) is validated again; a change through ``.data`` goes unseen.

The device side (``@triton.jit`` helpers several kernels call) lives in
:mod:`recstack.feature_engine.kernels.device`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "MAX_CACHED_ANALYSES",
    "cached",
    "check_same_device",
    "check_tensor",
    "contiguous",
    "first_true",
    "nonempty",
]

#: Validation results :func:`cached` keeps before it starts over (entries of tables that
#: were freed pile up otherwise).
MAX_CACHED_ANALYSES = 256

_ANALYSES: dict[tuple[str, int], tuple[tuple[weakref.ref, ...], tuple, Any]] = {}


def cached(kind: str, tables: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
    """``compute()``, run once per ``(kind, tables)`` while the tables keep their version.

    Args:
        kind: what is computed (the op's name, with its device where the result holds
            device copies); one table may be analysed by several kinds.
        tables: the tensors the result depends on; the first one keys the cache.
        compute: the validation (or analysis) to run on a miss; it raises on bad tables.

    Returns:
        ``compute()``'s result, fresh or from an earlier call on the same tensors at the
        same versions, data pointers, devices, dtypes, shapes and strides. Inference-mode
        tensors keep no version counter: for them ``compute()`` runs every time.
    """
    try:
        sig = tuple(
            (t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())
            for t in tables
        )
    except RuntimeError:  # inference-mode tensors keep no version counter: no caching
        return compute()
    key = (kind, id(tables[0]))
    entry = _ANALYSES.get(key)
    if entry is not None:
        refs, old_sig, result = entry
        # A weakref to a dead tensor returns None, so a new tensor at a recycled id misses.
        if old_sig == sig and all(r() is t for r, t in zip(refs, tables, strict=True)):
            return result
    result = compute()
    if len(_ANALYSES) >= MAX_CACHED_ANALYSES:
        _ANALYSES.clear()
    _ANALYSES[key] = (tuple(weakref.ref(t) for t in tables), sig, result)
    return result


def check_tensor(
    x: object, name: str, op: str, dtypes: tuple[torch.dtype, ...], dim: int
) -> torch.Tensor:
    """``x``, checked to be a ``dim``-D tensor of one of ``dtypes``.

    Args:
        x: the argument given.
        name: the argument's name, for the message.
        op: the op's name, for the message.
        dtypes: the dtypes accepted.
        dim: the number of dimensions required.

    Raises:
        TypeError: ``x`` is not a tensor, or has another dtype.
        ValueError: ``x`` has another number of dimensions.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {want}, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """Raise a ``ValueError`` listing where each of ``tensors`` is unless all share a device.

    Args:
        op: the op's name, for the message.
        **tensors: the op's tensor arguments by name.
    """
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tensors``, copied to contiguous memory where it is not (kernels index flat
    memory; a contiguous tensor comes back as it is).

    Args:
        *tensors: a launcher's tensor arguments.
    """
    return tuple(t.contiguous() for t in tensors)


def first_true(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of ``mask``'s first ``True`` entry (row-major), one int per dimension.

    Args:
        mask: a boolean tensor with at least one ``True`` (a failed check's mask).
    """
    return tuple(int(v) for v in mask.nonzero()[0])


def nonempty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``, or a one-element zero tensor of ``dtype`` on its device when ``t`` is empty.

    Kernels need a real buffer for every pointer argument, even one nothing is read from.

    Args:
        t: the tensor a kernel gets as a pointer.
        dtype: the dtype of the stand-in (the kernel's element type for that pointer).
    """
    return t if t.numel() else torch.zeros(1, dtype=dtype, device=t.device)
