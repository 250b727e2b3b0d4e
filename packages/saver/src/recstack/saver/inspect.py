"""Inspecting and verifying checkpoints without loading them into a model.

* :func:`describe_checkpoint`: what a checkpoint holds (step, kind, its delta chain,
  sparse tables, dense objects, per-rank state, sizes), or, for a checkpointer root, every
  checkpoint under it; a JSON-able dict, read from the manifests alone (plus each rank's
  small JSON file, for the names of its per-rank state).
* :func:`verify_checkpoint`: re-check every file a checkpoint's manifest names (and, for a
  delta, every checkpoint of its chain): present, of the recorded byte size and CRC-32,
  and, for tensor files, a well-formed safetensors file holding the tensors the manifest
  says, with the recorded number of keys. Files are checked in parallel; the result is one
  line per problem, each naming the file.

Both take a checkpoint directory (``step-000000000123``), its ``manifest.json``, or a
checkpointer root (the directory holding the ``step-*`` directories). The command line
``recstack-saver inspect|verify DIR`` (:mod:`recstack.saver.cli`) prints the same.

Examples:
    >>> import tempfile, torch
    >>> from recstack.saver import Checkpointer, describe_checkpoint, verify_checkpoint
    >>> with Checkpointer(tempfile.mkdtemp(), progress=False) as ckpt:
    ...     path = ckpt.save(5, model=torch.nn.Linear(2, 1), extras={"epoch": 0})
    >>> info = describe_checkpoint(path)
    >>> info["step"], info["kind"], [d["name"] for d in info["dense"]]
    (5, 'full', ['model', 'extras'])
    >>> verify_checkpoint(path)
    []
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recstack.core.checks import check_int
from recstack.saver.dtype_names import dtype_from_name, safetensors_name
from recstack.saver.errors import CheckpointError, NotACheckpointError
from recstack.saver.files import SAFETENSORS_DTYPES, read_header
from recstack.saver.manifest import (
    MANIFEST,
    PathKind,
    checkpoint_dirname,
    complete_steps,
    locate_checkpoint,
    parse_step,
    read_manifest,
    resolve_chain,
    safe_path,
)
from recstack.saver.parallel import default_threads
from recstack.saver.progress import Progress
from recstack.saver.read import CheckedFile, part_expectation, read_json, shape_fits
from recstack.saver.tree import tensor_names

__all__ = [
    "NotACheckpointError",
    "VerifyReport",
    "describe_checkpoint",
    "verify_checkpoint",
    "verify_report",
]


# ---------------------------------------------------------------------------- locating


def _partial_message(ckpt: Path) -> str:
    return f"{ckpt}: no {MANIFEST}: a save that did not finish (loading ignores it)"


def _incomplete(root: Path) -> list[str]:
    """Names of the ``step-*`` directories under ``root`` that have no manifest."""
    return sorted(
        e.name
        for e in root.iterdir()
        if e.is_dir() and parse_step(e.name) is not None and not (e / MANIFEST).is_file()
    )


# ---------------------------------------------------------------------------- describe


def _tensor_bytes(info: object) -> int:
    """Bytes of a tensor from its manifest entry ``{"dtype", "shape"}`` (0 if unknown)."""
    if not isinstance(info, dict):
        return 0
    dtype = dtype_from_name(info.get("dtype"))
    shape = info.get("shape")
    if dtype is None or not isinstance(shape, list):
        return 0
    return dtype.itemsize * math.prod(int(s) for s in shape)


def _size(files: dict[str, Any], rels: list[str]) -> int:
    total = 0
    for rel in rels:
        info = files.get(rel)
        if isinstance(info, dict) and isinstance(info.get("bytes"), int):
            total += info["bytes"]
    return total


def _totals(ckpt: Path, m: dict[str, Any]) -> tuple[int, int]:
    """``(bytes, files)`` of a checkpoint, its manifest included."""
    files = m["files"]
    return _size(files, list(files)) + (ckpt / MANIFEST).stat().st_size, len(files) + 1


def _base(m: dict[str, Any]) -> dict[str, Any] | None:
    base = m.get("base")
    if m["kind"] != "delta" or not isinstance(base, dict):
        return None
    return {"name": base.get("dir"), "step": base.get("step")}


def _summary(ckpt: Path, m: dict[str, Any]) -> dict[str, Any]:
    nbytes, nfiles = _totals(ckpt, m)
    return {
        "name": ckpt.name,
        "path": str(ckpt),
        "step": m["step"],
        "kind": m["kind"],
        "base": _base(m),
        "world_size": m["world_size"],
        "created": m.get("created"),
        "bytes": nbytes,
        "files": nfiles,
    }


def _slots(slots: object) -> dict[str, dict[str, Any]]:
    if not isinstance(slots, dict):
        return {}
    return {
        str(s): {"dtype": info.get("dtype"), "shape": list(info.get("shape") or [])}
        for s, info in slots.items()
        if isinstance(info, dict)
    }


def _describe_table(name: str, t: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    ranks = [r for r in t.get("ranks") or [] if isinstance(r, dict)]
    slots = _slots(t.get("slots"))
    values = slots.get("values", {}).get("shape")
    meta = t.get("metadata")
    if isinstance(values, list) and len(values) == 1:
        dim = values[0]
    else:
        dim = meta.get("dim") if isinstance(meta, dict) else None
    rels: list[str] = []
    parts = 0
    for r in ranks:
        rank_parts = [p for p in r.get("parts") or [] if isinstance(p, str)]
        parts += len(rank_parts)
        rels += rank_parts + [r[k] for k in ("removed", "aux") if isinstance(r.get(k), str)]
    keys = [int(r.get("keys") or 0) for r in ranks]
    removed = [int(r.get("removed_keys") or 0) for r in ranks]
    return {
        "name": name,
        "keys": sum(keys),
        "keys_per_rank": keys,
        "removed_keys": sum(removed),
        "removed_keys_per_rank": removed,
        "dim": dim,
        "slots": slots,
        "parts": parts,
        "bytes": _size(files, rels),
    }


def _describe_dense(m: dict[str, Any]) -> list[dict[str, Any]]:
    dense = m.get("dense") or {}
    trees = dense.get("trees") or {}
    info = dense.get("info") or {}
    out = []
    for name, obj in trees.items():
        obj = obj if isinstance(obj, dict) else {}
        names = tensor_names(obj.get("tree"))
        out.append(
            {
                "name": name,
                "kind": obj.get("kind"),
                "tensors": len(names),
                "bytes": sum(_tensor_bytes(info.get(n)) for n in names),
            }
        )
    return out


def _describe_per_rank(ckpt: Path, m: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rank, entry in enumerate(m.get("per_rank") or []):
        entry = entry if isinstance(entry, dict) else {}
        rels = [entry[k] for k in ("file", "tensors") if isinstance(entry.get(k), str)]
        item: dict[str, Any] = {
            "rank": rank,
            "states": None,
            "rng": None,
            "tensor_file": isinstance(entry.get("tensors"), str),
            "bytes": _size(m["files"], rels),
        }
        try:
            data = read_json(CheckedFile(ckpt, m, entry.get("file")))  # type: ignore[arg-type]
            if not isinstance(data, dict):
                raise CheckpointError(f"{ckpt / str(entry.get('file'))}: not a JSON object")
            item["states"] = sorted((data.get("states") or {}).keys())
            item["rng"] = data.get("rng") is not None
        except CheckpointError as err:
            item["error"] = str(err)
        out.append(item)
    return out


def _describe_one(ckpt: Path) -> dict[str, Any]:
    m = read_manifest(ckpt)
    out: dict[str, Any] = {"type": "checkpoint", **_summary(ckpt, m)}
    out["format"] = m["format"]
    out["version"] = m["version"]
    chain: list[dict[str, Any]] | None = None
    chain_error = None
    try:
        chain = [
            {"name": d.name, "step": cm["step"], "kind": cm["kind"], "bytes": _totals(d, cm)[0]}
            for d, cm in resolve_chain(ckpt.parent, ckpt.name)
        ]
    except (CheckpointError, OSError) as err:
        chain_error = str(err)
    out["chain"] = chain
    out["chain_error"] = chain_error
    try:
        out["tables"] = [
            _describe_table(name, t if isinstance(t, dict) else {}, m["files"])
            for name, t in m["tables"].items()
        ]
        out["dense"] = _describe_dense(m)
        out["per_rank"] = _describe_per_rank(ckpt, m)
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt / MANIFEST}: malformed entries ({err})") from None
    out["extra"] = m.get("extra") or {}
    return out


def _describe_root(root: Path) -> dict[str, Any]:
    entries = []
    for step in complete_steps(root, warn=False):
        ckpt = root / checkpoint_dirname(step)
        try:
            entries.append(_summary(ckpt, read_manifest(ckpt)))
        except (CheckpointError, OSError) as err:
            entries.append({"name": ckpt.name, "path": str(ckpt), "step": step, "error": str(err)})
    loadable = [e["step"] for e in entries if "error" not in e]
    return {
        "type": "root",
        "path": str(root),
        "latest": loadable[-1] if loadable else None,
        "checkpoints": entries,
        "incomplete": _incomplete(root),
    }


def describe_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds, as a JSON-able dict (what ``recstack-saver inspect``
    prints).

    For a checkpoint directory (or its ``manifest.json``): ``type`` (``"checkpoint"``),
    ``name``, ``path``, ``step``, ``kind`` (``full``/``delta``), ``created``,
    ``world_size``, ``format``, ``version``, ``base`` (``{"name", "step"}`` for a delta),
    ``chain`` (the checkpoints a load replays, full one first, each ``{"name", "step",
    "kind", "bytes"}``; ``None`` with ``chain_error`` when the chain is broken),
    ``bytes`` and ``files`` (manifest included), ``tables`` (per sparse table: ``keys``,
    ``keys_per_rank``, ``removed_keys``, ``removed_keys_per_rank``, ``dim``, ``slots``
    ``{slot: {"dtype", "shape"}}`` (the shape of one key's row), ``parts``, ``bytes``),
    ``dense`` (per object: ``kind``, ``tensors``, ``bytes``), ``per_rank`` (per rank: the
    names of its ``states``, whether it holds ``rng`` states, ``bytes``) and ``extra``.

    For a checkpointer root: ``type`` (``"root"``), ``path``, ``latest`` (step or
    ``None``), ``checkpoints`` (per complete checkpoint: ``name``, ``path``, ``step``,
    ``kind``, ``base``, ``world_size``, ``created``, ``bytes``, ``files``; or ``error``
    when its manifest cannot be read) and ``incomplete`` (names of the directories of
    saves that did not finish, which loading ignores).

    Sizes are the ones the manifests record; :func:`verify_checkpoint` checks the files.

    Args:
        path: a checkpoint directory, its ``manifest.json``, or a checkpointer root.

    Raises:
        NotACheckpointError: the path is missing or neither a checkpoint nor a root.
        CheckpointError: a ``step-*`` directory without a manifest, or a manifest that
            cannot be read; the message names the file.
    """
    what, p = locate_checkpoint(path)
    if what == "partial":
        raise CheckpointError(_partial_message(p))
    if what == "root":
        return _describe_root(p)
    return _describe_one(p)


