"""Ranks of a data-parallel run agree, step by step, whether to go on.

Under ``torchrun`` every rank must run the same number of optimizer steps: each backward
pass all-reduces the dense gradients, and a rank that takes one more step than the others
waits in that all-reduce until the collective timeout (by default half an hour) while
the rest have finished. That happens whenever the ranks' shares of the data differ by a
batch, or one rank alone is told to stop (a signal, a callback). :class:`RankAgreement`
lets the :class:`~recstack.pipelines.trainer.Trainer` ask, before each step, whether every
rank has the same number of batches for it and whether any rank wants to stop, with one
small
all-reduce over a gloo group on the host: it never synchronizes the GPU, and costs tens of
microseconds on one machine.

A rank that died or stopped answering surfaces here as :class:`RankLostError`, which names
the rank and step, within ``timeout`` seconds (at once when its process is gone), rather
than as a collective that waits for the timeout of the training backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["RankAgreement", "RankLostError", "StepAgreement"]


class RankLostError(RuntimeError):
    """Another rank of the run died or stopped answering."""


@dataclass(frozen=True)
class StepAgreement:
    """What the ranks agreed before a step.

    Attributes:
        fewest: the fewest batches any rank has for the step.
        most: the most batches any rank has for the step.
        any_stop: some rank wants to stop (a signal or a callback).
    """

    fewest: int
    most: int
    any_stop: bool


class RankAgreement:
    """Per-step agreement of the ranks of the initialized default process group.

    Create it on every rank at the same point (it makes a process group collectively).

    Args:
        timeout: seconds a rank waits for the others before :class:`RankLostError`.

    Raises:
        RuntimeError: no initialized process group.

    """

    def __init__(self, timeout: float = 1800.0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("RankAgreement: needs an initialized torch.distributed group")
        if not timeout > 0:
            raise ValueError(f"RankAgreement: timeout must be > 0 seconds, got {timeout}")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout = float(timeout)
        # A host-side group of its own: the flags never touch the GPU (no stream sync), and
        # its timeout is ours, not the training backend's.
        self.group: dist.ProcessGroup | None = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=self.timeout)
        )

    def agree(self, *, batches: int, stop: bool, step: int) -> StepAgreement:
        """Exchange this rank's batch count and stop wish with every rank's.

        Args:
            batches: the batches this rank has for the step.
            stop: this rank wants to stop.
            step: the step about to run (for the error message).

        Raises:
            RankLostError: another rank died or did not answer within ``timeout``.
        """
        # One MAX all-reduce carries a minimum too, negated.
        flags = torch.tensor([-int(batches), int(batches), int(stop)], dtype=torch.int64)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as exc:  # gloo's connection errors and timeouts
            raise self._lost(f"before step {step}", exc) from exc
        fewest, most, any_stop = flags.tolist()
        return StepAgreement(fewest=-fewest, most=most, any_stop=bool(any_stop))

    def close(self) -> None:
        """Wait for every rank, then release the group: no rank's process may exit while
        another still talks to it over this group (a gloo peer then aborts). Call it on every
        rank, after the last :meth:`agree`."""
        if self.group is None:
            return
        try:
            dist.barrier(group=self.group)
        except RuntimeError as exc:
            raise self._lost("at the end of training", exc) from exc
        dist.destroy_process_group(self.group)
        self.group = None

    def _lost(self, when: str, exc: RuntimeError) -> RankLostError:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return RankLostError(
            f"Trainer rank {self.rank} of {self.world_size}: lost contact with the other ranks "
            f"{when} (a rank died, or did not answer within {self.timeout:g} s): {first}"
        )
