"""Writing one rank's share of a checkpoint, then the manifest once every rank's is there.

Every rank writes its own files (its tables' part files, and, on rank 0, the dense state),
each aside and renamed when whole, then a *fragment* (``.writing-rank-00000.json``)
listing them. The rank that finds every fragment present after writing its own takes a
lock file, merges the fragments into ``manifest.json`` (written aside, fsynced, renamed:
the checkpoint's commit point) and removes them. No collective call is needed, so an
async save finishes in a background thread without touching the process group.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from recstack.saver.errors import CheckpointError
from recstack.saver.files import (
    CHECKSUM,
    FileRecord,
    fsync_path,
    write_bytes_atomic,
    write_tensor_file,
)
from recstack.saver.manifest import FORMAT, MANIFEST, VERSION
from recstack.saver.snapshot import PinnedPool, to_host

__all__ = ["DenseJob", "RankJob", "TableJob", "write_rank"]

_FRAGMENT = ".writing-rank-{:05d}.json"
_LOCK = ".writing-finalize.lock"
_SAFE = re.compile(r"[^A-Za-z0-9_.+\-]")

Chunk = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class TableJob:
    """One table's share of this rank: chunks, tombstones, auxiliary tensors.

    Chunk tensors are on the host, or GPU snapshots of an async save (moved to the host
    by the thread that writes them). A list of chunks is emptied as it is written, so
    each chunk's memory is released once its file is.
    """

    name: str
    metadata: dict[str, Any]
    chunks: Iterable[Chunk]
    removed: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DenseJob:
    """The dense state: a JSON tree per object and their tensors (contiguous; on the host
    or GPU snapshots, like a :class:`TableJob`'s chunks)."""

    trees: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class RankJob:
    """Everything one rank writes into checkpoint directory ``ckpt``."""

    ckpt: Path
    step: int
    kind: str
    rank: int
    world_size: int
    base: dict[str, Any] | None
    tables: list[TableJob]
    dense: DenseJob | None
    per_rank: dict[str, Any]
    per_rank_tensors: dict[str, torch.Tensor]
    dense_file_bytes: int
    max_in_flight: int
    durable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: Pinned buffers the writer threads copy GPU snapshots through (an async save's).
    host_pool: PinnedPool | None = None


def table_dir(index: int, name: str) -> str:
    """The directory of a table's files: its position and a filesystem-safe name."""
    return f"sparse/t{index:04d}-{_SAFE.sub('_', name)[:80]}"


def write_rank(
    job: RankJob, pool: ThreadPoolExecutor, progress: Callable[[int], None] | None = None
) -> bool:
    """Write ``job``'s files and fragment, then the manifest if this rank is the last.

    Returns whether this call wrote the manifest. ``progress(nbytes)`` is called as files
    complete. Raises whatever a write raised (the checkpoint then stays without a
    manifest: ignored).
    """
    pending: deque[Future[FileRecord]] = deque()
    records: list[FileRecord] = []

    def submit(fn: Callable[[], FileRecord]) -> Future[FileRecord]:
        # Bounded: a blocking save streams chunks, so host memory holds only these.
        while len(pending) >= job.max_in_flight:
            records.append(_done(pending.popleft(), progress))
        fut = pool.submit(fn)
        pending.append(fut)
        return fut

    tables: dict[str, Any] = {}
    for index, table in enumerate(job.tables):
        tables[table.name] = _write_table(job, index, table, submit)
    dense = None
    if job.dense is not None:
        dense = _write_dense(job, submit)
    per_rank = _write_per_rank(job, submit)
    while pending:
        records.append(_done(pending.popleft(), progress))
    for t in tables.values():
        t["parts"] = [p.result().path for p in t["parts"]]
        for key in ("removed", "aux"):
            if t[key] is not None:
                t[key] = t[key].result().path
    if dense is not None:
        dense["tensors"] = {name: fut.result().path for name, fut in dense["tensors"].items()}
    per_rank["file"] = per_rank["file"].result().path
    if per_rank["tensors"] is not None:
        per_rank["tensors"] = per_rank["tensors"].result().path
    fragment = {
        "rank": job.rank,
        "world_size": job.world_size,
        "step": job.step,
        "kind": job.kind,
        "base": job.base,
        "files": {r.path: {"bytes": r.bytes, "crc32": r.crc32} for r in records},
        "tables": tables,
        "dense": dense,
        "per_rank": per_rank,
        "extra": job.extra,
    }
    # A fragment matters only until the manifest (fsynced) replaces it: no fsync of its own.
    write_bytes_atomic(
        job.ckpt, _FRAGMENT.format(job.rank), json.dumps(fragment).encode(), durable=False
    )
    return _finalize(job)


def _done(fut: Future[FileRecord], progress: Callable[[int], None] | None) -> FileRecord:
    rec = fut.result()
    if progress is not None:
        progress(rec.bytes)
    return rec


def _write_table(
    job: RankJob, index: int, table: TableJob, submit: Callable[..., Future[FileRecord]]
) -> dict[str, Any]:
    base = table_dir(index, table.name)
    parts: list[Future[FileRecord]] = []
    slots: dict[str, Any] | None = None
    keys_total = 0
    for i, (keys, chunk) in enumerate(_consume(table.chunks)):
        if slots is None:
            slots = {s: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                     for s, t in chunk.items()}  # fmt: skip
        keys_total += int(keys.numel())
        tensors = {"keys": keys, **{f"slot/{s}": t for s, t in chunk.items()}}
        rel = f"{base}/r{job.rank:05d}-p{i:05d}.safetensors"
        meta = {"table": table.name, "rank": str(job.rank), "part": str(i)}
        parts.append(submit(lambda rel=rel, tensors=tensors, meta=meta:
                            write_tensor_file(job.ckpt, rel, to_host(tensors, job.host_pool), meta,
                                              durable=job.durable)))  # fmt: skip
    removed = None
    if table.removed is not None and table.removed.numel():
        rel = f"{base}/r{job.rank:05d}-removed.safetensors"
        tensors = {"keys": table.removed}
        removed = submit(
            lambda rel=rel, t=tensors: write_tensor_file(job.ckpt, rel, t, durable=job.durable)
        )
    aux = None
    if table.aux:
        rel = f"{base}/r{job.rank:05d}-aux.safetensors"
        aux = submit(
            lambda rel=rel, t=dict(table.aux): write_tensor_file(
                job.ckpt, rel, t, durable=job.durable
            )
        )
    if slots is None:
        declared = table.metadata.get("slots") if isinstance(table.metadata, dict) else None
        slots = declared if isinstance(declared, dict) else {}
    return {
        "metadata": table.metadata,
        "slots": slots,
        "parts": parts,
        "keys": keys_total,
        "removed": removed,
        "removed_keys": 0 if table.removed is None else int(table.removed.numel()),
        "aux": aux,
    }


def _consume(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    if not isinstance(chunks, list):
        yield from chunks
        return
    chunks.reverse()
    while chunks:
        yield chunks.pop()


def _write_dense(job: RankJob, submit: Callable[..., Future[FileRecord]]) -> dict[str, Any]:
    assert job.dense is not None
    info = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in job.dense.tensors.items()
    }
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in job.dense.tensors.items():
        n = t.numel() * t.element_size()
        if files[-1] and size + n > job.dense_file_bytes:
            files.append({})
            size = 0
        files[-1][name] = t
        size += n
    where: dict[str, Future[FileRecord]] = {}
    for i, group in enumerate(files):
        if not group:
            continue
        rel = f"dense/d{i:05d}.safetensors"
        fut = submit(
            lambda rel=rel, g=group: write_tensor_file(
                job.ckpt, rel, to_host(g, job.host_pool), durable=job.durable
            )
        )
        for name in group:
            where[name] = fut
    # The file groups hold the tensors now: GPU snapshots are released as they are written.
    job.dense.tensors = {}
    return {"trees": job.dense.trees, "tensors": where, "info": info}


def _write_per_rank(job: RankJob, submit: Callable[..., Future[FileRecord]]) -> dict[str, Any]:
    rel = f"rank/r{job.rank:05d}.json"
    data = json.dumps(job.per_rank).encode()
    out: dict[str, Any] = {
        "file": submit(lambda: write_bytes_atomic(job.ckpt, rel, data, durable=job.durable))
    }
    out["tensors"] = None
    if job.per_rank_tensors:
        trel = f"rank/r{job.rank:05d}.safetensors"
        tensors = job.per_rank_tensors
        out["tensors"] = submit(
            lambda: write_tensor_file(
                job.ckpt, trel, to_host(tensors, job.host_pool), durable=job.durable
            )
        )
    return out


def _finalize(job: RankJob) -> bool:
    """Merge every rank's fragment into the manifest, if all are there and no other rank
    is doing it (the last rank to finish finds them all)."""
    ckpt = job.ckpt
    names = [_FRAGMENT.format(r) for r in range(job.world_size)]
    if not all((ckpt / n).is_file() for n in names):
        return False
    try:
        fd = os.open(ckpt / _LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False  # another rank is writing the manifest
    os.close(fd)
    fragments = [json.loads((ckpt / n).read_bytes()) for n in names]
    manifest = merge_fragments(fragments)
    write_bytes_atomic(ckpt, MANIFEST, json.dumps(manifest, indent=1).encode(), durable=job.durable)
    if job.durable:
        fsync_path(ckpt)
    for n in names:
        (ckpt / n).unlink(missing_ok=True)
    (ckpt / _LOCK).unlink(missing_ok=True)
    return True


def merge_fragments(fragments: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a checkpoint from its ranks' fragments (rank order).

    Raises:
        CheckpointError: fragments of different saves (step, kind, world size or base).
    """
    first = fragments[0]
    for f in fragments[1:]:
        for key in ("step", "kind", "world_size", "base"):
            if f[key] != first[key]:
                raise CheckpointError(
                    f"rank {f['rank']} wrote {key}={f[key]!r} but rank 0 wrote {first[key]!r}: "
                    "the ranks did not save the same checkpoint"
                )
    files: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    per_rank = []
    for f in fragments:
        files.update(f["files"])
        for name, t in f["tables"].items():
            entry = tables.setdefault(
                name, {"metadata": t["metadata"], "slots": t["slots"], "ranks": []}
            )
            if not entry["slots"] and t["slots"]:
                entry["slots"] = t["slots"]
            entry["ranks"].append(
                {k: t[k] for k in ("parts", "keys", "removed", "removed_keys", "aux")}
            )
        if f["dense"] is not None:
            dense = f["dense"]
        per_rank.append(f["per_rank"])
    for name, entry in tables.items():
        if len(entry["ranks"]) != len(fragments):
            raise CheckpointError(f"table {name!r} was written by only some of the ranks")
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": first["kind"],
        "step": first["step"],
        "world_size": first["world_size"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checksum": CHECKSUM,
        "base": first["base"],
        "files": dict(sorted(files.items())),
        "tables": tables,
        "dense": dense,
        "per_rank": per_rank,
        "extra": first.get("extra", {}),
    }
