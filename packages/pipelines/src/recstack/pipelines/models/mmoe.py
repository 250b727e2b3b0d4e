"""MMoE, the multi-gate mixture of experts (Ma et al., KDD 2018): shared expert MLPs, a
softmax gate per task that mixes them, and a tower per task to one logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import CheckedConfig, ConfigField, ModelConfigError
from recstack.pipelines.models.inputs import PooledInputs
from recstack.pipelines.models.layers import MLP, Activation, Tower

__all__ = ["MMoE", "MMoEConfig"]


@dataclass(frozen=True)
class MMoEConfig(CheckedConfig):
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

    tasks: Sequence[str] = ConfigField.tasks()
    sparse_features: Sequence[str] = ConfigField.names()
    dense_dim: int = ConfigField.count(0, low=0)
    num_experts: int = ConfigField.count(4, low=1)
    expert_hidden: Sequence[int] = ConfigField.sizes((256, 128), min_len=1)
    tower_hidden: Sequence[int] = ConfigField.sizes((64,))
    activation: Activation = ConfigField.activation("relu")
    dropout: float = ConfigField.dropout()
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")

    def check_consistency(self) -> None:
        """The experts need an input.

        Raises:
            ModelConfigError: neither sparse nor dense features.
        """
        if not self.sparse_features and self.dense_dim == 0:
            raise ModelConfigError("MMoEConfig: give sparse_features or dense_dim > 0 (no inputs)")


class MMoE(EmbeddingModel[MMoEConfig]):
    """MMoE: ``model(inputs) -> {task: logits [B]}`` (float32).

    Every expert reads the same input (the pooled embeddings and dense features side by
    side); task ``t``'s gate, a linear layer and a softmax over experts, weights their
    outputs; the mixture goes through task ``t``'s tower to its logit. Train it with one
    ``Task(name, label=...)`` per entry of ``tasks``.

    Built like every :class:`EmbeddingModel`, from an :class:`MMoEConfig`; a field
    naming a missing feature or an unpooled one raises a ``ModelConfigError``.
    """

    config_class = MMoEConfig

    def _build(self, config: MMoEConfig) -> None:
        c = config
        self.inputs = PooledInputs(
            "MMoE", self.features, "sparse_features", c.sparse_features, c.dense_dim
        )
        width = self.inputs.width
        self.experts = nn.ModuleList(
            MLP(width, c.expert_hidden, c.activation, c.dropout) for _ in range(c.num_experts)
        )
        self.gates = nn.ModuleDict({t: nn.Linear(width, c.num_experts) for t in c.tasks})
        expert_dim = c.expert_hidden[-1]
        self.towers = nn.ModuleDict(
            {t: Tower(expert_dim, c.tower_hidden, c.activation, c.dropout) for t in c.tasks}
        )

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        x = self.inputs.concat(out, kjt.stride(), dense)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        logits = {}
        for task in self.config.tasks:
            gate = torch.softmax(self.gates[task](x).float(), dim=-1)
            mixed = torch.einsum("be,beh->bh", gate, experts.float())
            logits[task] = self.towers[task](mixed)
        return logits
