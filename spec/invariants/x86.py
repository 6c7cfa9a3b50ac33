"""White-box invariants of the x86 shadow MMU (INVENTORY C.4), recomputed from scratch.

Each check rebuilds what the MMU's bookkeeping should say from the shadow page tables
themselves and compares: the rmaps (X1), the parent links and root counts (X2), the
writable-bit states of every leaf (X3), the write protection of shadowed guest page
tables (X6), obsolete pages and roots after a fast zap (X10), one page per gfn and role
and the vCPUs' roots against their CR3s (X18, X17: x86_roots.py), the vCPUs' TLBs (X5),
the leaves against the host's page tables (N4), the huge-page counts (X8), every huge
leaf (X9), dirty-logged slots mapping nothing writable larger than 4K (D4) and nothing
writable that is not reported dirty (D1), the MMIO SPTEs' generations (X11), the unsync
pages and their parents' bitmaps (X7), the shadow-page limit (X12, x86_page_limit.py),
and seed 004's private pages: never pinned, and the vCPUs' APIC-access address current.
``check_shadow_mmu`` runs them all; ``check_released`` is what must hold once the VMM's
address space is gone (X5).
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot, gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import LEVEL_PMD, HostMm
from kvmspec.reference.host_pages import HostPage, folio_of
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86.apic_access import KVM_REQ_APIC_PAGE_RELOAD, apic_access_page_slot
from kvmspec.reference.x86.lpage import kvm_pages_per_hpage, slot_lpage_info
from kvmspec.reference.x86.mmio_spte import (
    MMIO_SPTE_GEN_MASK,
    check_mmio_spte,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
)
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    SptePtr,
    is_obsolete_sp,
    kvm_mmu_page_get_gfn,
    sp_has_gptes,
)
from kvmspec.reference.x86.page_track import slot_write_track
from kvmspec.reference.x86.paging import KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_2M, PG_LEVEL_4K
from kvmspec.reference.x86.rmap import gfn_to_index, slot_rmaps
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import (
    check_spte_writable_invariants,
    is_last_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.dirty import writable_gfns_recorded
from kvmspec.spec.invariants.x86_page_limit import check_mmu_page_limit
from kvmspec.spec.invariants.x86_roots import (
    check_one_page_per_gfn_and_role,
    check_roots_follow_cr3,
)
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET, PAGE_SHIFT, PAGE_SIZE

Leaves = list[tuple[SptePtr, int]]
"""Every shadow-present leaf of every page not freed, with its SPTE: what several checks
walk, gathered once per check of the whole MMU (:func:`_leaves`)."""


def _leaves(mmu: ShadowMmu) -> Leaves:
    """Every shadow-present leaf of every page not freed, with its SPTE."""
    leaves = []
    for sp in mmu.sp_by_pfn.values():
        for index, spte in sorted(sp.spt.items()):
            if is_shadow_present_pte(spte) and is_last_spte(spte, sp.role.level):
                leaves.append((SptePtr(sp, index), spte))
    return leaves


def check_rmaps(kvm: Kvm, mmu: ShadowMmu, leaves: Leaves) -> list[Violation]:
    """X1: every shadow-present leaf is exactly once in the rmap of its slot, level and
    gfn, and every rmap entry is such a leaf."""
    expected: Counter[tuple[int, int, int, SptePtr]] = Counter()
    violations = []
    for sptep, _spte in leaves:
        gfn = kvm_mmu_page_get_gfn(sptep.sp, sptep.index)
        slot = kvm.memslots(0).gfn_to_memslot(gfn)
        if slot is None:
            violations.append(Violation("X1", f"{sptep} maps gfn {gfn:#x} with no memslot"))
            continue
        level = sptep.sp.role.level
        expected[(slot.id, level, gfn_to_index(gfn, slot.base_gfn, level), sptep)] += 1
    found: Counter[tuple[int, int, int, SptePtr]] = Counter()
    for slot in kvm.memslots(0):
        rmaps = slot_rmaps(slot)
        if rmaps.freed:
            violations.append(Violation("X1", f"{slot} uses freed rmaps"))
        for (level, index), head in rmaps.heads.items():
            for sptep in head:
                found[(slot.id, level, index, sptep)] += 1
    if found == expected:
        return violations
    for key in sorted(set(expected) | set(found), key=repr):
        if expected[key] != found[key]:
            violations.append(
                Violation(
                    "X1",
                    f"{key[3]} (slot {key[0]}, level {key[1]}, index {key[2]}): "
                    f"{expected[key]} leaf, {found[key]} rmap entries",
                )
            )
    return violations


def check_parent_ptes(kvm: Kvm, mmu: ShadowMmu) -> list[Violation]:
    """X2: each page's parent_ptes are exactly the present links to it; roots have none;
    root_count is the number of vCPU roots (current and cached) that hold the page."""
    parents: dict[KvmMmuPage, Counter[SptePtr]] = {sp: Counter() for sp in mmu.sp_by_pfn.values()}
    violations = []
    for sp in mmu.sp_by_pfn.values():
        for index, spte in sp.spt.items():
            if is_shadow_present_pte(spte) and not is_last_spte(spte, sp.role.level):
                child = mmu.sp_by_pfn.get(spte_to_pfn(spte))
                if child is None:
                    violations.append(Violation("X2", f"{SptePtr(sp, index)} links a freed page"))
                else:
                    parents[child][SptePtr(sp, index)] += 1
    roots: Counter[KvmMmuPage] = Counter()
    for vcpu_mmu in mmu.vcpus.values():
        for root in [vcpu_mmu.root, *vcpu_mmu.prev_roots]:
            if root.sp is not None and root.sp is not mmu.dummy_root:
                roots[root.sp] += 1
    for sp, links in parents.items():
        if Counter(sp.parent_ptes) != links:
            violations.append(Violation("X2", f"{sp}: parent_ptes disagree with the links"))
        if sp.root_count != roots[sp]:
            violations.append(
                Violation("X2", f"{sp}: root_count {sp.root_count}, held by {roots[sp]}")
            )
        if sp.root_count and sp.parent_ptes:
            violations.append(Violation("X2", f"root {sp} has parents"))
    violations.extend(
        Violation("X2", f"freed {sp} is still a vCPU root") for sp in roots if sp.freed
    )
    return violations


def check_leaf_writability(mmu: ShadowMmu, leaves: Leaves) -> list[Violation]:
    """X3 as a state: every present leaf is in one of the legal H/M/W states."""
    violations = []
    for sptep, spte in leaves:
        problem = check_spte_writable_invariants(mmu.masks, spte)
        if problem is not None:
            violations.append(Violation("X3", f"{sptep}: {problem}"))
    return violations


def _shadowed_gfns(mmu: ShadowMmu) -> set[int]:
    """The gfns a valid, synced page shadows as a guest table."""
    return {
        sp.gfn
        for sp in mmu.sp_by_pfn.values()
        if sp_has_gptes(sp) and not sp.unsync and not is_obsolete_sp(mmu, sp)
    }


def _frame(sptep: SptePtr) -> range:
    """The gfns a leaf maps: one, or a huge leaf's whole frame."""
    gfn = kvm_mmu_page_get_gfn(sptep.sp, sptep.index)
    return range(gfn, gfn + kvm_pages_per_hpage(sptep.sp.role.level))