# ---------------------------------------------------------------------------- verify

_KEYS = ("I64", [-1])
_JSON = "json"


@dataclass
class _Check:
    """One file to check: its checkpoint, manifest, path and what it should hold."""

    ckpt: Path
    manifest: dict[str, Any]
    rel: str
    # {tensor: (safetensors dtype or None, shape or None; a leading -1 is any length)},
    # _JSON for a JSON file, None for bytes only.
    expect: dict[str, tuple[str | None, list[int] | None]] | str | None


@dataclass
class _Count:
    """A number of keys the manifest records, and the files that should hold them."""

    where: str
    what: str
    expected: int
    rels: list[str]


@dataclass
class VerifyReport:
    """What :func:`verify_report` found (``recstack-saver verify`` prints its summary).

    Attributes:
        problems: one line per problem, each naming the file (or manifest) concerned.
        checkpoints: the names of the checkpoints checked, oldest first.
        files: how many files were checked.
        bytes: their recorded size in all.
        incomplete: the directories of a root's saves that did not finish (skipped).
        root: whether the path was a checkpointer root.
    """

    problems: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    incomplete: list[str] = field(default_factory=list)
    root: bool = False


def _plan(ckpt: Path, m: dict[str, Any], problems: list[str]) -> tuple[list[_Check], list[_Count]]:
    """The files of one checkpoint to check, and the key counts to compare."""
    where = f"{ckpt / MANIFEST}"
    files = m["files"]
    expect: dict[str, Any] = {}
    counts: list[_Count] = []

    def ref(rel: object, what: str, tensors: dict[str, Any] | str | None) -> bool:
        try:
            safe_path(ckpt, rel, f"{where}: {what}")
        except CheckpointError as err:
            problems.append(str(err))
            return False
        assert isinstance(rel, str)
        if rel not in files:
            problems.append(f"{where}: {what} names {rel!r}, which is not among its files")
            return False
        old = expect.get(rel)
        if isinstance(old, dict) and isinstance(tensors, dict):
            old.update(tensors)
        elif old is None:
            expect[rel] = tensors
        return True

    for rel in files:
        if rel.endswith(".safetensors"):
            expect[rel] = {}
        elif rel.endswith(".json"):
            expect[rel] = _JSON
        else:
            expect[rel] = None

    world = m["world_size"]
    for name, t in m["tables"].items():
        label = f"table {name!r}"
        if not isinstance(t, dict) or not isinstance(t.get("ranks"), list):
            problems.append(f"{where}: {label} has no list of ranks")
            continue
        if len(t["ranks"]) != world:
            problems.append(
                f"{where}: {label} has {len(t['ranks'])} ranks' entries, the world size is {world}"
            )
        part = part_expectation(_slots(t.get("slots")))
        for r, entry in enumerate(t["ranks"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("parts"), list):
                problems.append(f"{where}: {label} rank {r}: malformed entry")
                continue
            parts = [
                rel
                for i, rel in enumerate(entry["parts"])
                if ref(rel, f"{label} rank {r} part {i}", dict(part))
            ]
            if isinstance(entry.get("keys"), int) and len(parts) == len(entry["parts"]):
                counts.append(_Count(where, f"{label} rank {r}", entry["keys"], parts))
            if entry.get("removed") is not None:
                removed = entry["removed"]
                if ref(removed, f"{label} rank {r} removed keys", {"keys": _KEYS}) and isinstance(
                    entry.get("removed_keys"), int
                ):
                    counts.append(
                        _Count(
                            where,
                            f"{label} rank {r} removed keys",
                            entry["removed_keys"],
                            [removed],
                        )
                    )
            if entry.get("aux") is not None:
                ref(entry["aux"], f"{label} rank {r} auxiliary state", {})

    dense = m["dense"] or {}
    info = dense.get("info") or {}
    for tensor, rel in (dense.get("tensors") or {}).items():
        ti = info.get(tensor) if isinstance(info.get(tensor), dict) else {}
        shape = ti.get("shape") if isinstance(ti.get("shape"), list) else None
        ref(rel, f"dense tensor {tensor!r}", {tensor: (safetensors_name(ti.get("dtype")), shape)})
    trees = dense.get("trees") or {}
    known = set(dense.get("tensors") or {})
    for obj, tree in trees.items():
        for tensor in tensor_names(tree.get("tree") if isinstance(tree, dict) else None):
            if tensor not in known:
                problems.append(f"{where}: dense object {obj!r} uses tensor {tensor!r}, no file")

    per_rank = m.get("per_rank") or []
    if len(per_rank) != world:
        problems.append(
            f"{where}: {len(per_rank)} ranks' per-rank entries, the world size is {world}"
        )
    for r, entry in enumerate(per_rank):
        if not isinstance(entry, dict):
            problems.append(f"{where}: per-rank entry {r} is malformed")
            continue
        ref(entry.get("file"), f"rank {r}'s state", _JSON)
        if entry.get("tensors") is not None:
            ref(entry["tensors"], f"rank {r}'s tensors", {})

    checks = [_Check(ckpt, m, rel, e) for rel, e in expect.items()]
    return checks, counts


_ITEMSIZE = {name: d.itemsize for d, name in SAFETENSORS_DTYPES.items()}


def _header_problems(header: dict[str, Any], where: str) -> list[str]:
    """Entries whose shape, dtype and byte range disagree (safetensors would refuse them)."""
    problems = []
    for name, info in header.items():
        shape, (start, end) = info.get("shape"), info["data_offsets"]
        ok_shape = isinstance(shape, list) and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        )
        ok_range = all(isinstance(n, int) for n in (start, end)) and 0 <= start <= end
        if not (ok_shape and ok_range):
            problems.append(f"{where}: tensor {name!r} has a malformed shape or byte range")
        elif math.prod(shape) * _ITEMSIZE[info["dtype"]] != end - start:
            problems.append(
                f"{where}: tensor {name!r} is {info['dtype']} {shape} but spans {end - start} bytes"
            )
    return problems


