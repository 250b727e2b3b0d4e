"""Where an ``EmbeddingCollection``'s backward leaves its gradients: :class:`SparseGradStore`.

The backward of a physical table's lookup reduces the output gradients into one coalesced
fp32 :class:`~recstack.core.SparseGrad` (:mod:`recstack.embedding_engine.autograd`) and
hands it to the store, which keeps one per physical table until a sparse optimizer reads it
(:meth:`SparseGradStore.read`, ``opt.step()``) or clears it (``opt.zero_grad()``). Several
backwards before the next training forward accumulate.

A training forward starts by dropping the stored gradients (:meth:`SparseGradStore.
drop_read`): it may evict ids and give their rows to new ids, so a gradient cannot carry
over it. It refuses (``RuntimeError``) while some gradient was never read or cleared, since
dropping it would silently lose a micro-batch.

With a fused optimizer (:attr:`SparseGradStore.updater`, core's
:class:`~recstack.core.RowUpdater`), the backward applies the optimizer's step itself and
stores nothing; :meth:`SparseGradStore.apply_update` does the same for a gradient that had
to be materialized first (a batch read through a compact per-batch table).

Examples:
    >>> import torch
    >>> from recstack.core import SparseGrad
    >>> store = SparseGradStore()
    >>> store.add("item", SparseGrad(torch.tensor([3]), torch.ones(1, 2)))
    >>> store.add("item", SparseGrad(torch.tensor([3]), torch.ones(1, 2)))
    >>> store.read("item").values.tolist()  # accumulated, and now marked read
    [[2.0, 2.0]]
    >>> store.drop_read()  # what a training forward does first
    >>> store.read_all()
    {}
"""

from __future__ import annotations

import torch

from recstack.core import PagedTensor, RowUpdater, SparseGrad
from recstack.core.kernels.row_update import apply_row_update, check_rows, new_gate

__all__ = ["SparseGradStore", "merge_sparse_grads"]


def merge_sparse_grads(parts: list[SparseGrad]) -> SparseGrad:
    """Sum several gradients of one table into one coalesced fp32 :class:`SparseGrad`.

    Args:
        parts: gradients of the same table (rows index the same values).
    """
    rows = torch.cat([p.rows for p in parts])
    values = torch.cat([p.values.to(torch.float32) for p in parts])
    return SparseGrad(rows, values).coalesce()


class SparseGradStore:
    """The stored gradients of a collection's physical tables, and its fused optimizer.

    Attributes:
        updater: the optimizer the backward applies itself (``fuse_optimizer``), or
            ``None``: gradients are stored.
        one_pass: with an updater, run its update inside the reduction kernel.
    """

    def __init__(self) -> None:
        self._grads: dict[str, SparseGrad] = {}
        # Physical tables whose stored gradient no one has read since a backward wrote it.
        self._unread: set[str] = set()
        self.updater: RowUpdater | None = None
        self.one_pass = False

    def add(self, name: str, grad: SparseGrad) -> None:
        """Store (accumulate) physical table ``name``'s gradient from a backward.

        Args:
            name: the physical table.
            grad: its coalesced gradient.
        """
        prev = self._grads.get(name)
        self._grads[name] = grad if prev is None else merge_sparse_grads([prev, grad])
        if grad.rows.numel():  # an empty gradient is no loss to drop
            self._unread.add(name)

    def apply_update(self, values: PagedTensor, name: str, grad: SparseGrad) -> None:
        """Apply a materialized gradient with the fused optimizer (stored when the
        optimizer does not train ``values``).

        Args:
            values: the physical table's rows.
            name: the physical table.
            grad: its coalesced gradient.
        """
        updater = self.updater
        update = None
        if updater is not None and grad.rows.numel():
            update = updater.begin_row_update(values)
        if update is None:
            self.add(name, grad)
            return
        assert updater is not None
        gate = update.gate if update.gate is not None else new_gate(grad.device)
        check_rows(gate, grad.values)
        apply_row_update(update, values, grad.rows, grad.values, gate)
        updater.end_row_update(values, gate=gate)

    def read(self, name: str) -> SparseGrad | None:
        """Physical table ``name``'s stored gradient (``None`` if none), marked read.

        Args:
            name: the physical table.
        """
        self._unread.discard(name)
        return self._grads.get(name)

    def read_all(self) -> dict[str, SparseGrad]:
        """Every stored gradient by physical table, all marked read."""
        self._unread.clear()
        return dict(self._grads)

    def clear(self, name: str) -> None:
        """Drop physical table ``name``'s stored gradient.

        Args:
            name: the physical table.
        """
        self._grads.pop(name, None)
        self._unread.discard(name)

    def clear_all(self) -> None:
        """Drop every stored gradient."""
        self._grads.clear()
        self._unread.clear()

    def drop_read(self) -> None:
        """A training forward's start: drop the stored gradients, none of them unread.

        Raises:
            RuntimeError: a stored gradient was never read or cleared.
        """
        if self._unread:
            raise RuntimeError(
                "EmbeddingCollection: a training forward started while the gradients a "
                f"backward stored for physical table(s) {sorted(self._unread)} were never "
                "read; this forward would drop them (it may evict ids and give their rows "
                "to new ids, so stored gradients cannot carry over it). Step the sparse "
                "optimizer after each backward (opt.step(); opt.zero_grad()), call "
                "opt.accumulate() after each backward to sum micro-batches into one step, "
                "or drop them with ec.zero_grad_sparse()"
            )
        self._grads.clear()

    def holds(self, name: str) -> bool:
        """Whether a gradient of physical table ``name`` is stored now."""
        return name in self._grads

    def move_rows(self, name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Physical table ``name``'s rows ``src`` moved to ``dst`` (a tiered table's
        promotion): its stored gradient follows them.

        Args:
            name: the physical table.
            src: int64 ``[n]`` rows that moved (as ``PagedTensor.rows_moved`` says).
            dst: int64 ``[n]``, where each went.
        """
        g = self._grads.get(name)
        if g is not None:
            self._grads[name] = g.moved(src, dst)

    def move_to_(self, device: torch.device) -> None:
        """Move the stored gradients to ``device``.

        Args:
            device: where the collection's tables now live.
        """
        self._grads = {name: g.to(device) for name, g in self._grads.items()}
