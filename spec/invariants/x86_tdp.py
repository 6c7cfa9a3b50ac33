"""White-box invariants of the x86 TDP MMU (INVENTORY C.4: X13, X14, X15, X16; with X5, N4,
D1).

Two kinds of check, as for arm64. Over the tables as they are now, once no operation is in
flight (``quiescent``): no frozen SPTE left in a live table (X13), the roots' reference
counts and life cycle (X14), the page statistics and table count against a recount, and
each SPTE's last recorded change against its value (X15), every leaf against the host's
page tables (N4), every TLB entry against the tables (X5), every writable translation of a
dirty-logged slot against its bitmap (D1). Over the reference's record
(:class:`~kvmspec.reference.x86.tdp_iter.TdpMmuHistory`), at any moment: only the thread
that froze an SPTE writes it next (X13), no compare-and-exchange stored over a value it did
not expect and the bookkeeping of each SPTE's changes chains up, once per change (X15), the
fast page fault only gave back permissions to a present leaf (X16), no table read after it
was freed and none freed while a reader that could see it was inside (X14).
``check_tdp_mmu`` runs them all.
"""

from __future__ import annotations

from collections import Counter

from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86.paging import PT_PRESENT_MASK, pt_index
from kvmspec.reference.x86.spte import (
    FROZEN_SPTE,
    is_access_track_spte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from kvmspec.reference.x86.tdp_fault import FAST_PF_ACTOR
from kvmspec.reference.x86.tdp_iter import TdpMmuPage, kvm_pages_per_hpage
from kvmspec.reference.x86.tdp_mmu_roots import TdpMmuState
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH
from kvmspec.spec.invariants import Violation

TDP_RULES = ("X3", "X4", "X13", "X14", "X15")
STALE_TLB_REQUESTS = {KVM_REQ_TLB_FLUSH, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS}
"""A vCPU with one of these pending flushes its TLB before it next enters the guest."""
"""The rules whose WARNs in the TDP MMU model this module reports."""


def _live_pages(mmu: TdpMmuState) -> list[TdpMmuPage]:
    """Every table still in a tree: not unlinked, not freed."""
    return [sp for sp in mmu.tables.pages.values() if not sp.unlinked and not sp.freed]


def _key(spte: int, level: int) -> tuple[object, ...]:
    """What handle_changed_spte's bookkeeping depends on: present or not, leaf or link,
    and the pfn. A/D, W and access tracking change without bookkeeping."""
    if not is_shadow_present_pte(spte):
        return ("not present",)
    return ("leaf" if is_last_spte(spte, level) else "link", spte_to_pfn(spte))


# -- X13 --------------------------------------------------------------------------------------


def check_frozen(mmu: TdpMmuState, quiescent: bool) -> list[Violation]:
    """X13: a frozen SPTE of a table still in the tree is written next only by the
    operation that froze it; once no operation is in flight, no live table holds one.

    Inside a table already unlinked, lockless aging may still clear the A bit of an SPTE
    that handle_removed_pt froze (its walk read the leaf before the freeze, and clears A
    with an atomic AND, not a compare-and-exchange; FROZEN_SPTE has EPT's A bit, bit 8,
    set). Harmless: nobody reads the dead table again before it is freed."""
    violations = []
    freezer: dict[tuple[int, int], str] = {}
    for write in mmu.tables.history.writes:
        owner = freezer.get(write.slot)
        if (
            write.before == FROZEN_SPTE
            and owner is not None
            and write.actor != owner
            and not write.unlinked
        ):
            violations.append(
                Violation("X13", f"{write.actor} wrote SPTE {write.slot} frozen by {owner}")
            )
        if write.after == FROZEN_SPTE:
            freezer[write.slot] = write.actor
        else:
            freezer.pop(write.slot, None)
    if quiescent:
        for sp in _live_pages(mmu):
            for index, spte in sorted(sp.spt.items()):
                if spte == FROZEN_SPTE:
                    violations.append(Violation("X13", f"{sp!r}[{index}] left frozen"))
    return violations


# -- X14 --------------------------------------------------------------------------------------


def check_roots(mmu: TdpMmuState, quiescent: bool) -> list[Violation]:
    """X14: listed roots are not freed and only invalid ones may reach a count of 0; once
    no operation is in flight a root's count is exactly its vCPUs plus the MMU's own
    reference (held until the root is invalidated and zapped), no root is still scheduled
    to zap, and no invalid root maps anything. No vCPU runs on a freed root, no table was
    read after it was freed, and none was freed while an RCU reader that could see it was
    still inside."""
    violations = []
    holders: Counter[TdpMmuPage] = Counter()
    for vcpu_id, vcpu_mmu in mmu.vcpus.items():
        if vcpu_mmu.root is not None:
            holders[vcpu_mmu.root] += 1
            if vcpu_mmu.root.freed:
                violations.append(Violation("X14", f"vcpu {vcpu_id} runs on freed root"))
    for root in mmu.roots:
        if root.freed:
            violations.append(Violation("X14", f"freed {root!r} is still listed"))
        if root.root_count <= 0 and not root.invalid:
            violations.append(Violation("X14", f"valid {root!r} has count {root.root_count}"))
        if not quiescent:
            continue
        own = 1 if not root.invalid or root.scheduled_root_to_zap else 0
        if root.root_count != holders[root] + own:
            violations.append(
                Violation(
                    "X14",
                    f"{root!r}: count {root.root_count}, held by {holders[root]} vCPUs"
                    f" and {own} MMU reference",
                )
            )
        if root.scheduled_root_to_zap:
            violations.append(Violation("X14", f"{root!r} still scheduled to zap"))
        if root.invalid and any(is_shadow_present_pte(s) for s in root.spt.values()):
            violations.append(Violation("X14", f"invalidated {root!r} still maps memory"))
    history = mmu.tables.history
    violations.extend(
        Violation("X14", f"use after free: {read}") for read in history.reads_after_free
    )
    for free in history.frees:
        if free.still_inside:
            violations.append(
                Violation("X14", f"table {free.pfn:#x} freed with RCU readers inside")
            )
    return violations


# -- X15 --------------------------------------------------------------------------------------


def check_atomic_updates(mmu: TdpMmuState, quiescent: bool) -> list[Violation]:
    """X15: a compare-and-exchange stores only over the value it expected (a failed one
    has no effect), and handle_changed_spte runs exactly once per change: per SPTE the
    recorded changes chain (each starts where the previous ended, the first from empty),
    and, once no operation is in flight, the last one ends where the SPTE is now and the
    page statistics and table count agree with a recount of the live tables."""
    violations = []
    history = mmu.tables.history
    for write in history.writes:
        if write.based_on is not None and write.based_on != write.before:
            violations.append(
                Violation(
                    "X15",
                    f"{write.actor} stored {write.after:#x} in {write.slot} expecting "
                    f"{write.based_on:#x}, but it held {write.before:#x}",
                )
            )
    last: dict[tuple[int, int], tuple[object, ...]] = {}
    for change in history.changes:
        before = last.get(change.slot, ("not present",))
        if _key(change.old, change.level) != before:
            violations.append(
                Violation(
                    "X15",
                    f"bookkeeping of {change.slot}: change from {change.old:#x} "
                    f"after the last one left it {before}",
                )
            )
        last[change.slot] = _key(change.new, change.level)
    if not quiescent:
        return violations
    stats: Counter[int] = Counter()
    tables = 0
    for sp in _live_pages(mmu):
        if sp.ptep is not None:
            tables += 1
        for index, spte in sorted(sp.spt.items()):
            if is_shadow_present_pte(spte) and is_last_spte(spte, sp.level):
                stats[sp.level] += 1
            if _key(spte, sp.level) != last.get((sp.pfn, index), ("not present",)):
                violations.append(
                    Violation("X15", f"{sp!r}[{index}] = {spte:#x} was not accounted")
                )
    for level in sorted(set(stats) | set(mmu.page_stats)):
        if stats[level] != mmu.page_stats[level]:
            violations.append(
                Violation(
                    "X15",
                    f"L{level} leaves: stats say {mmu.page_stats[level]}, tables hold "
                    f"{stats[level]}",
                )
            )
    if tables != mmu.tdp_mmu_pages:
        violations.append(
            Violation("X15", f"tdp_mmu_pages {mmu.tdp_mmu_pages}, {tables} tables linked")
        )
    return violations


# -- X16 --------------------------------------------------------------------------------------


def check_fast_page_faults(mmu: TdpMmuState) -> list[Violation]:
    """X16: each write of the fast page fault (without mmu_lock, so without bookkeeping)
    replaced a present leaf by a present leaf of the same pfn (it never brings back a
    zapped SPTE, never maps another page), and made it writable only if it was
    MMU-writable (never over a page the host or a READONLY slot maps read-only)."""
    violations = []
    for write in mmu.tables.history.writes:
        if not write.actor.startswith(FAST_PF_ACTOR):
            continue
        level = mmu.tables.pages[write.slot[0]].level
        before, after = _key(write.before, level), _key(write.after, level)
        where = f"{write.actor} wrote {write.after:#x} over {write.before:#x} in {write.slot}"
        if before[0] != "leaf":
            violations.append(Violation("X16", f"{where}: not a present leaf"))
        elif after != before:
            violations.append(Violation("X16", f"{where}: the mapping changed"))
        elif (
            is_writable_pte(write.after)
            and not is_writable_pte(write.before)
            and not is_mmu_writable_spte(mmu.masks, write.before)
        ):
            violations.append(Violation("X16", f"{where}: W without MMU-writable"))
    return violations


# -- N4 and X5 --------------------------------------------------------------------------------


def _translate(mmu: TdpMmuState, root: TdpMmuPage, gfn: int) -> tuple[int, bool] | None:
    """What a TLB entry for ``gfn`` may still say, given ``root`` now: (pfn, writable) or
    None. An access-tracked leaf (aged without A/D bits) still counts as mapping its pfn,
    writable if it is MMU-writable: aging never flushes (it is best-effort), and an entry
    cached before it is allowed to outlive it."""
    sp, level = root, root.level
    while True:
        spte = sp.spt.get(pt_index(gfn << 12, level), 0)
        if not is_shadow_present_pte(spte):
            return None
        if is_last_spte(spte, level):
            offset = gfn & (kvm_pages_per_hpage(level) - 1)
            if is_access_track_spte(mmu.masks, spte):
                return spte_to_pfn(spte) + offset, is_mmu_writable_spte(mmu.masks, spte)
            if not spte & PT_PRESENT_MASK:
                return None
            return spte_to_pfn(spte) + offset, is_writable_pte(spte)
        sp, level = mmu.tables.pages[spte_to_pfn(spte)], level - 1


def check_leaves_match_host(kvm: Kvm, mmu: TdpMmuState, host: HostMm) -> list[Violation]:
    """N4 for the TDP MMU: once no invalidation is open, every present leaf of a live
    table maps the page the host maps at its gfn's hva, and is writable only if the host
    PTE is (and the slot is not READONLY)."""
    if kvm.mmu_invalidate_in_progress:
        return []
    violations = []
    for sp in _live_pages(mmu):
        for index, spte in sorted(sp.spt.items()):
            if not is_shadow_present_pte(spte) or not is_last_spte(spte, sp.level):
                continue
            gfn = sp.gfn + index * kvm_pages_per_hpage(sp.level)
            slot = kvm.memslots(sp.as_id).gfn_to_memslot(gfn)
            hva, _ = gfn_to_hva_many(slot, gfn, write=False, page_shift=12)
            if slot is None or kvm_is_error_hva(hva):
                violations.append(Violation("N4", f"{sp!r}[{index}] maps gfn {gfn:#x}, no slot"))
                continue
            host_pte = host.lookup(hva)
            if host_pte is None or host_pte.pfn != spte_to_pfn(spte):
                violations.append(Violation("N4", f"gfn {gfn:#x}: SPTE {spte:#x}, host {host_pte}"))
            elif is_writable_pte(spte) and not (host_pte.writable and not slot.readonly):
                violations.append(Violation("N4", f"gfn {gfn:#x} writable over a read-only page"))
    return violations


def check_tlbs(mmu: TdpMmuState) -> list[Violation]:
    """X5: after a flush point, each TLB entry is what the vCPU's root translates now, and
    no more writable (an access-tracked leaf excepted, see _translate). A vCPU with a
    flush or a root drop pending is exempt: it handles the request before it runs guest
    code again."""
    violations = []
    for vcpu_id, vcpu_mmu in mmu.vcpus.items():
        if vcpu_mmu.requests & STALE_TLB_REQUESTS:
            continue
        for gfn, entry in vcpu_mmu.tlb.items():
            now = None if vcpu_mmu.root is None else _translate(mmu, vcpu_mmu.root, gfn)
            if now is None or now[0] != entry.pfn or (entry.writable and not now[1]):
                violations.append(
                    Violation("X5", f"vcpu {vcpu_id} TLB gfn {gfn:#x} -> {entry}, tables: {now}")
                )
    return violations


def check_dirty_logging(kvm: Kvm, mmu: TdpMmuState) -> list[Violation]:
    """D1 for the TDP MMU: in a slot logged through its bitmap, every gfn that the guest
    can write without KVM noticing is marked dirty. That is a writable leaf, except, with
    PML, one whose D bit is clear (the store that sets it is logged), and every writable
    TLB entry (it was cached dirty) of a vCPU that can run guest code before a flush."""
    violations = []
    writable: set[tuple[int, int]] = set()
    for sp in _live_pages(mmu):
        for index, spte in sorted(sp.spt.items()):
            if not is_shadow_present_pte(spte) or not is_last_spte(spte, sp.level):
                continue
            if is_writable_pte(spte) and not (mmu.pml and not spte & mmu.masks.dirty_mask):
                writable.add((sp.as_id, sp.gfn + index * kvm_pages_per_hpage(sp.level)))
    for vcpu_mmu in mmu.vcpus.values():
        if vcpu_mmu.requests & STALE_TLB_REQUESTS:
            continue  # flushed before the vCPU runs guest code again
        writable.update((0, gfn) for gfn, entry in vcpu_mmu.tlb.items() if entry.writable)
    for as_id, gfn in sorted(writable):
        slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
        if slot is None or not slot.dirty_logging or slot.dirty_bitmap is None:
            continue
        if not slot.dirty_bitmap.test_bit(gfn - slot.base_gfn):
            violations.append(Violation("D1", f"gfn {gfn:#x} writable but not marked dirty"))
    return violations


def check_tdp_mmu(
    kvm: Kvm, mmu: TdpMmuState, host: HostMm | None = None, quiescent: bool = True
) -> list[Violation]:
    """Every check above, and the TDP MMU's own WARNs (KVM_BUG_ONs) for these rules.
    ``quiescent``: no operation is in the middle of running (between two steps of an
    interleaving it is False, and only the checks that hold at every moment run)."""
    violations = [
        Violation(rule, f"WARN: {message}") for rule, message in kvm.warnings if rule in TDP_RULES
    ]
    violations += check_frozen(mmu, quiescent)
    violations += check_roots(mmu, quiescent)
    violations += check_atomic_updates(mmu, quiescent)
    violations += check_fast_page_faults(mmu)
    if quiescent:
        # Once the VMM's mm is gone (its notifier released), KVM_RUN cannot run again and
        # kvm_tdp_mmu_zap_all skips the TLB flush on purpose: X5 no longer applies.
        if host is None or host.notifier is not None:
            violations += check_tlbs(mmu)
        violations += check_dirty_logging(kvm, mmu)
        if host is not None:
            violations += check_leaves_match_host(kvm, mmu, host)
    return violations
