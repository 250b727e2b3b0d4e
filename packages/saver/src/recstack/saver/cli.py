"""``recstack-saver``: inspect, verify and export checkpoints from the shell.

* ``recstack-saver inspect DIR [--json]``: what a checkpoint holds, or the checkpoints
  under a checkpointer root (:func:`recstack.saver.describe_checkpoint`).
* ``recstack-saver verify DIR [--threads N] [--json]``: re-check every file against the
  manifest (:func:`recstack.saver.verify_checkpoint`); exit status 0 when all is well,
  1 when something is wrong, 2 for a usage error or a path that is not a checkpoint.
* ``recstack-saver export CHECKPOINT OUT [--dtype fp32|bf16|fp16] [--step N]
  [--include GLOB ...] [--exclude GLOB ...]``: write the serving export of a checkpoint
  (:func:`recstack.saver.export_checkpoint`) and print one line: tables, rows, bytes.

The ``recstack export`` command of ``recstack.pipelines`` calls
:func:`~recstack.saver.export_checkpoint` itself; :func:`export_command` is the same
command as a function returning an exit status, for other command lines.

Also runs as ``python -m recstack.saver.cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from recstack.saver.convert import export_checkpoint
from recstack.saver.errors import CheckpointError, NotACheckpointError
from recstack.saver.inspect import describe_checkpoint, verify_report
from recstack.saver.manifest import read_manifest

__all__ = [
    "EXPORT_DTYPES",
    "ExportDtype",
    "build_parser",
    "export_command",
    "format_checkpoint",
    "format_export",
    "format_root",
    "human_bytes",
    "main",
]

OK, PROBLEMS, USAGE = 0, 1, 2
_PROG = "recstack-saver"

#: The ``--dtype`` names of an export.
ExportDtype = Literal["fp32", "bf16", "fp16"]

#: The ``--dtype`` names of an export and their torch dtypes.
EXPORT_DTYPES: dict[ExportDtype, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


# ---------------------------------------------------------------------------- formatting


def human_bytes(n: int) -> str:
    """``512 B``, ``33.1 KiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _grid(headers: list[str], rows: list[list[str]], right: set[int], indent: str = "  ") -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(out)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _per_rank(values: list[int]) -> str:
    if len(values) <= 8:
        return " ".join(str(v) for v in values) or "-"
    return f"{min(values)}..{max(values)} over {len(values)} ranks"


def _slot_text(slots: dict[str, Any]) -> str:
    out = []
    for name, info in slots.items():
        shape = info.get("shape") or []
        dims = f"[{', '.join(str(s) for s in shape)}]" if shape else ""
        out.append(f"{name} {info.get('dtype')}{dims}")
    return ", ".join(out) or "-"


def _base_text(base: dict[str, Any] | None) -> str:
    return "-" if base is None else f"{base.get('name')} (step {base.get('step')})"


