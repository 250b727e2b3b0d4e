"""recstack.sparse_optim: fused row-sparse optimizers for paged and plain tensors.

Lazy (row-sparse) :class:`SparseSGD`, :class:`SparseAdagrad`, :class:`RowWiseAdagrad`,
:class:`SparseAdam`, :class:`SparseAdamW` and :class:`SparseFTRL` over core ``PagedTensor``
parameters (or plain tensors with a row-sparse gradient), on the base
:class:`SparseOptimizer`; their row updates are in :mod:`recstack.sparse_optim.rules`.
See docs/packages/sparse-optim.md.
"""

from recstack.sparse_optim.optimizer import SlotSpec, SparseOptimizer
from recstack.sparse_optim.optimizers import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseSGD,
)

__version__ = "0.1.0"

__all__ = [
    "RowWiseAdagrad",
    "SlotSpec",
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseFTRL",
    "SparseOptimizer",
    "SparseSGD",
    "__version__",
]
