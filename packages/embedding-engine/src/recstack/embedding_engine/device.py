"""Moving an ``EmbeddingCollection``'s state to another device (``module.to(device)``).

The collection's state is not ``nn.Parameter``\\ s or buffers, which ``nn.Module._apply``
would convert, so :meth:`EmbeddingCollection._apply` calls :func:`move_collection_`. It
moves, in place, everything a table holds: the hash table (or a fixed table's index), the
value store with its companions (a sparse optimizer's state slots, so an optimizer built
before the move keeps training the same ``PagedTensor``\\ s), the row metadata, the
admission sketches, and the collection's own tensors (pooling modes, the stored sparse
gradients, the eviction log of delta checkpoints).

Dtype casts never reach the tables: ``model.half()`` or ``model.to(torch.bfloat16)`` leaves
every table in the dtype of its ``TableConfig`` (and ids, rows and counters in their integer
types); ``model.to("cuda", torch.bfloat16)`` moves the tables and keeps their dtype.
:func:`target_device` reads the device out of the conversion ``_apply`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from recstack.embedding_engine.collection import EmbeddingCollection

__all__ = ["move_collection_", "target_device"]

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


def move_collection_(ec: EmbeddingCollection, device: torch.device) -> None:
    """Move all of ``ec``'s state to ``device``, in place.

    If a copy fails (out of GPU memory), what had moved is moved back before the error
    propagates, so the collection is left whole on its old device.

    Args:
        ec: the collection.
        device: a CPU or CUDA device.

    Raises:
        ValueError: ``device`` is neither a CPU nor a CUDA device (the tables' kernels run
            on those only), or a value store cannot move (see ``PagedTensor.move_to_``).
    """
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the tables say
    if device.type not in _DEVICE_TYPES:
        raise ValueError(
            f"EmbeddingCollection: cannot move the tables {list(ec.physical_tables)} to "
            f"{device}: they hold their rows, ids and counters on a CPU or CUDA device only"
        )
    source = ec.device
    if device == source:
        return
    moved: list[object] = []
    try:
        for phys in ec.physical_tables.values():
            for part in (phys.values, phys.hash_table, phys.meta, *phys.sketches.values()):
                part.move_to_(device)
                moved.append(part)
    except BaseException:
        for part in reversed(moved):
            part.move_to_(source)  # type: ignore[attr-defined]
        raise
    # The collection's own tensors are small: moved after the tables, they cannot fail
    # for lack of memory where the tables fit.
    ec._modes = {name: m.to(device) for name, m in ec._modes.items()}
    ec._grads = {name: g.to(device) for name, g in ec._grads.items()}
    ec._removed = {t: [k.to(device) for k in log] for t, log in ec._removed.items()}
    ec._device = device
