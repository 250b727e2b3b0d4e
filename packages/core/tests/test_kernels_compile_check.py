"""Launch signatures compiled for sm_90 without a GPU: good kernels compile, bad ones are
reported, and compiling refuses to run under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import launch_log_testdata
import pytest
from launch_log_testdata import apply_kernel

from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.launch_log import LaunchLog, LaunchSignature


def test_compiling_needs_the_interpreter_off(monkeypatch):
    from recstack.core.kernels.compile_check import compile_signatures

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without the interpreter"):
        compile_signatures([])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_check_compiles_good_kernels_and_reports_bad_ones(tmp_path):
    here = str(Path(launch_log_testdata.__file__).resolve())
    module = apply_kernel.fn.__module__
    ptr = ("tensor", "torch.float32", True)
    good = [
        LaunchSignature(
            f"{module}:apply_kernel",
            here,
            (ptr, ptr, ("int", n), ("float",), ("jit", f"{module}:double", here), ("const", 64)),
            (("num_warps", 2),),
        )
        for n in (16, 17)
    ]
    good.append(LaunchSignature(f"{module}:sized_kernel", here, (ptr, ("int", 17), ("const", 8))))
    rows = ("tuple", f"{module}:Rows", here, (ptr, ("int", 17)))
    choice = (
        "tuple",
        f"{module}:Choice",
        here,
        (("jit", f"{module}:double", here), ("const", 32)),
    )
    good.append(LaunchSignature(f"{module}:tuple_kernel", here, (ptr, rows, ("float",), choice)))
    bad = LaunchSignature(f"{module}:not_compilable", here, (ptr,))
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
    assert "FAILED" in run.stdout and "not_compilable" in run.stdout
    assert "Unsupported function" in run.stdout
