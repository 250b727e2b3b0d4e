"""``recstack.core.mix64`` for the reader's and writer's own bookkeeping on the host."""

from __future__ import annotations

import torch

from recstack.core import kernels, mix64

__all__ = ["host_mix64"]


def host_mix64(x: torch.Tensor) -> torch.Tensor:
    """``mix64`` of host-side values (shuffle keys, synthetic effects), always by core's
    torch path: on a CPU that is the path ``mix64`` takes anyway, except under Triton's
    interpreter (the kernel tests' CPU mode), which spends minutes on data of this size.
    The results are the same bits either way.

    Examples:
        >>> host_mix64(torch.tensor([0, 1])).tolist()
        [0, -5451962507482445012]
    """
    with kernels.use_backend("torch"):
        return mix64(x)
