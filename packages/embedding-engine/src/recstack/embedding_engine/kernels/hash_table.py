"""Open-addressing hash table kernels: (int64 key, tag) -> int64 row, with linear probing.

**Slots.** The table is one int64 tensor ``slots [capacity, 2]`` of ``(key word, row word)``
pairs, interleaved so that a probe reads one cache line; ``capacity`` is a power of two.

* The key word holds the key. Two key words mark slots without an entry: :data:`EMPTY`
  (``-2**63``, never used) and :data:`TOMBSTONE` (``-2**63 + 1``, erased). Probes walk past
  tombstones; inserts never reuse them (:func:`table_rehash` drops them).
* The row word of an entry is ``(tag_word << row_bits) | row``: its low ``row_bits`` bits
  hold the row and the bits above them (below the sign bit) the entry's *tag word*, so it
  is never negative. Slots without an entry hold row word ``-1``.

**Keys and tags.** An entry is identified by its int64 key *and* its tag, a small int in
``[0, num_tags)`` (a merged embedding table keeps the logical table index there, so one id
of two logical tables makes two entries and never collides). The tag word is
``(tag << 1) | remapped``; ``row_bits = 63 - tag_word_bits(num_tags)`` where
``tag_word_bits(num_tags) = 1 + (num_tags - 1).bit_length()``, so rows lie in
``[0, row_limit(num_tags))`` (``2**62`` rows for one tag, ``2**61`` for two, ...).

Every int64 is a valid key: the two keys equal to the slot markers are stored *remapped*,
key word ``key + 2`` with the ``remapped`` bit set, which tells them from the real keys
``-2**63 + 2`` and ``-2**63 + 3`` (the tag word tells entries with one key word apart
anyway). Nothing is reserved; :func:`table_entries` decodes keys back.

A key's home slot is ``fmix64(key_word ^ tag_word * 0x9E3779B97F4A7C15) & (capacity - 1)``
(core's :func:`~recstack.core.kernels.hash.tl_fmix64` /
:func:`~recstack.core.kernels.hash.fmix64_reference`, so both backends place keys alike): an
untagged, unremapped key (tag word 0) lands where ``fmix64(key)`` says, and one id of two
tags lands in unrelated places, so ids shared by merged tables do not cluster. A probe
walks ``home, home + 1, ...`` (mod ``capacity``) until it meets its entry or an EMPTY slot.

The kernels walk that sequence a *window* at a time: a lane reads the key words of the 8
slots of an aligned 128-byte line in one go (its home's line first, from its home on),
finds the first slot holding its key word and the first EMPTY one, and only moves to the
next line when the window has neither. The row word of the slot holding its key word
shares that line and is read next, once: if its tag word differs (the same id in another
tag, rare), the lane looks on right after that slot. At load 0.75 most probes end in the
first window, so a warp rarely loops, and a hit reads no more words than an untagged table
needs (the row word is the row it returns).

Ops (each validates its inputs, then runs its Triton kernels or its torch reference):

* :func:`table_find`: one launch (plus a one-sync tag check when asked).
* :func:`table_find_or_insert`: three launches, one ``torch.cumsum`` and one host sync.

  1. *claim*: each lane probes for its entry. At the window's first EMPTY slot it tries a
     64-bit ``atomic_cas(EMPTY -> key word)`` on the key word. Then, at that slot when the
     CAS returned EMPTY or its own key word, or at a slot holding its key word whose row
     word is still -1 (claimed in this call, no tag published yet), it *publishes* with a
     CAS of the row word ``-1 -> enc(tag word, lane)`` (``enc`` is negative: the sign bit,
     the tag word above bit 31, the lane in bits 0-30). The row word the CAS leaves decides
     the slot's entry: the tag word published first owns it, lanes of that entry join it,
     and lanes of another tag look on right after it. No lane ever waits for another, and
     every decision comes from an atomic's result, so stale reads only cost a retry.
     Every lane whose slot was claimed during this call ``atomic_min``-s its ``enc`` into
     the row word, which leaves the entry's first occurrence in batch order there.
  2. *first*: ``is_new[i] = lane_of(row_word(slot_i)) == i``, as int64 flags, with
     ``1 << 32`` added for a lane left without a slot (a bad tag, or an unplaced key).
  3. ``torch.cumsum`` of the flags, in place: rank of each new entry in batch order in the
     low 32 bits (batches of more than ``2**31 - 1`` keys run in chunks), and in the last
     entry the number of new entries and of keys without a slot.
  4. *assign*: new entry number ``r`` (0-based) gets ``free_rows[r]`` while the free list
     lasts, then ``next_row + r - len(free_rows)``. Its first lane writes the row word
     into the slot; every lane of a new entry computes the row from its first lane's rank,
     so no lane waits on another.
  5. One host sync, after all four are queued (so the GPU runs them back to back), reads
     that last entry; if some key has no slot, the claimed slots (one ``is_new`` lane
     each) are cleared before the error is raised.

  Lanes of entries already in the table take their row from the claim's probe and touch
  the table in no later launch; only new entries' lanes read (*first*) and write
  (*assign*, first lanes only) their slot again.

  Rows therefore depend only on the call sequence, never on the order in which atomics
  land. The slot a new entry takes can depend on it when several new entries of one batch
  compete for one run of slots (a GPU race); the set of occupied slots and every public
  result do not. Under ``TRITON_INTERPRET=1`` programs run one after another and lanes
  resolve lowest first, so a batch that fits one program (``_BLOCK`` keys) lands in exactly
  the reference's slots.
* :func:`table_erase`: one launch (an ``atomic_xchg`` of the key word to TOMBSTONE picks
  the one lane that erases a duplicated entry, and a second exchange takes the slot's row
  word as it resets it to -1), one host sync for the counts, one ``torch.sort`` merging the
  freed rows into the free list (kept ascending).
* :func:`table_rehash`: one launch re-inserting every live ``(key word, row word)`` into a
  new table.
* :func:`table_entries`: every entry's ``(key, tag, row)`` by ascending row (torch ops,
  one host sync).

Tags are ``None`` (every key has tag 0), one int for all keys (checked on the host), or an
integer tensor of the keys' shape. A tensor tag outside ``[0, num_tags)`` makes its lane
sit out; the op then raises a ValueError naming it and leaves the table as it was (the
claims or erasures its kernels made are undone before raising).

The torch reference is vectorized over keys: a Python loop over probe *rounds* (in a round
every pending key reads its current window) in which entries aiming at the same EMPTY slot
are resolved lowest batch position (first occurrence) first, and a new entry meeting its key
word under another tag looks on after it in the next round, exactly as the interpreter
resolves one program.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import fmix64_reference
from recstack.core.kernels.host import as_int64

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_fmix64

__all__ = [
    "EMPTY",
    "MAX_CAPACITY",
    "MAX_TAGS",
    "TOMBSTONE",
    "empty_slots",
    "row_limit",
    "table_entries",
    "table_erase",
    "table_erase_reference",
    "table_find",
    "table_find_or_insert",
    "table_find_or_insert_reference",
    "table_find_reference",
    "table_rehash",
    "table_rehash_reference",
]

#: Key word of a slot that never held an entry (``-2**63``). Not a reserved key: the key
#: ``-2**63`` is stored remapped (see the module docs).
EMPTY = -(2**63)
#: Key word of a slot whose entry was erased (``-2**63 + 1``); not a reserved key either.
TOMBSTONE = -(2**63) + 1
#: Largest number of slots a table may have (slot indices and ``2 * slot`` stay in int64).
MAX_CAPACITY = 2**60
#: Largest number of tags a table may tell apart (its tag word fits 31 bits).
MAX_TAGS = 2**30

# Home-slot salt of the tag word (the 64-bit golden ratio, odd: a bijection of the tag word).
_SALT = 0x9E3779B97F4A7C15
_S_SALT = as_int64(_SALT)
# A lane's claim of a slot's row word: _SIGN | tag word << 31 | lane (lanes of one call are
# < 2**31, tag words < 2**31): negative and never -1. Rows are >= 0 and free slots hold -1.
_SIGN = -(2**63)
_LOW63 = 2**63 - 1
_LANE_BITS = 31
_LANE_MASK = 2**31 - 1
_MAX_BATCH = 2**62 - 2
# find_or_insert packs two counts of up to n into the 32-bit halves of one int64 scan, and
# lanes into 31 bits of a claim, so it runs batches of more keys in chunks of this many.
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
    "entries": "HashTable.items",
}


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------


def tag_word_bits(num_tags: int) -> int:
    """Bits of the row word above the row: the tag and the remapped-key bit."""
    return 1 + (num_tags - 1).bit_length()


def row_limit(num_tags: int = 1) -> int:
    """Rows of a table with ``num_tags`` tags lie in ``[0, row_limit(num_tags))``."""
    return 1 << (63 - tag_word_bits(_check_num_tags(num_tags, "row_limit")))


def _row_bits(num_tags: int) -> int:
    return 63 - tag_word_bits(num_tags)


def _key_words(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key word, remapped bit as int64)`` of each key: the slot markers move up by 2."""
    remapped = flat <= TOMBSTONE
    return torch.where(remapped, flat + 2, flat), remapped.to(torch.int64)