def check_writable_leaves_logged(kvm: Kvm, leaves: Leaves) -> list[Violation]:
    """D1 on the shadow MMU: every gfn a writable leaf maps (a huge leaf's whole frame) is
    recorded as dirty when its slot is logged. Under INITIALLY_SET a huge leaf may stay
    writable while logging, but only as long as every page of its frame is still reported:
    CLEAR_DIRTY_LOG write-protects the huge leaves over the pages it clears. The TLBs need
    no look of their own: X5 holds them to the tables unless a flush is due first.

    Not in a VM with dirty rings: there a slot whose logging started under INITIALLY_SET
    keeps writable leaves with no ring entry (the known kernel finding of
    C-DIRTY-COMPLETE) however the capability is set later, which only the dirty contract,
    having watched the slot start, can tell from a bug."""
    if kvm.dirty_ring_size:
        return []
    writable: list[tuple[int, int]] = []
    for sptep, spte in leaves:
        if not is_writable_pte(spte):
            continue
        frame = _frame(sptep)
        slot = kvm.memslots(0).gfn_to_memslot(frame.start)
        if slot is not None and slot.dirty_logging:
            writable.extend((0, gfn) for gfn in frame)
    return list(writable_gfns_recorded(kvm, writable))


def check_shadowed_tables_write_protected(mmu: ShadowMmu, leaves: Leaves) -> list[Violation]:
    """X6: no writable leaf maps a gfn that a valid, synced page shadows as a guest table
    (a huge leaf maps every gfn of its frame: seed 002's write-protected large SPTE)."""
    shadowed = sorted(_shadowed_gfns(mmu))
    violations = []
    for sptep, spte in leaves:
        if not is_writable_pte(spte):
            continue
        frame = _frame(sptep)
        for gfn in shadowed:
            if gfn in frame:
                violations.append(
                    Violation("X6", f"{sptep} maps shadowed guest table gfn {gfn:#x} writable")
                )
    return violations


