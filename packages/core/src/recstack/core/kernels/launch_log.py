"""Record the signature of every Triton kernel launch, while kernels are interpreted.

A signature is what Triton specializes a compiled kernel on: the kernel, each tensor's dtype
and 16-byte alignment, each int's class (1, divisible by 16, int32/int64/uint64 range),
constexpr values (jitted tile functions by name) and launch options such as ``num_warps``.
:mod:`recstack.core.kernels.compile_check` compiles a saved log for a GPU, on a machine
without one.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recstack.core.kernels import HAS_TRITON, interpret_mode

__all__ = ["LaunchLog", "LaunchSignature", "load_signatures", "record_launches"]

_I32 = 1 << 31
_U64 = 1 << 63


@dataclass(frozen=True)
class LaunchSignature:
    """What one launch compiles to: the kernel and its arguments as Triton specializes them.

    Attributes:
        kernel: ``"module:qualname"`` of the ``@triton.jit`` kernel.
        file: the source file defining it (used when the module cannot be imported by name,
            as for test modules).
        args: one JSON-able entry per parameter, in order: ``["tensor", dtype, aligned]``,
            ``["int", representative]``, ``["float"]``, ``["bool", value]``, ``["none"]``,
            and for constexprs ``["const", value]``, ``["dtype", name]`` or
            ``["jit", "module:qualname", file]``; ``["other", type name]`` for anything else.
            A tuple is ``["tuple", "module:qualname", file, [fields...]]`` (its class for a
            named tuple, else ``""`` twice), each field encoded as above.
        options: launch options (``num_warps``, ``num_stages``...) as sorted pairs.
    """

    kernel: str
    file: str
    args: tuple[Any, ...]
    options: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> str:
        """One JSON line (the log's format)."""
        return json.dumps(
            {"kernel": self.kernel, "file": self.file, "args": self.args, "options": self.options}
        )

    @classmethod
    def from_json(cls, line: str) -> LaunchSignature:
        """Parse a line written by :meth:`to_json`."""
        d = json.loads(line)
        return cls(
            kernel=d["kernel"],
            file=d["file"],
            args=_frozen(d["args"]),
            options=tuple((k, _frozen(v)) for k, v in d["options"]),
        )


def _frozen(x: Any) -> Any:
    # JSON gives lists; signatures are hashable so a log can be deduplicated.
    return tuple(_frozen(v) for v in x) if isinstance(x, list) else x


@dataclass
class LaunchLog:
    """The distinct launch signatures seen while :func:`record_launches` was active."""

    signatures: set[LaunchSignature] = field(default_factory=set)
    launches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, signature: LaunchSignature) -> None:
        """Count one launch of ``signature``."""
        with self._lock:
            self.launches += 1
            self.signatures.add(signature)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the signatures as JSON lines, merged with any already in ``path``."""
        path = Path(path)
        known = set(load_signatures(path)) if path.exists() else set()
        lines = sorted(s.to_json() for s in known | self.signatures)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


def load_signatures(path: str | os.PathLike[str]) -> list[LaunchSignature]:
    """Read a log written by :meth:`LaunchLog.save`."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(LaunchSignature.from_json(line))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a launch signature ({e})") from e
    return out


def _int_class(v: int) -> int:
    # A value of the same class as v for Triton's specialization: 1 is a constant, the
    # rest differ only by range (int32 / int64 / uint64) and divisibility by 16.
    if v == 1:
        return 1
    base = 16 if -_I32 <= v < _I32 else (1 << 40) if v < _U64 else _U64
    return base if v % 16 == 0 else base + 1


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _encode(value: Any, constexpr: bool) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        cls = type(value)
        named = cls is not tuple
        return (
            "tuple",
            f"{cls.__module__}:{cls.__qualname__}" if named else "",
            (inspect.getsourcefile(cls) or "") if named else "",
            tuple(_encode(v, constexpr) for v in value),
        )
    if constexpr:
        if value is None or isinstance(value, (bool, int, float, str)):
            return ("const", value)
        fn = getattr(value, "fn", None)
        if fn is not None and callable(fn):
            return ("jit", f"{fn.__module__}:{fn.__qualname__}", inspect.getsourcefile(fn) or "")
        name = getattr(value, "name", None)
        if type(value).__name__ == "dtype" and isinstance(name, str):
            return ("dtype", name)
        return ("other", type(value).__name__)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", _int_class(value))
    if isinstance(value, float):
        return ("float",)
    if value is None:
        return ("none",)
    return ("other", type(value).__name__)


def _signature_of(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LaunchSignature:
    fn = kernel.fn
    sig = inspect.signature(fn)
    names = set(sig.parameters)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    encoded = tuple(
        _encode(bound.arguments[name], _is_constexpr(p)) for name, p in sig.parameters.items()
    )
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    return LaunchSignature(
        kernel=f"{fn.__module__}:{fn.__qualname__}",
        file=inspect.getsourcefile(fn) or "",
        args=encoded,
        options=options,
    )


@contextlib.contextmanager
def record_launches(
    log: LaunchLog | None = None, *, keep: Callable[[LaunchSignature], bool] | None = None
) -> Iterator[LaunchLog]:
    """Record the signature of every interpreted Triton launch in the block.

    Needs ``TRITON_INTERPRET=1`` (set before Triton was imported): on a GPU, kernels are
    compiled as they launch and need no check. Launches still run as usual.

    Args:
        log: add to this log instead of a new one.
        keep: record only the signatures for which this returns True.

    For example:

        with record_launches() as log:
            run_the_tests()
        log.save("launches.jsonl")
    """
    if not (HAS_TRITON and interpret_mode()):
        raise RuntimeError("record_launches needs Triton's interpreter (TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import InterpretedFunction

    log = LaunchLog() if log is None else log
    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:
            signature = _signature_of(self, args, kwargs)
            if keep is None or keep(signature):
                log.add(signature)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield log
    finally:
        InterpretedFunction.run = original
