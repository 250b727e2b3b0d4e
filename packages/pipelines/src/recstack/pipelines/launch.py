"""Runs launched by ``torchrun``: the process group and each rank's GPU.

``torchrun --nproc-per-node N -m recstack.pipelines.cli train run.yaml`` (or the
``recstack`` script) starts ``N`` processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment, on one machine or, with ``--nnodes`` and a
rendezvous endpoint, on many. :func:`distributed_run` turns that environment into an
initialized process group for the run (NCCL when the run is on CUDA, each rank on GPU
``LOCAL_RANK``; gloo on CPU) and tears it down at the end; the Trainer then trains the
dense parameters data parallel and the models shard their tables across the ranks.

Examples:
    >>> from recstack.pipelines.launch import distributed_run, torchrun_ranks
    >>> torchrun_ranks({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    TorchrunRanks(rank=1, world_size=4, local_rank=1)
    >>> with distributed_run("cpu", env={}) as ranks:  # not under torchrun: nothing to do
    ...     ranks is None
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["TorchrunRanks", "distributed_run", "one_writer", "rank_device", "torchrun_ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class TorchrunRanks:
    """Where this process sits in a ``torchrun`` job.

    Attributes:
        rank: this process's global rank.
        world_size: the number of processes of the job.
        local_rank: this process's index on its machine (its GPU).
    """

    rank: int
    world_size: int
    local_rank: int


def _env_int(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"torchrun environment: {key}={raw!r} is not an integer (is this a torchrun run?)"
        ) from None


def torchrun_ranks(env: Mapping[str, str] | None = None) -> TorchrunRanks | None:
    """This process's ranks from ``torchrun``'s environment, or ``None`` when it was not
    launched by ``torchrun`` with more than one process.

    Args:
        env: the environment (default ``os.environ``).

    Raises:
        ValueError: ``WORLD_SIZE`` is set but a rank variable is missing or not an integer.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    world = _env_int(env, "WORLD_SIZE")
    if world <= 1:
        return None
    rank = _env_int(env, "RANK")
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is outside WORLD_SIZE={world}")
    return TorchrunRanks(rank, world, local)


def rank_device(device: torch.device | str, env: Mapping[str, str] | None = None) -> torch.device:
    """``device`` for this rank: a CUDA device without an index becomes ``cuda:LOCAL_RANK``
    under ``torchrun``; anything else is returned as it is.

    Args:
        device: the run's device.
        env: the environment (default ``os.environ``).
    """
    device = torch.device(device)
    ranks = torchrun_ranks(env)
    if device.type == "cuda" and device.index is None and ranks is not None:
        return torch.device("cuda", ranks.local_rank)
    return device


@contextlib.contextmanager
def distributed_run(
    device: torch.device | str, *, env: Mapping[str, str] | None = None
) -> Iterator[TorchrunRanks | None]:
    """Under ``torchrun`` (more than one process), initialize the default process group
    for the run on ``device`` and destroy it when the block ends; otherwise, or when a
    group is initialized already, do nothing and yield ``None``.

    Args:
        device: the run's device (:func:`rank_device`): NCCL for CUDA, with this rank's
            GPU made current; gloo for CPU.
        env: the environment (default ``os.environ``).

    Raises:
        ValueError: a broken ``torchrun`` environment.
    """
    ranks = torchrun_ranks(env)
    if ranks is None or (dist.is_available() and dist.is_initialized()):
        yield None
        return
    device = rank_device(device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def one_writer(prepare: Callable[[], T]) -> T:
    """``prepare()`` (which writes files unless they are there, then returns what it
    found) run by one rank before the others, so ranks never write the same files at
    once: rank 0 first, then the first rank of each other machine (its files may be on a
    disk of its own), then every rank, which finds them written. Without an initialized
    process group of several ranks, just ``prepare()``.

    Args:
        prepare: idempotent: a second call finds the files and writes nothing.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare()
    ranks = torchrun_ranks()
    rank = dist.get_rank()
    local = ranks.local_rank if ranks is not None else rank
    if rank == 0:
        prepare()
    dist.barrier()
    if local == 0 and rank != 0:
        prepare()
    dist.barrier()
    return prepare()
