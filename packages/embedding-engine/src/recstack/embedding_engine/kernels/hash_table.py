"""Open-addressing hash table kernels: int64 key -> int64 row, with linear probing.

The table is one int64 tensor ``slots [capacity, 2]`` of ``(key, row)`` pairs, interleaved so
that a probe reads one cache line; ``capacity`` is a power of two. A key's home slot is
``fmix64(key) & (capacity - 1)`` (core's :func:`~recstack.core.kernels.hash.tl_fmix64` /
:func:`~recstack.core.kernels.hash.fmix64_reference`, so both backends place keys alike) and a
probe walks ``home, home + 1, ...`` (mod ``capacity``) until it meets its key or an
:data:`EMPTY` slot. An erased key leaves a :data:`TOMBSTONE`, which probes walk past and which
inserts never reuse (:func:`table_rehash` drops them). Free slots and tombstones hold row -1.

The kernels walk that sequence a *window* at a time: a lane reads the 8 slots of an aligned
128-byte line in one go (its home's line first, from its home on), finds the first slot that
holds its key and the first EMPTY one, and only moves to the next line when the window has
neither. At load 0.75 most probes end in the first window, so a warp rarely loops.

Ops (each validates its inputs, then runs its Triton kernels or its torch reference):

* :func:`table_find`: one launch (plus a one-sync sentinel check when asked).
* :func:`table_find_or_insert`: three launches, one ``torch.cumsum`` and one host sync.

  1. *claim*: each lane probes for its key; at the window's first EMPTY slot it tries a
     64-bit ``atomic_cas(EMPTY -> key)``. A lane that wins, or that sees its own key, owns
     that slot; one that loses to another key looks on right after it. Every lane whose slot
     was claimed during this call (its row field is still negative) ``atomic_min``-s
     ``_ENC_BASE + lane`` into the row field, which leaves the key's first occurrence in
     batch order there.
  2. *first*: ``is_new[i] = row_field(slot_i) == _ENC_BASE + i``, as int64 flags, with
     ``1 << 32`` added for a lane left without a slot (a reserved key, or an unplaced one).
  3. ``torch.cumsum`` of the flags, in place: rank of each new key in batch order in the low
     32 bits (batches of more than ``2**31 - 1`` keys run in chunks), and in the last entry
     the number of new keys and of keys without a slot.
  4. *assign*: new key number ``r`` (0-based) gets ``free_rows[r]`` while the free list lasts,
     then ``next_row + r - len(free_rows)``. Its first lane writes the row into the slot; every
     lane of a new key computes the row from its first lane's rank, so no lane waits on
     another.
  5. One host sync, after all four are queued (so the GPU runs them back to back), reads
     that last entry; if some key has no slot, the claimed slots (one ``is_new`` lane each)
     are cleared before the error is raised.

  Lanes of keys already in the table take their row from the claim's window scan and touch
  the table in no later launch; only new keys' lanes read (*first*) and write (*assign*,
  first lanes only) their slot again.

  Rows therefore depend only on the call sequence, never on the order in which atomics land.
  The slot a new key takes can depend on it when several new keys of one batch compete for
  one run of slots (a GPU race); the set of occupied slots and every public result do not.
  Under ``TRITON_INTERPRET=1`` programs run one after another and lanes resolve lowest
  first, so a batch that fits one program (``_BLOCK`` keys) lands in exactly the reference's
  slots.
* :func:`table_erase`: one launch (an ``atomic_xchg`` to TOMBSTONE picks the one lane that
  erases a duplicated key, and a second exchange takes the slot's row as it resets it to -1),
  one host sync for the counts, one ``torch.sort`` merging the freed
  rows into the free list (kept ascending).
* :func:`table_rehash`: one launch re-inserting every live ``(key, row)`` into a new table.

Keys :data:`EMPTY` and :data:`TOMBSTONE` are reserved. A call that meets one raises a
ValueError naming it and leaves the table as it was (the claims or erasures its kernels made
are undone before raising).

The torch reference is vectorized over keys: a Python loop over probe *rounds* (in a round
every pending key reads its current window) in which keys aiming at the same EMPTY slot are
resolved lowest batch position (first occurrence) first, exactly as the interpreter resolves
one program.
"""

from __future__ import annotations

import operator

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import fmix64_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_fmix64

__all__ = [
    "EMPTY",
    "MAX_CAPACITY",
    "TOMBSTONE",
    "empty_slots",
    "table_erase",
    "table_erase_reference",
    "table_find",
    "table_find_or_insert",
    "table_find_or_insert_reference",
    "table_find_reference",
    "table_rehash",
    "table_rehash_reference",
]

#: Key of a slot that never held a key (``-2**63``); reserved, never a valid key.
EMPTY = -(2**63)
#: Key of a slot whose key was erased (``-2**63 + 1``); reserved, never a valid key.
TOMBSTONE = -(2**63) + 1
#: Largest number of slots a table may have (slot indices and ``2 * slot`` stay in int64).
MAX_CAPACITY = 2**60

