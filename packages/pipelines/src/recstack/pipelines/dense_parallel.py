"""How the Trainer spreads a model's dense parameters over the ranks of a ``torchrun`` job.

* ``"ddp"``: every rank holds all of them and ``DistributedDataParallel`` averages their
  gradients (one all-reduce per bucket).
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``, ZeRO-3): every rank holds a
  ``1/W`` shard of each parameter, its gradient and its optimizer state; each block of
  the model is all-gathered just before its forward and backward and its gradients are
  reduce-scattered after. Dense memory per rank falls by ``W``, at the price of the
  gathers.

Embedding tables are not touched by either: their rows are sharded by the embedding
engine's collections and trained by the sparse optimizer. The blocks FSDP2 shards are
the largest submodules that hold dense parameters and no embedding collection; the root
is sharded last, for any parameter left outside them. A block's parameters are gathered
when its ``forward`` or another method named ``forward_*`` runs, so a model must reach a
block's weights through those (not read ``block.weight`` from a parent's code).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DenseParallel", "data_parallel", "dense_blocks", "shard_dense"]

#: ``"ddp"``: replicate the dense parameters and average their gradients;
#: ``"fsdp"``: shard them, their gradients and optimizer state over the ranks (FSDP2).
DenseParallel = Literal["ddp", "fsdp"]


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in ``DistributedDataParallel`` on ``device``, each rank keeping its own
    buffers (batch-norm statistics) between steps.

    Args:
        model: the model, on ``device``.
        device: this rank's device.
    """
    ids = [device.index] if device.type == "cuda" else None
    # Newer torch names the buffer option differently.
    params = inspect.signature(DistributedDataParallel).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{sync: False})


def dense_blocks(model: nn.Module, tables: Sequence[nn.Module]) -> list[nn.Module]:
    """The units FSDP2 shards: the largest submodules of ``model`` that hold parameters
    and no module of ``tables`` and have a ``forward`` (the members of a ``ModuleList``).

    Args:
        model: the model.
        tables: its embedding collections.
    """
    table_ids = {id(t) for t in tables}

    def holds_table(m: nn.Module) -> bool:
        return any(id(x) in table_ids for x in m.modules())

    def walk(m: nn.Module) -> Iterator[nn.Module]:
        for child in m.children():
            if id(child) in table_ids:
                continue
            # A container without a forward (ModuleList, ModuleDict) is no unit to gather
            # on a call: its members are.
            if holds_table(child) or type(child).forward is nn.Module.forward:
                yield from walk(child)
            elif next(child.parameters(), None) is not None:
                yield child

    return list(walk(model))


def _gather_in_forward_methods(module: nn.Module) -> None:
    """Make the module's other entry points (methods named ``forward_*``, such as
    ``TargetAttention.forward_padded``) gather its parameters as ``forward`` does: FSDP2
    hooks ``forward`` alone, and a shard is no weight to compute with."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in dir(type(module)):
        if name.startswith("forward_") and callable(getattr(type(module), name)):
            register_fsdp_forward_method(module, name)


def shard_dense(
    model: nn.Module,
    tables: Sequence[nn.Module],
    device: torch.device,
    world: int,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Shard ``model``'s dense parameters over ``world`` ranks with FSDP2, in place, and
    point ``optimizer``'s parameter groups at the sharded parameters.

    ``fully_shard`` replaces every parameter it shards with a new (DTensor) one, so an
    optimizer made before this call would step the old, unused tensors: its groups are
    rebound by parameter name. A model that is an ``FSDPModule`` already (sharded by the
    caller) is left as it is.

    Args:
        model: the model, on ``device``.
        tables: its embedding collections (their parameters, if any, stay unsharded).
        device: this rank's device.
        world: the number of ranks (the default process group's size).
        optimizer: the dense optimizer, or ``None``.

    Raises:
        ValueError: the optimizer already has state, or steps a parameter that is not
            the model's.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    if optimizer is not None and optimizer.state:
        raise ValueError(
            "Trainer(dense_parallel='fsdp'): the dense optimizer has state already; FSDP2 "
            "replaces the parameters it steps, so make the optimizer before its first "
            "step and load a checkpoint through the Trainer (or Checkpointer) afterwards"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        "Trainer(dense_parallel='fsdp'): the dense optimizer steps a tensor "
                        f"of shape {tuple(p.shape)} that is not a parameter of the model; "
                        "FSDP2 can only shard the model's own parameters"
                    )
    kept = {p for t in tables for p in t.parameters()}
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0 and p not in kept]
    if scalars:
        raise ValueError(
            f"Trainer(dense_parallel='fsdp'): FSDP2 cannot shard the scalar parameter(s) "
            f"{scalars}; make each a 1-D tensor of one element, or use dense_parallel='ddp'"
        )
    mesh = init_device_mesh(device.type, (world,))
    for block in dense_blocks(model, tables):
        fully_shard(block, mesh=mesh)
        _gather_in_forward_methods(block)
    fully_shard(model, mesh=mesh, ignored_params=kept or None)
    _gather_in_forward_methods(model)
    if optimizer is not None:
        now = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [now[names[id(p)]] for p in group["params"]]
