"""Batch builders shared by the Embedding Engine tests."""

from __future__ import annotations

import torch

from recstack.core import KeyedJaggedTensor


def kjt(device: torch.device, **bags: list[int]) -> KeyedJaggedTensor:
    """One bag per feature holding all its ids (batch size 1)."""
    keys = list(bags)
    values = [i for k in keys for i in bags[k]]
    return KeyedJaggedTensor(
        keys,
        torch.tensor(values, dtype=torch.int64, device=device),
        lengths=torch.tensor([len(bags[k]) for k in keys], dtype=torch.int64, device=device),
        stride=1,
    )