def check_lpage_info(kvm: Kvm, mmu: ShadowMmu) -> list[Violation]:
    """X8: every frame's disallow_lpage count is what the slot's layout gives it, plus one
    per 4K shadow page with gptes whose gfn is in the frame, plus one per write-track
    reference on a gfn of the frame; and the write-track references are one per
    upper-level shadow page with gptes. Pages count until they are zapped (role.invalid),
    obsolete or not: unaccount_shadowed runs when a page is zapped."""
    accounted = [sp for sp in mmu.sp_by_pfn.values() if sp_has_gptes(sp) and not sp.role.invalid]
    violations = []
    for slot in kvm.memslots(0):
        if slot.invalid:
            continue  # being deleted or moved: its pages are zapped before it goes
        in_slot = [sp for sp in accounted if slot.base_gfn <= sp.gfn < slot.end_gfn]
        info = slot_lpage_info(slot)
        if not in_slot and not slot_write_track(slot) and not any(info.added.values()):
            continue  # nothing shadowed here and nothing counted: the layout alone holds
        tracked: Counter[int] = Counter()
        for sp in in_slot:
            if sp.role.level > PG_LEVEL_4K:
                tracked[gfn_to_index(sp.gfn, slot.base_gfn, PG_LEVEL_4K)] += 1
        if dict(tracked) != slot_write_track(slot):
            violations.append(
                Violation("X8", f"{slot}: write-track {slot_write_track(slot)}, pages {tracked}")
            )
        for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
            expected: Counter[int] = Counter()
            for sp in in_slot:  # a 4K page counts once, an upper one through its tracking
                expected[gfn_to_index(sp.gfn, slot.base_gfn, level)] += 1
            indexes = {i for lvl, i in info.added if lvl == level} | set(expected)
            for index in sorted(indexes):
                if info.added.get((level, index), 0) != expected[index]:
                    violations.append(
                        Violation(
                            "X8",
                            f"{slot} L{level} frame {index}: disallow_lpage "
                            f"{info.disallow_lpage(level, index)}, recomputed "
                            f"{info.initial(level, index) + expected[index]}",
                        )
                    )
    return violations


