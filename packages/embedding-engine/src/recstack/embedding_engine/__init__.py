"""recstack.embedding_engine: dynamic, collision-free GPU hash embeddings.

Issue 5 lands in parts. Available now: :class:`EmbeddingCollection` (dynamic tables with
sum/mean/weighted pooling and sequences, merged physical tables, a backward to core
``SparseGrad``), :class:`HashTable` (the GPU id -> row map), the table and feature configs
(:class:`TableConfig`, :class:`FeatureConfig`, ...) and :func:`init_rows`, which gives every
id the same initial row on any device and rank. See docs/packages/embedding-engine.md.
"""

from recstack.embedding_engine.collection import EmbeddingCollection
from recstack.embedding_engine.config import (
    Admission,
    ConfigError,
    Eviction,
    FeatureConfig,
    Initializer,
    TableConfig,
    check_configs,
)
from recstack.embedding_engine.hash_table import EMPTY, TOMBSTONE, HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows, init_rows_into
from recstack.embedding_engine.state import (
    CollectionTableState,
    collection_state_metadata,
    collection_table_states,
    export_collection_chunks,
    import_collection_chunk,
)

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "TOMBSTONE",
    "Admission",
    "ConfigError",
    "EmbeddingCollection",
    "Eviction",
    "FeatureConfig",
    "HashTable",
    "Initializer",
    "TableConfig",
    "__version__",
    "CollectionTableState",
    "check_configs",
    "collection_state_metadata",
    "collection_table_states",
    "export_collection_chunks",
    "import_collection_chunk",
    "init_rows",
    "init_rows_into",
]
