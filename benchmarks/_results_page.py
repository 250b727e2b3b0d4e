"""The benchmarks pages' results: Markdown tables and SVG charts from result files.

A page asks for results with a comment line of its own:

- ``<!-- benchmark-results: core -->``: the latest result of each card for the benchmarks
  named (comma-separated), each a table and a chart (speedup bars and MBU bars per
  workload), or "not run yet" when no file holds one;
- ``<!-- benchmark-result-file: core-nvidia-h200-2026-11-28.json -->``: the table of that
  one file (for the history page).

The docs build's hook (``_docs_hook.py``) reads ``benchmarks/results/`` once per build into a
:class:`ResultsPage`, adds its charts to the site and fills each page's comments.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import textwrap
from pathlib import Path

from _results import Measurement, Result, card_slug, latest, load_dir

RESULTS_MARKER = re.compile(r"^<!--\s*benchmark-results:\s*(?P<names>[\w, -]+?)\s*-->[ \t]*$", re.M)
FILE_MARKER = re.compile(r"^<!--\s*benchmark-result-file:\s*(?P<name>[\w.-]+?)\s*-->[ \t]*$", re.M)
NOT_RUN = "Not run yet: no result file for this benchmark under `benchmarks/results/`."
_OURS, _BASELINE, _WIN, _LOSS = "#3f51b5", "#9e9e9e", "#2e7d32", "#ef6c00"


class ResultsPage:
    """The results of one folder, their charts, and the filling of pages' markers.

    Args:
        results_dir: the folder of result files (missing or empty: nothing has run yet).
        chart_dir: where the charts go in the site, relative to the docs folder.
    """

    def __init__(self, results_dir: Path, chart_dir: str = "assets/benchmarks") -> None:
        self.results, self.problems = load_dir(results_dir)
        self.latest = latest(self.results)
        self.chart_dir = chart_dir
        # {chart path in the docs folder: SVG}, one chart per latest result with data to draw.
        self.charts: dict[str, bytes] = {}
        for _, result in self.latest:
            svg = chart_svg(result)
            if svg is not None:
                self.charts[self.chart_path(result)] = svg

    def chart_path(self, result: Result) -> str:
        """Where ``result``'s chart lies in the site (docs-relative, POSIX)."""
        return f"{self.chart_dir}/{result.benchmark}-{card_slug(result.card)}.svg"

    def fill(self, markdown: str, page_path: str = "benchmarks.md") -> tuple[str, list[str]]:
        """``markdown`` with its markers replaced, and the problems found (a file marker
        naming no result file). ``page_path`` is the page's path in the docs folder, for
        the charts' relative links."""
        problems: list[str] = []
        page_dir = posixpath.dirname(page_path)

        def results_block(match: re.Match[str]) -> str:
            names = [n.strip() for n in match["names"].split(",") if n.strip()]
            chosen = [r for _, r in self.latest if r.benchmark in names]
            if not chosen:
                return NOT_RUN
            blocks = []
            for result in chosen:
                chart = self.chart_path(result)
                link = posixpath.relpath(chart, page_dir or ".") if chart in self.charts else None
                blocks.append(result_markdown(result, chart=link))
            return "\n\n".join(blocks)

        def file_block(match: re.Match[str]) -> str:
            found = [r for p, r in self.results if p.name == match["name"]]
            if not found:
                problems.append(f"{page_path}: no result file {match['name']!r}")
                return f"*No result file `{match['name']}`.*"
            return result_markdown(found[0], chart=None, source=match["name"])

        markdown = RESULTS_MARKER.sub(results_block, markdown)
        return FILE_MARKER.sub(file_block, markdown), problems


# ------------------------------------------------------------------------------ tables