def _check(c: _Check, progress: Callable[[int], None]) -> tuple[list[str], int | None]:
    """Check one file; ``(problems, keys it holds or None)``."""
    f = CheckedFile(c.ckpt, c.manifest, c.rel)
    try:
        data = f.read()
    except CheckpointError as err:
        return [str(err)], None
    except OSError as err:
        return [f"{f.where}: cannot be read ({err.strerror or err})"], None
    finally:
        progress(f.bytes)
    if c.expect == _JSON:
        try:
            json.loads(data)
        except ValueError as err:
            return [f"{f.where}: not valid JSON ({err})"], None
        return [], None
    if not isinstance(c.expect, dict):
        return [], None
    try:
        header, _ = read_header(data, f.where)
    except ValueError as err:
        return [str(err)], None
    except TypeError as err:  # read_header lets a non-numeric byte offset through as this
        return [f"{f.where}: malformed safetensors header ({err})"], None
    problems = _header_problems(header, f.where)
    if problems:
        return problems, None
    for name, (dtype, shape) in c.expect.items():
        info = header.get(name)
        if info is None:
            problems.append(f"{f.where}: tensor {name!r} is missing (the manifest names it)")
            continue
        if dtype is not None and info.get("dtype") != dtype:
            problems.append(
                f"{f.where}: tensor {name!r} is {info.get('dtype')}, the manifest says {dtype}"
            )
        if shape is not None and not shape_fits(list(info.get("shape") or []), shape):
            problems.append(
                f"{f.where}: tensor {name!r} has shape {info.get('shape')}, the manifest "
                f"says {[('n' if s == -1 else s) for s in shape]}"
            )
    keys = None
    if "keys" in c.expect and isinstance(header.get("keys"), dict):
        shape = header["keys"].get("shape") or [0]
        keys = int(shape[0])
        for name, info in header.items():
            rows = (info.get("shape") or [None])[0]
            if name.startswith("slot/") and rows != keys:
                problems.append(f"{f.where}: tensor {name!r} has {rows} rows for {keys} keys")
    return problems, keys


