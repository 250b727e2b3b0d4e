"""Jagged self-attention (recstack.pipelines.ops.jagged_attention) against padded PyTorch.

Workload: ``--batch`` sequences of mean length ``--mean`` whose lengths follow a Zipf law
(length of the rank-``r`` sequence proportional to ``r ** -s``, ranks shuffled) with ``s``
chosen so that max / mean is ``--ratio`` (4; 1 gives uniform lengths); ``--heads`` heads of
``--head-dim``, bf16. Both ratios run unless ``--ratios`` says otherwise.

Rows, forward and forward + backward each:

* softmax, causal: ours vs ``scaled_dot_product_attention`` on the batch padded to its
  longest sequence with a boolean ``[B, 1, L, L]`` mask, and vs the same with
  ``is_causal=True`` and no mask (exact here: right padding is never seen by a real row),
  which lets torch pick its flash backend;
* softmax, causal, ``--targets`` targets per sequence: vs padded SDPA with the target mask;
* pointwise (HSTU), causal with targets: vs the padded torch a user would write
  (``silu(q @ k.T * scale) * mask / max_len @ v`` in the input dtype; both divide by the
  batch's longest length, HSTU's ``n``).

Baselines include padding the inputs and unpadding the output (they start from the same
jagged tensors); the longest length is read once, outside the timings, and ours runs with
``check_inputs=False`` and ``max_len`` given, so neither syncs with the host. Reported besides
time and ratio: peak memory of one call above what was allocated before it, TFLOP/s of the
useful FLOPs (``4 * head_dim`` per allowed (query, key) pair and head forward, twice that
more backward: the unpadded, masked count, so causal is about half of ``L * L``), and MBU =
bytes of q, k, v, out (forward; plus dout read and dq, dk, dv written for the backward) /
time / the copy bandwidth measured in this run. A baseline that runs out of memory is
reported as such.

    python benchmarks/jagged_attention.py                 # on a GPU
    python benchmarks/jagged_attention.py --device cpu    # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import math

import torch
from _harness import (
    Report,
    Row,
    copy_bandwidth,
    device_name,
    median_time,
    sized_for_device,
    synchronize,
)
from _results import add_json_option, measurement, report_result, save

from recstack.core import JaggedTensor
from recstack.pipelines.kernels.jagged_attention import jagged_attention_mask
from recstack.pipelines.ops.jagged_attention import jagged_attention

_CPU_SIZES = {"batch": 4, "mean": 16, "heads": 2, "head_dim": 16, "targets": 2, "repeat": 3}
_GPU_SIZES = {"batch": 256, "mean": 512, "heads": 4, "head_dim": 64, "targets": 16, "repeat": 20}


def zipf_lengths(batch: int, mean: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """``batch`` lengths of mean ~``mean``, Zipf-distributed with max / mean ~``ratio``."""
    if ratio <= 1.0 or batch == 1:
        return torch.full((batch,), mean, dtype=torch.int64)
    ranks = torch.arange(1, batch + 1, dtype=torch.float64)
    lo, hi = 0.0, 8.0  # max / mean = 1 / mean(r ** -s) grows with s: bisect for s
    for _ in range(60):
        s = (lo + hi) / 2
        lo, hi = (s, hi) if 1.0 / ranks.pow(-s).mean() < ratio else (lo, s)
    shape = ranks.pow(-s)
    lengths = (mean * shape / shape.mean()).round().clamp(min=1).to(torch.int64)
    return lengths[torch.randperm(batch, generator=gen)]


def useful_pairs(lengths: torch.Tensor, targets: int, causal: bool) -> int:
    """Allowed (query, key) pairs summed over the sequences (the kernels' mask)."""
    t = lengths.clamp(max=targets)
    hist = lengths - t
    per_history = hist * (hist + 1) // 2 if causal else hist * hist
    return int((per_history + t * hist + t).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="sequences (256 on a GPU, 4 on a CPU)")
    parser.add_argument("--mean", type=int, help="mean length (512 on a GPU, 16 on a CPU)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[4.0, 1.0])
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--targets", type=int, help="targets per sequence in target rows")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--repeat", type=int)
    add_json_option(parser)
    args = parser.parse_args()
    device = sized_for_device(args, _GPU_SIZES, _CPU_SIZES)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    bandwidth = copy_bandwidth(device)
    report = Report(
        f"Jagged self-attention, B {args.batch}, mean length {args.mean}, {args.heads} heads "
        f"x {args.head_dim}, {args.dtype}",
        device_name(device),
        bandwidth,
    )
    print(f"{report.device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    out_of_memory: list[tuple[str, float, str, int]] = []
    for ratio in args.ratios:
        lengths = zipf_lengths(args.batch, args.mean, ratio, gen)
        _run_lengths(args, report, out_of_memory, device, dtype, lengths, ratio, gen)
    print()
    print(report.markdown())
    result = report_result(report, "jagged_attention", device, args)
    for name, ours_s, base_name, nbytes in out_of_memory:
        print(f"| {name} | {ours_s * 1e3:.3f} | out of memory | {base_name} | | | |")
        result.rows.append(
            measurement(
                name, ours_s, None, baseline=base_name, nbytes=nbytes, bandwidth=bandwidth,
                notes="baseline out of memory",
            )
        )  # fmt: skip
    save(result, args.json)


def _run_lengths(args, report, out_of_memory, device, dtype, lengths, ratio, gen) -> None:
    heads, head_dim = args.heads, args.head_dim
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total, max_len = int(offsets[-1]), int(lengths.max())
    offsets = offsets.to(device)
    lengths_dev = lengths.to(device)
    scale = 1.0 / math.sqrt(head_dim)
    q, k, v, dout = (
        torch.randn(total, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4)
    )
    targets = torch.full_like(lengths_dev, args.targets).clamp(max=lengths_dev)
    valid = torch.arange(max_len, device=device)[None, :] < lengths_dev[:, None]
    label = (
        f"{'Zipf' if ratio > 1 else 'uniform'} lengths (max {max_len}, mean "
        f"{total / lengths.numel():.0f})"
    )
    elem = q.element_size()
    fwd_bytes = 4 * total * heads * head_dim * elem
    fwd_bwd_bytes = fwd_bytes + 8 * total * heads * head_dim * elem

    def pad(t: torch.Tensor) -> torch.Tensor:
        return JaggedTensor(t, offsets).to_padded(max_len).transpose(1, 2)  # [B, H, L, D]

    def unpad(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)[valid]

    def sdpa_masked(mask):
        def fn(q, k, v):
            return unpad(
                torch.nn.functional.scaled_dot_product_attention(
                    pad(q), pad(k), pad(v), attn_mask=mask
                )
            )

        return fn

    def sdpa_causal(q, k, v):
        return unpad(
            torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True)
        )

    target_mask = jagged_attention_mask(lengths_dev, max_len, num_targets=targets)[:, None]

    def pointwise_padded(q, k, v):
        scores = torch.matmul(pad(q), pad(k).transpose(-1, -2)) * scale
        weights = torch.nn.functional.silu(scores) * target_mask / max_len
        return unpad(torch.matmul(weights, pad(v)))

    causal_mask = jagged_attention_mask(lengths_dev, max_len)[:, None]
    cases = [
        ("softmax causal", dict(kind="softmax"), None, [
            ("padded SDPA, bool mask", sdpa_masked(causal_mask)),
            ("padded SDPA, is_causal (flash)", sdpa_causal),
        ]),
        (f"softmax causal, {args.targets} targets", dict(kind="softmax"), targets, [
            ("padded SDPA, bool target mask", sdpa_masked(target_mask)),
        ]),
        (f"pointwise causal, {args.targets} targets", dict(kind="pointwise"), targets, [
            ("padded torch silu attention", pointwise_padded),
        ]),
    ]  # fmt: skip
    for name, options, num_targets, baselines in cases:
        pairs = useful_pairs(lengths, args.targets if num_targets is not None else 0, True)
        fwd_flops = 4 * head_dim * heads * pairs

        def ours(q, k, v, options=options, num_targets=num_targets):
            return jagged_attention(
                q, k, v, offsets,
                num_targets=num_targets, max_len=max_len, check_inputs=False, **options,
            )  # fmt: skip

        expected = ours(q, k, v)
        for base_name, base in baselines:
            got = _try(lambda base=base: base(q, k, v))
            if got is not None:
                err = (got.float() - expected.float()).abs().max().item()
                assert err < (5e-2 if dtype == torch.bfloat16 else 1e-4), (name, base_name, err)
            for passes, flops, nbytes in (
                ("forward", fwd_flops, fwd_bytes),
                ("forward + backward", 3 * fwd_flops, fwd_bwd_bytes),
            ):
                backward = passes != "forward"
                ours_s, ours_mem = _measure(ours, q, k, v, dout, backward, device, args.repeat)
                base_s, base_mem = _measure(base, q, k, v, dout, backward, device, args.repeat)
                row_name = f"{name}, {passes}, {label}"
                extra = {"ours_tflops": flops / ours_s / 1e12, "useful_flops": flops}
                if ours_mem is not None:
                    extra["ours_peak_mib"] = ours_mem / 2**20
                if base_s is None:
                    print(f"  measured: {row_name}: ours {ours_s * 1e3:.3f} ms, baseline OOM")
                    out_of_memory.append((row_name, ours_s, base_name, nbytes))
                    continue
                extra["baseline_tflops"] = flops / base_s / 1e12
                if base_mem is not None:
                    extra["baseline_peak_mib"] = base_mem / 2**20
                row = report.add(
                    Row(row_name, ours_s, base_s, nbytes, baseline=base_name, extra=extra)
                )
                print(
                    f"    TFLOP/s ours {extra['ours_tflops']:.1f}, baseline "
                    f"{extra.get('baseline_tflops', float('nan')):.1f}; peak MiB ours "
                    f"{extra.get('ours_peak_mib', float('nan')):.0f}, baseline "
                    f"{extra.get('baseline_peak_mib', float('nan')):.0f}; "
                    f"MBU ours {row.mbu(report.bandwidth, ours_s):.0%}",
                    flush=True,
                )


def _try(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _measure(fn, q, k, v, dout, backward, device, repeat):
    """``(median seconds, peak bytes above the start)`` of ``fn`` (forward, or forward and
    backward to q, k, v); ``(None, None)`` if it runs out of memory."""
    if backward:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

        def call():
            return torch.autograd.grad(fn(*leaves), leaves, dout)
    else:

        def call():
            with torch.no_grad():
                return fn(q, k, v)

    try:
        peak = None
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            call()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - start
        return median_time(call, device, warmup=3, repeat=repeat), peak
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


if __name__ == "__main__":
    main()
