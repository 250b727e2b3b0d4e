"""Check the wheels `uv build --all-packages` made: one per package, namespace intact.

Each package wheel must carry its modules and py.typed, must not ship
``recstack/__init__.py`` (PEP 420 namespace shared by all packages), and must declare
exactly the RecStack dependencies the architecture allows, each pinned to a compatible
version range (a lower and an upper bound): a wheel installed from an index must not pull
in a RecStack release it was never built against.
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

EXPECTED = {
    "recstack": {
        "core",
        "columnio",
        "feature-engine",
        "embedding-engine",
        "sparse-optim",
        "saver",
        "pipelines",
    },
    "recstack-core": set(),
    "recstack-columnio": {"core"},
    "recstack-feature-engine": {"core"},
    "recstack-embedding-engine": {"core"},
    "recstack-sparse-optim": {"core"},
    "recstack-saver": {"core"},
    "recstack-pipelines": {
        "core",
        "columnio",
        "feature-engine",
        "embedding-engine",
        "sparse-optim",
        "saver",
    },
}


# PEP 508: the distribution name, then extras, a version specifier and markers.
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def parse_requirement(requirement: str) -> tuple[str, str]:
    """The distribution name of a Requires-Dist entry and its version specifier."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1), match.group(2).strip().strip("()")


def main(dist: Path) -> int:
    wheels = sorted(dist.glob("*.whl"))
    seen: set[str] = set()
    errors: list[str] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        dist_name = meta["Name"]
        seen.add(dist_name)
        requires = [
            parse_requirement(r) for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r
        ]
        recstack = {name: spec for name, spec in requires if name.startswith("recstack-")}
        recstack_deps = {name.removeprefix("recstack-") for name in recstack}
        if recstack_deps != EXPECTED.get(dist_name):
            errors.append(f"{wheel.name}: RecStack deps {sorted(recstack_deps)}")
        for name, spec in sorted(recstack.items()):
            if ">=" not in spec or "<" not in spec.replace("<=", ""):
                errors.append(f"{wheel.name}: {name} needs a version range, has {spec!r}")
        if "recstack/__init__.py" in names:
            errors.append(f"{wheel.name}: ships recstack/__init__.py (breaks the namespace)")
        if dist_name != "recstack":
            module = dist_name.removeprefix("recstack-").replace("-", "_")
            for required in (f"recstack/{module}/__init__.py", f"recstack/{module}/py.typed"):
                if required not in names:
                    errors.append(f"{wheel.name}: missing {required}")
    missing = set(EXPECTED) - seen
    if missing:
        errors.append(f"no wheel for {sorted(missing)}")
    for error in errors:
        print("wheel check:", error)
    print(f"checked {len(wheels)} wheels: {'FAILED' if errors else 'ok'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
