"""A table's rows as a checkpoint chain leaves them, read from its files without a table.

Loading a chain into a live table imports the full checkpoint's parts, then, for each
delta, removes its tombstones (keys removed since its base) and imports its changed rows.
:func:`replay_rows` yields the rows that table would end up holding, file by file, in
bounded memory:

1. every delta's keys are read, in replay order (a delta's tombstones before its rows,
   the deltas oldest first), and the *last event* of each key kept: removed, or "row
   ``i`` of delta part ``p``". Any key a delta touched is decided by its last event,
   whatever the base held;
2. the full checkpoint's parts are streamed, dropping every key a delta touched;
3. each delta part is read again and the rows that are their key's last event are yielded.

Memory: the deltas' events (about 40 bytes per changed row or tombstone, over every delta
of the chain; deltas are small), plus the parts being read; never the table.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from recstack.saver.manifest import Chain
from recstack.saver.read import CheckedFile, read_checked, read_parts

__all__ = ["ChainFiles", "chain_files", "replay_rows"]

#: Per checkpoint of a chain (full first): ``(index, parts, tombstone files, aux files)``.
ChainFiles = list[tuple[int, list[CheckedFile], list[CheckedFile], list[CheckedFile]]]
Rows = tuple[torch.Tensor, dict[str, torch.Tensor]]

_REMOVED = -1


def chain_files(chain: Chain, table: str) -> ChainFiles:
    """Table ``table``'s files in each checkpoint of ``chain`` (full checkpoint first):
    ``(index, parts, tombstone files, auxiliary-state files)``, every rank's.

    Args:
        chain: the checkpoints, as :func:`~recstack.saver.manifest.resolve_chain` gives
            them.
        table: the table's saved name (each checkpoint of the chain must have it).
    """
    out = []
    for i, (ckpt, m) in enumerate(chain):
        entry = m["tables"][table]
        parts, removed, aux = [], [], []
        for r in entry["ranks"]:
            parts += [CheckedFile(ckpt, m, rel) for rel in r["parts"]]
            if r.get("removed"):
                removed.append(CheckedFile(ckpt, m, r["removed"]))
            if r.get("aux"):
                aux.append(CheckedFile(ckpt, m, r["aux"]))
        out.append((i, parts, removed, aux))
    return out


@dataclass
class _LastEvents:
    """Each key a delta touched (sorted), with the delta part and row of its final row,
    or part ``-1`` when it was removed last."""

    keys: torch.Tensor
    part: torch.Tensor
    row: torch.Tensor
    parts: list[CheckedFile]


def replay_rows(
    files: ChainFiles,
    pool: ThreadPoolExecutor,
    *,
    slots: Collection[str],
    ahead: int = 2,
    on_file: Callable[[int], None] | None = None,
) -> Iterator[Rows]:
    """The rows of one table at the end of its chain, as ``(keys, {slot: rows})`` chunks.

    Args:
        files: the table's files per checkpoint of the chain, full checkpoint first (no
            tombstones), then each delta in order. Every file must have been verified
            (read here without a second CRC pass).
        pool: threads to read with.
        slots: the slots to yield (``{"values"}``); the others are not copied.
        ahead: part files read in advance.
        on_file: called with each file's byte size once it is read.

    Yields:
        The surviving rows of the full checkpoint's parts, in file order, then the final
        rows of the keys the deltas touched, in delta part order; no chunk is empty.
    """
    events = _last_events(files[1:], pool, ahead, on_file)
    base = files[0][1]
    for f, tensors in zip(base, read_parts(base, pool, ahead, crc=False), strict=True):
        keys = tensors["keys"]
        keep = None
        if events.keys.numel() and keys.numel():
            keep = ~_member(keys, events.keys)
        yield from _select(keys, tensors, slots, keep)
        if on_file is not None:
            on_file(f.bytes)
    yield from _final_delta_rows(events, pool, slots, ahead, on_file)


def _member(keys: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """Which of ``keys`` are in the sorted, distinct ``sorted_set`` (not empty)."""
    pos = torch.searchsorted(sorted_set, keys).clamp_(max=sorted_set.numel() - 1)
    return sorted_set.index_select(0, pos) == keys


def _select(
    keys: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    slots: Collection[str],
    rows: torch.Tensor | None,
) -> Iterator[Rows]:
    """``(keys, {slot: rows})`` of a part's tensors, only ``rows`` (a mask or indices) when
    given; nothing when no row is left."""
    picked = {s: tensors[f"slot/{s}"] for s in slots if f"slot/{s}" in tensors}
    if rows is not None:
        if rows.dtype == torch.bool and bool(rows.all()):
            rows = None
        else:
            keys = keys[rows]
            picked = {s: v[rows] for s, v in picked.items()}
    if keys.numel():
        yield keys, picked


def _last_events(
    deltas: ChainFiles,
    pool: ThreadPoolExecutor,
    ahead: int,
    on_file: Callable[[int], None] | None,
) -> _LastEvents:
    keys: list[torch.Tensor] = []
    part: list[torch.Tensor] = []
    row: list[torch.Tensor] = []
    parts: list[CheckedFile] = []
    for _, delta_parts, removed, _ in deltas:
        # The order a load applies them in: this delta's tombstones, then its rows.
        for f in removed:
            k = read_checked(f, crc=False)["keys"].clone()
            keys.append(k)
            part.append(torch.full_like(k, _REMOVED))
            row.append(torch.zeros_like(k))
            if on_file is not None:
                on_file(f.bytes)
        for f, tensors in zip(
            delta_parts, read_parts(delta_parts, pool, ahead, crc=False), strict=True
        ):
            k = tensors["keys"].clone()  # not a view: the part's other bytes are freed
            keys.append(k)
            part.append(torch.full_like(k, len(parts)))
            row.append(torch.arange(k.numel(), dtype=torch.int64))
            parts.append(f)
            if on_file is not None:
                on_file(f.bytes)
    empty = torch.empty(0, dtype=torch.int64)
    if not keys:
        return _LastEvents(empty, empty, empty, parts)
    all_keys = torch.cat(keys)
    # The events are in replay order: a stable sort by key keeps it within each key, so
    # the last of each run of equal keys is that key's final state.
    sorted_keys, order = torch.sort(all_keys, stable=True)
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    if sorted_keys.numel() > 1:
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    order = order[last]
    return _LastEvents(sorted_keys[last], torch.cat(part)[order], torch.cat(row)[order], parts)


def _final_delta_rows(
    events: _LastEvents,
    pool: ThreadPoolExecutor,
    slots: Collection[str],
    ahead: int,
    on_file: Callable[[int], None] | None,
) -> Iterator[Rows]:
    changed = events.part != _REMOVED
    part, row = events.part[changed], events.row[changed]
    if not part.numel():
        return
    # Rows grouped by part, ascending within each: one read of each part that has any.
    by_row = torch.argsort(row)
    by_part = by_row[torch.argsort(part[by_row], stable=True)]
    counts = torch.bincount(part, minlength=len(events.parts)).tolist()
    rows_of = torch.split(row[by_part], counts)
    needed = [(f, r) for f, r in zip(events.parts, rows_of, strict=True) if r.numel()]
    files = [f for f, _ in needed]
    for (f, rows), tensors in zip(needed, read_parts(files, pool, ahead, crc=False), strict=True):
        yield from _select(tensors["keys"], tensors, slots, rows)
        if on_file is not None:
            on_file(f.bytes)
