"""The trainer's view of a data source: batches on the training device, and a position
that a checkpoint can restore exactly."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from recstack.columnio import DevicePrefetcher, batch_to

__all__ = ["BatchStream"]

_FORMAT = "recstack.pipelines.BatchStream"


class BatchStream:
    """Iterate ``source`` with its batches on ``device``; count the batches of the epoch.

    Each ``iter()`` runs the rest of one epoch. The position is the source's own
    ``state_dict()`` when it has one (a ``ColumnReader``: exact, also inside a shuffle
    window), otherwise the number of batches already taken from the epoch, skipped again
    after a restore (exact for sources that repeat the same batches each time they are
    iterated).

    Args:
        source: an iterable of batch dicts (a ``ColumnReader``, a list, a generator
            function's iterable...); items that are not dicts (end-of-window markers)
            are passed over.
        device: where batches go. On CUDA a :class:`DevicePrefetcher` copies ahead of the
            training step unless the source delivers on the device already.
        prefetch: batches copied ahead on CUDA.
        markers: also yield the items that are not batches (a ``StreamingReader``'s
            ``EndOfWindow``), in their place; by default they are passed over.
    """

    def __init__(
        self,
        source: Iterable[Any],
        device: torch.device,
        prefetch: int = 2,
        *,
        markers: bool = False,
    ) -> None:
        self.markers = markers
        if not isinstance(source, Iterable):
            raise TypeError(f"training data must be iterable, got {type(source).__name__}")
        self.source = source
        self.device = device
        self._stateful = callable(getattr(source, "state_dict", None)) and callable(
            getattr(source, "load_state_dict", None)
        )
        delivered = getattr(source, "device", None)
        if device.type == "cuda" and not (
            isinstance(delivered, torch.device) and delivered.type == "cuda"
        ):
            self._iterable: Iterable[Any] = DevicePrefetcher(source, device, prefetch=prefetch)
        else:
            self._iterable = source
        self.batches = 0
        self._skip = 0
        self._resumed = False

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        if not self._resumed:
            self.batches = 0
        self._resumed = False
        for item in self._iterable:
            if not isinstance(item, Mapping):
                if self.markers and not skip:
                    yield item
                continue
            if skip:
                skip -= 1
                continue
            self.batches += 1
            if self._iterable is self.source and self.device.type != "cuda":
                item = batch_to(item, self.device)
            yield dict(item)

    def state_dict(self) -> dict[str, Any]:
        """The position: batches taken this epoch and, when it has one, the source's state."""
        state: dict[str, Any] = {"format": _FORMAT, "batches": self.batches}
        if self._stateful:
            state["source"] = self._iterable.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position at the next ``iter()``."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a BatchStream state (format {state.get('format')!r})")
        self.batches = int(state["batches"])
        self._resumed = True
        if self._stateful:
            if "source" not in state:
                raise ValueError("the saved position has no data-source state to restore")
            self._iterable.load_state_dict(state["source"])  # type: ignore[attr-defined]
            self._skip = 0
        else:
            self._skip = self.batches
