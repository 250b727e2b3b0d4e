"""Sparse optimizer step: 1M unique rows of dim 64 in a 20M-row fp32 table (issue 6).

Ours: one fused Triton launch per step (``SparseAdam`` / ``SparseAdagrad`` over the table
as a ``PagedTensor``, given the step's coalesced ``SparseGrad``). Baselines in the same run:

* (a) ``torch.optim.SparseAdam`` / ``torch.optim.Adagrad`` on ``nn.Embedding(sparse=True)``
  with the same gradient as a sparse COO tensor;
* (b) plain PyTorch gather-math-scatter of the same update (``index_select``, the update
  on the gathered rows, ``index_copy_``).

MBU counts the bytes a fused step must move: the rows (8 B each), the gradient read, the
weight and the state read and written once.

    python benchmarks/sparse_optim.py
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time

from recstack.core import PagedTensor, SparseGrad
from recstack.sparse_optim import SparseAdagrad, SparseAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table-rows", type=int, default=20_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time the fused Adam step over kernel tile settings (FUSED_STEP_DEFAULTS)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    n_table, n, dim = args.table_rows, args.rows, args.dim
    report = Report(
        f"Sparse optimizer step, {n:,} rows x {dim} in a {n_table:,}-row fp32 table",
        device_name(device),
        copy_bandwidth(device),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    rows = torch.randperm(n_table, generator=gen, device=device)[:n].sort().values
    values = torch.randn(n, dim, generator=gen, device=device) * 1e-2
    grad = SparseGrad(rows, values, is_coalesced=True)
    coo = torch.sparse_coo_tensor(rows[None], values, (n_table, dim)).coalesce()
    w0 = torch.randn(n_table, dim, generator=gen, device=device)

    for name, ours_cls, torch_cls, slots in (
        ("Adam", SparseAdam, torch.optim.SparseAdam, 2),
        ("Adagrad", SparseAdagrad, torch.optim.Adagrad, 1),
    ):
        weight = w0.clone()
        opt = ours_cls([PagedTensor.wrap(weight, name="table")], lr=1e-3)
        ours = median_time(lambda o=opt: o.step(grads=grad), device, repeat=args.repeat)
        del opt

        emb = torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=True)
        t_opt = torch_cls(emb.parameters(), lr=1e-3)

        def torch_step(e=emb, o=t_opt) -> None:
            e.weight.grad = coo
            o.step()

        base_a = median_time(torch_step, device, repeat=args.repeat)
        del emb, t_opt

        plain_w = w0.clone()
        state = [torch.zeros_like(plain_w) for _ in range(slots)]
        step = [0]

        def plain_step(w=plain_w, s=state, kind=name, step=step) -> None:
            step[0] += 1
            g = values
            if kind == "Adam":
                m = s[0].index_select(0, rows).mul_(0.9).add_(g, alpha=0.1)
                v = s[1].index_select(0, rows).mul_(0.999).addcmul_(g, g, value=0.001)
                bc1, bc2 = 1 - 0.9 ** step[0], 1 - 0.999 ** step[0]
                upd = (m / bc1) / ((v / bc2).sqrt_().add_(1e-8))
                s[0].index_copy_(0, rows, m)
                s[1].index_copy_(0, rows, v)
            else:
                acc = s[0].index_select(0, rows).addcmul_(g, g)
                upd = g / acc.sqrt().add_(1e-10)
                s[0].index_copy_(0, rows, acc)
            w.index_copy_(0, rows, w.index_select(0, rows).sub_(upd, alpha=1e-3))

        base_b = median_time(plain_step, device, repeat=args.repeat)
        nbytes = n * 8 + n * dim * 4 + 2 * n * dim * 4 * (1 + slots)
        for base, label in ((base_a, f"torch.optim.{torch_cls.__name__}, sparse=True"),
                            (base_b, "gather-math-scatter")):  # fmt: skip
            report.add(Row(f"{name} step", ours, base, nbytes, baseline=label))
    if args.sweep:
        sweep(grad, w0, report.bandwidth, n * 8 + n * dim * 4 + 2 * n * dim * 4 * 3, args)
    print()
    print(report.markdown())
    report.save(args.json)


def sweep(grad: SparseGrad, w0: torch.Tensor, bandwidth: float, nbytes: int, args) -> None:
    """The fused Adam step's time for each tile setting, printed as a list."""
    from recstack.sparse_optim.kernels.fused_step import FUSED_STEP_DEFAULTS

    device = w0.device
    saved = dict(FUSED_STEP_DEFAULTS)
    opt = SparseAdam([PagedTensor.wrap(w0.clone(), name="table")], lr=1e-3)
    for block_r in (4, 8, 16, 32, 64):
        for num_warps in (1, 2, 4, 8):
            FUSED_STEP_DEFAULTS.update(block_r=block_r, max_block_d=64, num_warps=num_warps)
            t = median_time(lambda: opt.step(grads=grad), device, repeat=args.repeat)
            print(f"  block_r {block_r:>2}, warps {num_warps}: {t * 1e3:.3f} ms, "
                  f"MBU {nbytes / t / bandwidth:.0%}")  # fmt: skip
    FUSED_STEP_DEFAULTS.update(saved)


if __name__ == "__main__":
    main()
