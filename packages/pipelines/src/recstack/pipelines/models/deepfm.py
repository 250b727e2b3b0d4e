"""DeepFM (Guo et al., IJCAI 2017): a first-order term, a factorization machine's
pairwise interactions and a deep MLP over the same feature embeddings, summed to one logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recstack.embedding_engine import EmbeddingCollection
from recstack.pipelines.models.base import EmbeddingModel, Features, Tables
from recstack.pipelines.models.fields import (
    activation_field,
    config_to_dict,
    dropout_field,
    int_field,
    name_field,
    names_field,
    sizes_field,
)
from recstack.pipelines.models.inputs import pooled_output
from recstack.pipelines.models.layers import MLP

__all__ = ["DeepFM", "DeepFMConfig", "fm_interaction"]


@dataclass(frozen=True)
class DeepFMConfig:
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

    sparse_features: Sequence[str]
    dense_dim: int = 0
    deep_hidden: Sequence[int] = (400, 400, 400)
    activation: str = "relu"
    dropout: float = 0.0
    sparse_key: str = "sparse"
    dense_key: str = "dense"

    def __post_init__(self) -> None:
        o, set_ = "DeepFMConfig", object.__setattr__
        names = names_field(o, "sparse_features", self.sparse_features, min_len=1)
        set_(self, "sparse_features", names)
        int_field(o, "dense_dim", self.dense_dim, 0)
        set_(self, "deep_hidden", sizes_field(o, "deep_hidden", self.deep_hidden))
        set_(self, "activation", activation_field(o, "activation", self.activation))
        set_(self, "dropout", dropout_field(o, "dropout", self.dropout))
        name_field(o, "sparse_key", self.sparse_key)
        name_field(o, "dense_key", self.dense_key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


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


class DeepFM(EmbeddingModel):
    """DeepFM: ``model(inputs) -> logits [B]`` (float32), the sum of

    * a first-order term: ``bias + sum_f <w_f, e_f> + linear(dense)``. Each field ``f``
      has a learned ``D``-vector ``w_f``, so an id's first-order weight is a projection
      of its embedding ``e_f`` rather than a scalar of its own. This needs no second
      (dim-1) table, and no second key in the batch for the same ids (a feature's name is
      its batch key, so a dim-1 table would need every id column twice);
    * the FM second-order term over the field embeddings (:func:`fm_interaction`);
    * the deep MLP over the concatenated field embeddings and dense features.

    Args:
        config: a :class:`DeepFMConfig`.
        tables: the collection's tables (see :class:`EmbeddingModel`).
        features: the collection's features (see :class:`EmbeddingModel`).
        embeddings: a ready-made collection (see :class:`EmbeddingModel`).
        device: where the model lives (see :class:`EmbeddingModel`).

    Raises:
        ModelConfigError: a field names a missing feature, one that is not pooled, or the
            dims differ.
    """

    config_class = DeepFMConfig

    def __init__(
        self,
        config: DeepFMConfig,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(config, tables, features, embeddings=embeddings, device=device)
        c = config
        self.dim = self.features.common_dim("sparse_features", c.sparse_features)
        n = len(c.sparse_features)
        self.first_order = nn.Parameter(torch.randn(n, self.dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(()))
        self.dense_linear = nn.Linear(c.dense_dim, 1, bias=False) if c.dense_dim else None
        width = n * self.dim + c.dense_dim
        self.deep = MLP(width, c.deep_hidden, c.activation, c.dropout, out_dim=1)
        self._place()

    def forward(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Logits ``[B]`` (float32) for a batch dict.

        Args:
            inputs: ``inputs[sparse_key]`` the ``KeyedJaggedTensor``, and
                ``inputs[dense_key]`` ``[B, dense_dim]`` when ``dense_dim > 0``.
        """
        c = self.config
        kjt, out, dense = self._read(inputs, c.dense_dim)
        batch = kjt.stride()
        fields = torch.stack(
            [pooled_output("DeepFM", out, n, batch, self.dim) for n in c.sparse_features], dim=1
        ).float()
        logit = self.bias + (fields * self.first_order).sum(dim=(1, 2)) + fm_interaction(fields)
        deep_in = fields.flatten(1)
        if dense is not None:
            logit = logit + self.dense_linear(dense).squeeze(-1).float()
            deep_in = torch.cat([deep_in, dense], dim=-1)
        return (logit + self.deep(deep_in).squeeze(-1).float()).float()
