"""ESMM, the entire space multi-task model (Ma et al., SIGIR 2018): CTR and CVR towers
over shared embeddings, trained on pCTR and pCTCVR = pCTR * pCVR over all impressions.
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
    task_names,
)
from recstack.pipelines.models.inputs import pooled_parts
from recstack.pipelines.models.layers import MLP

__all__ = ["ESMM", "ESMMConfig"]


@dataclass(frozen=True)
class ESMMConfig:
    """ESMM's fields.

    Args:
        sparse_features: pooled features (``"sum"``, ``"mean"`` or ``"tile"``), shared by
            both towers, concatenated with the dense features.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features.
        tower_hidden: each tower's hidden sizes (then a linear layer to its logit).
        activation: the towers' activation.
        dropout: dropout after each hidden layer of the towers.
        ctr_task: the output key of pCTR.
        ctcvr_task: the output key of pCTCVR = pCTR * pCVR.
        cvr_output: the output key of pCVR, which is what ESMM is for at serving time;
            no task trains it directly.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    sparse_features: Sequence[str]
    dense_dim: int = 0
    tower_hidden: Sequence[int] = (200, 80)
    activation: str = "relu"
    dropout: float = 0.0
    ctr_task: str = "ctr"
    ctcvr_task: str = "ctcvr"
    cvr_output: str = "cvr"
    sparse_key: str = "sparse"
    dense_key: str = "dense"

    def __post_init__(self) -> None:
        o, set_ = "ESMMConfig", object.__setattr__
        set_(self, "sparse_features", names_field(o, "sparse_features", self.sparse_features))
        int_field(o, "dense_dim", self.dense_dim, 0)
        if not self.sparse_features and self.dense_dim == 0:
            raise ModelConfigError(f"{o}: give sparse_features or dense_dim > 0 (no inputs)")
        set_(self, "tower_hidden", sizes_field(o, "tower_hidden", self.tower_hidden))
        set_(self, "activation", activation_field(o, "activation", self.activation))
        set_(self, "dropout", dropout_field(o, "dropout", self.dropout))
        outputs = [self.ctr_task, self.ctcvr_task, self.cvr_output]
        task_names(o, "ctr_task, ctcvr_task and cvr_output", outputs)
        name_field(o, "sparse_key", self.sparse_key)
        name_field(o, "dense_key", self.dense_key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


class ESMM(EmbeddingModel):
    """ESMM: ``model(inputs) -> {ctr_task: pCTR, ctcvr_task: pCTR * pCVR, cvr_output:
    pCVR}``, probabilities ``[B]`` in float32.

    Both towers read the same input (the shared embeddings and dense features). CVR is
    never fit on clicked rows only: the CTCVR product is fit on every impression, with
    the conversion label (0 where there was no click), which is how ESMM avoids the
    sample selection bias of a CVR model. Train it with::

        tasks = [
            Task("ctr", label="click", output="probability"),
            Task("ctcvr", label="conversion", output="probability"),
        ]

    ``output="probability"`` because the product of two probabilities has no logit the
    loss could take.

    Args:
        config: an :class:`ESMMConfig`.
        tables: the collection's tables (see :class:`EmbeddingModel`).
        features: the collection's features (see :class:`EmbeddingModel`).
        embeddings: a ready-made collection (see :class:`EmbeddingModel`).
        device: where the model lives (see :class:`EmbeddingModel`).

    Raises:
        ModelConfigError: a field names a missing feature or an unpooled one.
    """

    config_class = ESMMConfig

    def __init__(
        self,
        config: ESMMConfig,
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
        self.ctr_tower = MLP(width, c.tower_hidden, c.activation, c.dropout, out_dim=1)
        self.cvr_tower = MLP(width, c.tower_hidden, c.activation, c.dropout, out_dim=1)
        self._place()

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Probabilities ``[B]`` (float32) by output key for a batch dict.

        Args:
            inputs: ``inputs[sparse_key]`` the ``KeyedJaggedTensor``, and
                ``inputs[dense_key]`` ``[B, dense_dim]`` when ``dense_dim > 0``.
        """
        c = self.config
        kjt, out, dense = self._read(inputs, c.dense_dim)
        parts = pooled_parts("ESMM", out, c.sparse_features, self.widths, kjt.stride(), dense)
        x = torch.cat(parts, dim=-1)
        p_ctr = torch.sigmoid(self.ctr_tower(x).squeeze(-1).float())
        p_cvr = torch.sigmoid(self.cvr_tower(x).squeeze(-1).float())
        return {c.ctr_task: p_ctr, c.ctcvr_task: p_ctr * p_cvr, c.cvr_output: p_cvr}
