"""Sparse optimizer step: 1M unique rows of dim 64 in a 20M-row fp32 table.

Four workloads, each against plain PyTorch in the same run:

1. **The step from a coalesced gradient.** Ours: ``SparseAdam`` / ``SparseAdagrad`` over the
   table as a ``PagedTensor`` given the step's ``SparseGrad`` (one check launch, one update
   launch, one host read at the end). Baselines: (a) ``torch.optim.SparseAdam`` /
   ``torch.optim.Adagrad`` on ``nn.Embedding(sparse=True)`` with the same gradient as a
   coalesced COO tensor; (b) gather-math-scatter (``index_select``, the update, ``index_copy_``).
   MBU counts the bytes the step must move: the rows (8 B each), the gradient read, the
   weight and the state read and written once. Timed twice: as is (each step reads its
   checks at its end) and with ``deferred_checks=True`` (read at the next step).
2. **The step from an ``nn.Embedding(sparse=True)`` backward**, as a plain-PyTorch training
   step (the DIN anchor) hands it over: one gradient row per id looked up (``--ids`` ids
   over the same 1M rows), uncoalesced. Both optimizers coalesce it first; MBU counts the
   gradient rows read once plus the update's bytes.
3. **Fused in backward.** An ``EmbeddingCollection`` fixed-size table (row = id) of the same
   shape, one sum-pooled feature (``--ids`` ids in bags of 64): forward + backward + the
   Adam step (backward leaves a ``SparseGrad``, ``opt.step`` applies it) against forward +
   backward with ``ec.fuse_optimizer(opt)`` (the backward applies the step), in both fused
   forms (row sums then the update; ``one_pass=True``: one kernel), and the first form
   again with ``deferred_checks=True`` against the unfused step with it. The forward alone
   is timed too, and the rows "backward + step" subtract it.
4. **Many tables.** An Adam step over ``--tables`` tables (``--rows-each`` coalesced rows
   of ``--table-rows-each``): one optimizer over all of them (one check and one update
   launch for the step, core's ``check_and_apply_row_updates``) and one optimizer per
   table (a launch pair per table), against ``torch.optim.SparseAdam`` over the tables.

    python benchmarks/sparse_optim.py [--sweep] [--profile] [--skip 1,2]
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time, profile_table
from _results import add_json_option, report_result, save

from recstack.core import KeyedJaggedTensor, PagedTensor, SparseGrad
from recstack.sparse_optim import SparseAdagrad, SparseAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table-rows", type=int, default=20_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=4_194_304, help="ids of workloads 2 and 3")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    add_json_option(parser)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time the Adam update launch over tile settings (ROW_UPDATE_DEFAULTS)",
    )
    parser.add_argument("--skip", default="", help="comma list of workloads to skip: 1,2,3,4")
    parser.add_argument("--tables", type=int, default=26, help="tables of workload 4")
    parser.add_argument("--rows-each", type=int, default=40_000, help="workload 4: rows a table")
    parser.add_argument(
        "--table-rows-each", type=int, default=1_000_000, help="workload 4: each table's size"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="workload 3: also print each variant's wall time per step and its top ops "
        "and kernels under torch.profiler",
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
    w0 = torch.randn(n_table, dim, generator=gen, device=device)
    skip = set(args.skip.split(","))
    if "1" not in skip:
        coalesced_step(report, rows, w0, gen, args)
    if "2" not in skip:
        embedding_backward_step(report, rows, w0, gen, args)
    if "3" not in skip:
        fused_backward(report, rows, gen, args)
    if "4" not in skip:
        del w0, rows
        many_tables(report, gen, args)
    print()
    print(report.markdown())
    save(report_result(report, "sparse_optim", device, args), args.json)


def update_bytes(n: int, dim: int, slots: int) -> int:
    """Rows read, gradient read once, weight and ``slots`` state rows read and written."""
    return n * 8 + n * dim * 4 + 2 * n * dim * 4 * (1 + slots)


def coalesced_step(report: Report, rows, w0, gen, args) -> None:
    device, (n_table, dim), n = w0.device, w0.shape, rows.numel()
    values = torch.randn(n, dim, generator=gen, device=device) * 1e-2
    grad = SparseGrad(rows, values, is_coalesced=True)
    coo = torch.sparse_coo_tensor(rows[None], values, (n_table, dim)).coalesce()
    for name, ours_cls, torch_cls, slots in (
        ("Adam", SparseAdam, torch.optim.SparseAdam, 2),
        ("Adagrad", SparseAdagrad, torch.optim.Adagrad, 1),
    ):
        weight = w0.clone()
        opt = ours_cls([PagedTensor.wrap(weight, name="table")], lr=1e-3)
        ours = median_time(lambda o=opt: o.step(grads=grad), device, repeat=args.repeat)
        if args.sweep and name == "Adam":
            sweep(opt, grad, report.bandwidth, update_bytes(n, dim, 2), args)
        del opt
        # The same step, its checks read at the next step instead of waiting at its end.
        opt = ours_cls([PagedTensor.wrap(weight, name="table")], lr=1e-3, deferred_checks=True)
        deferred = median_time(lambda o=opt: o.step(grads=grad), device, repeat=args.repeat)
        opt.flush_checks()
        del opt, weight

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
        del plain_w, state
        nbytes = update_bytes(n, dim, slots)
        for base, label in ((base_a, f"torch.optim.{torch_cls.__name__}, sparse=True"),
                            (base_b, "gather-math-scatter")):  # fmt: skip
            report.add(Row(f"{name} step, coalesced gradient", ours, base, nbytes, baseline=label))
        report.add(
            Row(f"{name} step, coalesced gradient, deferred_checks=True", deferred, base_a,
                nbytes, baseline=f"torch.optim.{torch_cls.__name__}, sparse=True")
        )  # fmt: skip


def embedding_backward_step(report: Report, rows, w0, gen, args) -> None:
    """Both optimizers given the uncoalesced gradient an nn.Embedding backward leaves."""
    device, dim, n = w0.device, w0.shape[1], rows.numel()
    extra = torch.randint(0, n, (args.ids - n,), generator=gen, device=device)
    ids = rows[torch.cat([torch.arange(n, device=device), extra])]
    ids = ids[torch.randperm(ids.numel(), generator=gen, device=device)]
    emb = torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=True)
    emb(ids).mul(1e-2).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and not grad.is_coalesced()
    ours_opt = SparseAdam([emb.weight], lr=1e-3)

    def ours_step(o=ours_opt) -> None:
        emb.weight.grad = grad
        o.step()

    ours = median_time(ours_step, device, repeat=args.repeat)
    del ours_opt
    t_opt = torch.optim.SparseAdam([emb.weight], lr=1e-3)

    def torch_step() -> None:
        emb.weight.grad = grad
        t_opt.step()

    base = median_time(torch_step, device, repeat=args.repeat)
    nbytes = args.ids * (8 + dim * 4) + update_bytes(n, dim, 2)
    report.add(
        Row(
            f"Adam step, nn.Embedding(sparse=True) gradient ({args.ids:,} ids)",
            ours,
            base,
            nbytes,
            baseline="torch.optim.SparseAdam",
        )
    )


def fused_backward(report: Report, rows, gen, args) -> None:
    """Forward + backward + step, unfused and fused, through an EmbeddingCollection."""
    from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig

    device, n_table, dim, n = rows.device, args.table_rows, args.dim, rows.numel()
    bag = 64
    batch = args.ids // bag
    extra = torch.randint(0, n, (batch * bag - n,), generator=gen, device=device)
    ids = rows[torch.cat([torch.arange(n, device=device), extra])]
    ids = ids[torch.randperm(ids.numel(), generator=gen, device=device)]
    kjt = KeyedJaggedTensor(
        ["f"], ids, lengths=torch.full((batch,), bag, dtype=torch.int64, device=device)
    )
    grad_out = torch.randn(batch, dim, generator=gen, device=device) * 1e-2

    def collection(deferred: bool) -> tuple[EmbeddingCollection, PagedTensor, SparseAdam]:
        ec = EmbeddingCollection(
            [TableConfig("t", dim=dim, fixed_size=n_table)], [FeatureConfig("f", "t")],
            device=device,
        )  # fmt: skip
        values = ec.physical_tables["t"].values
        return ec, values, SparseAdam([values], lr=1e-3, deferred_checks=deferred)

    label = f"{args.ids:,} ids in bags of {bag}, {n:,} rows"
    # The backward's reads (per id: label, position, bag index, gradient row) + the update.
    nbytes = args.ids * (4 + 8 + 8 + dim * 4) + update_bytes(n, dim, 2) - n * dim * 4
    t_fwd = 0.0
    t_unfused = {}
    for deferred in (False, True):
        ec, values, opt = collection(deferred)

        def forward(ec=ec) -> None:
            ec(kjt)

        def unfused(ec=ec, opt=opt, values=values) -> None:
            ec(kjt)["f"].backward(grad_out)
            opt.step(grads={values: ec.sparse_grads()["t"]})

        if not deferred:
            t_fwd = median_time(forward, device, repeat=args.repeat)
            print(f"  forward alone: {t_fwd * 1e3:.3f} ms", flush=True)
        t_unfused[deferred] = median_time(unfused, device, repeat=args.repeat)
        if args.profile:
            _profile(f"unfused, deferred_checks={deferred}", unfused, device, args)
        opt.flush_checks()
        del ec, values, opt
    # (form, one_pass, deferred_checks); each against the unfused step with the same checks.
    forms = [("sums, then update", False, False), ("one kernel", True, False),
             ("sums, then update; deferred_checks", False, True)]  # fmt: skip
    for form, one_pass, deferred in forms:
        ec, values, opt = collection(deferred)
        ec.fuse_optimizer(opt, one_pass=one_pass)

        def fused(ec=ec) -> None:
            ec(kjt)["f"].backward(grad_out)

        t_fused = median_time(fused, device, repeat=args.repeat)
        if args.profile:
            _profile(f"fused ({form})", fused, device, args)
        opt.flush_checks()
        del ec, values, opt
        base = "unfused: backward, then opt.step" + (" (deferred_checks)" if deferred else "")
        report.add(
            Row(f"forward + backward + Adam step, {label}; fused ({form})", t_fused,
                t_unfused[deferred], 0, baseline=base)
        )  # fmt: skip
        report.add(
            Row(f"backward + Adam step (forward subtracted), {label}; fused ({form})",
                t_fused - t_fwd, t_unfused[deferred] - t_fwd, nbytes, baseline=base)
        )  # fmt: skip


def many_tables(report: Report, gen, args) -> None:
    """One Adam step over ``--tables`` tables (coalesced gradients): one optimizer over all
    of them (a check and an update launch for the step) against one optimizer per table (a
    check and an update launch each), and torch.optim.SparseAdam over the tables."""
    device, dim = torch.device(args.device), args.dim
    n_tab, rows_each, t_rows = args.tables, args.rows_each, args.table_rows_each
    w0 = [torch.randn(t_rows, dim, generator=gen, device=device) for _ in range(n_tab)]
    grads = []
    for _ in range(n_tab):
        rows = torch.randperm(t_rows, generator=gen, device=device)[:rows_each].sort().values
        values = torch.randn(rows_each, dim, generator=gen, device=device) * 1e-2
        grads.append(SparseGrad(rows, values, is_coalesced=True))
    tables = [PagedTensor.wrap(w.clone(), name=f"t{i}") for i, w in enumerate(w0)]
    together = SparseAdam(tables, lr=1e-3)
    step = dict(zip(tables, grads, strict=True))
    t_together = median_time(lambda o=together: o.step(grads=step), device, repeat=args.repeat)
    apart = [SparseAdam([t], lr=1e-3) for t in tables]

    def each(opts=apart) -> None:
        for opt, g in zip(opts, grads, strict=True):
            opt.step(grads=g)

    t_apart = median_time(each, device, repeat=args.repeat)
    del together, apart, tables
    embs = [torch.nn.Embedding.from_pretrained(w, freeze=False, sparse=True) for w in w0]
    coos = [torch.sparse_coo_tensor(g.rows[None], g.values, (t_rows, dim)).coalesce()
            for g in grads]  # fmt: skip
    t_opt = torch.optim.SparseAdam([e.weight for e in embs], lr=1e-3)

    def torch_step() -> None:
        for e, c in zip(embs, coos, strict=True):
            e.weight.grad = c
        t_opt.step()

    base = median_time(torch_step, device, repeat=args.repeat)
    nbytes = n_tab * update_bytes(rows_each, dim, 2)
    label = f"Adam step over {n_tab} tables, {rows_each:,} rows x {dim} of {t_rows:,} each"
    report.add(Row(f"{label}: one optimizer (a launch pair per step)", t_together, base, nbytes,
                   baseline="torch.optim.SparseAdam"))  # fmt: skip
    report.add(Row(f"{label}: one optimizer per table (a launch pair per table)", t_apart, base,
                   nbytes, baseline="torch.optim.SparseAdam"))  # fmt: skip


def _profile(name: str, fn, device: torch.device, args) -> None:
    """Print ``fn``'s wall time per call (device synced after each) and its profile."""
    wall = median_time(fn, device, repeat=args.repeat, wall=True)
    print(f"  {name}: {wall * 1e3:.3f} ms a call by the wall clock", flush=True)
    print(profile_table(fn, device), flush=True)


def sweep(opt: SparseAdam, grad: SparseGrad, bandwidth: float, nbytes: int, args) -> None:
    """The Adam update launch's time for each tile setting, printed as a list."""
    from recstack.core.kernels.row_update import apply_row_update

    device = grad.device
    p = opt.param_groups[0]["params"][0]
    update = opt._begin(opt.param_groups[0], p)
    table = opt._table(p)
    for max_block_d in (32, 64, 128):
        for tile_elems in (128, 256, 512, 1024, 2048, 4096):
            for num_warps in (1, 2, 4, 8):
                if tile_elems < 32 * num_warps:
                    continue
                tile = {"tile_elems": tile_elems, "max_block_d": max_block_d,
                        "num_warps": num_warps}  # fmt: skip
                t = median_time(
                    lambda tile=tile: apply_row_update(
                        update, table, grad.rows, grad.values, **tile
                    ),  # fmt: skip
                    device,
                    repeat=args.repeat,
                )
                print(f"  block_d <= {max_block_d:>3}, tile {tile_elems:>4}, warps {num_warps}: "
                      f"{t * 1e3:.3f} ms, MBU {nbytes / t / bandwidth:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
