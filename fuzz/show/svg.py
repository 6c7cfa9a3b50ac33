"""Hand-written SVG: a canvas of rectangles, lines and text with CSS classes.

The pictures of ``kvmspec show`` are plain SVG 1.1 text, built here without a drawing
library. Every element carries a ``kvmspec-*`` class so that a stylesheet (the one embedded
in the picture, or a page's own) and a test can find it; every piece of text and every
attribute value is escaped, because labels come from the input (a trace's file name, a
rule's statement). A :class:`Canvas` lays sections out top to bottom: a drawer asks for the
next free line with :attr:`Canvas.y` and moves it on with :meth:`Canvas.advance`.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

WIDTH = 1000
"""The picture's width in user units; its height follows from what is drawn."""
MARGIN = 16
LINE = 16
"""The height of one line of label text."""
CHAR = 6.6
"""The width of one character of the labels' monospace font, for fitting text in boxes."""

STYLE = """
svg.kvmspec-show { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 11px; }
.kvmspec-title { font-size: 14px; font-weight: bold; fill: #222; }
.kvmspec-heading { font-size: 12px; font-weight: bold; fill: #333; }
.kvmspec-label { fill: #222; }
.kvmspec-note { fill: #666; font-style: italic; }
.kvmspec-axis { stroke: #888; stroke-width: 1; }
.kvmspec-tick { fill: #555; font-size: 10px; }
.kvmspec-gap { stroke: #888; stroke-dasharray: 2 3; fill: none; }
.kvmspec-memslot, .kvmspec-memslot-key { fill: #cfe3f7; stroke: #2b6cb0; stroke-width: 1; }
.kvmspec-readonly { fill: #d6d3f0; stroke: #553c9a; }
.kvmspec-dirty-log { fill: #fefcbf; stroke: #b7791f; }
.kvmspec-gmem { fill: #fbd3e9; stroke: #97266d; }
.kvmspec-invalid { stroke: #c53030; stroke-dasharray: 4 2; }
.kvmspec-invalid-hatch { fill: url(#HATCH); stroke: none; }
.kvmspec-alias { stroke: #c05621; stroke-width: 2; fill: none; }
.kvmspec-alias-label { fill: #c05621; }
.kvmspec-table { fill: #f7fafc; stroke: #4a5568; stroke-width: 1; }
.kvmspec-table.kvmspec-root { fill: #ebf8ff; stroke: #2c5282; stroke-width: 1.5; }
.kvmspec-table.kvmspec-obsolete { stroke-dasharray: 3 2; fill: #edf2f7; }
.kvmspec-edge { stroke: #a0aec0; stroke-width: 1; fill: none; }
.kvmspec-pte { fill: #c6f6d5; stroke: #276749; stroke-width: 1; }
.kvmspec-pte.kvmspec-huge { fill: #9ae6b4; stroke-width: 2; }
.kvmspec-pte.kvmspec-readonly-pte { fill: #fefcbf; stroke: #975a16; }
.kvmspec-pte.kvmspec-mmio { fill: #fed7e2; stroke: #97266d; }
.kvmspec-pte.kvmspec-locked { fill: #fed7d7; stroke: #c53030; stroke-dasharray: 3 2; }
.kvmspec-pte.kvmspec-absent { fill: #fff; stroke: #a0aec0; stroke-dasharray: 2 2; }
.kvmspec-pte.kvmspec-bolted { stroke: #1a365d; stroke-width: 2.5; }
.kvmspec-hpte-free { fill: #f7fafc; stroke: #e2e8f0; }
.kvmspec-pte.kvmspec-orphan { stroke: #c53030; stroke-width: 2.5; }
.kvmspec-bit { fill: #a0aec0; font-size: 10px; }
.kvmspec-bit.kvmspec-set { fill: #1a202c; font-weight: bold; }
.kvmspec-more { fill: #718096; font-style: italic; }
.kvmspec-failure { fill: #fff5f5; stroke: #c53030; stroke-width: 1.5; }
.kvmspec-rule { fill: #9b2c2c; font-weight: bold; }
.kvmspec-rule-text { fill: #742a2a; }
.kvmspec-timeline-step { fill: #e2e8f0; stroke: #718096; stroke-width: 1; }
.kvmspec-timeline-step.kvmspec-skipped { fill: #fff; stroke-dasharray: 2 2; }
.kvmspec-timeline-step.kvmspec-failing { fill: #feb2b2; stroke: #c53030; stroke-width: 2; }
.kvmspec-actor { fill: #2d3748; font-weight: bold; }
"""