def format_checkpoint(info: dict[str, Any]) -> str:
    """The text ``inspect`` prints for one checkpoint (``describe_checkpoint``'s dict)."""
    lines = [
        f"checkpoint  {info['path']}",
        f"step        {info['step']}",
        f"kind        {info['kind']}",
        f"created     {info.get('created') or '-'}",
        f"world size  {info['world_size']}",
        f"format      {info['format']} v{info['version']}",
    ]
    if info["kind"] == "delta":
        lines.append(f"base        {_base_text(info.get('base'))}")
        if info.get("chain") is not None:
            chain = " -> ".join(f"{c['name']} ({c['kind']})" for c in info["chain"])
            total = sum(c["bytes"] for c in info["chain"])
            lines.append(f"chain       {chain}  ({human_bytes(total)} in all)")
        else:
            lines.append(f"chain       BROKEN: {info.get('chain_error')}")
    lines.append(f"size        {human_bytes(info['bytes'])} in {info['files']} files")
    delta = info["kind"] == "delta"
    lines += ["", f"sparse tables ({len(info['tables'])})"]
    if info["tables"]:
        headers = ["name", "keys", "per rank", "removed", "dim", "parts", "size", "slots"]
        right = {1, 3, 4, 5, 6}
        if not delta:
            headers.remove("removed")
            right = {1, 3, 4, 5}
        rows = []
        for t in info["tables"]:
            row = [t["name"], str(t["keys"]), _per_rank(t["keys_per_rank"])]
            if delta:
                row.append(str(t["removed_keys"]))
            row += [
                "-" if t["dim"] is None else str(t["dim"]),
                str(t["parts"]),
                human_bytes(t["bytes"]),
                _slot_text(t["slots"]),
            ]
            rows.append(row)
        lines.append(_grid(headers, rows, right))
    lines += ["", f"dense objects ({len(info['dense'])})"]
    if info["dense"]:
        rows = [
            [d["name"], str(d["kind"]), str(d["tensors"]), human_bytes(d["bytes"])]
            for d in info["dense"]
        ]
        lines.append(_grid(["name", "kind", "tensors", "size"], rows, {2, 3}))
    n = len(info["per_rank"])
    lines += ["", f"per-rank state ({n} rank{'s' if n != 1 else ''})"]
    if info["per_rank"]:
        rows = []
        for r in info["per_rank"]:
            if "error" in r:
                states, rng = f"unreadable: {r['error']}", "?"
            else:
                states = ", ".join(r["states"]) or "-"
                rng = "yes" if r["rng"] else "no"
            rows.append([str(r["rank"]), human_bytes(r["bytes"]), rng, states])
        lines.append(_grid(["rank", "size", "rng", "states"], rows, {0, 1}))
    return "\n".join(lines)


def format_root(info: dict[str, Any]) -> str:
    """The text ``inspect`` prints for a checkpointer root."""
    complete = info["checkpoints"]
    rows = []
    for c in complete:
        if "error" in c:
            rows.append([c["name"], str(c["step"]), f"unreadable: {c['error']}", "", "", "", ""])
            continue
        base = c["base"]
        rows.append(
            [
                c["name"],
                str(c["step"]),
                c["kind"],
                "-" if base is None else str(base.get("step")),
                str(c["world_size"]),
                human_bytes(c["bytes"]),
                str(c["files"]),
            ]
        )
    for name in info["incomplete"]:
        rows.append([name, "", "incomplete (ignored)", "", "", "", ""])
    rows.sort(key=lambda r: r[0])
    headers = ["checkpoint", "step", "kind", "base", "world size", "size", "files"]
    lines = [f"checkpointer root  {info['path']}", ""]
    if rows:
        lines.append(_grid(headers, rows, {1, 3, 4, 5, 6}))
        lines.append("")
    latest = info["latest"]
    lines.append(
        f"{len(complete)} complete checkpoint{'s' if len(complete) != 1 else ''}"
        f", {len(info['incomplete'])} incomplete (ignored)"
        + ("" if latest is None else f"; latest step {latest}")
    )
    return "\n".join(lines)


def format_export(manifest: dict[str, Any], source: str, out: str) -> str:
    """The line ``export`` prints: what an export holds.

    Args:
        manifest: the export's manifest.
        source: the checkpoint it was exported from, as given.
        out: the export directory.
    """
    tables = manifest["tables"]
    rows = sum(int(r.get("keys", 0)) for t in tables.values() for r in t["ranks"])
    size = sum(int(f["bytes"]) for f in manifest["files"].values())
    modules = len((manifest.get("dense") or {}).get("trees") or {})
    dtype = (manifest.get("extra") or {}).get("dtype")
    return (
        f"exported step {manifest['step']} of {source} ({dtype}) into {out}: "
        f"{len(tables)} table{'s' if len(tables) != 1 else ''}, {rows} rows, "
        f"{modules} module{'s' if modules != 1 else ''}, {human_bytes(size)} in "
        f"{len(manifest['files'])} files"
    )


# ---------------------------------------------------------------------------- commands


