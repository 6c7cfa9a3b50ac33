"""The POWER hashed page table: the groups in use, one row of eight entries each, and the
rmap chains of the guest pages that have one.

An entry is in use when its "v" word is VALID (the hardware translates through it) or
ABSENT (the guest entered it, KVM took the page away: the next access traps, P2; or an
emulated-MMIO entry, P7). Each cell shows the entry's index, the gfn the guest entered
(from the reverse map's copy of its "r" word), and its bits: V valid, A absent, B bolted
(it survives a resize, P10), H in its secondary group, L locked (HVLOCK held: a path left
it so, P1), R referenced and C changed as the hardware set them (P3). Entries the table
never used, or that are free again, are pale.

Under the table, each guest page's rmap word: the chain of entries that map the page (P2),
head first, following the reverse map's ``forw`` links, and the R and C bits harvested from
entries that left it.

kernel: arch/powerpc/include/asm/kvm_host.h:struct revmap_entry, struct kvm_hpt_info;
arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_add_revmap_chain, remove_revmap_chain (v6.18)
"""

from __future__ import annotations

from kvmspec.fuzz.show.svg import CHAR, LINE, MARGIN, WIDTH, Canvas, fit
from kvmspec.fuzz.show.tree import heading
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    KVMPPC_RMAP_INDEX,
    KVMPPC_RMAP_PRESENT,
    KVMPPC_RMAP_RC_SHIFT,
    KvmHptInfo,
    SlotRmap,
)
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_R,
    HPTE_V_ABSENT,
    HPTE_V_BOLTED,
    HPTE_V_HVLOCK,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
    hpte_is_writable,
    hpte_rpn,
    is_mmio_hpte,
    kvmppc_actual_pgsz,
)

MOST_GROUPS = 24
"""Groups drawn at most; the rest are counted."""
MOST_CHAINS = 24
LABEL_WIDTH = 150
CELL_HEIGHT = 30


def in_use(hpt: KvmHptInfo, index: int) -> bool:
    """Does the guest have an entry here (valid, or absent)?"""
    return bool(hpt.v(index) & (HPTE_V_VALID | HPTE_V_ABSENT))


def entry_gfn(kvm: Kvm, hpt: KvmHptInfo, index: int) -> int | None:
    """The gfn the guest entered at ``index``, from the reverse map (None: no copy)."""
    rev = hpt.rev.get(index)
    if rev is None:
        return None
    size = kvmppc_actual_pgsz(hpt.v(index), rev.guest_rpte)
    return hpte_rpn(rev.guest_rpte, size, kvm.profile.page_shift) if size else None


def _cell(
    canvas: Canvas, kvm: Kvm, hpt: KvmHptInfo, index: int, x: float, y: float, width: float
) -> None:
    """One entry of a group."""
    v, r = hpt.v(index), hpt.r(index)
    if not in_use(hpt, index):
        canvas.rect(
            x, y, width - 4, CELL_HEIGHT - 4, ("hpte-free",), f"entry {index:#x}: free", index=index
        )
        canvas.text(x + 3, y + 11, f"{index:#x}", "bit")
        return
    classes = ["pte"]
    if v & HPTE_V_ABSENT:
        classes.append("mmio" if is_mmio_hpte(v, r) else "absent")
    if v & HPTE_V_BOLTED:
        classes.append("bolted")
    if not hpte_is_writable(r):
        classes.append("readonly-pte")
    gfn = entry_gfn(kvm, hpt, index)
    where = f"gfn {gfn:#x}" if gfn is not None else "gfn ?"
    slot = kvm.memslots(0).search_memslots(gfn) if gfn is not None else None
    orphan = bool(v & HPTE_V_VALID) and not v & HPTE_V_ABSENT and (slot is None or slot.invalid)
    if orphan:
        classes.append("orphan")  # the hardware translates a page of no usable slot
    if v & HPTE_V_ABSENT and is_mmio_hpte(v, r):
        where = "MMIO"
    canvas.rect(
        x,
        y,
        width - 4,
        CELL_HEIGHT - 4,
        tuple(classes),
        f"entry {index:#x}: v {v:#018x} r {r:#018x}, {where}"
        + (", in no usable slot" if orphan else ""),
        index=index,
        kind="absent" if v & HPTE_V_ABSENT else "valid",
    )
    canvas.text(x + 3, y + 11, fit(f"{index:#x} {where}", width - 8), "label")
    bits = (
        ("V", bool(v & HPTE_V_VALID)),
        ("A", bool(v & HPTE_V_ABSENT)),
        ("B", bool(v & HPTE_V_BOLTED)),
        ("H", bool(v & HPTE_V_SECONDARY)),
        ("L", bool(v & HPTE_V_HVLOCK)),
        ("R", bool(r & HPTE_R_R)),
        ("C", bool(r & HPTE_R_C)),
    )
    bit_x = x + 3
    for name, on in bits:
        canvas.text(bit_x, y + 23, name, "bit", "set" if on else "")
        bit_x += CHAR + 5


