"""The fused Triton step against the torch path, optimizer by optimizer, on fresh random
rows: one row, ragged row counts, dims past one column tile, paged and bf16 weights."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import PagedTensor, SparseGrad, kernels
from recstack.sparse_optim import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseSGD,
)

CONFIGS = [
    (SparseSGD, {"lr": 0.1}),
    (SparseSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (SparseAdagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (RowWiseAdagrad, {"lr": 0.1, "weight_decay": 0.02}),
    (SparseAdam, {"lr": 0.01, "weight_decay": 0.01}),
    (SparseAdam, {"lr": 0.01, "tf_compat": True, "step_count": "per_row"}),
    (SparseAdamW, {"lr": 0.01, "betas": (0.0, 0.99)}),
    (SparseFTRL, {"lr": 0.1, "l1": 0.2, "l2": 0.1}),
]


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_table(w: torch.Tensor) -> PagedTensor:
    t = PagedTensor(w.shape[1], w.dtype, w.device, page_rows=8, name="table")
    t.append_rows(w.shape[0])
    t.scatter_rows(torch.arange(w.shape[0], device=w.device), w)
    return t


def run(cls, hp, backend, w0, grads, device):
    table = make_table(w0.to(device))
    opt = cls([table], **hp)
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        for rows, values in grads:
            opt.step(grads=SparseGrad(rows.to(device), values.to(device), is_coalesced=True))
    state = {k: v.to_dense().cpu() for k, v in opt.state[table].items() if k != "step"}
    return table.to_dense().cpu(), state, launches


@pytest.mark.parametrize("cls, hp", CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("n_rows, dim", [(1, 1), (17, 5), (40, 130)])
def test_fused_step_matches_torch_path(device, cls, hp, n_rows, dim) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(seed(cls.__name__, hp, n_rows, dim))
    table_rows = n_rows + 7
    w0 = torch.randn(table_rows, dim, generator=gen)
    grads = []
    for _ in range(3):
        rows = torch.randperm(table_rows, generator=gen)[:n_rows].sort().values
        grads.append((rows, torch.randn(n_rows, dim, generator=gen)))
    grads.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim)))  # an empty step
    w_ref, s_ref, _ = run(cls, hp, "torch", w0, grads, device)
    w_got, s_got, launches = run(cls, hp, "triton", w0, grads, device)
    torch.testing.assert_close(w_got, w_ref, rtol=1e-5, atol=1e-6)
    assert s_got.keys() == s_ref.keys()
    for k in s_ref:
        torch.testing.assert_close(s_got[k], s_ref[k], rtol=1e-5, atol=1e-6)
    assert launches["row_update"] == 3  # one per non-empty step


def test_fused_step_bf16_weights(device) -> None:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(20, 9, generator=gen).to(torch.bfloat16)
    grads = [(torch.arange(0, 20, 2), torch.randn(10, 9, generator=gen)) for _ in range(2)]
    w_ref, _, _ = run(SparseAdam, {"lr": 0.01}, "torch", w0, grads, device)
    w_got, _, _ = run(SparseAdam, {"lr": 0.01}, "triton", w0, grads, device)
    assert w_got.dtype == torch.bfloat16
    # fp32 math, one round-to-nearest-even on the way back, on both paths.
    assert (w_got.float() - w_ref.float()).abs().max() <= 2**-7 * w_ref.float().abs().max()


@pytest.mark.parametrize("cls, hp", CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_step_over_many_tables_is_one_launch_pair_per_class(device, cls, hp) -> None:
    # Three fp32 tables of width 6 (one paged, one a plain tensor, one stepped less often,
    # so its Adam step count differs), one bf16 table: two classes.
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(seed("many", cls.__name__, hp))
    w0 = [torch.randn(30, 6, generator=gen) for _ in range(3)]
    w0.append(torch.randn(30, 6, generator=gen).to(torch.bfloat16))
    steps = []
    for i in range(3):
        step = []
        for k in range(4):
            n = 0 if (k == 2 and i == 1) else int(torch.randint(1, 30, (1,), generator=gen))
            rows = torch.randperm(30, generator=gen)[:n].sort().values
            step.append((rows, torch.randn(n, 6, generator=gen)))
        steps.append(step)

    def train(backend: str):
        params = [make_table(w0[0].to(device)), w0[1].clone().to(device),
                  make_table(w0[2].to(device)), make_table(w0[3].to(device))]  # fmt: skip
        opt = cls(params, **hp)
        with kernels.use_backend(backend), kernels.count_launches() as launches:
            for step in steps:
                grads = {p: SparseGrad(r.to(device), v.to(device), is_coalesced=True)
                         for p, (r, v) in zip(params, step, strict=True)}  # fmt: skip
                opt.step(grads=grads)
        dense = [p.to_dense() if isinstance(p, PagedTensor) else p for p in params]
        state = [v.to_dense() for p in params for k, v in opt.state[p].items() if k != "step"]
        return [t.float().cpu() for t in dense + state], launches

    want, _ = train("torch")
    got, launches = train("triton")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2 if a.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if a.dtype == torch.bfloat16 else 1e-6)  # fmt: skip
    assert launches["row_update_many"] == launches["check_rows_many"] == 3 * 2
    assert launches["row_update"] == launches["check_rows"] == 0
