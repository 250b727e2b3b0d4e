"""DIN target attention: the fused jagged kernels against the unfused torch module on
padded input, the way DIN is written today.

Workload: ``--batch`` rows, each with a behaviour history of length uniform in
``[1, L]`` for each ``L`` of ``--hist``; embedding width ``D`` from ``--dim``; scoring MLP
``--hidden`` (DIN's ``(80, 40)``, sigmoid); bf16 and/or fp32 (``--dtype``). The histories'
rows come from a ``--table-rows`` x ``D`` table. Rows, each ours against the baseline in
the same run:

* **forward, values**: ``target_attention`` on the jagged ``[N, D]`` rows against
  ``models.din.TargetAttention`` on the padded ``[B, L, D]`` rows and their mask;
* **forward + backward, values**: the same with the gradients of the query, the rows and
  the MLP (``loss = (out * g).sum()``);
* **forward + backward, table + row_ids**: ours gathers the rows from the table inside the
  kernels (the lookup fused: no ``[N, D]`` copy) and hands the row gradients to a sink;
  the baseline gathers the padded ``[B, L, D]`` rows (``F.embedding``) and runs the module;
* **forward / forward + backward, padded in place**: DIN's call, ours
  ``FusedTargetAttention.forward_padded(query, keys, lengths)`` reading the padded
  ``[B, L, D]`` rows in place (spans, no packing, no host sync), the baseline the module on
  the same rows and their mask.

bf16 runs the baseline under ``torch.autocast`` (its MLP holds fp32 weights, like ours).
Reported per row: time (CUDA events, median), the peak memory one call adds (the rise of
``torch.cuda.max_memory_allocated`` above what was allocated before it), the memory ratio,
and MBU = bytes that must move / time / device-to-device copy bandwidth of the run. The
bytes: the behaviour rows read (plus their int64 ids when gathered), the query read and the
output written; the backward reads the rows and ``grad_out`` again and writes the row and
query gradients (in padded mode the keys' gradient is the whole ``[B, L, D]``, zero on the
padding). Both designs recompute nothing beyond that in principle; the scoring MLP
makes the op compute-heavy, so MBU stays well below 100%.

    python benchmarks/target_attention.py                      # GPU: B 4096, L 100 and 1000
    python benchmarks/target_attention.py --dtype bf16 --hist 1000 --dim 64
    python benchmarks/target_attention.py --device cpu         # smoke: tiny sizes
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from _harness import copy_bandwidth, device_name, median_time, synchronize
from _results import add_json_option, measurement, new_result, save

from recstack.pipelines.models.din import TargetAttention
from recstack.pipelines.ops.target_attention import FusedTargetAttention

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Tiny defaults of a CPU smoke run (the GPU sizes would take hours there).
_CPU_SIZES = {"batch": 32, "hist": "12,40", "dim": "16", "table_rows": 1000}
_GPU_SIZES = {"batch": 4096, "hist": "100,1000", "dim": "32,64", "table_rows": 1_000_000}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(fn, device: torch.device) -> int | None:
    """How far one call of ``fn`` raises allocated memory above where it started."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def measure(fn, device: torch.device, repeat: int) -> tuple[float, int | None] | None:
    """``(median seconds, peak bytes)`` of ``fn``, or ``None`` when it runs out of memory."""
    try:
        peak = peak_bytes(fn, device)
        seconds = median_time(fn, device, warmup=3, repeat=repeat)
    except (torch.OutOfMemoryError, MemoryError):
        _free(device)
        return None
    _free(device)
    return seconds, peak


