"""A translation structure drawn as an outline: one row per table or entry, children indented
under their parent and joined to it, the bits of each entry in a column at the right.

The architecture readers (x86.py, arm64.py, ppc.py, flat.py) build :class:`Node` trees from
the model, sparsely: only entries that exist, at most :data:`PER_TABLE` of a table's entries
(the rest counted in a "+N more" row), and the drawer stops after :data:`MOST_ROWS` rows
with a note of how many it left out. A table row is a ``kvmspec-table`` rectangle, an entry
row a ``kvmspec-pte`` one (with classes for its kind: huge, readonly-pte, mmio, locked,
absent, bolted), each bit a ``kvmspec-bit`` text, ``kvmspec-set`` when the bit is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.fuzz.show.svg import CHAR, LINE, MARGIN, WIDTH, Canvas, fit

PER_TABLE = 24
"""A table's entries drawn at most; the rest are a "+N more" row."""
MOST_ROWS = 160
"""Rows drawn at most in one outline."""
INDENT = 18
ROW = 17
BITS_X = WIDTH - MARGIN - 250
"""Where the bits column starts."""


@dataclass
class Node:
    """One row: its label, its CSS classes (``table`` or ``pte`` first), a tooltip, its bits
    (name, set), its children, and how many children were left out (``more``)."""

    label: str
    classes: tuple[str, ...]
    title: str = ""
    bits: list[tuple[str, bool]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    more: int = 0
    data: dict[str, str | int] = field(default_factory=dict)


def capped(nodes: list[Node], parent: Node) -> None:
    """Give ``parent`` the first :data:`PER_TABLE` of ``nodes`` and count the rest."""
    parent.children = nodes[:PER_TABLE]
    parent.more = max(len(nodes) - PER_TABLE, 0)


def count(nodes: list[Node], kind: str) -> int:
    """How many rows of ``kind`` (a first class) the trees hold."""
    return sum((node.classes[0] == kind) + count(node.children, kind) for node in nodes)


def draw_outline(canvas: Canvas, roots: list[Node]) -> None:
    """Draw the trees top to bottom from the canvas's next free line."""
    rows: list[tuple[int, Node | int]] = []

    def walk(node: Node, depth: int) -> None:
        rows.append((depth, node))
        for child in node.children:
            walk(child, depth + 1)
        if node.more:
            rows.append((depth + 1, node.more))

    for root in roots:
        walk(root, 0)
    shown = rows[:MOST_ROWS]
    parents: dict[int, float] = {}  # depth -> y of the last row at that depth
    for depth, row in shown:
        x = MARGIN + depth * INDENT
        y = canvas.y
        if depth and depth - 1 in parents:
            canvas.path(
                f"M {x - INDENT + 6} {parents[depth - 1] + ROW - 3:.0f} "
                f"V {y + ROW / 2 - 1:.0f} H {x}",
                "edge",
            )
        if isinstance(row, int):
            canvas.text(x + 4, y + 12, f"+{row} more", "more")
        else:
            parents[depth] = y
            width = BITS_X - 8 - x
            canvas.rect(x, y, width, ROW - 3, row.classes, row.title or row.label, **row.data)
            canvas.text(x + 4, y + 11, fit(row.label, width - 8), "label")
            bit_x = float(BITS_X)
            for name, on in row.bits:
                canvas.text(bit_x, y + 11, name, "bit", "set" if on else "")
                bit_x += len(name) * CHAR + 8
        canvas.advance(ROW)
    if len(rows) > len(shown):
        canvas.text(MARGIN, canvas.y + 12, f"+{len(rows) - len(shown)} more rows", "more")
        canvas.advance(LINE)


def heading(canvas: Canvas, text: str, note: str = "") -> None:
    """A section's heading line, and a note line under it if given."""
    canvas.text(MARGIN, canvas.y + 12, text, "heading")
    canvas.advance(LINE + 4)
    if note:
        canvas.text(MARGIN, canvas.y + 12, note, "note")
        canvas.advance(LINE + 2)
