"""Taobao ``UserBehavior.csv`` (Alibaba Tianchi) to Parquet with per-user behaviour sequences.

Each line: ``user_id,item_id,category_id,behavior_type,timestamp``, no header, where
``behavior_type`` is one of ``pv`` (page view), ``buy``, ``cart`` (add to cart), ``fav``
(favourite). The full file has about 100M lines (3.5 GB).

Output columns, in this order:

* ``user_id``, ``item_id``, ``category_id``: int64.
* ``behavior``: int8, the index in :data:`TAOBAO_BEHAVIORS`: 0 ``pv``, 1 ``buy``,
  2 ``cart``, 3 ``fav``.
* ``timestamp``: int64 seconds since 1970 (as in the file; the data set's nominal window
  is 2017-11-25 to 2017-12-03, and a few rows lie outside it; they are kept).
* ``label``: float32, 1.0 when the behaviour is in ``positive_behaviors`` (default
  ``buy``, ``cart`` and ``fav``: the engagements beyond a page view, as in
  conversion-style CTR tasks on this data), else 0.0.
* ``hist_items``, ``hist_categories``: ``list<int64>``, the items and their categories of
  the user's behaviours (of every type) strictly before this row's timestamp, oldest
  first, the most recent ``max_history`` (default 50). Rows of one user with equal
  timestamps are ordered by item, category and behaviour, and none is in another's history.

Rows are ordered by user bucket, then user, timestamp, item, category and behaviour; each
bucket is one part file.

Memory: users are bucketed by ``user_id % buckets`` in a first pass and one bucket is
sorted at a time, so memory is bounded by one bucket (about 160 bytes per row): with the
default ``buckets`` (one per 256 MB of text: 14 for the full file, about 7M rows each) the
conversion needs about 1.5 GB beyond the Python process itself. Scratch space on the
destination's disk: about the size of the input. The output is large because every row
carries its histories: expect a few GB of Parquet for the full file.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recstack.pipelines.data.common import ConvertError, ConvertReport, OnError, Problems
from recstack.pipelines.data.sequences import HistoryLayout, TextFormat, convert_with_histories
from recstack.pipelines.data.text import FieldBlock, parse_choice, parse_int, show

__all__ = ["TAOBAO_BEHAVIORS", "convert_taobao", "taobao_schema"]

#: Behaviour names; the ``behavior`` column holds an index into this tuple.
TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")

_BASE = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("category_id", pa.int64()),
        pa.field("behavior", pa.int8()),
        pa.field("timestamp", pa.int64()),
        pa.field("label", pa.float32()),
    ]
)


def taobao_schema() -> pa.Schema:
    """The schema of the converted files."""
    return _BASE.append(pa.field("hist_items", pa.list_(pa.int64()))).append(
        pa.field("hist_categories", pa.list_(pa.int64()))
    )


def _source(src: Path) -> Path:
    if src.is_dir():
        src = src / "UserBehavior.csv"
    if not src.is_file():
        raise ConvertError("does not exist", path=str(src))
    return src


def _positive(behaviors: Collection[str] | str) -> list[int]:
    names = behaviors.split(",") if isinstance(behaviors, str) else list(behaviors)
    names = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(names) - set(TAOBAO_BEHAVIORS))
    if unknown:
        raise ValueError(f"positive_behaviors: unknown {unknown}; pick from {TAOBAO_BEHAVIORS}")
    return sorted({TAOBAO_BEHAVIORS.index(n) for n in names})


def _parse(block: FieldBlock, problems: Problems, positive: pa.Array) -> pa.Table:
    user, item, category, behavior, stamp = block.fields
    users, bad_user = parse_int(user, nullable=False)
    items, bad_item = parse_int(item, nullable=False)
    categories, bad_category = parse_int(category, nullable=False)
    behaviors, bad_behavior = parse_choice(behavior, TAOBAO_BEHAVIORS)
    stamps, bad_stamp = parse_int(stamp, nullable=False)
    labels = pc.is_in(behaviors, value_set=positive).cast(pa.float32())
    table = pa.Table.from_arrays(
        [users, items, categories, behaviors, stamps, labels], schema=_BASE
    )
    keep = problems.reject(
        block.path,
        block.lines,
        [
            (bad_user, lambda i: f"user_id {show(user, i)} is not an integer"),
            (bad_item, lambda i: f"item_id {show(item, i)} is not an integer"),
            (bad_category, lambda i: f"category_id {show(category, i)} is not an integer"),
            (
                bad_behavior,
                lambda i: f"behavior {show(behavior, i)} is not one of {TAOBAO_BEHAVIORS}",
            ),
            (bad_stamp, lambda i: f"timestamp {show(stamp, i)} is not an integer"),
        ],
    )
    return table if keep is None else table.filter(pa.array(keep))


def convert_taobao(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    positive_behaviors: Collection[str] | str = ("buy", "cart", "fav"),
    max_history: int = 50,
    buckets: int | None = None,
    row_group_size: int = 65_536,
    compression: str = "zstd",
    on_error: OnError = "raise",
    overwrite: bool = False,
    progress: bool | None = None,
) -> ConvertReport:
    """Convert ``UserBehavior.csv`` into ``dst/part-*.parquet`` with labels and sequences.

    See the module docstring for the columns, the history rule and the memory use.

    Args:
        src: ``UserBehavior.csv`` (maybe ``.gz``/``.bz2``/``.zst``), or its directory.
        dst: the output directory; it appears complete or not at all.
        positive_behaviors: behaviours whose ``label`` is 1.0, a collection of names or a
            comma-separated string (``"buy"`` for a purchase label).
        max_history: the most recent earlier behaviours kept per row (0: always empty).
        buckets: user buckets sorted one at a time; ``None``: one per 256 MB of text.
        row_group_size: rows per Parquet row group (and per chunk of history lists built
            at a time: 65,536 rows of 50 items are 26 MB per list column).
        compression: the Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
        on_error: ``"raise"`` stops at the first bad line with a :class:`ConvertError`
            naming the file, line and field; ``"skip"`` drops bad lines and counts them in
            the report. Bad: a wrong number of fields, an id or timestamp that is not an
            integer, an unknown behaviour. Blank lines are ignored.
        overwrite: replace ``dst`` if it holds a previous conversion.
        progress: show progress lines on stderr; ``None`` shows them on a terminal.

    Returns:
        The :class:`ConvertReport`.

    Raises:
        ConvertError: a missing input, a bad line (with ``on_error="raise"``), or a
            ``dst`` that is in the way.
        ValueError: an invalid option.
    """
    path = _source(Path(src))
    codes = _positive(positive_behaviors)
    positive = pa.array(codes, type=pa.int8())

    text = TextFormat(
        separator=",",
        num_fields=5,
        parse=lambda block, problems: _parse(block, problems, positive),
    )
    layout = HistoryLayout(
        base=_BASE,
        schema=taobao_schema(),
        user="user_id",
        time="timestamp",
        sort_keys=("user_id", "timestamp", "item_id", "category_id", "behavior"),
        lists={"hist_items": "item_id", "hist_categories": "category_id"},
    )
    return convert_with_histories(
        "taobao",
        [path],
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
            "source": path.name,
            "positive_behaviors": [TAOBAO_BEHAVIORS[c] for c in codes],
            "max_history": max_history,
        },
    )
