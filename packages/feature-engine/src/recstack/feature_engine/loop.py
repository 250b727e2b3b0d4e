"""The same feature graph, one feature and one op at a time in plain PyTorch.

This is what a user would write without the engine, and what the engine is checked
against: :func:`run_per_feature` returns every feature's output by name. It launches a
few ops per op per feature, which is exactly the cost the engine removes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor, hash64
from recstack.feature_engine import ops
from recstack.feature_engine.feature import Feature
from recstack.feature_engine.kernels.cross import xxh64_pair_reference

__all__ = ["run_per_feature", "umod"]

_U64 = 1 << 64


def umod(h: torch.Tensor, m: int) -> torch.Tensor:
    """The 64-bit pattern of ``h`` read as unsigned, mod ``m`` (what ``Hash(buckets=m)`` does)."""
    r = torch.remainder(h, m)
    return torch.where(h < 0, torch.remainder(r + (_U64 % m), m), r)


def _rows(batch_col: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, offsets) of a sparse value: a JaggedTensor, or one value a row."""
    if isinstance(batch_col, JaggedTensor):
        return batch_col.values, batch_col.offsets
    n = batch_col.shape[0]
    return batch_col, torch.arange(n + 1, device=batch_col.device)


def _lengths(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def _from_lengths(values: torch.Tensor, lengths: torch.Tensor) -> JaggedTensor:
    return JaggedTensor.from_lengths(values, lengths)


def _cross(parts: list[JaggedTensor], seed: int) -> JaggedTensor:
    lens = [p.lengths() for p in parts]
    out_len = lens[0].clone()
    for ln in lens[1:]:
        out_len = out_len * ln
    total = int(out_len.sum())
    device = out_len.device
    row = torch.repeat_interleave(
        torch.arange(out_len.numel(), device=device), out_len, output_size=total
    )
    out_off = torch.zeros(out_len.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(out_len, 0, out=out_off[1:])
    k = torch.arange(total, device=device) - out_off[:-1].index_select(0, row)
    idx = []
    for ln in reversed(lens):  # the last component varies fastest
        lr = ln.index_select(0, row).clamp(min=1)
        idx.append(k % lr)
        k = k // lr
    idx.reverse()
    vals = [
        p.values.index_select(0, p.offsets[:-1].index_select(0, row) + i)
        for p, i in zip(parts, idx, strict=True)
    ]
    h = xxh64_pair_reference(vals[0], vals[1], seed)
    for v in vals[2:]:
        h = xxh64_pair_reference(h, v, seed)
    return _from_lengths(h, out_len)


def _truncate(jt: JaggedTensor, max_len: int, cut_left: bool) -> JaggedTensor:
    lens = jt.lengths()
    kept = lens.clamp(max=max_len)
    padded = jt.to_padded(max_len=max_len, truncate="left" if cut_left else "right")
    mask = torch.arange(max_len, device=lens.device).unsqueeze(0) < kept.unsqueeze(1)
    return _from_lengths(padded[mask], kept)


def run_per_feature(features: Sequence[Feature], batch: Mapping[str, Any]) -> dict[str, Any]:
    """Every feature's output: a JaggedTensor of int64 ids, or a float32 ``[B]`` tensor."""
    cols: dict[str, Any] = {}
    for name, v in batch.items():
        if isinstance(v, KeyedJaggedTensor):
            cols.update(v.to_dict())
        else:
            cols[name] = v
    by_name = {f.name: f for f in features}
    out: dict[str, Any] = {}

    def value_of(name: str, requester: str) -> Any:
        if name in by_name and name != requester:
            if name not in out:
                compute(by_name[name])
            return out[name]
        return cols[name]

    def compute(f: Feature) -> None:
        x = value_of(f.source, f.name)
        for op in f.ops:
            if isinstance(op, ops.Hash):
                if isinstance(x, JaggedTensor) and x.is_nested:
                    x = JaggedTensor(hash64(x.values, op.seed), x.offsets)
                elif isinstance(x, JaggedTensor) and x.values.dtype == torch.uint8:
                    x = hash64(x, op.seed)
                else:
                    v, o = _rows(x)
                    x = JaggedTensor(hash64(v, op.seed), o)
                if op.buckets is not None:
                    v, o = _rows(x)
                    x = JaggedTensor(umod(v, op.buckets), o)
            elif isinstance(op, ops.Mod):
                v, o = _rows(x)
                x = JaggedTensor(torch.remainder(v, op.m), o)
            elif isinstance(op, ops.Bucketize):
                v, o = _rows(x)
                bdtype = torch.float64 if v.dtype.is_floating_point else torch.int64
                b = torch.tensor(op.boundaries, dtype=bdtype, device=v.device)
                x = JaggedTensor(torch.bucketize(v.to(bdtype), b, right=op.right), o)
            elif isinstance(op, ops.MultiHash):
                v, o = _rows(x)
                for k in range(op.k):
                    h = hash64(v, op.seed + k)
                    out[f"{f.name}/{k}"] = JaggedTensor(umod(h, op.buckets) if op.buckets else h, o)
                return
            elif isinstance(op, ops.Cross):
                v, o = _rows(x)
                parts = [JaggedTensor(v, o)] + [value_of(n, f.name) for n in op.others]
                x = _cross(parts, op.seed)
                if op.buckets is not None:
                    x = JaggedTensor(umod(x.values, op.buckets), x.offsets)
            elif isinstance(op, ops.Truncate):
                v, o = _rows(x)
                x = _truncate(JaggedTensor(v, o), op.max_len, op.side == "left")
            elif isinstance(op, ops.Pad):
                v, o = _rows(x)
                padded = JaggedTensor(v, o).to_padded(
                    max_len=op.length, pad_value=op.value, side=op.side, truncate=op.truncate
                )
                x = _from_lengths(
                    padded.reshape(-1), torch.full((padded.shape[0],), op.length, device=v.device)
                )
            elif isinstance(op, ops.FilterIds):
                v, o = _rows(x)
                member = torch.isin(v, torch.tensor(op.ids, dtype=torch.int64, device=v.device))
                keep = member if op.keep else ~member
                row = torch.repeat_interleave(
                    torch.arange(o.numel() - 1, device=v.device), _lengths(o)
                )
                new_len = torch.zeros(o.numel() - 1, dtype=torch.int64, device=v.device)
                new_len.index_add_(0, row, keep.to(torch.int64))
                x = _from_lengths(v[keep], new_len)
            elif isinstance(op, ops.FillMissing):
                if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                    x = x.to(torch.float32)  # dense ops compute in float32
                    x = torch.nan_to_num(
                        x, nan=float(op.value), posinf=float("inf"), neginf=float("-inf")
                    )
                else:
                    v, o = _rows(x)
                    lens = _lengths(o)
                    empty = lens == 0
                    new_len = torch.where(empty, torch.ones_like(lens), lens)
                    new_off = torch.zeros_like(o)
                    torch.cumsum(new_len, 0, out=new_off[1:])
                    n_out = int(new_off[-1])
                    row = torch.repeat_interleave(
                        torch.arange(lens.numel(), device=v.device), new_len
                    )
                    src = o[:-1][row] + torch.arange(n_out, device=v.device) - new_off[:-1][row]
                    src = torch.where(empty[row], torch.zeros_like(src), src)
                    picked = v[src] if v.numel() else torch.zeros_like(src)
                    fill = torch.full_like(picked, int(op.value))
                    x = _from_lengths(torch.where(empty[row], fill, picked), new_len)
            elif isinstance(op, ops.Log1p):
                x = torch.log1p(x.to(torch.float32))
            elif isinstance(op, ops.Clip):
                x = x.to(torch.float32).clamp(
                    min=None if op.min is None else float(op.min),
                    max=None if op.max is None else float(op.max),
                )
            elif isinstance(op, ops.Normalize):
                x = (x.to(torch.float32) - float(op.mean)) / float(op.std)
        if isinstance(x, torch.Tensor) and not x.dtype.is_floating_point:
            v, o = _rows(x)
            x = JaggedTensor(v.to(torch.int64), o)
        elif isinstance(x, torch.Tensor):
            x = x.to(torch.float32)
        out[f.name] = x

    for f in features:
        if f.name not in out:
            compute(f)
    return out
