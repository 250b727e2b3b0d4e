"""recstack.pipelines.models.layers: the MLP, the tower to one logit, the activations."""

from __future__ import annotations

import pytest
import torch

from recstack.pipelines.models.layers import ACTIVATIONS, MLP, Tower, make_activation


def test_a_tower_is_an_mlp_to_one_float32_logit() -> None:
    torch.manual_seed(0)
    tower = Tower(6, [8, 4], "prelu", dropout=0.1)
    mlp = MLP(6, [8, 4], "prelu", dropout=0.1, out_dim=1)
    assert list(tower.state_dict()) == list(mlp.state_dict())  # they load each other
    mlp.load_state_dict(tower.state_dict())
    tower.eval(), mlp.eval()
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tower(x)
    assert logits.shape == (5,) and logits.dtype == torch.float32
    torch.testing.assert_close(tower(x), mlp(x).squeeze(-1))


def test_every_activation_builds_and_others_are_refused() -> None:
    for name in ACTIVATIONS:
        assert make_activation(name.upper(), 3)(torch.randn(2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_activation("swish", 3)  # type: ignore[arg-type]
