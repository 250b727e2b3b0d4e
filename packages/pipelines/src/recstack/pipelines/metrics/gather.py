"""Gathers every rank's evaluation rows so each rank computes the global metrics.

Exact AUC has no small sufficient statistic, so the rows themselves travel: first one
small all-gather of each rank's row count, dtypes and value-problem counts, then one
all-gather of all rows packed as bytes (prediction, label, group, weight), padded to the
longest rank. Moving bytes sidesteps backend dtype gaps (gloo lacks some dtypes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recstack.pipelines.metrics.batch_checks import NUM_PROBLEMS
from recstack.pipelines.metrics.compute import EvalSet

__all__ = ["gather_eval_set", "gather_world"]

# Columns of the per-rank header: rows, predictions are float64, has weights, problems...
_ROWS, _PRED_F64, _HAS_WEIGHTS = range(3)
_HEADER = 3 + NUM_PROBLEMS


def gather_world(group: dist.ProcessGroup | None) -> int:
    """How many ranks :func:`gather_eval_set` would gather from (1 without a process group).

    Args:
        group: the process group, or ``None`` for the default one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _transport_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(
                f"metrics: the process group's backend is NCCL, which needs CUDA tensors, "
                f"but the metric inputs are on {device}"
            )
        return device
    # gloo (and the rest) move host memory; CUDA rows are copied over and back.
    return torch.device("cpu") if backend == "gloo" else device


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _from_bytes(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rows.contiguous().view(dtype).reshape(-1)


def gather_eval_set(
    data: EvalSet, problems: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[EvalSet, list[int]]:
    """Every rank's rows, concatenated in rank order, and the value-problem counts summed
    over ranks (so every rank raises the same error and none waits in a collective).

    Args:
        data: this rank's rows.
        problems: this rank's value-problem counts.
        group: the process group, or ``None`` for the default one.
    """
    device = data.preds.device
    comm = _transport_device(group, device)
    world = dist.get_world_size(group)
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[_ROWS] = data.preds.numel()
    header[_PRED_F64] = int(data.preds.dtype == torch.float64)
    header[_HAS_WEIGHTS] = int(data.weights is not None)
    header = header.to(comm)
    header[3:] = problems.to(comm)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    table = torch.stack(headers).tolist()
    problem_sums = [sum(row[3 + i] for row in table) for i in range(NUM_PROBLEMS)]
    rows = [row[_ROWS] for row in table]
    pred_dtype = torch.float64 if any(row[_PRED_F64] for row in table) else torch.float32
    has_weights = any(row[_HAS_WEIGHTS] for row in table)
    has_groups = data.groups is not None
    if any(problem_sums):
        return data, problem_sums  # the caller raises on every rank alike

    n = data.preds.numel()
    columns = [data.preds.to(pred_dtype), data.labels]
    if has_groups:
        columns.append(data.groups)
    if has_weights:
        w = data.weights
        columns.append(w if w is not None else torch.ones(n, dtype=torch.float64, device=device))
    widths = [torch.empty((), dtype=c.dtype).element_size() for c in columns]
    longest = max(rows)
    packed = torch.zeros((longest, sum(widths)), dtype=torch.uint8, device=comm)
    if n:
        packed[:n] = torch.cat([_as_bytes(c.reshape(n, 1)) for c in columns], dim=1).to(comm)
    received = [torch.empty_like(packed) for _ in range(world)]
    if longest:
        dist.all_gather(received, packed, group=group)
    del packed
    everything = torch.cat([r[:m] for r, m in zip(received, rows, strict=True)]).to(device)
    del received
    out: list[torch.Tensor] = []
    start = 0
    for column, width in zip(columns, widths, strict=True):
        out.append(_from_bytes(everything[:, start : start + width], column.dtype))
        start += width
    preds, labels, rest = out[0], out[1], out[2:]
    groups = rest.pop(0) if has_groups else None
    weights = rest.pop(0) if has_weights else None
    return EvalSet(preds, labels, groups, weights), problem_sums
