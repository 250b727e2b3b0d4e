"""The converters by name, with their options described for a command line.

``CONVERTERS["criteo"].convert(src, dst, **options)`` is :func:`convert_criteo`, and so on.
Each :class:`ConverterOption` names a keyword argument of that function, with its type,
default and help text, so a CLI can build its flags without knowing the converters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from recstack.pipelines.data.common import ConvertReport, OnError
from recstack.pipelines.data.criteo import Categorical, convert_criteo
from recstack.pipelines.data.movielens import convert_movielens
from recstack.pipelines.data.taobao import TAOBAO_BEHAVIORS, convert_taobao

__all__ = ["CONVERTERS", "Converter", "ConverterOption"]


@dataclass(frozen=True)
class ConverterOption:
    """One keyword argument of a converter.

    Args:
        name: the keyword (a CLI flag would be ``--max-history`` for ``max_history``).
        type: ``int``, ``float``, ``str`` or ``bool``: the type of one value.
        default: the function's default (``None`` where the help says what ``None`` means).
        help: one line for ``--help``.
        choices: the allowed values, when there are few.
        multiple: the option takes several values (a list, or one comma-separated string).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    multiple: bool = False


@dataclass(frozen=True)
class Converter:
    """A data set's converter: ``convert(src, dst, **options) -> ConvertReport``.

    Args:
        name: the data set's name (the registry key).
        description: one line about the data set and its output.
        source: what ``src`` is (for the CLI's help).
        convert: the converter function.
        options: its keyword arguments.
    """

    name: str
    description: str
    source: str
    convert: Callable[..., ConvertReport]
    options: tuple[ConverterOption, ...]


def _common(row_group_size: int = 262_144) -> tuple[ConverterOption, ...]:
    return (
        ConverterOption("row_group_size", int, row_group_size, "rows per Parquet row group"),
        ConverterOption(
            "compression", str, "zstd", "Parquet codec", ("zstd", "snappy", "lz4", "gzip", "none")
        ),
        ConverterOption(
            "on_error",
            str,
            "raise",
            "a bad line: 'raise' stops naming file and line, 'skip' drops and counts it",
            get_args(OnError),
        ),
        ConverterOption("overwrite", bool, False, "replace a previous conversion at dst"),
        ConverterOption(
            "progress", bool, None, "show progress on stderr (default: when it is a terminal)"
        ),
    )


def _history() -> tuple[ConverterOption, ...]:
    return (
        ConverterOption("max_history", int, 50, "most recent earlier items kept per row's history"),
        ConverterOption(
            "buckets",
            int,
            None,
            "user buckets sorted one at a time (memory ~ one bucket); default one per 256 MB",
        ),
    )


#: Every converter by data set name.
CONVERTERS: dict[str, Converter] = {
    "criteo": Converter(
        name="criteo",
        description=(
            "Criteo display-ads TSV (Kaggle DAC train.txt, 1TB day_N files): label, "
            "I1..I13 int64, C1..C26 int64 from hex (empty -> null)"
        ),
        source="one or more TSV files (.gz/.bz2/.zst accepted), converted in order",
        convert=convert_criteo,
        options=(
            ConverterOption(
                "categorical",
                str,
                "int64",
                "C1..C26 as int64 parsed from hex, or the hex strings",
                get_args(Categorical),
            ),
            ConverterOption(
                "has_label", bool, True, "whether the first column is the label (not test.txt)"
            ),
            ConverterOption("rows_per_file", int, 10_000_000, "rows per part file"),
            ConverterOption("block_size", int, 8 << 20, "bytes of text read at a time"),
            *_common(),
        ),
    ),
    "movielens": Converter(
        name="movielens",
        description=(
            "MovieLens ratings (ml-1m/10m ratings.dat, ml-20m/25m/latest ratings.csv): "
            "user_id, item_id, rating, timestamp, label, history, genres"
        ),
        source="the data set's directory or its ratings.dat / ratings.csv",
        convert=convert_movielens,
        options=(
            ConverterOption("threshold", float, 4.0, "label is 1 when rating >= threshold"),
            *_history(),
            ConverterOption(
                "genres",
                bool,
                None,
                "join the movies' genres as a list column (default: when the movies file exists)",
            ),
            ConverterOption(
                "movies", str, None, "the movies file (default: movies.dat/.csv beside ratings)"
            ),
            *_common(row_group_size=65_536),
        ),
    ),
    "taobao": Converter(
        name="taobao",
        description=(
            "Taobao UserBehavior.csv (Tianchi): user_id, item_id, category_id, behavior, "
            "timestamp, label, hist_items, hist_categories"
        ),
        source="UserBehavior.csv or its directory",
        convert=convert_taobao,
        options=(
            ConverterOption(
                "positive_behaviors",
                str,
                ("buy", "cart", "fav"),
                "behaviours labelled 1 (the rest 0)",
                TAOBAO_BEHAVIORS,
                multiple=True,
            ),
            *_history(),
            *_common(row_group_size=65_536),
        ),
    ),
}
