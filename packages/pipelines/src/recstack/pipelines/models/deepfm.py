"""DeepFM (Guo et al., IJCAI 2017): a first-order term, a factorization machine's
pairwise interactions and a deep MLP over the same feature embeddings, summed to one logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import CheckedConfig, ConfigField
from recstack.pipelines.models.inputs import embedded_output
from recstack.pipelines.models.layers import Activation, Tower

__all__ = ["DeepFM", "DeepFMConfig", "fm_interaction"]


@dataclass(frozen=True)
class DeepFMConfig(CheckedConfig):
    """DeepFM's fields.

    Args:
        sparse_features: the fields: pooled features (``pooling="sum"`` or ``"mean"``)
            that all have the same embedding dim ``D``.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features. Dense
            features enter the first-order term (a linear layer) and the deep part, not
            the FM.
        deep_hidden: hidden sizes of the deep MLP.
        activation: its activation.
        dropout: dropout after each of its hidden layers.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    sparse_features: Sequence[str] = ConfigField.names(min_len=1)
    dense_dim: int = ConfigField.count(0, low=0)
    deep_hidden: Sequence[int] = ConfigField.sizes((400, 400, 400))
    activation: Activation = ConfigField.activation("relu")
    dropout: float = ConfigField.dropout()
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")


def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    """The factorization machine's second-order term of each row: the sum over pairs of
    fields ``i < j`` of ``<v_i, v_j>``, computed as
    ``0.5 * sum_d((sum_i v_id)^2 - sum_i v_id^2)``, in float32 (the difference of two
    large sums loses too much in bf16).

    Args:
        fields: ``[B, F, D]`` field embeddings.

    Returns:
        ``[B]``.
    """
    v = fields.float()
    square_of_sum = v.sum(dim=1).square()
    sum_of_squares = v.square().sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=-1)


class DeepFM(EmbeddingModel[DeepFMConfig]):
    """DeepFM: ``model(inputs) -> logits [B]`` (float32), the sum of

    * a first-order term: ``bias + sum_f <w_f, e_f> + linear(dense)``. Each field ``f``
      has a learned ``D``-vector ``w_f``, so an id's first-order weight is a projection
      of its embedding ``e_f`` rather than a scalar of its own. This needs no second
      (dim-1) table, and no second key in the batch for the same ids (a feature's name is
      its batch key, so a dim-1 table would need every id column twice);
    * the FM second-order term over the field embeddings (:func:`fm_interaction`);
    * the deep MLP over the concatenated field embeddings and dense features.

    Built like every :class:`EmbeddingModel`, from a :class:`DeepFMConfig`; a field
    naming a missing feature, one that is not pooled, or fields of different dims raise
    a ``ModelConfigError``.
    """

    config_class = DeepFMConfig

    def _build(self, config: DeepFMConfig) -> None:
        self.dim = self.features.common_dim("sparse_features", config.sparse_features)
        n = len(config.sparse_features)
        self.first_order = nn.Parameter(torch.randn(n, self.dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no scalar
        dense_dim = config.dense_dim
        self.dense_linear = nn.Linear(dense_dim, 1, bias=False) if dense_dim else None
        width = n * self.dim + dense_dim
        self.deep = Tower(width, config.deep_hidden, config.activation, config.dropout)

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> torch.Tensor:
        c = self.config
        batch = kjt.stride()
        fields = torch.stack(
            [embedded_output("DeepFM", out, n, (batch, self.dim)) for n in c.sparse_features], dim=1
        ).float()
        logit = self.bias + (fields * self.first_order).sum(dim=(1, 2)) + fm_interaction(fields)
        deep_in = fields.flatten(1)
        if dense is not None:
            logit = logit + self.dense_linear(dense).squeeze(-1).float()
            deep_in = torch.cat([deep_in, dense], dim=-1)
        return (logit + self.deep(deep_in)).float()
