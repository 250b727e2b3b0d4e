"""One JSON format for every benchmark's results, and where the files go.

Each script under ``benchmarks/`` writes one file per run when given ``--json`` (see
:func:`add_json_option`). A result records the card (``torch.cuda.get_device_name``, or
``"cpu"``), the host's CPU, the versions (torch, triton, python, recstack, and whatever else
the benchmark depends on), the UTC date, the command line, the workload's parameters, the
device-to-device copy bandwidth measured in the run, and one row per measurement:

- ``name``: the workload of the row;
- ``ours`` and ``unit``: our time (``"ms"``) or rate (``"rows/s"``, ...);
- ``baseline`` and ``baseline_value``: what a user would write instead, measured in the same
  run, in the same unit;
- ``ratio``: how many times better ours is: the baseline's time over ours, or our rate over
  the baseline's (above 1: ours wins);
- ``mbu`` and ``baseline_mbu``: bytes that must move / time / the copy bandwidth of the run
  (bytes read plus bytes written), where the benchmark counts bytes;
- ``notes`` (text for the reader) and ``extra`` (other numbers, for scripts).

A field the run did not measure is ``null``. The docs build renders the files committed under
``benchmarks/results/`` (``_results_page.py``). Nothing here imports torch at module level,
so the docs build can read results without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_AUTO = "<auto>"  # --json given without a path
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}Z)?$")
# <benchmark>-<card>-<YYYY-MM-DD>[-N].json: N orders the runs of one day.
_FILE_NAME = re.compile(r"-(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<run>\d+))?\.json$")
_REQUIRED_VERSIONS = ("torch", "triton", "python", "recstack")


class ResultError(ValueError):
    """A result file or dictionary that does not follow the schema."""


@dataclass
class Measurement:
    """One row: our value, the baseline's from the same run, their ratio and MBU."""

    name: str
    ours: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    mbu: float | None = None
    baseline_mbu: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """One run of one benchmark on one card."""

    benchmark: str
    title: str
    card: str
    date: str
    versions: dict[str, str | None]
    workload: dict[str, Any]
    rows: list[Measurement]
    command: str | None = None
    host: str | None = None
    copy_bandwidth: float | None = None  # bytes/s, read + write
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values, ``schema`` first."""
        data = _jsonable(asdict(self))
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        """A result from parsed JSON; raises :class:`ResultError` naming every problem."""
        problems = validate(data)
        if problems:
            raise ResultError("; ".join(problems))
        rows = [Measurement(**row) for row in data["rows"]]
        return cls(**{**data, "rows": rows})


# ------------------------------------------------------------------------------ validation

_RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "benchmark": (str,),
    "title": (str,),
    "card": (str,),
    "date": (str,),
    "versions": (dict,),
    "workload": (dict,),
    "rows": (list,),
    "command": (str, type(None)),
    "host": (str, type(None)),
    "copy_bandwidth": (int, float, type(None)),
    "notes": (str,),
    "extra": (dict,),
}
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "ours": (int, float, type(None)),
    "unit": (str,),
    "baseline": (str, type(None)),
    "baseline_value": (int, float, type(None)),
    "ratio": (int, float, type(None)),
    "mbu": (int, float, type(None)),
    "baseline_mbu": (int, float, type(None)),
    "notes": (str,),
    "extra": (dict,),
}
_RESULT_REQUIRED = {"schema", "benchmark", "title", "card", "date", "versions", "workload", "rows"}
_ROW_REQUIRED = {"name", "ours", "unit"}


def validate(data: Any) -> list[str]:
    """Every way ``data`` (parsed JSON) breaks the schema; empty when it is a valid result."""
    if not isinstance(data, Mapping):
        return [f"a result is a JSON object, not {type(data).__name__}"]
    problems = _check_fields(data, _RESULT_TYPES, _RESULT_REQUIRED, "result")
    if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        problems.append(f"schema is {data.get('schema')!r}; this reader knows {SCHEMA_VERSION}")
    for key in ("benchmark", "card"):
        if isinstance(data.get(key), str) and not data[key].strip():
            problems.append(f"{key} is empty")
    if isinstance(data.get("date"), str) and not _DATE.match(data["date"]):
        problems.append(f"date {data['date']!r} is not YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")
    versions = data.get("versions")
    if isinstance(versions, Mapping):
        missing = [k for k in _REQUIRED_VERSIONS if k not in versions]
        if missing:
            problems.append(f"versions lacks {missing} (null when unknown)")
        bad = [k for k, v in versions.items() if not isinstance(v, (str, type(None)))]
        if bad:
            problems.append(f"versions {bad} are not strings or null")
    bandwidth = data.get("copy_bandwidth")
    if _is_number(bandwidth) and not bandwidth > 0:
        problems.append(f"copy_bandwidth {bandwidth!r} is not positive")
    for i, row in enumerate(data.get("rows") or []):
        problems += [f"rows[{i}]: {p}" for p in _validate_row(row)]
    problems += [f"{where}: {p}" for where, p in _non_finite(data, "result")]
    return problems


def _validate_row(row: Any) -> list[str]:
    if not isinstance(row, Mapping):
        return [f"a row is a JSON object, not {type(row).__name__}"]
    problems = _check_fields(row, _ROW_TYPES, _ROW_REQUIRED, "row")
    if isinstance(row.get("name"), str) and not row["name"].strip():
        problems.append("name is empty")
    if row.get("baseline_value") is not None and row.get("baseline") is None:
        problems.append("baseline_value without a baseline name")
    for key in ("ratio", "mbu", "baseline_mbu"):
        value = row.get(key)
        if _is_number(value) and value < 0:
            problems.append(f"{key} {value!r} is negative")
    return problems


def _check_fields(
    data: Mapping[str, Any], types: dict[str, tuple[type, ...]], required: set[str], what: str
) -> list[str]:
    problems = [f"{what} lacks {key!r}" for key in sorted(required - set(data))]
    problems += [f"unknown {what} field {key!r}" for key in sorted(set(data) - set(types))]
    for key, allowed in types.items():
        if key not in data:
            continue
        value = data[key]
        # bool is an int to Python, never a number or count here.
        if isinstance(value, bool) or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            problems.append(f"{key} is {type(value).__name__}, not {names}")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any, where: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, float) and not math.isfinite(value):
        yield where, f"{value!r} is not a finite number (use null)"
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _non_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{where}[{i}]")


def _jsonable(value: Any) -> Any:
    """Plain JSON values: paths as strings, tuples as lists, NaN and inf as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------------------ files


