"""The docs and READMEs agree on what each package's status is, and say it in their own words.

README.md's package table is the reference: the docs home page's table must give every
package the same status, and a package page or README that carries a ``**Status:**`` line
must open it with that status. Readers outside the tracker cannot follow issue numbers, so
no page may lean on one (the word "issue" and a number, or "#" and a number); pages say
what works instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
PAGES = sorted([*ROOT.glob("docs/**/*.md"), *ROOT.glob("packages/*/README.md"), ROOT / "README.md"])

_IMPORT = re.compile(r"`(recstack\.[a-z_]+)`")
_STATUS_LINE = re.compile(r"^\*\*Status:\*\*\s*(?P<rest>.*)$", re.M)
_ISSUE_REF = re.compile(
    r"\b(?:issues?|pull\s+requests?|PRs?|tickets?)\s*(?:no\.?\s*)?#?\s*\d+\b"
    r"|(?<![\w&#/])#\d+\b",  # a hash and digits, but not an HTML entity or a URL fragment
    re.I,
)


def table_statuses(text: str, page: str) -> dict[str, str]:
    """``{import name: status}`` from the Markdown table whose header ends in ``status``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or header[-1] != "status":
            continue
        out: dict[str, str] = {}
        for row in lines[i + 2 :]:
            if not row.lstrip().startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            names = [m for c in cells[:-1] for m in _IMPORT.findall(c)]
            assert names, f"{page}: no `recstack.<name>` in the table row {row!r}"
            out[names[0]] = cells[-1]
        return out
    raise AssertionError(f"{page}: no table with a status column")


def status_word(status: str) -> str:
    """``"available (speed target open)"`` -> ``"available"``: the status without remarks."""
    return re.split(r"[(:.;,]", status, maxsplit=1)[0].strip().lower()


def readme_statuses() -> dict[str, str]:
    return table_statuses((ROOT / "README.md").read_text(), "README.md")


def test_readme_table_lists_every_package() -> None:
    listed = set(readme_statuses())
    assert listed == {f"recstack.{name.replace('-', '_')}" for name in PACKAGES}


def test_docs_index_status_matches_readme() -> None:
    index = table_statuses((ROOT / "docs" / "index.md").read_text(), "docs/index.md")
    readme = readme_statuses()
    assert set(index) == set(readme), "docs/index.md and README.md list different packages"
    disagree = {k: (readme[k], index[k]) for k in readme if readme[k] != index[k]}
    assert not disagree, f"status differs (README.md, docs/index.md): {disagree}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_pages_open_their_status_with_the_table_status(package: str) -> None:
    expected = status_word(readme_statuses()[f"recstack.{package.replace('-', '_')}"])
    for page in (
        ROOT / "docs" / "packages" / f"{package}.md",
        ROOT / "packages" / package / "README.md",
    ):
        if not page.exists():
            continue
        for match in _STATUS_LINE.finditer(page.read_text()):
            got = status_word(match["rest"])
            assert got == expected, (
                f"{page.relative_to(ROOT)}: status line says {match['rest'][:60]!r}, but "
                f"README.md's table says {expected!r} for {package}"
            )


def test_status_word_ignores_remarks() -> None:
    assert status_word("available (speed target open)") == "available"
    assert status_word("planned. For now the package is a skeleton") == "planned"
    assert status_word("in progress: two of six optimizers") == "in progress"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_cite_no_issue_numbers(page: Path) -> None:
    text = page.read_text()
    found = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for m in _ISSUE_REF.finditer(text)
    ]
    assert not found, f"{page.relative_to(ROOT)} refers to issue numbers: {found}"


_N = 1234  # any number: the samples below are made up, not references


@pytest.mark.parametrize(
    "text",
    [
        f"in progress (issue {_N})",
        f"Workload (issue {_N}):",
        f"see Issue #{_N}",
        f"fixed in #{_N}.",
        f"PR {_N}",
    ],
)
def test_issue_references_are_found(text: str) -> None:
    assert _ISSUE_REF.search(text)


@pytest.mark.parametrize(
    "text",
    ["the issue's target", "[Benchmarks](../benchmarks.md#embedding-engine)", "&#38;", "# 2 rows"],
)
def test_plain_text_is_not_an_issue_reference(text: str) -> None:
    assert not _ISSUE_REF.search(text)