# Row field of a slot claimed by the running find_or_insert: _ENC_BASE + its first lane.
# Rows are >= 0 and free slots hold -1, so every encoded lane (< 2**62) reads as negative.
_ENC_BASE = -(2**62)
_MAX_BATCH = 2**62 - 2
# find_or_insert packs two counts of up to n into the 32-bit halves of one int64 scan, so it
# runs batches of more keys in chunks of this many.
_CHUNK = 2**31 - 1

# Probing kernels: one warp of lanes (keys or old slots) per program, so a lane's probe
# loop never waits on another warp's longer probe.
_BLOCK = 32
_NUM_WARPS = 1
_WINDOW = 8  # slots a lane reads per probe step: 8 (key, row) pairs are one 128-byte line
# The first and assign launches only stream per-lane arrays: wide programs.
_STREAM_BLOCK = 1024
_STREAM_WARPS = 4

_NAMES = {
    "find": "HashTable.find",
    "find_or_insert": "HashTable.find_or_insert",
    "erase": "HashTable.erase",
    "rehash": "HashTable.rehash",
}


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_capacity(capacity: object, op: str) -> int:
    if isinstance(capacity, bool) or not hasattr(capacity, "__index__"):
        raise TypeError(f"{op}: capacity must be an int, got {type(capacity).__name__}")
    cap = operator.index(capacity)
    if not _is_pow2(cap) or cap > MAX_CAPACITY:
        raise ValueError(f"{op}: capacity must be a power of two in [1, 2**60], got {cap}")
    return cap


def _check_slots(slots: object, op: str) -> torch.Tensor:
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"{op}: slots must be a torch.Tensor, got {type(slots).__name__}")
    if slots.dtype != torch.int64 or slots.dim() != 2 or slots.shape[1] != 2:
        raise ValueError(
            f"{op}: slots must be an int64 [capacity, 2] table of (key, row) pairs, got "
            f"{slots.dtype} {tuple(slots.shape)}"
        )
    if not _is_pow2(slots.shape[0]):
        raise ValueError(f"{op}: the slot count must be a power of two, got {slots.shape[0]}")
    if not slots.is_contiguous():
        raise ValueError(f"{op}: slots must be contiguous (kernels update it in place)")
    return slots


def _check_keys(keys: object, slots: torch.Tensor, op: str) -> torch.Tensor:
    """``keys`` as a flat contiguous int64 tensor on the table's device."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{op}: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(
            f"{op}: keys must be int64, got {keys.dtype} (convert ids with .to(torch.int64))"
        )
    if keys.device != slots.device:
        raise ValueError(f"{op}: keys are on {keys.device} but the table is on {slots.device}")
    if keys.numel() > _MAX_BATCH:
        raise ValueError(f"{op}: a batch holds at most 2**62 - 2 keys, got {keys.numel()}")
    return keys.contiguous().view(-1)


def _check_rows(free_rows: object, slots: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(free_rows, torch.Tensor) or free_rows.dtype != torch.int64:
        raise TypeError(f"{op}: free_rows must be an int64 tensor")
    if free_rows.dim() != 1 or free_rows.device != slots.device:
        raise ValueError(
            f"{op}: free_rows must be 1-D on {slots.device}, got {tuple(free_rows.shape)} "
            f"on {free_rows.device}"
        )
    return free_rows.contiguous()


def _check_next_row(next_row: object, op: str) -> int:
    if isinstance(next_row, bool) or not hasattr(next_row, "__index__"):
        raise TypeError(f"{op}: next_row must be an int, got {type(next_row).__name__}")
    value = operator.index(next_row)
    if not 0 <= value < 2**62:
        raise ValueError(f"{op}: next_row must be in [0, 2**62), got {value}")
    return value


def _raise_sentinel(flat: torch.Tensor, op: str) -> None:
    """Raise the ValueError for the first reserved key in ``flat`` (syncs; error path only)."""
    bad = (flat <= TOMBSTONE).nonzero()
    i = int(bad[0, 0])
    value = int(flat[i])
    name, expr = ("EMPTY", "-2**63") if value == EMPTY else ("TOMBSTONE", "-2**63 + 1")
    more = f" ({bad.shape[0]} reserved keys in all)" if bad.shape[0] > 1 else ""
    raise ValueError(
        f"{op}: keys[{i}] = {value} is the reserved key {name} ({expr}){more}: the hash table "
        "marks free and erased slots with -2**63 and -2**63 + 1, so neither value can be "
        "stored or looked up; remap such ids first (e.g. hash them with recstack.core.hash64)"
    )


def _check_no_sentinel_now(flat: torch.Tensor, op: str) -> None:
    if flat.numel() and bool((flat <= TOMBSTONE).any()):
        _raise_sentinel(flat, op)


def _raise_full(op: str, lost: int) -> None:
    raise RuntimeError(
        f"{op}: {lost} keys found no free slot: the table is fuller than its max_load allows "
        "(an internal invariant broke; please report it)"
    )


def empty_slots(capacity: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A new table of ``capacity`` free slots: int64 ``[capacity, 2]`` of ``(EMPTY, -1)``."""
    cap = _check_capacity(capacity, "empty_slots")
    slots = torch.full((cap, 2), EMPTY, dtype=torch.int64, device=device)
    slots[:, 1].fill_(-1)
    return slots


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------


