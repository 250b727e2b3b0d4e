"""DIN's Dice activation: the four Triton kernels of ``recstack.pipelines.ops.dice``
against the same function in torch ops (``kernels.dice_reference``, what ``Dice`` ran
before), forward and forward + backward, in training mode (batch statistics).

Workload: ``[--rows, C]`` inputs for each ``C`` of ``--channels`` (DIN's MLP: 200 and 80),
fp32 and bf16 (``--dtype``). Both sides' outputs and gradients are checked against each
other first. MBU counts the input read twice (statistics, then the output) and the output
written; forward + backward adds the input and the output's gradient read twice and the
input's gradient written.

    python benchmarks/dice.py                   # GPU: 8192 rows
    python benchmarks/dice.py --device cpu      # smoke: small sizes, torch ops on both sides
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time, sized_for_device
from _results import add_json_option, report_result, save

from recstack.core import kernels
from recstack.pipelines.kernels.dice import dice_reference
from recstack.pipelines.ops import dice

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(rows: int, channels: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(channels)
    return {
        "x": torch.randn(rows, channels, generator=gen, device=device).to(dtype),
        "dy": torch.randn(rows, channels, generator=gen, device=device).to(dtype),
        "alpha": torch.rand(channels, generator=gen, device=device) - 0.5,
    }


def _call(case: dict, fused: bool, backward: bool) -> tuple[torch.Tensor, ...]:
    x = case["x"].detach().requires_grad_(backward)
    alpha = case["alpha"].detach().requires_grad_(backward)
    stats = torch.zeros_like(alpha), torch.ones_like(alpha)
    if fused:
        y = dice(x, alpha, *stats, training=True, eps=1e-8, momentum=0.01)
    else:
        y = dice_reference(x, alpha, *stats, training=True, eps=1e-8, momentum=0.01)
    if not backward:
        return (y,)
    y.backward(case["dy"])
    return y, x.grad, alpha.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, help="rows (GPU 8192, CPU 512)")
    parser.add_argument("--channels", type=str, default="200,80")
    parser.add_argument("--dtype", type=str, default="fp32,bf16")
    parser.add_argument("--repeat", type=int, default=50)
    add_json_option(parser)
    args = parser.parse_args()
    device = sized_for_device(args, {"rows": 8192}, {"rows": 512})
    bandwidth = copy_bandwidth(device)
    report = Report("Dice: fused kernels vs torch ops", device_name(device), bandwidth)
    print(f"{report.device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    # On the CPU the op runs its torch reference unless the kernels are forced.
    backend = "auto" if device.type == "cuda" else "torch"
    for name in args.dtype.split(","):
        dtype = _DTYPES[name]
        for channels in (int(c) for c in args.channels.split(",")):
            case = _inputs(args.rows, channels, dtype, device)
            size = args.rows * channels * case["x"].element_size()
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            for backward in (False, True):
                with kernels.use_backend(backend):
                    ours = _call(case, True, backward)
                base = _call(case, False, backward)
                for a, b in zip(ours, base, strict=True):
                    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)

                def fused(backward: bool = backward, case: dict = case) -> None:
                    with kernels.use_backend(backend):
                        _call(case, True, backward)

                def plain(backward: bool = backward, case: dict = case) -> None:
                    _call(case, False, backward)

                what = "forward + backward" if backward else "forward"
                report.add(
                    Row(
                        f"{what}, {args.rows} x {channels} {name}",
                        median_time(fused, device, repeat=args.repeat),
                        median_time(plain, device, repeat=args.repeat),
                        (6 if backward else 3) * size,
                        baseline="the same Dice in torch ops",
                    )
                )
    print()
    print(report.markdown())
    save(report_result(report, "dice", device, args), args.json)


if __name__ == "__main__":
    main()