def check_huge_leaves(kvm: Kvm, mmu: ShadowMmu, host: HostMm, leaves: Leaves) -> list[Violation]:
    """X9 and D4 for every huge leaf: its frame lies wholly in one slot, the slot's gpa and
    hva agree modulo the size, and (once no invalidation is open) the host maps the frame
    with one huge page at the leaf's pfn. A writable huge leaf also needs a frame whose
    disallow_lpage count is 0 (a read-only one may outlive the count: seed 002 keeps it
    for reads), and a slot that is not dirty-logged (D4: a logged slot is write-protected
    when logging starts and then maps 4K; an INITIALLY_SET slot is exempt, D5, as long as
    every page of the frame is still reported, which D1 checks)."""
    violations = []
    for sptep, spte in leaves:
        level = sptep.sp.role.level
        if level == PG_LEVEL_4K:
            continue
        frame = _frame(sptep)
        slot = kvm.memslots(0).gfn_to_memslot(frame.start)
        if slot is None or slot.invalid:
            continue  # X1 reports a leaf without a slot; an INVALID slot's leaves go next
        if frame.stop > slot.end_gfn:
            violations.append(Violation("X9", f"{sptep} L{level} sticks out of {slot}"))
            continue
        hva = __gfn_to_hva_memslot(slot, frame.start, PAGE_SHIFT)
        if (hva >> PAGE_SHIFT) % len(frame):
            violations.append(Violation("X9", f"{sptep} L{level} over unaligned hva {hva:#x}"))
        host_pte = host.lookup(hva)
        if not kvm.mmu_invalidate_in_progress and (
            host.mapping_level(hva) != LEVEL_PMD
            or host_pte is None
            or host_pte.pfn != spte_to_pfn(spte)
        ):
            violations.append(Violation("X9", f"{sptep} L{level}: host maps {host_pte}"))
        if not is_writable_pte(spte):
            continue
        disallowed = slot_lpage_info(slot).disallow_lpage(
            level, gfn_to_index(frame.start, slot.base_gfn, level)
        )
        if disallowed:
            violations.append(
                Violation("X9", f"{sptep} writable L{level} over disallow_lpage {disallowed}")
            )
        if slot.dirty_logging and not kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            violations.append(Violation("D4", f"{sptep} writable L{level} in logged {slot}"))
    return violations


def check_obsolete(mmu: ShadowMmu) -> list[Violation]:
    """X10: no current page links to an obsolete one (no new translation goes through an
    obsolete page), and a vCPU whose root is obsolete has been asked to drop it."""
    violations = []
    for sp in mmu.sp_by_pfn.values():
        if is_obsolete_sp(mmu, sp):
            continue
        for index, spte in sp.spt.items():
            if is_shadow_present_pte(spte) and not is_last_spte(spte, sp.role.level):
                child = mmu.sp_by_pfn.get(spte_to_pfn(spte))
                if child is not None and is_obsolete_sp(mmu, child):
                    violations.append(Violation("X10", f"{SptePtr(sp, index)} links {child}"))
    for vcpu_id, vcpu_mmu in mmu.vcpus.items():
        root = vcpu_mmu.root.sp
        if root is None or root is mmu.dummy_root or not is_obsolete_sp(mmu, root):
            continue
        if KVM_REQ_MMU_FREE_OBSOLETE_ROOTS not in vcpu_mmu.requests:
            violations.append(Violation("X10", f"vcpu {vcpu_id} keeps obsolete root {root}"))
    return violations


def _walk(mmu: ShadowMmu, root: KvmMmuPage, gva: int) -> tuple[int, bool] | None:
    """What the hardware would find for ``gva`` under ``root`` now: (pfn, writable)."""
    sp = root
    writable = True
    while True:
        index = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
        spte = sp.spt.get(index, 0)
        if not is_shadow_present_pte(spte) or not spte & 1:
            return None
        writable &= is_writable_pte(spte)
        if is_last_spte(spte, sp.role.level):
            offset = (gva >> PAGE_SHIFT) % kvm_pages_per_hpage(sp.role.level)
            return spte_to_pfn(spte) + offset, writable
        child = mmu.sp_by_pfn.get(spte_to_pfn(spte))
        if child is None:
            return None
        sp = child


