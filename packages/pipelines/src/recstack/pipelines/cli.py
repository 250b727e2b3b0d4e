"""The ``recstack`` command line: ``demo``, ``train``, ``eval``, ``export`` and ``data``.

Each command imports what it needs when it runs, so ``recstack --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from recstack.pipelines.demo import DemoConfig, run_demo

    fields = {
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "device": args.device,
    }
    if args.quick:
        fields.update(train_rows=20_000, eval_rows=5_000, batch_size=512, eval_every=20)
    config = DemoConfig(**{k: v for k, v in fields.items() if v is not None})
    run_demo(config, args.out, progress=None if not args.no_progress else False)
    return 0


def _train(args: argparse.Namespace) -> int:
    from recstack.pipelines.config import train_command

    return train_command(args.config, args.set, resume=not args.no_resume)


def _eval(args: argparse.Namespace) -> int:
    from recstack.pipelines.config import eval_command

    return eval_command(args.config, args.checkpoint, args.set)


def _export(args: argparse.Namespace) -> int:
    from recstack.saver.cli import export_command

    return export_command(args.checkpoint, args.out, args.dtype, args.step, prog="recstack")


def _convert(args: argparse.Namespace) -> int:
    from recstack.pipelines.data import CONVERTERS

    converter = CONVERTERS[args.dataset]
    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"recstack data convert: --option wants KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = _scalar(value)
    report = converter.convert(args.source, args.dest, **options)
    print(report)
    return 0


def _scalar(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recstack",
        description="RecStack: train recommendation models end to end.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="train DIN on generated data, save, reload and compare with the best AUC",
        description="Generate a synthetic click data set whose best possible AUC is known, "
        "train a DIN model with dynamic embeddings, sparse Adam and dense AdamW, evaluate, "
        "save a checkpoint, reload it into a fresh model, evaluate again and export it.",
    )
    d.add_argument("--train-rows", type=int, help="training rows (default 600,000)")
    d.add_argument("--eval-rows", type=int, help="evaluation rows (default 100,000)")
    d.add_argument("--batch-size", type=int, help="rows per step (default 1,024)")
    d.add_argument("--epochs", type=int, help="passes over the training rows (default 1)")
    d.add_argument("--seed", type=int, help="data and model seed (default 0)")
    d.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    d.add_argument("--out", help="working directory (default: a new temporary directory)")
    d.add_argument("--quick", action="store_true", help="a short run (25,000 rows)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(run=_demo)

    t = sub.add_parser("train", help="train from a YAML/TOML run configuration")
    t.add_argument("config", help="the run configuration file (.yaml, .yml or .toml)")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    t.add_argument("--no-resume", action="store_true", help="start over, ignoring checkpoints")
    t.set_defaults(run=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a configuration's eval data")
    e.add_argument("config", help="the run configuration file")
    e.add_argument("--checkpoint", required=True, help="a step-... directory or a root")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    e.set_defaults(run=_eval)

    x = sub.add_parser("export", help="write a checkpoint's serving export (no optimizer state)")
    x.add_argument("checkpoint", help="a step-... directory, or a root (its latest checkpoint)")
    x.add_argument("out", help="the export directory (new or empty)")
    # recstack.saver.cli.ExportDtype's values, spelled out: importing it here loads torch.
    x.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    x.add_argument("--step", type=int, help="the step to export from a checkpoint root")
    x.set_defaults(run=_export)

    data = sub.add_parser("data", help="prepare data sets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    c = dsub.add_parser(
        "convert",
        help="convert a public data set (criteo, movielens, taobao) into Parquet",
    )
    c.add_argument("dataset", help="the data set's converter (see recstack.pipelines.data)")
    c.add_argument("source", help="the downloaded file or directory")
    c.add_argument("dest", help="the output directory")
    c.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="a converter option (repeatable)"
    )
    c.set_defaults(run=_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``recstack`` command line; return its exit code.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        # Bad input (a file, column, feature, table or checkpoint, named in the message)
        # reads better without a traceback; RECSTACK_TRACEBACK=1 shows it for bug reports.
        if os.environ.get("RECSTACK_TRACEBACK"):
            raise
        print(f"recstack {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
