"""The data set converters: exact outputs on small files written in each public format."""

from __future__ import annotations

import bz2
import gzip
import inspect
import io
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from recstack.columnio import Column, ColumnReader
from recstack.pipelines.data import (
    CONVERTERS,
    CRITEO_CATEGORICAL,
    CRITEO_INTEGER,
    TAOBAO_BEHAVIORS,
    ConvertError,
    convert_criteo,
    convert_movielens,
    convert_taobao,
    criteo_schema,
    movielens_schema,
    taobao_schema,
)
from recstack.pipelines.data.common import Progress

# ------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------ criteo


def test_criteo_values_are_exact(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    report = convert_criteo(src, tmp_path / "out")
    assert rows_of(tmp_path / "out") == [ROW_A, ROW_B, ROW_A]
    assert pq.read_schema(report.files[0]).remove_metadata() == criteo_schema()
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (3, 3, 0)
    assert report.files == [str(tmp_path / "out" / "part-00000.parquet")]
    assert report.bytes_written == (tmp_path / "out" / "part-00000.parquet").stat().st_size
    assert report.bytes_read == src.stat().st_size
    assert report.seconds > 0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("suffix", "compress"), [(".gz", gzip.compress), (".bz2", bz2.compress)])
def test_criteo_reads_compressed_input(
    tmp_path: Path, suffix: str, compress: Callable[[bytes], bytes]
) -> None:
    lines = random_criteo_lines(3000)
    src = tmp_path / f"day_0{suffix}"
    src.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    report = convert_criteo(src, tmp_path / "out", block_size=4096)
    assert rows_of(tmp_path / "out") == expected_criteo(lines)
    assert report.bytes_read == src.stat().st_size


def test_criteo_categorical_strings(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    convert_criteo(src, tmp_path / "out", categorical="string")
    first = rows_of(tmp_path / "out")[0]
    assert [first[c] for c in CRITEO_CATEGORICAL[:4]] == ["68fd1e64", None, "0000000a", "FFFFFFFF"]
    assert first["I9"] == 12345678901


def test_criteo_without_label(tmp_path: Path) -> None:
    src = tmp_path / "test.txt"
    src.write_text("\t".join(INTS_A + CATS_A) + "\n")
    convert_criteo(src, tmp_path / "out", has_label=False)
    assert rows_of(tmp_path / "out") == [{k: v for k, v in ROW_A.items() if k != "label"}]


def test_criteo_parts_row_groups_and_several_sources(tmp_path: Path) -> None:
    lines = random_criteo_lines(10, seed=3)
    (tmp_path / "day_0").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "day_1").write_text("\n".join(lines[6:]) + "\n")
    report = convert_criteo(
        [tmp_path / "day_0", tmp_path / "day_1"],
        tmp_path / "out",
        rows_per_file=4,
        row_group_size=3,
    )
    groups = [
        [
            pq.ParquetFile(f).metadata.row_group(i).num_rows
            for i in range(pq.ParquetFile(f).num_row_groups)
        ]
        for f in report.files
    ]
    assert groups == [[3, 1], [3, 1], [2]]
    assert [Path(f).name for f in report.files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert rows_of(tmp_path / "out") == expected_criteo(lines)


def test_criteo_empty_input_writes_an_empty_file(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text("")
    report = convert_criteo(src, tmp_path / "out")
    assert report.rows_written == 0 and len(report.files) == 1
    table = pq.read_table(report.files[0])
    assert table.num_rows == 0 and table.schema.remove_metadata() == criteo_schema()


def test_criteo_reads_back_with_column_reader(tmp_path: Path) -> None:
    lines = random_criteo_lines(50, seed=5)
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines) + "\n")
    convert_criteo(src, tmp_path / "out", rows_per_file=20)
    expected = expected_criteo(lines)
    columns = [Column("label"), *(Column(n, default=-1) for n in ["I1", "C1"])]
    with ColumnReader(tmp_path / "out", columns, batch_size=50) as reader:
        (batch,) = list(reader)
    assert batch["label"].dtype == torch.float32
    assert batch["label"].tolist() == [r["label"] for r in expected]
    assert batch["I1"].dtype == torch.int64
    assert batch["I1"].tolist() == [-1 if r["I1"] is None else r["I1"] for r in expected]
    assert batch["C1"].tolist() == [-1 if r["C1"] is None else r["C1"] for r in expected]