def _tag_words(
    flat: torch.Tensor, tags: torch.Tensor | None, tag: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key words, tag words)`` of keys with validated tags (``tags`` or, without them,
    ``tag`` for every key), both int64 of ``flat``'s shape."""
    kw, remapped = _key_words(flat)
    if tags is None:
        return kw, remapped + (tag << 1)
    return kw, (tags.to(torch.int64) << 1) | remapped


def _homes(kw: torch.Tensor, tw: torch.Tensor, capacity: int) -> torch.Tensor:
    return fmix64_reference(kw ^ (tw * _S_SALT)) & (capacity - 1)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_capacity(capacity: object, op: str) -> int:
    cap = check_int(capacity, f"{op}: capacity", minimum=1, maximum=MAX_CAPACITY)
    if not _is_pow2(cap):
        raise ValueError(f"{op}: capacity must be a power of two, got {cap}")
    return cap


def _check_num_tags(num_tags: object, op: str) -> int:
    return check_int(num_tags, f"{op}: num_tags", minimum=1, maximum=MAX_TAGS)


def _check_slots(slots: object, op: str) -> torch.Tensor:
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"{op}: slots must be a torch.Tensor, got {type(slots).__name__}")
    if slots.dtype != torch.int64 or slots.dim() != 2 or slots.shape[1] != 2:
        raise ValueError(
            f"{op}: slots must be an int64 [capacity, 2] table of (key, row) words, got "
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


def _check_tags(
    tags: object, keys: torch.Tensor, num_tags: int, op: str
) -> tuple[torch.Tensor | None, int]:
    """``(flat tag tensor or None, scalar tag)``; a scalar is range-checked here, a tensor's
    values by the op (its kernels count bad ones; the references check first)."""
    if tags is None:
        return None, 0
    if isinstance(tags, torch.Tensor):
        if tags.dtype.is_floating_point or tags.dtype.is_complex or tags.dtype == torch.bool:
            raise TypeError(f"{op}: tags must be an integer tensor, got {tags.dtype}")
        if tags.device != keys.device:
            raise ValueError(f"{op}: tags are on {tags.device} but the keys on {keys.device}")
        if tuple(tags.shape) != tuple(keys.shape):
            raise ValueError(
                f"{op}: tags must have the keys' shape {tuple(keys.shape)}, got {tuple(tags.shape)}"
            )
        return tags.contiguous().view(-1), 0
    if isinstance(tags, bool) or not hasattr(tags, "__index__"):
        raise TypeError(f"{op}: tags must be None, an int or a tensor, got {type(tags).__name__}")
    tag = operator.index(tags)
    if not 0 <= tag < num_tags:
        raise ValueError(f"{op}: tag {tag} is outside [0, {num_tags}) (the table's num_tags)")
    return None, tag


def _check_rows(free_rows: object, slots: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(free_rows, torch.Tensor) or free_rows.dtype != torch.int64:
        raise TypeError(f"{op}: free_rows must be an int64 tensor")
    if free_rows.dim() != 1 or free_rows.device != slots.device:
        raise ValueError(
            f"{op}: free_rows must be 1-D on {slots.device}, got {tuple(free_rows.shape)} "
            f"on {free_rows.device}"
        )
    return free_rows.contiguous()


def _check_next_row(next_row: object, num_tags: int, op: str) -> int:
    limit = (1 << _row_bits(num_tags)) - 1
    return check_int(next_row, f"{op}: next_row ({num_tags} tag(s))", minimum=0, maximum=limit)


class _Batch(NamedTuple):
    """One call's checked table and keys: what every probing launch takes."""

    slots: torch.Tensor
    flat: torch.Tensor  # the keys, flat and contiguous
    tags: torch.Tensor | None  # flat tags, or None: every key has tag ``tag``
    tag: int
    num_tags: int
    op: str

    def probe_args(self, *outputs: torch.Tensor) -> tuple[Any, ...]:
        """A probing kernel's arguments up to ``n_tags``: the table, keys and tags, then
        ``outputs``, then ``n``, the slot mask, the scalar tag and the tag count."""
        tags = self.tags if self.tags is not None else self.flat
        n, mask = self.flat.numel(), self.slots.shape[0] - 1
        return (self.slots, self.flat, tags, *outputs, n, mask, self.tag, self.num_tags)

    def probe_options(self) -> dict[str, Any]:
        """A probing kernel's tile constexprs and launch options."""
        return {
            "BLOCK": _BLOCK,
            "W": _window(self.slots.shape[0]),
            "HAS_TAGS": self.tags is not None,
            "num_warps": _NUM_WARPS,
        }


def _batch(slots: torch.Tensor, keys: torch.Tensor, tags: object, num_tags: int, op: str) -> _Batch:
    """Check an op's table, keys, tags and tag count."""
    slots = _check_slots(slots, op)
    num_tags = _check_num_tags(num_tags, op)
    flat = _check_keys(keys, slots, op)
    tag_flat, tag = _check_tags(tags, keys, num_tags, op)
    return _Batch(slots, flat, tag_flat, tag, num_tags, op)


def _bad_tags(tags: torch.Tensor, num_tags: int) -> torch.Tensor:
    return (tags < 0) | (tags >= num_tags)


def _raise_bad_tags(tags: torch.Tensor, num_tags: int, op: str) -> None:
    """Raise the ValueError for the first tag outside ``[0, num_tags)`` (syncs; error path)."""
    bad = _bad_tags(tags, num_tags).nonzero()
    i = int(bad[0, 0])
    more = f" ({bad.shape[0]} bad tags in all)" if bad.shape[0] > 1 else ""
    raise ValueError(
        f"{op}: tags[{i}] = {int(tags[i])} is outside [0, {num_tags}) (the table's num_tags){more}"
    )


def _check_tags_now(tags: torch.Tensor | None, num_tags: int, op: str) -> None:
    if tags is not None and tags.numel() and bool(_bad_tags(tags, num_tags).any()):
        _raise_bad_tags(tags, num_tags, op)


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


def _probe_find(
    slots: torch.Tensor, kw: torch.Tensor, tw: torch.Tensor, row_bits: int
) -> torch.Tensor:
    """Slot of each entry, -1 where absent: all entries probe one slot per round."""
    cap = slots.shape[0]
    out = torch.full_like(kw, -1)
    idx = torch.arange(kw.numel(), device=kw.device)
    pos = _homes(kw, tw, cap)
    k, t = kw, tw
    key_col, row_col = slots[:, 0], slots[:, 1]
    for _ in range(cap):
        if idx.numel() == 0:
            break
        sk, rw = key_col[pos], row_col[pos]
        hit = (sk == k) & (rw >= 0) & ((rw >> row_bits) == t)
        out[idx[hit]] = pos[hit]
        go = ~hit & (sk != EMPTY)
        idx, k, t, pos = idx[go], k[go], t[go], (pos[go] + 1) & (cap - 1)
    return out


def _probe_insert(
    slots: torch.Tensor, kw: torch.Tensor, tw: torch.Tensor, op: str, *, stop_at_key: bool
) -> torch.Tensor:
    """Write the key words of distinct absent entries into EMPTY slots; return their slots.

    As the kernels do, every pending entry reads a window of ``_WINDOW`` slots per round
    (its home's aligned window first, from its home on) and aims at the first EMPTY one; of
    the entries aiming at one slot the earliest in ``kw`` takes it (as one Triton program
    resolves its lanes' CAS), and the others look on right after it. With ``stop_at_key``
    (the claim's scan, which stops at its key word before reading the tag there), a slot
    holding the entry's key word under another tag before that EMPTY one ends the round
    too: the entry looks on right after it in the next round.
    """
    cap = slots.shape[0]
    w = _window(cap)
    dev = kw.device
    out = torch.full_like(kw, -1)
    idx = torch.arange(kw.numel(), device=dev)
    home = _homes(kw, tw, cap)
    start = home & (w - 1)
    base = home - start
    seen = torch.zeros_like(kw)
    off = torch.arange(w, device=dev)
    key_col = slots[:, 0]
    while idx.numel():
        window = key_col[base[:, None] + off]
        empty = (window == EMPTY) & (off >= start[:, None])
        stop = empty
        if stop_at_key:
            stop = empty | ((window == kw[idx][:, None]) & (off >= start[:, None]))
        fe = torch.where(stop, off, w).amin(1)  # the first EMPTY slot or key word
        at_empty = empty.gather(1, fe.clamp(max=w - 1)[:, None]).squeeze(1) & (fe < w)
        aim = at_empty.nonzero().squeeze(1)
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
            key_col[stgt[lead]] = kw[idx[won]]
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
    slots: torch.Tensor,
    keys: torch.Tensor,
    *,
    tags: torch.Tensor | None = None,
    tag: int = 0,
    num_tags: int = 1,
    check_keys: bool = True,
) -> torch.Tensor:
    """Torch reference of :func:`table_find` (any device, validated inputs; ``tags`` flat
    like ``keys``, or ``None`` with every key tagged ``tag``)."""
    flat = keys.contiguous().view(-1)
    if tags is not None:
        if check_keys:
            _check_tags_now(tags, num_tags, _NAMES["find"])
        bad = _bad_tags(tags, num_tags)
        tags = torch.where(bad, 0, tags)
    kw, tw = _tag_words(flat, tags, tag)
    slot = _probe_find(slots, kw, tw, _row_bits(num_tags))
    if tags is not None:
        slot = torch.where(bad, -1, slot)
    row_mask = (1 << _row_bits(num_tags)) - 1
    rows = torch.where(slot >= 0, slots[:, 1][slot.clamp(min=0)] & row_mask, -1)
    return rows.view(keys.shape)


def table_find_or_insert_reference(
    slots: torch.Tensor,
    keys: torch.Tensor,
    free_rows: torch.Tensor,
    next_row: int,
    *,
    tags: torch.Tensor | None = None,
    tag: int = 0,
    num_tags: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch reference of :func:`table_find_or_insert` (any device, validated inputs)."""
    op = _NAMES["find_or_insert"]
    flat = keys.contiguous().view(-1)
    n = flat.numel()
    dev = flat.device
    _check_tags_now(tags, num_tags, op)
    row_bits = _row_bits(num_tags)
    kw, tw = _tag_words(flat, tags, tag)
    slot = _probe_find(slots, kw, tw, row_bits)
    is_new = torch.zeros(n, dtype=torch.bool, device=dev)
    absent = (slot < 0).nonzero().squeeze(1)
    n_new = 0
    if absent.numel():
        entries = torch.stack([kw[absent], tw[absent]], 1)
        uniq, inv = torch.unique(entries, dim=0, return_inverse=True)
        first = torch.full_like(uniq[:, 0], n).scatter_reduce_(0, inv, absent, "amin")
        order = torch.argsort(first)  # new entries in order of first occurrence
        n_new = uniq.shape[0]
        new_kw, new_tw = uniq[order, 0], uniq[order, 1]
        new_slot = _probe_insert(slots, new_kw, new_tw, op, stop_at_key=True)
        rank = torch.arange(n_new, device=dev)
        n_free = free_rows.numel()
        fresh = next_row + rank - n_free
        if n_free:
            fresh = torch.where(rank < n_free, free_rows[rank.clamp(max=n_free - 1)], fresh)
        slots[new_slot, 1] = (new_tw << row_bits) | fresh
        rank_of = torch.empty_like(order)
        rank_of[order] = rank
        slot[absent] = new_slot[rank_of[inv]]
        is_new[first] = True
    rows = slots[:, 1][slot] & ((1 << row_bits) - 1)
    return rows.view(keys.shape), is_new.view(torch.bool).view(keys.shape), n_new


def _merge_free(free_rows: torch.Tensor, freed: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.cat([free_rows, freed])).values


def table_erase_reference(
    slots: torch.Tensor,
    keys: torch.Tensor,
    free_rows: torch.Tensor,
    *,
    tags: torch.Tensor | None = None,
    tag: int = 0,
    num_tags: int = 1,
) -> tuple[torch.Tensor, int]:
    """Torch reference of :func:`table_erase` (any device, validated inputs)."""
    flat = keys.contiguous().view(-1)
    _check_tags_now(tags, num_tags, _NAMES["erase"])
    row_bits = _row_bits(num_tags)
    kw, tw = _tag_words(flat, tags, tag)
    slot = _probe_find(slots, kw, tw, row_bits)
    slot = torch.unique(slot[slot >= 0])
    freed = slots[slot, 1] & ((1 << row_bits) - 1)
    slots[slot, 0] = TOMBSTONE
    slots[slot, 1] = -1
    if slot.numel() == 0:
        return free_rows, 0
    return _merge_free(free_rows, freed), slot.numel()


def table_rehash_reference(
    slots: torch.Tensor, capacity: int, *, num_tags: int = 1
) -> torch.Tensor:
    """Torch reference of :func:`table_rehash`: live entries re-inserted in old slot order."""
    new = empty_slots(capacity, slots.device)
    live = (slots[:, 0] > TOMBSTONE).nonzero().squeeze(1)
    if live.numel():
        row_words = slots[live, 1]
        tw = row_words >> _row_bits(num_tags)
        pos = _probe_insert(new, slots[live, 0], tw, _NAMES["rehash"], stop_at_key=False)
        new[pos, 1] = row_words
    return new


def table_entries(
    slots: torch.Tensor, num_rows: int, *, num_tags: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every entry's ``(keys, tags, rows)``, by ascending row (torch ops, one host sync).

    Keys are decoded (remapped keys come back as themselves); tags are int64. Rows must be
    distinct and below ``num_rows`` (as :class:`~recstack.embedding_engine.hash_table.
    HashTable` keeps them).
    """
    op = _NAMES["entries"]
    slots = _check_slots(slots, op)
    num_tags = _check_num_tags(num_tags, op)
    row_bits = _row_bits(num_tags)
    dev = slots.device
    key_col, row_col = slots[:, 0], slots[:, 1]
    live = key_col > TOMBSTONE
    # Rows are distinct below num_rows: scatter slot numbers into a row-indexed array (free
    # and erased slots all land in one spare entry), then keep the rows that got a slot.
    at = torch.where(live, row_col & ((1 << row_bits) - 1), num_rows)
    slot_of = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=dev)
    slot_of.scatter_(0, at, torch.arange(slots.shape[0], device=dev))
    rows = (slot_of[:num_rows] >= 0).nonzero().squeeze(1)
    s = slot_of[rows]
    kw, tw = key_col[s], row_col[s] >> row_bits
    keys = torch.where((tw & 1).bool(), kw - 2, kw)
    return keys, tw >> 1, rows


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    _EMPTY = tl.constexpr(EMPTY)
    _TOMBSTONE = tl.constexpr(TOMBSTONE)
    _SIGN_C = tl.constexpr(_SIGN)
    _LOW63_C = tl.constexpr(_LOW63)
    _LANE_MASK_C = tl.constexpr(_LANE_MASK)
    _LANE_BITS_C = tl.constexpr(_LANE_BITS)
    _SALT_C = tl.constexpr(_SALT)

    @triton.jit
    def _home(kw, tw, mask):
        # fmix64 is a bijection; the mask (< 2**60) clears the sign bit of the bit pattern.
        x = kw.to(tl.uint64, bitcast=True) ^ (tw.to(tl.uint64, bitcast=True) * _SALT_C)
        return tl_fmix64(x).to(tl.int64, bitcast=True) & mask

    @triton.jit
    def _count(ptr, flags):
        # One atomic per program, and only when it has something to report.
        c = tl.sum(flags.to(tl.int64), axis=0)
        if c > 0:
            tl.atomic_add(ptr, c)

    @triton.jit
    def _lanes(
        keys_ptr,
        tags_ptr,
        tag,
        n_tags,
        n,
        mask,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
        HAS_TAGS: tl.constexpr,
    ):
        """A program's lanes, their key and tag words, and where each probe starts.

        Returns ``(lane, inb, kw, tw, active, bad, start, base)``: a lane whose tag is
        outside ``[0, n_tags)`` is ``bad`` and stays inactive.
        """
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        k = tl.load(keys_ptr + lane, mask=inb, other=0)
        if HAS_TAGS:
            t = tl.load(tags_ptr + lane, mask=inb, other=0).to(tl.int64)
        else:
            t = tl.zeros_like(k) + tag
        ok = (t >= 0) & (t < n_tags)
        # The two smallest int64s are the slot markers: such a key moves up by 2, and its
        # tag word's low bit says so.
        remapped = k <= _TOMBSTONE
        kw = tl.where(remapped, k + 2, k)
        tw = (tl.where(ok, t, 0) << 1) | remapped.to(tl.int64)
        start, base = _probe_start(kw, tw, mask, W)
        return lane, inb, kw, tw, inb & ok, inb & ~ok, start, base

    @triton.jit
    def _probe_start(kw, tw, mask, W: tl.constexpr):
        """``(start, base)``: an entry's first window is the aligned line holding its home
        slot, at ``base``, read from offset ``start`` (the home slot) on."""
        home = _home(kw, tw, mask)
        start = home & (W - 1)
        return start, home - start

    @triton.jit
    def _tag_word(rw, row_bits):
        """The tag word in row word ``rw``: an entry's (``rw >= 0``) or a claim's (< -1)."""
        return tl.where(rw >= 0, rw >> row_bits, (rw & _LOW63_C) >> _LANE_BITS_C)

    @triton.jit
    def _try_cas(ptrs, want, cmp, val, idle_ptrs):
        """``atomic_cas(cmp -> val)`` at ``ptrs`` of the lanes that ``want`` it; the old value.

        atomic_cas takes no mask: the other lanes aim a no-op CAS (0 -> 0) at their
        ``idle_ptrs``, memory of their own that only this launch uses, not at the table.
        """
        ptrs = tl.where(want, ptrs, idle_ptrs)
        return tl.atomic_cas(ptrs, tl.where(want, cmp, 0), tl.where(want, val, 0), sem="relaxed")

    @triton.jit
    def _next_step(lost, past, at, start, base, seen, mask, W: tl.constexpr):
        """Where each lane probes next -> ``(start, base, seen, active)``.

        A lane that ``lost`` at offset ``at`` (another key or tag took that slot) looks on
        right after it; one whose window held neither its key word nor an EMPTY slot
        (``past``) moves to the next line. A lane stops after seeing every slot once.
        """
        seen += tl.where(lost, at + 1 - start, W - start)
        start = tl.where(lost, at + 1, 0)
        move = past | (start == W)
        base = tl.where(move, (base + W) & mask, base)
        start = tl.where(move, 0, start)
        return start, base, seen, (lost | past) & (seen <= mask)

    @triton.jit
    def _scan_window(slots_ptr, base, start, k, active, W: tl.constexpr):
        """Scan each lane's window of slots ``base + start .. base + W - 1`` for key word ``k``.

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

    @triton.jit(do_not_specialize=["n", "mask", "tag", "n_tags", "row_bits", "row_mask"])
    def _find_kernel(
        slots_ptr,
        keys_ptr,
        tags_ptr,
        rows_ptr,
        stats_ptr,
        n,
        mask,
        tag,
        n_tags,
        row_bits,
        row_mask,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
        HAS_TAGS: tl.constexpr,
    ):
        lane, inb, kw, tw, active, bad, start, base = _lanes(
            keys_ptr, tags_ptr, tag, n_tags, n, mask, BLOCK, W, HAS_TAGS
        )
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        pos = tl.full([BLOCK], -1, tl.int64)
        # The key words alone first: each lane stops at the first slot holding its key word
        # or at an EMPTY one, so no load of a row word holds up the next window's scan.
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, kw, active, W)
            cand = active & (fh < W)
            pos = tl.where(cand, base + fh, pos)
            seen += tl.where(cand, fh + 1 - start, W - start)
            # Go on past a window with neither the key word nor an EMPTY slot; a full table
            # has no EMPTY slot, so stop after visiting every slot once.
            active = active & (fh == W) & (fe == W) & (seen <= mask)
            base = (base + W) & mask
            start = tl.zeros_like(start)
        # The row word shares that slot's line: the row, and the entry's tag word (no claim
        # runs during a find, so every entry's row word is >= 0).
        rw = tl.load(slots_ptr + 2 * pos + 1, mask=pos >= 0, other=-1)
        hit = (pos >= 0) & ((rw >> row_bits) == tw)
        row = tl.where(hit, rw & row_mask, -1)
        # The key word under another tag (the same id in another logical table, rare): probe
        # on right after it, checking tags as it goes.
        active = (pos >= 0) & ~hit & (seen <= mask)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            nxt = (pos + 1) & mask
            start = nxt & (W - 1)
            base = nxt - start
            while tl.max(active.to(tl.int32), axis=0) > 0:
                fh, fe = _scan_window(slots_ptr, base, start, kw, active, W)
                cand = active & (fh < W)
                rw = tl.load(slots_ptr + 2 * (base + fh) + 1, mask=cand, other=-1)
                hit = cand & ((rw >> row_bits) == tw)
                row = tl.where(hit, rw & row_mask, row)
                past = active & (fh == W) & (fe == W)
                start, base, seen, active = _next_step(
                    cand & ~hit, past, fh, start, base, seen, mask, W
                )
        tl.store(rows_ptr + lane, row, mask=inb)
        _count(stats_ptr, bad)

    @triton.jit(do_not_specialize=["n", "mask", "tag", "n_tags", "row_bits", "row_mask"])
    def _claim_kernel(
        slots_ptr,
        keys_ptr,
        tags_ptr,
        slot_ptr,
        rows_ptr,
        n,
        mask,
        tag,
        n_tags,
        row_bits,
        row_mask,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
        HAS_TAGS: tl.constexpr,
    ):
        lane, inb, kw, tw, active, bad, start, base = _lanes(
            keys_ptr, tags_ptr, tag, n_tags, n, mask, BLOCK, W, HAS_TAGS
        )
        slot = tl.full([BLOCK], -1, tl.int64)
        row = tl.full([BLOCK], -1, tl.int64)  # the row of an entry already in the table
        fresh = bad & ~bad  # lanes whose slot was claimed in this call
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        # This lane's claim of a row word: negative, never -1, ordered by lane for one tag.
        enc = _SIGN_C | (tw << _LANE_BITS_C) | lane
        idle_ptrs = slot_ptr + tl.minimum(lane, n - 1)  # each lane's own output entry
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, kw, active, W)
            cand = active & (fh < W)
            # The row word of the slot holding the key word: an entry's (>= 0), a claim of
            # this call (< -1), or -1 while the slot's claim has no tag word published yet.
            at = tl.load(slots_ptr + 2 * (base + fh) + 1, mask=cand, other=0)
            want = active & (fe < W)  # fe < W only where no slot holds the key word first
            tgt = tl.where(cand, base + fh, base + fe)
            got_key = want & (fe < 0)
            if tl.max(want.to(tl.int32), axis=0) > 0:
                old = _try_cas(slots_ptr + 2 * (base + fe), want, _EMPTY, kw, idle_ptrs)
                # EMPTY: this lane wrote the key word; kw: another lane of this key word did.
                got_key = want & ((old == _EMPTY) | (old == kw))
            # Publish a tag word where none is yet; the first published one owns the slot.
            publish = (cand & (at == -1)) | got_key
            word = at
            if tl.max(publish.to(tl.int32), axis=0) > 0:
                minus_one = tl.zeros_like(enc) - 1
                old_rw = _try_cas(slots_ptr + 2 * tgt + 1, publish, minus_one, enc, idle_ptrs)
                word = tl.where(publish, tl.where(old_rw == -1, enc, old_rw), at)
            looked = cand | got_key
            match = looked & (_tag_word(word, row_bits) == tw)
            slot = tl.where(match, tgt, slot)
            row = tl.where(match & (word >= 0), word & row_mask, row)
            fresh = fresh | (match & (word < 0))
            # Another key word took the EMPTY slot, or another tag owns the key word's slot:
            # look on right after it.
            lost = (looked & ~match) | (want & ~got_key)
            past = active & (fh == W) & (fe == W)
            at_off = tl.where(cand, fh, fe)
            start, base, seen, active = _next_step(lost, past, at_off, start, base, seen, mask, W)
        # The lowest lane of a claimed slot is its entry's first occurrence in batch order.
        tl.atomic_min(slots_ptr + 2 * slot + 1, enc, mask=fresh, sem="relaxed")
        tl.store(slot_ptr + lane, slot, mask=inb)
        # A bad tag, or a key that saw every slot and found neither itself nor an EMPTY one
        # (never below max_load), keeps slot -1: the first launch counts those.
        tl.store(rows_ptr + lane, row, mask=inb)

    @triton.jit(do_not_specialize=["n"])
    def _first_kernel(slots_ptr, slot_ptr, rows_ptr, flag_ptr, n, BLOCK: tl.constexpr):
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        s = tl.load(slot_ptr + lane, mask=inb, other=-1)
        row = tl.load(rows_ptr + lane, mask=inb, other=0)
        # Lanes of entries already in the table have their row; the others read their
        # slot's row word, which now holds the entry's first lane, and keep it for the assign.
        fresh = (s >= 0) & (row < 0)
        r = tl.load(slots_ptr + 2 * s + 1, mask=fresh, other=0)
        tl.store(rows_ptr + lane, r, mask=fresh)
        # int64 flags, scanned as they are: is_new in the low 32 bits, "no slot" (a bad tag
        # or an unplaced key) in the high ones, so the scan's last entry holds both counts.
        first = fresh & ((r & _LANE_MASK_C) == lane)
        flag = first.to(tl.int64) + ((s < 0).to(tl.int64) << 32)
        tl.store(flag_ptr + lane, flag, mask=inb)

    @triton.jit(do_not_specialize=["n", "n_free", "next_row", "row_bits"])
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
        row_bits,
        BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = lane < n
        r = tl.load(rows_ptr + lane, mask=inb, other=0)
        # Below -1: an entry new in this call; r holds its tag word and its first lane,
        # whose inclusive rank (cumsum of is_new) numbers the entry among the new ones.
        # -1: a bad tag or a key that found no slot (the launcher raises after this launch
        # and undoes the claims).
        pending = inb & (r < -1)
        first = r & _LANE_MASK_C
        rank = (tl.load(rank_ptr + first, mask=pending, other=1) & 0xFFFFFFFF) - 1
        from_free = pending & (rank < n_free)
        reused = tl.load(free_ptr + rank, mask=from_free, other=0)
        row = tl.where(from_free, reused, rank - n_free + next_row)
        tl.store(rows_ptr + lane, row, mask=pending)
        # The entry's first lane writes its row word into the table, once; it is the is_new
        # lane.
        writer = pending & (first == lane)
        s = tl.load(slot_ptr + lane, mask=writer, other=0)
        word = (((r & _LOW63_C) >> _LANE_BITS_C) << row_bits) | row
        tl.store(slots_ptr + 2 * s + 1, word, mask=writer)
        tl.store(new_ptr + lane, writer.to(tl.uint8), mask=inb)

    @triton.jit(do_not_specialize=["n", "mask", "tag", "n_tags", "row_bits"])
    def _erase_kernel(
        slots_ptr,
        keys_ptr,
        tags_ptr,
        words_ptr,
        slot_ptr,
        stats_ptr,
        n,
        mask,
        tag,
        n_tags,
        row_bits,
        BLOCK: tl.constexpr,
        W: tl.constexpr,
        HAS_TAGS: tl.constexpr,
    ):
        lane, inb, kw, tw, active, bad, start, base = _lanes(
            keys_ptr, tags_ptr, tag, n_tags, n, mask, BLOCK, W, HAS_TAGS
        )
        slot = tl.full([BLOCK], -1, tl.int64)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        tomb = tl.full([BLOCK], _TOMBSTONE, tl.int64)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(slots_ptr, base, start, kw, active, W)
            cand = active & (fh < W)
            rw = tl.load(slots_ptr + 2 * (base + fh) + 1, mask=cand, other=-1)
            # An entry being erased by another lane of its key reads -1: not a hit.
            hit = cand & (rw >= 0) & ((rw >> row_bits) == tw)
            # Duplicates of an entry all hit its slot: the exchange that returns the key
            # word erases.
            old = tl.atomic_xchg(slots_ptr + 2 * (base + fh), tomb, mask=hit, sem="relaxed")
            slot = tl.where(hit & (old == kw), base + fh, slot)
            past = active & (fh == W) & (fe == W)
            start, base, seen, active = _next_step(
                cand & ~hit, past, fh, start, base, seen, mask, W
            )
        mine = slot >= 0
        # An exchange, not a load and a store: the row word comes back from the same atomic
        # that frees it.
        minus_one = tl.full([BLOCK], -1, tl.int64)
        r = tl.atomic_xchg(slots_ptr + 2 * slot + 1, minus_one, mask=mine, sem="relaxed")
        tl.store(words_ptr + lane, tl.where(mine, r, -1), mask=inb)
        tl.store(slot_ptr + lane, slot, mask=inb)
        _count(stats_ptr, bad)
        _count(stats_ptr + 1, mine)

    @triton.jit(do_not_specialize=["n_old", "mask", "row_bits"])
    def _rehash_kernel(
        old_ptr, new_ptr, stats_ptr, n_old, mask, row_bits, BLOCK: tl.constexpr, W: tl.constexpr
    ):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = j < n_old
        k, word = tl.split(
            tl.load(
                old_ptr + 2 * j[:, None] + tl.arange(0, 2)[None, :],
                mask=inb[:, None],
                other=_EMPTY,
            )
        )
        active = inb & (k > _TOMBSTONE)
        start, base = _probe_start(k, tl.where(active, word >> row_bits, 0), mask, W)
        live = active
        placed = inb & (k < 0) & (k > 0)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        idle_ptrs = old_ptr + 2 * tl.minimum(j, n_old - 1)  # each lane's own old slot
        # Entries are distinct and absent from the new table, which holds no tombstone:
        # only EMPTY slots stop a lane (its scan looks for the TOMBSTONE key word).
        never = tl.zeros_like(k) + _TOMBSTONE
        while tl.max(active.to(tl.int32), axis=0) > 0:
            fh, fe = _scan_window(new_ptr, base, start, never, active, W)
            want = active & (fe < W)
            tgt = base + fe
            won = want & (fe < 0)
            if tl.max(want.to(tl.int32), axis=0) > 0:
                old = _try_cas(new_ptr + 2 * tgt, want, _EMPTY, k, idle_ptrs)
                # A lost CAS means another entry (maybe of this key word) took the slot.
                won = want & (old == _EMPTY)
                tl.store(new_ptr + 2 * tgt + 1, word, mask=won)
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
    # Each slot this call claimed has exactly one is_new lane (its entry's first); an EMPTY
    # slot lies on no older entry's probe path, so clearing them restores the table.
    claimed = slot[is_new.view(torch.bool) & (slot >= 0)]
    slots[claimed, 0] = EMPTY
    slots[claimed, 1] = -1


def table_find(
    slots: torch.Tensor,
    keys: torch.Tensor,
    tags: torch.Tensor | int | None = None,
    *,
    num_tags: int = 1,
    check_keys: bool = True,
) -> torch.Tensor:
    """Row of each entry ``(key, tag)`` (int64, ``keys``' shape), -1 where absent.

    Args:
        slots: the table, int64 ``[capacity, 2]``.
        keys: int64 keys of any shape on the table's device (any int64 value).
        tags: ``None`` (tag 0), one int for every key, or an integer tensor of ``keys``'
            shape.
        num_tags: the table's tag count (tags lie in ``[0, num_tags)``).
        check_keys: raise a ValueError for a tensor tag outside ``[0, num_tags)`` (one
            host sync). With ``False`` nothing syncs and such a key simply reads as absent.
            Keys themselves need no check: no int64 is reserved.

    Triton path: one launch (+ a 1-element memset and one sync when checking tags).
    """
    b = _batch(slots, keys, tags, num_tags, _NAMES["find"])
    slots, flat, tag_flat, tag, num_tags, op = b
    if not kernels.use_triton(slots, flat, op="hash_table_find"):
        kernels.record_launch("hash_table_find_reference")
        rows = table_find_reference(
            slots, flat, tags=tag_flat, tag=tag, num_tags=num_tags, check_keys=check_keys
        )
        return rows.view(keys.shape)
    n = flat.numel()
    rows = torch.empty(n, dtype=torch.int64, device=slots.device)
    if n:
        # Unchecked (or nothing to check), the count is never read: no zeroing either.
        check = check_keys and tag_flat is not None
        stats = (torch.zeros if check else torch.empty)(1, dtype=torch.int64, device=slots.device)
        row_bits = _row_bits(num_tags)
        kernels.record_launch("hash_table_find")
        _find_kernel[_grid(n)](
            *b.probe_args(rows, stats), row_bits, (1 << row_bits) - 1, **b.probe_options()
        )
        if check and int(stats[0]):
            _raise_bad_tags(tag_flat, num_tags, op)
    return rows.view(keys.shape)


def table_find_or_insert(
    slots: torch.Tensor,
    keys: torch.Tensor,
    free_rows: torch.Tensor,
    next_row: int,
    tags: torch.Tensor | int | None = None,
    *,
    num_tags: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Find every entry ``(key, tag)``, inserting the absent ones: ``(rows, is_new, n_new)``.

    The caller guarantees room: ``slots`` keeps at least one EMPTY slot after the new
    entries are in (the :class:`~recstack.embedding_engine.hash_table.HashTable` grows
    first), and the new rows stay below :func:`row_limit`.

    Args:
        slots: the table, int64 ``[capacity, 2]``, updated in place.
        keys: int64 keys of any shape on the table's device (duplicates allowed, any int64).
        free_rows: int64 ``[F]`` rows to hand out first (the caller keeps them ascending).
        next_row: the first never-used row, handed out after ``free_rows``.
        tags: as :func:`table_find` takes them.
        num_tags: the table's tag count.

    Returns:
        ``rows`` (int64, ``keys``' shape); ``is_new`` (bool, ``keys``' shape), True at the
        first occurrence in batch order of each entry that was absent; ``n_new``, the
        number of such entries. New entry number ``r`` in order of first occurrence gets
        ``free_rows[r]`` for ``r < F`` and ``next_row + r - F`` after. The caller drops
        ``min(n_new, F)`` rows from the front of its free list.

    Raises:
        ValueError: a tag outside ``[0, num_tags)`` (the table is left unchanged).

    Triton path: 3 launches (claim, first, assign), one ``torch.cumsum`` and one host sync
    after them all.
    """
    b = _batch(slots, keys, tags, num_tags, _NAMES["find_or_insert"])
    slots, flat, tag_flat, tag, num_tags, op = b
    free_rows = _check_rows(free_rows, slots, op)
    next_row = _check_next_row(next_row, num_tags, op)
    if not kernels.use_triton(slots, flat, op="hash_table_find_or_insert"):
        kernels.record_launch("hash_table_find_or_insert_reference")
        rows, is_new, n_new = table_find_or_insert_reference(
            slots, flat, free_rows, next_row, tags=tag_flat, tag=tag, num_tags=num_tags
        )
        return rows.view(keys.shape), is_new.view(torch.bool).view(keys.shape), n_new
    n = flat.numel()
    dev = slots.device
    if n == 0:
        empty = torch.empty(keys.shape, dtype=torch.int64, device=dev)
        return empty, torch.empty(keys.shape, dtype=torch.bool, device=dev), 0
    if n > _CHUNK:
        rows, is_new, n_new = _find_or_insert_chunks(b, free_rows, next_row)
    else:
        rows, is_new, n_new = _find_or_insert(b, free_rows, next_row)
    if keys.dim() != 1:
        rows, is_new = rows.view(keys.shape), is_new.view(keys.shape)
    return rows, is_new, n_new


def _find_or_insert(
    b: _Batch, free_rows: torch.Tensor, next_row: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Triton path of :func:`table_find_or_insert` for ``1 <= n <= _CHUNK`` keys."""
    slots, flat, tags, _, num_tags, op = b
    n, dev = flat.numel(), slots.device
    row_bits = _row_bits(num_tags)
    slot = torch.empty(n, dtype=torch.int64, device=dev)
    # Each lane's row once known; between the launches, a new entry's claim (first lane).
    rows = torch.empty(n, dtype=torch.int64, device=dev)
    # The first launch's flags, scanned in place: rank of each first occurrence (low 32
    # bits) and count of keys without a slot (high 32 bits).
    scan = torch.empty(n, dtype=torch.int64, device=dev)
    is_new = torch.empty(n, dtype=torch.bool, device=dev)
    kernels.record_launch("hash_table_claim")
    _claim_kernel[(-(-n // _BLOCK),)](
        *b.probe_args(slot, rows), row_bits, (1 << row_bits) - 1, **b.probe_options()
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
        row_bits,
        BLOCK=_STREAM_BLOCK,
        num_warps=_STREAM_WARPS,
    )
    total = int(scan[n - 1])
    n_new, n_missing = total & 0xFFFFFFFF, total >> 32
    if n_missing:
        _undo_claims(slots, slot, is_new)
        _check_tags_now(tags, num_tags, op)
        _raise_full(op, n_missing)
    return rows, is_new, n_new


def _find_or_insert_chunks(
    b: _Batch, free_rows: torch.Tensor, next_row: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch of more than ``_CHUNK`` keys, one chunk after another (the counts the scan
    packs into 32 bits and the lanes a claim holds stay in range); bad tags are rejected
    before any chunk runs."""
    tags = b.tags
    _check_tags_now(tags, b.num_tags, b.op)
    rows, is_new, total = [], [], 0
    for start in range(0, b.flat.numel(), _CHUNK):
        part = None if tags is None else tags[start : start + _CHUNK]
        chunk = b._replace(flat=b.flat[start : start + _CHUNK], tags=part)
        r, new, k = _find_or_insert(chunk, free_rows, next_row)
        used = min(k, free_rows.numel())
        free_rows, next_row, total = free_rows[used:], next_row + k - used, total + k
        rows.append(r)
        is_new.append(new)
    return torch.cat(rows), torch.cat(is_new), total


def table_erase(
    slots: torch.Tensor,
    keys: torch.Tensor,
    free_rows: torch.Tensor,
    tags: torch.Tensor | int | None = None,
    *,
    num_tags: int = 1,
) -> tuple[torch.Tensor, int]:
    """Erase the entries present (absent ones are ignored): ``(new_free_rows, n_erased)``.

    Each erased slot becomes a TOMBSTONE and its row joins the free list; ``new_free_rows``
    is ``free_rows`` merged with the freed rows, ascending (``free_rows`` itself when
    nothing was erased). An entry repeated in ``keys`` is erased (and counted) once.
    ``tags`` and ``num_tags`` as :func:`table_find` takes them.

    Raises:
        ValueError: a tag outside ``[0, num_tags)`` (the table is left unchanged).

    Triton path: one launch, a 2-element memset, one host sync, and a ``torch.sort`` of the
    free list with the batch's rows when something was erased.
    """
    b = _batch(slots, keys, tags, num_tags, _NAMES["erase"])
    slots, flat, tag_flat, tag, num_tags, op = b
    free_rows = _check_rows(free_rows, slots, op)
    if not kernels.use_triton(slots, flat, op="hash_table_erase"):
        kernels.record_launch("hash_table_erase_reference")
        return table_erase_reference(
            slots, flat, free_rows, tags=tag_flat, tag=tag, num_tags=num_tags
        )
    n = flat.numel()
    if n == 0:
        return free_rows, 0
    dev = slots.device
    row_bits = _row_bits(num_tags)
    words = torch.empty(n, dtype=torch.int64, device=dev)
    slot = torch.empty(n, dtype=torch.int64, device=dev)
    stats = torch.zeros(2, dtype=torch.int64, device=dev)
    kernels.record_launch("hash_table_erase")
    _erase_kernel[_grid(n)](*b.probe_args(words, slot, stats), row_bits, **b.probe_options())
    n_bad, n_erased = stats.tolist()
    if n_bad:
        done = (slot >= 0).nonzero().squeeze(1)
        slots[slot[done], 0] = _key_words(flat[done])[0]
        slots[slot[done], 1] = words[done]
        assert tag_flat is not None  # a scalar tag was checked on the host
        _raise_bad_tags(tag_flat, num_tags, op)
    if n_erased == 0:
        return free_rows, 0
    # The owners' row words (the sync above already drained the stream).
    freed = words[slot >= 0]
    if freed.numel() != n_erased or bool((freed < 0).any()):
        # A live entry without a row would hand out row -1 later: fail loudly here instead.
        raise RuntimeError(
            f"{op}: internal error: {n_erased} keys erased but {freed.numel()} rows freed, "
            f"{int((freed < 0).sum())} of them negative"
        )
    return _merge_free(free_rows, freed & ((1 << row_bits) - 1)), n_erased


def table_rehash(slots: torch.Tensor, capacity: int, *, num_tags: int = 1) -> torch.Tensor:
    """A new table of ``capacity`` slots holding every live entry of ``slots``.

    Tombstones are dropped; rows and tags are kept. ``capacity`` (a power of two) must
    leave at least one EMPTY slot. Triton path: one launch after filling the new table, one
    host sync.
    """
    op = _NAMES["rehash"]
    slots = _check_slots(slots, op)
    cap = _check_capacity(capacity, op)
    num_tags = _check_num_tags(num_tags, op)
    if not kernels.use_triton(slots, op="hash_table_rehash"):
        kernels.record_launch("hash_table_rehash_reference")
        return table_rehash_reference(slots, cap, num_tags=num_tags)
    new = empty_slots(cap, slots.device)
    n_old = slots.shape[0]
    stats = torch.zeros(1, dtype=torch.int64, device=slots.device)
    kernels.record_launch("hash_table_rehash")
    _rehash_kernel[_grid(n_old)](
        slots,
        new,
        stats,
        n_old,
        cap - 1,
        _row_bits(num_tags),
        BLOCK=_BLOCK,
        W=_window(cap),
        num_warps=_NUM_WARPS,
    )
    lost = int(stats[0])
    if lost:
        _raise_full(op, lost)
    return new
