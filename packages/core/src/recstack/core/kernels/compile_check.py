"""Compile, for a real GPU and on a machine without one, every Triton kernel a run launched.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python body on NumPy arrays,
which is how CI checks every kernel's results without a GPU. It never compiles, though, so
a kernel can pass every interpreted test and still fail to build for the GPU (pointer
arithmetic of the wrong type, a hint on a scalar, a Python call in a kernel), or build and
spill registers. This module closes that gap in two steps, in two processes:

1. :func:`~recstack.core.kernels.launch_log.record_launches` (interpreter on): note each
   launch's *signature*, what Triton specializes a compiled kernel on.
2. :func:`compile_signatures` (interpreter off): compile each distinct signature through
   Triton's own JIT path, with a stand-in driver that names the target GPU instead of
   asking one, down to the cubin (``ptxas`` ships with Triton), and read each cubin's
   registers and spills with ``cuobjdump``.

``python -m recstack.core.kernels.compile_check LOG`` runs step 2 on a saved log and exits
non-zero if any kernel failed to compile; CI records the log while the test-suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recstack.core.kernels import HAS_TRITON, interpret_mode
from recstack.core.kernels.launch_log import LaunchSignature, load_signatures

__all__ = ["CompileResult", "compile_signatures", "main"]


@dataclass(frozen=True)
class CompileResult:
    """How one signature compiled.

    Attributes:
        signature: what was compiled.
        error: ``None`` when it compiled; else the failure (the kernel could not be found,
            or Triton's / ptxas's message).
        registers: registers per thread in the cubin (``None`` without ``cuobjdump``).
        spill_bytes: local memory per thread, which is where registers spill.
        shared_bytes: static shared memory per block.
        seconds: compile time.
        global_loads: ``ld.global`` instructions in the PTX.
        wide_loads: those moving 128 bits at once (``.v4`` of 32-bit, ``.v2`` of 64-bit
            words): a kernel reading whole aligned rows that has none lost its vectorized
            loads (an alignment hint the compiler dropped, say).
    """

    signature: LaunchSignature
    error: str | None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    global_loads: int = 0
    wide_loads: int = 0

    @property
    def ok(self) -> bool:
        """True when the kernel compiled."""
        return self.error is None


class _Pointer:
    """Stands in for a tensor argument: Triton reads only its dtype and data pointer."""

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        self.dtype = dtype
        self._ptr = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._ptr


class _TargetDriver:
    """Answers Triton's questions about "the current GPU" with a fixed target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        # Triton caches compiled kernels per device id: one id per architecture.
        self.device = arch

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def _target(arch: int) -> Iterator[None]:
    from triton.runtime.driver import driver

    before = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = before


_loaded_files: dict[str, Any] = {}


def _resolve(ref: str, file: str) -> Any:
    module_name, qualname = ref.split(":", 1)
    if "<locals>" in qualname:
        raise LookupError(f"{ref} is defined inside a function and cannot be reached")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        obj = None
    if obj is None or not hasattr(obj, qualname.split(".")[0]):
        if not file or not Path(file).is_file():
            raise LookupError(f"cannot import {module_name} (file {file!r})") from None
        obj = _loaded_files.get(file)
        if obj is None:
            name = f"_recstack_compile_check_{len(_loaded_files)}"
            spec = importlib.util.spec_from_file_location(name, file)
            if spec is None or spec.loader is None:
                raise LookupError(f"cannot load {file}")
            obj = importlib.util.module_from_spec(spec)
            sys.modules[name] = obj
            spec.loader.exec_module(obj)
            _loaded_files[file] = obj
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(arg: tuple[Any, ...]) -> Any:
    kind = arg[0]
    if kind == "tensor":
        return _Pointer(getattr(torch, arg[1].removeprefix("torch.")), arg[2])
    if kind in ("int", "bool", "const"):
        return arg[1]
    if kind == "float":
        return 0.5
    if kind == "none":
        return None
    if kind == "dtype":
        import triton.language as tl

        return getattr(tl, arg[1])
    if kind == "jit":
        return _resolve(arg[1], arg[2])
    if kind == "tuple":
        fields = [_decode(a) for a in arg[3]]
        return _resolve(arg[1], arg[2])(*fields) if arg[1] else tuple(fields)
    raise LookupError(f"cannot rebuild an argument of type {arg[1]}")


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        pass
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except Exception:
        return None
    return str(path) if path.is_file() else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int, int] | None:
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    m = _RESOURCE.search(out)
    if m is None:
        return None
    reg, stack, shared, local = (int(g) for g in m.groups())
    return reg, max(stack, local), shared


