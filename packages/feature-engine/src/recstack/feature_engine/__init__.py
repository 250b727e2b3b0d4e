"""recstack.feature_engine: declarative features executed as a handful of fused kernels.

Declare features as chains of ops (:class:`Feature`, :mod:`~recstack.feature_engine.ops`),
in Python or in a YAML/JSON/TOML file (:func:`load_features`), and run them on batches with
:class:`FeatureEngine`: sparse outputs come back as one ``KeyedJaggedTensor``, dense ones as
one ``[B, n]`` tensor, in a number of kernel launches that does not grow with the number of
features.
"""

from recstack.feature_engine.config import (
    FeatureConfigError,
    dump_features,
    dumps_features,
    load_features,
    loads_features,
)
from recstack.feature_engine.engine import FeatureEngine
from recstack.feature_engine.feature import Feature, FeatureError
from recstack.feature_engine.graph import COLUMN_KINDS, schema_of
from recstack.feature_engine.loop import run_per_feature
from recstack.feature_engine.ops import (
    OPS,
    Bucketize,
    Clip,
    Cross,
    FillMissing,
    FilterIds,
    Hash,
    Log1p,
    Mask,
    Mod,
    MultiHash,
    Normalize,
    Op,
    OpError,
    Pad,
    Truncate,
)

__version__ = "0.1.0"

__all__ = [
    "COLUMN_KINDS",
    "OPS",
    "Bucketize",
    "Clip",
    "Cross",
    "Feature",
    "FeatureConfigError",
    "FeatureEngine",
    "FeatureError",
    "FillMissing",
    "FilterIds",
    "Hash",
    "Log1p",
    "Mask",
    "Mod",
    "MultiHash",
    "Normalize",
    "Op",
    "OpError",
    "Pad",
    "Truncate",
    "__version__",
    "dump_features",
    "dumps_features",
    "load_features",
    "loads_features",
    "run_per_feature",
    "schema_of",
]
