"""recstack.pipelines.data: public recommendation data sets converted to Parquet.

* :func:`convert_criteo`: Criteo display-ads TSV (Kaggle DAC, the 1TB click logs).
* :func:`convert_movielens`: MovieLens ratings with labels, per-user histories and genres.
* :func:`convert_taobao`: Taobao ``UserBehavior.csv`` with labels and behaviour sequences.

Each writes ``part-*.parquet`` files into a directory that appears only when complete,
reads its text in bounded memory, names the file and line of a bad line (or skips and
counts it) and returns a :class:`ConvertReport`. :data:`CONVERTERS` lists them by name
for the ``recstack data convert`` command. The outputs read with
:class:`recstack.columnio.ColumnReader`.
"""

from recstack.pipelines.data.common import ConvertError, ConvertReport
from recstack.pipelines.data.criteo import (
    CRITEO_CATEGORICAL,
    CRITEO_INTEGER,
    convert_criteo,
    criteo_schema,
)
from recstack.pipelines.data.movielens import convert_movielens, load_genres, movielens_schema
from recstack.pipelines.data.registry import CONVERTERS, Converter, ConverterOption
from recstack.pipelines.data.taobao import TAOBAO_BEHAVIORS, convert_taobao, taobao_schema

__all__ = [
    "CONVERTERS",
    "CRITEO_CATEGORICAL",
    "CRITEO_INTEGER",
    "TAOBAO_BEHAVIORS",
    "ConvertError",
    "ConvertReport",
    "Converter",
    "ConverterOption",
    "convert_criteo",
    "convert_movielens",
    "convert_taobao",
    "criteo_schema",
    "load_genres",
    "movielens_schema",
    "taobao_schema",
]
