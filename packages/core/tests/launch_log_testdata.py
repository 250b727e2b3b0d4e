"""Kernels of the launch-log and compile-check tests: plain, constexpr-function, named-tuple,
heuristic-sized, and one the interpreter runs but the compiler rejects."""

from __future__ import annotations

from typing import Any, NamedTuple

from recstack.core.kernels import HAS_TRITON


class Rows(NamedTuple):
    """A named-tuple kernel argument."""

    out: Any
    n: int


class Choice(NamedTuple):
    """A constexpr named-tuple kernel argument."""

    fn: Any
    block: int


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def double(x):
        return x * 2

    @triton.jit
    def apply_kernel(x_ptr, out_ptr, n, scale, FN: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(out_ptr + i, FN(x) * scale, mask=i < n)

    @triton.jit
    def tuple_kernel(x_ptr, rows, scale, CHOICE: tl.constexpr):
        i = tl.arange(0, CHOICE.block)
        x = tl.load(x_ptr + i, mask=i < rows.n, other=0.0)
        tl.store(rows.out + i, CHOICE.fn(x) * scale, mask=i < rows.n)

    @triton.heuristics({"BLOCK": lambda args: triton.next_power_of_2(args["n"])})
    @triton.jit
    def sized_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1.0, mask=i < n)

    def plain_helper(x):
        return x + 1

    @triton.jit
    def not_compilable(x_ptr):
        # The interpreter runs plain Python calls; the compiler rejects them.
        tl.store(x_ptr, plain_helper(tl.load(x_ptr)))
