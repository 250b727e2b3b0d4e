"""recstack.pipelines.models: reference recommendation models built on RecStack's packages.

Each model is an ``nn.Module`` with a typed config dataclass, owns its
``EmbeddingCollection`` (``model.embeddings``) and is called as ``model(inputs)`` on the
feature engine's batch dict, as the Trainer does: :class:`DIN` (target attention over a
behaviour sequence), :class:`DeepFM` and :class:`DLRM` (feature interactions),
:class:`MMoE` and :class:`ESMM` (multi-task), :class:`HSTU` (a generative ranking
transformer over jagged sequences). See docs/models/.
"""

from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.deepfm import DeepFM, DeepFMConfig, fm_interaction
from recstack.pipelines.models.din import DIN, DINConfig, TargetAttention
from recstack.pipelines.models.dlrm import DLRM, DLRMConfig, dot_interaction
from recstack.pipelines.models.esmm import ESMM, ESMMConfig
from recstack.pipelines.models.fields import ModelConfigError
from recstack.pipelines.models.hstu import HSTU, HSTUBlock, HSTUConfig
from recstack.pipelines.models.inputs import ModelFeatures, sequence_lengths, sequence_mask
from recstack.pipelines.models.layers import ACTIVATIONS, MLP, Dice, make_activation
from recstack.pipelines.models.mmoe import MMoE, MMoEConfig
from recstack.pipelines.models.next_item import NextItemLoss

__all__ = [
    "ACTIVATIONS",
    "DIN",
    "DINConfig",
    "DLRM",
    "DLRMConfig",
    "DeepFM",
    "DeepFMConfig",
    "Dice",
    "EmbeddingModel",
    "ESMM",
    "ESMMConfig",
    "HSTU",
    "HSTUBlock",
    "HSTUConfig",
    "MLP",
    "MMoE",
    "MMoEConfig",
    "ModelConfigError",
    "ModelFeatures",
    "NextItemLoss",
    "TargetAttention",
    "dot_interaction",
    "fm_interaction",
    "make_activation",
    "sequence_lengths",
    "sequence_mask",
]
