"""DIN, the Deep Interest Network (Zhou et al., KDD 2018): target attention of the
candidate item over the user's behaviour sequence, then an MLP to one logit.

The history is a padded ``[B, L, D]`` sequence or jagged ``[N, D]`` rows (no padding:
memory follows the number of history ids). The attention unit is the fused op
(:class:`~recstack.pipelines.ops.FusedTargetAttention`, Triton kernels on CUDA reading
either layout in place) when its activation and sizes are ones the kernels compute, else
the unfused :class:`TargetAttention` (a jagged history is then padded to the batch's
longest); both hold the same parameters, so a checkpoint of either loads into the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.embedding_engine import TableRows
from recstack.pipelines.kernels.target_attention import FUSED_ACTIVATIONS, MAX_FUSED_WIDTH
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import CheckedConfig, ConfigField, ModelConfigError
from recstack.pipelines.models.inputs import (
    PooledInputs,
    embedded_output,
    sequence_lengths,
    sequence_mask,
    table_rows_output,
)
from recstack.pipelines.models.layers import MLP, Activation, Tower

__all__ = ["DIN", "DINConfig", "TargetAttention", "fused_attention_supported"]


@dataclass(frozen=True)
class DINConfig(CheckedConfig):
    """DIN's fields (all plain values, so a YAML/TOML table describes it).

    Args:
        item_feature: the candidate item, a pooled feature (``pooling="sum"``; one id per
            row) -> ``[B, D]``.
        history_feature: the behaviour sequence: a padded sequence feature
            (``pooling="none", max_len=L``) -> ``[B, L, D]``, or a jagged one
            (``pooling="none"``, no ``max_len``) -> a ``JaggedTensor`` of ``[N, D]`` rows,
            every id of every history with no padding (for long histories). It should
            read the same table as ``item_feature``, so an item has one embedding whether
            it is the candidate or in a history; it must at least have the same dim.
        other_features: further pooled features (user profile, context) fed to the MLP.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features.
        attention_hidden: hidden sizes of the attention unit's MLP.
        attention_activation: its activation (the authors' released code uses sigmoid).
        softmax: normalize the attention scores with a softmax over the valid positions.
            The default ``False`` is the paper's choice: un-normalized weights keep the
            intensity of a user's interest (many matching behaviours sum to more).
        fused_attention: run the attention unit as the fused op (Triton kernels on CUDA
            over the padded or jagged history in place; the same computation in torch on
            the CPU)
            when :func:`fused_attention_supported` says it can; ``False`` always uses the
            unfused :class:`TargetAttention`. The parameters are the same either way.
        mlp_hidden: hidden sizes of the final MLP.
        mlp_activation: its activation: ``"dice"`` (the paper's), ``"prelu"``,
            ``"relu"``, ... (see ``layers.ACTIVATIONS``).
        dropout: dropout after each hidden layer of the final MLP.
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    item_feature: str = ConfigField.name()
    history_feature: str = ConfigField.name()
    other_features: Sequence[str] = ConfigField.names(())
    dense_dim: int = ConfigField.count(0, low=0)
    attention_hidden: Sequence[int] = ConfigField.sizes((80, 40))
    attention_activation: Activation = ConfigField.activation("sigmoid")
    softmax: bool = ConfigField.flag(False)
    fused_attention: bool = ConfigField.flag(True)
    mlp_hidden: Sequence[int] = ConfigField.sizes((200, 80))
    mlp_activation: Activation = ConfigField.activation("dice")
    dropout: float = ConfigField.dropout()
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")

    def check_consistency(self) -> None:
        """The item, the history and the other features must be different features.

        Raises:
            ModelConfigError: a feature named twice.
        """
        used = [self.item_feature, self.history_feature, *self.other_features]
        if len(set(used)) != len(used):
            raise ModelConfigError(
                "DINConfig: item_feature, history_feature and other_features must name "
                f"different features, got {used}"
            )


def fused_attention_supported(dim: int, hidden: Sequence[int], activation: str) -> bool:
    """Whether the fused target attention op computes DIN's attention unit of this shape:
    one or two hidden layers, ``dim`` and every hidden size at most ``MAX_FUSED_WIDTH``
    (256), and an activation of ``FUSED_ACTIVATIONS`` (not PReLU or Dice).

    Args:
        dim: the embedding width.
        hidden: the attention MLP's hidden sizes.
        activation: its activation.
    """
    sizes = tuple(hidden)
    return (
        activation.lower() in FUSED_ACTIVATIONS
        and len(sizes) in (1, 2)
        and max(dim, *sizes) <= MAX_FUSED_WIDTH
    )


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

    def __init__(
        self, dim: int, hidden: Sequence[int], activation: Activation, softmax: bool
    ) -> None:
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


class DIN(EmbeddingModel[DINConfig]):
    """Deep Interest Network: ``model(inputs) -> logits [B]`` (float32).

    The candidate item's embedding attends over the history's, the padding excluded by the
    history's lengths in the batch (read on the device, no host sync); the attention
    output, the item, ``other_features`` and the dense features go through an MLP to one
    logit. Train it with one ``Task`` on the click label.

    A jagged history (``max_len`` unset on its feature; ``model.max_len`` is then
    ``None``) goes to the fused op as its ``[N, D]`` rows and the batch's offsets, so
    memory follows the number of history ids, not ``B * L_max * D``, with no host sync.
    The unfused module pads it to the batch's longest history first (one host sync for
    that length), which gives the same logits and gradients.

    The attention unit (``model.attention``) is a
    :class:`~recstack.pipelines.ops.FusedTargetAttention` when ``config.fused_attention``
    is set and :func:`fused_attention_supported` holds (the defaults: sigmoid, ``(80,
    40)``), else a :class:`TargetAttention`. Their parameters and ``state_dict`` keys are
    the same, so checkpoints load either way.

    Built like every :class:`EmbeddingModel`, from a :class:`DINConfig`; a config field
    naming a missing feature or one of the wrong kind, or item and history features of
    different dims, raise a ``ModelConfigError``.
    """

    config_class = DINConfig

    def _build(self, config: DINConfig) -> None:
        c, fs = config, self.features
        self.dim = fs.pooled("item_feature", c.item_feature, allow_tile=False)
        hist_dim, self.max_len = fs.sequence(
            "history_feature", c.history_feature, allow_jagged=True
        )
        if hist_dim != self.dim:
            raise ModelConfigError(
                f"DINConfig: item_feature {c.item_feature!r} has dim {self.dim} but "
                f"history_feature {c.history_feature!r} has dim {hist_dim}; they should read "
                "one table"
            )
        self.others = PooledInputs("DIN", fs, "other_features", c.other_features, c.dense_dim)
        self.fused = c.fused_attention and fused_attention_supported(
            self.dim, c.attention_hidden, c.attention_activation
        )
        self.attention: nn.Module
        if self.fused:
            # Imported here: the ops package imports models.layers, whose package imports
            # this module.
            from recstack.pipelines.ops.target_attention import FusedTargetAttention

            self.attention = FusedTargetAttention(
                self.dim, c.attention_hidden, c.attention_activation, c.softmax
            )
        else:
            self.attention = TargetAttention(
                self.dim, c.attention_hidden, c.attention_activation, c.softmax
            )
        width = 2 * self.dim + self.others.width
        self.mlp = Tower(width, c.mlp_hidden, c.mlp_activation, c.dropout)

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> torch.Tensor:
        c = self.config
        batch = kjt.stride()
        item = embedded_output("DIN", out, c.item_feature, (batch, self.dim))
        if self.max_len is None:
            interest = self._jagged_interest(item, out, batch)
        else:
            interest = self._padded_interest(kjt, item, out, batch)
        x = torch.cat([interest, item.float(), *self.others.parts(out, batch, dense)], dim=-1)
        return self.mlp(x)

    def _padded_interest(
        self, kjt: KeyedJaggedTensor, item: torch.Tensor, out: Mapping[str, Any], batch: int
    ) -> torch.Tensor:
        c = self.config
        assert self.max_len is not None
        history = embedded_output("DIN", out, c.history_feature, (batch, self.max_len, self.dim))
        if self.fused:
            lengths = sequence_lengths(kjt, c.history_feature, self.max_len)
            interest = self.attention.forward_padded(item, history, lengths).float()
        else:
            mask = sequence_mask(kjt, c.history_feature, self.max_len)
            interest = self.attention(item, history, mask)
        return interest

    def _jagged_interest(
        self, item: torch.Tensor, out: Mapping[str, Any], batch: int
    ) -> torch.Tensor:
        history = table_rows_output("DIN", out, self.config.history_feature, batch, self.dim)
        if isinstance(history, TableRows):
            if self.fused:
                # The kernels read each id's row from the table: the rows are never
                # gathered, and their gradient goes back through the collection's sink.
                return self.attention(
                    item, history.offsets, table=history.table, row_ids=history.rows,
                    grad_sink=history.grad_sink, depends_on=history.depends_on,
                    check_bounds=False,
                ).float()  # fmt: skip
            history = history.gather()
        if self.fused:
            # The collection's offsets are trusted: no bounds check, so no host sync.
            return self.attention(item, history.offsets, history.values, check_bounds=False).float()
        keys, mask = _padded_history(history)
        return self.attention(item, keys, mask)


def _padded_history(history: JaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A jagged history padded to its longest row, ``[B, L, D]``, and its ``[B, L]``
    mask, for the unfused module. Reading the longest length is one host sync."""
    lengths = history.lengths()
    max_len = int(lengths.max()) if lengths.numel() else 0
    keys = history.to_padded(max_len)
    positions = torch.arange(max_len, device=lengths.device)
    return keys, positions < lengths.unsqueeze(1)
