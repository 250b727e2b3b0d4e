"""Kernel backend choice and launch accounting shared by every RecStack kernel.

Every op in RecStack has two implementations: a Triton kernel and a vectorized torch
reference. Which one runs is decided per call from the tensors' device:

* CUDA tensors run the Triton kernel;
* CPU tensors run the torch reference, except when ``TRITON_INTERPRET=1`` is set (before
  Triton is imported), in which case the Triton kernel runs on the CPU through Triton's
  interpreter. The test-suite uses this so every kernel is checked without a GPU.

The choice can be forced with :func:`use_backend` / :func:`set_backend` or the
``RECSTACK_KERNELS`` environment variable (``auto``, ``triton`` or ``torch``); forcing
``torch`` on CUDA runs the reference on the GPU, which is what benchmarks compare against.

Kernels of every package share two helper modules: :mod:`recstack.core.kernels.device`
(``@triton.jit`` device functions: hashing steps, paged row pointers, table dtypes,
segmented sums) and :mod:`recstack.core.kernels.host` (launch arithmetic: block sizes,
warps, int64 constants).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import torch

__all__ = [
    "Backend",
    "HAS_TRITON",
    "carry_backend",
    "count_launches",
    "get_backend",
    "interpret_mode",
    "record_launch",
    "set_backend",
    "triton_available",
    "use_backend",
    "use_triton",
]

Backend = Literal["auto", "triton", "torch"]
_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported on this machine."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


HAS_TRITON: bool = triton_available()


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _serialize_interpreter() -> None:
    """Run interpreted Triton launches one at a time, process-wide.

    While Triton's interpreter runs a kernel it swaps ``triton.language``'s functions for
    its own, for the whole process, and puts them back afterwards. Two threads interpreting
    at once (a data loader's producer thread beside the main thread, say) undo each other's
    swap and fail with "Did you forget to add @triton.jit". On the GPU nothing is swapped
    and nothing here applies.
    """
    try:
        from triton.runtime import interpreter
    except Exception:
        return
    executor = getattr(interpreter, "GridExecutor", None)
    call = vars(executor).get("__call__") if isinstance(executor, type) else None
    if call is None or getattr(call, "_recstack_serialized", False):
        return
    lock = threading.RLock()

    @functools.wraps(call)
    def serialized(self, *args, **kwargs):
        with lock:
            return call(self, *args, **kwargs)

    serialized._recstack_serialized = True  # type: ignore[attr-defined]
    executor.__call__ = serialized  # type: ignore[union-attr]


if HAS_TRITON and interpret_mode():
    _serialize_interpreter()


def _backend_from_env() -> Backend:
    value = os.environ.get("RECSTACK_KERNELS", "auto").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(
            f"RECSTACK_KERNELS={value!r} is not a kernel backend; use one of {_BACKENDS}"
        )
    return value  # type: ignore[return-value]


_state = threading.local()


def get_backend() -> Backend:
    """The backend in force for this thread: ``auto`` unless set or forced."""
    backend = getattr(_state, "backend", None)
    return backend if backend is not None else _backend_from_env()


def set_backend(backend: Backend) -> None:
    """Force the kernel backend for this thread (``auto``, ``triton`` or ``torch``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {_BACKENDS}")
    _state.backend = backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Run the enclosed code with ``backend`` forced, then restore the previous choice.

    Examples:
        >>> from recstack.core import kernels
        >>> with kernels.use_backend("torch"):
        ...     pass  # every RecStack op in here runs its torch reference
    """
    previous = getattr(_state, "backend", None)
    set_backend(backend)
    try:
        yield
    finally:
        _state.backend = previous


FunctionT = TypeVar("FunctionT", bound=type)


def carry_backend(function: FunctionT) -> FunctionT:
    """Class decorator for a ``torch.autograd.Function`` (``forward(ctx, ...)`` style): its
    ``backward`` runs under the backend that was in force where its ``forward`` ran.

    Autograd runs a CUDA backward pass in a device thread of its own, where the forward
    thread's :func:`use_backend` does not hold; without this, a backward under a forced
    ``torch`` backend would launch the Triton kernels.

    Examples:
        >>> import torch
        >>> from recstack.core import kernels
        >>> @kernels.carry_backend
        ... class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return 2 * x
        ...
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         return 2 * grad
        >>> x = torch.ones(2, requires_grad=True)
        >>> Double.apply(x).sum().backward()
        >>> x.grad.tolist()
        [2.0, 2.0]
    """
    forward, backward = function.forward, function.backward

    @functools.wraps(forward)
    def forward_keeping_the_backend(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        ctx.recstack_backend = get_backend()
        return forward(ctx, *args, **kwargs)

    @functools.wraps(backward)
    def backward_under_it(ctx: Any, *grads: Any) -> Any:
        with use_backend(ctx.recstack_backend):
            return backward(ctx, *grads)

    function.forward = staticmethod(forward_keeping_the_backend)  # type: ignore[attr-defined]
    function.backward = staticmethod(backward_under_it)  # type: ignore[attr-defined]
    return function


def use_triton(*tensors: torch.Tensor, op: str = "op") -> bool:
    """Decide whether ``op`` on ``tensors`` runs its Triton kernel (True) or torch reference.

    Raises a clear error when Triton is forced but cannot run on these tensors.
    """
    backend = get_backend()
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "torch":
        return False
    runnable = HAS_TRITON and (on_cuda or interpret_mode())
    if backend == "triton":
        if not runnable:
            reason = (
                "the triton package is not installed"
                if not HAS_TRITON
                else "its tensors are on the CPU and TRITON_INTERPRET=1 was not set before "
                "Triton was imported"
            )
            raise RuntimeError(f"{op}: the Triton backend was forced but cannot run: {reason}")
        return True
    return runnable


# Launch counters are process-wide, not per thread: autograd runs a CUDA backward pass in
# its own device thread, and its launches belong to the block that called backward().
_counting_lock = threading.Lock()
_counting_active: list[Counter[str]] = []


def record_launch(name: str, n: int = 1) -> None:
    """Count ``n`` kernel launches of ``name``; launchers call this once per launch."""
    if _counting_active:
        with _counting_lock:
            for counter in _counting_active:
                counter[name] += n


@contextlib.contextmanager
def count_launches() -> Iterator[Counter[str]]:
    """Count RecStack kernel launches (Triton or reference) made inside the block.

    Yields a :class:`collections.Counter` keyed by kernel name, updated as launches happen.
    Launches from every thread count (autograd runs a CUDA backward pass in a thread of its
    own), so count in one thread at a time. Blocks may nest; each counts what ran inside it.

    Examples:
        >>> from recstack.core import kernels
        >>> with kernels.count_launches() as launches:
        ...     pass
        >>> sum(launches.values())
        0
    """
    counter: Counter[str] = Counter()
    with _counting_lock:
        _counting_active.append(counter)
    try:
        yield counter
    finally:
        with _counting_lock:
            # By identity: nested counters that counted the same launches compare equal.
            at = next(i for i, c in enumerate(_counting_active) if c is counter)
            del _counting_active[at]
