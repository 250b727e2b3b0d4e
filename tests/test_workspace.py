"""The workspace's layout and import rules.

Seven packages under ``packages/``, each a distribution ``recstack-<dir>`` with its sources
in the PEP 420 namespace ``recstack``; dependencies point one way (every package may use
core, only pipelines uses the others), checked both in the sources and by importing each
package with its undeclared siblings blocked; and no package imports another package's
private (single-underscore) names or modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "core": [],
    "columnio": ["core"],
    "feature-engine": ["core"],
    "embedding-engine": ["core"],
    "sparse-optim": ["core"],
    "saver": ["core"],
    "pipelines": [
        "core",
        "columnio",
        "feature-engine",
        "embedding-engine",
        "sparse-optim",
        "saver",
    ],
}


def _module(directory: str) -> str:
    return directory.replace("-", "_")


def _pyproject(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def _recstack_deps(project: dict) -> set[str]:
    deps = set()
    for req in project["project"].get("dependencies", []):
        name = req.split(";")[0].strip().split(" ")[0]
        for sep in "<>=!~[":
            name = name.split(sep)[0]
        if name.startswith("recstack-"):
            deps.add(name.removeprefix("recstack-"))
    return deps


def test_root_is_workspace_and_meta_package() -> None:
    root = _pyproject(ROOT / "pyproject.toml")
    assert root["project"]["name"] == "recstack"
    assert root["tool"]["uv"]["workspace"]["members"] == ["packages/*"]
    assert _recstack_deps(root) == set(PACKAGES)
    found = sorted(p.name for p in (ROOT / "packages").iterdir() if p.is_dir())
    assert found == sorted(PACKAGES)


@pytest.mark.parametrize("directory", sorted(PACKAGES))
def test_package_layout(directory: str) -> None:
    pkg = ROOT / "packages" / directory
    project = _pyproject(pkg / "pyproject.toml")
    assert project["project"]["name"] == f"recstack-{directory}"
    assert _recstack_deps(project) == set(PACKAGES[directory])
    src = pkg / "src" / "recstack"
    assert not (src / "__init__.py").exists(), "recstack is a PEP 420 namespace"
    assert (src / _module(directory) / "__init__.py").is_file()
    assert (src / _module(directory) / "py.typed").is_file()
    assert (pkg / "tests").is_dir() and any((pkg / "tests").glob("test_*.py"))
    readme = (pkg / "README.md").read_text()
    assert "pip install recstack-" in readme and "```python" in readme


def _imported_recstack_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "recstack" and len(parts) > 1:
                found.add(parts[1].replace("_", "-"))
    return found


@pytest.mark.parametrize("directory", sorted(PACKAGES))
def test_imports_point_one_way(directory: str) -> None:
    allowed = {directory, *PACKAGES[directory]}
    for path in sorted((ROOT / "packages" / directory / "src").rglob("*.py")):
        bad = _imported_recstack_packages(path) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports sibling package(s) {sorted(bad)}"


_ISOLATED_IMPORT = """
import importlib, pkgutil, sys
allowed = set(sys.argv[2].split(",")) if sys.argv[2] else set()
target = sys.argv[1]

class Blocker:
    def find_spec(self, name, path=None, target_=None):
        parts = name.split(".")
        if parts[0] == "recstack" and len(parts) > 1 and parts[1] not in allowed | {target}:
            raise ImportError(f"{target} must not import {name}")
        return None

sys.meta_path.insert(0, Blocker())
pkg = importlib.import_module("recstack." + target)
for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
    importlib.import_module(info.name)
print("ok")
"""


@pytest.mark.parametrize("directory", sorted(PACKAGES))
def test_imports_without_undeclared_siblings(directory: str) -> None:
    allowed = ",".join(_module(d) for d in PACKAGES[directory])
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATED_IMPORT, _module(directory), allowed],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def _private(name: str) -> bool:
    """A single-underscore name (``_x``), not a dunder (``__all__``)."""
    return name.startswith("_") and not name.startswith("__")


def _foreign_private_imports(path: Path, package: str) -> list[str]:
    """``file:line: what`` for each import in ``path`` (a file of ``package``, the module
    name) of a private name or module of another recstack package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        modules: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [(node.module, [alias.name for alias in node.names])]
        for module, names in modules:
            parts = module.split(".")
            if parts[0] != "recstack" or len(parts) < 2 or parts[1] == package:
                continue
            private = [p for p in parts if _private(p)] + [n for n in names if _private(n)]
            if private:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append(f"{where}: {module} -> {', '.join(private)}")
    return found


def test_no_package_imports_another_packages_private_names() -> None:
    offenders = []
    for directory in sorted(PACKAGES):
        for folder in ("src", "tests"):
            for path in sorted((ROOT / "packages" / directory / folder).rglob("*.py")):
                offenders += _foreign_private_imports(path, _module(directory))
    assert not offenders, (
        "private names or modules imported across packages (make them public where they "
        "live, or move what is shared into core):\n" + "\n".join(offenders)
    )


def test_docstring_examples_are_an_examples_section() -> None:
    # The API reference (griffe, Google style) renders only an "Examples:" section's
    # ">>>" lines as code; under "Example:" they render as nested Markdown quotes.
    offenders = []
    for path in sorted((ROOT / "packages").glob("*/src/**/*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() == "Example:":
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, "write 'Examples:' (plural) for doctest examples:\n" + "\n".join(
        offenders
    )
