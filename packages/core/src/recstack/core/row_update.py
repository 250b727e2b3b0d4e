"""An optimizer's row update as data, so a kernel in one package applies another's optimizer.

Sparse optimizers (``recstack.sparse_optim``) and the embedding engine do not import each
other. To apply an optimizer step *inside* the embedding backward (no ``SparseGrad`` is
materialized), the optimizer describes one step of one table as a :class:`RowUpdate`: a
``@triton.jit`` *tile function* with its scalars and state slots, plus a torch fallback.
Its kernels are in :mod:`recstack.core.kernels.row_update`:
:func:`~recstack.core.kernels.row_update.apply_row_update` runs it over a coalesced
gradient, and a fused backward kernel calls the same tile function through
``tl_apply_row_update`` on the row sums it has just reduced.

A party that can apply its updates this way speaks :class:`RowUpdater`.

The tile function's calling convention (every argument positional)::

    tile_fn(w, g, mask, row_ok, cols, s0, s1, s2, lr, p1, p2, p3, p4, p5, p6,
            VARIANT, FLAG_A, FLAG_B, FLAG_C) -> new w

``w`` and ``g`` are fp32 ``[R, C]`` tiles of the weight rows and their summed gradients,
``mask`` the tile's valid elements, ``row_ok`` the valid rows ``[R]``, ``cols`` the column
indices ``[C]``; ``s0``, ``s1``, ``s2`` are ``[R]`` fp32 pointers to each row's start in
the update's state slots (add ``cols`` for a full-width slot, use as is for a one-wide
per-row slot); the function loads and stores its state itself and returns the new weight
tile (fp32), which the caller rounds and stores. ``VARIANT`` and the flags are the
update's constexpr choices. When :attr:`RowUpdate.whole_rows` is set, every call sees all
of a row's columns at once (per-row state, row-wise reductions).

Per-row state is a ``[R]`` tensor, and on a GPU several threads of the program hold each
row's copy: a read-modify-write of it must load, then ``tl.debug_barrier()``, then store,
or a thread could read the value another thread has already updated. (Full-width state
needs no barrier: each element's store comes from the thread whose load it follows.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from recstack.core.paged import PagedTensor

__all__ = ["RowUpdate", "RowUpdater"]


@dataclass(frozen=True)
class RowUpdate:
    """One optimizer step of one table's rows, as kernels in any package can apply it.

    Attributes:
        name: who made it, for errors and launch counts (e.g. ``"SparseAdam"``).
        tile_fn: the ``@triton.jit`` tile function (see the module docs for its signature).
        reference: ``reference(rows, grad)`` applies the same step with torch to the
            ``[U]`` unique ``rows`` and their fp32 ``[U, dim]`` summed gradient: the CPU
            path and the reference the kernels are tested against.
        lr: the step's learning rate.
        params: up to six fp32 scalars, meaning set by ``tile_fn``.
        variant: constexpr int the tile function branches on (e.g. which optimizer).
        flags: up to three constexpr booleans.
        slots: up to three fp32 state ``PagedTensor``s, row-aligned with the table (full
            width, or one wide for per-row state).
        whole_rows: every tile must hold whole rows (per-row state or row reductions).
        gate: the int32 ``[out_of_range, nonfinite]`` device flags (core's ``new_gate``)
            the caller's checks set and its launches obey, handed back to
            :meth:`RowUpdater.end_row_update`; ``None``: the caller makes a fresh one.
            An updater that gives its own gate can chain steps (a step queued behind an
            unread bad one writes nothing) and read it when it likes.
    """

    name: str
    tile_fn: Any
    reference: Callable[[torch.Tensor, torch.Tensor], None]
    lr: float
    params: tuple[float, ...] = ()
    variant: int = 0
    flags: tuple[bool, ...] = ()
    slots: tuple[PagedTensor, ...] = field(default=())
    whole_rows: bool = False
    gate: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.params) > 6 or len(self.flags) > 3 or len(self.slots) > 3:
            raise ValueError(
                f"RowUpdate {self.name!r}: at most 6 params, 3 flags and 3 slots, got "
                f"{len(self.params)}, {len(self.flags)} and {len(self.slots)}"
            )
        for s in self.slots:
            if s.dtype != torch.float32:
                raise ValueError(f"RowUpdate {self.name!r}: slot {s.name!r} is {s.dtype}, not fp32")
        g = self.gate
        if g is not None and (g.dtype != torch.int32 or tuple(g.shape) != (2,)):
            raise ValueError(
                f"RowUpdate {self.name!r}: gate must be an int32 tensor of shape (2,) "
                f"(core's new_gate), got {g.dtype} {tuple(g.shape)}"
            )


@runtime_checkable
class RowUpdater(Protocol):
    """Something that trains tables by :class:`RowUpdate`s applied where the gradient is made.

    A fused backward (the embedding engine's) calls, for each table it reduces a gradient
    of, :meth:`begin_row_update` before its kernels and :meth:`end_row_update` after them.
    """

    def begin_row_update(self, table: PagedTensor) -> RowUpdate | None:
        """This step's update of ``table`` (its state grown to the table's rows), or
        ``None`` when this updater does not train ``table``."""
        ...

    def end_row_update(self, table: PagedTensor, *, gate: torch.Tensor) -> None:
        """The update of ``table`` is queued; ``gate`` holds its checks' flags (the
        update's own :attr:`RowUpdate.gate`, or the one the caller made). A set flag
        means nothing was written: the updater raises or counts a skipped step, when it
        reads the gate (at once, a host sync, or later)."""
        ...
