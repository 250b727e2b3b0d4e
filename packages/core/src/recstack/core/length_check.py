"""LengthCheck: row lengths checked against their padded width at the next host sync.

A sync-free constructor cannot raise on a length outside ``[0, L]``: the lengths live on the
device, and reading them is the very wait it avoids. It reduces them to a per-feature
``(min, max)`` on the device instead (no sync), and the jagged type keeps that small tensor.
The first operation that reads the device anyway (``length_per_key()``, ``validate()``,
``compact()``) reads these bounds in the same transfer and raises naming the feature, so a
bad length is reported before any of its rows is looked up, at no extra sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["LengthCheck"]


class LengthCheck:
    """Per-feature ``(min, max)`` length bounds on the device, checked when read.

    Args:
        labels: how each feature is named in an error
            (``"KeyedJaggedTensor.from_padded: feature 'seq'"``).
        widths: each feature's padded width ``L`` (the largest valid length).
        bounds: int64 ``[2 * len(labels)]``: ``min_0, max_0, min_1, max_1, ...``.
    """

    __slots__ = ("bounds", "labels", "widths")

    def __init__(self, labels: Sequence[str], widths: Sequence[int], bounds: torch.Tensor) -> None:
        self.labels = tuple(labels)
        self.widths = tuple(int(w) for w in widths)
        self.bounds = bounds

    @classmethod
    def of(cls, label: str, width: int, lengths: torch.Tensor) -> LengthCheck | None:
        """The bounds of one feature's int64 ``[B]`` lengths; ``None`` when ``B == 0``.

        Args:
            label: how the feature is named in an error.
            width: the padded width ``L``.
            lengths: the lengths as given (not clamped), int64 ``[B]``.
        """
        if lengths.numel() == 0:
            return None
        lo, hi = torch.aminmax(lengths)
        return cls((label,), (width,), torch.stack([lo, hi]))

    @staticmethod
    def merge(checks: Sequence[LengthCheck | None]) -> LengthCheck | None:
        """All the given checks as one (``None`` entries are skipped).

        Args:
            checks: checks whose bounds live on one device.
        """
        live = [c for c in checks if c is not None]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        return LengthCheck(
            [label for c in live for label in c.labels],
            [w for c in live for w in c.widths],
            torch.cat([c.bounds for c in live]),
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LengthCheck:
        """The same check with ``fn`` applied to its bounds (a move to another device).

        Args:
            fn: a function that keeps the tensor's shape and meaning.
        """
        return LengthCheck(self.labels, self.widths, fn(self.bounds))

    def raise_if_bad(self, bounds: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the first feature whose bounds are out of range.

        Args:
            bounds: :attr:`bounds` as Python ints (read by the caller's own host sync).
        """
        for i, (label, width) in enumerate(zip(self.labels, self.widths, strict=True)):
            lo, hi = bounds[2 * i], bounds[2 * i + 1]
            if lo < 0:
                raise ValueError(f"{label}: lengths must be >= 0, got a length of {lo}")
            if hi > width:
                raise ValueError(f"{label}: a length of {hi} exceeds the padded width L={width}")

    def run(self) -> None:
        """Read the bounds (one host sync) and raise if any is out of range."""
        self.raise_if_bad(self.bounds.tolist())