class Workload:
    """One configuration's inputs: jagged and padded views of the same histories."""

    def __init__(self, batch, hist, dim, dtype, table_rows, device, gen) -> None:
        self.batch, self.hist, self.dim, self.dtype = batch, hist, dim, dtype
        lengths = torch.randint(1, hist + 1, (batch,), generator=gen, device=device)
        self.lengths = lengths
        self.offsets = torch.zeros(batch + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=self.offsets[1:])
        self.n = int(self.offsets[-1])
        self.table = torch.randn(table_rows, dim, generator=gen, device=device).to(dtype)
        self.row_ids = torch.randint(0, table_rows, (self.n,), generator=gen, device=device)
        self.values = self.table.index_select(0, self.row_ids)
        self.mask = torch.arange(hist, device=device)[None, :] < lengths[:, None]
        # The padded ids, as DIN's embedding lookup pads a history (0 on padding).
        self.padded_ids = torch.zeros(batch, hist, dtype=torch.int64, device=device)
        self.padded_ids[self.mask] = self.row_ids
        self.keys = F.embedding(self.padded_ids, self.table)
        self.query = torch.randn(batch, dim, generator=gen, device=device).to(dtype)
        self.grad = torch.randn(batch, dim, generator=gen, device=device).to(dtype)

    def nbytes(self, backward: bool, gather: bool, padded: bool = False) -> int:
        """Bytes that must move (see the module docs)."""
        e = self.table.element_size()
        rows = self.n * self.dim * e + (self.n * 8 if gather else 0)
        small = 2 * self.batch * self.dim * e + (self.batch + 1) * 8
        if not backward:
            return rows + small
        written = (self.batch * self.hist if padded else self.n) * self.dim * e
        return 2 * rows + written + 2 * small


