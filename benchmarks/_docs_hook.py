"""MkDocs hook: the benchmarks pages' results, rendered from ``benchmarks/results/``.

Registered under ``hooks:`` in ``mkdocs.yml``. Each build reads the result files once, adds
the charts to the site as generated files (so links to them are checked like any other)
and replaces the result markers of every page (``_results_page.py``). A file that is not a
valid result is a warning, which ``mkdocs build --strict`` turns into a failure; an empty
or missing results folder is not: the pages then say the benchmarks have not run yet.
"""

from __future__ import annotations

import logging
from pathlib import Path

from _results_page import ResultsPage  # mkdocs puts this folder on sys.path while loading
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

RESULTS_DIR = Path(__file__).resolve().parent / "results"
log = logging.getLogger("mkdocs.hooks.benchmarks")
_page: ResultsPage | None = None


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Read the results and add their charts to the site."""
    global _page
    _page = ResultsPage(RESULTS_DIR)
    for problem in _page.problems:
        log.warning("benchmark results: %s", problem)
    for src_uri, svg in _page.charts.items():
        files.append(File.generated(config, src_uri, content=svg))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace the page's result markers with tables and charts."""
    if _page is None:
        return markdown
    filled, problems = _page.fill(markdown, page.file.src_uri)
    for problem in problems:
        log.warning("benchmark results: %s", problem)
    return filled
