"""recstack.core: the shared interface of every RecStack package.

* :class:`JaggedTensor`, :class:`KeyedJaggedTensor`: variable-length features, packed;
  built sync-free from dense and padded tensors (:class:`DenseFeatures`,
  :class:`PaddedFeatures`, :meth:`KeyedJaggedTensor.from_features`).
* :class:`PagedTensor`: a growable row store addressed through a page table of data pointers.
* :class:`SparseGrad`: row-sparse gradients with a fused :meth:`SparseGrad.coalesce`.
* :class:`RowUpdate`, :class:`RowUpdater`: an optimizer's row update as data, so one
  package's kernel (a fused embedding backward) applies another's optimizer.
* :class:`SparseParameter`: a ``PagedTensor`` with its pending ``SparseGrad``, so a sparse
  optimizer's ``step()`` / ``zero_grad()`` reach the gradients an embedding backward left.
* :func:`hash64` (XXH64), :func:`mix64` (fmix64): the documented 64-bit hashes.
* :func:`owner`, :class:`ShardSpec`: the id-to-rank map shared by all-to-all and the saver.
* :mod:`recstack.core.distributed`: torchrun environment and :func:`all_to_all_v`.
* :class:`KeyedState`: the protocol for keyed sparse state that the saver writes (with
  :class:`IncrementalKeyedState` for deltas, :class:`AuxiliaryState`, :class:`HasKeyedStates`).
* :mod:`recstack.core.kernels`: Triton on CUDA, torch reference on CPU, launch counting.
"""

from recstack.core import distributed, kernels
from recstack.core.distributed import (
    DistEnv,
    PendingExchange,
    all_to_all_v,
    all_to_all_v_list,
    all_to_all_v_start,
    dist_env,
)
from recstack.core.hashing import hash64, mix64
from recstack.core.jagged import JaggedTensor
from recstack.core.jagged_build import DenseFeatures, PaddedFeatures
from recstack.core.keyed_jagged import KeyedJaggedTensor
from recstack.core.keyed_state import (
    AuxiliaryState,
    HasKeyedStates,
    IncrementalKeyedState,
    KeyedState,
    check_json_metadata,
    iter_chunks,
    select_owned,
    validate_chunk,
)
from recstack.core.paged import Companion, PagedTensor, move_rows
from recstack.core.row_update import RowUpdate, RowUpdater
from recstack.core.sharding import SHARD_SEED, ShardSpec, owner, owner_partition
from recstack.core.sparse_grad import SparseGrad
from recstack.core.sparse_param import SparseParameter
from recstack.core.torchrec_interop import from_torchrec, to_torchrec

__version__ = "0.1.0"

__all__ = [
    "SHARD_SEED",
    "AuxiliaryState",
    "Companion",
    "DenseFeatures",
    "DistEnv",
    "HasKeyedStates",
    "IncrementalKeyedState",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedState",
    "PaddedFeatures",
    "PagedTensor",
    "PendingExchange",
    "RowUpdate",
    "RowUpdater",
    "ShardSpec",
    "SparseGrad",
    "SparseParameter",
    "__version__",
    "all_to_all_v",
    "all_to_all_v_list",
    "all_to_all_v_start",
    "check_json_metadata",
    "dist_env",
    "distributed",
    "from_torchrec",
    "hash64",
    "iter_chunks",
    "kernels",
    "mix64",
    "move_rows",
    "owner",
    "owner_partition",
    "select_owned",
    "to_torchrec",
    "validate_chunk",
]
