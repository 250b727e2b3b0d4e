"""The manifest: what a checkpoint holds, written last so that it names only whole files.

A checkpoint is a directory ``step-<12 digits>`` under the checkpointer's root. Its
``manifest.json`` records the format version, the step, the world size that wrote it,
every file with its byte size and CRC-32, each table's part files per rank, the dense
state, and, for a delta, the checkpoint it builds on (its directory, step and the CRC-32
of its manifest, so a replaced base is noticed). A directory without a manifest is a save
that did not finish: it is ignored (with a warning) and never loaded.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from recstack.saver.errors import CheckpointError, NotACheckpointError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "Chain",
    "PathKind",
    "checkpoint_dirname",
    "complete_steps",
    "locate_checkpoint",
    "manifest_crc",
    "parse_step",
    "read_manifest",
    "resolve_chain",
    "safe_path",
]

FORMAT = "recstack.saver"
VERSION = 1
MANIFEST = "manifest.json"
_DIR = re.compile(r"^step-(\d{12})$")
_KINDS = ("full", "delta", "serving")

#: A checkpoint and the ones it builds on, ``[(directory, manifest), ...]``, full one first.
Chain = list[tuple[Path, dict[str, Any]]]

#: What a path given as "a checkpoint" turned out to be (see :func:`locate_checkpoint`).
PathKind = Literal["checkpoint", "partial", "root"]


def checkpoint_dirname(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    return f"step-{step:012d}"


def parse_step(name: str) -> int | None:
    """The step a checkpoint directory name encodes, or ``None``."""
    m = _DIR.match(name)
    return int(m.group(1)) if m else None


def complete_steps(root: Path, *, warn: bool = True) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending. Directories of saves
    that did not finish (no manifest) are skipped, with a warning when ``warn``."""
    if not root.is_dir():
        return []
    steps = []
    for entry in sorted(root.iterdir()):
        step = parse_step(entry.name)
        if step is None or not entry.is_dir():
            continue
        if (entry / MANIFEST).is_file():
            steps.append(step)
        elif warn and not _in_progress(entry):
            warnings.warn(
                f"{entry}: a checkpoint without a manifest (a save that did not finish); "
                "it is ignored",
                stacklevel=3,
            )
    return steps


def locate_checkpoint(path: str | os.PathLike[str]) -> tuple[PathKind, Path]:
    """``(kind, directory)`` of a path given as a checkpoint: ``"checkpoint"`` (a
    directory with a manifest, or the manifest itself), ``"partial"`` (a ``step-*``
    directory without one: a save that did not finish) or ``"root"`` (a directory holding
    ``step-*`` directories).

    Args:
        path: a checkpoint directory, its ``manifest.json``, or a checkpointer root.

    Raises:
        NotACheckpointError: missing, not a directory, or none of the above.
    """
    p = Path(path)
    if p.name == MANIFEST and p.is_file():
        p = p.parent
    if not p.exists():
        raise NotACheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise NotACheckpointError(
            f"{p}: not a directory (give a checkpoint directory or a checkpointer root)"
        )
    if (p / MANIFEST).is_file():
        return "checkpoint", p
    if parse_step(p.name) is not None:
        return "partial", p
    if any(parse_step(e.name) is not None and e.is_dir() for e in p.iterdir()):
        return "root", p
    raise NotACheckpointError(
        f"{p}: not a checkpoint (no {MANIFEST}) nor a checkpointer root (no step-* directories)"
    )


def _in_progress(entry: Path) -> bool:
    """A directory another rank or thread is still writing carries no warning."""
    return any(p.name.startswith(".writing") for p in entry.iterdir())


def manifest_crc(ckpt: Path) -> str:
    """CRC-32 of a checkpoint's manifest bytes (what a delta records of its base)."""
    return f"{zlib.crc32((ckpt / MANIFEST).read_bytes()):08x}"


