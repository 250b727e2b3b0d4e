"""Launch signatures recorded under the interpreter, then compiled for sm_90 without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from recstack.core.kernels import HAS_TRITON, interpret_mode
from recstack.core.kernels.launch_log import (
    LaunchLog,
    LaunchSignature,
    _int_class,
    load_signatures,
    record_launches,
)

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpret_mode()), reason="records interpreted launches"
)


class _Rows(NamedTuple):
    """A named-tuple kernel argument."""

    out: Any
    n: int


class _Choice(NamedTuple):
    """A constexpr named-tuple kernel argument."""

    fn: Any
    block: int


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _double(x):
        return x * 2

    @triton.jit
    def _apply_kernel(x_ptr, out_ptr, n, scale, FN: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(out_ptr + i, FN(x) * scale, mask=i < n)

    @triton.jit
    def _tuple_kernel(x_ptr, rows, scale, CHOICE: tl.constexpr):
        i = tl.arange(0, CHOICE.block)
        x = tl.load(x_ptr + i, mask=i < rows.n, other=0.0)
        tl.store(rows.out + i, CHOICE.fn(x) * scale, mask=i < rows.n)

    @triton.heuristics({"BLOCK": lambda args: triton.next_power_of_2(args["n"])})
    @triton.jit
    def _sized_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1.0, mask=i < n)

    def _plain_helper(x):
        return x + 1

    @triton.jit
    def _not_compilable(x_ptr):
        # The interpreter runs plain Python calls; the compiler rejects them.
        tl.store(x_ptr, _plain_helper(tl.load(x_ptr)))


def test_int_classes_keep_what_triton_specializes_on():
    assert _int_class(1) == 1
    assert _int_class(0) == _int_class(32) == 16
    assert _int_class(17) == _int_class(-5) == 17
    assert _int_class(1 << 31) == 1 << 40
    assert _int_class((1 << 40) + 3) == (1 << 40) + 1
    assert _int_class((1 << 63) + 16) == 1 << 63


@needs_interpreter
def test_a_launch_is_recorded_once_per_signature():
    x = torch.randn(41)
    out = torch.empty(41)
    with record_launches() as log:
        _apply_kernel[(1,)](x, out, 40, 2.0, FN=_double, BLOCK=64)
        _apply_kernel[(1,)](x, out, 40, 3.0, FN=_double, BLOCK=64)
        _apply_kernel[(1,)](x, out, 32, 2.0, FN=_double, BLOCK=64)
        _apply_kernel[(1,)](x[1:], out, 40, 2.0, FN=_double, BLOCK=64, num_warps=2)
    torch.testing.assert_close(out[:40], x[1:41] * 4)
    assert log.launches == 4
    assert len(log.signatures) == 3
    by_n = {(s.args[0][2], s.args[2][1]): s for s in log.signatures}
    sig = by_n[(True, 17)]
    assert sig.kernel.endswith(":_apply_kernel")
    assert Path(sig.file) == Path(__file__)
    assert sig.args == (
        ("tensor", "torch.float32", True),
        ("tensor", "torch.float32", True),
        ("int", 17),
        ("float",),
        ("jit", f"{_double.fn.__module__}:_double", sig.file),
        ("const", 64),
    )
    assert sig.options == ()
    assert by_n[(True, 16)].args[2] == ("int", 16)
    assert by_n[(False, 17)].options == (("num_warps", 2),)


@needs_interpreter
def test_tuple_arguments_are_recorded_field_by_field():
    x = torch.randn(20)
    out = torch.empty(20)
    with record_launches() as log:
        _tuple_kernel[(1,)](x, _Rows(out, 17), 2.0, _Choice(_double, 32))
    torch.testing.assert_close(out[:17], x[:17] * 4)
    (sig,) = log.signatures
    here = sig.file
    assert sig.args == (
        ("tensor", "torch.float32", True),
        (
            "tuple",
            f"{_Rows.__module__}:_Rows",
            here,
            (("tensor", "torch.float32", True), ("int", 17)),
        ),
        ("float",),
        (
            "tuple",
            f"{_Choice.__module__}:_Choice",
            here,
            (("jit", f"{_double.fn.__module__}:_double", here), ("const", 32)),
        ),
    )
    assert LaunchSignature.from_json(sig.to_json()) == sig


@needs_interpreter
def test_recording_stops_with_the_block_and_nests():
    x = torch.randn(8)
    with record_launches() as outer:
        with record_launches() as inner:
            _apply_kernel[(1,)](x, x, 8, 1.0, FN=_double, BLOCK=8)
        _apply_kernel[(1,)](x, x, 8, 1.0, FN=_double, BLOCK=16)
    _apply_kernel[(1,)](x, x, 8, 1.0, FN=_double, BLOCK=32)
    assert (inner.launches, outer.launches) == (1, 2)


@needs_interpreter
def test_keep_filters_what_is_recorded():
    x = torch.randn(8)
    with record_launches(keep=lambda s: s.args[-1] != ("const", 16)) as log:
        _apply_kernel[(1,)](x, x, 8, 1.0, FN=_double, BLOCK=8)
        _apply_kernel[(1,)](x, x, 8, 1.0, FN=_double, BLOCK=16)
    assert log.launches == 1
    assert [s.args[-1] for s in log.signatures] == [("const", 8)]


@needs_interpreter
def test_a_wrapped_kernel_records_its_inner_launch():
    x = torch.zeros(5)
    with record_launches() as log:
        _sized_kernel[(1,)](x, 5)
    assert torch.equal(x, torch.ones(5))
    (sig,) = log.signatures
    assert sig.kernel.endswith(":_sized_kernel")
    assert sig.args == (("tensor", "torch.float32", True), ("int", 17), ("const", 8))


def test_recording_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), record_launches():
        pass


def test_a_log_round_trips_and_merges(tmp_path):
    a = LaunchSignature("m:k", "/f.py", (("tensor", "torch.bfloat16", False), ("const", 4)))
    b = LaunchSignature("m:k", "/f.py", (("int", 16), ("const", None)), (("num_warps", 8),))
    path = tmp_path / "log.jsonl"
    LaunchLog({a}).save(path)
    LaunchLog({b, a}).save(path)
    assert sorted(load_signatures(path), key=str) == sorted([a, b], key=str)
    path.write_text(a.to_json() + "\n{not json\n")
    with pytest.raises(ValueError, match=r"log\.jsonl:2"):
        load_signatures(path)


def test_compiling_needs_the_interpreter_off(monkeypatch):
    from recstack.core.kernels.compile_check import compile_signatures

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without the interpreter"):
        compile_signatures([])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_check_compiles_good_kernels_and_reports_bad_ones(tmp_path):
    here = str(Path(__file__).resolve())
    module = _apply_kernel.fn.__module__
    ptr = ("tensor", "torch.float32", True)
    good = [
        LaunchSignature(
            f"{module}:_apply_kernel",
            here,
            (ptr, ptr, ("int", n), ("float",), ("jit", f"{module}:_double", here), ("const", 64)),
            (("num_warps", 2),),
        )
        for n in (16, 17)
    ]
    good.append(LaunchSignature(f"{module}:_sized_kernel", here, (ptr, ("int", 17), ("const", 8))))
    rows = ("tuple", f"{module}:_Rows", here, (ptr, ("int", 17)))
    choice = (
        "tuple",
        f"{module}:_Choice",
        here,
        (("jit", f"{module}:_double", here), ("const", 32)),
    )
    good.append(LaunchSignature(f"{module}:_tuple_kernel", here, (ptr, rows, ("float",), choice)))
    bad = LaunchSignature(f"{module}:_not_compilable", here, (ptr,))
    log = tmp_path / "log.jsonl"
    LaunchLog({*good, bad}).save(log)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "recstack.core.kernels.compile_check", str(log), "--jobs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "sm_90: 4 of 5 signatures" in run.stdout
    assert "128-bit ld" in run.stdout
    row = next(line for line in run.stdout.splitlines() if line.startswith(good[0].kernel))
    assert row.split()[1:3] == ["2", "0"]
    assert "FAILED" in run.stdout and "_not_compilable" in run.stdout
    assert "Unsupported function" in run.stdout