def read(path: str | os.PathLike[str]) -> Result:
    """The result in ``path``; raises :class:`ResultError` naming the file and problem."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ResultError(f"{path}: {exc}") from exc
    try:
        return Result.from_dict(data)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from None


def write(result: Result, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``result`` to ``path`` (default: :func:`default_path`) and return where.

    ``path`` may be a folder (existing, or ending in a separator): the file then takes its
    default name there. The result is validated first, so no invalid file is written.
    """
    data = result.to_dict()
    problems = validate(data)
    if problems:
        raise ResultError("; ".join(problems))
    target = _target(result, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return target


def _target(result: Result, path: str | os.PathLike[str] | None) -> Path:
    if path is None or str(path) == _AUTO:
        return default_path(result)
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return default_path(result, Path(text))
    return Path(text)


def default_path(result: Result, folder: Path | None = None) -> Path:
    """``<folder>/<benchmark>-<card slug>-<YYYY-MM-DD>.json`` (``folder`` defaults to
    ``benchmarks/results``); a later run of the same day gets ``-2``, ``-3``, ... so no
    result is overwritten."""
    folder = RESULTS_DIR if folder is None else folder
    stem = f"{result.benchmark}-{card_slug(result.card)}-{result.date[:10]}"
    path = folder / f"{stem}.json"
    run = 2
    while path.exists():
        path = folder / f"{stem}-{run}.json"
        run += 1
    return path


def card_slug(card: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def load_dir(folder: str | os.PathLike[str]) -> tuple[list[tuple[Path, Result]], list[str]]:
    """Every ``*.json`` result under ``folder`` (sorted by name) and the problems of the
    files that are not valid results. A missing folder has no results."""
    results: list[tuple[Path, Result]] = []
    problems: list[str] = []
    root = Path(folder)
    if not root.is_dir():
        return results, problems
    for path in sorted(root.rglob("*.json")):
        try:
            results.append((path, read(path)))
        except ResultError as exc:
            problems.append(str(exc))
    return results, problems


def run_order(path: Path, result: Result) -> tuple[str, int, str]:
    """Sort key of runs: the date (a timestamp sorts after the bare day), then the ``-N``
    suffix of the file name (runs of one day converted from older logs), then the name."""
    match = _FILE_NAME.search(path.name)
    run = int(match["run"]) if match and match["run"] else 1
    return result.date, run, path.name


def latest(results: Iterable[tuple[Path, Result]]) -> list[tuple[Path, Result]]:
    """The newest run of each (benchmark, card), sorted by benchmark, then card (``cpu``
    last)."""
    best: dict[tuple[str, str], tuple[Path, Result]] = {}
    for path, result in results:
        key = (result.benchmark, result.card)
        if key not in best or run_order(path, result) > run_order(*best[key]):
            best[key] = (path, result)
    return [best[k] for k in sorted(best, key=lambda k: (k[0], k[1] == "cpu", k[1]))]


# ------------------------------------------------------------------------------ runs


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """The ``--json [PATH]`` option every benchmark shares."""
    parser.add_argument(
        "--json",
        nargs="?",
        const=_AUTO,
        default=None,
        metavar="PATH",
        help="also write the results in the shared JSON format (benchmarks/_results.py): to "
        "PATH, a file or a folder; without PATH to benchmarks/results/"
        "<benchmark>-<card>-<YYYY-MM-DD>.json",
    )


def new_result(
    benchmark: str,
    title: str,
    device: Any,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    copy_bandwidth: float | None = None,
    rows: Iterable[Measurement] = (),
    **versions: str | None,
) -> Result:
    """A result of this run: the card of ``device`` (a ``torch.device`` or its name), this
    host, the versions, now (UTC), ``sys.argv`` and the parsed options as the workload."""
    options = dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})
    options.pop("json", None)
    return Result(
        benchmark=benchmark,
        title=title,
        card=card_name(device),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions=environment_versions(**versions),
        workload=_jsonable(options),
        rows=list(rows),
        command=shlex.join(["python", *sys.argv]),
        host=host_name(),
        copy_bandwidth=copy_bandwidth or None,
    )


