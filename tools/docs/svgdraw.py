"""A few SVG drawing primitives for the docs' diagrams (see ``diagrams.py``).

Plain SVG text, no renderer and no JavaScript: the pictures are committed files that any
browser shows, also offline. The style (colours, fonts, arrow heads) matches
``docs/assets/architecture.svg``.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

FONT = "Helvetica, Arial, sans-serif"
MONO = "Menlo, Consolas, 'DejaVu Sans Mono', monospace"

INK = "#263238"
MUTED = "#546e7a"
BLUE = ("#e8eaf6", "#3f51b5")
ORANGE = ("#fff3e0", "#ef6c00")
GREEN = ("#e8f5e9", "#2e7d32")
PURPLE = ("#f3e5f5", "#6a1b9a")
TEAL = ("#e0f2f1", "#00796b")
RED = ("#ffebee", "#c62828")
GREY = ("#eceff1", "#78909c")
WHITE = ("#ffffff", "#90a4ae")


class Drawing:
    """An SVG canvas that collects elements and writes them to a file.

    Args:
        width: Canvas width in user units (pixels at 100% zoom).
        height: Canvas height in user units.
        title: The picture's accessible title (screen readers announce it).
    """

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width = width
        self.height = height
        self.title = title
        self.parts: list[str] = []

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        colours: tuple[str, str] = BLUE,
        *,
        radius: float = 4,
        dash: str | None = None,
        width: float = 1.3,
    ) -> None:
        """A box with fill ``colours[0]`` and border ``colours[1]``.

        Args:
            x: Left edge.
            y: Top edge.
            w: Width.
            h: Height.
            colours: ``(fill, stroke)``.
            radius: Corner radius.
            dash: An SVG ``stroke-dasharray`` for a dashed border.
            width: Border width.
        """
        fill, stroke = colours
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{radius}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{width}"{extra}/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: float = 13,
        anchor: str = "start",
        colour: str = INK,
        bold: bool = False,
        mono: bool = False,
        italic: bool = False,
    ) -> None:
        """One line of text with its baseline at ``y``.

        Args:
            x: Anchor position.
            y: Baseline.
            content: The text (escaped here).
            size: Font size.
            anchor: ``start``, ``middle`` or ``end``.
            colour: Fill colour.
            bold: Bold weight.
            mono: Monospaced font (for code).
            italic: Italic style.
        """
        style = [f'font-size="{size}"', f'fill="{colour}"', f'text-anchor="{anchor}"']
        if bold:
            style.append('font-weight="bold"')
        if italic:
            style.append('font-style="italic"')
        if mono:
            style.append(f'font-family="{MONO}"')
        # Keep runs of spaces: mono text is aligned with them.
        self.parts.append(
            f'<text x="{x}" y="{y}" xml:space="preserve" {" ".join(style)}>{escape(content)}</text>'
        )

    def line(
        self,
        points: list[tuple[float, float]],
        *,
        colour: str = INK,
        width: float = 1.3,
        arrow: bool = True,
        dash: str | None = None,
    ) -> None:
        """A polyline through ``points``, with an arrow head at the last one.

        Args:
            points: The vertices, in order.
            colour: Stroke colour (the arrow head takes it too).
            width: Stroke width.
            arrow: End with an arrow head.
            dash: An SVG ``stroke-dasharray`` for a dashed line.
        """
        path = " ".join(f"{x},{y}" for x, y in points)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        head = f' marker-end="url(#head-{colour[1:]})"' if arrow else ""
        self.parts.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" '
            f'stroke-width="{width}"{extra}{head}/>'
        )

    def brace(self, x0: float, x1: float, y: float, label: str, *, colour: str = MUTED) -> None:
        """A bracket over ``[x0, x1]`` opening downwards at ``y``, labelled above.

        Args:
            x0: Left end.
            x1: Right end.
            y: Height of the bracket's bar.
            label: Text centred above the bar.
            colour: Stroke and text colour.
        """
        self.parts.append(
            f'<polyline points="{x0},{y + 6} {x0},{y} {x1},{y} {x1},{y + 6}" fill="none" '
            f'stroke="{colour}" stroke-width="1.2"/>'
        )
        self.text((x0 + x1) / 2, y - 5, label, size=11.5, anchor="middle", colour=colour)

    def cells(
        self,
        x: float,
        y: float,
        values: list[str],
        colours: list[tuple[str, str]] | tuple[str, str],
        *,
        w: float = 40,
        h: float = 26,
        mono: bool = True,
        size: float = 12.5,
    ) -> None:
        """A row of equal cells, one value each (an array in memory).

        Args:
            x: Left edge of the first cell.
            y: Top edge.
            values: The cell texts.
            colours: One ``(fill, stroke)`` for all cells, or one per cell.
            w: Cell width.
            h: Cell height.
            mono: Monospaced text.
            size: Font size.
        """
        for i, value in enumerate(values):
            c = colours[i] if isinstance(colours, list) else colours
            self.rect(x + i * w, y, w, h, c, radius=0, width=1)
            self.text(
                x + i * w + w / 2,
                y + h / 2 + size * 0.36,
                value,
                size=size,
                anchor="middle",
                mono=mono,
            )

    def svg(self) -> str:
        """The document: arrow-head markers for every stroke colour used, then the parts."""
        body = "\n  ".join(self.parts)
        colours = sorted(
            {p.split('marker-end="url(#head-')[1][:6] for p in self.parts if "marker-end" in p}
        )
        markers = "\n    ".join(
            f'<marker id="head-{c}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="#{c}"/></marker>'
            for c in colours
        )
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
            f'width="{self.width}" height="{self.height}" font-family="{FONT}" '
            f'role="img" aria-label="{escape(self.title)}">\n'
            f"  <title>{escape(self.title)}</title>\n"
            f"  <defs>\n    {markers}\n  </defs>\n"
            f'  <rect width="{self.width}" height="{self.height}" fill="#ffffff"/>\n'
            f"  {body}\n</svg>\n"
        )

    def write(self, path: Path) -> None:
        """Write the SVG document to ``path``.

        Args:
            path: The file to (over)write.
        """
        path.write_text(self.svg(), encoding="utf-8")
