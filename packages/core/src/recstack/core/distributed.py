"""Process-group helpers and a variable-split all-to-all that works on NCCL and gloo.

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); with none set, the program is one process and every
helper here works without ``torch.distributed``.

Example (runs anywhere: without a process group the exchange is the identity):
    >>> import torch
    >>> from recstack.core.distributed import all_to_all_v
    >>> keys = torch.tensor([7, 3, 9])
    >>> received, recv_splits = all_to_all_v(keys, [3])
    >>> received is keys, recv_splits
    (True, [3])
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "PendingExchange",
    "all_to_all_v",
    "all_to_all_v_list",
    "all_to_all_v_start",
    "destroy_process_group",
    "dist_env",
    "init_process_group",
    "is_initialized",
    "rank",
    "world_size",
]

DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank/world and rank/world within its host."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_world_size < 1:
            raise ValueError(f"local_world_size must be >= 1, got {self.local_world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local_rank must be in [0, {self.local_world_size}), got {self.local_rank}"
            )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not an integer "
            "(torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE to integers)"
        ) from None


def dist_env() -> DistEnv:
    """Read rank and world size from torchrun's environment.

    Unset variables default to a single process ``DistEnv(0, 1, 0, 1)``; a missing
    ``LOCAL_WORLD_SIZE`` defaults to ``WORLD_SIZE`` (one host). A value that is not an
    integer, or out of range, raises ``ValueError`` naming the variable.
    """
    world = _env_int("WORLD_SIZE", 1)
    env_rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    checks = (
        ("WORLD_SIZE", world, world >= 1, ">= 1"),
        ("RANK", env_rank, 0 <= env_rank < world, f"in [0, WORLD_SIZE={world})"),
        ("LOCAL_WORLD_SIZE", local_world, local_world >= 1, ">= 1"),
        (
            "LOCAL_RANK",
            local_rank,
            0 <= local_rank < local_world,
            f"in [0, LOCAL_WORLD_SIZE={local_world})",
        ),
    )
    for name, value, ok, want in checks:
        if not ok:
            raise ValueError(f"environment variable {name}={value} must be {want}")
    return DistEnv(env_rank, world, local_rank, local_world)


def is_initialized() -> bool:
    """True when a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (the default group); 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (the default group); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def _current_env() -> DistEnv:
    env = dist_env()
    return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_world_size)


