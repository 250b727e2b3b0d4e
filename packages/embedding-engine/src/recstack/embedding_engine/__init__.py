"""recstack.embedding_engine: dynamic, collision-free GPU hash embeddings.

:class:`EmbeddingCollection` (dynamic tables with sum/mean/weighted pooling, sequences and
tile pooling, merged physical tables, a backward to core ``SparseGrad``, eviction,
admission, fixed-size tables), :class:`DynamicEmbedding` (one such table called like
``nn.Embedding`` / ``nn.EmbeddingBag``), :class:`HashTable` (the GPU id -> row map), the
table and feature configs (:class:`TableConfig`, :class:`FeatureConfig`, ...),
:func:`init_rows`, which gives every id the same initial row on any device and rank, and
state export/import for the saver, the tables as core ``SparseParameter``\\ s for a sparse
optimizer (:class:`EmbeddingSparseParameter`, :func:`sparse_parameters`) and their memory
(:class:`MemoryStats`). See docs/packages/embedding-engine.md.
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
from recstack.embedding_engine.dynamic import DynamicEmbedding
from recstack.embedding_engine.hash_table import EMPTY, TOMBSTONE, HashTable
from recstack.embedding_engine.kernels.init_rows import init_rows, init_rows_into
from recstack.embedding_engine.kernels.init_rows_tagged import init_rows_tagged
from recstack.embedding_engine.memory import MemoryStats, TableMemory
from recstack.embedding_engine.parameters import EmbeddingSparseParameter, sparse_parameters
from recstack.embedding_engine.sequence import PaddedSequence
from recstack.embedding_engine.sharded import ExchangeLoad, ShardedEmbeddingCollection
from recstack.embedding_engine.state import (
    CollectionTableState,
    collection_state_metadata,
    collection_table_states,
    export_collection_chunks,
    import_collection_chunk,
)
from recstack.embedding_engine.table_rows import RowGradSink, TableRows
from recstack.embedding_engine.tiers import RowTiers, TierStats

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "TOMBSTONE",
    "Admission",
    "ConfigError",
    "DynamicEmbedding",
    "EmbeddingCollection",
    "EmbeddingSparseParameter",
    "Eviction",
    "FeatureConfig",
    "HashTable",
    "Initializer",
    "MemoryStats",
    "PaddedSequence",
    "ExchangeLoad",
    "ShardedEmbeddingCollection",
    "RowGradSink",
    "TableConfig",
    "TableMemory",
    "TableRows",
    "RowTiers",
    "TierStats",
    "__version__",
    "CollectionTableState",
    "check_configs",
    "collection_state_metadata",
    "collection_table_states",
    "export_collection_chunks",
    "import_collection_chunk",
    "init_rows",
    "init_rows_into",
    "init_rows_tagged",
    "sparse_parameters",
]
