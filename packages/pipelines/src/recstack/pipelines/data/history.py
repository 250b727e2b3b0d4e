"""Per-user behaviour histories in bounded memory: bucket users, then sort one bucket at a time.

Pass 1 (:class:`UserBuckets`) spreads the rows over ``K`` scratch Parquet files by
``user_id % K``, so every row of a user lands in the same bucket. Pass 2 reads one bucket,
sorts it by user and time (:func:`sort_bucket`) and adds, to every row, the most recent
``max_history`` earlier values of its user (:func:`with_histories`), vectorized with numpy.
Peak memory is one bucket's columns, its sort permutation and one output chunk of lists.

History semantics: rows are ordered by the sort keys (user, timestamp, then tie-breakers,
which makes the order total and the output deterministic). A row's history holds the
values of the same user's rows with a strictly smaller timestamp, oldest first and most
recent last, the last ``max_history`` of them. Rows of one user sharing a timestamp are
not in each other's history; the first row of a user has an empty history.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["UserBuckets", "sort_bucket", "with_histories"]

_INT32_MAX = 2**31 - 1


class UserBuckets:
    """``K`` scratch Parquet files; :meth:`add` sends each row to file ``user % K``.

    Rows are buffered per bucket and written ``flush_rows`` at a time, so memory stays
    about ``K * flush_rows`` rows whatever the input size.

    Args:
        directory: where the bucket files go.
        buckets: ``K``.
        schema: the rows' schema.
        user: the name of the (integer) user column.
        flush_rows: rows buffered per bucket before a write.
    """

    def __init__(
        self,
        directory: Path,
        buckets: int,
        schema: pa.Schema,
        *,
        user: str,
        flush_rows: int = 65_536,
    ) -> None:
        self._directory = directory
        self._buckets = buckets
        self._schema = schema
        self._user = user
        self._flush_rows = flush_rows
        self._pending: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self._pending_rows = [0] * buckets
        self._writers: dict[int, pq.ParquetWriter] = {}

    def _path(self, bucket: int) -> Path:
        return self._directory / f"bucket-{bucket:05d}.parquet"

    def add(self, table: pa.Table) -> None:
        """Spread the rows of ``table`` over the buckets.

        Args:
            table: rows with the buckets' schema.
        """
        if not table.num_rows:
            return
        users = table.column(self._user).to_numpy()
        bucket = np.mod(users, self._buckets)
        order = np.argsort(bucket, kind="stable")
        counts = np.bincount(bucket, minlength=self._buckets)
        grouped = table.take(order)
        start = 0
        for b in np.flatnonzero(counts):
            n = int(counts[b])
            self._pending[b].append(grouped.slice(start, n))
            self._pending_rows[b] += n
            start += n
            if self._pending_rows[b] >= self._flush_rows:
                self._flush(int(b))

    def _flush(self, bucket: int) -> None:
        if not self._pending_rows[bucket]:
            return
        writer = self._writers.get(bucket)
        if writer is None:
            writer = pq.ParquetWriter(self._path(bucket), self._schema, compression="lz4")
            self._writers[bucket] = writer
        writer.write_table(pa.concat_tables(self._pending[bucket]))
        self._pending[bucket] = []
        self._pending_rows[bucket] = 0

    def close(self) -> list[Path]:
        """Write what is buffered and close the files; return the non-empty buckets' paths."""
        for bucket in range(self._buckets):
            self._flush(bucket)
        for writer in self._writers.values():
            writer.close()
        return [self._path(b) for b in sorted(self._writers)]


def sort_bucket(path: Path, sort_keys: Sequence[str]) -> pa.Table:
    """Read a bucket file and sort it ascending by ``sort_keys`` (first key first).

    Args:
        path: a bucket file written by :class:`UserBuckets`.
        sort_keys: column names, most significant first (user, timestamp, tie-breakers).
    """
    table = pq.read_table(path)
    return table.sort_by([(key, "ascending") for key in sort_keys]).combine_chunks()


def _starts(new_group: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row of its group (groups are contiguous)."""
    index = np.arange(len(new_group), dtype=np.int64)
    return np.maximum.accumulate(np.where(new_group, index, 0))


def with_histories(
    table: pa.Table,
    *,
    user: str,
    time: str,
    lists: Mapping[str, str],
    max_history: int,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """``table`` (sorted by user and time) in chunks, with history list columns appended.

    Args:
        table: rows sorted by ``user``, then ``time``, then any tie-breakers.
        user: the user column.
        time: the timestamp column.
        lists: new column name -> the column whose earlier values it lists, e.g.
            ``{"hist_items": "item_id"}``; each becomes ``list<type of that column>``.
        max_history: the most recent values kept per row.
        chunk_rows: rows per yielded chunk (lowered so a chunk's list values stay
            addressable by 32-bit offsets).
    """
    n = table.num_rows
    users = table.column(user).to_numpy()
    times = table.column(time).to_numpy()
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_moment = new_user.copy()
    new_moment[1:] |= times[1:] != times[:-1]
    user_start = _starts(new_user)
    # History ends where the row's (user, timestamp) run begins: ties are not "before".
    history_end = _starts(new_moment)
    sources = {name: table.column(col).to_numpy() for name, col in lists.items()}
    types = {name: pa.list_(table.schema.field(col).type) for name, col in lists.items()}
    chunk_rows = max(1, min(chunk_rows, _INT32_MAX // max(max_history, 1)))
    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        end = history_end[a:b]
        start = np.maximum(user_start[a:b], end - max_history)
        lengths = end - start
        offsets = np.zeros(b - a + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
        chunk = table.slice(a, b - a)
        for name, values in sources.items():
            column = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(values[gather]), type=types[name]
            )
            chunk = chunk.append_column(name, column)
        yield chunk