def _homes(keys: torch.Tensor, capacity: int) -> torch.Tensor:
    return fmix64_reference(keys) & (capacity - 1)


def _probe_find(slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Slot of each key, -1 where absent: all keys probe one slot per round."""
    cap = slots.shape[0]
    out = torch.full_like(keys, -1)
    idx = torch.arange(keys.numel(), device=keys.device)
    pos = _homes(keys, cap)
    k = keys
    key_col = slots[:, 0]
    for _ in range(cap):
        if idx.numel() == 0:
            break
        sk = key_col[pos]
        hit = sk == k
        out[idx[hit]] = pos[hit]
        go = ~hit & (sk != EMPTY)
        idx, k, pos = idx[go], k[go], (pos[go] + 1) & (cap - 1)
    return out


def _probe_insert(slots: torch.Tensor, keys: torch.Tensor, op: str) -> torch.Tensor:
    """Write distinct absent ``keys`` into EMPTY slots; return their slots.

    As the kernels do, every pending key reads a window of ``_WINDOW`` slots per round (its
    home's aligned window first, from its home on) and aims at the first EMPTY one; of the
    keys aiming at one slot the earliest in ``keys`` takes it (as one Triton program
    resolves its lanes' CAS), and the others look on right after it.
    """
    cap = slots.shape[0]
    w = _window(cap)
    dev = keys.device
    out = torch.full_like(keys, -1)
    idx = torch.arange(keys.numel(), device=dev)
    home = _homes(keys, cap)
    start = home & (w - 1)
    base = home - start
    seen = torch.zeros_like(keys)
    off = torch.arange(w, device=dev)
    key_col = slots[:, 0]
    while idx.numel():
        empty = (key_col[base[:, None] + off] == EMPTY) & (off >= start[:, None])
        fe = torch.where(empty, off, w).amin(1)
        aim = (fe < w).nonzero().squeeze(1)
        won = aim[:0]
        if aim.numel():
            tgt = (base + fe)[aim]
            # aim ascends in batch order, so a stable sort by slot puts each slot's
            # earliest claimant first.
            order = torch.argsort(tgt, stable=True)
            stgt = tgt[order]
            lead = torch.ones_like(stgt, dtype=torch.bool)
            lead[1:] = stgt[1:] != stgt[:-1]
            won = aim[order[lead]]
            key_col[stgt[lead]] = keys[idx[won]]
            out[idx[won]] = stgt[lead]
        lost = fe < w
        seen += torch.where(lost, fe + 1 - start, w - start)
        start = torch.where(lost, fe + 1, 0)
        move = ~lost | (start == w)
        base = torch.where(move, (base + w) & (cap - 1), base)
        start = torch.where(move, 0, start)
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[won] = False
        if bool((keep & (seen >= cap)).any()):
            _raise_full(op, int((keep & (seen >= cap)).sum()))
        idx, base, start, seen = idx[keep], base[keep], start[keep], seen[keep]
    return out


def table_find_reference(
    slots: torch.Tensor, keys: torch.Tensor, *, check_keys: bool = True
) -> torch.Tensor:
    """Torch reference of :func:`table_find` (any device, validated inputs)."""
    flat = keys.contiguous().view(-1)
    if check_keys:
        _check_no_sentinel_now(flat, _NAMES["find"])
    slot = _probe_find(slots, flat)
    rows = torch.where(slot >= 0, slots[:, 1][slot.clamp(min=0)], -1)
    return rows.view(keys.shape)


def table_find_or_insert_reference(
    slots: torch.Tensor, keys: torch.Tensor, free_rows: torch.Tensor, next_row: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch reference of :func:`table_find_or_insert` (any device, validated inputs)."""
    op = _NAMES["find_or_insert"]
    flat = keys.contiguous().view(-1)
    n = flat.numel()
    dev = flat.device
    _check_no_sentinel_now(flat, op)
    slot = _probe_find(slots, flat)
    is_new = torch.zeros(n, dtype=torch.bool, device=dev)
    absent = (slot < 0).nonzero().squeeze(1)
    n_new = 0
    if absent.numel():
        uniq, inv = torch.unique(flat[absent], return_inverse=True)
        first = torch.full_like(uniq, n).scatter_reduce_(0, inv, absent, "amin")
        order = torch.argsort(first)  # new keys in order of first occurrence
        n_new = uniq.numel()
        new_slot = _probe_insert(slots, uniq[order], op)
        rank = torch.arange(n_new, device=dev)
        n_free = free_rows.numel()
        fresh = next_row + rank - n_free
        if n_free:
            fresh = torch.where(rank < n_free, free_rows[rank.clamp(max=n_free - 1)], fresh)
        slots[new_slot, 1] = fresh
        rank_of = torch.empty_like(order)
        rank_of[order] = rank
        slot[absent] = new_slot[rank_of[inv]]
        is_new[first] = True
    rows = slots[:, 1][slot]
    return rows.view(keys.shape), is_new.view(torch.bool).view(keys.shape), n_new


def _merge_free(free_rows: torch.Tensor, freed: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.cat([free_rows, freed])).values


def table_erase_reference(
    slots: torch.Tensor, keys: torch.Tensor, free_rows: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Torch reference of :func:`table_erase` (any device, validated inputs)."""
    flat = keys.contiguous().view(-1)
    _check_no_sentinel_now(flat, _NAMES["erase"])
    slot = _probe_find(slots, flat)
    slot = torch.unique(slot[slot >= 0])
    freed = slots[slot, 1]
    slots[slot, 0] = TOMBSTONE
    slots[slot, 1] = -1
    if slot.numel() == 0:
        return free_rows, 0
    return _merge_free(free_rows, freed), slot.numel()


def table_rehash_reference(slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """Torch reference of :func:`table_rehash`: live keys re-inserted in old slot order."""
    new = empty_slots(capacity, slots.device)
    live = (slots[:, 0] > TOMBSTONE).nonzero().squeeze(1)
    if live.numel():
        pos = _probe_insert(new, slots[live, 0], _NAMES["rehash"])
        new[pos, 1] = slots[live, 1]
    return new


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    _EMPTY = tl.constexpr(EMPTY)
    _TOMBSTONE = tl.constexpr(TOMBSTONE)
    _ENC = tl.constexpr(_ENC_BASE)

    @triton.jit
    def _home(k, mask):
        # fmix64 is a bijection; the mask (< 2**60) clears the sign bit of the bit pattern.
        return tl_fmix64(k.to(tl.uint64, bitcast=True)).to(tl.int64, bitcast=True) & mask

    @triton.jit
    def _count(ptr, flags):
        # One atomic per program, and only when it has something to report.
        c = tl.sum(flags.to(tl.int64), axis=0)
        if c > 0:
            tl.atomic_add(ptr, c)

    @triton.jit
    def _lanes(keys_ptr, n, mask, BLOCK: tl.constexpr, W: tl.constexpr):
        """A program's lanes, their keys, and where each key's probe starts."""
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        k = tl.load(keys_ptr + lane, mask=inb, other=0)
        # EMPTY and TOMBSTONE are the two smallest int64s: reserved lanes stay inactive.
        active = inb & (k > _TOMBSTONE)
        start, base = _probe_start(k, mask, W)
        return lane, inb, k, active, start, base

    @triton.jit
    def _probe_start(k, mask, W: tl.constexpr):
        """``(start, base)``: a key's first window is the aligned line holding its home
        slot, at ``base``, read from offset ``start`` (the home slot) on."""
        home = _home(k, mask)
        start = home & (W - 1)
        return start, home - start

    @triton.jit
    def _try_claim(table_ptr, tgt, want, k, idle_ptrs):
        """``atomic_cas(EMPTY -> k)`` at slot ``tgt`` of the lanes that ``want`` it; the old key.

        atomic_cas takes no mask: the other lanes aim a no-op CAS (0 -> 0) at their
        ``idle_ptrs``, memory of their own that only this launch uses, not at the table.
        """
        ptrs = tl.where(want, table_ptr + 2 * tgt, idle_ptrs)
        return tl.atomic_cas(ptrs, tl.where(want, _EMPTY, 0), tl.where(want, k, 0), sem="relaxed")

    @triton.jit
    def _next_step(lost, past, fe, start, base, seen, mask, W: tl.constexpr):
        """Where each lane probes next -> ``(start, base, seen, active)``.

        A lane that ``lost`` its CAS at offset ``fe`` (another key took that EMPTY slot)
        looks on right after it; one whose window held neither its key nor an EMPTY slot
        (``past``) moves to the next line. A lane stops after seeing every slot once.
        """
        seen += tl.where(lost, fe + 1 - start, W - start)
        start = tl.where(lost, fe + 1, 0)
        move = past | (start == W)
        base = tl.where(move, (base + W) & mask, base)
        start = tl.where(move, 0, start)
        return start, base, seen, (lost | past) & (seen <= mask)

    @triton.jit
    def _scan_window(slots_ptr, base, start, k, active, W: tl.constexpr):
        """Scan each lane's window of slots ``base + start .. base + W - 1`` for key ``k``.

        Returns ``(fh, fe)``: the offset of the first slot holding ``k`` (``W`` if none comes
        before an EMPTY one) and the offset of the first EMPTY slot (``W`` if none comes
        before ``k``).
        """
        fh = tl.zeros_like(k) + W
        fe = tl.zeros_like(k) + W
        # One lane's window is one thread's: W independent loads of one 128-byte line in
        # flight together, and nothing shared between threads.
        for j in tl.static_range(W):
            ok = active & (start <= j)
            sk = tl.load(slots_ptr + 2 * (base + j), mask=ok, other=_TOMBSTONE)
            open_ = ok & (fh == W) & (fe == W)
            fh = tl.where(open_ & (sk == k), j, fh)
            fe = tl.where(open_ & (sk == _EMPTY), j, fe)
        return fh, fe

    @triton.jit(do_not_specialize=["n", "mask"])
    def _find_kernel(
        slots_ptr, keys_ptr, rows_ptr, stats_ptr, n, mask, BLOCK: tl.constexpr, W: tl.constexpr
    ):
        lane, inb, k, active, start, base = _lanes(keys_ptr, n, mask, BLOCK, W)
        row = tl.full([BLOCK], -1, tl.int64)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, k, active, W)
            hit = active & (fh < W)
            # The row shares the key's line, which the scan just brought in.
            row = tl.where(hit, tl.load(slots_ptr + 2 * (base + fh) + 1, mask=hit, other=-1), row)
            seen += W - start
            # Go on only past a window with neither the key nor an EMPTY slot; a full table
            # has no EMPTY slot, so stop after visiting every slot once.
            active = active & (fh == W) & (fe == W) & (seen <= mask)
            base = (base + W) & mask
            start = tl.zeros_like(start)
        tl.store(rows_ptr + lane, row, mask=inb)
        _count(stats_ptr, inb & (k <= _TOMBSTONE))

    @triton.jit(do_not_specialize=["n", "mask"])
    def _claim_kernel(
        slots_ptr,
        keys_ptr,
        slot_ptr,
        rows_ptr,
        n,
        mask,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
    ):
        lane, inb, k, active, start, base = _lanes(keys_ptr, n, mask, BLOCK, W)
        slot = tl.full([BLOCK], -1, tl.int64)
        row = tl.full([BLOCK], -1, tl.int64)  # the row of a key already in the table
        fresh = inb & (k < 0) & (k > 0)  # lanes whose slot was claimed in this call
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        idle_ptrs = slot_ptr + tl.minimum(lane, n - 1)  # each lane's own output entry
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, k, active, W)
            found = active & (fh < W)
            # A slot claimed in this call still has a negative row field (rows are written
            # by the assign launch); a key already in the table has its row (>= 0).
            at = tl.load(slots_ptr + 2 * (base + fh) + 1, mask=found, other=0)
            want = active & (fe < W)
            tgt = base + fe
            won = want & (fe < 0)
            same = won
            if tl.max(want.to(tl.int32), axis=0) > 0:
                old = _try_claim(slots_ptr, tgt, want, k, idle_ptrs)
                won = want & (old == _EMPTY)
                same = want & (old == k)  # another lane of this key claimed it first
            slot = tl.where(found, base + fh, tl.where(won | same, tgt, slot))
            fresh = fresh | won | same | (found & (at < 0))
            row = tl.where(found & (at >= 0), at, row)
            lost = want & ~won & ~same
            past = active & (fh == W) & (fe == W)
            start, base, seen, active = _next_step(lost, past, fe, start, base, seen, mask, W)
        # The lowest lane of a claimed slot is its key's first occurrence in batch order.
        tl.atomic_min(slots_ptr + 2 * slot + 1, lane + _ENC, mask=fresh, sem="relaxed")
        tl.store(slot_ptr + lane, slot, mask=inb)
        # A reserved key, or one that saw every slot and found neither itself nor an EMPTY
        # one (never below max_load), keeps slot -1: the first launch counts those.
        tl.store(rows_ptr + lane, row, mask=inb)

    @triton.jit(do_not_specialize=["n"])
    def _first_kernel(slots_ptr, slot_ptr, rows_ptr, flag_ptr, n, BLOCK: tl.constexpr):
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        s = tl.load(slot_ptr + lane, mask=inb, other=-1)
        row = tl.load(rows_ptr + lane, mask=inb, other=0)
        # Lanes of keys already in the table have their row; the others read their slot's
        # row field, which now encodes the key's first lane, and keep it for the assign.
        fresh = (s >= 0) & (row < 0)
        r = tl.load(slots_ptr + 2 * s + 1, mask=fresh, other=0)
        tl.store(rows_ptr + lane, r, mask=fresh)
        # int64 flags, scanned as they are: is_new in the low 32 bits, "no slot" (a reserved
        # or unplaced key) in the high ones, so the scan's last entry holds both counts.
        flag = (fresh & (r == lane + _ENC)).to(tl.int64) + ((s < 0).to(tl.int64) << 32)
        tl.store(flag_ptr + lane, flag, mask=inb)

    @triton.jit(do_not_specialize=["n", "n_free", "next_row"])
    def _assign_kernel(
        slots_ptr,
        slot_ptr,
        rank_ptr,
        free_ptr,
        rows_ptr,
        new_ptr,
        n,
        n_free,
        next_row,
        BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        r = tl.load(rows_ptr + lane, mask=inb, other=0)
        # Below -1: a key new in this call; r encodes its first lane, whose inclusive rank
        # (cumsum of is_new) numbers the key among the new ones. -1: a reserved key or one
        # that found no slot (the launcher raises after this launch and undoes the claims).
        pending = inb & (r < -1)
        first = r - _ENC
        rank = (tl.load(rank_ptr + first, mask=pending, other=1) & 0xFFFFFFFF) - 1
        from_free = pending & (rank < n_free)
        reused = tl.load(free_ptr + rank, mask=from_free, other=0)
        row = tl.where(from_free, reused, rank - n_free + next_row)
        tl.store(rows_ptr + lane, row, mask=pending)
        # The key's first lane writes its row into the table, once; it is the is_new lane.
        writer = pending & (first == lane)
        s = tl.load(slot_ptr + lane, mask=writer, other=0)
        tl.store(slots_ptr + 2 * s + 1, row, mask=writer)
        tl.store(new_ptr + lane, writer.to(tl.uint8), mask=inb)

    @triton.jit(do_not_specialize=["n", "mask"])
    def _erase_kernel(
        slots_ptr,
        keys_ptr,
        rows_ptr,
        slot_ptr,
        stats_ptr,
        n,
        mask,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
    ):
        lane, inb, k, active, start, base = _lanes(keys_ptr, n, mask, BLOCK, W)
        slot = tl.full([BLOCK], -1, tl.int64)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        tomb = tl.full([BLOCK], _TOMBSTONE, tl.int64)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, k, active, W)
            hit = active & (fh < W)
            # Duplicates of a key all hit its slot: the exchange that returns the key erases.
            old = tl.atomic_xchg(slots_ptr + 2 * (base + fh), tomb, mask=hit, sem="relaxed")
            slot = tl.where(hit & (old == k), base + fh, slot)
            seen += W - start
            active = active & (fh == W) & (fe == W) & (seen <= mask)
            base = (base + W) & mask
            start = tl.zeros_like(start)
        mine = slot >= 0
        # An exchange, not a load and a store: the row comes back from the same atomic
        # that frees it.
        minus_one = tl.full([BLOCK], -1, tl.int64)
        r = tl.atomic_xchg(slots_ptr + 2 * slot + 1, minus_one, mask=mine, sem="relaxed")
        tl.store(rows_ptr + lane, tl.where(mine, r, -1), mask=inb)
        tl.store(slot_ptr + lane, slot, mask=inb)
        _count(stats_ptr, inb & (k <= _TOMBSTONE))
        _count(stats_ptr + 1, mine)

    @triton.jit(do_not_specialize=["n_old", "mask"])
    def _rehash_kernel(
        old_ptr, new_ptr, stats_ptr, n_old, mask, BLOCK: tl.constexpr, W: tl.constexpr
    ):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = j < n_old
        k, row = tl.split(
            tl.load(
                old_ptr + 2 * j[:, None] + tl.arange(0, 2)[None, :],
                mask=inb[:, None],
                other=_EMPTY,
            )
        )
        active = inb & (k > _TOMBSTONE)
        start, base = _probe_start(k, mask, W)
        live = active
        placed = inb & (k < 0) & (k > 0)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        idle_ptrs = old_ptr + 2 * tl.minimum(j, n_old - 1)  # each lane's own old slot
        while tl.max(active.to(tl.int32), axis=0) > 0:
            # Keys are distinct and absent from the new table: only EMPTY slots stop a lane.
            fh, fe = _scan_window(new_ptr, base, start, k, active, W)
            want = active & (fe < W)
            tgt = base + fe
            won = want & (fe < 0)
            if tl.max(want.to(tl.int32), axis=0) > 0:
                old = _try_claim(new_ptr, tgt, want, k, idle_ptrs)
                # Keys are distinct, so a lost CAS only means another key took the slot.
                won = want & (old == _EMPTY)
                tl.store(new_ptr + 2 * tgt + 1, row, mask=won)
            placed = placed | won
            lost = want & ~won
            past = active & (fe == W)
            start, base, seen, active = _next_step(lost, past, fe, start, base, seen, mask, W)
        _count(stats_ptr, live & ~placed)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _window(capacity: int) -> int:
    return min(_WINDOW, capacity)


def _grid(n: int, block: int | None = None) -> tuple[int]:
    # Plain integer arithmetic: triton.cdiv is the language's, with constexpr unwrapping on
    # every call (~10 us of host time).
    return (-(-n // (block or _BLOCK)),)


def _undo_claims(slots: torch.Tensor, slot: torch.Tensor, is_new: torch.Tensor) -> None:
    # Each slot this call claimed has exactly one is_new lane (its key's first); an EMPTY
    # slot lies on no older key's probe path, so clearing them restores the table.
    claimed = slot[is_new.view(torch.bool) & (slot >= 0)]
    slots[claimed, 0] = EMPTY
    slots[claimed, 1] = -1


def table_find(slots: torch.Tensor, keys: torch.Tensor, *, check_keys: bool = True) -> torch.Tensor:
    """Row of each key (int64, ``keys``' shape), -1 where absent.

    Args:
        slots: the table, int64 ``[capacity, 2]``.
        keys: int64 keys of any shape on the table's device.
        check_keys: raise a ValueError for a reserved key (one host sync). With ``False``
            nothing syncs and a reserved key simply reads as absent.

    Triton path: one launch (+ a 1-element memset and one sync when checking).
    """
    op = _NAMES["find"]
    slots = _check_slots(slots, op)
    flat = _check_keys(keys, slots, op)
    if not kernels.use_triton(slots, flat, op="hash_table_find"):
        kernels.record_launch("hash_table_find_reference")
        return table_find_reference(slots, flat, check_keys=check_keys).view(keys.shape)
    n = flat.numel()
    rows = torch.empty(n, dtype=torch.int64, device=slots.device)
    if n:
        # Unchecked, the count is never read, so it needs no zeroing either.
        make = torch.zeros if check_keys else torch.empty
        stats = make(1, dtype=torch.int64, device=slots.device)
        kernels.record_launch("hash_table_find")
        _find_kernel[_grid(n)](
            slots,
            flat,
            rows,
            stats,
            n,
            slots.shape[0] - 1,
            BLOCK=_BLOCK,
            W=_window(slots.shape[0]),
            num_warps=_NUM_WARPS,
        )
        if check_keys and int(stats[0]):
            _raise_sentinel(flat, op)
    return rows.view(keys.shape)


def table_find_or_insert(
    slots: torch.Tensor, keys: torch.Tensor, free_rows: torch.Tensor, next_row: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Find every key, inserting the absent ones: ``(rows, is_new, n_new)``.

    The caller guarantees room: ``slots`` keeps at least one EMPTY slot after the new keys
    are in (the :class:`~recstack.embedding_engine.hash_table.HashTable` grows first).

    Args:
        slots: the table, int64 ``[capacity, 2]``, updated in place.
        keys: int64 keys of any shape on the table's device (duplicates allowed).
        free_rows: int64 ``[F]`` rows to hand out first (the caller keeps them ascending).
        next_row: the first never-used row, handed out after ``free_rows``.

    Returns:
        ``rows`` (int64, ``keys``' shape); ``is_new`` (bool, ``keys``' shape), True at the
        first occurrence in batch order of each key that was absent; ``n_new``, the number
        of such keys. New key number ``r`` in order of first occurrence gets
        ``free_rows[r]`` for ``r < F`` and ``next_row + r - F`` after. The caller drops
        ``min(n_new, F)`` rows from the front of its free list.

    Raises:
        ValueError: a key is EMPTY or TOMBSTONE (the table is left unchanged).

    Triton path: 3 launches (claim, first, assign), one ``torch.cumsum`` and one host sync
    after them all.
    """
    op = _NAMES["find_or_insert"]
    slots = _check_slots(slots, op)
    flat = _check_keys(keys, slots, op)
    free_rows = _check_rows(free_rows, slots, op)
    next_row = _check_next_row(next_row, op)
    if not kernels.use_triton(slots, flat, op="hash_table_find_or_insert"):
        kernels.record_launch("hash_table_find_or_insert_reference")
        rows, is_new, n_new = table_find_or_insert_reference(slots, flat, free_rows, next_row)
        return rows.view(keys.shape), is_new.view(torch.bool).view(keys.shape), n_new
    n = flat.numel()
    dev = slots.device
    if n == 0:
        empty = torch.empty(keys.shape, dtype=torch.int64, device=dev)
        return empty, torch.empty(keys.shape, dtype=torch.bool, device=dev), 0
    if n > _CHUNK:
        rows, is_new, n_new = _find_or_insert_chunks(slots, flat, free_rows, next_row, op)
    else:
        rows, is_new, n_new = _find_or_insert(slots, flat, free_rows, next_row, op)
    if keys.dim() != 1:
        rows, is_new = rows.view(keys.shape), is_new.view(keys.shape)
    return rows, is_new, n_new


def _find_or_insert(
    slots: torch.Tensor, flat: torch.Tensor, free_rows: torch.Tensor, next_row: int, op: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Triton path of :func:`table_find_or_insert` for ``1 <= n <= _CHUNK`` keys."""
    n, dev = flat.numel(), slots.device
    mask = slots.shape[0] - 1
    slot = torch.empty(n, dtype=torch.int64, device=dev)
    # Each lane's row once known; between the launches, a new key's encoded first lane.
    rows = torch.empty(n, dtype=torch.int64, device=dev)
    # The first launch's flags, scanned in place: rank of each first occurrence (low 32
    # bits) and count of keys without a slot (high 32 bits).
    scan = torch.empty(n, dtype=torch.int64, device=dev)
    is_new = torch.empty(n, dtype=torch.bool, device=dev)
    kernels.record_launch("hash_table_claim")
    _claim_kernel[(-(-n // _BLOCK),)](
        slots, flat, slot, rows, n, mask, BLOCK=_BLOCK, W=_window(mask + 1), num_warps=_NUM_WARPS
    )
    stream = (-(-n // _STREAM_BLOCK),)
    kernels.record_launch("hash_table_first")
    _first_kernel[stream](slots, slot, rows, scan, n, BLOCK=_STREAM_BLOCK, num_warps=_STREAM_WARPS)
    torch.cumsum(scan, 0, out=scan)
    n_free = free_rows.numel()
    kernels.record_launch("hash_table_assign")
    # Launched before the one host read, so it queues behind the scan with no gap; an
    # error found by that read undoes the claims afterwards.
    _assign_kernel[stream](
        slots,
        slot,
        scan,
        free_rows if n_free else scan,
        rows,
        is_new,
        n,
        n_free,
        next_row,
        BLOCK=_STREAM_BLOCK,
        num_warps=_STREAM_WARPS,
    )
    total = int(scan[n - 1])
    n_new, n_missing = total & 0xFFFFFFFF, total >> 32
    if n_missing:
        _undo_claims(slots, slot, is_new)
        _check_no_sentinel_now(flat, op)
        _raise_full(op, n_missing)
    return rows, is_new, n_new


def _find_or_insert_chunks(
    slots: torch.Tensor, flat: torch.Tensor, free_rows: torch.Tensor, next_row: int, op: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch of more than ``_CHUNK`` keys, one chunk after another (the counts the scan
    packs into 32 bits stay in range); reserved keys are rejected before any chunk runs."""
    _check_no_sentinel_now(flat, op)
    rows, is_new, total = [], [], 0
    for start in range(0, flat.numel(), _CHUNK):
        r, new, k = _find_or_insert(slots, flat[start : start + _CHUNK], free_rows, next_row, op)
        used = min(k, free_rows.numel())
        free_rows, next_row, total = free_rows[used:], next_row + k - used, total + k
        rows.append(r)
        is_new.append(new)
    return torch.cat(rows), torch.cat(is_new), total


def table_erase(
    slots: torch.Tensor, keys: torch.Tensor, free_rows: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Erase the keys present (absent ones are ignored): ``(new_free_rows, n_erased)``.

    Each erased slot becomes a TOMBSTONE and its row joins the free list; ``new_free_rows``
    is ``free_rows`` merged with the freed rows, ascending (``free_rows`` itself when
    nothing was erased). A key repeated in ``keys`` is erased (and counted) once.

    Raises:
        ValueError: a key is EMPTY or TOMBSTONE (the table is left unchanged).

    Triton path: one launch, a 2-element memset, one host sync, and a ``torch.sort`` of the
    free list with the batch's rows when something was erased.
    """
    op = _NAMES["erase"]
    slots = _check_slots(slots, op)
    flat = _check_keys(keys, slots, op)
    free_rows = _check_rows(free_rows, slots, op)
    if not kernels.use_triton(slots, flat, op="hash_table_erase"):
        kernels.record_launch("hash_table_erase_reference")
        return table_erase_reference(slots, flat, free_rows)
    n = flat.numel()
    if n == 0:
        return free_rows, 0
    dev = slots.device
    rows = torch.empty(n, dtype=torch.int64, device=dev)
    slot = torch.empty(n, dtype=torch.int64, device=dev)
    stats = torch.zeros(2, dtype=torch.int64, device=dev)
    kernels.record_launch("hash_table_erase")
    _erase_kernel[_grid(n)](
        slots,
        flat,
        rows,
        slot,
        stats,
        n,
        slots.shape[0] - 1,
        BLOCK=_BLOCK,
        W=_window(slots.shape[0]),
        num_warps=_NUM_WARPS,
    )
    n_bad, n_erased = stats.tolist()
    if n_bad:
        done = (slot >= 0).nonzero().squeeze(1)
        slots[slot[done], 0] = flat[done]
        slots[slot[done], 1] = rows[done]
        _raise_sentinel(flat, op)
    if n_erased == 0:
        return free_rows, 0
    freed = rows[slot >= 0]  # the owners' rows (the sync above already drained the stream)
    if freed.numel() != n_erased or bool((freed < 0).any()):
        # A live key without a row would hand out row -1 later: fail loudly here instead.
        raise RuntimeError(
            f"{op}: internal error: {n_erased} keys erased but {freed.numel()} rows freed, "
            f"{int((freed < 0).sum())} of them negative"
        )
    return _merge_free(free_rows, freed), n_erased


def table_rehash(slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new table of ``capacity`` slots holding every live ``(key, row)`` of ``slots``.

    Tombstones are dropped; rows are kept. ``capacity`` (a power of two) must leave at least
    one EMPTY slot. Triton path: one launch after filling the new table, one host sync.
    """
    op = _NAMES["rehash"]
    slots = _check_slots(slots, op)
    cap = _check_capacity(capacity, op)
    if not kernels.use_triton(slots, op="hash_table_rehash"):
        kernels.record_launch("hash_table_rehash_reference")
        return table_rehash_reference(slots, cap)
    new = empty_slots(cap, slots.device)
    n_old = slots.shape[0]
    stats = torch.zeros(1, dtype=torch.int64, device=slots.device)
    kernels.record_launch("hash_table_rehash")
    _rehash_kernel[_grid(n_old)](
        slots, new, stats, n_old, cap - 1, BLOCK=_BLOCK, W=_window(cap), num_warps=_NUM_WARPS
    )
    lost = int(stats[0])
    if lost:
        _raise_full(op, lost)
    return new
