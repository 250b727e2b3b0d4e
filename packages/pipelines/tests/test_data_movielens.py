"""recstack.pipelines.data.movielens: histories against a slow reference, both source
formats, options, bad lines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from convert_testdata import (
    ML_RATINGS,
    check_user_order,
    leftovers,
    reference_histories,
    rows_of,
    write_ml_dat,
)

from recstack.columnio import ColumnReader
from recstack.pipelines.data import (
    ConvertError,
    convert_movielens,
    movielens_schema,
)

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