def init_process_group(
    backend: str | None = None,
    device: torch.device | str | int | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's environment and return this rank's env.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. When the
    backend uses NCCL (or ``device`` names a CUDA device) the current CUDA device is set:
    ``device`` if given, else ``cuda:LOCAL_RANK``. The rendezvous reads ``MASTER_ADDR`` and
    ``MASTER_PORT``; a single process without them gets an in-memory store, so code that
    calls collectives runs unchanged outside torchrun. Calling it again is a no-op that
    returns the existing state.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if is_initialized():
        return _current_env()
    env = dist_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if device is not None:
        device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    uses_nccl = "nccl" in backend.lower()
    if uses_nccl or (device is not None and device.type == "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"backend={backend!r} needs CUDA, but no CUDA device is available")
        if device is not None and device.type != "cuda":
            raise ValueError(f"device={device} is not a CUDA device, but backend={backend!r}")
        index = device.index if device is not None and device.index is not None else env.local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"CUDA device {index} (LOCAL_RANK={env.local_rank}) does not exist: "
                f"this host has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(index)
    has_rendezvous = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if has_rendezvous:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif env.world_size == 1:
        # No rendezvous is needed to talk to oneself; a HashStore avoids picking a port.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} but MASTER_ADDR/MASTER_PORT are not set; "
            "launch with torchrun or set them"
        )
    return _current_env()


def destroy_process_group() -> None:
    """Tear down the default process group; a no-op when none exists."""
    if is_initialized():
        dist.destroy_process_group()


def _check_tensor(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (rows along dim 0)")


def _splits_tensor(send_splits: Sequence[int] | torch.Tensor, world: int) -> torch.Tensor:
    """``send_splits`` as a 1-D int64 tensor of length ``world`` (values checked later)."""
    if isinstance(send_splits, torch.Tensor):
        if send_splits.dim() != 1:
            raise ValueError(f"send_splits must be 1-D, got shape {tuple(send_splits.shape)}")
        dtype = send_splits.dtype
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"send_splits must hold integers, got dtype {dtype}")
        splits = send_splits.to(torch.int64)
    else:
        try:
            values = list(send_splits)
        except TypeError:
            raise TypeError(
                "send_splits must be a list of ints or a 1-D integer tensor, "
                f"got {type(send_splits).__name__}"
            ) from None
        for v in values:
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise TypeError(f"send_splits must hold ints, got {type(v).__name__} ({v!r})")
        splits = torch.tensor([operator.index(v) for v in values], dtype=torch.int64)
    if splits.numel() != world:
        raise ValueError(
            f"send_splits has {splits.numel()} entries but the group has world_size={world}"
        )
    return splits


def _check_split_values(send: list[int], rows: int, names: str) -> None:
    if any(s < 0 for s in send):
        raise ValueError(f"send_splits must be >= 0, got {send}")
    if sum(send) != rows:
        raise ValueError(f"send_splits sum to {sum(send)} but {names} has {rows} rows along dim 0")


def _row_numel(tensor: torch.Tensor) -> int:
    n = 1
    for s in tensor.shape[1:]:
        n *= s
    return n


def _as_rows_of_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Backends disagree on dtypes (gloo rejects int16/uint16+/float8 in torch 2.15 and bf16
    # in some releases); an all-to-all only moves bytes, so every dtype travels as uint8 rows.
    return tensor.reshape(tensor.shape[0], _row_numel(tensor)).view(torch.uint8)


def _exchange_splits(
    splits: torch.Tensor, device: torch.device, group: dist.ProcessGroup | None
) -> tuple[list[int], list[int]]:
    send = splits.to(device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # One host sync reads both the send and the receive sizes.
    both = torch.cat([send, recv]).tolist()
    world = send.numel()
    return both[:world], both[world:]


class PendingExchange:
    """An all-to-all whose rows are still travelling: :meth:`wait` gives the received
    tensors (in input order) and the receive splits.

    From :func:`all_to_all_v_start`. The split sizes were exchanged when it was started;
    the rows move in the background (gloo's threads, or NCCL's stream) until :meth:`wait`,
    which on CUDA makes the current stream wait for them rather than blocking the host.
    """

    def __init__(
        self,
        outputs: list[torch.Tensor],
        recv: list[int],
        works: list[Any] | None = None,
        in_flight: list[torch.Tensor] | None = None,
    ) -> None:
        self._outputs, self._recv = outputs, recv
        self._works, self._in_flight = works or [], in_flight or []
        self._done = not self._works

    @property
    def recv_splits(self) -> list[int]:
        """Rows received from each rank (known since the start)."""
        return list(self._recv)

    def wait(self) -> tuple[list[torch.Tensor], list[int]]:
        """The received tensors and the receive splits (once the rows have arrived; a
        second call returns them again)."""
        if not self._done:
            for work in self._works:
                work.wait()
            self._works, self._in_flight, self._done = [], [], True
        return self._outputs, list(self._recv)


def _exchange_data(
    tensors: Sequence[torch.Tensor],
    send: list[int],
    recv: list[int],
    group: dist.ProcessGroup | None,
) -> PendingExchange:
    total = sum(recv)
    outputs, works, in_flight = [], [], []
    for tensor in tensors:
        out = torch.empty((total, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        outputs.append(out)
        if _row_numel(tensor) == 0:
            continue  # rows without bytes: nothing to move (same trailing shape on every rank)
        send_bytes = _as_rows_of_bytes(tensor.contiguous())
        in_flight.append(send_bytes)  # a contiguous copy must outlive the async transfer
        work = dist.all_to_all_single(
            _as_rows_of_bytes(out),
            send_bytes,
            output_split_sizes=recv,
            input_split_sizes=send,
            group=group,
            async_op=True,
        )
        works.append(work)
    return PendingExchange(outputs, recv, works, in_flight)


def _check_group(group: dist.ProcessGroup | None, device: torch.device) -> int:
    """World size of ``group``, after checking the data can travel on its backend."""
    if not is_initialized():
        if group is not None:
            raise RuntimeError(
                "a process group was passed but torch.distributed is not initialised"
            )
        return 1
    world = dist.get_world_size(group)
    if world > 1 and dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"the group's backend is NCCL, which needs CUDA tensors; got {device}")
    return world


def all_to_all_v_list(
    tensors: Sequence[torch.Tensor],
    send_splits: Sequence[int] | torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Exchange several tensors that share one row split, sending the split sizes once.

    Every tensor has the same number of rows (dim 0), split the same way (e.g. keys and
    their weights), and lives on the same device. Returns the received tensors, in input
    order, and ``recv_splits``. See :func:`all_to_all_v` for the semantics.
    """
    return all_to_all_v_start(tensors, send_splits, group).wait()


def all_to_all_v_start(
    tensors: Sequence[torch.Tensor],
    send_splits: Sequence[int] | torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> PendingExchange:
    """:func:`all_to_all_v_list` in two halves: exchange the split sizes now (one host
    sync) and start moving the rows; :meth:`PendingExchange.wait` finishes it. Work queued
    in between overlaps the transfer (a training step's id exchange for the next batch
    overlaps this batch's compute this way). Every rank must start and wait in the same
    order, as for any collective.

    Examples:
        >>> pending = all_to_all_v_start([torch.arange(3)], [3])  # one process
        >>> [t.tolist() for t in pending.wait()[0]], pending.recv_splits
        ([[0, 1, 2]], [3])
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must contain at least one tensor")
    for i, t in enumerate(tensors):
        _check_tensor(t, f"tensors[{i}]")
    rows, device = tensors[0].shape[0], tensors[0].device
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape[0] != rows:
            raise ValueError(
                f"tensors[{i}] has {t.shape[0]} rows but tensors[0] has {rows}; "
                "all tensors share one split"
            )
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {device}")
    world = _check_group(group, device)
    splits = _splits_tensor(send_splits, world)
    names = "the input tensor" if len(tensors) == 1 else "each input tensor"
    if world == 1 or splits.device.type == "cpu":
        # Host-side splits are checked before any collective, so a bad call fails here
        # instead of leaving peers waiting; device splits are read after the exchange to
        # pay a single host sync.
        _check_split_values(splits.tolist(), rows, names)
    if world == 1:
        return PendingExchange(tensors, splits.tolist())
    send, recv = _exchange_splits(splits, device, group)
    _check_split_values(send, rows, names)
    if any(r < 0 for r in recv):
        raise RuntimeError(f"received negative split sizes {recv} from peers")
    return _exchange_data(tensors, send, recv, group)


def all_to_all_v(
    tensor: torch.Tensor,
    send_splits: Sequence[int] | torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Variable-split all-to-all along dim 0.

    Rank ``r`` sends rows ``[sum(send_splits[:d]), sum(send_splits[:d + 1]))`` of ``tensor``
    to rank ``d``; the result holds what every rank sent to ``r``, ordered by source rank,
    and ``recv_splits[s]`` is the number of rows that came from rank ``s``. ``tensor`` may
    have trailing dims and any dtype (dtype and trailing shape must match on every rank);
    it must live on the group's device (CUDA for NCCL, CPU for gloo). ``send_splits`` is a
    list of ints or a 1-D integer tensor of length ``world_size`` summing to
    ``tensor.shape[0]``. The split sizes are exchanged first, then the rows.

    With one process (world size 1, or no process group) ``tensor`` itself and the splits
    come back unchanged. Not differentiable: wrap it in an autograd Function to train
    through it.
    """
    _check_tensor(tensor, "tensor")
    outputs, recv = all_to_all_v_list([tensor], send_splits, group)
    return outputs[0], recv