def result_markdown(result: Result, chart: str | None, source: str | None = None) -> str:
    """One result: a line naming the card, date, versions and bandwidth, the command, the
    notes and ``source`` (its file's name) when given, the table, and ``chart`` (a link to
    its SVG) when given."""
    when = f"{result.date[:10]} {result.date[11:16]} UTC" if "T" in result.date else result.date
    facts = [f"**{_card(result)}**", when]
    if result.host and result.card != "cpu":
        facts.append(f"host: {result.host}")
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items() if v)
    if versions:
        facts.append(versions)
    if result.copy_bandwidth:
        facts.append(f"copy bandwidth {result.copy_bandwidth / 1e9:,.0f} GB/s (read + write)")
    lines = [" · ".join(facts)]
    about = []
    if result.command:
        about.append(f"`{result.command}`")
    if result.notes:
        about.append(_cell(result.notes))
    if source:
        about.append(f"`benchmarks/results/{source}`")
    if about:
        lines += ["", "; ".join(about)]
    lines += ["", table(result.rows)]
    if chart is not None:
        alt = f"{result.benchmark} on {_card(result)}: speedup and MBU per workload"
        lines += ["", f"![{alt}]({chart})"]
    return "\n".join(lines)


def _card(result: Result) -> str:
    if result.card == "cpu":
        return f"CPU: {result.host}" if result.host else "CPU"
    return result.card


def table(rows: list[Measurement]) -> str:
    """The rows as a Markdown table; a column no row fills is left out. Notes follow the
    table, numbered, so a long note does not squeeze the columns."""
    if not rows:
        return "*(no measurements)*"
    notes: list[str] = []  # one number per distinct note

    def workload(row: Measurement) -> str:
        if not row.notes:
            return _cell(row.name)
        if row.notes not in notes:
            notes.append(row.notes)
        return f"{_cell(row.name)} <sup>{notes.index(row.notes) + 1}</sup>"

    columns = [
        ("workload", "---", workload),
        ("ours", "---:", lambda r: _value(r.ours, r.unit)),
        ("baseline", "---:", _baseline),
        ("ratio", "---:", lambda r: "" if r.ratio is None else ratio_text(r.ratio)),
        ("MBU ours / baseline", "---:", _mbu),
    ]
    cells = [[fmt(r) for _, _, fmt in columns] for r in rows]
    keep = [i for i in range(len(columns)) if i == 0 or any(row[i] for row in cells)]
    lines = [
        "| " + " | ".join(columns[i][0] for i in keep) + " |",
        "| " + " | ".join(columns[i][1] for i in keep) + " |",
    ]
    lines += ["| " + " | ".join(row[i] or "–" for i in keep) + " |" for row in cells]
    if notes:
        listed = "; ".join(f"<sup>{i}</sup> {_cell(n)}" for i, n in enumerate(notes, 1))
        lines += ["", f"<small>Notes: {listed}</small>"]
    return "\n".join(lines)


def _baseline(row: Measurement) -> str:
    """The baseline's value over its name. The name is plain text: the theme breaks code
    anywhere, and in this narrow column ``torch.optim.SparseAdam`` would split mid-name."""
    if row.baseline is None:
        return ""
    name = _cell(row.baseline.replace("`", ""))
    if row.baseline_value is None:
        return name
    return f"{_value(row.baseline_value, row.unit)}<br>{name}"


