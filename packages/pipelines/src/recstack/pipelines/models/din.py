"""DIN, the Deep Interest Network (Zhou et al., KDD 2018): target attention of the
candidate item over the user's behaviour sequence, then an MLP to one logit.
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
    bool_field,
    config_to_dict,
    dropout_field,
    int_field,
    name_field,
    names_field,
    sizes_field,
)
from recstack.pipelines.models.inputs import (
    pooled_output,
    pooled_parts,
    sequence_mask,
    sequence_output,
)
from recstack.pipelines.models.layers import MLP

__all__ = ["DIN", "DINConfig", "TargetAttention"]


@dataclass(frozen=True)
class DINConfig:
    """DIN's fields (all plain values, so a YAML/TOML table describes it).

    Args:
        item_feature: the candidate item, a pooled feature (``pooling="sum"``; one id per
            row) -> ``[B, D]``.
        history_feature: the behaviour sequence, a padded sequence feature
            (``pooling="none", max_len=L``) -> ``[B, L, D]``. It should read the same
            table as ``item_feature``, so an item has one embedding whether it is the
            candidate or in a history; it must at least have the same dim.
        other_features: further pooled features (user profile, context) fed to the MLP.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features.
        attention_hidden: hidden sizes of the attention unit's MLP.
        attention_activation: its activation (the authors' released code uses sigmoid).
        softmax: normalize the attention scores with a softmax over the valid positions.
            The default ``False`` is the paper's choice: un-normalized weights keep the
            intensity of a user's interest (many matching behaviours sum to more).
        mlp_hidden: hidden sizes of the final MLP.
        mlp_activation: its activation: ``"dice"`` (the paper's), ``"prelu"``,
            ``"relu"``, ... (see ``layers.ACTIVATIONS``).
        dropout: dropout after each hidden layer of the final MLP.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    item_feature: str
    history_feature: str
    other_features: Sequence[str] = ()
    dense_dim: int = 0
    attention_hidden: Sequence[int] = (80, 40)
    attention_activation: str = "sigmoid"
    softmax: bool = False
    mlp_hidden: Sequence[int] = (200, 80)
    mlp_activation: str = "dice"
    dropout: float = 0.0
    sparse_key: str = "sparse"
    dense_key: str = "dense"

    def __post_init__(self) -> None:
        o, set_ = "DINConfig", object.__setattr__
        name_field(o, "item_feature", self.item_feature)
        name_field(o, "history_feature", self.history_feature)
        set_(self, "other_features", names_field(o, "other_features", self.other_features))
        used = [self.item_feature, self.history_feature, *self.other_features]
        if len(set(used)) != len(used):
            raise ModelConfigError(
                f"{o}: item_feature, history_feature and other_features must name different "
                f"features, got {used}"
            )
        int_field(o, "dense_dim", self.dense_dim, 0)
        set_(self, "attention_hidden", sizes_field(o, "attention_hidden", self.attention_hidden))
        act = activation_field(o, "attention_activation", self.attention_activation)
        set_(self, "attention_activation", act)
        bool_field(o, "softmax", self.softmax)
        set_(self, "mlp_hidden", sizes_field(o, "mlp_hidden", self.mlp_hidden))
        set_(self, "mlp_activation", activation_field(o, "mlp_activation", self.mlp_activation))
        set_(self, "dropout", dropout_field(o, "dropout", self.dropout))
        name_field(o, "sparse_key", self.sparse_key)
        name_field(o, "dense_key", self.dense_key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists for sequences)."""
        return config_to_dict(self)


class TargetAttention(nn.Module):
    """DIN's attention unit: an MLP scores each behaviour ``k`` against the target ``q``
    from ``[q, k, q - k, q * k]``; the output is the score-weighted sum of the behaviours,
    padding excluded.

    Args:
        dim: the embedding width ``D``.
        hidden: the scoring MLP's hidden sizes.
        activation: its activation.
        softmax: normalize the scores over each row's valid positions (otherwise the raw
            scores weight the sum, as in the paper).
    """

    def __init__(self, dim: int, hidden: Sequence[int], activation: str, softmax: bool) -> None:
        super().__init__()
        self.softmax = softmax
        self.score = MLP(4 * dim, hidden, activation, out_dim=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention-pooled behaviours, ``[B, D]``.

        Args:
            query: the target, ``[B, D]``.
            keys: the behaviours, ``[B, L, D]``.
            mask: bool ``[B, L]``, False on padding. A row with no valid position gives
                zeros.
        """
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        if self.softmax:
            # A finite fill, not -inf: a row of padding only must give zeros, not NaN.
            scores = scores.float()
            fill = torch.finfo(scores.dtype).min
            scores = torch.softmax(scores.masked_fill(~mask, fill), dim=-1)
        weights = scores.float() * mask
        return torch.einsum("bl,bld->bd", weights, keys.float())


class DIN(EmbeddingModel):
    """Deep Interest Network: ``model(inputs) -> logits [B]`` (float32).

    The candidate item's embedding attends over the history's (:class:`TargetAttention`,
    with the mask from the history's lengths in the batch); the attention output, the
    item, ``other_features`` and the dense features go through an MLP to one logit.
    Train it with one ``Task`` on the click label.

    Args:
        config: a :class:`DINConfig`.
        tables: the collection's tables (see :class:`EmbeddingModel`).
        features: the collection's features (see :class:`EmbeddingModel`).
        embeddings: a ready-made collection (see :class:`EmbeddingModel`).
        device: where the model lives (see :class:`EmbeddingModel`).

    Raises:
        ModelConfigError: a config field names a missing feature or one of the wrong
            kind, or the item and history dims differ.
    """

    config_class = DINConfig

    def __init__(
        self,
        config: DINConfig,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(config, tables, features, embeddings=embeddings, device=device)
        c, fs = config, self.features
        self.dim = fs.pooled("item_feature", c.item_feature, allow_tile=False)
        hist_dim, self.max_len = fs.sequence("history_feature", c.history_feature)
        if hist_dim != self.dim:
            raise ModelConfigError(
                f"DINConfig: item_feature {c.item_feature!r} has dim {self.dim} but "
                f"history_feature {c.history_feature!r} has dim {hist_dim}; they should read "
                "one table"
            )
        self.other_widths = [
            fs.pooled(f"other_features[{i}]", n) for i, n in enumerate(c.other_features)
        ]
        self.attention = TargetAttention(
            self.dim, c.attention_hidden, c.attention_activation, c.softmax
        )
        width = 2 * self.dim + sum(self.other_widths) + c.dense_dim
        self.mlp = MLP(width, c.mlp_hidden, c.mlp_activation, c.dropout, out_dim=1)
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
        item = pooled_output("DIN", out, c.item_feature, batch, self.dim)
        history = sequence_output("DIN", out, c.history_feature, batch, self.max_len, self.dim)
        mask = sequence_mask(kjt, c.history_feature, self.max_len)
        interest = self.attention(item, history, mask)
        rest = pooled_parts("DIN", out, c.other_features, self.other_widths, batch, dense)
        x = torch.cat([interest, item.float(), *rest], dim=-1)
        return self.mlp(x).squeeze(-1).float()
