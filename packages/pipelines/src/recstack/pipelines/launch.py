"""Runs launched by ``torchrun``: the process group and each rank's GPU.

``torchrun --nproc-per-node N $(which recstack) train run.yaml`` starts ``N`` processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment, on one machine or,
with ``--nnodes`` and a rendezvous endpoint, on many. :func:`distributed_run` turns that
environment into an initialized process group for the run (core's
``recstack.core.distributed.init_process_group``: NCCL when the run is on CUDA, each rank
on GPU ``LOCAL_RANK``; gloo on CPU) and tears it down at the end; the Trainer then trains
the dense parameters data parallel and the models shard their tables across the ranks.

Examples:
    >>> from recstack.pipelines.launch import distributed_run
    >>> with distributed_run("cpu"):  # not under torchrun here: nothing to set up
    ...     pass
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from recstack.core import distributed as rdist

__all__ = ["distributed_run", "one_writer", "rank_device"]

T = TypeVar("T")


def rank_device(device: torch.device | str) -> torch.device:
    """``device`` for this rank: a CUDA device without an index becomes ``cuda:LOCAL_RANK``
    under ``torchrun`` (more than one process); anything else is returned as it is.

    Args:
        device: the run's device.
    """
    device = torch.device(device)
    env = rdist.dist_env()
    if device.type == "cuda" and device.index is None and env.world_size > 1:
        return torch.device("cuda", env.local_rank)
    return device


@contextlib.contextmanager
def distributed_run(device: torch.device | str) -> Iterator[None]:
    """Under ``torchrun`` (more than one process), initialize the default process group
    for the run on ``device`` and destroy it when the block ends; otherwise, or when a
    group is initialized already, do nothing.

    Args:
        device: the run's device (:func:`rank_device`): NCCL for CUDA, with this rank's
            GPU made current; gloo for CPU.

    Raises:
        ValueError: a broken ``torchrun`` environment (the variable named).
    """
    if rdist.dist_env().world_size == 1 or rdist.is_initialized():
        yield
        return
    device = rank_device(device)
    cuda = device.type == "cuda"
    rdist.init_process_group("nccl" if cuda else "gloo", device if cuda else None)
    try:
        yield
    finally:
        rdist.destroy_process_group()


def one_writer(prepare: Callable[[], T]) -> T:
    """``prepare()`` (which writes files unless they are there, then returns what it
    found) run by one rank before the others, so ranks never write the same files at
    once: rank 0 first, then the first rank of each other machine (its files may be on a
    disk of its own), then every rank, which finds them written. Without an initialized
    process group of several ranks, just ``prepare()``.

    Args:
        prepare: idempotent: a second call finds the files and writes nothing.
    """
    if rdist.world_size() == 1:
        return prepare()
    rank = dist.get_rank()
    if rank == 0:
        prepare()
    dist.barrier()
    if rdist.dist_env().local_rank == 0 and rank != 0:
        prepare()
    dist.barrier()
    return prepare()
