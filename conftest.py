"""Test-suite set-up shared by every package's tests.

Without a GPU, Triton kernels run through Triton's interpreter, so every kernel is
checked against its torch reference on the CPU. ``TRITON_INTERPRET`` must be set before
Triton is imported, which is why this happens here, before any test module loads.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from recstack.core import kernels  # noqa: E402  (after TRITON_INTERPRET is settled)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when present, else the CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest):
    """Run the test once with the torch reference and once with the Triton kernel."""
    if request.param == "triton" and not (
        kernels.HAS_TRITON and (HAS_CUDA or kernels.interpret_mode())
    ):
        pytest.skip("Triton cannot run here")
    with kernels.use_backend(request.param):
        yield request.param