def ratio_text(ratio: float) -> str:
    """``3.29x``; two significant digits below 0.1x (``0.013x``), where two decimals would
    round to nothing."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _mbu(row: Measurement) -> str:
    if row.mbu is None and row.baseline_mbu is None:
        return ""
    return f"{_percent(row.mbu) or '–'} / {_percent(row.baseline_mbu) or '–'}"


def _value(value: float | None, unit: str) -> str:
    return "" if value is None else f"{number(value)} {unit}".strip()


def number(value: float) -> str:
    """Up to 5 significant digits, with thousands separators and no exponent from 1e-4 up."""
    magnitude = abs(value)
    if magnitude >= 1e4:
        return f"{value:,.0f}"
    if magnitude >= 1e-4 or value == 0:
        digits = max(0, 4 - math.floor(math.log10(magnitude))) if magnitude else 0
        text = f"{value:,.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:.3g}"


def _percent(value: float | None) -> str:
    if value is None:
        return ""
    # One decimal below 10% (2.4%), none above; a recorded "3%" stays "3%".
    text = f"{value:.1%}" if value < 0.1 else f"{value:.0%}"
    return text.replace(".0%", "%")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------ charts


def chart_svg(result: Result) -> bytes | None:
    """Speedup bars (ours over the baseline, log scale, 1x marked) and MBU bars (ours and the
    baseline) per workload, as SVG; ``None`` when no row has a ratio or an MBU."""
    ratios = [r for r in result.rows if r.ratio is not None and r.ratio > 0]
    mbus = [r for r in result.rows if r.mbu is not None or r.baseline_mbu is not None]
    if not ratios and not mbus:
        return None
    import matplotlib
    from matplotlib.figure import Figure

    panels = [p for p, rows in (("speedup", ratios), ("mbu", mbus)) if rows]
    drawn = {id(r) for r in ratios + mbus}
    rows = [r for r in result.rows if id(r) in drawn]
    names = [r.name for r in rows]
    # Rows of one workload against two baselines share a name: the label names the baseline.
    labels = [
        _label(f"{r.name} vs {r.baseline}" if names.count(r.name) > 1 and r.baseline else r.name)
        for r in rows
    ]
    lines = sum(label.count("\n") + 1 for label in labels)
    style = {
        "font.size": 8.5,
        "svg.fonttype": "none",  # text stays text: the page's font, searchable, small files
        "svg.hashsalt": "recstack-benchmarks",  # the same results draw the same file
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
    with matplotlib.rc_context(style):
        # About the page's content width, so the text is drawn near its own size.
        fig = Figure(figsize=(2.8 + 2.4 * len(panels), 1.1 + 0.17 * lines + 0.1 * len(rows)))
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        y = list(range(len(rows)))
        for ax, panel in zip(axes, panels, strict=True):
            if panel == "speedup":
                _speedup_panel(ax, rows, y)
            else:
                _mbu_panel(ax, rows, y)
        axes[0].set_yticks(y, labels)
        axes[0].invert_yaxis()
        fig.suptitle(f"{result.benchmark} on {_card(result)}, {result.date[:10]}", fontsize=9)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()


def _speedup_panel(ax, rows: list[Measurement], y: list[int]) -> None:
    values = [r.ratio if r.ratio is not None and r.ratio > 0 else math.nan for r in rows]
    colors = [_WIN if v >= 1 else _LOSS for v in values]
    finite = [v for v in values if not math.isnan(v)]
    low, high = min(finite + [1.0]), max(finite + [1.0])
    # A log scale shows 0.2x and 5x alike; over a narrow range linear reads better.
    log = high / low > 8
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.6, high * 2.5)
        ax.xaxis.set_minor_formatter(_no_labels())
    else:
        ax.set_xlim(0, high * 1.25)
    ax.barh(y, values, color=colors, height=0.6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for yi, v in zip(y, values, strict=True):
        if not math.isnan(v):
            ax.annotate(ratio_text(v), (v, yi), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)  # fmt: skip
    title = "speedup over the baseline" + (" (log scale)" if log else "")
    ax.set_title(title, fontsize=8.5, pad=22)  # as high as the MBU panel's, over its legend
    ax.xaxis.set_major_formatter(_times_formatter())


def _mbu_panel(ax, rows: list[Measurement], y: list[int]) -> None:
    ours = [r.mbu * 100 if r.mbu is not None else math.nan for r in rows]
    base = [r.baseline_mbu * 100 if r.baseline_mbu is not None else math.nan for r in rows]
    ax.barh([v - 0.18 for v in y], ours, height=0.36, color=_OURS, label="ours")
    ax.barh([v + 0.18 for v in y], base, height=0.36, color=_BASELINE, label="baseline")
    for yi, r in zip(y, rows, strict=True):
        if r.mbu is not None:
            ax.annotate(_percent(r.mbu), (r.mbu * 100, yi - 0.18), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    top = max([v for v in ours + base if not math.isnan(v)] + [100.0])
    ax.set_xlim(0, top * 1.12)
    ax.set_title("MBU (% of the copy bandwidth)", fontsize=8.5, pad=22)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)


def _times_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}x")


def _no_labels():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _label(name: str, width: int = 34) -> str:
    plain = name.replace("`", "").replace("**", "")
    return "\n".join(textwrap.wrap(plain, width=width, max_lines=3, placeholder=" ..."))
