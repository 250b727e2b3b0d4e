"""Index arithmetic on jagged token batches, all on the device without a host sync: a
candidate appended to each sequence, positions counted from the end, and which tokens
have a successor in their own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AppendedLayout", "append_layout", "has_next"]


@dataclass(frozen=True)
class AppendedLayout:
    """Where each token goes when one candidate is appended to every sequence.

    Sequence ``b`` of the new batch is ``b``'s history (``lengths[b]`` tokens) followed by
    candidate ``b``, so it has ``lengths[b] + 1`` tokens.

    Attributes:
        offsets: int64 ``[B + 1]`` offsets of the new batch (``N + B`` tokens).
        history: int64 ``[N]``: the new position of each history token.
        candidates: int64 ``[B]``: the new position of each candidate (its sequence's last).
        source: int64 ``[N + B]``: for each new position, the row of ``cat([history,
            candidates])`` that goes there (a gather builds the new batch; its backward
            is a scatter-add, so gradients reach both inputs).
        from_end: int64 ``[N + B]``: each new token's distance to its sequence's
            candidate (the candidate 0, the last history token 1, ...).
        row: int64 ``[N]``: the sequence of each history token.
    """

    offsets: torch.Tensor
    history: torch.Tensor
    candidates: torch.Tensor
    source: torch.Tensor
    from_end: torch.Tensor
    row: torch.Tensor


def append_layout(offsets: torch.Tensor, num_tokens: int) -> AppendedLayout:
    """The layout of a jagged batch with one candidate appended to every sequence.

    Args:
        offsets: int64 ``[B + 1]`` offsets of the history tokens (trusted: not read back).
        num_tokens: ``N``, the number of history tokens (``offsets[-1]``, known on the
            host from the rows' shape, so nothing is read back).

    Returns:
        The :class:`AppendedLayout`.

    Examples:
        >>> import torch
        >>> layout = append_layout(torch.tensor([0, 2, 2, 3]), 3)
        >>> layout.offsets.tolist(), layout.candidates.tolist()
        ([0, 3, 4, 6], [2, 3, 5])
        >>> layout.from_end.tolist()
        [2, 1, 0, 0, 1, 0]
    """
    device = offsets.device
    batch = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    new_offsets = offsets + torch.arange(batch + 1, device=device, dtype=offsets.dtype)
    row = torch.repeat_interleave(
        torch.arange(batch, device=device), lengths, output_size=num_tokens
    )
    history = torch.arange(num_tokens, device=device) + row
    candidates = new_offsets[1:] - 1
    total = num_tokens + batch
    source = torch.empty(total, dtype=torch.int64, device=device)
    source[history] = torch.arange(num_tokens, device=device)
    source[candidates] = torch.arange(num_tokens, total, device=device)
    from_end = torch.zeros(total, dtype=torch.int64, device=device)
    from_end[history] = candidates[row] - history
    return AppendedLayout(new_offsets, history, candidates, source, from_end, row)


def has_next(offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bool ``[N]``: True for each token followed by another of its own sequence (every
    token but each sequence's last).

    Args:
        offsets: int64 ``[B + 1]`` offsets (trusted: not read back).
        num_tokens: ``N``, the number of tokens.

    Examples:
        >>> import torch
        >>> has_next(torch.tensor([0, 2, 2, 5]), 5).tolist()
        [True, False, True, True, False]
    """
    device = offsets.device
    lengths = offsets[1:] - offsets[:-1]
    # An empty sequence has no last token: aim it at a spare slot past the end.
    last = torch.where(lengths > 0, offsets[1:] - 1, num_tokens)
    out = torch.ones(num_tokens + 1, dtype=torch.bool, device=device)
    out[last] = False
    return out[:num_tokens]
