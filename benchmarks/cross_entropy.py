"""Softmax cross-entropy over a million items: ``linear_cross_entropy`` against
``F.cross_entropy(hidden @ weight.T, target)``.

Workload: ``--tokens`` token states of width ``--dim`` scored against ``--items`` items
(next-item prediction), bf16 and/or fp32, ``--ignore`` of the targets ignored (padding).
Rows, each ours against the baseline in the same run:

* **forward + backward**: the loss and the gradients of ``hidden`` and ``weight`` (ours
  with the default chunk, then each of ``--chunk-sizes``);
* **forward (no grad)**: the loss alone, as in evaluation.

Reported per row: time (CUDA events, median), the peak memory the step adds (the
``torch.cuda.max_memory_allocated`` rise over what was allocated before it: the logits
and everything they bring, and the gradients), their ratios, MBU and TFLOP/s. A baseline
that runs out of memory is reported as OOM and ours still is.

* MBU counts the bytes that must move: the weight read twice (the logits product and the
  hidden-gradient product) and its gradient written, the hidden states read and their
  gradient written, the targets; against the device-to-device copy bandwidth of the run.
  No chunked or unchunked design gets near it: the logits (``T * V`` elements) pass
  through memory several times, which is what the TFLOP/s column shows instead.
* TFLOP/s counts the three matmuls, ``6 * T * V * H`` (``2 * T * V * H`` forward only).

    python benchmarks/cross_entropy.py                        # H100: V 1M, H 256, T 8192
    python benchmarks/cross_entropy.py --dtype both --chunk-sizes 512,2048,4096
    python benchmarks/cross_entropy.py --block-v 8192 --num-warps 16   # kernel tiles
    python benchmarks/cross_entropy.py --device cpu          # smoke: tiny sizes
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from _harness import copy_bandwidth, device_name, median_time, synchronize
from _results import add_json_option, measurement, new_result, save

from recstack.pipelines.kernels.cross_entropy import CROSS_ENTROPY_DEFAULTS
from recstack.pipelines.ops.cross_entropy import linear_cross_entropy, logits_chunk_rows

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Tiny defaults of a CPU smoke run (the GPU defaults would take hours there).
_CPU_SIZES = {"items": 5_000, "dim": 32, "tokens": 96}
_GPU_SIZES = {"items": 1_000_000, "dim": 256, "tokens": 8192}


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
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(fn, device: torch.device, repeat: int) -> tuple[float, int | None] | None:
    """``(median seconds, peak bytes)`` of ``fn``, or ``None`` when it runs out of memory."""
    out_of_memory = False
    try:
        fn()  # compiles the kernel and allocates cuBLAS workspaces outside the peak
        peak = peak_bytes(fn, device)
        seconds = median_time(fn, device, warmup=1, repeat=repeat)
    except (torch.OutOfMemoryError, MemoryError):
        out_of_memory = True
    # Outside the handler: the exception's frames would keep the step's tensors alive.
    _free(device)
    return None if out_of_memory else (seconds, peak)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def run_dtype(args, device: torch.device, dtype_name: str, bandwidth: float, rows, table) -> None:
    dtype = _DTYPES[dtype_name]
    items, dim, tokens = args.items, args.dim, args.tokens
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(items, dim, generator=gen, device=device) * dim**-0.5).to(dtype)
    weight.requires_grad_()
    target = torch.randint(0, items, (tokens,), generator=gen, device=device)
    if args.ignore > 0:
        drop = torch.rand(tokens, generator=gen, device=device) < args.ignore
        target = torch.where(drop, -100, target)
    elem = hidden.element_size()
    train_bytes = 3 * items * dim * elem + 2 * tokens * dim * elem + 8 * tokens
    eval_bytes = items * dim * elem + tokens * dim * elem + 8 * tokens
    train_flops = 6 * tokens * items * dim
    eval_flops = 2 * tokens * items * dim

    def clear() -> None:
        hidden.grad = None
        weight.grad = None

    def ours(chunk: int | None):
        def step() -> None:
            clear()
            linear_cross_entropy(hidden, weight, target, chunk_size=chunk).backward()

        return step

    def ours_eval() -> None:
        with torch.no_grad():
            linear_cross_entropy(hidden, weight, target)

    def baseline() -> None:
        clear()
        F.cross_entropy(hidden @ weight.T, target).backward()

    def baseline_eval() -> None:
        with torch.no_grad():
            F.cross_entropy(hidden @ weight.T, target)

    default_chunk = logits_chunk_rows(tokens, items, dtype)
    chunks = [None] + [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    workload = f"V {items:,} x H {dim}, T {tokens:,}, {dtype_name}"
    print(f"{workload}: default chunk {default_chunk} rows", flush=True)
    # Ours first, while memory is unfragmented; the baseline may then run out of it.
    results = []
    for chunk in chunks:
        label = f"chunk {chunk or default_chunk}" + (" (default)" if chunk is None else "")
        results.append(("forward + backward", label, measure(ours(chunk), device, args.repeat),
                        train_bytes, train_flops))  # fmt: skip
    results.append(("forward (no grad)", f"chunk {default_chunk}",
                    measure(ours_eval, device, args.repeat), eval_bytes, eval_flops))  # fmt: skip
    clear()
    base_train = measure(baseline, device, args.repeat)
    clear()
    base_eval = measure(baseline_eval, device, args.repeat)
    for kind, label, mine, nbytes, flops in results:
        base = base_eval if kind == "forward (no grad)" else base_train
        name = f"{kind}, {workload}, {label}"
        if mine is None:
            print(f"  {name}: ours ran out of memory", flush=True)
            rows.append(measurement(name, float("nan"), notes="ours: OOM"))
            table.append((name, None, None, None, None, None, None))
            continue
        ours_s, ours_peak = mine
        base_s, base_peak = base if base is not None else (None, None)
        extra = {
            "peak_memory_bytes": ours_peak,
            "baseline_peak_memory_bytes": base_peak,
            "memory_ratio": base_peak / ours_peak if base_peak and ours_peak else None,
            "tflops": flops / ours_s / 1e12,
            "baseline_tflops": flops / base_s / 1e12 if base_s else None,
            "baseline_oom": base is None,
        }
        rows.append(
            measurement(
                name, ours_s, base_s, baseline="F.cross_entropy(hidden @ weight.T)",
                nbytes=nbytes, bandwidth=bandwidth,
                notes="baseline: OOM" if base is None else "", extra=extra,
            )
        )  # fmt: skip
        table.append((name, ours_s, base_s, ours_peak, base_peak, extra["tflops"],
                      nbytes / ours_s / bandwidth))  # fmt: skip
        base_text = "OOM" if base_s is None else f"{base_s * 1e3:.3f} ms"
        print(f"  measured: {name}: ours {ours_s * 1e3:.3f} ms, baseline {base_text}", flush=True)


def markdown(title: str, device: str, bandwidth: float, table) -> str:
    lines = [
        f"**{title}** on {device}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write)",
        "",
        "| workload | ours (ms) | baseline (ms) | speedup | peak ours (GiB) | peak baseline "
        "(GiB) | memory ratio | TFLOP/s ours | MBU ours |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ours_s, base_s, ours_peak, base_peak, tflops, mbu in table:
        if ours_s is None:
            lines.append(f"| {name} | OOM | | | | | | | |")
            continue
        base = "OOM" if base_s is None else f"{base_s * 1e3:.3f}"
        speed = "-" if base_s is None else f"{base_s / ours_s:.2f}x"
        ratio = f"{base_peak / ours_peak:.1f}x" if base_peak and ours_peak else "-"
        lines.append(
            f"| {name} | {ours_s * 1e3:.3f} | {base} | {speed} | {_gib(ours_peak)} "
            f"| {_gib(base_peak)} | {ratio} | {tflops:.3g} | {mbu:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, default=None, help="V (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=None, help="H (default 256)")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 8192)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="bf16")
    parser.add_argument("--ignore", type=float, default=0.0, help="share of ignored targets")
    parser.add_argument(
        "--chunk-sizes", default="", help="comma list of chunk sizes to time besides the default"
    )
    parser.add_argument("--block-v", type=int, default=None, help="the kernel's column tile")
    parser.add_argument("--num-warps", type=int, default=None, help="the kernel's warps")
    parser.add_argument("--repeat", type=int, default=10)
    add_json_option(parser)
    args = parser.parse_args()
    if args.block_v:
        CROSS_ENTROPY_DEFAULTS["block_v"] = args.block_v
    if args.num_warps:
        CROSS_ENTROPY_DEFAULTS["num_warps"] = args.num_warps
    device = torch.device(args.device)
    sizes = _GPU_SIZES if device.type == "cuda" else _CPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    bandwidth = copy_bandwidth(device)
    card = device_name(device)
    print(f"{card}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    rows: list = []
    table: list = []
    for name in ("bf16", "fp32") if args.dtype == "both" else (args.dtype,):
        run_dtype(args, device, name, bandwidth, rows, table)
        _free(device)  # the dtype's tensors went with run_dtype's frame
    title = "Linear cross-entropy over a large item vocabulary"
    print()
    print(markdown(title, card, bandwidth, table))
    result = new_result("cross_entropy", title, device, args, copy_bandwidth=bandwidth, rows=rows)
    save(result, args.json)


if __name__ == "__main__":
    main()
