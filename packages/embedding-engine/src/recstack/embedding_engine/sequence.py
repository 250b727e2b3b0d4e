"""Padded sequence outputs of an :class:`~recstack.embedding_engine.collection.EmbeddingCollection`.

A ``pooling="none"`` feature with ``max_len`` comes out as a ``[B, max_len, dim]`` tensor:
row ``b`` holds the rows of its bag's kept ids first, in bag order, then zeros. A bag longer
than ``max_len`` is cut at the end its feature's ``truncate`` names (the feature engine's
``Truncate`` sides): ``"left"`` (the default) keeps its last ``max_len`` ids, the most recent
behaviours; ``"right"`` its first. ``pooling="tile"`` is that tensor reshaped to
``[B, max_len * dim]``.

With ``FeatureConfig(with_lengths=True)`` the feature's output is a :class:`PaddedSequence`
``(values, lengths)``: the padded tensor and how many ids each row holds, read from the
batch's offsets on the device (no host sync), with the ``[B, max_len]`` padding mask as
:attr:`PaddedSequence.mask`.

The padding itself is an index computation over the feature's looked-up rows (core's
:meth:`JaggedTensor.to_padded <recstack.core.JaggedTensor.to_padded>`: one gather and one
masked fill of the ``[B, max_len, dim]`` output), the same torch ops whichever backend looked
the rows up; its autograd sends the gradient of the kept positions back to their ids, and
cut ids get zero gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recstack.core import JaggedTensor
from recstack.embedding_engine.config import TruncateSide

__all__ = ["PaddedSequence", "padded_sequence"]


class PaddedSequence(NamedTuple):
    """A padded sequence feature's output: ``values`` and the ``lengths`` of its rows.

    Attributes:
        values: ``[B, max_len, dim]`` rows in the table dtype: row ``b``'s ids first, then
            zero padding.
        lengths: int64 ``[B]``: ids row ``b`` holds, ``min(bag length, max_len)``.

    A named tuple: ``values, lengths = out["hist"]`` unpacks it, and torch's pytree utilities
    see both tensors.

    Examples:
        >>> seq = PaddedSequence(torch.ones(2, 3, 4), torch.tensor([1, 3]))
        >>> seq.mask.tolist()
        [[True, False, False], [True, True, True]]
    """

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_len(self) -> int:
        """The padded length ``L``."""
        return self.values.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[B, max_len]``: True where ``values`` holds an id's row, False on padding."""
        positions = torch.arange(self.max_len, device=self.lengths.device)
        return positions < self.lengths.unsqueeze(1)


def padded_sequence(
    rows: JaggedTensor, max_len: int, truncate: TruncateSide, *, with_lengths: bool = False
) -> torch.Tensor | PaddedSequence:
    """A feature's jagged rows padded to ``[B, max_len, dim]`` (with ``with_lengths``, as a
    :class:`PaddedSequence` with each row's id count).

    Row ``b``'s kept ids come first (its last ``max_len`` for ``truncate="left"``, its
    first for ``"right"``), then zeros. Nothing syncs.

    Args:
        rows: the feature's ``[n_ids, dim]`` rows with the batch's offsets.
        max_len: the padded length.
        truncate: which end of a longer bag is cut.
        with_lengths: return a :class:`PaddedSequence` with each row's id count.

    Examples:
        >>> rows = JaggedTensor(torch.arange(5.0).unsqueeze(1), torch.tensor([0, 4, 5]))
        >>> padded_sequence(rows, 2, "left").squeeze(2).tolist()  # bags [0..3] and [4]
        [[2.0, 3.0], [4.0, 0.0]]
        >>> padded_sequence(rows, 2, "right", with_lengths=True).lengths.tolist()
        [2, 1]
    """
    values = rows.to_padded(max_len, truncate=truncate)
    if not with_lengths:
        return values
    return PaddedSequence(values, rows.lengths().clamp(max=max_len))
