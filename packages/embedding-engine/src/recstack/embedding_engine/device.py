"""Moving an ``EmbeddingCollection``'s tables to another device (``module.to(device)``).

The collection's state is not ``nn.Parameter``\\ s or buffers, which ``nn.Module._apply``
would convert, so :meth:`EmbeddingCollection._apply` calls :func:`move_tables_`. It moves,
in place, everything a physical table holds: the hash table (or a fixed table's index), the
value store with its companions (a sparse optimizer's state slots, so an optimizer built
before the move keeps training the same ``PagedTensor``\\ s), the row metadata, the
admission sketches and the removal logs of delta checkpoints. The collection then moves its
own small tensors (pooling modes, stored sparse gradients).

Dtype casts never reach the tables: ``model.half()`` or ``model.to(torch.bfloat16)`` leaves
every table in the dtype of its ``TableConfig`` (and ids, rows and counters in their integer
types); ``model.to("cuda", torch.bfloat16)`` moves the tables and keeps their dtype.
:func:`target_device` reads the device out of the conversion ``_apply`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from recstack.embedding_engine.physical import PhysicalTable

__all__ = ["move_tables_", "target_device"]

_DEVICE_TYPES = ("cpu", "cuda")


def target_device(fn: Callable[[torch.Tensor], object], device: torch.device) -> torch.device:
    """The device ``fn`` (a conversion ``nn.Module._apply`` applies to every tensor) sends
    a float tensor on ``device`` to; ``device`` itself when ``fn`` is no move (a dtype
    cast, ``share_memory``).

    Args:
        fn: the conversion.
        device: where the collection's tensors are now.
    """
    out = fn(torch.empty(0, dtype=torch.float32, device=device))
    if not isinstance(out, torch.Tensor):
        return device
    return out.device


def move_tables_(
    tables: Mapping[str, PhysicalTable], source: torch.device, device: torch.device | str
) -> torch.device:
    """Move all of the physical tables' state from ``source`` to ``device``, in place.

    If a copy fails (out of GPU memory), what had moved is moved back before the error
    propagates, so the tables are left whole on ``source``.

    Args:
        tables: the physical tables, by name.
        source: where they are now.
        device: a CPU or CUDA device.

    Returns:
        ``device`` with its index (``"cuda"`` -> ``cuda:0``), as the tables report it.

    Raises:
        ValueError: ``device`` is neither a CPU nor a CUDA device (the tables' kernels run
            on those only), or a value store cannot move (see ``PagedTensor.move_to_``).
    """
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the tables say
    if device.type not in _DEVICE_TYPES:
        raise ValueError(
            f"EmbeddingCollection: cannot move the tables {list(tables)} to {device}: they "
            "hold their rows, ids and counters on a CPU or CUDA device only"
        )
    if device == source:
        return device
    moved: list[object] = []
    try:
        for phys in tables.values():
            for part in (phys.values, phys.hash_table, phys.meta, *phys.sketches.values()):
                part.move_to_(device)
                moved.append(part)
    except BaseException:
        for part in reversed(moved):
            part.move_to_(source)  # type: ignore[attr-defined]
        raise
    # The removal logs and tier maps are small: moved after the tables, they cannot fail
    # for lack of memory where the tables fit.
    for phys in tables.values():
        if phys.tiers is not None:
            phys.tiers.move_to_(device)
        phys.removal_logs = {
            index: [ids.to(device) for ids in log] for index, log in phys.removal_logs.items()
        }
    return device