def _targets(what: PathKind, p: Path, result: VerifyReport) -> list[Path]:
    """The checkpoint directories to check, each delta's chain included."""
    if what == "checkpoint":
        roots, names = p.parent, [p.name]
    else:
        roots = p
        names = [checkpoint_dirname(s) for s in complete_steps(p, warn=False)]
        result.incomplete = _incomplete(p)
    out: dict[str, Path] = {}
    for name in names:
        ckpt = roots / name
        out.setdefault(str(ckpt), ckpt)
        try:
            kind = read_manifest(ckpt)["kind"]
        except CheckpointError:
            continue  # reported when the checkpoint itself is checked
        if kind != "delta":
            continue
        try:
            chain = resolve_chain(roots, name)
        except CheckpointError as err:
            result.problems.append(str(err))
            continue
        for d, _ in chain:
            out.setdefault(str(d), d)
    return sorted(out.values(), key=lambda d: d.name)


def verify_report(
    path: str | os.PathLike[str], threads: int | None = None, progress: bool | None = None
) -> VerifyReport:
    """Re-check a checkpoint's files against its manifest, as :func:`verify_checkpoint`
    does, and report what was checked besides the problems.

    Args:
        path: a checkpoint directory, its ``manifest.json``, or a checkpointer root.
        threads: files checked at once (default: the CPU count, at most 16).
        progress: show a progress line on stderr; ``None`` shows it when stderr is a
            terminal.

    Raises:
        NotACheckpointError: the path is missing or neither a checkpoint nor a root.
        TypeError: ``threads`` is not an int.
        ValueError: ``threads`` is below 1.
    """
    if threads is not None:
        check_int(threads, "verify_checkpoint: threads", minimum=1)
    what, p = locate_checkpoint(path)
    result = VerifyReport(root=what == "root")
    if what == "partial":
        result.problems.append(_partial_message(p))
        return result
    targets = _targets(what, p, result)
    if not targets:
        result.problems.append(f"{p}: no complete checkpoint to verify")
        return result
    checks: list[_Check] = []
    counts: list[_Count] = []
    for ckpt in targets:
        result.checkpoints.append(ckpt.name)
        try:
            m = read_manifest(ckpt)
        except CheckpointError as err:
            result.problems.append(str(err))
            continue
        try:
            c, n = _plan(ckpt, m, result.problems)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            result.problems.append(f"{ckpt / MANIFEST}: malformed entries ({err!r})")
            continue
        checks += c
        counts += n
    result.files = len(checks)
    result.bytes = sum(c.manifest["files"][c.rel]["bytes"] for c in checks)
    label = targets[-1].name if len(targets) == 1 else f"{len(targets)} checkpoints"
    bar = Progress(f"verifying {label}", result.bytes, enabled=progress)
    workers = threads or default_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="recstack-verify") as pool:
            futures = [pool.submit(_check, c, bar.add) for c in checks]
            outcomes = [fut.result() for fut in futures]
    finally:
        bar.close()
    keys: dict[tuple[str, str], int | None] = {}
    for c, (problems, n) in zip(checks, outcomes, strict=True):
        result.problems += problems
        keys[(str(c.ckpt), c.rel)] = n
    for count in counts:
        ckpt = str(Path(count.where).parent)
        held = [keys.get((ckpt, rel)) for rel in count.rels]
        if any(n is None for n in held):
            continue  # the file itself is reported
        total = sum(n for n in held if n is not None)
        if total != count.expected:
            result.problems.append(
                f"{count.where}: {count.what}: the manifest says {count.expected} keys, its "
                f"files hold {total}"
            )
    return result


