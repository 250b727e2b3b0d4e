"""DLRM (Naumov et al. 2019): a bottom MLP maps the dense features to the embedding dim,
the pairwise dot products of that vector and the pooled embeddings are the interactions,
and a top MLP maps them (with the bottom output) to one logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recstack.embedding_engine import EmbeddingCollection
from recstack.pipelines.models.base import EmbeddingModel, Features, Tables
from recstack.pipelines.models.fields import (
    ModelConfigError,
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

__all__ = ["DLRM", "DLRMConfig", "dot_interaction"]


@dataclass(frozen=True)
class DLRMConfig:
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

    sparse_features: Sequence[str]
    dense_dim: int = 0
    bottom_hidden: Sequence[int] = (512, 256)
    top_hidden: Sequence[int] = (512, 256)
    activation: str = "relu"
    dropout: float = 0.0
    sparse_key: str = "sparse"
    dense_key: str = "dense"

    def __post_init__(self) -> None:
        o, set_ = "DLRMConfig", object.__setattr__
        names = names_field(o, "sparse_features", self.sparse_features, min_len=1)
        set_(self, "sparse_features", names)
        int_field(o, "dense_dim", self.dense_dim, 0)
        if len(names) + (self.dense_dim > 0) < 2:
            raise ModelConfigError(
                f"{o}: the interaction needs at least two vectors: give two sparse_features, "
                f"or dense_dim > 0 (got sparse_features={list(names)}, dense_dim=0)"
            )
        set_(self, "bottom_hidden", sizes_field(o, "bottom_hidden", self.bottom_hidden))
        set_(self, "top_hidden", sizes_field(o, "top_hidden", self.top_hidden))
        set_(self, "activation", activation_field(o, "activation", self.activation))
        set_(self, "dropout", dropout_field(o, "dropout", self.dropout))
        name_field(o, "sparse_key", self.sparse_key)
        name_field(o, "dense_key", self.dense_key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


def dot_interaction(vectors: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The dot products of every pair of vectors of each row: the strict upper triangle of
    ``vectors @ vectors^T``, ``[B, N * (N - 1) / 2]``.

    Args:
        vectors: ``[B, N, D]``.
        pairs: ``torch.triu_indices(N, N, offset=1)``, ``[2, N * (N - 1) / 2]``.
    """
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    return gram[:, pairs[0], pairs[1]]


class DLRM(EmbeddingModel):
    """DLRM: ``model(inputs) -> logits [B]`` (float32).

    ``z = bottom(dense)`` (``[B, D]``); the interaction is the pairwise dot products of
    ``[z, e_1, ..., e_F]`` (upper triangle, no self products); the top MLP reads
    ``[z, interactions]`` and ends in one logit.

    Args:
        config: a :class:`DLRMConfig`.
        tables: the collection's tables (see :class:`EmbeddingModel`).
        features: the collection's features (see :class:`EmbeddingModel`).
        embeddings: a ready-made collection (see :class:`EmbeddingModel`).
        device: where the model lives (see :class:`EmbeddingModel`).

    Raises:
        ModelConfigError: a field names a missing feature, one that is not pooled, or the
            dims differ.
    """

    config_class = DLRMConfig

    def __init__(
        self,
        config: DLRMConfig,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(config, tables, features, embeddings=embeddings, device=device)
        c = config
        self.dim = self.features.common_dim("sparse_features", c.sparse_features)
        self.bottom = (
            MLP(c.dense_dim, (*c.bottom_hidden, self.dim), c.activation) if c.dense_dim else None
        )
        n = len(c.sparse_features) + (1 if c.dense_dim else 0)
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        width = n * (n - 1) // 2 + (self.dim if c.dense_dim else 0)
        self.top = MLP(width, c.top_hidden, c.activation, c.dropout, out_dim=1)
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
        vectors = [pooled_output("DLRM", out, n, batch, self.dim) for n in c.sparse_features]
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
        return self.top(x).squeeze(-1).float()
