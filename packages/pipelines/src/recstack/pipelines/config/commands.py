"""``recstack train CONFIG`` and ``recstack eval CONFIG --checkpoint DIR``: the functions
the command line calls, and what they print."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from recstack.core.distributed import dist_env
from recstack.pipelines.config.builder import build_data, build_model, build_run, run_device
from recstack.pipelines.config.errors import ConfigError
from recstack.pipelines.config.loader import load_config
from recstack.pipelines.config.schema import RunConfig
from recstack.pipelines.launch import distributed_run
from recstack.pipelines.online import OnlineResult
from recstack.pipelines.trainer import FitResult, Trainer
from recstack.saver import Checkpointer, CheckpointError

__all__ = [
    "CheckpointEvaluation",
    "eval_command",
    "evaluate_checkpoint",
    "format_table",
    "resolve_checkpoint",
    "train",
    "train_command",
]

_STEP_DIR = re.compile(r"step-(\d+)")
_NUMBER = re.compile(r"-?[\d,]+(\.\d+)?")


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    """A Markdown table: text left-aligned, numbers (and strings of digits) right-aligned;
    ints with thousands separators, floats to 4 decimals, ``None`` as ``-``.

    Args:
        rows: the rows' cells.
        header: the column names (``None``: an empty header row).
    """
    width = max([len(header or ())] + [len(r) for r in rows])
    head = list(header) if header is not None else [""] * width

    def cell(v: object) -> str:
        if isinstance(v, bool) or v is None:
            return "-" if v is None else str(v).lower()
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    def is_number(v: object) -> bool:
        if isinstance(v, str):
            return bool(_NUMBER.fullmatch(v))
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numeric = [
        bool(rows) and all(is_number(r[i]) for r in rows if i < len(r)) for i in range(width)
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_rows(metrics: Mapping[str, float]) -> list[list[object]]:
    return [[k, int(v) if k == "samples" else float(v)] for k, v in metrics.items()]


def train(config: RunConfig, *, resume: bool = True) -> FitResult | OnlineResult:
    """Build the run and train it (``fit_online`` for ``data.stream``). Under
    ``torchrun`` every rank runs this: the process group is set up for the run
    (:func:`~recstack.pipelines.launch.distributed_run`), each rank reads its share of the
    data, the tables are sharded and the dense parameters train data parallel.

    Args:
        config: the run.
        resume: continue from the latest checkpoint when there is one.
    """
    with distributed_run(run_device(config)):
        run = build_run(config)
        try:
            return run.fit(resume=resume)
        finally:
            run.close()


def _report_fit(result: FitResult, out: TextIO) -> None:
    rows: list[list[object]] = [
        ["steps", result.step],
        ["epochs", result.epoch],
        ["samples", result.samples],
        ["time (s)", f"{result.seconds:.1f}"],
    ]
    if result.resumed_from is not None:
        rows.append(["resumed from step", result.resumed_from])
    elif result.seconds > 0:  # samples counts the steps before a resume too
        rows.append(["samples/s", int(result.samples / result.seconds)])
    if result.stopped_by is not None:
        rows.append(["stopped by", result.stopped_by])
    out.write(format_table(rows, ["run", "value"]) + "\n")
    if result.metrics:
        out.write("\n" + format_table(_metric_rows(result.metrics), ["metric", "value"]) + "\n")
    if result.checkpoint is not None:
        out.write(f"\ncheckpoint: {result.checkpoint}\n")


def _report_online(result: OnlineResult, out: TextIO) -> None:
    names = sorted({k for w in result.windows for k in w.metrics} - {"window", "samples"})
    rows = [
        [w.window, w.rows, w.step, *(float(w.metrics.get(k, float("nan"))) for k in names)]
        for w in result.windows
    ]
    out.write(format_table(rows, ["window", "rows", "step", *names]) + "\n")
    out.write(f"\n{len(result.windows)} window(s), {result.step:,} steps, {result.seconds:.1f} s")
    if result.stopped_by is not None:
        out.write(f", stopped by {result.stopped_by}")
    out.write("\n")
    last = next((w.checkpoint for w in reversed(result.windows) if w.checkpoint), None)
    if last is not None:
        out.write(f"checkpoint: {last}\n")


def train_command(
    path: str | os.PathLike[str],
    overrides: Iterable[str] | None = (),
    resume: bool = True,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``recstack train CONFIG``: train the run a configuration file describes and print
    the final metrics (per window for online learning) as a table.

    Args:
        path: the YAML or TOML configuration file.
        overrides: ``key.path=value`` overrides (``--set``; ``None``: none).
        resume: continue from the latest checkpoint of ``checkpoint.dir``.
        out: where the report goes (default stdout).
        err: where errors go (default stderr).

    Returns:
        The exit code: 0 done, 1 a checkpoint to resume from that cannot be loaded, 2 an
        invalid configuration.
    """
    out, err = out or sys.stdout, err or sys.stderr
    try:
        config = load_config(path, overrides)
        result = train(config, resume=resume)
    except ConfigError as e:
        err.write(f"error: {e}\n")
        return 2
    except CheckpointError as e:  # a checkpoint to resume from that does not fit the run
        err.write(f"error: {e}\n")
        return 1
    if dist_env().rank != 0:
        return 0  # every rank trained alike and agrees on the metrics: rank 0 reports
    if isinstance(result, OnlineResult):
        _report_online(result, out)
    else:
        _report_fit(result, out)
    out.flush()
    return 0


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """The checkpointer root and step of ``path``: a checkpoint directory
    (``step-000000000100``, or its ``manifest.json``) or a checkpointer root (its latest
    complete checkpoint).

    Args:
        path: the directory given.

    Raises:
        CheckpointError: no such directory, or a root without a complete checkpoint.
    """
    p = Path(path)
    if p.name == "manifest.json":
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    m = _STEP_DIR.fullmatch(p.name)
    if m is not None:
        return p.parent, int(m.group(1))
    with Checkpointer(p, progress=False) as ck:
        step = ck.latest()
    if step is None:
        raise CheckpointError(f"{p}: not a checkpoint nor a root holding a complete one")
    return p, step