def verify_checkpoint(
    path: str | os.PathLike[str], threads: int | None = None, *, progress: bool | None = False
) -> list[str]:
    """Re-check a checkpoint's files against its manifest; the problems, ``[]`` when all
    is well (what ``recstack-saver verify`` prints).

    Every file the manifest lists is read and checked: present, of the recorded byte size
    and CRC-32; a ``.safetensors`` file must be well formed and hold the tensors the
    manifest names with their dtypes and shapes (table parts: ``keys`` and one
    ``slot/<name>`` per slot, one row per key); a ``.json`` file must parse. Every path
    the manifest's tables, dense state and per-rank entries name must stay inside the
    directory and be among its files, and the keys each rank's parts hold must add up to
    what the manifest records. For a delta, every checkpoint of its chain is checked too
    (and the chain itself: bases present, older, unchanged). For a checkpointer root,
    every complete checkpoint is checked; directories of saves that did not finish are
    skipped, as loading skips them.

    Args:
        path: a checkpoint directory, its ``manifest.json``, or a checkpointer root.
        threads: files checked at once (default: the CPU count, at most 16). Each thread
            holds one whole file in memory while it checks it.
        progress: show a progress line on stderr; ``None`` shows it when stderr is a
            terminal.

    Returns:
        One line per problem, each naming the file (or manifest) concerned.

    Raises:
        NotACheckpointError: the path is missing or neither a checkpoint nor a root.
        TypeError: ``threads`` is not an int.
        ValueError: ``threads`` is below 1.
    """
    return verify_report(path, threads, progress).problems
