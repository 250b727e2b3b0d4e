"""Exact AUC and GAUC sums by sorting on the data's device, with no host sync.

AUC is the Mann-Whitney statistic: over every (positive, negative) pair, 1 when the
positive scores higher, 1/2 on a tie, 0 otherwise, each pair weighted by the product of
the two sample weights, divided by ``W+ * W-``. That is what ``sklearn.metrics.
roc_auc_score`` computes (its trapezoids over tied scores give the one-half), ties
included. After sorting, a positive in a run of equal scores beats the negative weight
below the run and ties half of the run's negative weight, so the statistic is prefix sums
read at run boundaries; the run bounds come from cumulative max/min over row indices
rather than a compaction, which would need the number of runs on the host.
"""

from __future__ import annotations

import torch

from recstack.pipelines.choices import check_choice
from recstack.pipelines.metrics.types import GAUCWeighting

__all__ = ["auc_terms", "gauc_terms"]


def _exclusive(inclusive: torch.Tensor) -> torch.Tensor:
    # Shifting the inclusive sum (rather than subtracting each row) keeps run differences
    # exact sums of the same terms.
    return torch.cat([inclusive.new_zeros(1), inclusive])[:-1]


def _run_bounds(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, the index of the first and of the last row of its run, given a
    boolean mask of run starts (row 0 must start a run)."""
    n = starts.numel()
    idx = torch.arange(n, device=starts.device)
    first = torch.where(starts, idx, 0).cummax(0).values
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    last = torch.where(ends, idx, n).flip(0).cummin(0).values.flip(0)
    return first, last


def _changes(x: torch.Tensor) -> torch.Tensor:
    """True where a sorted row differs from the one before it (and on row 0)."""
    out = torch.ones(x.numel(), dtype=torch.bool, device=x.device)
    out[1:] = x[1:] != x[:-1]
    return out


def _half_pair_credit(
    pos_w: torch.Tensor, neg_cum: torch.Tensor, tie_first: torch.Tensor, tie_last: torch.Tensor
) -> torch.Tensor:
    """Per row: its positive weight times the negative weight below its run plus half of
    the run's (measured from the start of the sort, not of a group)."""
    below = _exclusive(neg_cum)[tie_first]
    return pos_w * 0.5 * (below + neg_cum[tie_last])


def auc_terms(
    preds: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted Mann-Whitney sum and the class weights.

    Args:
        preds: 1-D scores (any real values, no NaN).
        pos_w: float64 weight of each row as a positive (its weight if labelled 1, else 0).
        neg_w: float64 weight of each row as a negative.

    Returns:
        ``(pairs, w_pos, w_neg)`` as 0-d float64 tensors; AUC = ``pairs / (w_pos * w_neg)``.
    """
    order = torch.argsort(preds)
    scores, pw, nw = preds[order], pos_w[order], neg_w[order]
    tie_first, tie_last = _run_bounds(_changes(scores))
    pairs = _half_pair_credit(pw, nw.cumsum(0), tie_first, tie_last).sum()
    return pairs, pw.sum(), nw.sum()


def gauc_terms(
    preds: torch.Tensor,
    pos_w: torch.Tensor,
    neg_w: torch.Tensor,
    groups: torch.Tensor,
    weighting: GAUCWeighting,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums for the group-weighted mean of per-group AUCs, all groups in one sort.

    Rows are sorted by (group, score); a run of ties is a run of equal (group, score). A
    group holding a single class (by weight) has no AUC and is skipped.

    Args:
        preds: 1-D scores (no NaN).
        pos_w: float64 weight of each row as a positive.
        neg_w: float64 weight of each row as a negative.
        groups: int64 group id of each row.
        weighting: how each group's AUC is weighted (see :data:`GAUCWeighting`).

    Returns:
        ``(weighted_auc_sum, weight_sum, groups, skipped_groups)`` as 0-d tensors (the
        first two float64, the counts int64); GAUC = ``weighted_auc_sum / weight_sum``.
    """
    check_choice(weighting, "gauc: weighting", GAUCWeighting)
    # Lexicographic (group, score) order from two stable sorts, least significant first.
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    scores, gid, pw, nw = preds[order], groups[order], pos_w[order], neg_w[order]
    del order
    group_starts = _changes(gid)
    tie_starts = _changes(scores) | group_starts
    g_first, _ = _run_bounds(group_starts)
    tie_first, tie_last = _run_bounds(tie_starts)
    neg_cum = nw.cumsum(0)
    # Credit measured from the sort's start, minus the negatives of earlier groups.
    credit = _half_pair_credit(pw, neg_cum, tie_first, tie_last) - pw * _exclusive(neg_cum)[g_first]
    del tie_first, tie_last

    def group_sum(cum: torch.Tensor) -> torch.Tensor:
        # Read at each group's last row; other rows are masked out below.
        return cum - _exclusive(cum)[g_first]

    group_ends = torch.ones_like(group_starts)
    group_ends[:-1] = group_starts[1:]
    pairs = group_sum(credit.cumsum(0))
    w_pos = group_sum(pw.cumsum(0))
    w_neg = group_sum(neg_cum)
    valid = group_ends & (w_pos > 0) & (w_neg > 0)
    if weighting == "impressions":
        group_w = w_pos + w_neg
    elif weighting == "clicks":
        group_w = w_pos
    else:
        group_w = torch.ones_like(w_pos)  # "uniform"
    auc = torch.where(valid, pairs / torch.where(valid, w_pos * w_neg, 1.0), 0.0)
    group_w = torch.where(valid, group_w, 0.0)
    n_groups = group_ends.sum()
    return (auc * group_w).sum(), group_w.sum(), n_groups, n_groups - valid.sum()
