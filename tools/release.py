"""Publish a RecStack release to PyPI: every package, one version, one command.

Run it from a clean checkout of the commit to release, with the version bumped and the
changelog entry dated (docs/releasing.md has the whole procedure)::

    python tools/release.py --dry-run   # every check and the build; stops before uploading
    python tools/release.py             # the same, then `uv publish`
    python tools/release.py -- --index testpypi   # arguments after -- go to `uv publish`

It stops at the first failed step:

1. the git work tree is clean (no change, no untracked file), so what is built is what is
   committed (``--allow-dirty`` turns this into a warning, for rehearsals only);
2. every version agrees: the root ``pyproject.toml`` (the ``recstack`` meta-package), each
   ``packages/*/pyproject.toml`` and each package's ``__version__``; and the bounds of
   every requirement of one RecStack package on another admit it;
3. ``CHANGELOG.md`` has a dated section for that version (without a date, a dry run only
   warns);
4. no ``v<version>`` tag points at another commit;
5. ``uv build --all-packages`` builds one sdist and one wheel per package into
   ``dist/<version>/``;
6. ``.ci/check_wheels.py`` checks the wheels (modules, ``py.typed``, no
   ``recstack/__init__.py``, the allowed dependencies), and each distribution has exactly
   one wheel and one sdist of that version;
7. ``uv publish`` uploads them (credentials as uv reads them: ``UV_PUBLISH_TOKEN``, or
   trusted publishing from CI). ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the uv workspace)."""

VERSION_LINE = re.compile(r'^__version__ = "(?P<version>[^"]+)"$', re.MULTILINE)
"""How each package's ``__init__.py`` states its version."""

DIST_FILE = re.compile(
    r"^(?P<name>recstack(?:_[a-z_]+)?)-(?P<version>[^-]+?)(?:-py3-none-any\.whl|\.tar\.gz)$"
)
"""A wheel or sdist file name of one of the distributions (names normalized with ``_``)."""


class ReleaseError(Exception):
    """A check failed: the release stops here."""


def run(cmd: list[str], *, capture: bool = False) -> str:
    """Run ``cmd`` in the repository root; return its stdout when ``capture``.

    Args:
        cmd: The command and its arguments.
        capture: Capture and return stdout instead of letting it through.

    Raises:
        ReleaseError: The command failed.
    """
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=capture, check=False)
    if done.returncode != 0:
        detail = f":\n{done.stderr.strip()}" if capture and done.stderr else ""
        raise ReleaseError(f"{cmd[0]} exited with status {done.returncode}{detail}")
    return done.stdout if capture else ""


def check_clean_tree() -> None:
    """Fail when the work tree has changes or untracked files.

    Raises:
        ReleaseError: ``git status`` lists something.
    """
    status = run(["git", "status", "--porcelain"], capture=True)
    if status.strip():
        listed = "\n".join(f"  {line}" for line in status.splitlines()[:20])
        raise ReleaseError(f"the work tree is not clean (commit or remove these):\n{listed}")


