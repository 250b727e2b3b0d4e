"""resolve_files / infer_format: local files, directories, globs, URIs and S3 (moto server)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.files import FORMATS, FileRef
from recstack.columnio.paths import infer_format, resolve_files


def _table(seed: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {"id": rng.integers(0, 1 << 40, rows), "w": rng.random(rows).astype(np.float32)}
    )


def _write(path: Path, seed: int = 0, rows: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(seed, rows), path)
    return path


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _paths(refs: list[FileRef]) -> list[str]:
    return [r.path for r in refs]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A Spark-like output directory with bookkeeping files to skip."""
    root = tmp_path / "data"
    _write(root / "b.parquet", seed=1, rows=5)
    _write(root / "a.parquet", seed=2, rows=1)
    _write(root / "sub" / "deep" / "c.parquet", seed=3, rows=0)
    _write(root / "sub" / "d.pq", seed=4, rows=7)
    _touch(root / "_SUCCESS", b"")
    _touch(root / ".a.parquet.crc")
    _write(root / "_temporary" / "0" / "t.parquet", seed=5)
    _write(root / ".hidden" / "h.parquet", seed=6)
    _write(root / "sub" / "_meta.parquet", seed=7)
    return root


# ---------------------------------------------------------------- infer_format


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("x.parquet", "parquet"),
        ("x.pq", "parquet"),
        ("x.PARQ", "parquet"),
        ("dir.orc/x.orc", "orc"),
        ("s3://b/k/x.arrow", "ipc"),
        ("x.feather", "ipc"),
        ("x.ipc", "ipc"),
        ("x.csv", "parquet"),
        ("part-00000", "parquet"),
        ("dir.orc/part-00000", "parquet"),
    ],
)
def test_infer_format(name: str, fmt: str) -> None:
    assert infer_format(name) == fmt
    assert fmt in FORMATS


# ---------------------------------------------------------------- local files


def test_single_local_file(tree: Path) -> None:
    f = tree / "b.parquet"
    for entry in (str(f), f):
        (ref,) = resolve_files(entry)
        assert ref.path == str(f) and ref.uri == str(f)
        assert ref.format == "parquet"
        st = os.stat(f)
        assert ref.size == st.st_size and ref.mtime_ns == st.st_mtime_ns
        # memory-mapped local reads
        assert ref.filesystem.equals(pafs.LocalFileSystem(use_mmap=True))
        with ref.open() as fh:
            assert pq.read_table(fh).equals(_table(1, 5))


def test_relative_and_home_paths(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    (ref,) = resolve_files("sub/d.pq")
    assert ref.path == str(tree / "sub" / "d.pq")
    monkeypatch.setenv("HOME", str(tree))
    (ref,) = resolve_files("~/a.parquet")
    assert ref.path == str(tree / "a.parquet")


def test_explicit_hidden_file_is_taken(tree: Path) -> None:
    (ref,) = resolve_files(tree / "sub" / "_meta.parquet")
    assert ref.path.endswith("/_meta.parquet")


def test_directory_recursive_skips_hidden_and_sorts(tree: Path) -> None:
    refs = resolve_files(tree)
    assert _paths(refs) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
        str(tree / "sub" / "d.pq"),
        str(tree / "sub" / "deep" / "c.parquet"),
    ]
    assert [r.format for r in refs] == ["parquet"] * 4
    assert [pq.read_table(r.open()).num_rows for r in refs] == [1, 5, 7, 0]
    # trailing slash: same listing
    assert _paths(resolve_files(str(tree) + "/")) == _paths(refs)


def test_hidden_root_itself_is_listed(tree: Path) -> None:
    # Only components *below* the listed root are filtered.
    assert _paths(resolve_files(tree / "_temporary")) == [str(tree / "_temporary/0/t.parquet")]
    assert _paths(resolve_files(tree / ".hidden")) == [str(tree / ".hidden/h.parquet")]


def test_length_one_directory(tmp_path: Path) -> None:
    f = _write(tmp_path / "only" / "x.parquet")
    assert _paths(resolve_files(tmp_path / "only")) == [str(f)]


