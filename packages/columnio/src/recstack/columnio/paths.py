"""Input path resolution: files, directories, globs and URIs -> a list of :class:`FileRef`.

An entry is a local file, a local directory (listed recursively), a glob (``*``, ``?``,
``[..]`` and ``**`` for any depth) or a URI of any pyarrow filesystem (``s3://``, ``gs://``,
``hdfs://``, ``file://``; query parameters such as ``?endpoint_override=..&scheme=http``
are parsed by pyarrow). Listings skip bookkeeping names (``_SUCCESS``, ``.crc``,
``_temporary/``): any path component below the listed root that starts with ``.`` or ``_``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.files import FORMATS, FileRef

__all__ = ["infer_format", "resolve_files"]

PathEntry = str | os.PathLike[str]

_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".parq": "parquet",
    ".orc": "orc",
    ".arrow": "ipc",
    ".feather": "ipc",
    ".ipc": "ipc",
}
_DEFAULT_FORMAT = "parquet"

# Two letters at least, so a Windows drive ("C:/...") is never taken for a scheme.
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
# '?' opens a URI's query only when a `name=` follows; otherwise it is a glob wildcard.
_QUERY_RE = re.compile(r"\?(?=[A-Za-z_][A-Za-z0-9_.\-]*=)")
_GLOB_RE = re.compile(r"[*?\[]")
_HIDDEN = (".", "_")


def infer_format(path: str) -> str:
    """The format a file's extension names (``"parquet"`` when the extension is unknown).

    ``.parquet``/``.pq``/``.parq`` -> ``"parquet"``, ``.orc`` -> ``"orc"``,
    ``.arrow``/``.feather``/``.ipc`` -> ``"ipc"``.
    """
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    _, ext = os.path.splitext(name)
    return _EXTENSIONS.get(ext.lower(), _DEFAULT_FORMAT)


def resolve_files(
    paths: PathEntry | Sequence[PathEntry],
    *,
    filesystem: pafs.FileSystem | None = None,
    format: str | None = None,
    allow_empty: bool = False,
) -> list[FileRef]:
    """Expand input entries into the files to read, in a deterministic order.

    Args:
        paths: one entry or a sequence of entries: local files or directories, globs, or
            URIs (``s3://bucket/prefix?endpoint_override=...``). Entries keep their order;
            the files of one entry are sorted by path.
        filesystem: when given, every entry is a path (or glob) on it; no URI parsing.
        format: one of :data:`FORMATS` for every file; ``None`` infers it per file from
            the extension (:func:`infer_format`).
        allow_empty: a directory or glob without files gives no files instead of an
            error (a followed directory that files have not reached yet).

    Raises:
        ColumnIOError: an entry that does not exist, a directory or glob without files,
            a file listed by two entries, an unsupported URI scheme, an unknown format.
    """
    if format is not None:
        if not isinstance(format, str) or format.lower() not in FORMATS:
            raise ColumnIOError(f"unknown format {format!r}, pick one of {FORMATS}")
        format = format.lower()
    if filesystem is not None and not isinstance(filesystem, pafs.FileSystem):
        raise TypeError(
            f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}"
        )
    entries = _as_entries(paths)
    if not entries:
        raise ColumnIOError("no input paths given")

    refs: list[FileRef] = []
    # identity key -> (filesystem, entry) of every file taken so far, to catch duplicates
    seen: dict[str, list[tuple[pafs.FileSystem, str]]] = {}
    for entry in entries:
        fs, infos, display = _resolve_entry(entry, filesystem, allow_empty)
        for info in sorted(infos, key=lambda i: i.path):
            uri = display(info.path)
            key = os.path.realpath(info.path) if _is_local(fs) else uri
            for other_fs, other_entry in seen.get(key, ()):
                if other_fs is fs or other_fs.equals(fs):
                    raise ColumnIOError(
                        f"listed twice (by {_redact(other_entry)!r} and {_redact(entry)!r}); "
                        "its rows would be read twice",
                        file=uri,
                    )
            seen.setdefault(key, []).append((fs, entry))
            refs.append(
                FileRef(
                    filesystem=fs,
                    path=info.path,
                    uri=uri,
                    format=format or infer_format(info.path),
                    size=info.size,
                    mtime_ns=info.mtime_ns,
                )
            )
    return refs


def _as_entries(paths: PathEntry | Sequence[PathEntry]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise TypeError(f"paths must be a path or a sequence of paths, got {type(paths).__name__}")
    entries = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"each path must be a str or os.PathLike, got {type(p).__name__}")
        s = os.fspath(p)
        if not isinstance(s, str):
            raise TypeError(f"paths must be text, got {type(s).__name__}: {s!r}")
        if not s:
            raise ColumnIOError("empty path in the input list")
        entries.append(s)
    return entries


def _resolve_entry(entry: str, filesystem: pafs.FileSystem | None, allow_empty: bool = False):
    """(filesystem, file infos, path -> display uri) for one entry."""
    if filesystem is not None:
        path = entry
        if _is_local(filesystem):
            path = _local_path(entry)
        elif path != "/":
            path = path.rstrip("/")
        return (
            filesystem,
            _expand(filesystem, path, entry, allow_empty),
            lambda p: _display(filesystem, p),
        )

    match = _URI_RE.match(entry)
    if match is None:
        fs = _local_fs()
        return fs, _expand(fs, _local_path(entry), entry, allow_empty), lambda p: p

    scheme = match.group(1).lower()
    rest = entry[match.end() :]
    query = ""
    q = _QUERY_RE.search(rest)
    if q is not None:
        rest, query = rest[: q.start()], rest[q.start() :]
    authority, _, path_part = rest.partition("/")
    host = authority.rpartition("@")[2]
    if _GLOB_RE.search(authority):
        raise ColumnIOError("globs in the bucket or host are not supported", file=_redact(entry))
    parts = path_part.split("/") if path_part else []
    first_glob = next((i for i, c in enumerate(parts) if _GLOB_RE.search(c)), len(parts))
    # pyarrow cannot parse glob characters such as '[', so it only sees the literal head.
    base_uri = f"{scheme}://{authority}/" + "/".join(parts[:first_glob]) + query
    try:
        fs, base = pafs.FileSystem.from_uri(base_uri)
    except (pa.ArrowException, OSError) as e:
        message = str(e).replace(base_uri, _redact(base_uri)).replace(entry, _redact(entry))
        raise ColumnIOError(f"cannot open URI: {message}", file=_redact(entry)) from e

    local = _is_local(fs)
    if local:
        fs = _local_fs()

    def display(p: str) -> str:
        # No query string or user:password: URIs end up in logs and error messages.
        if local:
            return p
        return f"{scheme}://{host}{p}" if p.startswith("/") else f"{scheme}://{p}"

    path = base.rstrip("/") or base
    tail = [unquote(c) for c in parts[first_glob:] if c]
    if tail:
        path = _join(path, "/".join(tail))
    return fs, _expand(fs, path, entry, allow_empty), display


def _expand(
    fs: pafs.FileSystem, path: str, entry: str, allow_empty: bool = False
) -> list[pafs.FileInfo]:
    """Files named by ``path``: the file, the directory's files, or the glob's matches."""
    where = _redact(entry)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type == pafs.FileType.Directory:
            files = _list_dir(fs, path)
            if not files and not allow_empty:
                raise ColumnIOError(
                    "directory has no files (names starting with '.' or '_' are skipped)",
                    file=where,
                )
            return files
        if not _GLOB_RE.search(path):
            raise ColumnIOError("does not exist", file=where)
        files = _glob(fs, path)
    except (OSError, pa.ArrowException) as e:
        raise ColumnIOError(f"cannot list: {e}", file=where) from e
    if not files and not allow_empty:
        raise ColumnIOError(
            "glob matches no files (names starting with '.' or '_' match only when the "
            "pattern spells that character)",
            file=where,
        )
    return files


def _list_dir(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [
        i
        for i in infos
        if i.type == pafs.FileType.File and not _hidden(_relative(i.path, root).split("/"))
    ]


def _glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    """Files matching ``pattern``; matched directories contribute all their files."""
    parts = pattern.split("/")
    first = next(i for i, c in enumerate(parts) if _GLOB_RE.search(c))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    parts = parts[first:]

    # Walk one level per component (a delimiter listing on object stores) until '**',
    # which needs one recursive listing matched against the rest of the pattern.
    frontier: list[tuple[str, pafs.FileInfo | None]] = [(base, None)]
    matched: dict[str, pafs.FileInfo] = {}
    for i, part in enumerate(parts):
        if "**" in part:
            frontier = _known(fs, frontier)
            regex = re.compile(_rest_regex(parts[i:]))
            for root, info in frontier:
                if info.type == pafs.FileType.Directory:
                    _match_recursive(fs, root, regex, matched)
            return list(matched.values())
        if not _GLOB_RE.search(part):
            frontier = [(_join(p, part), None) for p, _ in frontier]
            continue
        regex = re.compile(_component_regex(part))
        nxt: list[tuple[str, pafs.FileInfo | None]] = []
        for root, info in _known(fs, frontier):
            if info.type != pafs.FileType.Directory:
                continue
            selector = pafs.FileSelector(root, recursive=False, allow_not_found=True)
            for child in fs.get_file_info(selector):
                if regex.fullmatch(child.path.rstrip("/").rsplit("/", 1)[-1]):
                    nxt.append((child.path.rstrip("/"), child))
        frontier = nxt

    for path, info in _known(fs, frontier):
        if info.type == pafs.FileType.File:
            matched[path] = info
        elif info.type == pafs.FileType.Directory:
            matched.update((f.path, f) for f in _list_dir(fs, path))
    return list(matched.values())


def _match_recursive(
    fs: pafs.FileSystem, root: str, regex: re.Pattern[str], out: dict[str, pafs.FileInfo]
) -> None:
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        comps = _relative(info.path, root).split("/")
        # The file itself, or a matched directory above it whose own listing keeps it
        # (object stores need not return directory entries, so test the path prefixes).
        if any(
            regex.fullmatch("/".join(comps[:k])) and not _hidden(comps[k:])
            for k in range(len(comps), 0, -1)
        ):
            out[info.path] = info


def _known(fs, frontier):
    """Fill in missing FileInfos with one batched call and drop paths that don't exist."""
    unknown = [p for p, info in frontier if info is None]
    looked = dict(zip(unknown, fs.get_file_info(unknown), strict=True)) if unknown else {}
    out = []
    for p, info in frontier:
        info = info if info is not None else looked[p]
        if info.type in (pafs.FileType.File, pafs.FileType.Directory):
            out.append((p, info))
    return out


def _component_regex(part: str) -> str:
    """Regex for one glob path component; a leading wildcard never matches '.' or '_'."""
    out = []
    if part[0] in "*?" or part.startswith(("[!", "[^")):
        out.append(r"(?![._])")
    i = 0
    while i < len(part):
        c = part[i]
        if c == "*":
            while i + 1 < len(part) and part[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < len(part) and part[j] in "!^":
                j += 1
            if j < len(part) and part[j] == "]":
                j += 1
            end = part.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = part[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _rest_regex(parts: list[str]) -> str:
    """Regex over a relative path for components from the first '**' on."""
    visible = r"[^/._][^/]*"
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(f"{visible}(?:/{visible})*" if last else f"(?:{visible}/)*")
        else:
            out.append(_component_regex(part) + ("" if last else "/"))
    return "".join(out)


def _hidden(components: list[str]) -> bool:
    return any(c.startswith(_HIDDEN) for c in components)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) :].lstrip("/") if path.startswith(root) else path


def _join(base: str, name: str) -> str:
    if not base:
        return name
    return base + name if base.endswith("/") else f"{base}/{name}"


def _local_fs() -> pafs.LocalFileSystem:
    # Memory-mapped local reads: Arrow buffers point into the page cache, no copy.
    return pafs.LocalFileSystem(use_mmap=True)


def _local_path(entry: str) -> str:
    path = os.path.abspath(os.path.expanduser(entry))
    return path.replace(os.sep, "/") if os.sep != "/" else path


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _display(fs: pafs.FileSystem, path: str) -> str:
    """How a file on a caller-given filesystem is named in FileRef.uri and errors."""
    if _is_local(fs):
        return path
    if isinstance(fs, pafs.SubTreeFileSystem):
        return _display(fs.base_fs, _join(fs.base_path.rstrip("/"), path.lstrip("/")))
    name = fs.type_name
    return f"{name}://{path.lstrip('/')}" if re.fullmatch(r"[a-z][a-z0-9+.\-]*", name) else path


def _redact(entry: str) -> str:
    """An entry as printed: a URI loses its query string and user:password."""
    match = _URI_RE.match(entry)
    if match is None:
        return entry
    rest = entry[match.end() :]
    q = _QUERY_RE.search(rest)
    if q is not None:
        rest = rest[: q.start()]
    authority, slash, path = rest.partition("/")
    return f"{match.group(1)}://{authority.rpartition('@')[2]}{slash}{path}"
