"""Dense state sharded over ranks (FSDP2's DTensor parameters and optimizer state) in
checkpoints: saved whole, loaded into whatever sharding the loading job has.

A module sharded by ``torch.distributed.fsdp.fully_shard`` returns DTensors from
``state_dict()``, each rank holding a slice; its optimizer's moments are DTensors too. A
checkpoint holds the whole tensor instead (every rank joins one all-gather per tensor,
rank 0 writes it), so it loads on any number of ranks, with or without FSDP2, and the
serving export and ``recstack-ckpt`` tools read it like any other. On load, each rank
reads the whole tensor and keeps the slice its own DTensor has: no communication.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["gather_sharded", "holds_sharded", "shard_like_module", "shard_like_optimizer"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def _map_leaves(value: Any, fn: Any) -> Any:
    """``value`` (a tree of dicts, lists and tuples) with ``fn`` applied to each leaf."""
    if isinstance(value, Mapping):
        return {k: _map_leaves(x, fn) for k, x in value.items()}
    if isinstance(value, list):
        return [_map_leaves(x, fn) for x in value]
    if isinstance(value, tuple):
        return tuple(_map_leaves(x, fn) for x in value)
    return fn(value)


def holds_sharded(value: Any) -> bool:
    """Whether ``value`` (a state dict tree) holds a DTensor.

    Args:
        value: a tree of dicts, lists and tuples.
    """
    dtensor = _dtensor_type()
    found: list[bool] = []
    if dtensor is not None:
        _map_leaves(value, lambda v: found.append(isinstance(v, dtensor)))
    return any(found)


def gather_sharded(value: Any) -> Any:
    """``value`` with every DTensor replaced by its whole tensor.

    A collective: every rank of the DTensors' mesh must call it on a tree of the same
    structure (``state_dict()`` of the same object), gathering in the same order.

    Args:
        value: a tree of dicts, lists and tuples.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return value
    return _map_leaves(value, lambda v: v.full_tensor() if isinstance(v, dtensor) else v)


def _like(whole: torch.Tensor, own: Any, dtype: torch.dtype) -> torch.Tensor:
    """``whole`` (as ``dtype``) cut to the slice ``own`` (a DTensor) holds on this rank,
    as a DTensor."""
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=own.device, dtype=dtype)
    # Every rank read the same whole tensor: no rank needs to send it (src_data_rank=None).
    return distribute_tensor(whole, own.device_mesh, own.placements, src_data_rank=None)


def shard_like_module(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (whole tensors) with each entry whose counterpart in ``module`` is a
    DTensor cut to this rank's slice, ready for ``module.load_state_dict``.

    Args:
        module: the module being loaded.
        state: its state dict as saved.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return state
    own = module.state_dict()
    out = dict(state)
    for key, value in state.items():
        mine = own.get(key)
        if isinstance(mine, dtensor) and isinstance(value, torch.Tensor):
            out[key] = _like(value, mine, mine.dtype)
    return out


def shard_like_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (an optimizer state dict of whole tensors) with each per-parameter
    tensor shaped like a DTensor parameter cut to that parameter's slice, ready for
    ``optimizer.load_state_dict``. An optimizer fresh from its constructor has no state
    to copy the sharding from: its parameters give it (their moments are sharded as they
    are).

    Args:
        optimizer: the optimizer being loaded.
        state: its state dict as saved.
    """
    dtensor = _dtensor_type()
    per_param = state.get("state")
    if dtensor is None or not isinstance(per_param, Mapping):
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out_state: dict[Any, Any] = {}
    for index, entries in per_param.items():
        i = int(index)
        param = params[i] if 0 <= i < len(params) else None
        if not isinstance(param, dtensor) or not isinstance(entries, Mapping):
            out_state[index] = entries
            continue
        out_state[index] = {
            k: _like(v, param, v.dtype)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == param.shape
            else v
            for k, v in entries.items()
        }
    return {**state, "state": out_state}