@dataclass
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` measured.

    Attributes:
        checkpoint: the checkpoint directory.
        step: its step.
        metrics: ``{"<task>/<metric>": value, "samples": rows}``.
    """

    checkpoint: Path
    step: int
    metrics: dict[str, float]


def evaluate_checkpoint(
    config: RunConfig, checkpoint: str | os.PathLike[str]
) -> CheckpointEvaluation:
    """Build the model of ``config``, load a checkpoint's model state into it and
    evaluate it on the evaluation data, as the Trainer evaluates (same tasks, feature
    engine, device, precision and ``eval_batches``).

    Args:
        config: the run.
        checkpoint: a checkpoint directory or a checkpointer root (its latest).

    Raises:
        ConfigError: the config has no evaluation data.
        CheckpointError: no such checkpoint, or one that does not fit the model.
    """
    root, step = resolve_checkpoint(checkpoint)
    data = build_data(config, train=False)
    if data.eval is None:
        raise ConfigError(
            "required key is missing: evaluation needs data.eval (or data.synthetic)",
            file=config.file,
            key="data.eval",
        )
    device = run_device(config)
    model = build_model(config, device)
    with Checkpointer(root, progress=False) as ck:
        # The model only: the optimizers, data position and RNG are training state.
        ck.load(step, include=["model", "model.*"], rng=False, model=model)
    engine = config.features.engine() if config.features is not None else None
    evaluator = Trainer(
        model,
        [],
        data.eval,
        features=engine,
        tasks=config.task_list,
        device=device,
        precision=config.trainer.precision,
        eval_batches=config.trainer.eval_batches,
        progress=False,
    )
    return CheckpointEvaluation(ck.path(step), step, evaluator.evaluate())


def eval_command(
    path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    overrides: Iterable[str] | None = (),
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``recstack eval CONFIG --checkpoint DIR``: evaluate a checkpoint of the run a
    configuration file describes on its evaluation data and print the metrics.

    Args:
        path: the YAML or TOML configuration file.
        checkpoint: a ``step-...`` checkpoint directory or a checkpointer root (latest).
        overrides: ``key.path=value`` overrides (``--set``; ``None``: none).
        out: where the report goes (default stdout).
        err: where errors go (default stderr).

    Returns:
        The exit code: 0 done, 1 no usable checkpoint, 2 an invalid configuration.
    """
    out, err = out or sys.stdout, err or sys.stderr
    try:
        config = load_config(path, overrides)
        result = evaluate_checkpoint(config, checkpoint)
    except ConfigError as e:
        err.write(f"error: {e}\n")
        return 2
    except CheckpointError as e:
        err.write(f"error: {e}\n")
        return 1
    out.write(f"checkpoint: {result.checkpoint} (step {result.step:,})\n\n")
    out.write(format_table(_metric_rows(result.metrics), ["metric", "value"]) + "\n")
    out.flush()
    return 0
