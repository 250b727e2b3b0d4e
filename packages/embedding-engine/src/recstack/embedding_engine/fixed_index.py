"""The id -> row map of a fixed-size table: row = id, every row present from the start.

A ``TableConfig(fixed_size=N)`` table is a small vocabulary: ids lie in ``[0, N)`` and index
rows directly, so it needs no hash table. :class:`FixedIndex` stands where a dynamic
physical table has its :class:`~recstack.embedding_engine.hash_table.HashTable` and offers
the same read API, so code written against the hash table (state export and import, memory
accounting, device moves) works unchanged on fixed tables.

Examples:
    >>> import torch
    >>> index = FixedIndex(4, torch.device("cpu"))
    >>> index.find(torch.tensor([3, 0, 4, -1])).tolist()  # outside [0, 4): -1
    [3, 0, -1, -1]
    >>> len(index), index.num_rows_allocated
    (4, 4)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from recstack.core.checks import check_int

__all__ = ["FixedIndex"]


class FixedIndex:
    """The id -> row map of a fixed-size table: row = id, all ``size`` rows always present.

    It offers the hash table's read API (``len``, :meth:`find`, :meth:`find_or_insert` of
    present ids, :meth:`items`, :meth:`tagged_items`, :attr:`num_rows_allocated`,
    :attr:`device`). It never inserts or erases. It holds one table: tags are accepted and
    ignored (all 0).

    Args:
        size: the number of rows (ids ``[0, size)``).
        device: where its tensors are made.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self._size = int(size)
        self._device = torch.empty(0, device=device).device

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """The number of rows, ``fixed_size``: every row exists from the start."""
        return self._size

    # The hash table's names for the same number: its slots and the rows it hands out.
    capacity = size
    num_rows_allocated = size

    @property
    def device(self) -> torch.device:
        """Where its tensors are made."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of device tensors it holds: none (row = id)."""
        return 0

    def move_to_(self, device: torch.device | str) -> FixedIndex:
        """Make its tensors on ``device`` from now on (it holds none); returns ``self``.

        Args:
            device: the new device.
        """
        self._device = torch.empty(0, device=device).device
        return self

    def __repr__(self) -> str:
        return f"FixedIndex(size={self._size}, device={self._device})"

    def find(
        self,
        keys: torch.Tensor,
        tags: torch.Tensor | int | None = None,
        *,
        check_keys: bool = True,
    ) -> torch.Tensor:
        """Rows of int64 ``keys``: the key itself, ``-1`` outside ``[0, size)``.

        Args:
            keys: the ids.
            tags: ignored (one table).
            check_keys: ignored (every int64 is a valid query).
        """
        del tags, check_keys
        keys = keys.to(torch.int64)
        inside = (keys >= 0) & (keys < self._size)
        return torch.where(inside, keys, torch.full_like(keys, -1))

    def find_or_insert(
        self, keys: torch.Tensor, tags: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, is_new)``: rows of ``keys`` (all present, so ``is_new`` is all False).

        Args:
            keys: the ids.
            tags: ignored (one table).

        Raises:
            ValueError: a key outside ``[0, size)`` (a fixed table cannot grow).
        """
        rows = self.find(keys)
        if rows.numel() and bool((rows < 0).any()):
            bad = int(keys.reshape(-1)[(rows < 0).reshape(-1)][0])
            raise ValueError(
                f"FixedIndex: id {bad} is outside the fixed-size table's range [0, {self._size})"
            )
        return rows, torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)

    def erase(self, keys: torch.Tensor, tags: torch.Tensor | int | None = None) -> int:
        """Always raises: a fixed-size table keeps all its rows.

        Args:
            keys: the ids.
            tags: ignored (one table).
        """
        raise ValueError("FixedIndex: a fixed-size table cannot erase ids (it has no eviction)")

    def items(self, chunk_size: int = 1 << 20) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(keys, rows)`` chunks by ascending row (here keys == rows).

        Args:
            chunk_size: at most this many keys per chunk (>= 1).
        """
        chunk_size = check_int(chunk_size, "FixedIndex.items: chunk_size", minimum=1)
        for start in range(0, self._size, chunk_size):
            stop = min(start + chunk_size, self._size)
            r = torch.arange(start, stop, dtype=torch.int64, device=self._device)
            yield r, r.clone()

    def tagged_items(
        self, chunk_size: int = 1 << 20
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(keys, tags, rows)`` chunks by ascending row (tags all 0).

        Args:
            chunk_size: at most this many keys per chunk (>= 1).
        """
        for keys, rows in self.items(chunk_size):
            yield keys, torch.zeros_like(keys), rows
