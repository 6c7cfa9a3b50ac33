"""The flat MMU of the generic harness (and of the reference target on a profile whose MMU the
model does not have): its translations, one row each, by address space and gfn, with the
host pfn, whether the translation is writable, and its accessed bit.

kernel: none; the flat MMU is the model's own minimal MMU (reference/flat_mmu.py)
"""

from __future__ import annotations

from kvmspec.fuzz.show.svg import Canvas
from kvmspec.fuzz.show.tree import Node, capped, count, draw_outline, heading
from kvmspec.reference.flat_mmu import FlatMmu


def draw_flat(canvas: Canvas, mmu: FlatMmu) -> None:
    """The flat MMU's section."""
    leaves = [
        Node(
            f"as {as_id} gfn {gfn:#x} -> pfn {pte.pfn:#x}",
            ("pte",) if pte.writable else ("pte", "readonly-pte"),
            bits=[("W", pte.writable), ("A", pte.accessed)],
            data={"kind": "leaf", "gfn": f"{gfn:#x}"},
        )
        for (as_id, gfn), pte in sorted(mmu.ptes.items())
    ]
    root = Node(f"flat MMU: {len(leaves)} translations", ("table", "root"))
    capped(leaves, root)
    canvas.open_group("flat-mmu")
    heading(canvas, "Translations (the model's flat MMU)", "bits: W writable, A accessed")
    canvas.open_group("tree", entries=count([root], "pte"))
    draw_outline(canvas, [root])
    canvas.close_group()
    canvas.close_group()