def check_tlbs(mmu: ShadowMmu) -> list[Violation]:
    """X5: at a point where the kernel has done its flushes (after an ioctl, a notifier or
    a guest access returns), every TLB entry is what the vCPU's root translates now, and
    no more writable. A vCPU with a flush or a root reload pending is exempt: it flushes
    before it next runs guest code. Under PVM the vCPU's copy of the root's top level is
    such a cache too (reference/x86/pvm_top_level.py): unless a flush has marked it stale,
    every entry it holds is the root's entry (it may lack some: those fault and are copied)."""
    violations = []
    for vcpu_id, vcpu_mmu in mmu.vcpus.items():
        if vcpu_mmu.requests & {KVM_REQ_TLB_FLUSH, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS}:
            continue
        root = vcpu_mmu.root.sp
        if root is not None and vcpu_mmu.top_level is not None and not vcpu_mmu.top_level_stale:
            for index, copied in sorted(vcpu_mmu.top_level.items()):
                held = root.spt.get(index, 0)
                if held != copied:
                    violations.append(
                        Violation(
                            "X5",
                            f"vcpu {vcpu_id} PVM top-level copy: entry {index} is {copied:#x},"
                            f" the root's {held:#x}, and no flush is due",
                        )
                    )
        for vpn, entry in vcpu_mmu.tlb.items():
            now = _walk(mmu, root, vpn << 12) if root is not None else None
            if now is None or now[0] != entry.pfn or (entry.writable and not now[1]):
                violations.append(
                    Violation(
                        "X5",
                        f"vcpu {vcpu_id} TLB: gva page {vpn:#x} -> {entry}, shadow tables: {now}",
                    )
                )
    return violations


def check_leaves_match_host(
    kvm: Kvm, mmu: ShadowMmu, host: HostMm, leaves: Leaves
) -> list[Violation]:
    """N4 for the shadow MMU: once no invalidation is open, every leaf maps the page the
    host maps at its gfn's hva, and is writable only if the host PTE is."""
    if kvm.mmu_invalidate_in_progress:
        return []
    violations = []
    for sptep, spte in leaves:
        if sptep.sp.role.level > PG_LEVEL_4K:
            continue  # check_huge_leaves compares the whole frame with the host's huge page
        gfn = kvm_mmu_page_get_gfn(sptep.sp, sptep.index)
        slot = kvm.memslots(0).gfn_to_memslot(gfn)
        hva, _ = gfn_to_hva_many(slot, gfn, write=False, page_shift=12)
        if slot is None or kvm_is_error_hva(hva):
            continue  # reported by X1, or a slot being deleted whose leaves go next
        host_pte = host.lookup(hva)
        if host_pte is None or host_pte.pfn != spte_to_pfn(spte):
            violations.append(Violation("N4", f"{sptep} gfn {gfn:#x}: host maps {host_pte}"))
        elif is_writable_pte(spte) and not host_pte.writable:
            violations.append(Violation("N4", f"{sptep} writable over a read-only host page"))
    return violations


def check_mmio_sptes(kvm: Kvm, mmu: ShadowMmu) -> list[Violation]:
    """X11: no MMIO SPTE can be trusted for a gfn that a usable memslot now covers: its
    generation is an older one. And none comes from before the last wrap of the 19-bit
    MMIO generation (its number is above the current one): the wrap zaps every shadow page,
    or the SPTE would be trusted again 2^19 generations after it was made.

    Every MMIO SPTE is checked. One known kernel finding breaks X11: the sync of an unsync
    page remakes a stale MMIO SPTE in the current generation when its guest PTE still names
    the same gfn (FNAME(sync_spte), tests/test_x86_shadow_mmu.py). The fuzzing harness lets
    exactly those SPTEs pass (kvmspec.fuzz.x86_known_findings.SYNCED_STALE_MMIO); this check and
    the tests report them."""
    if not mmu.masks.enable_mmio_caching:
        return []  # no SPTE is an MMIO one
    generation = kvm.memslots(0).generation
    current = generation & MMIO_SPTE_GEN_MASK
    violations = []
    for sp in mmu.sp_by_pfn.values():
        for index, spte in sorted(sp.spt.items()):
            if not is_mmio_spte(mmu.masks, spte):
                continue
            gfn = get_mmio_spte_gfn(mmu.masks, spte)
            made = get_mmio_spte_generation(spte)
            where = mmio_spte_name(mmu, SptePtr(sp, index), spte)
            if made > current:
                violations.append(
                    Violation("X11", f"{where} outlived a wrap: now generation {current:#x}")
                )
            slot = kvm.memslots(0).gfn_to_memslot(gfn)
            if slot is not None and not slot.invalid and check_mmio_spte(generation, spte):
                violations.append(
                    Violation(
                        "X11",
                        f"{where} is trusted over {slot}",
                        TrustedMmioSpte(SptePtr(sp, index), spte),
                    )
                )
    return violations