def versions(root: Path) -> dict[str, str]:
    """Every version statement of the release, by where it is.

    Args:
        root: The repository root.
    """
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    out = {"pyproject.toml": str(meta["version"])}
    for pyproject in sorted(root.glob("packages/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        out[str(pyproject.relative_to(root))] = str(project["version"])
        module = project["name"].removeprefix("recstack-").replace("-", "_")
        init = pyproject.parent / "src" / "recstack" / module / "__init__.py"
        match = VERSION_LINE.search(init.read_text()) if init.exists() else None
        out[str(init.relative_to(root))] = match["version"] if match else "(none)"
    return out


def agreed_version(root: Path) -> str:
    """The one version every package states.

    Args:
        root: The repository root.

    Raises:
        ReleaseError: Two statements differ (all are listed).
    """
    found = versions(root)
    distinct = set(found.values())
    if len(distinct) != 1:
        listed = "\n".join(f"  {where}: {version}" for where, version in found.items())
        raise ReleaseError(f"the versions disagree:\n{listed}")
    return distinct.pop()


def check_dependency_bounds(root: Path, version: str) -> None:
    """Fail when a package's requirement on another RecStack package excludes ``version``.

    The packages require each other within one release series (``recstack-core>=0.1.0,<0.2``),
    so a version bump that leaves the bounds behind would publish packages that cannot be
    installed together.

    Args:
        root: The repository root.
        version: The version being released.

    Raises:
        ReleaseError: Some bounds exclude ``version`` (all are listed).
    """
    problems = []
    for pyproject in [root / "pyproject.toml", *sorted(root.glob("packages/*/pyproject.toml"))]:
        project = tomllib.loads(pyproject.read_text())["project"]
        for text in project.get("dependencies", []):
            requirement = Requirement(text)
            if requirement.name.startswith("recstack-") and not requirement.specifier.contains(
                version, prereleases=True
            ):
                where = pyproject.relative_to(root)
                problems.append(f"  {where}: {text} excludes {version}")
    if problems:
        raise ReleaseError(
            "RecStack dependency bounds need the new version:\n" + "\n".join(problems)
        )


def changelog_date(root: Path, version: str) -> str | None:
    """The release date of ``version``'s CHANGELOG.md section, or ``None`` if undated.

    A dated section's heading is ``## <version> (YYYY-MM-DD)``.

    Args:
        root: The repository root.
        version: The version being released.

    Raises:
        ReleaseError: The changelog has no section for ``version``.
    """
    text = (root / "CHANGELOG.md").read_text()
    heading = re.search(rf"^## {re.escape(version)}\b(?P<rest>.*)$", text, re.MULTILINE)
    if heading is None:
        raise ReleaseError(f"CHANGELOG.md has no '## {version}' section")
    date = re.fullmatch(r"\s*\((?P<date>\d{4}-\d{2}-\d{2})\)\s*", heading["rest"])
    return date["date"] if date else None


def check_tag(version: str) -> None:
    """Fail when tag ``v<version>`` exists on a commit other than ``HEAD``.

    Args:
        version: The version being released.

    Raises:
        ReleaseError: The tag names another commit (that version was released already).
    """
    tag = f"v{version}"
    if not run(["git", "tag", "--list", tag], capture=True).strip():
        return
    tagged = run(["git", "rev-list", "-n", "1", tag], capture=True).strip()
    head = run(["git", "rev-parse", "HEAD"], capture=True).strip()
    if tagged != head:
        raise ReleaseError(f"tag {tag} exists on {tagged[:12]}, not on HEAD: bump the version")


def check_dist(dist: Path, version: str, expected: set[str]) -> list[Path]:
    """The files to upload: one wheel and one sdist of ``version`` per distribution.

    Args:
        dist: The build's output directory.
        version: The version being released.
        expected: The distribution names, normalized (``recstack_core``, ...).

    Raises:
        ReleaseError: A file is missing, extra, or of another version.
    """
    files = sorted(p for p in dist.iterdir() if p.is_file() and not p.name.startswith("."))
    wheels: dict[str, int] = {}
    sdists: dict[str, int] = {}
    problems = []
    for path in files:
        match = DIST_FILE.match(path.name)
        if match is None or match["version"] != version:
            problems.append(f"unexpected file {path.name}")
            continue
        kind = wheels if path.name.endswith(".whl") else sdists
        kind[match["name"]] = kind.get(match["name"], 0) + 1
    for name in sorted(expected):
        if wheels.get(name) != 1 or sdists.get(name) != 1:
            problems.append(
                f"{name}: {wheels.get(name, 0)} wheel(s), {sdists.get(name, 0)} sdist(s)"
            )
    for name in sorted((set(wheels) | set(sdists)) - expected):
        problems.append(f"{name}: not a package of this workspace")
    if problems:
        raise ReleaseError(
            "the build output is not one wheel and one sdist per package:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return files


def distributions(root: Path) -> set[str]:
    """Every distribution the release publishes, names normalized with ``_``.

    Args:
        root: The repository root.
    """
    names = {tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]}
    for pyproject in root.glob("packages/*/pyproject.toml"):
        names.add(tomllib.loads(pyproject.read_text())["project"]["name"])
    return {name.replace("-", "_") for name in names}


def release(dry_run: bool, allow_dirty: bool, publish_args: list[str]) -> None:
    """Check, build, check the build, then publish (unless ``dry_run``).

    Args:
        dry_run: Stop before uploading (and only warn about an undated changelog).
        allow_dirty: Only warn about a dirty work tree.
        publish_args: Extra arguments for ``uv publish``.

    Raises:
        ReleaseError: A step failed.
    """
    print("1. the work tree is clean")
    try:
        check_clean_tree()
    except ReleaseError as error:
        if not allow_dirty:
            raise
        print(f"   warning (--allow-dirty): {error}")

    print("2. every version agrees")
    version = agreed_version(ROOT)
    check_dependency_bounds(ROOT, version)
    print(f"   version {version}, and every RecStack dependency's bounds admit it")

    print("3. CHANGELOG.md has a dated section")
    date = changelog_date(ROOT, version)
    if date is None:
        message = f"CHANGELOG.md's '## {version}' heading has no '(YYYY-MM-DD)' release date"
        if not dry_run:
            raise ReleaseError(message)
        print(f"   warning (--dry-run): {message}")
    else:
        print(f"   released {date}")

    print(f"4. no tag v{version} on another commit")
    check_tag(version)

    dist = ROOT / "dist" / version
    print(f"5. build every package into {dist.relative_to(ROOT)}/")
    if dist.exists():
        shutil.rmtree(dist)
    run(["uv", "build", "--all-packages", "--out-dir", str(dist), "--no-build-logs"])

    print("6. check the wheels and sdists")
    run([sys.executable, str(ROOT / ".ci" / "check_wheels.py"), str(dist)])
    files = check_dist(dist, version, distributions(ROOT))
    print(f"   {len(files)} files")

    command = ["uv", "publish", *publish_args, *(str(f) for f in files)]
    if dry_run:
        print("7. dry run: not publishing. The upload would be:")
        print(f"   {' '.join(command)}")
        return
    print("7. publish")
    run(command)
    print(f"published {version}; tag it: git tag v{version} && git push origin v{version}")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and release; return the exit status.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when omitted).
    """
    parser = argparse.ArgumentParser(
        description="Check, build and publish every RecStack package (see docs/releasing.md).",
    )
    parser.add_argument("--dry-run", action="store_true", help="stop before uploading")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="only warn about uncommitted changes (for rehearsals, never for a release)",
    )
    parser.add_argument("publish_args", nargs="*", help="after --: extra arguments for uv publish")
    args = parser.parse_args(argv)
    try:
        release(args.dry_run, args.allow_dirty, args.publish_args)
    except ReleaseError as error:
        print(f"release stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
