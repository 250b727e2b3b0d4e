"""The benchmarks' shared result format, the page rendered from it, and the committed files.

``benchmarks/_results.py`` writes and reads one JSON format for every benchmark;
``benchmarks/_results_page.py`` turns a folder of such files into the benchmarks page's
tables and SVG charts at docs build time. These tests check both on sample results in a
temporary folder, that every result committed under ``benchmarks/results/`` follows the
schema, and that every benchmark script offers ``--json`` in that format.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
COMMITTED = sorted((BENCHMARKS / "results").glob("*.json"))
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
PAGES = sorted((ROOT / "docs").glob("benchmarks*.md"))


def _import_benchmark_modules():
    # The scripts import these by plain name from their own folder, and so do these tests.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _results
        import _results_page
    finally:
        sys.path.remove(str(BENCHMARKS))
    return _results, _results_page


results, page = _import_benchmark_modules()


def _result(card: str = "NVIDIA Test Card", date: str = "2026-12-01", **kw) -> results.Result:
    rows = kw.pop(
        "rows",
        [
            results.measurement(
                "gather, 1M rows",
                0.002,
                0.006,
                baseline="`index_select`",
                nbytes=10**6,
                bandwidth=1e9,
                notes="trusted ids",
            ),
            results.Measurement("hash, strings", 12.5, "billion keys/s", "torch ops", None, 3.5),
        ],
    )
    fields = {
        "benchmark": "demo",
        "title": "Demo benchmark",
        "card": card,
        "date": date,
        "versions": {"torch": "2.11", "triton": "3.6", "python": None, "recstack": None},
        "workload": {"rows": 1_000_000},
        "rows": rows,
        "copy_bandwidth": 1e9,
    }
    return results.Result(**{**fields, **kw})


# ------------------------------------------------------------------------------ the format


def test_measurement_computes_ratio_and_mbu() -> None:
    row = results.measurement("op", 0.002, 0.006, baseline="b", nbytes=10**6, bandwidth=1e9)
    assert (row.ours, row.unit, row.baseline_value) == (pytest.approx(2.0), "ms", pytest.approx(6))
    assert row.ratio == pytest.approx(3.0)
    assert row.mbu == pytest.approx(0.5) and row.baseline_mbu == pytest.approx(1 / 6)
    alone = results.measurement("op", 0.002)
    assert alone.baseline_value is alone.ratio is alone.mbu is None


def test_write_then_read_gives_the_same_result(tmp_path: Path) -> None:
    result = _result()
    path = results.write(result, tmp_path / "run.json")
    assert results.read(path) == result
    data = json.loads(path.read_text())
    assert list(data)[0] == "schema" and data["schema"] == results.SCHEMA_VERSION
    assert results.validate(data) == []


def test_write_to_a_folder_uses_the_default_name_and_never_overwrites(tmp_path: Path) -> None:
    result = _result(date="2026-12-01T10:11:12Z")
    first = results.write(result, tmp_path)
    second = results.write(result, str(tmp_path) + os.sep)
    assert first.name == "demo-nvidia-test-card-2026-12-01.json"
    assert second.name == "demo-nvidia-test-card-2026-12-01-2.json"


def test_json_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    results.add_json_option(parser)
    assert parser.parse_args([]).json is None
    assert results.save(_result(), parser.parse_args([]).json) is None
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    bare = results.save(_result(), parser.parse_args(["--json"]).json)
    assert bare == tmp_path / "results" / "demo-nvidia-test-card-2026-12-01.json"
    named = results.save(_result(), parser.parse_args(["--json", str(tmp_path / "a.json")]).json)
    assert named == tmp_path / "a.json" and named.exists()


def test_new_result_records_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setattr(sys, "argv", ["benchmarks/demo.py", "--rows", "5", "--json"])
    args = argparse.Namespace(rows=5, path=Path("/tmp/x"), json="<auto>")
    result = results.new_result("demo", "Demo", "cpu", args, copy_bandwidth=2e9, extra_lib="1.0")
    assert result.card == "cpu" and result.copy_bandwidth == 2e9
    assert result.workload == {"rows": 5, "path": "/tmp/x"}  # --json is not the workload
    assert result.command == "python benchmarks/demo.py --rows 5 --json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result.date)
    assert {"torch", "triton", "python", "recstack", "extra_lib"} <= set(result.versions)
    assert results.validate(result.to_dict()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.pop("card"), "lacks 'card'"),
        (lambda d: d.update(speed=1), "unknown result field 'speed'"),
        (lambda d: d.update(date="28 Nov"), "date '28 Nov'"),
        (lambda d: d.update(copy_bandwidth=-1.0), "copy_bandwidth"),
        (lambda d: d["versions"].pop("triton"), "versions lacks ['triton']"),
        (lambda d: d["rows"][0].update(ratio=-2.0), "rows[0]: ratio -2.0 is negative"),
        (lambda d: d["rows"][0].update(ours="fast"), "rows[0]: ours is str"),
        (lambda d: d["rows"][0].update(ours=True), "rows[0]: ours is bool"),
        (lambda d: d["rows"][1].update(baseline=None), "baseline_value without a baseline"),
        (lambda d: d["rows"][0].update(mbu=math.nan), "not a finite number"),
        (lambda d: d.update(rows={}), "rows is dict"),
    ],
)
def test_validate_names_each_problem(change, problem: str) -> None:
    data = _result(rows=[
        results.Measurement("a", 1.0, "ms", "b", 2.0, 2.0),
        results.Measurement("c", 1.0, "ms", "d", 2.0, 2.0),
    ]).to_dict()  # fmt: skip
    change(data)
    found = results.validate(data)
    assert any(problem in p for p in found), found


def test_read_and_write_refuse_invalid_results(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 1}')
    with pytest.raises(results.ResultError, match="bad.json: result lacks 'benchmark'"):
        results.read(bad)
    bad.write_text("{not json")
    with pytest.raises(results.ResultError, match="bad.json"):
        results.read(bad)
    broken = _result(rows=[results.Measurement("x", 1.0, "ms", ratio=-1.0)])
    with pytest.raises(results.ResultError, match="negative"):
        results.write(broken, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_latest_takes_the_newest_run_per_benchmark_and_card(tmp_path: Path) -> None:
    runs = {
        "demo-a-2026-12-01.json": _result("A", "2026-12-01"),
        "demo-a-2026-12-01-2.json": _result("A", "2026-12-01"),  # later the same day
        "demo-a-2026-11-30.json": _result("A", "2026-11-30"),
        "demo-cpu-2026-12-02.json": _result("cpu", "2026-12-02"),
        "demo-b-2026-12-01.json": _result("B", "2026-12-01T08:00:00Z"),  # after the bare day
        "demo-b-2026-12-01-2.json": _result("B", "2026-12-01"),
    }
    for name, result in runs.items():
        results.write(result, tmp_path / name)
    found, problems = results.load_dir(tmp_path)
    assert problems == [] and len(found) == len(runs)
    chosen = [path.name for path, _ in results.latest(found)]
    assert chosen == [
        "demo-a-2026-12-01-2.json", "demo-b-2026-12-01.json", "demo-cpu-2026-12-02.json",
    ]  # fmt: skip


def test_card_slug() -> None:
    assert results.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results.card_slug("cpu") == "cpu"


# ------------------------------------------------------------------------------ the page


def test_page_renders_tables_and_svg_charts(tmp_path: Path) -> None:
    results.write(_result(), tmp_path / "demo-nvidia-test-card-2026-12-01.json")
    cpu_rows = [results.Measurement("gather, 1M rows", 4.0, "ms", "index_select", 2.0, 0.5)]
    results.write(_result("cpu", host="Some CPU (2 cores)", rows=cpu_rows), tmp_path / "cpu.json")
    rendered = page.ResultsPage(tmp_path)
    assert rendered.problems == []
    assert set(rendered.charts) == {
        "assets/benchmarks/demo-nvidia-test-card.svg",
        "assets/benchmarks/demo-cpu.svg",
    }
    for svg in rendered.charts.values():
        assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
        assert b"gather, 1M rows" in svg  # the labels are text, not paths
    text, problems = rendered.fill("# Title\n\n<!-- benchmark-results: demo -->\n", "benchmarks.md")
    assert problems == []
    assert "| workload | ours | baseline | ratio | MBU ours / baseline |" in text
    gather = "| gather, 1M rows <sup>1</sup> | 2 ms | 6 ms<br>index_select | 3.00x | 50% / 17% |"
    assert gather in text
    assert "| hash, strings | 12.5 billion keys/s | torch ops | 3.50x | – |" in text
    assert "<sup>1</sup> trusted ids" in text
    assert "![demo on NVIDIA Test Card: speedup and MBU per workload]" in text
    assert "(assets/benchmarks/demo-nvidia-test-card.svg)" in text
    # The GPU first, the CPU last, named by its host.
    assert text.index("**NVIDIA Test Card**") < text.index("**CPU: Some CPU (2 cores)**")
    nested, _ = rendered.fill("<!-- benchmark-results: demo -->", "sub/page.md")
    assert "(../assets/benchmarks/demo-cpu.svg)" in nested


def test_page_leaves_out_empty_columns_and_charts() -> None:
    rows = [results.Measurement("sweep, 2 warps", 0.1, "ms"), results.Measurement("x", 2, "ms")]
    result = _result(rows=rows)
    assert page.table(result.rows).splitlines()[0] == "| workload | ours |"
    assert page.chart_svg(result) is None
    assert page.table([]) == "*(no measurements)*"


def test_page_file_marker_and_unknown_names(tmp_path: Path) -> None:
    results.write(_result(), tmp_path / "demo-one.json")
    rendered = page.ResultsPage(tmp_path)
    text, problems = rendered.fill(
        "<!-- benchmark-result-file: demo-one.json -->\n\n"
        "<!-- benchmark-results: other -->\n\n"
        "<!-- benchmark-result-file: missing.json -->\n"
    )
    assert "| gather, 1M rows <sup>1</sup> |" in text and "![" not in text  # no chart there
    assert page.NOT_RUN in text
    assert problems == ["benchmarks.md: no result file 'missing.json'"]


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_page_with_no_results_says_not_run_yet(tmp_path: Path, folder: str) -> None:
    if folder == "empty":
        (tmp_path / folder).mkdir()
    rendered = page.ResultsPage(tmp_path / folder)
    assert rendered.charts == {} and rendered.problems == []
    text, problems = rendered.fill("intro\n\n<!-- benchmark-results: core, saver -->\n")
    assert text == f"intro\n\n{page.NOT_RUN}\n" and problems == []


def test_page_reports_an_invalid_file_and_renders_the_rest(tmp_path: Path) -> None:
    results.write(_result(), tmp_path / "good.json")
    (tmp_path / "bad.json").write_text('{"schema": 1, "benchmark": "demo"}')
    rendered = page.ResultsPage(tmp_path)
    assert len(rendered.problems) == 1 and "bad.json" in rendered.problems[0]
    assert "| gather, 1M rows" in rendered.fill("<!-- benchmark-results: demo -->")[0]


def test_numbers_keep_their_recorded_digits() -> None:
    assert [page.number(v) for v in (0.238, 12.459, 4685, 59.3, 1.0, 2_032_000, 0.05)] == [
        "0.238", "12.459", "4,685", "59.3", "1", "2,032,000", "0.05",
    ]  # fmt: skip
    assert [page.ratio_text(r) for r in (3.2871, 17.2, 0.0129)] == ["3.29x", "17.20x", "0.013x"]


# ------------------------------------------------------------------------------ the repository


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_results_follow_the_schema(path: Path) -> None:
    result = results.read(path)
    assert (BENCHMARKS / f"{result.benchmark}.py").exists(), f"no benchmarks/{result.benchmark}.py"
    stem = f"{result.benchmark}-{results.card_slug(result.card)}-{result.date[:10]}"
    assert re.fullmatch(rf"{re.escape(stem)}(-\d+)?\.json", path.name), (
        f"{path.name} should be named {stem}.json (or {stem}-N.json)"
    )


def test_results_are_committed() -> None:
    assert COMMITTED, "benchmarks/results/ holds no result files"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_writes_the_shared_format(script: Path) -> None:
    tree = ast.parse(script.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "_results"
        for alias in node.names
    }
    assert {"add_json_option", "save"} <= imported, f"{script.name} lacks the shared --json"
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"add_json_option", "save"} <= calls
    text = script.read_text()
    assert "json.dumps" not in text, f"{script.name} writes JSON of its own"


@pytest.mark.parametrize("doc", PAGES, ids=lambda p: p.name)
def test_docs_markers_name_benchmarks_and_files_that_exist(doc: Path) -> None:
    text = doc.read_text()
    for match in page.RESULTS_MARKER.finditer(text):
        for name in match["names"].split(","):
            assert (BENCHMARKS / f"{name.strip()}.py").exists(), f"{doc.name}: {name!r}"
    for match in page.FILE_MARKER.finditer(text):
        assert (BENCHMARKS / "results" / match["name"]).exists(), f"{doc.name}: {match['name']}"


def test_every_benchmark_has_a_place_on_the_page() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    named = {
        name.strip() for m in page.RESULTS_MARKER.finditer(text) for name in m["names"].split(",")
    }
    assert named == {p.stem for p in SCRIPTS}


@pytest.mark.slow
def test_a_cpu_run_writes_a_valid_result(tmp_path: Path) -> None:
    # The reference path on tiny sizes: this checks the file, not the speed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [
        sys.executable, "benchmarks/core.py", "--device", "cpu", "--table-rows", "4096",
        "--batch", "512", "--strings", "256", "--page-rows", "1024", "--repeat", "2",
        "--json", str(tmp_path) + os.sep,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("core-cpu-*.json")
    result = results.read(path)
    assert result.card == "cpu" and result.workload["table_rows"] == 4096
    assert len(result.rows) == 11 and all(r.ratio and r.mbu is not None for r in result.rows)
    assert f"results written to {path}" in done.stdout
