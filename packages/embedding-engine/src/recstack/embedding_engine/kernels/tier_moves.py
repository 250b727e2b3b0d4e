"""A tiered table's per-batch bookkeeping in a few launches: slots, counts, promotion pairs.

A tiered table (:mod:`recstack.embedding_engine.tiers`) maps logical rows to value-store
slots (``loc``, and back, ``owner``); slots below ``r`` are in GPU memory. Two ops run on
every training batch, and both are a fixed handful of launches with no host sync, because
a step of a dynamic table is bound by the host's launches, not by the GPU:

``tier_slots``: the slots of a batch's rows, optionally counting the lookups and GPU-tier
hits (``counts[0]``, ``counts[1]``) and stamping the slots with the training forward's
number. One launch.

``plan_promotion``: which host-tier rows of a batch move to the GPU tier, and which GPU
slots they take. Three launches and a cumulative sum:

1. *Claim*: each wanted row ``rows[i]`` claims its slot with
   ``atomic_max(hold[slot], token * 2**32 + (2**31 - 1 - i))``: duplicates of a row leave the
   key of their first position, so the rows need no sort to be deduplicated, and every
   slot wanted by this promotion ends with ``hold >= token * 2**32``.
2. *Flags*: the first occurrence of a row whose slot is in host memory (``>= r``) and not
   in flight (``stamp < keep_from``) is a row to move; a cumulative sum ranks them.
3. *Pairs*: the row of rank ``e < k`` looks at its own ``S`` candidate GPU slots,
   ``(hand + e * S + s) mod r``, and takes the one neither wanted now nor in flight with the
   lowest score (the logical row's last-seen step for LRU, its count for LFU; the first
   such slot on a tie). Groups of distinct ranks are disjoint (``k * S <= r``), so no two
   rows take one slot and nothing needs a lock; a row whose candidates are all busy stays
   in host memory (read in place). The kernel rewrites ``loc`` and ``owner`` for both rows
   of each pair and writes the pairs for the value stores' swap (``-1`` where none).

The ranks come from a cumulative sum, so the outcome is the same on every run and equals
the torch reference's. This is sampled LRU (each row picks the oldest of a few candidates
on a clock hand that moves round the tier); its hit rate matched a global LRU's in the
tiered benchmark, whose misses are first sightings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recstack.core.kernels import HAS_TRITON, record_launch, use_triton
from recstack.core.kernels.host import next_pow2
from recstack.core.kernels.launch import FastKernel

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["PromotionPlan", "plan_promotion", "plan_promotion_reference", "tier_slots"]

NEVER = torch.iinfo(torch.int64).max
_FIRST = (1 << 31) - 1  # claim keys count positions down from here: the first one is largest
_BLOCK = 1024
_PAIR_BLOCK = 128
_NUM_WARPS = 4


@dataclass(frozen=True)
class PromotionPlan:
    """What :func:`plan_promotion` decided (all on the table's device).

    Attributes:
        victims: int64 ``[k]``, the GPU slot each ranked row takes (``-1``: none moves).
        slots: int64 ``[k]``, the host slot it leaves (``-1`` alike).
        host_rows: int32 ``[1]``, how many wanted rows were in host memory and free to
            move (rows past ``k`` among them stayed there).
    """

    victims: torch.Tensor
    slots: torch.Tensor
    host_rows: torch.Tensor


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n", "r", "stamp_value"])
    def _slots_kernel(
        rows_ptr,
        loc_ptr,
        stamp_ptr,
        counts_ptr,
        out_ptr,
        n,
        r,
        stamp_value,
        COUNT: tl.constexpr,
        MARK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = i < n
        row = tl.load(rows_ptr + i, mask=inb, other=-1)
        valid = inb & (row >= 0)
        slot = tl.load(loc_ptr + row, mask=valid, other=-1)
        tl.store(out_ptr + i, tl.where(valid, slot, -1), mask=inb)
        if COUNT:
            tl.atomic_add(counts_ptr, tl.sum(valid.to(tl.int64)))
            tl.atomic_add(counts_ptr + 1, tl.sum((valid & (slot < r)).to(tl.int64)))
        if MARK:
            tl.store(stamp_ptr + slot, tl.zeros_like(slot) + stamp_value, mask=valid)

    @triton.jit(do_not_specialize=["n", "claim"])
    def _claim_kernel(rows_ptr, loc_ptr, hold_ptr, n, claim, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = i < n
        row = tl.load(rows_ptr + i, mask=inb, other=-1)
        valid = inb & (row >= 0)
        slot = tl.load(loc_ptr + row, mask=valid, other=0)
        tl.atomic_max(hold_ptr + slot, claim + (2147483647 - i), mask=valid)

    @triton.jit(do_not_specialize=["n", "claim", "r", "keep_from"])
    def _flags_kernel(
        rows_ptr,
        loc_ptr,
        hold_ptr,
        stamp_ptr,
        flags_ptr,
        n,
        claim,
        r,
        keep_from,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = i < n
        row = tl.load(rows_ptr + i, mask=inb, other=-1)
        valid = inb & (row >= 0)
        slot = tl.load(loc_ptr + row, mask=valid, other=0)
        first = tl.load(hold_ptr + slot, mask=valid, other=0) == claim + (2147483647 - i)
        free = tl.load(stamp_ptr + slot, mask=valid, other=0) < keep_from
        flag = valid & first & (slot >= r) & free
        tl.store(flags_ptr + i, flag.to(tl.int32), mask=inb)

    @triton.jit(do_not_specialize=["n", "k", "S", "hand", "r", "claim", "keep_from", "never"])
    def _pairs_kernel(
        rows_ptr,
        loc_ptr,
        owner_ptr,
        hold_ptr,
        stamp_ptr,
        score_ptr,
        flags_ptr,
        ranks_ptr,
        victims_ptr,
        slots_ptr,
        counts_ptr,
        n,
        k,
        S,
        hand,
        r,
        claim,
        keep_from,
        never,
        SB: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = i < n
        flag = tl.load(flags_ptr + i, mask=inb, other=0) != 0
        rank = tl.load(ranks_ptr + i, mask=inb, other=0).to(tl.int64) - 1
        sel = inb & flag & (rank < k)
        row = tl.load(rows_ptr + i, mask=sel, other=0)
        slot = tl.load(loc_ptr + row, mask=sel, other=0)
        s = tl.arange(0, SB)
        start = hand + rank * S
        cand = (start[:, None] + s[None, :]) % r
        cm = sel[:, None] & (s < S)[None, :]
        held = tl.load(hold_ptr + cand, mask=cm, other=0)
        inflight = tl.load(stamp_ptr + cand, mask=cm, other=0)
        own = tl.load(owner_ptr + cand, mask=cm, other=0)
        score = tl.load(score_ptr + own, mask=cm, other=0)
        busy = (held >= claim) | (inflight >= keep_from) | (~cm)
        val = tl.where(busy, never, score)
        best = tl.min(val, axis=1)
        pick = tl.min(tl.where(val == best[:, None], s[None, :], SB), axis=1)
        move = sel & (best < never)
        victim = (start + pick) % r
        demoted = tl.load(owner_ptr + victim, mask=move, other=0)
        tl.store(loc_ptr + row, victim, mask=move)
        tl.store(loc_ptr + demoted, slot, mask=move)
        tl.store(owner_ptr + victim, row, mask=move)
        tl.store(owner_ptr + slot, demoted, mask=move)
        tl.store(victims_ptr + rank, victim, mask=move)
        tl.store(slots_ptr + rank, slot, mask=move)
        tl.atomic_add(counts_ptr + 2, tl.sum(move.to(tl.int64)))

    _SLOTS = FastKernel(_slots_kernel)
    _CLAIM = FastKernel(_claim_kernel)
    _FLAGS = FastKernel(_flags_kernel)
    _PAIRS = FastKernel(_pairs_kernel)


def tier_slots(
    rows: torch.Tensor,
    loc: torch.Tensor,
    *,
    device_rows: int,
    counts: torch.Tensor | None = None,
    stamp: torch.Tensor | None = None,
    stamp_value: int = 0,
) -> torch.Tensor:
    """The slots of logical ``rows`` (``-1`` stays ``-1``), counting and stamping them.

    Args:
        rows: int64 ``[n]`` logical rows, ``-1`` for none.
        loc: int64, the slot of each logical row.
        device_rows: slots below this are in GPU memory.
        counts: int64 ``[>= 2]``: given, ``counts[0]`` gains the rows and ``counts[1]``
            those in GPU memory.
        stamp: int64 per slot: given, the rows' slots are set to ``stamp_value``.
        stamp_value: the stamp.

    Returns:
        int64 ``[n]`` slots. No host sync.
    """
    n = rows.numel()
    if n == 0:
        return rows
    if not use_triton(rows, op="tier_slots"):
        record_launch("tier_slots_reference")
        valid = rows >= 0
        slots = torch.where(valid, loc[rows.clamp(min=0)], -1)
        if counts is not None:
            hits = valid & (slots < device_rows)
            counts[:2] += torch.stack([valid.sum(), hits.sum()])
        if stamp is not None:
            stamp.index_fill_(0, slots[valid], stamp_value)
        return slots
    out = torch.empty_like(rows)
    _SLOTS(
        (triton.cdiv(n, _BLOCK),),
        rows,
        loc,
        loc if stamp is None else stamp,
        loc if counts is None else counts,
        out,
        n,
        device_rows,
        stamp_value,
        counts is not None,
        stamp is not None,
        _BLOCK,
        num_warps=_NUM_WARPS,
    )
    record_launch("tier_slots")
    return out


def plan_promotion_reference(
    rows: torch.Tensor,
    *,
    loc: torch.Tensor,
    owner: torch.Tensor,
    hold: torch.Tensor,
    stamp: torch.Tensor,
    score: torch.Tensor,
    counts: torch.Tensor,
    device_rows: int,
    keep_from: int,
    token: int,
    hand: int,
    k: int,
    group: int,
) -> PromotionPlan:
    """Torch reference of :func:`plan_promotion` (the same outcome, in plain torch ops)."""
    record_launch("plan_promotion_reference")
    r, n, device = device_rows, rows.numel(), rows.device
    claim = token << 32
    i = torch.arange(n, dtype=torch.int64, device=device)
    valid = rows >= 0
    safe = rows.clamp(min=0)
    slot = loc[safe]
    keys = torch.where(valid, claim + (_FIRST - i), -1)
    hold.scatter_reduce_(0, torch.where(valid, slot, 0), keys, "amax")
    first = hold[slot] == claim + (_FIRST - i)
    flag = valid & first & (slot >= r) & (stamp[slot] < keep_from)
    ranks = torch.cumsum(flag.to(torch.int32), 0, dtype=torch.int32)
    rank = ranks - 1
    sel = flag & (rank < k)
    victims = torch.full((k,), -1, dtype=torch.int64, device=device)
    slots = torch.full_like(victims, -1)
    e = rank[sel]
    if e.numel():
        row, from_slot = safe[sel], slot[sel]
        start = hand + e * group
        cand = (start[:, None] + torch.arange(group, device=device)[None, :]) % r
        busy = (hold[cand] >= claim) | (stamp[cand] >= keep_from)
        val = torch.where(busy, NEVER, score[owner[cand]])
        best = val.min(dim=1).values
        # The first candidate with the best score (argmin's choice on ties is not promised).
        cols = torch.arange(group, device=device).expand_as(val)
        pick = torch.where(val == best[:, None], cols, group).min(dim=1).values
        move = best < NEVER
        victim = ((start + pick) % r)[move]
        row, from_slot, e = row[move], from_slot[move], e[move]
        demoted = owner[victim]
        loc[row] = victim
        loc[demoted] = from_slot
        owner[victim] = row
        owner[from_slot] = demoted
        victims[e], slots[e] = victim, from_slot
        counts[2] += move.sum()
    host_rows = ranks[-1:] if n else torch.zeros(1, dtype=torch.int32, device=device)
    return PromotionPlan(victims, slots, host_rows)


def plan_promotion(
    rows: torch.Tensor,
    *,
    loc: torch.Tensor,
    owner: torch.Tensor,
    hold: torch.Tensor,
    stamp: torch.Tensor,
    score: torch.Tensor,
    counts: torch.Tensor,
    device_rows: int,
    keep_from: int,
    token: int,
    hand: int,
    k: int,
    group: int,
) -> PromotionPlan:
    """Choose the moves that bring host-tier ``rows`` into the GPU tier, and apply them to
    the maps (the caller swaps the value stores' rows by the returned pairs).

    Args:
        rows: int64 ``[n]`` logical rows wanted, in any order, repeats allowed, ``-1``
            ignored.
        loc: int64, the slot of each logical row (rewritten for the moved rows).
        owner: int64, the logical row in each slot (rewritten alike).
        hold: int64 per slot: the claims of promotions; slots this one claims are set to at
            least ``token * 2**32``.
        stamp: int64 per slot: slots stamped ``>= keep_from`` are in flight and stay.
        score: int64 per logical row: lower leaves the GPU tier first.
        counts: int64 ``[3]``: ``counts[2]`` gains the rows moved.
        device_rows: ``r``: slots below it are in GPU memory; ``num_rows > r``.
        keep_from: the oldest stamp in flight.
        token: this promotion's number, larger than every earlier one's.
        hand: the clock hand: the first candidate slot.
        k: pairs to make at most.
        group: candidates per row (``S``); ``k * group <= r``.

    Returns:
        The pairs and the count of host rows (:class:`PromotionPlan`). No host sync.
    """
    if k * group > device_rows or k < 1 or group < 1:
        raise ValueError(
            f"plan_promotion: {k} rows x {group} candidates must fit the GPU tier's "
            f"{device_rows} slots"
        )
    n = rows.numel()
    kwargs = dict(
        loc=loc,
        owner=owner,
        hold=hold,
        stamp=stamp,
        score=score,
        counts=counts,
        device_rows=device_rows,
        keep_from=keep_from,
        token=token,
        hand=hand,
        k=k,
        group=group,
    )
    if n == 0 or not use_triton(rows, op="plan_promotion"):
        return plan_promotion_reference(rows, **kwargs)
    claim = token << 32
    grid = (triton.cdiv(n, _BLOCK),)
    _CLAIM(grid, rows, loc, hold, n, claim, _BLOCK, num_warps=_NUM_WARPS)
    flags = torch.empty(n, dtype=torch.int32, device=rows.device)
    _FLAGS(
        grid,
        rows,
        loc,
        hold,
        stamp,
        flags,
        n,
        claim,
        device_rows,
        keep_from,
        _BLOCK,
        num_warps=_NUM_WARPS,
    )
    ranks = torch.cumsum(flags, 0, dtype=torch.int32)
    pairs = torch.full((2, k), -1, dtype=torch.int64, device=rows.device)
    _PAIRS(
        (triton.cdiv(n, _PAIR_BLOCK),),
        rows,
        loc,
        owner,
        hold,
        stamp,
        score,
        flags,
        ranks,
        pairs[0],
        pairs[1],
        counts,
        n,
        k,
        group,
        hand,
        device_rows,
        claim,
        keep_from,
        NEVER,
        max(2, next_pow2(group)),
        _PAIR_BLOCK,
        num_warps=_NUM_WARPS,
    )
    record_launch("plan_promotion", 3)
    return PromotionPlan(pairs[0], pairs[1], ranks[-1:])
