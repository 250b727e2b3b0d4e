"""A generative ranking transformer in the style of HSTU (Zhai et al., ICML 2024): the
user's behaviour sequence with the candidate item appended goes through a stack of
jagged pointwise-attention blocks; the candidate's output state ranks it (a click
logit), and every history token is trained to predict the item that follows it.

Sequences stay jagged end to end (no padding to the batch's longest history) and, past
the embedding lookup, nothing is read back to the host (but the ids the full-vocabulary
loss checks): the attention is the fused
:func:`~recstack.pipelines.ops.jagged_attention` and the full-vocabulary next-item loss
the fused :func:`~recstack.pipelines.ops.linear_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import TableRows
from recstack.pipelines.models.base import EmbeddingModel
from recstack.pipelines.models.fields import CheckedConfig, ConfigField, ModelConfigError
from recstack.pipelines.models.inputs import PooledInputs, embedded_output, table_rows_output
from recstack.pipelines.models.jagged_tokens import append_layout
from recstack.pipelines.models.layers import Activation, Tower
from recstack.pipelines.models.next_item import NEXT_ITEM_MODES, NextItemLoss

__all__ = ["HSTU", "HSTUBlock", "HSTUConfig"]

_ATTENTION_KINDS = ("pointwise", "softmax")


@dataclass(frozen=True)
class HSTUConfig(CheckedConfig):
    """HSTU's fields (all plain values, so a YAML/TOML table describes it).

    Args:
        item_feature: the candidate item, a pooled feature (one id per row) -> ``[B, D]``.
        history_feature: the behaviour sequence, a jagged feature (``pooling="none"``
            without ``max_len``) reading the same table as ``item_feature``: its ids are
            the next-item targets and the candidate is appended after them.
        other_features: further pooled features (user profile, context) fed to the
            ranking head with the candidate's state.
        dense_dim: the width of ``inputs[dense_key]``; 0 uses no dense features.
        dim: the transformer's width; 0 uses the embedding dim ``D`` (otherwise the
            embeddings are projected to it).
        layers: the number of attention blocks.
        heads: attention heads per block (``dim`` must be a multiple).
        attention: ``"pointwise"`` (HSTU's SiLU attention, no softmax) or ``"softmax"``.
        max_positions: learned positions counted back from the candidate; older tokens
            share the last one.
        dropout: dropout on each block's output and in the ranking head.
        mlp_hidden: hidden sizes of the ranking head.
        mlp_activation: its activation.
        next_item_loss: ``"sampled"`` (negatives from the batch, any ids), ``"full"``
            (softmax over ``vocab_size`` items) or ``"none"`` (rank only: the model then
            returns the logits alone).
        num_negatives: negatives per batch for ``"sampled"``.
        temperature: the sampled softmax's temperature (cosine logits / temperature).
        vocab_size: the number of items for ``"full"`` (ids in ``[0, vocab_size)``).
        rank_task: the output key of the click logits (the ranking task's name).
        next_item_task: the output key of the next-item loss (a ``Task`` with
            ``output="loss"``).
        sparse_key: the batch column holding the ``KeyedJaggedTensor``.
        dense_key: the batch column holding the dense features.
    """

    item_feature: str = ConfigField.name()
    history_feature: str = ConfigField.name()
    other_features: Sequence[str] = ConfigField.names(())
    dense_dim: int = ConfigField.count(0, low=0)
    dim: int = ConfigField.count(0, low=0)
    layers: int = ConfigField.count(2, low=1)
    heads: int = ConfigField.count(2, low=1)
    attention: str = ConfigField.choice("pointwise", _ATTENTION_KINDS)
    max_positions: int = ConfigField.count(1024, low=1)
    dropout: float = ConfigField.dropout()
    mlp_hidden: Sequence[int] = ConfigField.sizes((256,))
    mlp_activation: Activation = ConfigField.activation("relu")
    next_item_loss: str = ConfigField.choice("sampled", (*NEXT_ITEM_MODES, "none"))
    num_negatives: int = ConfigField.count(256, low=1)
    temperature: float = ConfigField.positive(0.05)
    vocab_size: int = ConfigField.count(0, low=0)
    rank_task: str = ConfigField.name("label")
    next_item_task: str = ConfigField.name("next_item")
    sparse_key: str = ConfigField.name("sparse")
    dense_key: str = ConfigField.name("dense")

    def check_consistency(self) -> None:
        """Distinct features and outputs; ``vocab_size`` with ``"full"``; ``dim`` a
        multiple of ``heads``.

        Raises:
            ModelConfigError: a field that contradicts another.
        """
        used = [self.item_feature, self.history_feature, *self.other_features]
        if len(set(used)) != len(used):
            raise ModelConfigError(
                "HSTUConfig: item_feature, history_feature and other_features must name "
                f"different features, got {used}"
            )
        if self.rank_task == self.next_item_task:
            raise ModelConfigError(
                f"HSTUConfig: rank_task and next_item_task are both {self.rank_task!r}"
            )
        if self.next_item_loss == "full" and self.vocab_size < 1:
            raise ModelConfigError(
                "HSTUConfig.vocab_size: next_item_loss 'full' needs the number of items"
            )
        if self.dim and self.dim % self.heads:
            raise ModelConfigError(
                f"HSTUConfig.dim: {self.dim} is not a multiple of heads={self.heads}"
            )


class HSTUBlock(nn.Module):
    """One pre-norm residual block: ``x + dropout(attention(layer_norm(x)))`` with a
    causal :class:`~recstack.pipelines.ops.JaggedSelfAttention`.

    Args:
        dim: the width.
        heads: attention heads.
        kind: ``"pointwise"`` or ``"softmax"``.
        dropout: dropout on the block's output.
    """

    def __init__(self, dim: int, heads: int, kind: str, dropout: float) -> None:
        super().__init__()
        # Imported here: the ops package imports models.layers, whose package imports
        # this module.
        from recstack.pipelines.ops.jagged_attention import JaggedSelfAttention

        self.norm = nn.LayerNorm(dim)
        self.attention = JaggedSelfAttention(dim, heads, kind, causal=True)  # type: ignore[arg-type]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The block's output, ``[N, dim]``.

        Args:
            x: ``[N, dim]`` tokens.
            offsets: int64 ``[B + 1]`` sequence boundaries (trusted: not read back).
        """
        # The offsets come from the model's own layout: no check, so no host sync.
        return x + self.dropout(self.attention(self.norm(x), offsets, check_inputs=False))


class HSTU(EmbeddingModel[HSTUConfig]):
    """Generative ranking transformer: ``model(inputs) -> {rank_task: logits [B],
    next_item_task: loss}``, or the logits ``[B]`` alone with ``next_item_loss="none"``.

    Each row's history rows (the collection's jagged output, no padding) with its
    candidate appended form one sequence; learned positions counted back from the
    candidate are added, then ``layers`` causal blocks run over the whole batch as one
    jagged batch. The candidate sees the whole history; history tokens never see it.
    The candidate's final state, its embedding, ``other_features`` and the dense features
    go through an MLP to the click logit. Each history token's final state predicts the
    next item of its history (:class:`NextItemLoss`), the generative objective, whose
    gradient also trains the item embeddings.

    Train it with ``Task(rank_task)`` on the click label and ``Task(next_item_task,
    output="loss", weight=w)``. Built like every :class:`EmbeddingModel`, from an
    :class:`HSTUConfig`; a field naming a missing feature or one of the wrong kind
    (the history must be jagged), or item and history features of different dims, raise
    a ``ModelConfigError``.
    """

    config_class = HSTUConfig

    def _build(self, config: HSTUConfig) -> None:
        c, fs = config, self.features
        self.item_dim = fs.pooled("item_feature", c.item_feature, allow_tile=False)
        hist_dim, max_len = fs.sequence("history_feature", c.history_feature, allow_jagged=True)
        if max_len is not None:
            raise ModelConfigError(
                f"HSTUConfig.history_feature: feature {c.history_feature!r} has max_len="
                f"{max_len}; HSTU reads a jagged sequence (pooling='none' without max_len)"
            )
        if hist_dim != self.item_dim:
            raise ModelConfigError(
                f"HSTUConfig: item_feature {c.item_feature!r} has dim {self.item_dim} but "
                f"history_feature {c.history_feature!r} has dim {hist_dim}; they should read "
                "one table"
            )
        width = c.dim or self.item_dim
        if width % c.heads:
            raise ModelConfigError(
                f"HSTUConfig.heads: the width {width} (the embedding dim) is not a multiple "
                f"of heads={c.heads}; set dim"
            )
        self.width = width
        self.input_proj: nn.Module = (
            nn.Linear(self.item_dim, width) if width != self.item_dim else nn.Identity()
        )
        self.positions = nn.Embedding(c.max_positions, width)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(
            HSTUBlock(width, c.heads, c.attention, c.dropout) for _ in range(c.layers)
        )
        self.final_norm = nn.LayerNorm(width)
        self.others = PooledInputs("HSTU", fs, "other_features", c.other_features, c.dense_dim)
        head_in = width + self.item_dim + self.others.width
        self.head = Tower(head_in, c.mlp_hidden, c.mlp_activation, c.dropout)
        self.next_item: NextItemLoss | None = None
        if c.next_item_loss != "none":
            self.next_item = NextItemLoss(
                width,
                self.item_dim,
                c.next_item_loss,  # type: ignore[arg-type]
                num_negatives=c.num_negatives,
                temperature=c.temperature,
                vocab_size=c.vocab_size,
                feature=c.history_feature,
            )

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> Any:
        c = self.config
        batch = kjt.stride()
        item = embedded_output("HSTU", out, c.item_feature, (batch, self.item_dim))
        history = table_rows_output("HSTU", out, c.history_feature, batch, self.item_dim)
        if isinstance(history, TableRows):
            history = history.gather()  # the blocks project every row: gather them here
        rows = history.values
        num = rows.shape[0]
        layout = append_layout(history.offsets, num)
        tokens = self.input_proj(torch.cat([rows, item.to(rows.dtype)]))[layout.source]
        where = layout.from_end.clamp(max=c.max_positions - 1)
        x = tokens + self.positions(where).to(tokens.dtype)
        for block in self.blocks:
            x = block(x, layout.offsets)
        x = self.final_norm(x)
        state = x[layout.candidates]
        parts = [state.float(), item.float(), *self.others.parts(out, batch, dense)]
        logits = self.head(torch.cat(parts, dim=-1))
        if self.next_item is None:
            return logits
        ids = _feature_ids(kjt, c.history_feature, num)
        loss = self.next_item(x[layout.history], history.offsets, ids, rows)
        return {c.rank_task: logits, c.next_item_task: loss}


def _feature_ids(kjt: KeyedJaggedTensor, name: str, num: int) -> torch.Tensor:
    """Feature ``name``'s ``num`` ids, read by an index from its first offset on the
    device (slicing by ``kjt[name]`` reads the per-key totals back to the host)."""
    keys = kjt.keys()
    start = kjt.offsets()[keys.index(name) * kjt.stride()]
    index = start + torch.arange(num, device=start.device)
    return kjt.values()[index].long()
