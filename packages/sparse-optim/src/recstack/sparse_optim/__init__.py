"""recstack.sparse_optim: Sparse Optim: fused row-sparse optimizers for paged and plain tensors.

Package skeleton: the public API lands with issue 6; see docs/packages/sparse-optim.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
