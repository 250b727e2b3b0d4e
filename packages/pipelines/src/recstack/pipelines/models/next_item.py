"""Next-item prediction over jagged sequences: each token's state is trained to predict
the item that follows it in its own sequence (the generative half of a generative
recommender such as HSTU)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recstack.pipelines.models.jagged_tokens import has_next

__all__ = ["NEXT_ITEM_MODES", "NextItemLoss", "NextItemMode"]

#: ``"sampled"``: sampled softmax over negatives drawn from the batch's own items (any
#: ids, dynamic tables); ``"full"``: softmax over a vocabulary of ``vocab_size`` items
#: (ids in ``[0, vocab_size)``) with the fused linear cross-entropy.
NextItemMode = Literal["sampled", "full"]
NEXT_ITEM_MODES: tuple[str, ...] = ("sampled", "full")


class NextItemLoss(nn.Module):
    """The mean next-item loss of a jagged batch of token states.

    Token ``t`` of a sequence is scored against the item at ``t + 1`` of the same
    sequence; each sequence's last token has no target and is left out of the mean.

    * ``mode="sampled"``: a projection maps the state to the item embedding space and
      the logits are cosine similarities divided by ``temperature``, against the next
      item's embedding and ``num_negatives`` items drawn uniformly from the batch's
      tokens (so from the stream's item distribution). Every logit is corrected by the
      log of its item's count in the batch (the log-Q correction of in-batch sampling),
      and a negative equal to the token's target is dropped. Gradients reach the
      embedding rows (the table's sparse gradients) and the projection.
    * ``mode="full"``: logits ``state @ weight.T`` over a ``[vocab_size, dim]`` output
      layer, by :func:`~recstack.pipelines.ops.linear_cross_entropy` (no
      ``[tokens, vocab_size]`` logits in memory). The ids must lie in
      ``[0, vocab_size)``; one host read per call checks the targets.

    Args:
        dim: the token state width.
        item_dim: the item embedding width (``"sampled"``).
        mode: ``"sampled"`` or ``"full"``.
        num_negatives: negatives per batch (``"sampled"``), shared by every token.
        temperature: the logits' temperature (``"sampled"``).
        vocab_size: the number of items (``"full"``).
        feature: the sequence feature's name, for errors.

    Examples:
        >>> import torch
        >>> loss_fn = NextItemLoss(16, 8, "sampled", num_negatives=4)
        >>> offsets = torch.tensor([0, 3, 5])
        >>> ids = torch.tensor([4, 9, 4, 7, 1])
        >>> loss = loss_fn(torch.randn(5, 16), offsets, ids, torch.randn(5, 8))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        dim: int,
        item_dim: int,
        mode: NextItemMode = "sampled",
        *,
        num_negatives: int = 256,
        temperature: float = 0.05,
        vocab_size: int = 0,
        feature: str = "sequence",
    ) -> None:
        super().__init__()
        if mode not in NEXT_ITEM_MODES:
            raise ValueError(f"NextItemLoss: mode must be one of {NEXT_ITEM_MODES}, got {mode!r}")
        if num_negatives < 1 or not temperature > 0:
            raise ValueError(
                "NextItemLoss: num_negatives must be >= 1 and temperature > 0, got "
                f"{num_negatives} and {temperature}"
            )
        if mode == "full" and vocab_size < 1:
            raise ValueError(f"NextItemLoss: mode 'full' needs vocab_size >= 1, got {vocab_size}")
        self.mode: NextItemMode = mode
        self.num_negatives, self.temperature = int(num_negatives), float(temperature)
        self.vocab_size, self.feature = int(vocab_size), feature
        self.proj: nn.Linear | None = None
        self.weight: nn.Parameter | None = None
        if mode == "sampled":
            self.proj = nn.Linear(dim, item_dim)
        else:
            self.weight = nn.Parameter(torch.randn(vocab_size, dim) * dim**-0.5)

    def forward(
        self,
        hidden: torch.Tensor,
        offsets: torch.Tensor,
        ids: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss over the tokens that have a next item (0 when none has).

        Args:
            hidden: ``[N, dim]`` token states.
            offsets: int64 ``[B + 1]`` sequence boundaries of the ``N`` tokens (trusted).
            ids: int64 ``[N]`` each token's item id.
            rows: ``[N, item_dim]`` each token's item embedding (``"sampled"``; its
                gradient flows back to the table).

        Returns:
            A float32 scalar.
        """
        num = hidden.shape[0]
        valid = has_next(offsets, num)
        if num == 0:
            # No token: a zero that still reaches every input, so backward runs as usual.
            zero = hidden.sum() * 0.0
            return (zero + rows.sum() * 0.0 if rows is not None else zero).float()
        next_ids = torch.roll(ids, -1)
        if self.mode == "sampled":
            if rows is None:
                raise ValueError("NextItemLoss: mode 'sampled' needs the tokens' item rows")
            loss = self._sampled(hidden, ids, next_ids, rows)
        else:
            loss = self._full(hidden, next_ids, valid)
        count = valid.sum().clamp(min=1)
        return (loss.float() * valid).sum() / count

    def _sampled(
        self, hidden: torch.Tensor, ids: torch.Tensor, next_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        # Imported here: the ops package imports models.layers, whose package imports
        # this module.
        from recstack.pipelines.ops.cross_entropy import sampled_softmax_loss

        assert self.proj is not None
        num = hidden.shape[0]
        query = F.normalize(self.proj(hidden).float(), dim=-1)
        items = F.normalize(rows.float(), dim=-1)
        picks = torch.randint(num, (self.num_negatives,), device=hidden.device)
        # Negatives are drawn uniformly from the batch's tokens, so item i's draw
        # probability is proportional to its count among them.
        ordered = ids.sort().values
        counts = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
        logq = counts.float().log()
        return sampled_softmax_loss(
            query,
            next_ids,
            ids[picks],
            pos_emb=torch.roll(items, -1, dims=0),
            neg_emb=items[picks],
            pos_logq=torch.roll(logq, -1),
            neg_logq=logq[picks],
            temperature=self.temperature,
            ignore_index=None,
            reduction="none",
        )

    def _full(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        from recstack.pipelines.ops.cross_entropy import linear_cross_entropy

        assert self.weight is not None
        outside = valid & ((next_ids < 0) | (next_ids >= self.vocab_size))
        if bool(outside.any()):  # one host read: the targets index the output layer
            # The bad id is the target of the token before it.
            token = int(torch.nonzero(outside)[0, 0]) + 1
            raise ValueError(
                f"NextItemLoss: feature {self.feature!r} holds id {int(next_ids[token - 1])} "
                f"at token {token} (0-based) of the batch, outside [0, {self.vocab_size}), "
                "the vocabulary of the 'full' next-item softmax"
            )
        target = torch.where(valid, next_ids, -100)
        dtype = _compute_dtype(hidden)
        return linear_cross_entropy(
            hidden.to(dtype),
            self.weight.to(dtype),
            target,
            reduction="none",
            check_target=False,
        )

    def extra_repr(self) -> str:
        if self.mode == "full":
            return f"mode='full', vocab_size={self.vocab_size}"
        return f"mode='sampled', num_negatives={self.num_negatives}, temperature={self.temperature}"


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``hidden``'s device, else its dtype."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype
