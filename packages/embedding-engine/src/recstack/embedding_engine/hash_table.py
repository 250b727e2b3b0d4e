"""``HashTable``: a growable open-addressing map from int64 keys to int64 rows, on any device.

It is the index of a dynamic embedding table: ids of any int64 value (none is reserved) map
to dense row numbers of a value store that the caller owns. A table built with
``num_tags=T`` keys its entries by ``(key, tag)``, a tag in ``[0, T)`` kept beside the key
(in spare high bits of the slot's row word), so one physical table can hold several logical
tables' ids without narrowing them or letting them collide. The table hands rows out
itself, lowest free row first (rows freed by :meth:`HashTable.erase` before never-used ones,
so an embedding table re-initializes reused rows), and :attr:`HashTable.num_rows_allocated`
says how many rows the value store needs.

Everything is deterministic: the same sequence of calls gives the same rows on CPU and GPU,
whatever order the GPU's atomics land in (see :mod:`recstack.embedding_engine.kernels.hash_table`
for the kernels, their launch counts and the torch reference the CPU runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from recstack.core.checks import check_int
from recstack.core.kernels.host import next_pow2
from recstack.embedding_engine.kernels.hash_table import (
    EMPTY,
    MAX_CAPACITY,
    MAX_TAGS,
    TOMBSTONE,
    empty_slots,
    row_limit,
    table_entries,
    table_erase,
    table_find,
    table_find_or_insert,
    table_rehash,
)

__all__ = ["EMPTY", "TOMBSTONE", "HashTable"]


class HashTable:
    """An open-addressing hash map from int64 key (and tag) to int64 row, with batched operations.

    Keys are any int64: none is reserved (the two whose bit patterns mark free and erased
    slots, :data:`EMPTY` ``-2**63`` and :data:`TOMBSTONE` ``-2**63 + 1``, are stored remapped,
    see :mod:`recstack.embedding_engine.kernels.hash_table`). With ``num_tags > 1`` an entry
    is a ``(key, tag)`` pair: every operation takes ``tags`` beside the keys (``None`` for
    tag 0, one int for all keys, or an integer tensor of the keys' shape), the same key
    under two tags is two entries, and :meth:`tagged_items` lists the tags. Rows are handed
    out by the table: an entry keeps its row until it is erased, and a new entry gets the
    lowest free row (rows freed by :meth:`erase` first, then never-used rows in increasing
    order). New entries of one batch are numbered in order of their first occurrence.

    The table grows by itself: before an insert of ``n`` keys that could push live keys plus
    tombstones plus ``n`` past ``max_load * capacity``, it rehashes into a power-of-two table
    at least twice as large (or, when erased keys' tombstones are what fills it and the live
    keys need at most half the limit, into a fresh table of the same size), keeping every
    key's row. Not thread-safe; do not call it from several threads at once.

    Args:
        capacity: initial number of slots, rounded up to a power of two (at least 1).
        device: where the slots live; operations take keys on this device.
        max_load: the fraction of slots that may be used (live keys plus tombstones) before
            the table grows, in ``(0, 1)``.
        num_tags: how many tags entries may carry, in ``[1, 2**30]``. The row word keeps
            ``1 + (num_tags - 1).bit_length()`` bits for the tag, so rows lie below
            ``2**62`` for one tag, ``2**61`` for two, ``2**60`` for up to four, ...

    Examples:
        >>> import torch
        >>> table = HashTable(16)
        >>> rows, is_new = table.find_or_insert(torch.tensor([7, -3, 7]))
        >>> rows.tolist(), is_new.tolist()
        ([0, 1, 0], [True, True, False])
        >>> table.erase(torch.tensor([7]))
        1
        >>> table.find_or_insert(torch.tensor([42]))[0].tolist()  # row 0 is reused
        [0]
        >>> table.find(torch.tensor([42, 7, -3])).tolist()
        [0, -1, 1]
        >>> merged = HashTable(16, num_tags=2)  # the same id under two tags: two rows
        >>> merged.find_or_insert(torch.tensor([5, 5, -2**63]), torch.tensor([0, 1, 1]))[0].tolist()
        [0, 1, 2]
        >>> merged.find(torch.tensor([5, -2**63]), 1).tolist()
        [1, 2]
    """

    def __init__(
        self,
        capacity: int,
        device: torch.device | str = "cpu",
        *,
        max_load: float = 0.75,
        num_tags: int = 1,
    ) -> None:
        cap = check_int(capacity, "HashTable: capacity", minimum=1, maximum=MAX_CAPACITY)
        if isinstance(max_load, bool) or not isinstance(max_load, (int, float)):
            raise TypeError(f"HashTable: max_load must be a float, got {type(max_load).__name__}")
        if not (0.0 < max_load < 1.0) or math.isnan(max_load):
            raise ValueError(
                f"HashTable: max_load must be in (0, 1), got {max_load} (linear probing needs "
                "free slots to end its probes)"
            )
        self._num_tags = check_int(num_tags, "HashTable: num_tags", minimum=1, maximum=MAX_TAGS)
        self._max_load = float(max_load)
        self._slots = empty_slots(next_pow2(cap), device)
        self._device = self._slots.device
        self._free = torch.empty(0, dtype=torch.int64, device=self._device)
        self._next_row = 0
        self._size = 0
        self._tombstones = 0

    # ------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of keys in the table."""
        return self._size

    @property
    def capacity(self) -> int:
        """Number of slots (a power of two)."""
        return self._slots.shape[0]

    @property
    def load_factor(self) -> float:
        """``len(self) / capacity``."""
        return self._size / self.capacity

    @property
    def max_load(self) -> float:
        """Fraction of slots (live keys plus tombstones) the table fills before it grows."""
        return self._max_load

    @property
    def device(self) -> torch.device:
        """The device the slots live on; keys must be on it."""
        return self._device

    @property
    def num_tags(self) -> int:
        """How many tags entries may carry (tags lie in ``[0, num_tags)``)."""
        return self._num_tags

    @property
    def max_rows(self) -> int:
        """Rows lie below this (``2**62`` for one tag; fewer bits are left with more tags)."""
        return row_limit(self._num_tags)

    @property
    def num_rows_allocated(self) -> int:
        """Rows ever handed out (the high-water mark): every row is below it.

        The caller's value store needs this many rows. Rows below it that no key holds are
        free and handed out again first.
        """
        return self._next_row

    @property
    def nbytes(self) -> int:
        """Bytes of its device tensors: the ``(key, row)`` slots and the free-row list."""
        return self._slots.nbytes + self._free.nbytes

    def __repr__(self) -> str:
        return (
            f"HashTable(len={self._size}, capacity={self.capacity}, "
            f"num_rows_allocated={self._next_row}, device={self._device})"
        )

    # ------------------------------------------------------------------------------------
    # Operations
    # ------------------------------------------------------------------------------------

    def find(
        self,
        keys: torch.Tensor,
        tags: torch.Tensor | int | None = None,
        *,
        check_keys: bool = True,
    ) -> torch.Tensor:
        """Row of each key (int64, ``keys``' shape), -1 where the key is absent.

        Args:
            keys: int64 tensor of any shape on the table's device (any int64 value).
            tags: the keys' tags: ``None`` (tag 0), one int, or an integer tensor of
                ``keys``' shape.
            check_keys: raise a ValueError for a tag outside ``[0, num_tags)`` given in a
                tensor, at the cost of one host sync. With ``False`` the call never syncs and
                such keys read as absent. (Keys need no check: none is reserved.)

        One kernel launch on the Triton path.
        """
        return table_find(self._slots, keys, tags, num_tags=self._num_tags, check_keys=check_keys)

    def find_or_insert(
        self, keys: torch.Tensor, tags: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the keys, inserting the absent ones -> ``(rows, is_new)``.

        Args:
            keys: int64 tensor of any shape on the table's device; duplicates are allowed and
                map to one row.
            tags: the keys' tags (as :meth:`find` takes them); the same key under two tags is
                two entries.

        Returns:
            ``rows``, int64 of ``keys``' shape; ``is_new``, bool of ``keys``' shape: True at
            exactly one occurrence (the first in batch order) of each entry that was not in
            the table before this call.

        Raises:
            ValueError: a tag outside ``[0, num_tags)``, or more rows than :attr:`max_rows`;
                nothing is inserted.

        Triton path: 3 launches, one ``cumsum`` and one host sync (plus one rehash launch
        and sync when the table grows).
        """
        if not isinstance(keys, torch.Tensor):
            raise TypeError(
                f"HashTable.find_or_insert: keys must be a torch.Tensor, got {type(keys).__name__}"
            )
        n = keys.numel()
        if self._next_row + max(n - self._free.numel(), 0) > self.max_rows:
            raise ValueError(
                f"HashTable.find_or_insert: {n} new keys could take rows past the "
                f"{self.max_rows} rows a table with num_tags={self._num_tags} can number"
            )
        if n and keys.dtype == torch.int64 and keys.device == self._device:
            self._make_room(n)  # keys of a wrong dtype or device fail below, ungrown
        rows, is_new, n_new = table_find_or_insert(
            self._slots, keys, self._free, self._next_row, tags, num_tags=self._num_tags
        )
        reused = min(n_new, self._free.numel())
        if reused:
            self._free = self._free[reused:]
        self._next_row += n_new - reused
        self._size += n_new
        return rows, is_new

    def erase(self, keys: torch.Tensor, tags: torch.Tensor | int | None = None) -> int:
        """Remove the keys present (absent keys are ignored); return how many were removed.

        Their rows become free and go to new keys first, lowest row first. A key repeated in
        ``keys`` is removed once. ``tags`` as :meth:`find` takes them.

        Raises:
            ValueError: a tag outside ``[0, num_tags)``; nothing is removed.

        Triton path: 1 launch, one host sync, and a sort of the free list when keys were
        removed.
        """
        self._free, n_erased = table_erase(
            self._slots, keys, self._free, tags, num_tags=self._num_tags
        )
        self._size -= n_erased
        self._tombstones += n_erased
        return n_erased

    def move_to_(self, device: torch.device | str) -> HashTable:
        """Move the slots and the free-row list to ``device``, in place; every key keeps
        its row. Both copies are made before anything changes.

        Args:
            device: where the table goes.

        Returns:
            ``self``.
        """
        slots, free = self._slots.to(device), self._free.to(device)
        self._slots, self._free, self._device = slots, free, slots.device
        return self

    def items(self, chunk_size: int = 1 << 20) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every ``(keys, rows)`` entry, in chunks of at most ``chunk_size``, by ascending row.

        The entries are gathered when this is called (one host sync), so the iterator is a
        snapshot: changing the table while iterating does not affect it. Row order makes the
        export the same on every device and reads the caller's value store in order. With
        ``num_tags > 1`` a key may appear once per tag: :meth:`tagged_items` tells them apart.
        """
        chunk = check_int(chunk_size, "HashTable.items: chunk_size", minimum=1)
        keys, _, rows = table_entries(self._slots, self._next_row, num_tags=self._num_tags)
        return _chunks(chunk, keys, rows)

    def tagged_items(
        self, chunk_size: int = 1 << 20
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every ``(keys, tags, rows)`` entry (tags int64), as :meth:`items` lists them."""
        chunk = check_int(chunk_size, "HashTable.tagged_items: chunk_size", minimum=1)
        keys, tags, rows = table_entries(self._slots, self._next_row, num_tags=self._num_tags)
        return _chunks(chunk, keys, tags, rows)

    # ------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------

    def _make_room(self, n: int) -> None:
        """Rehash first if inserting ``n`` keys could push the used slots past the limit."""
        cap = self.capacity
        limit = self._max_load
        if self._size + self._tombstones + n <= limit * cap:
            return
        need = self._size + n
        # Tombstones alone can fill a table whose live keys come and go: rebuilding at the
        # same size when the live keys need at most half the limit keeps such a table from
        # growing forever, and still leaves half the limit before the next rehash.
        new_cap = cap if need <= limit * cap / 2 else 2 * cap
        while need > limit * new_cap:
            new_cap *= 2
        if new_cap > MAX_CAPACITY:
            raise ValueError(
                f"HashTable: holding {need} keys at max_load={limit} needs more than 2**60 slots"
            )
        self._slots = table_rehash(self._slots, new_cap, num_tags=self._num_tags)
        self._tombstones = 0


def _chunks(chunk: int, *columns: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, columns[0].numel(), chunk):
        yield tuple(c[start : start + chunk] for c in columns)