def _error(message: str, prog: str = _PROG) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _inspect(args: argparse.Namespace) -> int:
    try:
        info = describe_checkpoint(args.dir)
    except NotACheckpointError as err:
        _error(str(err))
        return USAGE
    except (CheckpointError, OSError) as err:
        _error(str(err))
        return PROBLEMS
    if args.json:
        print(json.dumps(info, indent=2))
    elif info["type"] == "root":
        print(format_root(info))
    else:
        print(format_checkpoint(info))
    return OK


def _verify_cmd(args: argparse.Namespace) -> int:
    try:
        result = verify_report(args.dir, args.threads, progress=False if args.no_progress else None)
    except NotACheckpointError as err:
        _error(str(err))
        return USAGE
    except OSError as err:
        _error(str(err))
        return PROBLEMS
    n = len(result.checkpoints)
    if result.root:
        what = f"{n} checkpoint{'s' if n != 1 else ''} under {args.dir}"
    elif n > 1:
        what = f"{result.checkpoints[-1]} and its chain ({n} checkpoints)"
    else:
        what = result.checkpoints[0] if result.checkpoints else str(args.dir)
    checked = f"{result.files} files ({human_bytes(result.bytes)}) of {what}"
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(args.dir),
                    "ok": not result.problems,
                    "problems": result.problems,
                    "checkpoints": result.checkpoints,
                    "files": result.files,
                    "bytes": result.bytes,
                    "incomplete": result.incomplete,
                },
                indent=2,
            )
        )
    else:
        for problem in result.problems:
            print(problem)
        for name in result.incomplete:
            print(f"note: {name}: incomplete (ignored)", file=sys.stderr)
        n = len(result.problems)
        problems = f"{n} problem{'s' if n != 1 else ''}"
        if n and not result.files:
            print(f"FAILED: {problems}; no file of {what} could be checked")
        elif n:
            print(f"FAILED: {problems} in {checked}")
        else:
            print(f"OK: {checked} verified")
    return PROBLEMS if result.problems else OK


def export_command(
    checkpoint: str,
    out: str,
    dtype: ExportDtype = "fp32",
    step: int | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    prog: str = "recstack",
) -> int:
    """Export ``checkpoint`` for serving into ``out`` as a command does: print the summary
    line (:func:`format_export`), or the error on stderr; return the exit status.

    Args:
        checkpoint: a checkpoint directory or a checkpointer root.
        out: the export directory (new, empty, or an unfinished export).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        step: with a root, the checkpoint's step (default: the latest complete one).
        include: glob patterns of the tables to export (default: all).
        exclude: glob patterns of the tables to leave out.
        threads: reader/writer threads (default: the CPU count, at most 16).
        progress: show a progress line on stderr; ``None`` shows it on a terminal.
        prog: the command's name in error messages.

    Returns:
        ``0`` exported; ``1`` a checkpoint problem (a missing or corrupt file, a broken
        chain, ``out`` holds an export or foreign files); ``2`` a usage error (an unknown
        dtype, a step or pattern that matches nothing) or a path that is not a checkpoint.
    """
    if dtype not in get_args(ExportDtype):
        _error(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}", prog)
        return USAGE
    try:
        path = export_checkpoint(
            checkpoint,
            out,
            dtype=EXPORT_DTYPES[dtype],
            step=step,
            include=include,
            exclude=exclude,
            threads=threads,
            progress=progress,
        )
    except NotACheckpointError as err:
        _error(str(err), prog)
        return USAGE
    except (TypeError, ValueError) as err:
        _error(str(err), prog)
        return USAGE
    except (CheckpointError, OSError) as err:
        _error(str(err), prog)
        return PROBLEMS
    print(format_export(read_manifest(path), str(checkpoint), str(path)))
    return OK