_LD_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global\S*", re.MULTILINE)
_WIDE = re.compile(r"\.v4\.(?:b|u|s|f)32|\.v2\.(?:b|u|s|f)64")


def _loads(ptx: str) -> tuple[int, int]:
    """``ld.global`` instructions in ``ptx``, and how many of them move 128 bits."""
    ops = _LD_GLOBAL.findall(ptx)
    return len(ops), sum(1 for op in ops if _WIDE.search(op))


def _compile_one(signature: LaunchSignature, arch: int) -> CompileResult:
    start = time.perf_counter()
    try:
        kernel = _resolve(signature.kernel, signature.file)
        from triton.runtime.jit import JITFunction

        # An autotuned or heuristics-wrapped kernel: the record holds the inner launch.
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn
        args = [_decode(a) for a in signature.args]
        with _target(arch):
            compiled = kernel.warmup(*args, grid=(1,), **dict(signature.options))
        asm = compiled.asm if compiled is not None else {}
        cubin, ptx = asm.get("cubin"), asm.get("ptx") or ""
    except Exception as e:
        message = f"{type(e).__name__}: {e}".strip()
        return CompileResult(signature, message, seconds=time.perf_counter() - start)
    usage = _resources(cubin) if cubin else None
    reg, spill, shared = usage if usage is not None else (None, None, None)
    loads, wide = _loads(ptx)
    seconds = time.perf_counter() - start
    return CompileResult(signature, None, reg, spill, shared, seconds, loads, wide)


def _compile_batch(batch: list[str], arch: int) -> list[CompileResult]:
    # Triton 3.9 warns once per process that its FP-fusion default will change; the
    # check compiles with whatever the installed Triton does at launch.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
        return [_compile_one(LaunchSignature.from_json(line), arch) for line in batch]