def fmt(value: float) -> str:
    """A coordinate, short: integers without a decimal point, else one decimal."""
    return str(round(value)) if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def fit(text: str, width: float) -> str:
    """``text`` cut (with an ellipsis) to what fits ``width`` units of label font."""
    most = max(int(width / CHAR), 1)
    return text if len(text) <= most else text[: max(most - 1, 0)] + "…"


def _classes(*names: str) -> str:
    return " ".join(f"kvmspec-{name}" for name in names if name)


class Canvas:
    """The elements of one picture, in drawing order, and the next free line ``y``.
    ``ident`` makes the picture's one element id (the hatch pattern) unique, so that
    several pictures inline in one page do not share it."""

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self.parts: list[str] = []
        self.y: float = MARGIN

    def advance(self, height: float) -> None:
        """Move the next free line down by ``height``."""
        self.y += height

    def open_group(self, *classes: str, **data: str | int) -> None:
        """Start a ``<g>`` with these classes (and ``data-*`` attributes); close it with
        :meth:`close_group`."""
        attributes = "".join(
            f" data-{name.replace('_', '-')}={quoteattr(str(value))}"
            for name, value in data.items()
        )
        self.parts.append(f'<g class="{_classes(*classes)}"{attributes}>')

    def close_group(self) -> None:
        self.parts.append("</g>")

    def rect(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        classes: tuple[str, ...],
        title: str | None = None,
        **data: str | int,
    ) -> None:
        """A rectangle; ``title`` becomes its tooltip (an SVG ``<title>`` child)."""
        attributes = "".join(
            f" data-{name.replace('_', '-')}={quoteattr(str(value))}"
            for name, value in data.items()
        )
        head = (
            f'<rect class="{_classes(*classes)}" x="{fmt(x)}" y="{fmt(y)}" '
            f'width="{fmt(max(width, 0.5))}" height="{fmt(height)}"{attributes}'
        )
        if title is None:
            self.parts.append(head + "/>")
        else:
            self.parts.append(f"{head}><title>{escape(title)}</title></rect>")

    def hatch(self, x: float, y: float, width: float, height: float) -> None:
        """The hatching laid over an INVALID slot."""
        self.parts.append(
            f'<rect class="kvmspec-invalid-hatch" x="{fmt(x)}" y="{fmt(y)}" '
            f'width="{fmt(max(width, 0.5))}" height="{fmt(height)}" '
            f'fill="url(#{self.hatch_id})"/>'
        )

    @property
    def hatch_id(self) -> str:
        return f"kvmspec-hatch-{self.ident}"

    def line(self, x1: float, y1: float, x2: float, y2: float, *classes: str) -> None:
        self.parts.append(
            f'<line class="{_classes(*classes)}" x1="{fmt(x1)}" y1="{fmt(y1)}" '
            f'x2="{fmt(x2)}" y2="{fmt(y2)}"/>'
        )

    def path(self, d: str, *classes: str) -> None:
        self.parts.append(f'<path class="{_classes(*classes)}" d={quoteattr(d)}/>')

    def text(self, x: float, y: float, text: str, *classes: str, anchor: str = "start") -> None:
        """One line of text whose baseline is at ``y``."""
        extra = "" if anchor == "start" else f' text-anchor="{anchor}"'
        self.parts.append(
            f'<text class="{_classes(*classes)}" x="{fmt(x)}" y="{fmt(y)}"{extra}>'
            f"{escape(text)}</text>"
        )

    def render(self, title: str) -> str:
        """The whole picture as SVG text: the stylesheet, the hatch pattern, a title for
        screen readers, and the elements."""
        height = self.y + MARGIN
        style = STYLE.replace("url(#HATCH)", f"url(#{self.hatch_id})")
        return "\n".join(
            [
                f'<svg xmlns="http://www.w3.org/2000/svg" class="kvmspec-show" '
                f'width="{WIDTH}" height="{fmt(height)}" '
                f'viewBox="0 0 {WIDTH} {fmt(height)}" role="img" '
                'style="max-width: 100%; height: auto">',
                f"<title>{escape(title)}</title>",
                f"<style>{style}</style>",
                "<defs>",
                f'<pattern id="{self.hatch_id}" width="6" height="6" '
                'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">',
                '<line x1="0" y1="0" x2="0" y2="6" stroke="#c53030" stroke-width="2"/>',
                "</pattern>",
                "</defs>",
                *self.parts,
                "</svg>",
                "",
            ]
        )
