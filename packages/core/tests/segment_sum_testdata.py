"""Shared helpers of the segment-sum and SparseGrad tests: tolerances and skewed row ids."""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def zipf_rows(n: int, device, vocab: int = 50) -> torch.Tensor:
    """Heavily skewed ids: id 0 takes a large share, a long tail follows."""
    u = torch.rand(n, device=device)
    return (vocab * u**4).long()
