"""Dense building blocks shared by the reference models: an MLP builder, a tower to one
logit, and the activations a config names (including DIN's Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "MLP", "Activation", "Dice", "Tower", "make_activation"]

#: An activation a model config names (any case: ``"PReLU"`` is ``"prelu"``).
Activation = Literal["relu", "prelu", "dice", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"]

#: Activation names a model config accepts (lower case).
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


class Dice(nn.Module):
    """Dice, the data-adaptive activation of DIN (Zhou et al. 2018):
    ``p(x) * x + (1 - p(x)) * alpha * x`` with ``p(x) = sigmoid((x - mean) / sqrt(var + eps))``.

    Mean and variance are per channel (the last dim) over every other dim of the batch in
    training, and running averages of them in eval, like batch norm. Unlike
    ``nn.BatchNorm1d`` it accepts a batch of one row (the variance is then 0 and ``p`` is
    1/2), so a ``B=1`` training step works. Statistics are computed in float32, also
    under bf16 autocast.

    Args:
        dim: the channel count (last dim of the input).
        eps: added to the variance.
        momentum: weight of the new batch in the running averages.
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dice of ``x`` (``[..., dim]``), in ``x``'s dtype.

        Args:
            x: the input, channels last.
        """
        # Imported here: the ops package imports this module.
        from recstack.pipelines.ops.dice import dice

        return dice(
            x, self.alpha, self.running_mean, self.running_var, training=self.training,
            eps=self.eps, momentum=self.momentum,
        )  # fmt: skip


def make_activation(name: Activation, dim: int) -> nn.Module:
    """The activation module called ``name`` (one of :data:`ACTIVATIONS`).

    Args:
        name: the activation's name.
        dim: the width of its input (PReLU and Dice learn one parameter per channel).

    Raises:
        ValueError: an unknown name.
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "relu":
        return nn.ReLU()
    if key == "prelu":
        return nn.PReLU(dim)
    if key == "dice":
        return Dice(dim)
    if key == "gelu":
        return nn.GELU()
    if key == "silu":
        return nn.SiLU()
    if key == "tanh":
        return nn.Tanh()
    if key == "sigmoid":
        return nn.Sigmoid()
    if key == "leaky_relu":
        return nn.LeakyReLU()
    raise ValueError(f"unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")


class MLP(nn.Module):
    """``Linear -> activation -> dropout`` per hidden layer, then an optional output
    ``Linear`` without activation. Applies to the last dim (``[..., in_dim]`` inputs).

    Args:
        in_dim: the input width.
        hidden: the hidden layer widths (may be empty).
        activation: the activation after each hidden layer (one of :data:`ACTIVATIONS`).
        dropout: the dropout probability after each hidden layer.
        out_dim: the width of a final linear layer with no activation; ``None`` ends at
            the last hidden layer (activated).

    Attributes:
        output_dim: the width of the output.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        activation: Activation = "relu",
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"MLP: in_dim must be >= 1, got {in_dim}")
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), make_activation(activation, size)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.layers = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP applied to the last dim of ``x``.

        Args:
            x: ``[..., in_dim]``.
        """
        # PReLU and Dice take channels from dim 1, so leading dims are flattened first.
        y = self.layers(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Tower(MLP):
    """A task head: an :class:`MLP` ending in a linear layer to one logit per row.

    Its parameters are the MLP's (``layers.*``), so a tower and the ``MLP(...,
    out_dim=1)`` it replaces load each other's state dicts.

    Args:
        in_dim: the input width.
        hidden: the hidden layer widths (may be empty).
        activation: the activation after each hidden layer.
        dropout: the dropout probability after each hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, hidden, activation, dropout, out_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[...]`` (the last dim of ``x`` consumed).

        Args:
            x: ``[..., in_dim]``.
        """
        return super().forward(x).squeeze(-1).float()