def measurement(
    name: str,
    ours_s: float,
    baseline_s: float | None = None,
    *,
    baseline: str | None = None,
    nbytes: int = 0,
    bandwidth: float | None = None,
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Measurement:
    """A timed row in milliseconds from seconds; MBU when ``nbytes`` and ``bandwidth`` are
    known, the ratio when the baseline was timed."""

    def mbu(seconds: float | None) -> float | None:
        if not (nbytes and bandwidth and seconds and seconds > 0):
            return None
        return nbytes / seconds / bandwidth

    timed = baseline_s is not None and baseline_s > 0 and ours_s > 0
    return Measurement(
        name=name,
        ours=ours_s * 1e3,
        unit="ms",
        baseline=baseline,
        baseline_value=baseline_s * 1e3 if baseline_s is not None else None,
        ratio=baseline_s / ours_s if timed else None,
        mbu=mbu(ours_s),
        baseline_mbu=mbu(baseline_s),
        notes=notes,
        extra=_jsonable(dict(extra or {})),
    )


def report_result(
    report: Any,
    benchmark: str,
    device: Any,
    args: argparse.Namespace,
    *,
    mbu: bool = True,
    **versions: str | None,
) -> Result:
    """The result of a harness ``Report`` (``_harness.py``): one timed row per report row,
    MBU against the report's copy bandwidth unless ``mbu=False`` (a report whose bandwidth
    is something else)."""
    bandwidth = report.bandwidth if mbu else None
    rows = [
        measurement(
            r.workload,
            r.ours_s,
            r.baseline_s,
            baseline=r.baseline,
            nbytes=r.nbytes,
            bandwidth=bandwidth,
            notes=r.notes,
            extra=r.extra,
        )
        for r in report.rows
    ]
    return new_result(
        benchmark, report.title, device, args, copy_bandwidth=bandwidth, rows=rows, **versions
    )


def save(result: Result, path: str | None) -> Path | None:
    """Write ``result`` where ``--json`` says (nothing when it was not given) and say where."""
    if path is None:
        return None
    target = write(result, path)
    print(f"results written to {target}", flush=True)
    return target


# ------------------------------------------------------------------------------ environment


def card_name(device: Any) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else ``"cpu"``."""
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        return device  # already a card's name
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def host_name() -> str:
    """The host's CPU model and core count."""
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def environment_versions(**more: str | None) -> dict[str, str | None]:
    """torch, triton, python and recstack versions (``None`` where absent), plus ``more``."""
    versions: dict[str, str | None] = {
        "torch": module_version("torch"),
        "triton": module_version("triton"),
        "python": platform.python_version(),
        "recstack": recstack_version(),
    }
    versions.update(more)
    return versions


def module_version(name: str) -> str | None:
    """``name.__version__``, or ``None`` when the module is absent."""
    try:
        module = __import__(name)
    except Exception:  # an absent or broken install is "not there" for the record
        return None
    return str(getattr(module, "__version__", None) or "") or None


def recstack_version() -> str | None:
    """The checkout's version from the root ``pyproject.toml``, with its git commit when the
    checkout is a git repository of its own (benchmarks run from a checkout, not an
    install), marked ``+changes`` when tracked files differ from that commit. A copy of the
    tree inside another repository gets no commit: that repository's is not the code."""
    import tomllib

    try:
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != ROOT.resolve():
            return version
        commit = git("rev-parse", "--short", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit}{'+changes' if changed else ''})"