def safe_path(ckpt: Path, rel: object, where: str) -> Path:
    """``ckpt / rel``, refusing any path that could leave the checkpoint directory.

    Raises:
        CheckpointError: ``rel`` is not a relative POSIX path of plain names.
    """
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}: file path {rel!r} is not a string")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in p.parts):
        raise CheckpointError(
            f"{where}: file path {rel!r} would leave the checkpoint directory; refused"
        )
    return ckpt.joinpath(*p.parts)


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``ckpt``, checked for format, version and the
    shape of its entries (every file path stays inside ``ckpt``).

    Raises:
        CheckpointError: no manifest, unreadable JSON, another format, a version this
            build cannot read, or malformed entries; the message names the file.
    """
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no manifest (not a checkpoint, or a save that did not finish)"
        )
    try:
        m = json.loads(path.read_bytes())
    except ValueError as err:
        raise CheckpointError(f"{path}: the manifest is not valid JSON ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else None
        raise CheckpointError(f"{path}: not a RecStack checkpoint manifest (format {found!r})")
    version = m.get("version")
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported (this build reads 1 to {VERSION})"
        )
    if m.get("kind") not in _KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {m.get('kind')!r}")
    for key, kind in (("step", int), ("world_size", int), ("files", dict), ("tables", dict),
                      ("dense", dict)):  # fmt: skip
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise CheckpointError(f"{path}: entry {key!r} is missing or malformed")
    for rel, info in m["files"].items():
        safe_path(ckpt, rel, str(path))
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("crc32"), str)):  # fmt: skip
            raise CheckpointError(f"{path}: file entry {rel!r} is malformed")
    for rel in _referenced(m, str(path)):
        safe_path(ckpt, rel, str(path))
        if rel not in m["files"]:
            raise CheckpointError(f"{path}: names {rel!r} but not among its files")
    return m


def _referenced(m: dict[str, Any], where: str) -> list[Any]:
    """Every file path the manifest's tables, dense state and per-rank entries name."""
    out: list[Any] = []
    try:
        for table in m["tables"].values():
            for r in table["ranks"]:
                out += list(r["parts"])
                out += [r[k] for k in ("removed", "aux") if r.get(k) is not None]
        out += list((m["dense"] or {}).get("tensors", {}).values())
        for r in m.get("per_rank") or []:
            out += [r[k] for k in ("file", "tensors") if r.get(k) is not None]
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{where}: malformed table, dense or rank entry ({err!r})") from None
    return out


def resolve_chain(root: Path, name: str) -> Chain:
    """``[(dir, manifest), ...]`` from the full checkpoint up to checkpoint ``name``.

    Raises:
        CheckpointError: a delta whose base is missing, not older, or not the checkpoint
            it was written against (its manifest changed), naming the delta and the base.
    """
    chain = []
    ckpt = root / name
    seen = set()
    while True:
        m = read_manifest(ckpt)
        chain.append((ckpt, m))
        if m["kind"] != "delta":
            break
        base = m.get("base")
        where = f"{ckpt / MANIFEST}"
        if not isinstance(base, dict) or not isinstance(base.get("dir"), str):
            raise CheckpointError(f"{where}: a delta without a base")
        if parse_step(base["dir"]) is None:
            raise CheckpointError(f"{where}: base {base['dir']!r} is not a checkpoint directory")
        base_dir = root / base["dir"]
        if base["dir"] in seen:
            raise CheckpointError(f"{where}: the delta chain loops at {base['dir']!r}")
        seen.add(base["dir"])
        if not (base_dir / MANIFEST).is_file():
            raise CheckpointError(
                f"{where}: its base {base['dir']} (step {base.get('step')}) is missing or "
                "incomplete; the delta chain has a gap"
            )
        if not isinstance(base.get("step"), int) or base["step"] >= m["step"]:
            raise CheckpointError(
                f"{where}: its base step {base.get('step')!r} is not before its own step "
                f"{m['step']}; the chain is out of order"
            )
        if manifest_crc(base_dir) != base.get("manifest_crc32"):
            raise CheckpointError(
                f"{where}: its base {base['dir']} is not the checkpoint it was written "
                "against (the base's manifest changed): a foreign delta"
            )
        ckpt = base_dir
    chain.reverse()
    return chain
