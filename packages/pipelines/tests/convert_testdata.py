"""Source files of each data set and the rows a conversion should give, shared by the
data converter tests."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from recstack.pipelines.data import (
    CRITEO_CATEGORICAL,
    CRITEO_INTEGER,
    TAOBAO_BEHAVIORS,
)


def rows_of(dst: Path) -> list[dict[str, Any]]:
    """Every row of a conversion's part files, in file order."""
    files = sorted(dst.glob("part-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def leftovers(directory: Path) -> list[str]:
    """Hidden staging directories or temporary files a conversion left behind."""
    return sorted(p.name for p in directory.rglob(".*"))


def criteo_line(label: str, ints: Sequence[str], cats: Sequence[str]) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([label, *ints, *cats])


def criteo_row(label: float | None, ints: Sequence[int | None], cats: Sequence[Any]) -> dict:
    row: dict[str, Any] = {} if label is None else {"label": label}
    row.update(zip(CRITEO_INTEGER, ints, strict=True))
    row.update(zip(CRITEO_CATEGORICAL, cats, strict=True))
    return row


INTS_A = ["1", "", "-2", "0", "", "7", "", "", "12345678901", "", "3", "", "5"]


CATS_A = ["68fd1e64", "", "0000000a", "FFFFFFFF", *([""] * 21), "1"]


INTS_B = [""] * 13


CATS_B = ["deadbeef"] * 26


ROW_A = criteo_row(
    1.0,
    [1, None, -2, 0, None, 7, None, None, 12345678901, None, 3, None, 5],
    [0x68FD1E64, None, 10, 0xFFFFFFFF, *([None] * 21), 1],
)


ROW_B = criteo_row(0.0, [None] * 13, [0xDEADBEEF] * 26)


# Empty fields, a blank line, a CRLF line end and no newline at the end of the file.
CRITEO_TEXT = (
    criteo_line("1", INTS_A, CATS_A) + "\n\n" + criteo_line("0", INTS_B, CATS_B) + "\r\n"
) + criteo_line("1", INTS_A, CATS_A)


def random_criteo_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        ints = [str(rng.randint(-5, 10**6)) if rng.random() > 0.3 else "" for _ in range(13)]
        cats = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.3 else "" for _ in range(26)]
        lines.append(criteo_line(str(rng.randint(0, 1)), ints, cats))
    return lines


def expected_criteo(lines: Sequence[str]) -> list[dict]:
    """The slow, obvious parse of Criteo lines."""
    out = []
    for line in lines:
        f = line.split("\t")
        out.append(
            criteo_row(
                float(f[0]),
                [int(v) if v else None for v in f[1:14]],
                [int(v, 16) if v else None for v in f[14:]],
            )
        )
    return out


def reference_histories(
    rows: list[dict], order: Callable[[dict], tuple], fields: dict[str, str], max_history: int
) -> list[dict]:
    """Each row plus its user's strictly earlier values, oldest first, in ``order``."""
    out = []
    for row in rows:
        earlier = sorted(
            (
                r
                for r in rows
                if r["user_id"] == row["user_id"] and r["timestamp"] < row["timestamp"]
            ),
            key=order,
        )
        recent = earlier[max(len(earlier) - max_history, 0) :] if max_history else []
        out.append({**row, **{name: [r[src] for r in recent] for name, src in fields.items()}})
    return sorted(out, key=order)


def check_user_order(dst: Path, order: Callable[[dict], tuple]) -> None:
    """Each part file is sorted, and no user is in two files."""
    seen: set[int] = set()
    for f in sorted(dst.glob("part-*.parquet")):
        rows = pq.read_table(f).to_pylist()
        assert rows == sorted(rows, key=order)
        users = {r["user_id"] for r in rows}
        assert not users & seen
        seen |= users


ML_RATINGS = [  # (user, item, rating, timestamp)
    (1, 10, 5.0, 100),
    (1, 20, 3.0, 100),  # a tie with the row above: neither is in the other's history
    (1, 30, 4.0, 90),
    (1, 40, 1.0, 200),
    (1, 50, 4.5, 300),
    (2, 10, 2.0, 50),  # a user with one rating
    (3, 20, 4.0, 10),
    (3, 99, 3.5, 20),  # a movie missing from the movies file
    (3, 30, 0.5, 30),
    (7, 40, 4.0, 5),
]


def write_ml_dat(directory: Path) -> Path:
    directory.mkdir()
    lines = [f"{u}::{i}::{r:g}::{t}" for u, i, r, t in ML_RATINGS]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n")
    movies = [
        "10::Toy Story: The Movie (1995)::Comedy",
        "20::Alien: Resurrection (1997)::Action|Sci-Fi",
        "30::Nameless (2001)::(no genres listed)",
        "40::Le Mépris (1963)::Drama",
        "50::M (1931)::Film-Noir",
    ]
    (directory / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    return directory


def taobao_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append(
            {
                "user_id": rng.choice([1, 2, 3, 5, 8, 13, 1_000_000_007]),
                "item_id": rng.randint(1, 6),
                "category_id": rng.randint(1, 3),
                "behavior": rng.randrange(4),
                "timestamp": 1511500000 + rng.randint(0, 8),  # many ties
            }
        )
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"user_id": 99, "item_id": 1, "category_id": 1, "behavior": 0, "timestamp": 1})
    return rows


def write_taobao(path: Path, rows: list[dict]) -> Path:
    lines = [
        f"{r['user_id']},{r['item_id']},{r['category_id']},{TAOBAO_BEHAVIORS[r['behavior']]},"
        f"{r['timestamp']}"
        for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