def _export_cmd(args: argparse.Namespace) -> int:
    return export_command(
        args.checkpoint,
        args.out,
        args.dtype,
        args.step,
        include=args.include,
        exclude=args.exclude,
        threads=args.threads,
        progress=False if args.no_progress else None,
        prog=_PROG,
    )


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``recstack-saver`` argument parser."""
    from recstack.saver import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect, verify and export RecStack checkpoints (directories "
        "step-<12 digits> holding manifest.json, safetensors and JSON files).",
        epilog="Exit status: 0 success, 1 a problem was found (verify, export) or a manifest "
        "cannot be read, 2 usage error or DIR is not a checkpoint. "
        f"See '{_PROG} COMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dir_help = (
        "a checkpoint directory (step-000000000123, or its manifest.json) or a checkpointer "
        "root (the directory holding the step-* directories)"
    )

    p = commands.add_parser(
        "inspect",
        help="show what a checkpoint holds, or list the checkpoints of a root",
        description="Show a checkpoint's step, kind, creation time, world size, base and "
        "delta chain, size, its sparse tables (keys per rank, dim and slots, removed keys, "
        "parts, size), dense objects (kind, tensors, size) and per-rank state. Given a "
        "checkpointer root, list every complete checkpoint (step, kind, base, world size, "
        "size) and the directories of saves that did not finish (ignored when loading). "
        "Reads the manifests only; sizes are the recorded ones (use verify to check the "
        "files).",
        epilog="Exit status: 0 success, 1 the manifest cannot be read, 2 usage error or "
        "DIR is not a checkpoint.",
    )
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_inspect)

    p = commands.add_parser(
        "verify",
        help="re-check every file of a checkpoint against its manifest",
        description="Read every file the manifest lists and check it is present, of the "
        "recorded byte size and CRC-32, that tensor files are well-formed safetensors "
        "holding the tensors (dtype, shape, key counts) the manifest records, and that no "
        "path leaves the checkpoint directory. For a delta, every checkpoint of its chain "
        "is checked too; for a checkpointer root, every complete checkpoint. Prints one "
        "line per problem, naming the file, then a summary. Files are checked in parallel; "
        "progress goes to stderr when it is a terminal.",
        epilog="Exit status: 0 everything checks, 1 a problem was found, 2 usage error or "
        "DIR is not a checkpoint.",
    )
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.add_argument(
        "--threads",
        type=_whole_number(1),
        default=None,
        metavar="N",
        help="files checked at once (default: the CPU count, at most 16); each holds one "
        "file in memory",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="never show the progress line")
    p.set_defaults(func=_verify_cmd)

    p = commands.add_parser(
        "export",
        help="write the serving export of a checkpoint (ids, rows, dense weights)",
        description="Write what an inference server needs of a checkpoint into OUT, without "
        "the model's code: each table's ids and embedding rows (no optimizer slots, no row "
        "metadata) and the dense weights of its modules (no optimizers, schedulers or "
        "per-rank state), in one dtype. A delta is replayed on its chain (removed ids gone, "
        "the latest rows kept). Every file read is checked against its manifest first; the "
        "export's manifest is written last. Load the result with "
        "recstack.saver.load_for_inference. Prints one line: tables, rows and bytes written.",
        epilog="Exit status: 0 exported, 1 a missing or corrupt file, a broken chain, or OUT "
        "holds an export or other files; 2 usage error or CHECKPOINT is not a checkpoint.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint directory (step-000000000123, or its manifest.json), or a "
        "checkpointer root: its latest complete checkpoint, or the one of --step",
    )
    p.add_argument("out", metavar="OUT", help="the export directory (new or empty)")
    p.add_argument(
        "--dtype",
        choices=sorted(EXPORT_DTYPES),
        default="fp32",
        help="the dtype of the rows and floating dense weights (default: fp32)",
    )
    p.add_argument(
        "--step",
        type=_whole_number(0),
        default=None,
        metavar="N",
        help="the step to export from a root",
    )
    for flag, what in (("--include", "export only"), ("--exclude", "leave out")):
        p.add_argument(
            flag,
            nargs="+",
            action="extend",
            metavar="GLOB",
            help=f"{what} the tables whose names match (repeatable)",
        )
    p.add_argument(
        "--threads",
        type=_whole_number(1),
        default=None,
        metavar="N",
        help="reader/writer threads (default: the CPU count, at most 16)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show the progress line")
    p.set_defaults(func=_export_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``recstack-saver`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USAGE)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `recstack-saver inspect DIR | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
