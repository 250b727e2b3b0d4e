"""recstack.pipelines.models.deepfm: the factorization machine's interaction."""

from __future__ import annotations

import torch

from recstack.pipelines.models import fm_interaction


def test_fm_interaction_is_the_sum_over_pairs() -> None:
    v = torch.randn(2, 3, 4)
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i in range(3) for j in range(i + 1, 3))
    assert torch.allclose(fm_interaction(v), pairs, atol=1e-5)