def compile_signatures(
    signatures: Iterable[LaunchSignature],
    *,
    arch: int = 90,
    jobs: int = 1,
    progress: bool = False,
) -> list[CompileResult]:
    """Compile each signature for an NVIDIA GPU of compute capability ``arch // 10``.

    Args:
        signatures: from :func:`~recstack.core.kernels.launch_log.load_signatures` or a
            :class:`~recstack.core.kernels.launch_log.LaunchLog`'s ``signatures``.
        arch: the target, e.g. ``90`` (H100, H200), ``80`` (A100), ``89`` (L4).
        jobs: worker processes (compiling is CPU-bound and single-threaded).
        progress: print a progress line to stderr.

    Returns:
        One :class:`CompileResult` per distinct signature, in a stable order.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1`` (kernels are then not compilable
            objects: run this in a process without it), or without Triton.
    """
    if not HAS_TRITON:
        raise RuntimeError("compile_signatures needs Triton")
    if interpret_mode():
        raise RuntimeError(
            "compile_signatures cannot run under TRITON_INTERPRET=1: run it in a process "
            "without the interpreter"
        )
    ordered = sorted(set(signatures), key=lambda s: (s.kernel, s.to_json()))
    lines = [s.to_json() for s in ordered]
    # Batches keep a kernel's variants in one worker, where its source is parsed once.
    size = max(1, min(16, len(lines) // max(1, 4 * jobs)))
    batches = [lines[i : i + size] for i in range(0, len(lines), size)]
    results: list[CompileResult] = []
    done = 0

    def report(batch_results: list[CompileResult]) -> None:
        nonlocal done
        results.extend(batch_results)
        done += len(batch_results)
        if progress:
            name = batch_results[-1].signature.kernel.rsplit(":", 1)[-1] if batch_results else ""
            print(
                f"\rcompiling for sm_{arch}: {done}/{len(lines)} {name:<40}",
                end="",
                file=sys.stderr,
            )

    if jobs <= 1 or len(batches) <= 1:
        for batch in batches:
            report(_compile_batch(batch, arch))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for batch_results in pool.map(_compile_batch, batches, [arch] * len(batches)):
                report(batch_results)
    if progress:
        print(file=sys.stderr)
    return results


def _describe(sig: LaunchSignature) -> str:
    """The kernel and its constexpr arguments by name, for messages."""
    try:
        names = list(_resolve(sig.kernel, sig.file).arg_names)
    except Exception:
        names = [str(i) for i in range(len(sig.args))]
    consts = ", ".join(f"{names[i]}={_shown(a)}" for i, a in enumerate(sig.args) if _is_const(a))
    return f"{sig.kernel}({consts})"


def _is_const(arg: tuple[Any, ...]) -> bool:
    if arg[0] == "tuple":
        return any(_is_const(a) for a in arg[3])
    return arg[0] in ("const", "dtype", "jit")


def _shown(arg: tuple[Any, ...]) -> str:
    """A constexpr argument for messages: its value, a jitted function's name."""
    if arg[0] == "tuple":
        return "(" + ", ".join(_shown(a) for a in arg[3] if _is_const(a)) + ")"
    return str(arg[1]) if arg[0] != "jit" else arg[1].rsplit(":", 1)[-1]


# --- command line ----------------------------------------------------------------------------


def _summary(results: Sequence[CompileResult], arch: int) -> str:
    by_kernel: dict[str, list[CompileResult]] = {}
    for r in results:
        by_kernel.setdefault(r.signature.kernel, []).append(r)
    rows = [
        f"Triton kernels compiled for sm_{arch}: {sum(r.ok for r in results)} of "
        f"{len(results)} signatures, {len(by_kernel)} kernels",
        "",
        f"{'kernel':<64} {'variants':>8} {'failed':>6} {'max reg':>7} {'max spill B':>11} "
        f"{'128-bit ld':>10}",
    ]
    for kernel, rs in sorted(by_kernel.items()):
        regs = [r.registers for r in rs if r.registers is not None]
        spills = [r.spill_bytes for r in rs if r.spill_bytes is not None]
        loads = sum(r.global_loads for r in rs)
        wide = f"{sum(r.wide_loads for r in rs) / loads:.0%}" if loads else "-"
        rows.append(
            f"{kernel:<64} {len(rs):>8} {sum(not r.ok for r in rs):>6} "
            f"{max(regs) if regs else '-':>7} {max(spills) if spills else '-':>11} {wide:>10}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recstack.core.kernels.compile_check LOG [--arch 90] [--jobs N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m recstack.core.kernels.compile_check",
        description="Compile every Triton kernel signature in a launch log for a GPU.",
    )
    parser.add_argument("log", help="JSON-lines log written by LaunchLog.save")
    parser.add_argument("--arch", type=int, action="append", help="target(s), default 90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    ns = parser.parse_args(argv)
    signatures = load_signatures(ns.log)
    if not signatures:
        print(f"{ns.log}: no launches recorded", file=sys.stderr)
        return 1
    failed = 0
    for arch in ns.arch or [90]:
        results = compile_signatures(
            signatures, arch=arch, jobs=ns.jobs, progress=not ns.quiet and sys.stderr.isatty()
        )
        if arch != (ns.arch or [90])[0]:
            print()
        print(_summary(results, arch))
        for r in results:
            if not r.ok:
                failed += 1
                print(f"\nFAILED {_describe(r.signature)}\n{r.error}")
            elif r.spill_bytes:
                print(f"spills {r.spill_bytes} B/thread: {_describe(r.signature)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