class TrustedMmioSpte(NamedTuple):
    """What an X11 report of an MMIO SPTE trusted over a slot is about: the SPTE's place
    and value."""

    sptep: SptePtr
    spte: int


def mmio_spte_name(mmu: ShadowMmu, sptep: SptePtr, spte: int) -> str:
    """How X11 names the MMIO SPTE ``spte`` at ``sptep``: where it is, its gfn and the
    generation it was made in."""
    gfn = get_mmio_spte_gfn(mmu.masks, spte)
    return f"{sptep} (MMIO gfn {gfn:#x}, generation {get_mmio_spte_generation(spte):#x})"


def check_released(mmu: ShadowMmu) -> list[Violation]:
    """X5 once the VMM's address space is gone. The MMU notifier's release zapped every
    shadow page (kvm_mmu_zap_all) and committed the zap, which flushes every vCPU's TLB and
    then frees the pages, before the host frees the memory they mapped. So no vCPU holds a
    TLB entry (a pending flush request is no excuse here: the host reuses the pages now),
    and the only pages left are zapped roots that a vCPU still holds (freed when it puts
    them), with no SPTE."""
    violations = [
        Violation("X5", f"after the release vcpu {vcpu_id} TLB maps gva page {vpn:#x} -> {entry}")
        for vcpu_id, vcpu_mmu in sorted(mmu.vcpus.items())
        for vpn, entry in sorted(vcpu_mmu.tlb.items())
    ]
    for sp in mmu.sp_by_pfn.values():
        if not sp.role.invalid:
            violations.append(Violation("X5", f"after the release {sp} was not zapped"))
        elif not sp.root_count:
            violations.append(Violation("X5", f"after the release zapped {sp} was not freed"))
        violations.extend(
            Violation("X5", f"after the release {SptePtr(sp, index)} holds {spte:#x}")
            for index, spte in sorted(sp.spt.items())
        )
    return violations


def check_unsync(mmu: ShadowMmu) -> list[Violation]:
    """X7: only valid last-level pages with guest PTEs are unsync; every page's
    unsync_children counts its bitmap's bits, and a last-level page has none; and every
    present link to a page that is unsync or has unsync children has its bit set, so that a
    walk from any root reaches every unsync page below it (a set bit with no reason left is
    allowed: walks clear those as they meet them). An unsync page's gfn is not also an
    upper-level table of a valid page: making a page for a gfn as an upper-level table zaps
    the gfn's unsync pages (kvm_mmu_find_shadow_page), and such a page write-tracks its gfn,
    so none of the gfn's pages can go unsync after it (mmu_try_to_unsync_pages)."""
    violations = []
    upper_tables = {
        sp.gfn
        for sp in mmu.sp_by_pfn.values()
        if sp_has_gptes(sp) and sp.role.level > PG_LEVEL_4K and not is_obsolete_sp(mmu, sp)
    }
    for sp in mmu.sp_by_pfn.values():
        if sp.unsync and (sp.role.level != PG_LEVEL_4K or not sp_has_gptes(sp)):
            violations.append(Violation("X7", f"{sp} is unsync"))
        if sp.unsync and sp.gfn in upper_tables and not is_obsolete_sp(mmu, sp):
            violations.append(Violation("X7", f"{sp} is unsync, its gfn an upper-level table"))
        if sp.unsync and sp.role.invalid:
            violations.append(Violation("X7", f"zapped {sp} is still unsync"))
        if sp.unsync_children != len(sp.unsync_child_bitmap):
            violations.append(
                Violation(
                    "X7",
                    f"{sp}: unsync_children {sp.unsync_children}, "
                    f"bits {sorted(sp.unsync_child_bitmap)}",
                )
            )
        if sp.role.level == PG_LEVEL_4K and sp.unsync_child_bitmap:
            violations.append(Violation("X7", f"last-level {sp} has unsync children"))
        for index, spte in sorted(sp.spt.items()):
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.role.level):
                continue
            child = mmu.sp_by_pfn.get(spte_to_pfn(spte))
            if child is None or not (child.unsync or child.unsync_children):
                continue
            if index not in sp.unsync_child_bitmap:
                violations.append(
                    Violation("X7", f"{SptePtr(sp, index)} leads to unsync {child}, no bit set")
                )
    return violations


