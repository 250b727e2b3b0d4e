"""Launch signatures recorded under the interpreter: once per signature, field by field,
nested and filtered, and a log that round-trips through its file."""

from __future__ import annotations

from pathlib import Path

import launch_log_testdata
import pytest
import torch
from launch_log_testdata import Choice, Rows, apply_kernel, double, sized_kernel, tuple_kernel

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
        apply_kernel[(1,)](x, out, 40, 2.0, FN=double, BLOCK=64)
        apply_kernel[(1,)](x, out, 40, 3.0, FN=double, BLOCK=64)
        apply_kernel[(1,)](x, out, 32, 2.0, FN=double, BLOCK=64)
        apply_kernel[(1,)](x[1:], out, 40, 2.0, FN=double, BLOCK=64, num_warps=2)
    torch.testing.assert_close(out[:40], x[1:41] * 4)
    assert log.launches == 4
    assert len(log.signatures) == 3
    by_n = {(s.args[0][2], s.args[2][1]): s for s in log.signatures}
    sig = by_n[(True, 17)]
    assert sig.kernel.endswith(":apply_kernel")
    assert Path(sig.file) == Path(launch_log_testdata.__file__)
    assert sig.args == (
        ("tensor", "torch.float32", True),
        ("tensor", "torch.float32", True),
        ("int", 17),
        ("float",),
        ("jit", f"{double.fn.__module__}:double", sig.file),
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
        tuple_kernel[(1,)](x, Rows(out, 17), 2.0, Choice(double, 32))
    torch.testing.assert_close(out[:17], x[:17] * 4)
    (sig,) = log.signatures
    here = sig.file
    assert sig.args == (
        ("tensor", "torch.float32", True),
        (
            "tuple",
            f"{Rows.__module__}:Rows",
            here,
            (("tensor", "torch.float32", True), ("int", 17)),
        ),
        ("float",),
        (
            "tuple",
            f"{Choice.__module__}:Choice",
            here,
            (("jit", f"{double.fn.__module__}:double", here), ("const", 32)),
        ),
    )
    assert LaunchSignature.from_json(sig.to_json()) == sig


@needs_interpreter
def test_recording_stops_with_the_block_and_nests():
    x = torch.randn(8)
    with record_launches() as outer:
        with record_launches() as inner:
            apply_kernel[(1,)](x, x, 8, 1.0, FN=double, BLOCK=8)
        apply_kernel[(1,)](x, x, 8, 1.0, FN=double, BLOCK=16)
    apply_kernel[(1,)](x, x, 8, 1.0, FN=double, BLOCK=32)
    assert (inner.launches, outer.launches) == (1, 2)


@needs_interpreter
def test_keep_filters_what_is_recorded():
    x = torch.randn(8)
    with record_launches(keep=lambda s: s.args[-1] != ("const", 16)) as log:
        apply_kernel[(1,)](x, x, 8, 1.0, FN=double, BLOCK=8)
        apply_kernel[(1,)](x, x, 8, 1.0, FN=double, BLOCK=16)
    assert log.launches == 1
    assert [s.args[-1] for s in log.signatures] == [("const", 8)]


@needs_interpreter
def test_a_wrapped_kernel_records_its_inner_launch():
    x = torch.zeros(5)
    with record_launches() as log:
        sized_kernel[(1,)](x, 5)
    assert torch.equal(x, torch.ones(5))
    (sig,) = log.signatures
    assert sig.kernel.endswith(":sized_kernel")
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
