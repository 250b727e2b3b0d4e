"""The fused step's kernels keep their 128-bit row loads when compiled for sm_90.

A step is bound by memory, and its rows are read whole: with 16-byte loads it runs at
about 80% of the copy bandwidth on an H200, with 4-byte ones at about half of that. The
loads are wide only when the compiler can prove the row pointers aligned, which rests on
hints one compiler version kept and another dropped (an H200 run saw the step 0.3 ms
slower from that alone). Recorded under the interpreter, compiled in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad
from recstack.core.kernels import HAS_TRITON, interpret_mode
from recstack.core.kernels.launch_log import record_launches
from recstack.sparse_optim import SparseAdagrad, SparseAdam

UPDATE_KERNELS = ("row_update:_row_update_kernel", "row_update_many:_update_many_kernel")

_COMPILE = """
import json, sys
from recstack.core.kernels.compile_check import compile_signatures
from recstack.core.kernels.launch_log import load_signatures
out = {}
for r in compile_signatures(load_signatures(sys.argv[1])):
    out.setdefault(r.signature.kernel, []).append([r.error, r.global_loads, r.wide_loads])
print(json.dumps(out))
"""


@pytest.mark.skipif(not (HAS_TRITON and interpret_mode()), reason="records interpreted launches")
def test_update_kernels_load_rows_128_bits_at_a_time(tmp_path):
    gen = torch.Generator().manual_seed(7)

    def table(name: str) -> PagedTensor:
        return PagedTensor.wrap(torch.randn(512, 64, generator=gen), name=name)

    def grad() -> SparseGrad:
        rows = torch.randperm(512, generator=gen)[:64].sort().values
        return SparseGrad(rows, torch.randn(64, 64, generator=gen), is_coalesced=True)

    with record_launches(keep=lambda sig: sig.kernel.endswith(UPDATE_KERNELS)) as log:
        for cls in (SparseAdam, SparseAdagrad):
            one = table("one")
            cls([one], lr=1e-2).step(grads={one: grad()})
            a, b = table("a"), table("b")
            cls([a, b], lr=1e-2).step(grads={a: grad(), b: grad()})
    assert {s.kernel.rsplit(".", 1)[-1] for s in log.signatures} == set(UPDATE_KERNELS)
    path = tmp_path / "launches.jsonl"
    log.save(path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kernel, variants in results.items():
        for error, loads, wide in variants:
            assert error is None, f"{kernel}: {error}"
            # The gradient, weight and state rows of every slot: at least three wide loads.
            assert wide >= 3, f"{kernel}: {wide} of {loads} global loads are 128-bit"