def run_config(work: Workload, hidden, device, repeat) -> list[tuple]:
    """The five rows of one workload: ``(name, ours, baseline, bytes, error)``."""
    unfused = TargetAttention(work.dim, hidden, "sigmoid", False).to(device)
    fused = FusedTargetAttention(work.dim, hidden, "sigmoid", False).to(device)
    fused.load_state_dict(unfused.state_dict())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=work.dtype == torch.bfloat16)  # fmt: skip

    def baseline(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        with autocast:
            return unfused(query, keys, work.mask)

    def ours_forward() -> None:
        with torch.no_grad():
            fused(work.query, work.offsets, work.values, check_bounds=False)

    def base_forward() -> None:
        with torch.no_grad():
            baseline(work.keys, work.query)

    def ours_backward() -> None:
        query = work.query.detach().requires_grad_()
        values = work.values.detach().requires_grad_()
        fused(query, work.offsets, values, check_bounds=False).backward(work.grad)

    def base_backward() -> None:
        query = work.query.detach().requires_grad_()
        keys = work.keys.detach().requires_grad_()
        baseline(keys, query).backward(work.grad.float())

    def ours_padded_forward() -> None:
        with torch.no_grad():
            fused.forward_padded(work.query, work.keys, work.lengths)

    def ours_padded_backward() -> None:
        query = work.query.detach().requires_grad_()
        keys = work.keys.detach().requires_grad_()
        fused.forward_padded(query, keys, work.lengths).backward(work.grad)

    def sink(row_ids: torch.Tensor, d_rows: torch.Tensor) -> None:
        pass  # the embedding engine's per-row reduction is not part of this op

    def ours_gather() -> None:
        query = work.query.detach().requires_grad_()
        out = fused(query, work.offsets, table=work.table, row_ids=work.row_ids,
                    grad_sink=sink, check_bounds=False)  # fmt: skip
        out.backward(work.grad)

    def base_gather() -> None:
        query = work.query.detach().requires_grad_()
        keys = F.embedding(work.padded_ids, work.table).requires_grad_()
        baseline(keys, query).backward(work.grad.float())

    with torch.no_grad():
        ours_out = fused(work.query, work.offsets, work.values).float()
        base_out = baseline(work.keys, work.query).float()
    error = float((ours_out - base_out).abs().max() / base_out.abs().max().clamp(min=1e-6))
    print(f"    max |ours - baseline| / max |baseline| = {error:.2e}", flush=True)
    rows = []
    for name, ours, base, backward, gather, padded in (
        ("forward, values", ours_forward, base_forward, False, False, False),
        ("forward + backward, values", ours_backward, base_backward, True, False, False),
        ("forward + backward, table + row_ids", ours_gather, base_gather, True, True, False),
        ("forward, padded in place", ours_padded_forward, base_forward, False, False, True),
        ("forward + backward, padded in place", ours_padded_backward, base_backward, True,
         False, True),
    ):  # fmt: skip
        for p in (*unfused.parameters(), *fused.parameters()):
            p.grad = None
        rows.append((name, measure(ours, device, repeat), measure(base, device, repeat),
                     work.nbytes(backward, gather, padded), error))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="rows (GPU 4096, CPU 32)")
    parser.add_argument("--hist", help="comma-separated max history lengths (GPU 100,1000)")
    parser.add_argument("--dim", help="comma-separated embedding widths (GPU 32,64)")
    parser.add_argument("--hidden", default="80,40", help="the scoring MLP's hidden sizes")
    parser.add_argument("--dtype", default="bf16,fp32", help="bf16, fp32 or both")
    parser.add_argument("--table-rows", type=int, help="rows of the embedding table")
    parser.add_argument("--repeat", type=int, default=10)
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = _GPU_SIZES if device.type == "cuda" else _CPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    dtypes = [_DTYPES[d.strip()] for d in args.dtype.split(",")]
    bandwidth = copy_bandwidth(device)
    card = device_name(device)
    print(f"{card}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    measurements, table = [], []
    for hist in (int(h) for h in str(args.hist).split(",")):
        for dim in (int(d) for d in str(args.dim).split(",")):
            for dtype in dtypes:
                label = f"B {args.batch}, L <= {hist}, D {dim}, {str(dtype)[6:]}"
                print(f"  {label}", flush=True)
                work = Workload(args.batch, hist, dim, dtype, args.table_rows, device, gen)
                for name, ours, base, nbytes, error in run_config(
                    work, hidden, device, args.repeat
                ):
                    row_name = f"{name}: {label}"
                    if ours is None:
                        measurements.append(measurement(row_name, float("nan"), notes="ours: OOM"))
                        table.append((row_name, None, base, None))
                        continue
                    ours_s, ours_peak = ours
                    base_s, base_peak = base if base is not None else (None, None)
                    extra = {
                        "peak_memory_bytes": ours_peak,
                        "baseline_peak_memory_bytes": base_peak,
                        "memory_ratio": base_peak / ours_peak if base_peak and ours_peak else None,
                        "behaviours": work.n,
                        "relative_error_vs_baseline": error,
                    }
                    measurements.append(measurement(
                        row_name, ours_s, base_s, nbytes=nbytes, bandwidth=bandwidth,
                        baseline="TargetAttention on padded [B, L, D]",
                        notes="baseline: OOM" if base is None else "", extra=extra,
                    ))  # fmt: skip
                    table.append((row_name, ours, base, nbytes))
                    base_text = "OOM" if base_s is None else f"{base_s * 1e3:.3f} ms"
                    print(f"    {name}: ours {ours_s * 1e3:.3f} ms, baseline {base_text}",
                          flush=True)  # fmt: skip
                del work
                _free(device)
    print()
    print(markdown(card, bandwidth, hidden, table))
    result = new_result(
        "target_attention", f"DIN target attention, hidden {hidden}", device, args,
        copy_bandwidth=bandwidth, rows=measurements,
    )  # fmt: skip
    save(result, args.json)


def markdown(card: str, bandwidth: float, hidden, table) -> str:
    def gib(b):
        return "" if b is None else f"{b / 2**30:.3f}"

    lines = [
        f"**DIN target attention** (hidden {hidden}, sigmoid) on {card}; copy bandwidth "
        f"{bandwidth / 1e9:,.0f} GB/s",
        "",
        "| workload | ours (ms) | baseline (ms) | speedup | peak ours (GiB) "
        "| peak baseline (GiB) | MBU ours | MBU baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ours, base, nbytes in table:
        if ours is None:
            lines.append(f"| {name} | OOM | | | | | | |")
            continue
        ours_s, ours_peak = ours
        if base is None:
            lines.append(f"| {name} | {ours_s * 1e3:.3f} | OOM | | {gib(ours_peak)} | | "
                         f"{nbytes / ours_s / bandwidth:.1%} | |")  # fmt: skip
            continue
        base_s, base_peak = base
        lines.append(
            f"| {name} | {ours_s * 1e3:.3f} | {base_s * 1e3:.3f} | {base_s / ours_s:.2f}x "
            f"| {gib(ours_peak)} | {gib(base_peak)} | {nbytes / ours_s / bandwidth:.1%} "
            f"| {nbytes / base_s / bandwidth:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
