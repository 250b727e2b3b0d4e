"""Draw the docs' diagrams as SVG files under ``docs/assets/``.

Each picture illustrates one mechanism as the code implements it; the comment above each
function names the code it follows. Change the code, then the picture:

    python tools/docs/diagrams.py

The SVGs are committed, so the docs need neither this script nor any renderer to build.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from svgdraw import (  # noqa: E402  (a sibling module of this script)
    BLUE,
    GREEN,
    GREY,
    INK,
    MUTED,
    ORANGE,
    PURPLE,
    RED,
    TEAL,
    WHITE,
    Drawing,
)

ASSETS = Path(__file__).resolve().parents[2] / "docs" / "assets"
"""Where the SVG files go (the docs embed them from there)."""

SYNC = RED[1]
"""Colour of host syncs (the training thread waits for the GPU)."""


# Follows recstack.core.jagged.JaggedTensor and recstack.core.keyed_jagged (key-major
# lengths, one values buffer, per-key views).
def jagged() -> Drawing:
    """JaggedTensor's values/offsets/lengths, and KeyedJaggedTensor's key-major packing."""
    d = Drawing(900, 575, "JaggedTensor and KeyedJaggedTensor memory layout")
    x0, w = 130, 44

    d.text(20, 28, "JaggedTensor(values, offsets): one feature, B = 4 rows", size=15, bold=True)
    d.text(
        20, 48, "row i = values[offsets[i] : offsets[i + 1]]", size=12.5, mono=True, colour=MUTED
    )

    # values, coloured by row; row 1 is empty (offsets 3, 3).
    row_colours = [BLUE, BLUE, BLUE, GREEN, ORANGE, ORANGE]
    d.cells(x0, 100, ["a", "b", "c", "d", "e", "f"], row_colours, w=w, h=28)
    for i in range(6):
        d.text(x0 + i * w + w / 2, 144, str(i), size=10.5, anchor="middle", colour=MUTED)
    d.brace(x0 + 3, x0 + 3 * w - 3, 86, "row 0")
    d.brace(x0 + 3 * w + 3, x0 + 4 * w - 3, 86, "row 2")
    d.brace(x0 + 4 * w + 3, x0 + 6 * w - 3, 86, "row 3")
    d.line([(x0 + 3 * w, 66), (x0 + 3 * w, 100)], colour=RED[1], dash="3 2", arrow=False)
    d.text(x0 + 3 * w, 62, "row 1: empty", size=11.5, anchor="middle", colour=RED[1])
    d.text(120, 119, "values", size=12.5, anchor="end", bold=True)

    offsets = [0, 3, 3, 4, 6]
    d.cells(x0, 190, [str(o) for o in offsets], WHITE, w=w, h=28)
    d.text(120, 209, "offsets", size=12.5, anchor="end", bold=True)
    for i, o in enumerate(offsets):
        d.line([(x0 + i * w + w / 2, 190), (x0 + o * w, 130)], colour=MUTED, width=1.1)

    d.cells(x0, 250, ["3", "0", "1", "2"], WHITE, w=w, h=28)
    d.text(120, 269, "lengths()", size=12.5, anchor="end", bold=True)

    notes = [
        (118, "values: [N, *trailing], N = 6 items (ids, or [N, D] rows)"),
        (140, "weights (optional): [N], one number per item"),
        (208, "offsets: int64, B + 1 entries; 0 first, N last"),
        (268, "lengths() = offsets[1:] - offsets[:-1]"),
    ]
    for y, note in notes:
        d.text(470, y, note, size=12.5, colour=INK)

    # KeyedJaggedTensor: the docs' example (keys user_seq and city, B = 3).
    d.line([(20, 306), (880, 306)], colour="#cfd8dc", arrow=False)
    d.text(
        20,
        336,
        "KeyedJaggedTensor: K = 2 features of one batch, packed key-major",
        size=15,
        bold=True,
    )
    d.text(
        20,
        356,
        "keys = ['user_seq', 'city'], B = stride() = 3: each key owns one "
        "contiguous slice of values()",
        size=12.5,
        colour=MUTED,
    )

    key_colours = [PURPLE] * 3 + [TEAL] * 3
    d.cells(x0, 400, ["2", "0", "3", "1", "1", "0"], key_colours, w=w, h=28)
    d.brace(x0 + 3, x0 + 3 * w - 3, 388, "user_seq: rows 0, 1, 2")
    d.brace(x0 + 3 * w + 3, x0 + 6 * w - 3, 388, "city: rows 0, 1, 2")
    d.text(120, 419, "lengths()", size=12.5, anchor="end", bold=True)

    d.cells(x0, 450, ["0", "2", "2", "5", "6", "7", "7"], WHITE, w=w, h=28)
    d.text(120, 469, "offsets()", size=12.5, anchor="end", bold=True)

    d.cells(x0, 510, ["11", "12", "31", "32", "33", "7", "8"], [PURPLE] * 5 + [TEAL] * 2, w=w, h=28)
    d.text(120, 529, "values()", size=12.5, anchor="end", bold=True)
    d.text(x0 + 2.5 * w, 556, "values[0:5]: user_seq", size=11.5, anchor="middle", colour=PURPLE[1])
    d.text(x0 + 6 * w, 556, "values[5:7]: city", size=11.5, anchor="middle", colour=TEAL[1])

    d.text(470, 418, "K * B = 6 lengths: key 0's B rows, then key 1's", size=12.5)
    d.text(470, 462, "offsets(): K * B + 1 entries, computed once", size=12.5)
    d.text(470, 440, "length_per_key() = [5, 2]  offset_per_key() = [0, 5, 7]", size=12, mono=True)
    d.rect(470, 492, 410, 62, TEAL)
    d.text(482, 514, 'kjt["city"] -> JaggedTensor(values[5:7],', size=12, mono=True)
    d.text(482, 530, "                 offsets[3:7] - 5)", size=12, mono=True)
    d.text(482, 547, "a view of the same buffer: no copy", size=11.5, colour=MUTED)
    d.line([(x0 + 7 * w + 4, 524), (468, 524)], colour=TEAL[1])
    return d


# Follows recstack.core.paged.PagedTensor: power-of-two page_rows, an int64 page_table of
# data pointers on the device, pages allocated as growth needs them and never moved.
def paged() -> Drawing:
    """PagedTensor: row -> (page, offset) through the page table; pages never move."""
    d = Drawing(900, 500, "PagedTensor layout: page table and pages")
    d.text(
        20,
        28,
        "PagedTensor: rows in fixed-size pages, found through a page table",
        size=15,
        bold=True,
    )
    d.text(
        20,
        48,
        "page = r >> page_shift     offset = r & page_mask     "
        "(here page_rows = 4: page_shift = 2, page_mask = 3; dim = 6)",
        size=12,
        mono=True,
        colour=MUTED,
    )

    d.rect(20, 96, 210, 86, ORANGE)
    d.text(34, 120, "row r = 9", size=13, mono=True, bold=True)
    d.text(34, 144, "page   = 9 >> 2 = 2", size=12.5, mono=True)
    d.text(34, 166, "offset = 9 & 3  = 1", size=12.5, mono=True)

    tx, ty, th = 300, 110, 36
    d.text(tx, 100, "page_table (int64, on the device)", size=12, colour=MUTED)
    for i in range(3):
        d.rect(tx, ty + i * th, 150, th, WHITE, radius=0, width=1)
        d.text(tx + 75, ty + i * th + 23, f"ptr to page {i}", size=12.5, anchor="middle", mono=True)
    d.line(
        [(230, 150), (262, 150), (262, ty + 2.5 * th), (tx - 2, ty + 2.5 * th)], colour=ORANGE[1]
    )
    d.text(266, ty + 2.5 * th + 20, "[2]", size=11.5, colour=ORANGE[1], mono=True)

    px, rh, cw = 560, 17, 26
    tops = [80, 190, 300]
    for p, top in enumerate(tops):
        d.text(px, top - 8, f"page {p}: rows {4 * p}-{4 * p + 3}", size=11.5, colour=MUTED)
        for r in range(4):
            row = 4 * p + r
            colours = BLUE
            if row == 9:
                colours = ORANGE
            elif row >= 10:
                colours = GREY
            for c in range(6):
                d.rect(px + c * cw, top + r * rh, cw, rh, colours, radius=0, width=0.8)
            d.text(
                px + 6 * cw + 8, top + r * rh + 13, f"row {row}", size=11, colour=MUTED, mono=True
            )
        d.line([(tx + 150, ty + p * th + th / 2), (px - 4, top + 2 * rh)], colour=BLUE[1])
    d.text(
        px + 6 * cw + 62, tops[2] + rh + 13, "<- offset 1", size=11.5, colour=ORANGE[1], bold=True
    )
    d.text(
        px,
        tops[2] + 4 * rh + 18,
        "rows 10-11: capacity not used yet (zeros)",
        size=11,
        colour=MUTED,
    )
    d.text(tx, ty + 3 * th + 22, "each page: one contiguous", size=11, colour=MUTED)
    d.text(tx, ty + 3 * th + 37, "[page_rows, dim] tensor, allocated", size=11, colour=MUTED)
    d.text(tx, ty + 3 * th + 52, "on its own", size=11, colour=MUTED)

    notes = [
        "A kernel reads page_table[r >> page_shift] and adds (r & page_mask) * dim: "
        "a shift and a mask, no division.",
        "append_rows(n): new rows follow the last one; a full last page gets new pages "
        "and a rebuilt page table.",
        "Existing pages are never copied or moved, so their pointers and rows stay valid "
        "while the table grows.",
        "PagedTensor.wrap(t) views a plain [rows, dim] tensor as one page (page_shift = 62).",
    ]
    for i, note in enumerate(notes):
        d.text(20, 424 + i * 19, note, size=12.5)
    return d


# Follows recstack.embedding_engine.kernels.hash_table (its module docstring): slots of
# (key word, row word), home from fmix64, linear probing a 128-byte line at a time, EMPTY
# and TOMBSTONE key words, the tag word above the row in the row word, CAS claims.
def hash_table() -> Drawing:
    """The GPU hash table's probe: home slot, 8-slot windows, tombstones, tags."""
    d = Drawing(900, 525, "HashTable probing: open addressing with linear probing")
    d.text(
        20,
        28,
        "HashTable on the GPU: open addressing, linear probing, 8 slots per step",
        size=15,
        bold=True,
    )
    d.text(
        20,
        48,
        "slots: int64 [capacity, 2] of (key word, row word) pairs, capacity a power "
        "of two; 8 slots = one aligned 128-byte line",
        size=12.5,
        colour=MUTED,
    )

    d.rect(20, 64, 860, 44, ORANGE)
    d.text(32, 82, "find_or_insert(key 42, tag 1):", size=12.5, bold=True)
    d.text(
        32,
        99,
        "home = fmix64(key word ^ tag word * 0x9E3779B97F4A7C15) & (capacity - 1) = 43",
        size=12,
        mono=True,
    )

    x0, sw = 40, 52

    def sx(slot: int) -> float:
        return x0 + (slot - 40) * sw

    # (key word, tag, row) per slot; None key: EMPTY, "TOMB": TOMBSTONE.
    slots: dict[int, tuple[str | None, int | None, int | None]] = {
        40: ("17", 0, 3),
        41: (None, None, None),
        42: ("5120", 1, 8),
        43: ("77", 0, 0),
        44: ("TOMB", None, None),
        45: ("42", 0, 6),
        46: ("9", 1, 1),
        47: ("3001", 0, 4),
        48: ("51", 1, 2),
        49: (None, None, None),
        50: ("88", 0, 7),
        51: (None, None, None),
        52: (None, None, None),
        53: ("640", 1, 5),
        54: (None, None, None),
        55: (None, None, None),
    }
    ky, kh, rh = 170, 26, 36
    for line, first in enumerate((40, 48)):
        left = sx(first) - (4 if line == 0 else -2)
        right = sx(first + 8) + (4 if line == 1 else -2)
        d.rect(left, ky - 22, right - left, kh + rh + 30, WHITE, dash="5 3", radius=6)
        d.text(
            sx(first) + 4 * sw,
            ky + kh + rh + 24,
            f"line {line}: slots {first}-{first + 7} (128 bytes, read in one go)",
            size=11,
            anchor="middle",
            colour=MUTED,
        )
    for slot, (key, tag, row) in slots.items():
        x = sx(slot)
        before_home = slot < 43
        if key is None:
            kc, rc, ktext, rtext, ttext = WHITE, WHITE, "EMPTY", "-1", ""
        elif key == "TOMB":
            kc, rc, ktext, rtext, ttext = GREY, GREY, "TOMB", "-1", ""
        else:
            kc = rc = PURPLE if tag == 1 else BLUE
            ktext, rtext, ttext = key, f"row {row}", f"tag {tag}"
        if before_home:
            kc = rc = ("#fafafa", "#cfd8dc")
        d.rect(x, ky, sw, kh, kc, radius=0, width=1)
        d.rect(x, ky + kh, sw, rh, rc, radius=0, width=1)
        colour = "#b0bec5" if before_home else INK
        d.text(x + sw / 2, ky + 17, ktext, size=11, anchor="middle", mono=True, colour=colour)
        if ttext:
            d.text(x + sw / 2, ky + kh + 14, ttext, size=10, anchor="middle", colour=colour)
            d.text(
                x + sw / 2, ky + kh + 29, rtext, size=11, anchor="middle", mono=True, colour=colour
            )
        else:
            d.text(
                x + sw / 2, ky + kh + 22, rtext, size=11, anchor="middle", mono=True, colour=colour
            )
        d.text(x + sw / 2, ky - 6, str(slot), size=10.5, anchor="middle", colour=MUTED)
    d.text(x0 - 8, ky + 17, "key", size=10.5, anchor="end", colour=MUTED)
    d.text(x0 - 8, ky + kh + 22, "row", size=10.5, anchor="end", colour=MUTED)

    # The probe: home 43 .. 47 in line 0, then line 1 from 48 to the first EMPTY at 49.
    py = 132
    d.line([(sx(43) + sw / 2, 108), (sx(43) + sw / 2, ky - 18)], colour=ORANGE[1])
    d.text(sx(43) + sw / 2 + 6, 124, "home", size=11.5, colour=ORANGE[1], bold=True)
    visited = [(sx(s) + sw / 2, py) for s in range(43, 50)]
    d.line([*visited, (visited[-1][0], ky - 20)], colour=RED[1], width=1.8)
    for x, y in visited[:-1]:
        d.rect(x - 3, y - 3, 6, 6, (RED[1], RED[1]), radius=3, width=0)

    callouts = [
        (43, "1", "another key: look on"),
        (44, "2", "TOMBSTONE (erased): walk past"),
        (45, "3", "key word 42 but tag 0 (its row word says): another entry, look on"),
        (48, "4", "no match, no EMPTY in line 0: read the next line"),
        (49, "5", "first EMPTY: find returns -1 (absent); find_or_insert claims this slot"),
    ]
    cy = ky + kh + rh + 40
    for slot, mark, _ in callouts:
        x = sx(slot) + sw / 2
        d.rect(x - 9, cy - 9, 18, 18, (RED[1], RED[1]), radius=9, width=0)
        d.text(x, cy + 4.5, mark, size=11.5, anchor="middle", colour="#ffffff", bold=True)
    for i, (_, mark, text) in enumerate(callouts):
        y = cy + 34 + i * 20
        d.rect(40 - 8, y - 13, 16, 16, (RED[1], RED[1]), radius=8, width=0)
        d.text(40, y, mark, size=10.5, anchor="middle", colour="#ffffff", bold=True)
        d.text(56, y, text, size=12.5)

    claim_y = cy + 34 + 5 * 20 + 8
    d.text(
        20,
        claim_y,
        "Claiming slot 49 (find_or_insert: three launches, a cumsum, one host sync):",
        size=12.5,
        bold=True,
    )
    steps = [
        "claim: CAS its key word EMPTY -> 42, then CAS its row word -1 -> the lane's claim "
        "(publishes tag 1: the first tag published owns the slot)",
        "first, cumsum, assign: new entries numbered in batch order take freed rows, then "
        "new ones; one host sync reads how many were new",
    ]
    for i, step in enumerate(steps):
        d.text(32, claim_y + 20 + i * 19, step, size=12)

    by = claim_y + 66
    d.text(20, by, "row word of a live slot:", size=12.5, bold=True)
    bx = 190
    d.rect(bx, by - 16, 30, 24, GREY, radius=0, width=1)
    d.text(bx + 15, by, "0", size=11.5, anchor="middle", mono=True)
    d.rect(bx + 30, by - 16, 250, 24, PURPLE, radius=0, width=1)
    d.text(bx + 155, by, "tag word = tag << 1 | remapped", size=11.5, anchor="middle", mono=True)
    d.rect(bx + 280, by - 16, 210, 24, BLUE, radius=0, width=1)
    d.text(bx + 385, by, "row (row_bits bits)", size=11.5, anchor="middle", mono=True)
    d.text(bx + 500, by, "never negative; free slots hold -1", size=11.5, colour=MUTED)
    d.text(
        20,
        by + 24,
        "EMPTY = -2**63 and TOMBSTONE = -2**63 + 1 are key words, not "
        "reserved keys: keys equal to them are stored as key + 2 with the remapped bit.",
        size=11.5,
        colour=MUTED,
    )
    return d