# ---------------------------------------------------------------- globs


def test_glob_star(tree: Path) -> None:
    assert _paths(resolve_files(f"{tree}/*.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]


def test_glob_question_and_classes(tree: Path) -> None:
    assert _paths(resolve_files(f"{tree}/?.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]
    assert _paths(resolve_files(f"{tree}/[a].parquet")) == [str(tree / "a.parquet")]
    assert _paths(resolve_files(f"{tree}/[!a].parquet")) == [str(tree / "b.parquet")]
    assert _paths(resolve_files(f"{tree}/[^a].parquet")) == [str(tree / "b.parquet")]


def test_glob_double_star_any_depth(tree: Path) -> None:
    # '**' matches zero or more directories; hidden/underscore names stay skipped.
    assert _paths(resolve_files(f"{tree}/**/*.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
        str(tree / "sub" / "deep" / "c.parquet"),
    ]
    assert _paths(resolve_files(f"{tree}/sub/**/*.pq")) == [str(tree / "sub" / "d.pq")]
    assert _paths(resolve_files(f"{tree}/**")) == _paths(resolve_files(tree))


def test_glob_matching_directories_lists_them(tree: Path) -> None:
    assert _paths(resolve_files(f"{tree}/s*")) == [
        str(tree / "sub" / "d.pq"),
        str(tree / "sub" / "deep" / "c.parquet"),
    ]
    assert _paths(resolve_files(f"{tree}/*/de*")) == [str(tree / "sub/deep/c.parquet")]


def test_glob_hidden_only_when_spelled(tree: Path) -> None:
    assert _paths(resolve_files(f"{tree}/sub/*")) == [
        str(tree / "sub" / "d.pq"),
        str(tree / "sub" / "deep" / "c.parquet"),
    ]
    assert _paths(resolve_files(f"{tree}/sub/_*.parquet")) == [str(tree / "sub/_meta.parquet")]
    assert _paths(resolve_files(f"{tree}/_temporary/*/*.parquet")) == [
        str(tree / "_temporary/0/t.parquet")
    ]


def test_relative_glob(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert _paths(resolve_files("*.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]


def test_literal_name_with_glob_characters(tmp_path: Path) -> None:
    f = _write(tmp_path / "x[1].parquet")
    _write(tmp_path / "x1.parquet")
    assert _paths(resolve_files(f)) == [str(f)]  # an existing name wins over the glob


# ---------------------------------------------------------------- lists and formats


def test_mixed_entries_keep_order(tree: Path, tmp_path: Path) -> None:
    extra = _write(tmp_path / "extra" / "z.parquet")
    refs = resolve_files([tree / "sub", str(extra), f"{tree}/?.parquet"])
    assert _paths(refs) == [
        str(tree / "sub" / "d.pq"),
        str(tree / "sub" / "deep" / "c.parquet"),
        str(extra),
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]
    assert resolve_files((str(extra),)) == resolve_files(extra)


def test_format_inferred_per_file(tmp_path: Path) -> None:
    for name in ("a.parquet", "b.orc", "c.arrow", "d.feather", "e.ipc", "f.pq", "part-0"):
        _touch(tmp_path / name)
    refs = resolve_files(tmp_path)
    assert [r.format for r in refs] == ["parquet", "orc", "ipc", "ipc", "ipc", "parquet", "parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_forced(tmp_path: Path, fmt: str) -> None:
    for name in ("a.parquet", "b.orc", "c.arrow"):
        _touch(tmp_path / name)
    assert [r.format for r in resolve_files(tmp_path, format=fmt)] == [fmt] * 3
    assert [r.format for r in resolve_files(tmp_path, format=fmt.upper())] == [fmt] * 3


@pytest.mark.parametrize("fmt", ["csv", "", "arrow"])
def test_bad_format(tree: Path, fmt: str) -> None:
    with pytest.raises(ColumnIOError, match="unknown format"):
        resolve_files(tree, format=fmt)


def test_empty_file_is_listed(tmp_path: Path) -> None:
    f = _touch(tmp_path / "empty.parquet", b"")
    (ref,) = resolve_files(f)
    assert ref.size == 0


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    entry = str(tmp_path / "nope.parquet")
    with pytest.raises(ColumnIOError, match="does not exist") as err:
        resolve_files(entry)
    assert err.value.file == entry


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ColumnIOError, match="no files") as err:
        resolve_files(tmp_path / "empty")
    assert err.value.file == str(tmp_path / "empty")


def test_directory_of_only_bookkeeping_files(tmp_path: Path) -> None:
    _touch(tmp_path / "out" / "_SUCCESS")
    _touch(tmp_path / "out" / "_temporary" / "x.parquet")
    with pytest.raises(ColumnIOError, match="no files"):
        resolve_files(tmp_path / "out")


def test_glob_without_match(tree: Path, tmp_path: Path) -> None:
    for entry in (f"{tree}/*.orc", f"{tmp_path}/missing/*.parquet", f"{tree}/**/*.csv"):
        with pytest.raises(ColumnIOError, match="matches no files") as err:
            resolve_files(entry)
        assert err.value.file == entry


def test_duplicate_file(tree: Path) -> None:
    a = str(tree / "a.parquet")
    with pytest.raises(ColumnIOError, match="listed twice") as err:
        resolve_files([tree, a])
    assert err.value.file == a
    with pytest.raises(ColumnIOError, match="listed twice"):
        resolve_files([a, a])
    with pytest.raises(ColumnIOError, match="listed twice"):
        resolve_files([f"{tree}/*.parquet", f"{tree}/a.*"])


def test_duplicate_through_symlink_and_file_uri(tree: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.parquet"
    link.symlink_to(tree / "a.parquet")
    with pytest.raises(ColumnIOError, match="listed twice"):
        resolve_files([tree / "a.parquet", link])
    with pytest.raises(ColumnIOError, match="listed twice"):
        resolve_files([tree / "a.parquet", f"file://{tree}/a.parquet"])


def test_unsupported_scheme_hides_secrets() -> None:
    entry = "nosuchfs://user:hunter2@bucket/key.parquet?secret=hunter2"
    with pytest.raises(ColumnIOError, match="cannot open URI") as err:
        resolve_files(entry)
    assert err.value.file == "nosuchfs://bucket/key.parquet"
    assert "hunter2" not in str(err.value)


def test_bad_inputs() -> None:
    with pytest.raises(ColumnIOError, match="no input paths"):
        resolve_files([])
    with pytest.raises(ColumnIOError, match="empty path"):
        resolve_files([""])
    with pytest.raises(TypeError):
        resolve_files([1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        resolve_files(".", filesystem="s3")  # type: ignore[arg-type]


# ---------------------------------------------------------------- filesystem= and file://


def test_explicit_subtree_filesystem(tree: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tree), pafs.LocalFileSystem())
    refs = resolve_files(["sub", "*.parquet"], filesystem=fs)
    assert _paths(refs) == ["sub/d.pq", "sub/deep/c.parquet", "a.parquet", "b.parquet"]
    assert all(r.filesystem is fs for r in refs)
    assert refs[0].uri == str(tree / "sub" / "d.pq")
    assert pq.read_table(refs[0].open()).equals(_table(4, 7))
    # no URI parsing: pyarrow refuses a URI as a path, and the error names the entry
    with pytest.raises(ColumnIOError, match="cannot list"):
        resolve_files("s3://bucket/key", filesystem=fs)


def test_explicit_local_filesystem_is_kept(tree: Path) -> None:
    fs = pafs.LocalFileSystem()
    (ref,) = resolve_files(tree / "a.parquet", filesystem=fs)
    assert ref.filesystem is fs and ref.uri == str(tree / "a.parquet")


def test_file_uri(tree: Path) -> None:
    refs = resolve_files(f"file://{tree}/sub")
    assert _paths(refs) == [str(tree / "sub/d.pq"), str(tree / "sub/deep/c.parquet")]
    assert refs[0].uri == refs[0].path  # shown as the local path
    assert refs[0].filesystem.equals(pafs.LocalFileSystem(use_mmap=True))
    # '?' not followed by name= is a glob wildcard, not a query string
    assert _paths(resolve_files(f"file://{tree}/?.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]
    assert _paths(resolve_files(f"file://{tree}/[b].parquet")) == [str(tree / "b.parquet")]


# ---------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="module")
def s3_data(s3_server):
    """Bucket with a dataset prefix: three parquet files, bookkeeping, and a sibling."""
    bucket = s3_server.make_bucket("columnio-paths")
    fs = s3_server.filesystem()
    tables = {}
    for i, key in enumerate(["ds/part-1.parquet", "ds/part-0.parquet", "ds/x/part-2.parquet"]):
        tables[key] = _table(100 + i, [4, 1, 0][i])
        pq.write_table(tables[key], f"{bucket}/{key}", filesystem=fs)
    with fs.open_output_stream(f"{bucket}/ds/_SUCCESS") as out:
        out.write(b"")
    pq.write_table(_table(9, 2), f"{bucket}/ds/_temporary/t.parquet", filesystem=fs)
    pq.write_table(_table(10, 2), f"{bucket}/other/o.parquet", filesystem=fs)
    return bucket, tables


def test_s3_directory_uri(s3_server, s3_data) -> None:
    bucket, tables = s3_data
    refs = resolve_files(s3_server.uri(f"{bucket}/ds"))
    assert [r.uri for r in refs] == [
        f"s3://{bucket}/ds/part-0.parquet",
        f"s3://{bucket}/ds/part-1.parquet",
        f"s3://{bucket}/ds/x/part-2.parquet",
    ]
    for ref in refs:
        key = ref.path.split("/", 1)[1]
        assert isinstance(ref.filesystem, pafs.S3FileSystem)
        assert ref.format == "parquet" and ref.size > 0 and ref.mtime_ns is not None
        assert "testing" not in ref.uri and "?" not in ref.uri
        with ref.open() as fh:
            assert pq.read_table(fh).equals(tables[key])


def test_s3_globs(s3_server, s3_data) -> None:
    bucket, _ = s3_data
    uris = lambda entry: [r.uri for r in resolve_files(s3_server.uri(entry))]  # noqa: E731
    assert uris(f"{bucket}/ds/*.parquet") == [
        f"s3://{bucket}/ds/part-0.parquet",
        f"s3://{bucket}/ds/part-1.parquet",
    ]
    assert uris(f"{bucket}/ds/part-[1].parquet") == [f"s3://{bucket}/ds/part-1.parquet"]
    assert uris(f"{bucket}/**/part-2.parquet") == [f"s3://{bucket}/ds/x/part-2.parquet"]
    assert uris(f"{bucket}/*/o.parquet") == [f"s3://{bucket}/other/o.parquet"]
    assert uris(f"{bucket}/ds/x") == uris(f"{bucket}/ds/x/")


def test_s3_explicit_filesystem(s3_server, s3_data) -> None:
    bucket, tables = s3_data
    fs = s3_server.filesystem()
    refs = resolve_files([f"{bucket}/other", f"{bucket}/ds/part-0.parquet"], filesystem=fs)
    assert [r.uri for r in refs] == [
        f"s3://{bucket}/other/o.parquet",
        f"s3://{bucket}/ds/part-0.parquet",
    ]
    assert pq.read_table(refs[1].open()).equals(tables["ds/part-0.parquet"])


def test_s3_errors(s3_server, s3_data) -> None:
    bucket, _ = s3_data
    with pytest.raises(ColumnIOError, match="does not exist") as err:
        resolve_files(s3_server.uri(f"{bucket}/nope"))
    assert err.value.file == f"s3://{bucket}/nope"  # no query string, no keys
    assert "testing" not in str(err.value)
    with pytest.raises(ColumnIOError, match="matches no files"):
        resolve_files(s3_server.uri(f"{bucket}/ds/*.orc"))
    with pytest.raises(ColumnIOError, match="listed twice") as err:
        resolve_files([s3_server.uri(f"{bucket}/ds"), s3_server.uri(f"{bucket}/ds/*.parquet")])
    assert err.value.file == f"s3://{bucket}/ds/part-0.parquet"
