"""recstack.embedding_engine: Embedding Engine: dynamic, collision-free GPU hash embeddings.

Package skeleton: the public API lands with issue 5; see docs/packages/embedding-engine.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
