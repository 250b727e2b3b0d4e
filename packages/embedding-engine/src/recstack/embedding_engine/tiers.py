"""Tiered tables: rows in GPU memory up to a budget, the rest in pinned host memory.

A dynamic table with ``TableConfig(hbm_budget=...)`` keeps the first pages of its value
store (and of every optimizer slot on it) in GPU memory and the others in pinned host
memory (``PagedTensor.place_pages``). Kernels reach host rows through the same page table
(CUDA maps pinned memory into the GPU's address space), so every lookup, gradient and
optimizer update is correct wherever a row sits; host rows are only slower to reach.

**Two row numbers.** The hash table hands out *logical* rows, which never move (row
metadata, eviction and checkpoints keep to them). :class:`RowTiers` maps each logical row
to a *physical* slot of the value store (``loc``) and back (``owner``): slots below
:attr:`RowTiers.device_rows` are in GPU memory. Everything that reads or writes values
(lookups, gradients, optimizers, state export) uses physical slots; the map is applied
once per batch, after the hash table's lookup.

**Promotion.** :meth:`RowTiers.promote` brings the rows a batch is about to read into the
GPU tier: each such row in host memory swaps slots with a GPU row that is neither wanted
now nor in flight, the least recently (or, with an ``lfu`` eviction policy, least
frequently) seen of a few candidate GPU slots its own, taken from a window that moves round
the tier like a clock hand (sampled LRU). The plan is three kernels and a cumulative sum,
with no sort and no host sync (:mod:`recstack.embedding_engine.kernels.tier_moves`);
values and optimizer slots swap in one kernel per store, and the moves are
announced (``PagedTensor.rows_moved``) so gradients that sparse optimizers hold follow
their rows. A training forward promotes its own batch's rows (on demand); given the next
batch ahead (``EmbeddingCollection.prefetch``, which the Trainer calls with
``pipeline="ids"``), the forward finds them promoted already.

**In flight.** Each training forward stamps the slots it read; until its backward has run,
slots with its stamp or a later one never move, whether to make room or to be promoted
(a batch being trained while the next one is prefetched keeps its rows where its backward
will look for them). At most the latest eight such forwards are kept in flight; a backward
whose forward was given up on, or run a second time after a promotion, raises instead of
updating the wrong rows.

**A budget smaller than a batch.** Promotion stops when no GPU slot is free to take; the
rows left in host memory are read and updated there, in place (slower, never wrong). The
collection's :meth:`~recstack.embedding_engine.EmbeddingCollection.tier_stats` reports the
share of lookups served from the GPU tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recstack.core import PagedTensor
from recstack.embedding_engine.eviction import RowMetadata
from recstack.embedding_engine.hbm_budget import ROW_OVERHEAD_BYTES, budget_bytes
from recstack.embedding_engine.kernels.tier_moves import plan_promotion, tier_slots

__all__ = ["RowTiers", "TierStats", "tier_page_rows"]

# The clock hand passes at least this many GPU slots per promotion (and four per row it
# must place), shared out among the rows to place, at most _MAX_GROUP each.
_MIN_WINDOW = 8192
_MIN_GROUP = 4
_MAX_GROUP = 16
# Promotions claim slots with keys token * 2**32 + position (int64).
_MAX_TOKEN = 1 << 30
# A promotion makes pairs for at least this many rows.
_MIN_PAIRS = 1024
# Training forwards kept in flight at most (their slots never move).
_MAX_PENDING = 8


def tier_page_rows(budget: int | str, dim: int, itemsize: int, page_rows: int) -> int:
    """The page size of a tiered table: at most ``page_rows``, and small enough that whole
    pages fill the budget to within an eighth.

    Args:
        budget: the table's ``hbm_budget``.
        dim: its row width.
        itemsize: its element size (a byte budget is turned into rows with the values
            alone here; optimizer slots only make pages finer still).
        page_rows: the collection's page size (a power of two).
    """
    nbytes = budget_bytes(budget)
    rows = budget if nbytes is None else nbytes // (dim * itemsize + ROW_OVERHEAD_BYTES)
    assert isinstance(rows, int)
    target = max(rows // 8, 1)
    return min(page_rows, 1 << (target.bit_length() - 1))


@dataclass
class TierStats:
    """What a tiered table did since it was made (or :meth:`RowTiers.reset_stats`).

    Attributes:
        device_rows: rows the GPU tier holds.
        rows: rows allocated in all.
        lookups: unique rows training forwards read that the table held before (new
            ids' rows are made then, and not counted).
        device_hits: how many of those were in the GPU tier when the forward asked.
        promoted: rows moved to the GPU tier (as many moved out).
        host_bytes: bytes moved between the tiers (values and optimizer slots, both ways).
    """

    device_rows: int
    rows: int
    lookups: int
    device_hits: int
    promoted: int
    host_bytes: int

    @property
    def hit_rate(self) -> float:
        """Share of looked-up rows found in the GPU tier (1.0 before any lookup)."""
        return self.device_hits / self.lookups if self.lookups else 1.0


class RowTiers:
    """The logical-row to physical-slot map of one tiered physical table, and its moves.

    Args:
        name: the physical table's name (for messages).
        values: its value store (optimizer slots are its companions).
        meta: its row metadata (by logical row), whose last-seen steps and hit counts pick
            the rows to demote.
        budget: the ``hbm_budget`` (rows, or a size string).
        policy: ``"lru"`` or ``"lfu"``: which score picks rows to demote.

    Attributes:
        loc: int64, the slot of each logical row.
        owner: int64, the logical row in each slot (the inverse of ``loc``).
        hold: int64 per slot, the claim of the promotion that last wanted it (its token
            times 2**32, plus a position): slots the current promotion claims are not
            demoted by it.
        stamp: int64 per slot, the training forward that last read it (slots of forwards
            whose backward is pending never move).
    """

    def __init__(
        self, name: str, values: PagedTensor, meta: RowMetadata, budget: int | str, policy: str
    ) -> None:
        self.name = name
        self.values = values
        self.meta = meta
        self.budget = budget
        self.policy = policy
        device = values.device
        self.loc = torch.empty(0, dtype=torch.int64, device=device)
        self.owner = torch.empty(0, dtype=torch.int64, device=device)
        self.hold = torch.empty(0, dtype=torch.int64, device=device)
        # The stamp of the latest training forward that read each slot.
        self.stamp = torch.empty(0, dtype=torch.int64, device=device)
        self._token = 0
        self._hand = 0
        self._row_bytes = -1
        # Training forwards whose backward has not run (by stamp, oldest first): their
        # slots never move. Past _MAX_PENDING the oldest is given up on.
        self._pending: dict[int, None] = {}
        # Promotions so far, and how many had run when a stamp left _pending: a backward
        # of a stamp no longer pending is safe only if no promotion ran since.
        self._promotions = 0
        self._left: dict[int, int] = {}
        # Lookups, GPU-tier hits and promotions, counted on the device.
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)
        # How many wanted rows the last promotion found in host memory (an estimate).
        self._host_estimate = _MIN_PAIRS
        self._host_seen: torch.Tensor | None = None
        self._host_seen_event: torch.cuda.Event | None = None
        self._host_pending = False
        self.place()

    # ---------------------------------------------------------------- placement
    @property
    def device_rows(self) -> int:
        """Slots below this live in GPU memory."""
        rows = self.values.device_rows
        return self.values.capacity if rows is None else rows

    def row_bytes(self) -> int:
        """Bytes one row takes: values, every optimizer slot on them, and bookkeeping."""
        stores = [self.values, *(c.store for c in self.values.companions.values())]
        per_row = sum(s.dim * s.dtype.itemsize for s in stores)
        return per_row + ROW_OVERHEAD_BYTES

    def place(self) -> None:
        """Keep as many pages in GPU memory as the budget allows, given the optimizer
        slots registered now (a byte budget shrinks when an optimizer adds slots)."""
        row_bytes = self.row_bytes()
        if row_bytes == self._row_bytes:
            return
        self._row_bytes = row_bytes
        nbytes = budget_bytes(self.budget)
        rows = self.budget if nbytes is None else nbytes // row_bytes
        assert isinstance(rows, int)
        pages = rows // self.values.page_rows
        if pages != self.values.device_pages:
            self.values.place_pages(pages)

    def ensure_rows(self, n: int) -> None:
        """Map logical rows up to ``n`` (new rows take the slot of their own number)."""
        have = self.loc.numel()
        if n <= have:
            return
        new = torch.arange(have, n, dtype=torch.int64, device=self.loc.device)
        self.loc = torch.cat([self.loc, new])
        self.owner = torch.cat([self.owner, new])
        self.hold = torch.cat([self.hold, torch.full_like(new, -1)])
        self.stamp = torch.cat([self.stamp, torch.full_like(new, -1)])

    def physical(self, rows: torch.Tensor, *, mark: int | None = None) -> torch.Tensor:
        """Physical slots of logical ``rows`` (``-1`` stays ``-1``); with ``mark``, a
        training forward stamped ``mark`` reads them (:meth:`begin`). One launch."""
        return tier_slots(
            rows,
            self.loc,
            device_rows=self.device_rows,
            stamp=None if mark is None else self.stamp,
            stamp_value=0 if mark is None else mark,
        )

    def move_to_(self, device: torch.device) -> None:
        """Move the maps to ``device`` (the value store moves itself)."""
        self.loc, self.owner = self.loc.to(device), self.owner.to(device)
        self.hold, self._counts = self.hold.to(device), self._counts.to(device)
        self.stamp = self.stamp.to(device)

    # ---------------------------------------------------------------- promotion
    def count(self, rows: torch.Tensor) -> None:
        """Count a training lookup of unique logical ``rows`` (``-1`` entries are ids
        without a row, not counted) and how many are in the GPU tier; no host sync."""
        tier_slots(rows, self.loc, device_rows=self.device_rows, counts=self._counts)

    def promote(self, rows: torch.Tensor, keep_from: int) -> None:
        """Bring logical ``rows`` into the GPU tier, demoting rows no one needs now.

        No host sync: a fixed number of pairs is planned on the device
        (:func:`~recstack.embedding_engine.kernels.tier_moves.plan_promotion`), and pairs
        without a row in host memory to move, or without a GPU slot free to take, are
        skipped there.

        Args:
            rows: int64 logical rows about to be read, in any order (repeats and ``-1``
                entries are ignored).
            keep_from: slots a training forward stamped at or after this step are in
                flight (their backward may not have run) and stay where they are, whether
                wanted or not (:meth:`keep_from`).
        """
        self.place()
        r = self.device_rows
        n = rows.numel()
        if not n or r == 0 or self.values.num_rows <= r:
            return  # nothing lives in host memory (known on the host)
        if self._token >= _MAX_TOKEN:  # claims are token * 2**32 in an int64: start again
            self.hold.fill_(-1)
            self._token = 0
        self._token += 1
        # Pairs for at most k rows: twice the last promotion's host rows (read back when
        # its copy has landed, never waited for), so choosing victims costs what moves,
        # not what is wanted. Rows past k stay in host memory this time (read in place).
        self._update_estimate()
        # Each gets at least _MIN_GROUP candidates, so a small tier full of rows in flight
        # still offers a few free slots to each.
        k = min(n, max(1, r // _MIN_GROUP), max(_MIN_PAIRS, 2 * self._host_estimate))
        window = min(r, max(_MIN_WINDOW, 4 * k))
        group = max(1, min(_MAX_GROUP, window // k))
        plan = plan_promotion(
            rows,
            loc=self.loc,
            owner=self.owner,
            hold=self.hold,
            stamp=self.stamp,
            score=self.meta.counts if self.policy == "lfu" else self.meta.last_seen,
            counts=self._counts,
            device_rows=r,
            keep_from=keep_from,
            token=self._token,
            hand=self._hand,
            k=k,
            group=group,
        )
        self._hand = (self._hand + k * group) % r
        self.values.swap_rows(plan.victims, plan.slots)
        self._promotions += 1
        self._note_host_rows(plan.host_rows)

    def _note_host_rows(self, count: torch.Tensor) -> None:
        """Start copying this call's host-row count to the host, without waiting."""
        if count.device.type != "cuda":
            self._host_estimate = int(count)
            return
        if self._host_seen is None:
            self._host_seen = torch.zeros(1, dtype=count.dtype, pin_memory=True)
            self._host_seen_event = torch.cuda.Event()
        self._host_seen.copy_(count.reshape(1), non_blocking=True)
        assert self._host_seen_event is not None
        self._host_seen_event.record()
        self._host_pending = True

    def _update_estimate(self) -> None:
        """Take the last count of rows in host memory, if its copy has landed."""
        event = self._host_seen_event
        if self._host_pending and event is not None and event.query():
            assert self._host_seen is not None
            self._host_estimate = int(self._host_seen[0])
            self._host_pending = False

    # ---------------------------------------------------------------- in flight
    def keep_from(self, current: int) -> int:
        """The oldest stamp whose slots must stay: the oldest training forward whose
        backward has not run, else ``current`` (what the caller is about to stamp)."""
        return min(next(iter(self._pending), current), current)

    def begin(self, stamp: int) -> None:
        """A training forward whose backward is to come read slots stamped ``stamp``."""
        self._pending[stamp] = None
        while len(self._pending) > _MAX_PENDING:
            oldest = next(iter(self._pending))
            self.finish(oldest)

    def finish(self, stamp: int) -> None:
        """The backward of the forward stamped ``stamp`` ran (its slots may move now)."""
        if self._pending.pop(stamp, 0) is None:
            self._left[stamp] = self._promotions
            for old in [s for s in self._left if s < stamp - 4 * _MAX_PENDING]:
                del self._left[old]

    def check_unmoved(self, stamp: int) -> None:
        """Raise if slots the training forward stamped ``stamp`` read may have moved.

        Raises:
            RuntimeError: that forward was no longer in flight (its backward ran, or more
                than a few forwards came after it) when a promotion ran.
        """
        if stamp in self._pending or self._left.get(stamp) == self._promotions:
            return
        raise RuntimeError(
            f"EmbeddingCollection: table {self.name!r} is tiered (hbm_budget) and may have "
            "moved the rows of the forward this backward belongs to: a tiered table keeps "
            f"in place the rows of the latest {_MAX_PENDING} training forwards whose "
            "backward has not run (and a backward run twice over a promotion is refused). "
            "Call backward before more training forwards pile up"
        )

    # ---------------------------------------------------------------- stats
    def stats(self) -> TierStats:
        """What this table did since it was made (one host sync)."""
        lookups, hits, promoted = self._counts.tolist()
        payload = self.row_bytes() - ROW_OVERHEAD_BYTES
        return TierStats(
            device_rows=min(self.device_rows, self.values.num_rows),
            rows=self.values.num_rows,
            lookups=lookups,
            device_hits=hits,
            promoted=promoted,
            host_bytes=2 * promoted * payload,
        )

    def reset_stats(self) -> None:
        """Start the counts of :meth:`stats` again."""
        self._counts.zero_()
