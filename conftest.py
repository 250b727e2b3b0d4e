"""Test-suite set-up shared by every package's tests.

Without a GPU, Triton kernels run through Triton's interpreter, so every kernel is
checked against its torch reference on the CPU. ``TRITON_INTERPRET`` must be set before
Triton is imported, which is why this happens here, before any test module loads.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from recstack.core import kernels  # noqa: E402  (after TRITON_INTERPRET is settled)

HAS_CUDA = torch.cuda.is_available()
_LOG_KEY = pytest.StashKey["object"]()

# CI compiles, for a GPU, every kernel signature the interpreted tests launched
# (recstack.core.kernels.compile_check): the interpreter alone never compiles a kernel.
_KERNEL_LOG = os.environ.get("RECSTACK_KERNEL_LOG")
_recording = contextlib.ExitStack()


def pytest_sessionstart(session: pytest.Session) -> None:
    if _KERNEL_LOG and kernels.interpret_mode():
        from recstack.core.kernels.launch_log import record_launches

        # The docs' example kernels are defined only where they can run.
        recorder = record_launches(keep=lambda s: "__docs_example__" not in s.to_json())
        session.config.stash[_LOG_KEY] = _recording.enter_context(recorder)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    log = session.config.stash.get(_LOG_KEY, None)
    _recording.close()
    if log is not None and _KERNEL_LOG:
        log.save(_KERNEL_LOG)


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
