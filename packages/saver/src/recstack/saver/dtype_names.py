"""How manifests name dtypes: torch's name without its prefix (``"bfloat16"``).

Manifests record the dtype of every saved tensor and table slot by this name; loading,
verifying, inspecting and exporting read them back through these helpers.
"""

from __future__ import annotations

import torch

from recstack.saver.files import SAFETENSORS_DTYPES

__all__ = ["DTYPES_BY_NAME", "dtype_from_name", "dtype_name", "safetensors_name"]

#: The dtypes a checkpoint's tensor files can hold, by the name manifests give them.
DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in SAFETENSORS_DTYPES
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest gives ``dtype`` (``torch.float16`` -> ``"float16"``).

    Args:
        dtype: a torch dtype.
    """
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype | None:
    """The torch dtype called ``name`` (any torch dtype, not only the ones tensor files
    hold), or ``None`` when ``name`` names none.

    Args:
        name: the name as a manifest records it (``"float32"``).
    """
    d = getattr(torch, str(name), None)
    return d if isinstance(d, torch.dtype) else None


def safetensors_name(name: object) -> str | None:
    """The safetensors dtype (``"BF16"``) of a manifest's dtype name, or ``None`` when
    tensor files cannot hold it.

    Args:
        name: the name as a manifest records it.
    """
    dtype = DTYPES_BY_NAME.get(str(name))
    return SAFETENSORS_DTYPES.get(dtype) if dtype is not None else None
