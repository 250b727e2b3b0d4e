"""ESMM, the entire space multi-task model (Ma et al., SIGIR 2018): CTR and CVR towers
over shared embeddings, trained on pCTR and pCTCVR = pCTR * pCVR over all impressions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recstack.core import KeyedJaggedTensor
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import (
    CheckedConfig,
    ConfigField,
    ModelConfigError,
    task_names,
)
from recstack.pipelines.models.inputs import PooledInputs
from recstack.pipelines.models.layers import Activation, Tower

__all__ = ["ESMM", "ESMMConfig"]


@dataclass(frozen=True)
class ESMMConfig(CheckedConfig):
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

    sparse_features: Sequence[str] = ConfigField.names()
    dense_dim: int = ConfigField.count(0, low=0)
    tower_hidden: Sequence[int] = ConfigField.sizes((200, 80))
    activation: Activation = ConfigField.activation("relu")
    dropout: float = ConfigField.dropout()
    ctr_task: str = "ctr"
    ctcvr_task: str = "ctcvr"
    cvr_output: str = "cvr"
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")

    def check_consistency(self) -> None:
        """The towers need an input, and the three outputs distinct task names.

        Raises:
            ModelConfigError: neither sparse nor dense features, or output keys that are
                not distinct names without a dot.
        """
        if not self.sparse_features and self.dense_dim == 0:
            raise ModelConfigError("ESMMConfig: give sparse_features or dense_dim > 0 (no inputs)")
        outputs = [self.ctr_task, self.ctcvr_task, self.cvr_output]
        task_names("ESMMConfig", "ctr_task, ctcvr_task and cvr_output", outputs)


class ESMM(EmbeddingModel[ESMMConfig]):
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

    Built like every :class:`EmbeddingModel`, from an :class:`ESMMConfig`; a field
    naming a missing feature or an unpooled one raises a ``ModelConfigError``.
    """

    config_class = ESMMConfig

    def _build(self, config: ESMMConfig) -> None:
        c = config
        self.inputs = PooledInputs(
            "ESMM", self.features, "sparse_features", c.sparse_features, c.dense_dim
        )
        self.ctr_tower = Tower(self.inputs.width, c.tower_hidden, c.activation, c.dropout)
        self.cvr_tower = Tower(self.inputs.width, c.tower_hidden, c.activation, c.dropout)

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        c = self.config
        x = self.inputs.concat(out, kjt.stride(), dense)
        p_ctr = torch.sigmoid(self.ctr_tower(x))
        p_cvr = torch.sigmoid(self.cvr_tower(x))
        return {c.ctr_task: p_ctr, c.ctcvr_task: p_ctr * p_cvr, c.cvr_output: p_cvr}
