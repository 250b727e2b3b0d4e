"""recstack.saver: safetensors checkpoints that resume exactly, reshard N->M, go
incremental and never corrupt.

* :class:`Checkpointer`: ``save(step, **objects)``, ``load(step=None, **objects)``,
  ``latest()``, pruning, async saves, deltas, warm start (``include``/``exclude``/
  ``rename``), resharding through core's ``owner``.
* :class:`PerRank`: mark state that differs between ranks (a data reader's position).
* :class:`LoadReport`, :class:`CheckpointError`.
* :func:`describe_checkpoint`, :func:`verify_checkpoint`: what ``recstack-saver inspect``
  and ``verify`` print.
* :func:`export_for_serving`, :func:`load_for_inference` (:class:`ServingModel`,
  :class:`ServingTable`): ids and rows only, in fp32/bf16/fp16, as read-only lookups.
* :func:`export_checkpoint`: the same serving export, from a checkpoint's files (a delta
  chain replayed), without the model's Python objects (``recstack-saver export``).
* :func:`import_embedding_weight`, :func:`import_torchrec_state_dict`: dense embedding
  weights (``nn.Embedding``, TorchRec) into dynamic tables.

Nothing is pickled: tensors go to safetensors files, everything else to JSON.
"""

from recstack.saver.checkpointer import Checkpointer
from recstack.saver.convert import export_checkpoint
from recstack.saver.errors import CheckpointError
from recstack.saver.inspect import describe_checkpoint, verify_checkpoint
from recstack.saver.load import LoadReport
from recstack.saver.migrate import import_embedding_weight, import_torchrec_state_dict
from recstack.saver.serving import ServingModel, ServingTable, load_for_inference
from recstack.saver.serving_export import export_for_serving
from recstack.saver.stateful import PerRank

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "LoadReport",
    "PerRank",
    "ServingModel",
    "ServingTable",
    "__version__",
    "describe_checkpoint",
    "export_checkpoint",
    "export_for_serving",
    "import_embedding_weight",
    "import_torchrec_state_dict",
    "load_for_inference",
    "verify_checkpoint",
]
