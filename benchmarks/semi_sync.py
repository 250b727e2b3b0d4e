"""The Trainer's pipelines on sharded tables: step time and convergence of ``pipeline="ids"``
and ``"semi-sync"`` against the synchronous ``"off"``.

Workload: the demo's DIN run (``examples/configs/demo_din.yaml``: synthetic CTR data,
merged tables, a history sequence feature, ``SparseAdam``, one epoch) trained by
``recstack train`` under ``torchrun`` with ``--world`` ranks (gloo on CPU, NCCL with one
GPU per rank), once per pipeline, on the same data. Reported per pipeline: the step time
(between the first and the last logged step of rank 0) against the synchronous run's, and
the evaluation AUC and log loss after the epoch beside the synchronous run's: the
convergence cost of reading rows one update early (``"ids"`` trains exactly as ``"off"``).

    python benchmarks/semi_sync.py --device cpu         # gloo processes
    python benchmarks/semi_sync.py                       # NCCL: one GPU per rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _harness import Report, Row, device_name
from _results import ROOT, add_json_option, report_result, save

DEMO = ROOT / "examples" / "configs" / "demo_din.yaml"
PIPELINES = ("off", "ids", "semi-sync")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(pipeline: str, work: Path, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """One training run; its step time and final evaluation metrics."""
    run_dir = work / pipeline
    run_dir.mkdir()
    sets = [
        f"data.synthetic.dir={data}",
        f"data.synthetic.dataset.num_rows={args.rows}",
        f"data.synthetic.rows_per_file={args.rows // 5}",
        f"trainer.device={args.device}",
        f"trainer.pipeline={pipeline}",
        "trainer.log_every=5",
        "logging.plot=null",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.world),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(Path(sys.executable).with_name("recstack")), "train", str(DEMO),
        *[x for kv in sets for x in ("--set", kv)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.world))}
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"semi_sync: the {pipeline} run failed:\n{done.stderr[-3000:]}")
    records = [
        json.loads(line) for line in (run_dir / "runs/demo_din/log.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["event"] == "train" and "loss" in r]
    evals = [r for r in records if r["event"] == "eval"]
    if len(train) < 2 or not evals:
        raise SystemExit(f"semi_sync: the {pipeline} run logged too little to measure")
    first, last = train[0], train[-1]
    step_s = (last["time"] - first["time"]) / (last["step"] - first["step"])
    metrics = {k: v for k, v in evals[-1].items() if "/" in k and isinstance(v, float)}
    print(f"  {pipeline}: {step_s * 1e3:.1f} ms a step, {metrics}", flush=True)
    return {"step_s": step_s, "steps": float(last["step"]), **metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world", type=int, default=2, help="ranks (GPUs with --device cuda)")
    p.add_argument("--rows", type=int, default=250_000, help="rows of the synthetic data set")
    add_json_option(p)
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"semi_sync: {args.world} ranks need {args.world} GPUs")
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="semi_sync-"))
    try:
        data = work / "data"
        got = {pl: run(pl, work, data, args) for pl in PIPELINES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = got["off"]
    auc = next(k for k in base if k.endswith("/auc"))
    loss = next((k for k in base if k.endswith("/logloss")), None)
    report = Report(
        f"Trainer pipelines on {args.world} ranks: the demo's DIN for one epoch",
        f"{args.world} x {device_name(device)}",
        0.0,
    )
    for pl in PIPELINES[1:]:
        r = got[pl]
        extra = {"auc": r[auc], "baseline_auc": base[auc], "steps": r["steps"]}
        if loss is not None:
            extra |= {"logloss": r[loss], "baseline_logloss": base[loss]}
        report.add(
            Row(
                f"step, pipeline={pl}",
                r["step_s"],
                base["step_s"],
                0,
                baseline="the same run with pipeline=off",
                notes=f"AUC {r[auc]:.4f} against {base[auc]:.4f}"
                + ("" if loss is None else f", log loss {r[loss]:.4f} against {base[loss]:.4f}"),
                extra=extra,
            )
        )
    print(report.markdown())
    save(report_result(report, "semi_sync", device, args, mbu=False), args.json)


if __name__ == "__main__":
    main()
