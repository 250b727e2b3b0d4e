"""The sparse optimizers' check gates, one per device, and their deferred reads.

A step's checks (every gradient row inside its parameter, every value finite) set flags
in a *gate*: an int32 ``[out_of_range, nonfinite]`` device tensor (core's ``new_gate``)
that the update launches read, writing nothing when it is set. Reading a gate on the
host waits for the GPU to finish the step. A deferred read instead copies the gate into
pinned host memory behind the update and records an event; the copy is read later, when
the host has queued more work, so the GPU never drains between steps.

:class:`GateBook` keeps the gates, the deferred reads in the order they were queued, and
the pinned buffers and events of reads already done (allocating them per step costs more
host time than a step's launches).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from recstack.core.kernels.row_update import new_gate

__all__ = ["Deferred", "GateBook", "Reading"]


class Deferred(NamedTuple):
    """A gate copy not read yet: whose checks (``params``), where, and when it is done."""

    device: torch.device
    params: list[Any]
    host: torch.Tensor
    event: Any  # torch.cuda.Event; None where the copy was done on the spot (CPU)


class Reading(NamedTuple):
    """A deferred gate, read: whose checks, and the flags they set."""

    device: torch.device
    params: list[Any]
    out_of_range: bool
    nonfinite: bool


class GateBook:
    """Per-device gates and the queue of deferred gate reads, oldest first."""

    def __init__(self) -> None:
        self._gates: dict[torch.device, torch.Tensor] = {}
        self._clean: set[torch.device] = set()  # gates known to hold zeros now
        self._spare: dict[torch.device, list[tuple[torch.Tensor, Any]]] = {}
        self.queue: list[Deferred] = []

    def take(self, device: torch.device, *, skip: bool) -> torch.Tensor:
        """The device's gate, ready for a step's checks.

        With a deferred read of it pending, its flags carry over: a step queued after a bad
        one writes nothing either (the bad one's read raises for both). With ``skip`` (the
        optimizer skips non-finite steps) a carried non-finite flag is cleared first, so a
        skipped step does not hold the next one back. Otherwise the gate is cleared, by a
        launch only when the last read did not find it clear. Stream order puts the
        clearing after any earlier read or copy of the gate.
        """
        gate = self._gates.get(device)
        if gate is None:
            gate = self._gates[device] = new_gate(device)
        elif self.pending_on(device):
            if skip:
                gate[1] = 0
        elif device not in self._clean:
            gate.zero_()
        self._clean.discard(device)
        return gate

    def read(self, gate: torch.Tensor) -> tuple[bool, bool]:
        """``(out_of_range, nonfinite)`` of ``gate`` now (waits for the GPU)."""
        out_of_range, nonfinite = gate.tolist()
        if not (out_of_range or nonfinite):
            self._clean.add(gate.device)
        return bool(out_of_range), bool(nonfinite)

    def mark_clean(self, devices: set[torch.device] | list[torch.device]) -> None:
        """These devices' gates were read clear (by the caller) and not touched since."""
        self._clean.update(devices)

    def pending_on(self, device: torch.device) -> bool:
        """Whether a deferred read of ``device``'s gate is queued."""
        return any(entry.device == device for entry in self.queue)

    def defer(self, params: list[Any], gate: torch.Tensor) -> None:
        """Queue a read of ``gate`` (the checks of ``params``), copied behind the work
        queued so far on its device's current stream."""
        device = gate.device
        if device.type != "cuda":
            self.queue.append(Deferred(device, params, gate.clone(), None))
            return
        spare = self._spare.get(device)
        if spare:
            host, event = spare.pop()
        else:
            host = torch.empty(2, dtype=torch.int32, pin_memory=True)
            event = torch.cuda.Event()
        host.copy_(gate, non_blocking=True)
        event.record(torch.cuda.current_stream(device))
        self.queue.append(Deferred(device, params, host, event))

    def pop(self) -> Reading:
        """Read the oldest queued gate copy (waiting for its step only, not later work)."""
        entry = self.queue.pop(0)
        if entry.event is not None:
            entry.event.synchronize()
        out_of_range, nonfinite = entry.host.tolist()
        self._recycle(entry)
        if not (out_of_range or nonfinite) and not self.pending_on(entry.device):
            self._clean.add(entry.device)
        return Reading(entry.device, entry.params, bool(out_of_range), bool(nonfinite))

    def drop(self, device: torch.device) -> list[list[Any]]:
        """Drop the queued reads of ``device`` unread (their steps inherited a bad step's
        flags and wrote nothing); returns each one's ``params``."""
        dropped = [e for e in self.queue if e.device == device]
        self.queue = [e for e in self.queue if e.device != device]
        for entry in dropped:
            self._recycle(entry)
        return [entry.params for entry in dropped]

    def _recycle(self, entry: Deferred) -> None:
        if entry.event is not None:
            self._spare.setdefault(entry.device, []).append((entry.host, entry.event))