def chain(hpt: KvmHptInfo, word: int) -> list[int]:
    """The entries on an rmap word's chain, head first (read only: the reverse map is not
    extended; a broken chain stops after npte links or at a missing entry)."""
    if not word & KVMPPC_RMAP_PRESENT:
        return []
    head = word & KVMPPC_RMAP_INDEX
    members = [head]
    rev = hpt.rev.get(head)
    while rev is not None and rev.forw != head and len(members) <= hpt.npte:
        members.append(rev.forw)
        rev = hpt.rev.get(rev.forw)
    return members


def rmap_lines(kvm: Kvm, hpt: KvmHptInfo) -> list[str]:
    """One line per guest page whose rmap word is not zero."""
    lines = []
    for slot in sorted(kvm.memslots(0), key=lambda slot: slot.base_gfn):
        rmap = slot.arch.get("rmap")
        if not isinstance(rmap, SlotRmap):
            continue
        for offset, word in sorted(rmap.words.items()):
            members = chain(hpt, word)
            rc = word >> KVMPPC_RMAP_RC_SHIFT
            harvested = " ".join(
                name for name, bit in (("R", HPTE_R_R), ("C", HPTE_R_C)) if rc & bit
            )
            if not members and not harvested:
                continue
            lines.append(
                f"slot {slot.id} gfn {slot.base_gfn + offset:#x}: "
                + (" -> ".join(f"{index:#x}" for index in members) or "no chain")
                + (f"   (harvested {harvested})" if harvested else "")
            )
    return lines


def draw_ppc(canvas: Canvas, kvm: Kvm, mmu: HptMmu) -> None:
    """The HPT section."""
    hpt = mmu.hpt
    used = sorted(index for index in hpt.hptes if in_use(hpt, index))
    groups = sorted({index // HPTES_PER_GROUP for index in used})
    canvas.open_group("hpt", entries=len(used))
    resize = mmu.resize_hpt
    heading(
        canvas,
        f"POWER hashed page table: order {hpt.order}, {hpt.mask + 1} groups, "
        f"{len(used)} entries in use in {len(groups)} groups"
        + (f" (a resize to order {resize.order} is prepared)" if resize is not None else ""),
        "bits: V valid, A absent, B bolted, H secondary hash, L HVLOCK held, R referenced,"
        " C changed; a red frame: valid, for a gfn of no usable slot",
    )
    cell = (WIDTH - 2 * MARGIN - LABEL_WIDTH) / HPTES_PER_GROUP
    for group in groups[:MOST_GROUPS]:
        canvas.text(MARGIN, canvas.y + 17, f"PTEG {group:#x}", "label")
        for slot in range(HPTES_PER_GROUP):
            index = group * HPTES_PER_GROUP + slot
            _cell(canvas, kvm, hpt, index, MARGIN + LABEL_WIDTH + slot * cell, canvas.y, cell)
        canvas.advance(CELL_HEIGHT)
    if len(groups) > MOST_GROUPS:
        canvas.text(MARGIN, canvas.y + 12, f"+{len(groups) - MOST_GROUPS} more groups", "more")
        canvas.advance(LINE)
    lines = rmap_lines(kvm, hpt)
    canvas.advance(6)
    canvas.text(MARGIN, canvas.y + 12, "rmap chains (per guest page, head first)", "heading")
    canvas.advance(LINE + 2)
    for line in lines[:MOST_CHAINS] or ["none"]:
        canvas.text(MARGIN + 8, canvas.y + 12, line, "label", "rmap")
        canvas.advance(LINE)
    if len(lines) > MOST_CHAINS:
        canvas.text(MARGIN, canvas.y + 12, f"+{len(lines) - MOST_CHAINS} more", "more")
        canvas.advance(LINE)
    canvas.close_group()
