"""Conversion between RecStack's and TorchRec's ``KeyedJaggedTensor`` (torchrec optional).

Both use the same key-major layout, so conversion hands over the same tensors
(``lengths`` only gets converted when TorchRec holds them as int32).

Example (needs ``torchrec``)::

    >>> from recstack.core.torchrec_interop import from_torchrec, to_torchrec
    >>> trec = to_torchrec(kjt)                 # doctest: +SKIP
    >>> back = from_torchrec(trec)              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from recstack.core.keyed_jagged import KeyedJaggedTensor

__all__ = ["from_torchrec", "to_torchrec"]


def _torchrec_kjt_class() -> Any:
    # Imported on use: torchrec is an optional, heavy dependency pinned to a torch version.
    try:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchRecKJT
    except ImportError as exc:
        raise ImportError(
            "converting to/from TorchRec needs the optional `torchrec` package, which could not "
            f"be imported ({exc}); install the torchrec build matching your torch version, "
            "e.g. `pip install torchrec`"
        ) from exc
    except Exception as exc:
        # An installed torchrec can fail while loading its native libraries (OSError for a
        # missing libnvidia-ml.so.1 without a GPU driver, RuntimeError for an fbgemm built
        # against another torch); the raw error does not say that TorchRec interop was the
        # caller.
        raise ImportError(
            "converting to/from TorchRec needs the optional `torchrec` package, which is "
            f"installed but failed to load ({type(exc).__name__}: {exc}); install the torchrec "
            "(and fbgemm-gpu) build matching your torch version and machine, e.g. "
            "`pip install torchrec`, or a CPU build where there is no GPU driver"
        ) from exc
    return TorchRecKJT


def to_torchrec(kjt: KeyedJaggedTensor) -> Any:
    """A ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor`` sharing ``kjt``'s tensors.

    TorchRec holds 1-D values, so ``kjt.values()`` must be 1-D (ids, not embeddings). A
    capacity layout (``kjt.is_compact`` False) is trimmed first, with one host sync:
    TorchRec expects ``values`` to end with the last row.
    """
    if not isinstance(kjt, KeyedJaggedTensor):
        raise TypeError(f"to_torchrec: expected a recstack KeyedJaggedTensor, got {type(kjt)}")
    kjt = kjt.compact()
    if kjt.values().dim() != 1:
        raise ValueError(
            "to_torchrec: TorchRec needs 1-D values, got shape "
            f"{tuple(kjt.values().shape)} for keys {kjt.keys()}"
        )
    trec_kjt = _torchrec_kjt_class()
    return trec_kjt(
        keys=kjt.keys(),
        values=kjt.values(),
        weights=kjt.weights_or_none(),
        lengths=kjt.lengths(),
        stride=kjt.stride(),
    )


def from_torchrec(trec_kjt: Any) -> KeyedJaggedTensor:
    """A RecStack KeyedJaggedTensor over a TorchRec one's tensors.

    TorchRec KJTs whose keys have different batch sizes (variable stride) have no RecStack
    equivalent and are rejected.
    """
    _torchrec_kjt_class()  # the clear ImportError if torchrec is missing or fails to load
    variable = getattr(trec_kjt, "variable_stride_per_key", None)
    if callable(variable) and variable():
        raise ValueError(
            "from_torchrec: TorchRec KeyedJaggedTensor has a variable stride per key; "
            "RecStack needs one batch size for every key"
        )
    return KeyedJaggedTensor(
        keys=list(trec_kjt.keys()),
        values=trec_kjt.values(),
        lengths=trec_kjt.lengths(),
        weights=trec_kjt.weights_or_none(),
        stride=int(trec_kjt.stride()),
    )
