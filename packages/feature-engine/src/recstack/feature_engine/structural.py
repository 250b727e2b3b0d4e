"""Ops that change how many ids a row holds, fused over every feature of a level.

The level buffer holds ``F`` features over ``B`` rows key-major: ``lens[f*B + b]`` ids of
feature ``f`` in row ``b``, packed in ``vals``. Each op takes per-feature parameters (with
an identity setting for features it does not touch) and rewrites the whole buffer with a
fixed number of vectorized torch ops, whatever ``F`` is: one host sync for the output size.
The same code runs on CPU and CUDA.
"""

from __future__ import annotations

import torch

__all__ = ["fill_rows", "filter_ids", "reshape_rows"]


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens, 0, out=out[1:])
    return out


def _per_row(per_feature: torch.Tensor, batch: int) -> torch.Tensor:
    return per_feature.repeat_interleave(batch)


def reshape_rows(
    vals: torch.Tensor,
    lens: torch.Tensor,
    batch: int,
    keep: torch.Tensor,
    keep_last: torch.Tensor,
    pad_to: torch.Tensor,
    pad_value: torch.Tensor,
    pad_left: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate and/or pad every row; all parameters are per feature (``[F]``).

    ``keep``: most ids a row keeps (``-1``: all), cutting the start when ``keep_last``.
    ``pad_to``: exact row length after padding (``-1``: no padding) with ``pad_value``,
    padding at the start when ``pad_left``. Returns the new ``(vals, lens)``.
    """
    rows = lens.numel()
    keep_r = _per_row(keep, batch)
    kept = torch.where(keep_r < 0, lens, torch.minimum(lens, keep_r.clamp(min=0)))
    pad_r = _per_row(pad_to, batch)
    new_lens = torch.where(pad_r < 0, kept, pad_r)
    out_off = _offsets(new_lens)
    total = int(out_off[-1])
    row = torch.repeat_interleave(
        torch.arange(rows, device=lens.device), new_lens, output_size=total
    )
    j = torch.arange(total, device=lens.device) - out_off[:-1].index_select(0, row)
    kept_e = kept.index_select(0, row)
    lead = torch.where(
        _per_row(pad_left, batch).index_select(0, row).bool(),
        new_lens.index_select(0, row) - kept_e,
        torch.zeros_like(j),
    )
    k = j - lead  # position among the kept ids, or outside [0, kept) for padding
    is_item = (k >= 0) & (k < kept_e)
    skip = torch.where(
        _per_row(keep_last, batch).index_select(0, row).bool(),
        lens.index_select(0, row) - kept_e,
        torch.zeros_like(j),
    )
    src = _offsets(lens)[:-1].index_select(0, row) + skip + k
    src = torch.where(is_item, src, torch.zeros_like(src))
    picked = vals.index_select(0, src) if vals.numel() else torch.zeros_like(src)
    fill = _per_row(pad_value, batch).index_select(0, row)
    return torch.where(is_item, picked, fill), new_lens


def fill_rows(
    vals: torch.Tensor, lens: torch.Tensor, batch: int, apply: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty rows of the features with ``apply`` (``[F]`` bool) become ``[value]``."""
    empty = (lens == 0) & _per_row(apply, batch)
    new_lens = torch.where(empty, torch.ones_like(lens), lens)
    out_off = _offsets(new_lens)
    total = int(out_off[-1])
    row = torch.repeat_interleave(
        torch.arange(lens.numel(), device=lens.device), new_lens, output_size=total
    )
    j = torch.arange(total, device=lens.device) - out_off[:-1].index_select(0, row)
    src = _offsets(lens)[:-1].index_select(0, row) + j
    filled = empty.index_select(0, row)
    src = torch.where(filled, torch.zeros_like(src), src)
    picked = vals.index_select(0, src) if vals.numel() else torch.zeros_like(src)
    fill = _per_row(value, batch).index_select(0, row)
    return torch.where(filled, fill, picked), new_lens


def filter_ids(
    vals: torch.Tensor,
    lens: torch.Tensor,
    batch: int,
    set_ids: torch.Tensor,
    set_feature: torch.Tensor,
    mode: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop (``mode`` 1) or keep only (``mode`` 2) the ids listed for each feature.

    ``set_ids``/``set_feature`` list the (id, feature) pairs of every feature's id set;
    ``mode`` is per feature (0: untouched). Membership is exact: ids are ranked among the
    distinct listed ids, then the (rank, feature) pair is looked up; nothing is hashed.
    """
    num_features = mode.numel()
    device = vals.device
    row_feature = torch.arange(num_features, device=device).repeat_interleave(batch)
    feature = row_feature.repeat_interleave(lens, output_size=vals.numel())
    if set_ids.numel():
        distinct = torch.unique(set_ids)  # sorted
        pair_keys = torch.sort(
            torch.searchsorted(distinct, set_ids) * num_features + set_feature
        ).values
        pos = torch.searchsorted(distinct, vals).clamp(max=distinct.numel() - 1)
        listed = distinct.index_select(0, pos) == vals
        key = pos * num_features + feature
        at = torch.searchsorted(pair_keys, key).clamp(max=pair_keys.numel() - 1)
        member = listed & (pair_keys.index_select(0, at) == key)
    else:
        member = torch.zeros_like(vals, dtype=torch.bool)
    m = mode.index_select(0, feature)
    keep = (m == 0) | ((m == 1) & ~member) | ((m == 2) & member)
    # Kept ids per row: a segment sum of the keep mask over each row's span.
    csum = torch.zeros(vals.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(keep.to(torch.int64), 0, out=csum[1:])
    off = _offsets(lens)
    new_lens = csum.index_select(0, off[1:]) - csum.index_select(0, off[:-1])
    return vals[keep], new_lens
