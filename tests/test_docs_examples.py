"""Every ```python example in the docs and the package READMEs runs as written.

A block preceded by the line ``<!-- skip-example -->`` is not run (for torchrun or GPU-only
snippets); blocks of one page run in order in one namespace, so a page can build up.

Fences are found the way Markdown finds them, line by line, so a fence that is never closed
fails its page: Markdown would render the rest of the page as code (or the block as prose
with its comments as headings), and a search for closed fences would silently skip it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("docs/**/*.md"), *ROOT.glob("packages/*/README.md"), ROOT / "README.md"])
SKIP_MARK = "<!-- skip-example -->"
# Pages whose examples train whole models: they run on the torch reference backend, since
# under TRITON_INTERPRET=1 every lookup of every step would go through the interpreter
# (minutes a page); each kernel is checked against its reference by its own tests.
TRAINING_PAGES = {
    ROOT / "docs" / "tutorial.md",
    ROOT / "docs" / "packages" / "pipelines.md",
    ROOT / "packages" / "pipelines" / "README.md",
    *ROOT.glob("docs/pipelines/*.md"),
    *ROOT.glob("docs/models/*.md"),
    ROOT / "docs" / "embedding-engine" / "tiered.md",
}
# CommonMark: a fence is 3+ backticks or tildes, indented or not (superfences nests them in
# admonitions and lists); a backtick fence's info string may not contain a backtick.
_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}(?=[^`]*$)|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    info: str  # the info string after the opening fence ("python", "bash", ...)
    code: str
    line: int  # 1-based line of the opening fence
    skip: bool  # preceded by SKIP_MARK


@dataclass(frozen=True)
class Fences:
    blocks: list[Block]
    unclosed: Block | None  # a block whose closing fence never comes, running to the end


def parse_fences(text: str) -> Fences:
    """The fenced code blocks of a Markdown text, and the one left open at its end if any."""
    blocks: list[Block] = []
    lines = text.splitlines()
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        opening = _OPENING.match(lines[i])
        if opening is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            # A fence nested in an admonition or list holds code indented like the fence.
            body.append(lines[j].removeprefix(indent))
            j += 1
        block = Block(opening["info"].strip(), "\n".join(body), i + 1, previous == SKIP_MARK)
        if j == len(lines):
            return Fences(blocks, block)
        blocks.append(block)
        previous = ""
        i = j + 1
    return Fences(blocks, None)


@cache
def page_fences(page: Path) -> Fences:
    return parse_fences(page.read_text())


def _examples(page: Path) -> list[str]:
    return [
        b.code for b in page_fences(page).blocks if b.info.split()[:1] == ["python"] and not b.skip
    ]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if _examples(p)], ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    backend = contextlib.nullcontext()
    if page in TRAINING_PAGES:
        from recstack.core import kernels

        backend = kernels.use_backend("torch")
    with backend:
        _run_page(page, namespace, tmp_path)


def _run_page(page: Path, namespace: dict[str, object], tmp_path: Path) -> None:
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


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_fence_is_closed(page: Path) -> None:
    unclosed = page_fences(page).unclosed
    assert unclosed is None, (
        f"{_page_id(page)}: the ```{unclosed.info} fence opened on line {unclosed.line} is "
        "never closed, so the rest of the page renders wrongly and its example never runs"
    )


def test_docs_home_page_has_a_python_example() -> None:
    # The home page's first example once went unrun because its fence was left open.
    assert _examples(ROOT / "docs" / "index.md")


def test_parse_fences_finds_an_unclosed_fence() -> None:
    text = (
        "# Title\n\n```bash\nls\n```\n\n## A first taste\n\n```python\nimport torch\n# a comment\n"
    )
    fences = parse_fences(text)
    assert [b.info for b in fences.blocks] == ["bash"]
    assert fences.unclosed is not None
    assert (fences.unclosed.info, fences.unclosed.line) == ("python", 9)
    assert fences.unclosed.code == "import torch\n# a comment"


def test_parse_fences_follows_markdown_rules() -> None:
    text = "\n".join(
        [
            SKIP_MARK,
            "",
            "```python",
            "run_on_gpu()",
            "```",
            "!!! note",
            "    ````python title='x.py'",
            "    print('```')",
            "    ```",  # shorter than the opening fence: part of the code
            "    ````",
            "~~~text",
            "```",
            "~~~",
        ]
    )
    fences = parse_fences(text)
    assert fences.unclosed is None
    assert [(b.info, b.line, b.skip) for b in fences.blocks] == [
        ("python", 3, True),
        ("python title='x.py'", 7, False),
        ("text", 11, False),
    ]
    assert fences.blocks[1].code == "print('```')\n```"
    assert fences.blocks[2].code == "```"
