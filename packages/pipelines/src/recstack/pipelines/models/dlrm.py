"""DLRM (Naumov et al. 2019): a bottom MLP maps the dense features to the embedding dim,
the pairwise dot products of that vector and the pooled embeddings are the interactions,
and a top MLP maps them (with the bottom output) to one logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import KeyedJaggedTensor
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import CheckedConfig, ConfigField, ModelConfigError
from recstack.pipelines.models.inputs import embedded_output
from recstack.pipelines.models.layers import MLP, Activation, Tower

__all__ = ["DLRM", "DLRMConfig", "dot_interaction"]


@dataclass(frozen=True)
class DLRMConfig(CheckedConfig):
    """DLRM's fields.

    Args:
        sparse_features: pooled features (``pooling="sum"`` or ``"mean"``) that all have
            the same embedding dim ``D``.
        dense_dim: the width of ``inputs[dense_key]``; 0: no dense features and no
            bottom MLP (the embeddings interact among themselves).
        bottom_hidden: hidden sizes of the bottom MLP; a last layer of width ``D`` is
            added, activated like the others.
        top_hidden: hidden sizes of the top MLP (then a linear layer to the logit).
        activation: the activation of both MLPs.
        dropout: dropout after each hidden layer of the top MLP.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    sparse_features: Sequence[str] = ConfigField.names(min_len=1)
    dense_dim: int = ConfigField.count(0, low=0)
    bottom_hidden: Sequence[int] = ConfigField.sizes((512, 256))
    top_hidden: Sequence[int] = ConfigField.sizes((512, 256))
    activation: Activation = ConfigField.activation("relu")
    dropout: float = ConfigField.dropout()
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")

    def check_consistency(self) -> None:
        """The interaction needs two vectors: two features, or one and the dense ones.

        Raises:
            ModelConfigError: one sparse feature and no dense features.
        """
        if len(self.sparse_features) + (self.dense_dim > 0) < 2:
            raise ModelConfigError(
                "DLRMConfig: the interaction needs at least two vectors: give two "
                f"sparse_features, or dense_dim > 0 (got sparse_features="
                f"{list(self.sparse_features)}, dense_dim=0)"
            )


def dot_interaction(vectors: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The dot products of every pair of vectors of each row: the strict upper triangle of
    ``vectors @ vectors^T``, ``[B, N * (N - 1) / 2]``.

    Args:
        vectors: ``[B, N, D]``.
        pairs: ``torch.triu_indices(N, N, offset=1)``, ``[2, N * (N - 1) / 2]``.
    """
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    return gram[:, pairs[0], pairs[1]]


class DLRM(EmbeddingModel[DLRMConfig]):
    """DLRM: ``model(inputs) -> logits [B]`` (float32).

    ``z = bottom(dense)`` (``[B, D]``); the interaction is the pairwise dot products of
    ``[z, e_1, ..., e_F]`` (upper triangle, no self products); the top MLP reads
    ``[z, interactions]`` and ends in one logit.

    Built like every :class:`EmbeddingModel`, from a :class:`DLRMConfig`; a field naming
    a missing feature, one that is not pooled, or fields of different dims raise a
    ``ModelConfigError``.
    """

    config_class = DLRMConfig

    def _build(self, config: DLRMConfig) -> None:
        c = config
        self.dim = self.features.common_dim("sparse_features", c.sparse_features)
        self.bottom = (
            MLP(c.dense_dim, (*c.bottom_hidden, self.dim), c.activation) if c.dense_dim else None
        )
        n = len(c.sparse_features) + (1 if c.dense_dim else 0)
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        width = n * (n - 1) // 2 + (self.dim if c.dense_dim else 0)
        self.top = Tower(width, c.top_hidden, c.activation, c.dropout)

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> torch.Tensor:
        c = self.config
        batch = kjt.stride()
        vectors = [embedded_output("DLRM", out, n, (batch, self.dim)) for n in c.sparse_features]
        top_in = []
        if self.bottom is not None and dense is not None:
            z = self.bottom(dense)
            vectors.insert(0, z)
            top_in.append(z)
        # One dtype for the stack: bf16 under autocast (the bottom's output), else fp32.
        dtype = vectors[0].dtype
        stacked = torch.stack([v.to(dtype) for v in vectors], dim=1)
        top_in.append(dot_interaction(stacked, self.pairs))
        x = torch.cat([t.to(dtype) for t in top_in], dim=-1)
        return self.top(x)