# Follows recstack.pipelines.trainer.Trainer._train_step/_after_step,
# recstack.pipelines.stream.BatchStream (a DevicePrefetcher with prefetch=2 on CUDA),
# recstack.columnio.device.DevicePrefetcher (worker thread, side stream, events,
# record_stream) and recstack.saver.checkpointer.Checkpointer.save(blocking=False).
def train_step() -> Drawing:
    """One training step on a GPU: who does what, on which thread and CUDA stream."""
    d = Drawing(900, 610, "One training step on the GPU: threads and CUDA streams")
    d.text(20, 28, "One training step on a GPU: who runs what, and where", size=15, bold=True)
    d.text(
        20,
        48,
        "Trainer.fit() on CUDA reading a ColumnReader: batch k trains while the "
        "next batches are read and copied in",
        size=12.5,
        colour=MUTED,
    )

    lanes = [
        ("reader threads", "(ColumnReader)"),
        ("prefetch thread", "(DevicePrefetcher)"),
        ("copy stream", "(side CUDA stream)"),
        ("compute stream", "(current CUDA stream)"),
        ("training thread", "(Python, queues work)"),
    ]
    top, lh = 70, 62
    for i, (name, sub) in enumerate(lanes):
        y = top + i * lh
        if i % 2 == 0:
            d.rect(10, y, 880, lh, ("#fafafa", "#fafafa"), radius=0, width=0)
        d.text(20, y + 27, name, size=12.5, bold=True)
        d.text(20, y + 44, sub, size=11, colour=MUTED)

    def box(
        lane: int,
        x0: float,
        x1: float,
        label: str,
        colours: tuple[str, str],
        sub: str = "",
        dash: str | None = None,
    ) -> None:
        y = top + lane * lh + 12
        d.rect(x0, y, x1 - x0, lh - 24, colours, dash=dash)
        if sub:
            d.text((x0 + x1) / 2, y + 16, label, size=11.5, anchor="middle")
            d.text((x0 + x1) / 2, y + 31, sub, size=10.5, anchor="middle", colour=MUTED)
        else:
            d.text((x0 + x1) / 2, y + 23, label, size=11.5, anchor="middle")

    box(
        0,
        170,
        880,
        "decode and assemble the next batches, ahead of the trainer",
        GREY,
        'on the reader\'s own threads, or in its reader process (worker="process")',
    )
    box(
        1,
        180,
        410,
        "queue k+2 for the trainer; pull k+3,",
        BLUE,
        "pin it, queue its copy and an event",
    )
    d.text(
        420,
        top + lh + 36,
        "then waits while 2 copied batches are queued (prefetch=2)",
        size=11,
        colour=MUTED,
    )
    box(2, 150, 300, "copies of k+1, k+2", TEAL, "queued earlier", dash="4 3")
    box(2, 420, 600, "copy k+3 (host -> device)", TEAL, "on this side stream")
    for x, label in ((300, "events k+1, k+2"), (600, "event k+3")):
        d.line(
            [(x, top + 2 * lh + 8), (x, top + 3 * lh - 8)], colour=TEAL[1], width=2.5, arrow=False
        )
        d.text(x + 5, top + 2 * lh + 10, label, size=10, colour=TEAL[1])

    # The step on the compute stream.
    steps = [
        (180, 262, "features", "FeatureEngine", BLUE),
        (262, 380, "embedding lookup", "find_or_insert, pool", PURPLE),
        (380, 488, "dense forward", "autocast bf16, loss", BLUE),
        (488, 590, "backward", "-> SparseGrads", RED),
        (590, 690, "sparse step", "rows + their slots", PURPLE),
        (690, 770, "dense step", "torch.optim, LR", BLUE),
    ]
    for x0, x1, label, sub, colours in steps:
        box(3, x0, x1, label, colours, sub)
    wy = top + 3 * lh
    for x, label in ((172, "wait(event k)"), (780, "wait(event k+1)")):
        d.line([(x, wy + 8), (x, wy + lh - 8)], colour=TEAL[1], width=2.5, arrow=False)
        d.text(x, wy + 8, label, size=10, anchor="middle", colour=TEAL[1])
    box(3, 788, 880, "step k+1 ...", GREY, "", dash="4 3")

    # The training thread queues ahead of the GPU, except at host syncs.
    ty = top + 4 * lh
    d.rect(170, ty + 22, 610, 16, GREEN, radius=3)
    d.text(475, ty + 34, "queues kernels, ahead of the GPU", size=10.5, anchor="middle")
    syncs = [
        (320, "unique and new", "id counts"),
        (640, "gradient checks", "(unless deferred)"),
        (775, "loss, every", "log_every steps"),
    ]
    for x, a, b in syncs:
        d.line([(x, ty + 22), (x, wy + lh - 12)], colour=SYNC, width=1.6, dash="4 2")
        d.rect(x - 4, ty + 18, 8, 8, (SYNC, SYNC), radius=4, width=0)
        d.text(x, ty + 52, a, size=10.5, anchor="middle", colour=SYNC)
        d.text(x, ty + 64, b, size=10.5, anchor="middle", colour=SYNC)

    legend_y = top + 5 * lh + 30
    d.rect(20, legend_y - 10, 10, 10, (SYNC, SYNC), radius=5, width=0)
    d.text(
        36,
        legend_y,
        "host sync: the training thread waits for the GPU to get there.",
        size=11.5,
        colour=SYNC,
    )
    d.text(
        430,
        legend_y,
        "The prefetch thread hands batch k over with wait(event k) and record_stream:",
        size=11.5,
        colour=MUTED,
    )
    d.text(
        430,
        legend_y + 15,
        "no host sync, and its memory is not reused while the step reads it.",
        size=11.5,
        colour=MUTED,
    )

    # Every checkpoint_every steps with async_checkpoints: snapshot, then write behind.
    cy = legend_y + 34
    d.line([(20, cy), (880, cy)], colour="#cfd8dc", arrow=False)
    d.text(
        20,
        cy + 24,
        "Every checkpoint_every steps (async_checkpoints=True), after the step:",
        size=13,
        bold=True,
    )
    rows = [("compute stream", 0), ("training thread", 1), ("saver threads", 2)]
    for name, i in rows:
        d.text(20, cy + 56 + i * 34, name, size=12, bold=True)
    sy = cy + 40
    d.rect(170, sy, 170, 24, ORANGE)
    d.text(255, sy + 16, "device -> host snapshot", size=11, anchor="middle")
    d.rect(345, sy, 535, 24, GREY, dash="4 3")
    d.text(612, sy + 16, "steps k+1, k+2, ... train on", size=11, anchor="middle")
    d.rect(170, sy + 34, 170, 24, GREEN)
    d.text(255, sy + 50, "save(blocking=False)", size=11, anchor="middle", mono=True)
    d.line([(343, sy + 34), (343, sy + 58)], colour=SYNC, width=2.5, arrow=False)
    d.text(350, sy + 50, "torch.cuda.synchronize(), then return", size=11, colour=SYNC)
    d.rect(345, sy + 68, 535, 24, ORANGE)
    d.text(
        612,
        sy + 84,
        "write safetensors + JSON (fsync, rename, manifest last), then pin "
        "buffers for the next save",
        size=11,
        anchor="middle",
    )
    d.line([(343, sy + 58), (343, sy + 80), (345, sy + 80)], colour=ORANGE[1], arrow=False)
    return d


DIAGRAMS = {
    "jagged.svg": jagged,
    "paged.svg": paged,
    "hash-table-probing.svg": hash_table,
    "train-step.svg": train_step,
}
"""File name under ``docs/assets/`` -> the function that draws it."""


def main() -> int:
    """Write every diagram; return the exit status."""
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, draw in DIAGRAMS.items():
        draw().write(ASSETS / name)
        print(f"wrote {ASSETS / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
