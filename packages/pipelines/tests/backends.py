"""The kernel backends the pipelines tests run on: the torch reference always, the Triton
kernels where they can run (a GPU, or the interpreter under ``TRITON_INTERPRET=1``), and the
device their tensors live on (the GPU where there is one: compiled kernels read no CPU
tensor)."""

from __future__ import annotations

import pytest
import torch

from recstack.core import kernels

#: Whether the Triton kernels can run here.
RUNNABLE = kernels.HAS_TRITON and (kernels.interpret_mode() or torch.cuda.is_available())

#: Where a test that runs both backends puts its tensors and models.
ON_GPU = torch.cuda.is_available() and not kernels.interpret_mode()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

#: ``backend`` parameters: ``"torch"``, and ``"triton"`` skipped where it cannot run.
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "triton",
        id="triton",
        marks=pytest.mark.skipif(not RUNNABLE, reason="needs a GPU or TRITON_INTERPRET=1"),
    ),
]
