"""MovieLens ratings (ml-1m, ml-10m, ml-20m, ml-25m, ml-latest) to Parquet with user histories.

Two source formats:

* ``ratings.dat`` (ml-1m, ml-10m): ``UserID::MovieID::Rating::Timestamp``, no header;
  ``movies.dat``: ``MovieID::Title::Genres`` (Latin-1 text).
* ``ratings.csv`` (ml-20m, ml-25m, ml-latest): header ``userId,movieId,rating,timestamp``;
  ``movies.csv``: header ``movieId,title,genres`` (titles may be quoted).

Genres are ``|``-separated; ``(no genres listed)`` becomes an empty list.

Output columns, in this order:

* ``user_id``, ``item_id``: int64 (the MovieLens ids as they are).
* ``rating``: float32 (0.5 to 5 stars).
* ``timestamp``: int64 seconds since 1970.
* ``label``: float32, 1.0 when ``rating >= threshold`` (default 4), else 0.0.
* ``history``: ``list<int64>``, the items the user rated strictly before this rating's
  timestamp, oldest first, the most recent ``max_history`` (default 50) of them.
  Ratings of one user with equal timestamps are ordered by item id, and none of them is in
  the history of another (a DIN model must not see the present as the past).
* ``genres``: ``list<string>`` of the movie (when joined; empty for a movie missing from
  the movies file).

Rows are ordered by user bucket, then user, timestamp and item id (see
:mod:`recstack.pipelines.data.history`); each user bucket is one part file.

Memory: the ratings are bucketed by ``user_id % buckets`` and one bucket is sorted at a
time, at about 160 bytes per rating. With the default ``buckets`` (one per 256 MB of text)
ml-25m's 25M ratings (678 MB) take 3 buckets and the conversion needs about 1.5 GB beyond
the Python process itself; ``buckets=1`` sorts everything at once (about 4 GB for ml-25m).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recstack.pipelines.data.common import ConvertError, ConvertReport, OnError, Problems
from recstack.pipelines.data.sequences import HistoryLayout, TextFormat, convert_with_histories
from recstack.pipelines.data.text import COMPRESSIONS, FieldBlock, parse_float, parse_int, show

__all__ = ["NO_GENRES", "convert_movielens", "load_genres", "movielens_schema"]

#: The genre string MovieLens writes for a movie without genres (read as no genre).
NO_GENRES = "(no genres listed)"

_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
_MOVIES_HEADER = ["movieId", "title", "genres"]

_BASE = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("rating", pa.float32()),
        pa.field("timestamp", pa.int64()),
        pa.field("label", pa.float32()),
    ]
)


def movielens_schema(genres: bool) -> pa.Schema:
    """The schema of the converted files.

    Args:
        genres: whether the ``genres`` column is there.
    """
    schema = _BASE.append(pa.field("history", pa.list_(pa.int64())))
    return schema.append(pa.field("genres", pa.list_(pa.string()))) if genres else schema


def _kind(path: Path) -> str:
    """``".dat"`` or ``".csv"``: the format of a ratings or movies file, compressed or not."""
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    kind = os.path.splitext(name)[1]
    if kind not in (".dat", ".csv"):
        raise ConvertError("is neither a .dat nor a .csv MovieLens file", path=str(path))
    return kind


def _ratings_file(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.is_dir():
        raise ConvertError("does not exist", path=str(src))
    found = [src / name for name in ("ratings.dat", "ratings.csv") if (src / name).is_file()]
    if len(found) != 1:
        what = "both ratings.dat and ratings.csv" if found else "no ratings.dat or ratings.csv"
        raise ConvertError(f"holds {what}; give the ratings file itself", path=str(src))
    return found[0]


def _genre_list(text: str) -> list[str]:
    return [g for g in text.split("|") if g and g != NO_GENRES]


def _movie_rows(path: Path, text: str) -> Iterator[tuple[int, str, str]]:
    """``(line, movie id, genres)`` of a movies file."""
    if _kind(path) == ".dat":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            # Titles may hold ':'; the id is the first field and the genres the last.
            movie, sep, rest = line.partition("::")
            if not sep or "::" not in rest:
                raise ConvertError("expected MovieID::Title::Genres", path=str(path), line=number)
            yield number, movie, rest.rpartition("::")[2]
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header != _MOVIES_HEADER:
        raise ConvertError(
            f"expected the header {','.join(_MOVIES_HEADER)!r}, found {header!r}",
            path=str(path),
            line=1,
        )
    for row in reader:
        if not row:
            continue
        if len(row) != 3:
            raise ConvertError(
                f"expected 3 fields (movieId,title,genres), found {len(row)}",
                path=str(path),
                line=reader.line_num,
            )
        yield reader.line_num, row[0], row[2]


def load_genres(path: Path) -> tuple[pa.Array, pa.Array]:
    """``(movie ids, genre lists)`` of a ``movies.dat`` or ``movies.csv`` file.

    The genre lists have one more entry than the ids, an empty list, for movies that are
    not in the file.

    Args:
        path: the movies file (maybe compressed).

    Raises:
        ConvertError: a malformed line, an id that is not an integer or appears twice.
    """
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            data = stream.read()
    except (OSError, pa.ArrowException) as exc:
        raise ConvertError(f"cannot read: {exc}", path=str(path)) from exc
    # ml-1m's movies.dat is Latin-1; the csv files are UTF-8.
    text = data.decode("latin-1" if _kind(path) == ".dat" else "utf-8", "replace")
    ids: list[int] = []
    genres: list[list[str]] = []
    seen: set[int] = set()
    for number, movie, genre_text in _movie_rows(path, text):
        try:
            movie_id = int(movie)
        except ValueError:
            raise ConvertError(
                f"movie id {movie!r} is not an integer", path=str(path), line=number
            ) from None
        if movie_id in seen:
            raise ConvertError(f"movie id {movie_id} appears twice", path=str(path), line=number)
        seen.add(movie_id)
        ids.append(movie_id)
        genres.append(_genre_list(genre_text))
    genres.append([])
    return pa.array(ids, type=pa.int64()), pa.array(genres, type=pa.list_(pa.string()))


def _join_genres(ids: pa.Array, genres: pa.Array) -> Callable[[pa.Table], pa.Table]:
    missing = len(ids)

    def finish(chunk: pa.Table) -> pa.Table:
        where = pc.index_in(chunk.column("item_id"), value_set=ids)
        return chunk.append_column("genres", genres.take(pc.fill_null(where, missing)))

    return finish


def _parse(block: FieldBlock, problems: Problems, threshold: float) -> pa.Table:
    user, item, rating, stamp = block.fields
    users, bad_user = parse_int(user, nullable=False)
    items, bad_item = parse_int(item, nullable=False)
    ratings, bad_rating = parse_float(rating, pa.float64())
    stamps, bad_stamp = parse_int(stamp, nullable=False)
    labels = pc.greater_equal(ratings, threshold).cast(pa.float32())
    table = pa.Table.from_arrays(
        [users, items, ratings.cast(pa.float32()), stamps, labels], schema=_BASE
    )
    keep = problems.reject(
        block.path,
        block.lines,
        [
            (bad_user, lambda i: f"user id {show(user, i)} is not an integer"),
            (bad_item, lambda i: f"movie id {show(item, i)} is not an integer"),
            (bad_rating, lambda i: f"rating {show(rating, i)} is not a finite number"),
            (bad_stamp, lambda i: f"timestamp {show(stamp, i)} is not an integer"),
        ],
    )
    return table if keep is None else table.filter(pa.array(keep))


def convert_movielens(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    threshold: float = 4.0,
    max_history: int = 50,
    genres: bool | None = None,
    movies: str | os.PathLike[str] | None = None,
    buckets: int | None = None,
    row_group_size: int = 65_536,
    compression: str = "zstd",
    on_error: OnError = "raise",
    overwrite: bool = False,
    progress: bool | None = None,
) -> ConvertReport:
    """Convert MovieLens ratings into ``dst/part-*.parquet`` with labels and histories.

    See the module docstring for the columns, the history rule and the memory use.

    Args:
        src: the unpacked data set's directory (holding ``ratings.dat`` or
            ``ratings.csv``), or the ratings file itself (maybe ``.gz``/``.bz2``/``.zst``).
        dst: the output directory; it appears complete or not at all.
        threshold: ``label`` is 1.0 when ``rating >= threshold``.
        max_history: the most recent earlier items kept in ``history`` (0: always empty).
        genres: add the ``genres`` column from the movies file; ``None`` adds it when the
            movies file exists.
        movies: the movies file; default ``movies.dat``/``movies.csv`` (the ratings'
            format) beside the ratings file.
        buckets: user buckets sorted one at a time; ``None``: one per 256 MB of text.
        row_group_size: rows per Parquet row group (and per chunk of history lists built
            at a time: 65,536 rows of 50 items are 26 MB per list column).
        compression: the Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
        on_error: ``"raise"`` stops at the first bad line with a :class:`ConvertError`
            naming the file, line and field; ``"skip"`` drops bad lines and counts them in
            the report. Bad: a wrong number of fields, an id or timestamp that is not an
            integer, a rating that is not a finite number. Blank lines are ignored.
        overwrite: replace ``dst`` if it holds a previous conversion.
        progress: show progress lines on stderr; ``None`` shows them on a terminal.

    Returns:
        The :class:`ConvertReport`.

    Raises:
        ConvertError: a missing or malformed input (bad lines with ``on_error="raise"``),
            or a ``dst`` that is in the way.
        ValueError: an invalid option.
    """
    ratings = _ratings_file(Path(src))
    kind = _kind(ratings)
    movies_file = Path(movies) if movies is not None else ratings.parent / f"movies{kind}"
    if genres is None:
        genres = movies_file.is_file()
    finish = None
    if genres:
        if not movies_file.is_file():
            raise ConvertError("not found; pass movies= or genres=False", path=str(movies_file))
        finish = _join_genres(*load_genres(movies_file))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")

    text = TextFormat(
        separator="::" if kind == ".dat" else ",",
        num_fields=4,
        parse=lambda block, problems: _parse(block, problems, float(threshold)),
        header=_CSV_HEADER if kind == ".csv" else None,
    )
    layout = HistoryLayout(
        base=_BASE,
        schema=movielens_schema(bool(genres)),
        user="user_id",
        time="timestamp",
        sort_keys=("user_id", "timestamp", "item_id", "rating"),
        lists={"history": "item_id"},
        finish=finish,
    )
    return convert_with_histories(
        "movielens",
        [ratings],
        text,
        layout,
        dst,
        max_history=max_history,
        buckets=buckets,
        row_group_size=row_group_size,
        compression=compression,
        on_error=on_error,
        overwrite=overwrite,
        progress=progress,
        metadata={
            "source": ratings.name,
            "threshold": float(threshold),
            "max_history": max_history,
            "genres": bool(genres),
        },
    )
