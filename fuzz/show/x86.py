"""The x86 shadow MMU as an outline: each vCPU's root, the shadow pages under it (by the
gfn of the guest table they shadow, or of the range a direct page covers, and their role),
and their SPTEs: links to lower shadow pages, leaves with the host pfn and the bits the
rules are about (W, A, D, huge, MMIO), and MMIO SPTEs with the gfn they cache.

Shadow pages are shared (two guest paths to one guest table reach one shadow page), so each
is drawn once, numbered in ``active_mmu_pages`` order (``sp #n``); another link to it says
"see sp #n". Pages no root reaches (a vCPU's cached previous roots, pages being zapped) are
drawn after the roots. Obsolete pages (zapped, or older than the last fast zap: X10) are
dashed.

kernel: arch/x86/kvm/mmu/mmu_internal.h:struct kvm_mmu_page; arch/x86/kvm/mmu/spte.h
(v6.18)
"""

from __future__ import annotations

from kvmspec.fuzz.show.svg import Canvas
from kvmspec.fuzz.show.tree import Node, capped, count, draw_outline, heading
from kvmspec.reference.x86.mmio_spte import get_mmio_spte_gfn, is_mmio_spte
from kvmspec.reference.x86.mmu_page import KvmMmuPage, ShadowMmuState, is_obsolete_sp
from kvmspec.reference.x86.paging import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK
from kvmspec.reference.x86.spte import (
    is_accessed_spte,
    is_large_pte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)

LEVEL_BITS = 9
PAGE_SHIFT = 12


def _access(access: int) -> str:
    return "".join(
        name if access & mask else "-"
        for name, mask in (("w", ACC_WRITE_MASK), ("u", ACC_USER_MASK), ("x", ACC_EXEC_MASK))
    )


class ShadowReader:
    """Builds the outline of one shadow MMU, drawing each shadow page once."""

    def __init__(self, mmu: ShadowMmuState) -> None:
        self.mmu = mmu
        self.numbers = {id(sp): n for n, sp in enumerate(mmu.active_mmu_pages)}
        self.drawn: set[int] = set()

    def name(self, sp: KvmMmuPage) -> str:
        number = self.numbers.get(id(sp))
        return f"sp #{number}" if number is not None else "sp (not in active_mmu_pages)"

    def page(self, sp: KvmMmuPage) -> Node:
        """A shadow page's row and its SPTEs (or a reference to where it is drawn)."""
        role = sp.role
        kind = "direct" if role.direct else "shadows guest table"
        state = [
            word
            for word, holds in (
                ("obsolete", is_obsolete_sp(self.mmu, sp)),
                ("unsync", sp.unsync),
                (f"root_count {sp.root_count}", sp.root_count > 0),
            )
            if holds
        ]
        label = (
            f"{self.name(sp)}: level {role.level}, {kind} gfn {sp.gfn:#x}, access "
            f"{_access(role.access)}{', ' + ', '.join(state) if state else ''}"
        )
        classes = ("table", "obsolete") if is_obsolete_sp(self.mmu, sp) else ("table",)
        node = Node(label, classes, data={"level": role.level, "gfn": f"{sp.gfn:#x}"})
        if id(sp) in self.drawn:
            node.label = f"see {self.name(sp)} (level {role.level}, gfn {sp.gfn:#x})"
            return node
        self.drawn.add(id(sp))
        capped([self.spte(sp, index) for index in sorted(sp.spt)], node)
        return node

    def spte(self, sp: KvmMmuPage, index: int) -> Node:
        """One SPTE's row."""
        masks = self.mmu.masks
        spte = sp.spt[index]
        level = sp.role.level
        if is_mmio_spte(masks, spte):
            gfn = get_mmio_spte_gfn(masks, spte)
            return Node(
                f"[{index}] MMIO spte: gfn {gfn:#x} (no slot when cached)",
                ("pte", "mmio"),
                f"MMIO SPTE {spte:#018x}",
                bits=[("MMIO", True)],
                data={"level": level, "kind": "mmio"},
            )
        if not is_shadow_present_pte(spte):
            return Node(
                f"[{index}] not present: {spte:#x}",
                ("pte", "absent"),
                data={"level": level, "kind": "nonpresent"},
            )
        if not is_last_spte(spte, level):
            child = self.mmu.sp_by_pfn.get(spte_to_pfn(spte))
            if child is None:
                return Node(
                    f"[{index}] link to pfn {spte_to_pfn(spte):#x}: no shadow page",
                    ("table", "obsolete"),
                )
            node = self.page(child)
            node.label = f"[{index}] -> {node.label}"
            return node
        gfn = self._gfn(sp, index)
        huge = is_large_pte(spte)
        classes = ["pte"]
        if huge:
            classes.append("huge")
        if not is_writable_pte(spte):
            classes.append("readonly-pte")
        size = "2 MiB" if huge and level == 2 else "1 GiB" if huge else "4 KiB"
        return Node(
            f"[{index}] gfn {gfn:#x} -> pfn {spte_to_pfn(spte):#x} ({size})",
            tuple(classes),
            f"level {level} leaf SPTE {spte:#018x}: gfn {gfn:#x} -> pfn {spte_to_pfn(spte):#x}",
            bits=[
                ("W", is_writable_pte(spte)),
                ("MMU-W", is_mmu_writable_spte(masks, spte)),
                ("A", is_accessed_spte(masks, spte)),
                ("D", bool(spte & masks.dirty_mask)),
                ("huge", huge),
            ],
            data={"level": level, "kind": "leaf", "gfn": f"{gfn:#x}"},
        )

    @staticmethod
    def _gfn(sp: KvmMmuPage, index: int) -> int:
        """The gfn a leaf maps: a direct page's follows from its own; an indirect page
        remembers what the guest PTE said (kvm_mmu_page_get_gfn)."""
        if sp.role.direct or index not in sp.shadowed_translation:
            return sp.gfn + (index << ((sp.role.level - 1) * LEVEL_BITS))
        return sp.shadowed_translation[index][0]

    def roots(self) -> list[Node]:
        """Each vCPU's current root, then the pages no current root reaches."""
        trees = []
        for vcpu_id, vcpu in sorted(self.mmu.vcpus.items()):
            root = vcpu.root.sp
            if root is None or root is self.mmu.dummy_root:
                trees.append(Node(f"vcpu {vcpu_id}: no root (cr3 {vcpu.cr3:#x})", ("table",)))
                continue
            node = self.page(root)
            node.label = f"vcpu {vcpu_id} root (cr3 {vcpu.root.pgd:#x}): {node.label}"
            node.classes = ("table", "root", *node.classes[1:])
            trees.append(node)
        for sp in self.mmu.active_mmu_pages:
            if id(sp) not in self.drawn and not any(
                id(parent.sp) in self.drawn for parent in sp.parent_ptes
            ):
                trees.append(self.page(sp))
        return trees


def draw_x86(canvas: Canvas, mmu: ShadowMmuState) -> None:
    """The shadow-MMU section."""
    reader = ShadowReader(mmu)
    trees = reader.roots()
    canvas.open_group("shadow-mmu")
    heading(
        canvas,
        f"x86 shadow MMU: {len(mmu.active_mmu_pages)} shadow pages, valid generation "
        f"{mmu.mmu_valid_gen}",
        "each vCPU's root and the shadow pages under it; leaf bits: W writable, MMU-W may"
        " be made writable without mmu_lock, A accessed, D dirty, huge",
    )
    canvas.open_group("tree", entries=count(trees, "pte"))
    draw_outline(canvas, trees)
    canvas.close_group()
    canvas.close_group()
