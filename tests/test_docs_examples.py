"""Every ```python example in the docs and the package READMEs runs as written.

A block preceded by the line ``<!-- skip-example -->`` is not run (for torchrun or GPU-only
snippets); blocks of one page run in order in one namespace, so a page can build up.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("docs/**/*.md"), *ROOT.glob("packages/*/README.md"), ROOT / "README.md"])
_FENCE = re.compile(r"(<!-- skip-example -->\s*\n)?```python[^\n]*\n(.*?)\n```", re.S)


def _examples(page: Path) -> list[str]:
    return [code for skip, code in _FENCE.findall(page.read_text()) if not skip]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _examples(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_examples_run(page: Path, tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    for number, code in enumerate(_examples(page)):
        # Each block runs from a file of its own: @triton.jit reads its function's source,
        # which code compiled from a string does not have on a GPU.
        source = tmp_path / f"{page.stem}_example_{number}.py"
        source.write_text(code + "\n")
        try:
            exec(compile(code, str(source), "exec"), namespace)
        except Exception as exc:  # the page and block make the failure easy to find
            raise AssertionError(
                f"{page.relative_to(ROOT)} example {number} failed: {exc!r}"
            ) from exc
