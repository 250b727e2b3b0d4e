"""MMoE, the multi-gate mixture of experts (Ma et al., KDD 2018): shared expert MLPs, a
softmax gate per task that mixes them, and a tower per task to one logit.
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
    ModelConfigError,
    activation_field,
    config_to_dict,
    dropout_field,
    int_field,
    name_field,
    names_field,
    sizes_field,
    task_names,
)
from recstack.pipelines.models.inputs import pooled_parts
from recstack.pipelines.models.layers import MLP

__all__ = ["MMoE", "MMoEConfig"]


@dataclass(frozen=True)
class MMoEConfig:
    """MMoE's fields.

    Args:
        tasks: the task names: the keys of the output dict, to match
            ``Task(name, label=...)``.
        sparse_features: pooled features (``"sum"``, ``"mean"`` or ``"tile"``), any dims,
            concatenated with the dense features into the experts' input.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features.
        num_experts: how many experts.
        expert_hidden: each expert's layer sizes (the last is its output width).
        tower_hidden: each task tower's hidden sizes (then a linear layer to the logit).
        activation: the activation of experts and towers.
        dropout: dropout after each hidden layer of experts and towers.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    tasks: Sequence[str]
    sparse_features: Sequence[str]
    dense_dim: int = 0
    num_experts: int = 4
    expert_hidden: Sequence[int] = (256, 128)
    tower_hidden: Sequence[int] = (64,)
    activation: str = "relu"
    dropout: float = 0.0
    sparse_key: str = "sparse"
    dense_key: str = "dense"

    def __post_init__(self) -> None:
        o, set_ = "MMoEConfig", object.__setattr__
        set_(self, "tasks", task_names(o, "tasks", self.tasks))
        set_(self, "sparse_features", names_field(o, "sparse_features", self.sparse_features))
        int_field(o, "dense_dim", self.dense_dim, 0)
        if not self.sparse_features and self.dense_dim == 0:
            raise ModelConfigError(f"{o}: give sparse_features or dense_dim > 0 (no inputs)")
        int_field(o, "num_experts", self.num_experts, 1)
        hidden = sizes_field(o, "expert_hidden", self.expert_hidden, min_len=1)
        set_(self, "expert_hidden", hidden)
        set_(self, "tower_hidden", sizes_field(o, "tower_hidden", self.tower_hidden))
        set_(self, "activation", activation_field(o, "activation", self.activation))
        set_(self, "dropout", dropout_field(o, "dropout", self.dropout))
        name_field(o, "sparse_key", self.sparse_key)
        name_field(o, "dense_key", self.dense_key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


class MMoE(EmbeddingModel):
    """MMoE: ``model(inputs) -> {task: logits [B]}`` (float32).

    Every expert reads the same input (the pooled embeddings and dense features side by
    side); task ``t``'s gate, a linear layer and a softmax over experts, weights their
    outputs; the mixture goes through task ``t``'s tower to its logit. Train it with one
    ``Task(name, label=...)`` per entry of ``tasks``.

    Args:
        config: an :class:`MMoEConfig`.
        tables: the collection's tables (see :class:`EmbeddingModel`).
        features: the collection's features (see :class:`EmbeddingModel`).
        embeddings: a ready-made collection (see :class:`EmbeddingModel`).
        device: where the model lives (see :class:`EmbeddingModel`).

    Raises:
        ModelConfigError: a field names a missing feature or an unpooled one.
    """

    config_class = MMoEConfig

    def __init__(
        self,
        config: MMoEConfig,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(config, tables, features, embeddings=embeddings, device=device)
        c = config
        self.widths = [
            self.features.pooled(f"sparse_features[{i}]", n)
            for i, n in enumerate(c.sparse_features)
        ]
        width = sum(self.widths) + c.dense_dim
        self.experts = nn.ModuleList(
            MLP(width, c.expert_hidden, c.activation, c.dropout) for _ in range(c.num_experts)
        )
        self.gates = nn.ModuleDict({t: nn.Linear(width, c.num_experts) for t in c.tasks})
        expert_dim = c.expert_hidden[-1]
        self.towers = nn.ModuleDict(
            {
                t: MLP(expert_dim, c.tower_hidden, c.activation, c.dropout, out_dim=1)
                for t in c.tasks
            }
        )
        self._place()

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Logits ``[B]`` (float32) by task name for a batch dict.

        Args:
            inputs: ``inputs[sparse_key]`` the ``KeyedJaggedTensor``, and
                ``inputs[dense_key]`` ``[B, dense_dim]`` when ``dense_dim > 0``.
        """
        c = self.config
        kjt, out, dense = self._read(inputs, c.dense_dim)
        parts = pooled_parts("MMoE", out, c.sparse_features, self.widths, kjt.stride(), dense)
        x = torch.cat(parts, dim=-1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        logits = {}
        for task in c.tasks:
            gate = torch.softmax(self.gates[task](x).float(), dim=-1)
            mixed = torch.einsum("be,beh->bh", gate, experts.float())
            logits[task] = self.towers[task](mixed).squeeze(-1).float()
        return logits