def _private_pages(kvm: Kvm, host: HostMm) -> list[tuple[str, int, HostPage | None]]:
    """(name, hva, host page or None) of each private slot the VM has."""
    pages = []
    for name, slot_id in kvm.profile.internal_slots:
        slot = kvm.memslots(0).id_to_memslot(slot_id)
        if slot is None:
            continue
        for hva in range(
            slot.userspace_addr, slot.userspace_addr + slot.npages * PAGE_SIZE, PAGE_SIZE
        ):
            host_pte = host.lookup(hva)
            page = host.memory.page(host_pte.pfn) if host_pte is not None else None
            pages.append((name, hva, page))
    return pages


def check_apic_access_addr(kvm: Kvm, mmu: ShadowMmu, host: HostMm) -> list[Violation]:
    """Seed 004: KVM pins none of its private pages (the APIC-access page, the identity
    map, the TSS), so the host can migrate them. And once no invalidation is open, every
    vCPU of a VM with an APIC-access page either has a reload of its address pending or
    holds, as APIC_ACCESS_ADDR, the page the host maps at the slot's address now: no vCPU
    would enter the guest with the address of a page the host moved or took away."""
    violations = [
        Violation("S004-NOT-PINNED", f"{name} page at hva {hva:#x} (pfn {page.pfn:#x}) is pinned")
        for name, hva, page in _private_pages(kvm, host)
        if page is not None and folio_of(page).pins
    ]
    slot = kvm.memslots(0).id_to_memslot(apic_access_page_slot(kvm))
    if slot is None or slot.invalid or kvm.mmu_invalidate_in_progress:
        return violations
    host_pte = host.lookup(slot.userspace_addr)
    mapped = host_pte.pfn << PAGE_SHIFT if host_pte is not None else None
    for vcpu_id in sorted(kvm.vcpus):
        vcpu_mmu = mmu.vcpus.get(vcpu_id)
        if vcpu_mmu is not None and KVM_REQ_APIC_PAGE_RELOAD in vcpu_mmu.requests:
            continue
        held = vcpu_mmu.apic_access_addr if vcpu_mmu is not None else None
        if held is None or held != mapped:
            violations.append(
                Violation(
                    "S004-APIC-ACCESS-RELOAD",
                    f"vcpu {vcpu_id} APIC_ACCESS_ADDR "
                    f"{'unset' if held is None else hex(held)}, no reload pending; the host "
                    f"maps {'nothing' if mapped is None else hex(mapped)} at the slot's hva",
                )
            )
    return violations


def check_shadow_mmu(kvm: Kvm, mmu: ShadowMmu, host: HostMm) -> list[Violation]:
    """Every shadow-MMU invariant above, and the VM's WARNs. The checks that only look at
    shadow pages and their entries are skipped while there are none (a VM no guest has run
    in, as in memslot fuzzing); the rmaps, TLBs, roots, lpage_info and the APIC-access page
    are checked all the same, since they must then be empty or hold on their own."""
    leaves = _leaves(mmu)
    found = [
        *check_rmaps(kvm, mmu, leaves),
        *check_obsolete(mmu),
        *check_one_page_per_gfn_and_role(mmu),
        *check_roots_follow_cr3(mmu),
        *check_tlbs(mmu),
        *check_lpage_info(kvm, mmu),
        *check_apic_access_addr(kvm, mmu, host),
        *check_mmu_page_limit(mmu),
        *(Violation(rule, f"WARN: {message}") for rule, message in kvm.warnings),
    ]
    if mmu.sp_by_pfn:
        found += [
            *check_parent_ptes(kvm, mmu),
            *check_leaf_writability(mmu, leaves),
            *check_shadowed_tables_write_protected(mmu, leaves),
            *check_writable_leaves_logged(kvm, leaves),
            *check_leaves_match_host(kvm, mmu, host, leaves),
            *check_huge_leaves(kvm, mmu, host, leaves),
            *check_mmio_sptes(kvm, mmu),
            *check_unsync(mmu),
        ]
    return found
