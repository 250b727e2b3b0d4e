"""Random number generator states as JSON, so a resumed run draws what it would have.

Captured per rank: torch's CPU generator, every CUDA device's generator (when CUDA is
initialized), Python's ``random`` and NumPy's legacy global generator (when NumPy is
installed). Byte states travel as lists of ints; nothing is pickled.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """This process's generator states, JSON-able."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng(state: dict[str, Any], where: str) -> None:
    """Set the generators ``state`` (from :func:`capture_rng`) holds.

    CUDA states are restored when CUDA is available and the device count matches; a
    state saved without NumPy leaves NumPy's generator alone.

    Raises:
        ValueError: a state that is not what :func:`capture_rng` writes (``where`` names
            the checkpoint).
    """
    try:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        cuda = state.get("cuda")
        same_devices = torch.cuda.is_available() and len(cuda or []) == torch.cuda.device_count()
        if cuda is not None and same_devices:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
        if "numpy" in state:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: the saved random generator state is malformed ({err})") from err


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
