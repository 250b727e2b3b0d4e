"""The docs build's tools (tools/docs/) and the release script (tools/release.py)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from types import ModuleType

import griffe
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path: str) -> ModuleType:
    """Import a tool script by its path (tools/ is not a package)."""
    file = ROOT / path
    name = f"_tool_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


roles = load("tools/docs/sphinx_roles.py")
attributes = load("tools/docs/attributes.py")
inventories = load("tools/docs/inventories.py")
release = load("tools/release.py")


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def load_package(tmp_path: Path, files: dict[str, str]) -> griffe.Module:
    write_package(tmp_path, files)
    extensions = griffe.load_extensions(
        attributes.DocComments, attributes.PrivateValues, roles.SphinxRoles
    )
    return griffe.load("pkg", search_paths=[str(tmp_path)], extensions=extensions)


def ref(identifier: str, title: str) -> str:
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'


PACKAGE = {
    "pkg/__init__.py": '''
        """The package: :class:`~pkg.core.Table` and :func:`pkg.core.make`."""
        from pkg.core import Table, make
        __all__ = ["Table", "make"]
    ''',
    "pkg/core.py": '''
        """Tables."""
        import collections

        #: How many rows a :class:`Table` starts with.
        DEFAULT_ROWS = 4


        class _Missing:
            pass


        MISSING = _Missing()


        class Table:
            """A table; see :meth:`grow` and :meth:`Table.rows <Table.rows>`."""

            def grow(self, n: int) -> None:
                """Add rows; counted like :class:`collections.Counter`. :meth:`rows`
                gives the total. See :class:`Other` and :func:`
                pkg.core.make`."""

            def rows(self) -> int:
                """The rows (:exc:`ValueError` if none)."""
                return 0


        def make() -> Table:
            """A new :class:`Table`; :data:`DEFAULT_ROWS` rows; :mod:`pkg.other`."""
            return Table()
    ''',
    "pkg/other.py": '''
        """Uses :class:`~pkg.core.Table` through an import: :class:`Table`."""
        from pkg.core import Table


        class Other:
            """Wraps a :class:`Table`; the unknown :func:`nowhere` stays plain."""
    ''',
}


def test_roles_become_optional_autorefs(tmp_path: Path) -> None:
    pkg = load_package(tmp_path, PACKAGE)
    assert pkg.docstring.value == (
        f"The package: {ref('pkg.core.Table', 'Table')} and "
        f"{ref('pkg.core.make', 'pkg.core.make()')}."
    )
    table = pkg["core.Table"]
    assert ref("pkg.core.Table.grow", "grow()") in table.docstring.value
    # An explicit title; the target resolves like any other.
    assert ref("pkg.core.Table.rows", "Table.rows") in table.docstring.value


def test_escaped_spaces_after_inline_markup_are_dropped(tmp_path: Path) -> None:
    # reST writes a plural of inline markup as ``x``\ s; Markdown would show the backslash.
    files = {
        "pkg/__init__.py": 'r"""Some :class:`Item`\\ s and ``int``\\ s; a plain \\ stays."""\n'
        "class Item:\n    pass\n",
    }
    pkg = load_package(tmp_path, files)
    assert pkg.docstring.value == (
        f"Some {ref('pkg.Item', 'Item')}s and ``int``s; a plain \\ stays."
    )


def test_relative_names_resolve_in_the_docstrings_scope(tmp_path: Path) -> None:
    pkg = load_package(tmp_path, PACKAGE)
    grow = pkg["core.Table.grow"].docstring.value
    assert ref("collections.Counter", "collections.Counter") in grow  # through `import`
    assert ref("pkg.core.Table.rows", "rows()") in grow  # a sibling method
    assert ref("pkg.other.Other", "Other") in grow  # not imported: the one in the package
    assert ref("pkg.core.make", "pkg.core.make()") in grow  # a target wrapped onto a new line
    assert ref("ValueError", "ValueError") in pkg["core.Table.rows"].docstring.value
    make = pkg["core.make"].docstring.value
    assert ref("pkg.core.DEFAULT_ROWS", "DEFAULT_ROWS") in make
    assert ref("pkg.other", "pkg.other") in make


def test_imported_names_link_to_where_they_are_defined(tmp_path: Path) -> None:
    pkg = load_package(tmp_path, PACKAGE)
    assert pkg["other"].docstring.value.endswith(f"import: {ref('pkg.core.Table', 'Table')}.")
    other = pkg["other.Other"].docstring.value
    assert ref("pkg.core.Table", "Table") in other
    assert ref("nowhere", "nowhere()") in other  # resolved by nothing: autorefs shows code


def test_doc_comments_and_private_values(tmp_path: Path) -> None:
    pkg = load_package(tmp_path, PACKAGE)
    rows = pkg["core.DEFAULT_ROWS"]
    assert rows.docstring is not None
    assert rows.docstring.value == f"How many rows a {ref('pkg.core.Table', 'Table')} starts with."
    assert str(rows.value) == "4"
    assert pkg["core.MISSING"].value is None  # `_Missing()` names a private class


def test_the_extensions_load_from_their_files_as_mkdocs_yml_names_them(tmp_path: Path) -> None:
    names = [
        "tools/docs/attributes.py:DocComments",
        "tools/docs/attributes.py:PrivateValues",
        "tools/docs/sphinx_roles.py:SphinxRoles",
    ]
    config = (ROOT / "mkdocs.yml").read_text()
    for name in names:
        assert name in config
    write_package(tmp_path, PACKAGE)
    extensions = griffe.load_extensions(*(str(ROOT / n) for n in names))
    pkg = griffe.load("pkg", search_paths=[str(tmp_path)], extensions=extensions)
    assert ref("pkg.core.Table", "Table") in pkg["core.DEFAULT_ROWS"].docstring.value


def test_inventories_are_sphinx_v2_files_of_existing_objects(tmp_path: Path) -> None:
    data = inventories.inventory("X", "1", [("pkg.f", "function", "api.html#$")])
    header, _, body = data.partition(b"# The remainder of this file is compressed using zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2\n# Project: X\n# Version: 1\n")
    assert zlib.decompress(body) == b"pkg.f py:function 1 api.html#$ -\n"
    for _, (_, entries) in inventories.PROJECTS.items():
        for name, _, _ in entries:
            inventories.find_object(name)  # the installed packages have every object
    with pytest.raises(LookupError, match="no 'Nope'"):
        inventories.find_object("torch.Nope")
    for stem in ("python", "torch", "numpy", "pyarrow"):
        path = ROOT / "tools" / "docs" / "inventories" / f"{stem}.inv"
        assert path.read_bytes().startswith(b"# Sphinx inventory version 2\n")


def test_committed_diagrams_are_what_the_script_draws() -> None:
    diagrams = load("tools/docs/diagrams.py")
    for name, draw in diagrams.DIAGRAMS.items():
        svg = draw().svg()
        ET.fromstring(svg)  # well-formed
        committed = (ROOT / "docs" / "assets" / name).read_text(encoding="utf-8")
        assert committed == svg, f"docs/assets/{name} is stale: run tools/docs/diagrams.py"


def write_release_tree(root: Path, version: str = "1.2.3", init_version: str = "1.2.3") -> None:
    write_package(
        root,
        {
            "pyproject.toml": f'[project]\nname = "recstack"\nversion = "{version}"\n',
            "packages/core/pyproject.toml": (
                f'[project]\nname = "recstack-core"\nversion = "{version}"\n'
            ),
            "packages/core/src/recstack/core/__init__.py": f'__version__ = "{init_version}"\n',
            "packages/sparse-optim/pyproject.toml": (
                f'[project]\nname = "recstack-sparse-optim"\nversion = "{version}"\n'
            ),
            "packages/sparse-optim/src/recstack/sparse_optim/__init__.py": (
                f'"""Doc."""\n\n__version__ = "{version}"\n'
            ),
            "CHANGELOG.md": "# Changelog\n\n## Unreleased\n\n## 1.2.3 (2027-01-31)\n\n- x\n",
        },
    )


def test_release_versions_must_agree(tmp_path: Path) -> None:
    write_release_tree(tmp_path)
    assert release.agreed_version(tmp_path) == "1.2.3"
    write_release_tree(tmp_path, init_version="1.2.4")
    with pytest.raises(release.ReleaseError, match="core/__init__.py: 1.2.4"):
        release.agreed_version(tmp_path)


def test_release_needs_dependency_bounds_that_admit_the_version(tmp_path: Path) -> None:
    write_release_tree(tmp_path)
    pyproject = tmp_path / "packages" / "sparse-optim" / "pyproject.toml"
    base = pyproject.read_text()
    pyproject.write_text(base + 'dependencies = ["torch>=2", "recstack-core>=1.2.0,<1.3"]\n')
    release.check_dependency_bounds(tmp_path, "1.2.3")
    pyproject.write_text(base + 'dependencies = ["recstack-core>=1.1.0,<1.2"]\n')
    with pytest.raises(release.ReleaseError, match="recstack-core>=1.1.0,<1.2 excludes 1.2.3"):
        release.check_dependency_bounds(tmp_path, "1.2.3")


def test_release_needs_a_dated_changelog_section(tmp_path: Path) -> None:
    write_release_tree(tmp_path)
    assert release.changelog_date(tmp_path, "1.2.3") == "2027-01-31"
    (tmp_path / "CHANGELOG.md").write_text("## 1.2.3 (not released yet)\n")
    assert release.changelog_date(tmp_path, "1.2.3") is None
    with pytest.raises(release.ReleaseError, match="no '## 1.2.4' section"):
        release.changelog_date(tmp_path, "1.2.4")


def test_release_uploads_one_wheel_and_one_sdist_per_package(tmp_path: Path) -> None:
    write_release_tree(tmp_path)
    names = release.distributions(tmp_path)
    assert names == {"recstack", "recstack_core", "recstack_sparse_optim"}
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in names:
        (dist / f"{name}-1.2.3-py3-none-any.whl").touch()
        (dist / f"{name}-1.2.3.tar.gz").touch()
    assert len(release.check_dist(dist, "1.2.3", names)) == 6
    (dist / "recstack_core-1.2.3.tar.gz").unlink()
    (dist / "recstack_core-1.2.2.tar.gz").touch()
    with pytest.raises(release.ReleaseError) as error:
        release.check_dist(dist, "1.2.3", names)
    assert "unexpected file recstack_core-1.2.2.tar.gz" in str(error.value)
    assert "recstack_core: 1 wheel(s), 0 sdist(s)" in str(error.value)


def test_the_repository_is_ready_for_its_version() -> None:
    version = release.agreed_version(ROOT)
    release.check_dependency_bounds(ROOT, version)
    release.changelog_date(ROOT, version)  # a section exists (dated at release time)