BAD_CRITEO = [
    ("1\t2\t3", "expected 40 fields separated by '\\t', found 3"),
    (criteo_line("2", INTS_B, CATS_B), "label '2' is not 0 or 1"),
    (criteo_line("1", ["x1", *INTS_B[1:]], CATS_B), "I1 'x1' is not an integer"),
    (criteo_line("1", INTS_B, [*CATS_B[:3], "zz", *CATS_B[4:]]), "C4 'zz' is not a hex number"),
    (criteo_line("1", INTS_B, ["1" * 17, *CATS_B[1:]]), "C1 '11111111111111111' is not a hex"),
    (criteo_line("1", INTS_B, ["8000000000000000", *CATS_B[1:]]), "C1 '8000000000000000' is not"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CRITEO)
def test_criteo_bad_line_names_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    src = tmp_path / "train.txt"
    good = criteo_line("0", INTS_A, CATS_A)
    src.write_text("\n".join([good, "", bad, good]) + "\n")
    with pytest.raises(ConvertError, match="line 3") as info:
        convert_criteo(src, tmp_path / "out")
    assert info.value.path == str(src) and info.value.line == 3
    assert str(info.value).startswith(f"{src}, line 3: {message}")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_criteo_bad_lines_deep_in_a_file(tmp_path: Path) -> None:
    # Small blocks, so the bad lines lie many blocks after the fast reader started.
    lines = random_criteo_lines(2000, seed=7)
    text = list(lines)
    text[1499] = "1\t2"
    text[1799] = criteo_line("1", ["1.5", *INTS_B[1:]], CATS_B)
    src = tmp_path / "train.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))
    with pytest.raises(ConvertError) as info:
        convert_criteo(src, tmp_path / "out", block_size=2048)
    assert info.value.line == 1500
    report = convert_criteo(src, tmp_path / "out", block_size=2048, on_error="skip")
    kept = lines[:1499] + lines[1500:1799] + lines[1800:]
    assert rows_of(tmp_path / "out") == expected_criteo(kept)
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (2000, 1998, 2)
    assert report.skipped_examples == [
        f"{src}, line 1500: expected 40 fields separated by '\\t', found 2",
        f"{src}, line 1800: I1 '1.5' is not an integer",
    ]
    assert "2 bad rows skipped" in report.summary()


def test_destination_is_replaced_only_when_safe(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    dst = tmp_path / "out"
    dst.mkdir()  # an empty directory is fine
    convert_criteo(src, dst)
    with pytest.raises(ConvertError, match="not empty"):
        convert_criteo(src, dst)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\n")
    with pytest.raises(ConvertError, match="line 1"):
        convert_criteo(bad, dst, overwrite=True)
    assert rows_of(dst) == [ROW_A, ROW_B, ROW_A]  # the failed run left the old output
    convert_criteo(src, dst, overwrite=True, rows_per_file=1)
    assert sorted(p.name for p in dst.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="refusing"):
        convert_criteo(src, dst, overwrite=True)
    with pytest.raises(ConvertError, match="not a directory"):
        convert_criteo(src, dst / "notes.txt")
    assert leftovers(tmp_path) == []


def test_criteo_rejects_bad_options(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text(CRITEO_TEXT)
    with pytest.raises(ValueError, match="rows_per_file"):
        convert_criteo(src, tmp_path / "out", rows_per_file=0)
    with pytest.raises(ValueError, match="categorical"):
        convert_criteo(src, tmp_path / "out", categorical="hex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        convert_criteo(src, tmp_path / "out", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConvertError, match="is not a file"):
        convert_criteo(tmp_path / "missing.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ histories


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


# ------------------------------------------------------------------------------ movielens

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
ML_GENRES = {10: ["Comedy"], 20: ["Action", "Sci-Fi"], 30: [], 40: ["Drama"], 50: ["Film-Noir"]}


def ml_expected(max_history: int, threshold: float = 4.0, genres: bool = True) -> list[dict]:
    rows = [
        {
            "user_id": u,
            "item_id": i,
            "rating": r,
            "timestamp": t,
            "label": float(r >= threshold),
        }
        for u, i, r, t in ML_RATINGS
    ]
    out = reference_histories(
        rows,
        lambda r: (r["user_id"], r["timestamp"], r["item_id"]),
        {"history": "item_id"},
        max_history,
    )
    if genres:
        for row in out:
            row["genres"] = ML_GENRES.get(row["item_id"], [])
    return out


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


def write_ml_csv(directory: Path) -> Path:
    directory.mkdir()
    lines = ["userId,movieId,rating,timestamp"] + [
        f"{u},{i},{r:g},{t}" for u, i, r, t in ML_RATINGS
    ]
    (directory / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = [
        "movieId,title,genres",
        '10,"Toy Story, The Movie (1995)",Comedy',
        "20,Alien: Resurrection (1997),Action|Sci-Fi",
        '30,"Nameless, ""Untitled"" (2001)",(no genres listed)',
        "40,Le Mépris (1963),Drama",
        "50,M (1931),Film-Noir",
    ]
    (directory / "movies.csv").write_text("\n".join(movies) + "\n", encoding="utf-8")
    return directory


ML_ORDER = lambda r: (r["user_id"], r["timestamp"], r["item_id"])  # noqa: E731


@pytest.mark.parametrize("writer", [write_ml_dat, write_ml_csv])
@pytest.mark.parametrize(("max_history", "buckets"), [(2, 1), (50, 3), (0, 2)])
def test_movielens_histories_match_reference(
    tmp_path: Path, writer: Callable[[Path], Path], max_history: int, buckets: int
) -> None:
    src = writer(tmp_path / "ml")
    report = convert_movielens(src, tmp_path / "out", max_history=max_history, buckets=buckets)
    assert sorted(rows_of(tmp_path / "out"), key=ML_ORDER) == ml_expected(max_history)
    check_user_order(tmp_path / "out", ML_ORDER)
    assert pq.read_schema(report.files[0]).remove_metadata() == movielens_schema(genres=True)
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (10, 10, 0)
    assert leftovers(tmp_path) == []


def test_movielens_options(tmp_path: Path) -> None:
    src = write_ml_csv(tmp_path / "ml")
    convert_movielens(src / "ratings.csv", tmp_path / "a", threshold=3.5, genres=False)
    rows = sorted(rows_of(tmp_path / "a"), key=ML_ORDER)
    assert rows == ml_expected(50, threshold=3.5, genres=False)
    (src / "movies.csv").rename(tmp_path / "films.csv")
    convert_movielens(src, tmp_path / "b")  # no movies file: no genres column
    assert "genres" not in pq.read_schema(next((tmp_path / "b").glob("*.parquet"))).names
    convert_movielens(src, tmp_path / "c", movies=tmp_path / "films.csv")
    assert sorted(rows_of(tmp_path / "c"), key=ML_ORDER) == ml_expected(50)
    with pytest.raises(ConvertError, match="movies.csv: not found"):
        convert_movielens(src, tmp_path / "d", genres=True)


def test_movielens_reads_back_with_column_reader(tmp_path: Path) -> None:
    src = write_ml_dat(tmp_path / "ml")
    convert_movielens(src, tmp_path / "out", max_history=2, buckets=1)
    expected = ml_expected(2)
    with ColumnReader(
        tmp_path / "out", ["user_id", "history", "genres", "label"], batch_size=64
    ) as reader:
        (batch,) = list(reader)
    assert batch["user_id"].tolist() == [r["user_id"] for r in expected]
    assert batch["history"].lengths().tolist() == [len(r["history"]) for r in expected]
    assert batch["history"].values.tolist() == [i for r in expected for i in r["history"]]
    assert batch["genres"].lengths().tolist() == [len(r["genres"]) for r in expected]


@pytest.mark.parametrize(
    ("name", "text", "line", "message"),
    [
        ("ratings.csv", "userId,movieId,rating\n1,2,3\n", 1, "expected the header"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,x,4\n", 3, "rating 'x'"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,nan,4\n", 2, "rating 'nan' is not"),
        ("ratings.dat", "1::2::3::4\n1::2::3\n", 2, "expected 4 fields separated by '::'"),
        ("ratings.dat", "1::2::3::4\n\n\n1::2.0::3::4\n", 4, "movie id '2.0' is not an integer"),
        ("ratings.dat", "1::2::3::4\n1::2::3::\n", 2, "timestamp '' is not an integer"),
    ],
)
def test_movielens_bad_lines(tmp_path: Path, name: str, text: str, line: int, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConvertError) as info:
        convert_movielens(tmp_path / name, tmp_path / "out")
    assert (info.value.line, info.value.path) == (line, str(tmp_path / name))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_movielens_bad_movies_file_and_sources(tmp_path: Path) -> None:
    src = write_ml_dat(tmp_path / "ml")
    (src / "movies.dat").write_text("10::A (1995)::Comedy\n10::B (1996)::Drama\n")
    with pytest.raises(ConvertError, match=r"movies.dat, line 2: movie id 10 appears twice"):
        convert_movielens(src, tmp_path / "out")
    (src / "movies.dat").write_text("x::A (1995)::Comedy\n")
    with pytest.raises(ConvertError, match=r"line 1: movie id 'x' is not an integer"):
        convert_movielens(src, tmp_path / "out")
    (src / "ratings.csv").write_text("")
    with pytest.raises(ConvertError, match="both ratings.dat and ratings.csv"):
        convert_movielens(src, tmp_path / "out")
    (tmp_path / "ratings.tsv").write_text("")
    with pytest.raises(ConvertError, match="neither a .dat nor a .csv"):
        convert_movielens(tmp_path / "ratings.tsv", tmp_path / "out")


def test_movielens_skip_counts_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::4::5\n1::x::4::6\n1::20::2::7\n2::30\n")
    report = convert_movielens(tmp_path / "ratings.dat", tmp_path / "out", on_error="skip")
    rows = rows_of(tmp_path / "out")
    assert [(r["item_id"], r["history"]) for r in rows] == [(10, []), (20, [10])]
    assert (report.rows_in, report.rows_written, report.rows_skipped) == (4, 2, 2)
    assert [e.split(": ", 1)[1] for e in report.skipped_examples] == [
        "movie id 'x' is not an integer",
        "expected 4 fields separated by '::', found 2",
    ]


# ------------------------------------------------------------------------------ taobao


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


TB_ORDER = lambda r: (  # noqa: E731
    r["user_id"],
    r["timestamp"],
    r["item_id"],
    r["category_id"],
    r["behavior"],
)


def tb_expected(rows: list[dict], max_history: int, positive: set[int]) -> list[dict]:
    labelled = [{**r, "label": float(r["behavior"] in positive)} for r in rows]
    fields = {"hist_items": "item_id", "hist_categories": "category_id"}
    return reference_histories(labelled, TB_ORDER, fields, max_history)


@pytest.mark.parametrize(("max_history", "buckets"), [(3, 1), (3, 4), (100, 2)])
def test_taobao_histories_match_reference(tmp_path: Path, max_history: int, buckets: int) -> None:
    rows = taobao_rows(200, seed=11)
    src = write_taobao(tmp_path / "UserBehavior.csv", rows)
    report = convert_taobao(tmp_path, tmp_path / "out", max_history=max_history, buckets=buckets)
    got = sorted(rows_of(tmp_path / "out"), key=lambda r: (TB_ORDER(r), r["hist_items"]))
    assert got == tb_expected(rows, max_history, positive={1, 2, 3})
    check_user_order(tmp_path / "out", TB_ORDER)
    assert pq.read_schema(report.files[0]).remove_metadata() == taobao_schema()
    assert report.sources == [str(src)]
    assert (report.rows_in, report.rows_written) == (202, 202)


def test_taobao_label_options_and_compressed_input(tmp_path: Path) -> None:
    rows = taobao_rows(60, seed=12)
    plain = write_taobao(tmp_path / "UserBehavior.csv", rows)
    src = tmp_path / "UserBehavior.csv.gz"
    src.write_bytes(gzip.compress(plain.read_bytes()))
    convert_taobao(src, tmp_path / "a", positive_behaviors="buy", max_history=2)
    assert sorted(rows_of(tmp_path / "a"), key=TB_ORDER) == tb_expected(rows, 2, positive={1})
    convert_taobao(src, tmp_path / "b", positive_behaviors=["pv", "fav"], max_history=2)
    assert sorted(rows_of(tmp_path / "b"), key=TB_ORDER) == tb_expected(rows, 2, positive={0, 3})
    with pytest.raises(ValueError, match="unknown \\['click'\\]"):
        convert_taobao(src, tmp_path / "c", positive_behaviors=["click"])


def test_taobao_reads_back_with_column_reader(tmp_path: Path) -> None:
    rows = taobao_rows(40, seed=13)
    write_taobao(tmp_path / "UserBehavior.csv", rows)
    convert_taobao(tmp_path, tmp_path / "out", max_history=4, buckets=1)
    expected = sorted(tb_expected(rows, 4, {1, 2, 3}), key=TB_ORDER)
    names = ["behavior", "hist_items", "hist_categories", "label"]
    with ColumnReader(tmp_path / "out", names, batch_size=1000) as reader:
        (batch,) = list(reader)
    got = list(zip(*(batch[n].tolist() for n in ["behavior", "label"]), strict=True))
    assert got == [(r["behavior"], r["label"]) for r in expected]
    items = batch["hist_items"]
    assert (
        items.offsets.tolist()[1:]
        == torch.tensor([len(r["hist_items"]) for r in expected]).cumsum(0).tolist()
    )
    assert items.values.tolist() == [i for r in expected for i in r["hist_items"]]
    assert batch["hist_categories"].values.tolist() == [
        c for r in expected for c in r["hist_categories"]
    ]


def test_taobao_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text("1,2,3,pv,10\n1,2,3,click,11\n1,2,3,buy\n1,4,3,cart,12\n")
    with pytest.raises(ConvertError, match=r"line 2: behavior 'click' is not one of"):
        convert_taobao(src, tmp_path / "out")
    report = convert_taobao(src, tmp_path / "out", on_error="skip")
    assert [(r["item_id"], r["hist_items"]) for r in rows_of(tmp_path / "out")] == [
        (2, []),
        (4, [2]),
    ]
    assert report.rows_skipped == 2
    assert [e.split(", line ")[1][:1] for e in report.skipped_examples] == ["2", "3"]


def test_history_converters_handle_empty_input(tmp_path: Path) -> None:
    (tmp_path / "UserBehavior.csv").write_text("\n")
    report = convert_taobao(tmp_path, tmp_path / "out")
    assert report.rows_written == 0 and len(report.files) == 1
    assert pq.read_table(report.files[0]).schema.remove_metadata() == taobao_schema()


# ------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_registry_describes_each_converter(name: str) -> None:
    converter = CONVERTERS[name]
    assert converter.name == name and converter.description and converter.source
    parameters = inspect.signature(converter.convert).parameters
    assert list(parameters)[:2] == ["src", "dst"]
    keywords = {k: p.default for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert {o.name: o.default for o in converter.options} == keywords
    for option in converter.options:
        assert option.help
        if option.choices and not option.multiple and option.default is not None:
            assert option.default in option.choices


def test_registry_converts(tmp_path: Path) -> None:
    src = write_ml_dat(tmp_path / "ml")
    report = CONVERTERS["movielens"].convert(src, tmp_path / "out", max_history=2)
    assert report.dataset == "movielens" and report.rows_written == 10
    assert report.to_dict()["rows_written"] == 10


# ------------------------------------------------------------------------------ progress


def test_progress_line() -> None:
    stream = io.StringIO()
    bar = Progress("criteo train.txt", 4_000_000_000, enabled=True, stream=stream)
    bar.advance(1_000_000_000)
    bar.close()
    text = stream.getvalue()
    assert "\rcriteo train.txt: 1.00 GB / 4.00 GB  25%" in text and text.endswith("\n")
    silent = io.StringIO()  # not a terminal: nothing printed by default
    Progress("x", stream=silent).advance(5)
    assert silent.getvalue() == ""


def test_converter_shows_progress_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_ml_dat(tmp_path / "ml")
    convert_movielens(src, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "movielens: reading" in err and "movielens: histories" in err


def test_good_files_never_take_the_line_numbered_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recstack.pipelines.data import text

    calls: list[str] = []
    exact = text._exact_blocks

    def counting(path: Path, *args: Any) -> Any:
        calls.append(path.name)
        return exact(path, *args)

    monkeypatch.setattr(text, "_exact_blocks", counting)
    src = tmp_path / "train.txt"
    src.write_text("\n".join(random_criteo_lines(500)) + "\n")
    convert_criteo(src, tmp_path / "a", block_size=4096)
    write_taobao(tmp_path / "UserBehavior.csv", taobao_rows(100, seed=1))
    convert_taobao(tmp_path, tmp_path / "b")
    assert calls == []
    (tmp_path / "bad.txt").write_text(CRITEO_TEXT + "\n1\t2\n")
    report = convert_criteo(tmp_path / "bad.txt", tmp_path / "c", on_error="skip")
    assert calls == ["bad.txt"]
    assert rows_of(tmp_path / "c") == [ROW_A, ROW_B, ROW_A]  # CRLF read alike by both readers
    assert report.skipped_examples == [
        f"{tmp_path / 'bad.txt'}, line 5: expected 40 fields separated by '\\t', found 2"
    ]
