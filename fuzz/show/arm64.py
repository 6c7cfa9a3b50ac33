"""The arm64 stage-2 tables as an outline: the PGD's pages at the start level, each table
entry leading to its next-level table, and the leaves: blocks (levels 1-2) and pages (level
3) with their output address and the bits that matter to the rules: AF (the access flag
aging clears), S2AP R and W, DBM (writable-clean with W clear, dirty with W set: only with
the model's hardware dirty-bit management) and XN. An invalid entry that is not zero is
drawn too: LOCKED (a walker is in the middle of break-before-make on it) or annotated with
an owner.

Only what is reachable from the PGD is drawn, read straight from the table pages (no walk,
nothing recorded in the history the invariants read).

kernel: arch/arm64/kvm/hyp/pgtable.c; arch/arm64/include/asm/kvm_pgtable.h (v6.18)
"""

from __future__ import annotations

from kvmspec.fuzz.show.memslots import size_text
from kvmspec.fuzz.show.svg import Canvas
from kvmspec.fuzz.show.tree import Node, capped, count, draw_outline, heading
from kvmspec.reference.arm64.descriptors import (
    KVM_PTE_LEAF_ATTR_HI_S2_XN_XN,
    decode_descriptor,
)
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.arm64.pgtable import KvmPgtable, TablePage


def _entry(pgt: KvmPgtable, table: TablePage, level: int, base: int, index: int) -> Node:
    """The row of one nonzero descriptor (and, for a table descriptor, its subtree)."""
    geometry = pgt.geometry
    pte = table.entries[index]
    ipa = base + index * geometry.kvm_granule_size(level)
    desc = decode_descriptor(pte, level, geometry.page_shift)
    where = f"[{index}] IPA {ipa:#x}"
    if desc.kind == "table":
        child = pgt.mm_ops.pages.get(desc.output_address)
        if child is None:  # a descriptor to no table page: drawn, for the checks to name
            return Node(
                f"{where}: table {desc.output_address:#x}, not a table page",
                ("table", "obsolete"),
                data={"level": level + 1},
            )
        node = _table(pgt, child, level + 1, ipa)
        node.label = f"{where} -> {node.label}"
        return node
    if desc.kind == "invalid":
        if desc.locked:
            return Node(
                f"{where}: invalid, LOCKED (break-before-make)",
                ("pte", "locked"),
                bits=[("LOCKED", True)],
                data={"level": level, "kind": "locked"},
            )
        return Node(
            f"{where}: invalid, owner {desc.owner_id}",
            ("pte", "absent"),
            data={"level": level, "kind": "owner"},
        )
    size = geometry.kvm_granule_size(level)
    classes = ["pte"]
    if desc.kind == "block":
        classes.append("huge")
    if not desc.writable:
        classes.append("readonly-pte")
    dirty = desc.dbm and desc.writable
    return Node(
        f"{where}: {desc.kind} {size_text(size)} -> PA {desc.output_address:#x}",
        tuple(classes),
        f"level {level} {desc.kind}, IPA {ipa:#x}-{ipa + size - 1:#x} -> PA "
        f"{desc.output_address:#x}, descriptor {pte:#018x}",
        bits=[
            ("AF", desc.access_flag),
            ("R", desc.readable),
            ("W", desc.writable),
            ("DBM", desc.dbm),
            ("dirty", dirty),
            ("XN", desc.xn == KVM_PTE_LEAF_ATTR_HI_S2_XN_XN),
        ],
        data={"level": level, "kind": desc.kind, "ipa": f"{ipa:#x}"},
    )


def _table(pgt: KvmPgtable, table: TablePage, level: int, base: int) -> Node:
    """A table page's row, with its nonzero entries under it."""
    node = Node(
        f"level {level} table {table.pa:#x}: {len(table.entries)} entries, refcount "
        f"{table.refcount}",
        ("table",),
        data={"level": level},
    )
    entries = [_entry(pgt, table, level, base, index) for index in sorted(table.entries)]
    capped(entries, node)
    return node


def stage2_roots(pgt: KvmPgtable) -> list[Node]:
    """One tree per PGD page that holds an entry (the PGD concatenates up to 16 pages)."""
    geometry = pgt.geometry
    span = geometry.ptrs_per_pte * geometry.kvm_granule_size(geometry.start_level)
    roots = []
    for number, page in enumerate(pgt.pgd or []):
        if page.entries:
            root = _table(pgt, page, geometry.start_level, number * span)
            root.label = f"PGD page {number}: {root.label}"
            root.classes = ("table", "root")
            roots.append(root)
    return roots


def draw_arm64(canvas: Canvas, mmu: Arm64Mmu) -> None:
    """The stage-2 section."""
    pgt = mmu.pgt
    canvas.open_group("stage2")
    if pgt is None:
        heading(canvas, "Stage 2: no tables (the VM's stage 2 was torn down)")
        canvas.close_group()
        return
    geometry = pgt.geometry
    roots = stage2_roots(pgt)
    leaves = count(roots, "pte")
    heading(
        canvas,
        f"Stage 2 ({type(mmu).__name__}): {geometry.ia_bits}-bit IPA, "
        f"{geometry.page_size // 1024}K granule, start level {geometry.start_level}",
        "every nonzero descriptor reachable from the PGD; bits: AF access flag, R/W S2AP,"
        " DBM dirty-bit modifier, dirty = DBM with W, XN execute-never"
        + ("" if roots else " (no translations)"),
    )
    canvas.open_group("tree", entries=leaves)
    draw_outline(canvas, roots)
    canvas.close_group()
    canvas.close_group()
