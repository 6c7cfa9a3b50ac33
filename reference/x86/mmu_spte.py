"""Writing SPTEs: every change to a shadow page table goes through these helpers.

The kernel funnels SPTE writes through a handful of functions so that the bookkeeping
cannot be forgotten: a leaf that appears or disappears enters or leaves its rmap
(invariant X1), a link to a child page enters or leaves the child's ``parent_ptes`` (X2),
and a leaf that loses MMU-writable asks for a TLB flush (X5). The model adds one check of
its own to every write, the colleague's :func:`check_spte_change` (X3 and X4); a broken
rule is recorded as a WARN on the VM, as is a write without mmu_lock held for write.

Then the rmap walks built on them: zapping the leaves of a gfn range (MMU notifiers,
memslot flushes), write-protecting a gfn (shadowed page tables, dirty logging), and aging.

kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_set, mmu_spte_update, mmu_spte_clear_track_bits,
mmu_spte_clear_no_track, drop_spte, mmu_page_add_parent_pte, mmu_page_remove_parent_pte,
drop_parent_pte, drop_large_spte, __link_shadow_page, spte_write_protect, rmap_write_protect,
kvm_zap_rmap, __kvm_rmap_zap_gfn_range, kvm_rmap_age_gfn_range (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_page import KvmMmuPage, ShadowMmuState, SptePtr, mark_unsync
from kvmspec.reference.x86.paging import KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K, PT_WRITABLE_MASK
from kvmspec.reference.x86.rmap import rmap_head, rmap_remove, slot_rmap_heads
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    check_spte_change,
    is_accessed_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    leaf_spte_change_needs_tlb_flush,
    make_nonleaf_spte,
)

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


def _write_spte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, new_spte: int) -> int:
    """Store ``new_spte``, judged by X3/X4, under mmu_lock; returns the old value."""
    kvm.lockdep_assert_mmu_lock_held_write("writing an SPTE")
    old_spte = sptep.get()
    problem = check_spte_change(mmu.masks, old_spte, new_spte, sptep.sp.role.level)
    if problem is not None:
        kvm.warn_on(True, problem.split(":")[0], problem)
    sptep.sp.set_spte(sptep.index, new_spte)
    return old_spte


def mmu_spte_set(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, new_spte: int) -> None:
    """Make a non-present SPTE present. Overwriting a present one here would skip its
    bookkeeping (the kernel WARNs).

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_set (v6.18)
    """
    kvm.warn_on(is_shadow_present_pte(sptep.get()), "X4", f"mmu_spte_set over present {sptep}")
    _write_spte(kvm, mmu, sptep, new_spte)


def mmu_spte_update(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, new_spte: int) -> bool:
    """Change an SPTE (the pfn of a present leaf must stay: X4). True when the change
    needs a TLB flush before mmu_lock is released: the leaf lost MMU-writable.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_update, mmu_spte_update_no_track (v6.18)
    """
    old_spte = _write_spte(kvm, mmu, sptep, new_spte)
    if not is_shadow_present_pte(old_spte):
        return False
    return leaf_spte_change_needs_tlb_flush(mmu.masks, old_spte, new_spte)


def mmu_spte_clear_track_bits(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr) -> int:
    """Make a leaf non-present; returns the old value. (The kernel also updates its page
    statistics; the accessed and dirty state went to the host when the page was mapped.)

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_clear_track_bits (v6.18)
    """
    return _write_spte(kvm, mmu, sptep, SHADOW_NONPRESENT_VALUE)


def mmu_spte_clear_no_track(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr) -> None:
    """Make an SPTE non-present with no bookkeeping: the caller does it (a link to a child
    page, whose parent_ptes the caller fixes).

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_spte_clear_no_track (v6.18)
    """
    _write_spte(kvm, mmu, sptep, SHADOW_NONPRESENT_VALUE)


def drop_spte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr) -> None:
    """Remove a leaf and its rmap entry. No flush here: the caller collects one for all.

    kernel: arch/x86/kvm/mmu/mmu.c:drop_spte (v6.18)
    """
    old_spte = mmu_spte_clear_track_bits(kvm, mmu, sptep)
    if is_shadow_present_pte(old_spte):
        rmap_remove(kvm, sptep)


def mmu_page_add_parent_pte(sp: KvmMmuPage, parent_pte: SptePtr) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:mmu_page_add_parent_pte (v6.18)"""
    sp.parent_ptes.append(parent_pte)


def mmu_page_remove_parent_pte(kvm: Kvm, sp: KvmMmuPage, parent_pte: SptePtr) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:mmu_page_remove_parent_pte (v6.18)"""
    if kvm.warn_on(parent_pte not in sp.parent_ptes, "X2", f"{parent_pte} not a parent of {sp}"):
        return
    sp.parent_ptes.remove(parent_pte)


def drop_parent_pte(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage, parent_pte: SptePtr) -> None:
    """Unlink ``sp`` from one parent: forget the parent SPTE, then clear it.

    kernel: arch/x86/kvm/mmu/mmu.c:drop_parent_pte (v6.18)
    """
    mmu_page_remove_parent_pte(kvm, sp, parent_pte)
    mmu_spte_clear_no_track(kvm, mmu, parent_pte)


def drop_large_spte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, flush: bool) -> None:
    """Drop a huge leaf that a table of smaller pages replaces, and flush (when asked) so no
    vCPU keeps translating through the huge page once the table is linked.

    kernel: arch/x86/kvm/mmu/mmu.c:drop_large_spte (v6.18)
    """
    kvm.warn_on(sptep.sp.role.level == PG_LEVEL_4K, "X2", f"{sptep} is not a huge leaf")
    drop_spte(kvm, mmu, sptep)
    if flush:
        kvm.arch.kvm_flush_remote_tlbs(kvm)


def link_shadow_page(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, sp: KvmMmuPage) -> None:
    """Point ``sptep`` at the child page ``sp`` and record the link in the child. A present
    SPTE here can only be a huge leaf (kvm_mmu_get_child_sp follows existing links): the
    fault needs smaller pages under it, so it is dropped first (seed 002: a write-protected
    huge leaf lives until a fault has to map inside it). A child that is unsync (a 4K page
    the lookup synced without resyncing it for good) marks the new link; an upper-level
    child was synced before it is linked, so it has no unsync children (X7).

    kernel: arch/x86/kvm/mmu/mmu.c:link_shadow_page, __link_shadow_page (v6.18)
    """
    if is_shadow_present_pte(sptep.get()):
        drop_large_spte(kvm, mmu, sptep, flush=True)
    mmu_spte_set(kvm, mmu, sptep, make_nonleaf_spte(mmu.masks, sp.pfn, ad_disabled=False))
    mmu_page_add_parent_pte(sp, sptep)
    kvm.warn_on(sp.unsync_children > 0, "X7", f"linking {sp} with unsync children")
    if sp.unsync_children or sp.unsync:
        mark_unsync(sptep)


def spte_write_protect(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, pt_protect: bool) -> bool:
    """Clear W of a leaf; with ``pt_protect`` (the gfn becomes a shadowed page table) also
    MMU-writable, so that not even the fast path may make it writable again. True if a
    TLB flush is needed.

    kernel: arch/x86/kvm/mmu/mmu.c:spte_write_protect (v6.18)
    """
    spte = sptep.get()
    if not is_writable_pte(spte) and not (pt_protect and is_mmu_writable_spte(mmu.masks, spte)):
        return False
    if pt_protect:
        spte &= ~mmu.masks.mmu_writable_mask
    spte &= ~PT_WRITABLE_MASK
    return mmu_spte_update(kvm, mmu, sptep, spte)


def rmap_write_protect(
    kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, gfn: int, level: int, pt_protect: bool
) -> bool:
    """Write-protect every SPTE in the rmap of (gfn, level).

    kernel: arch/x86/kvm/mmu/mmu.c:rmap_write_protect (v6.18)
    """
    flush = False
    for sptep in rmap_head(slot, gfn, level):
        flush |= spte_write_protect(kvm, mmu, sptep, pt_protect)
    return flush


def kvm_mmu_slot_gfn_write_protect(
    kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, gfn: int, min_level: int
) -> bool:
    """Remove every writable mapping of ``gfn``, at every level from ``min_level``, for
    good (MMU-writable cleared too): the gfn now holds a guest page table KVM shadows.
    True if a TLB flush is needed.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_slot_gfn_write_protect (v6.18)
    """
    write_protected = False
    for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
        write_protected |= rmap_write_protect(kvm, mmu, slot, gfn, level, pt_protect=True)
    return write_protected


def kvm_rmap_zap_gfn_range(
    kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, start: int, end: int
) -> bool:
    """Drop every leaf that maps a gfn of [start, end) through ``slot``. Shadow pages stay
    (a guest page table whose host page went away is still shadowed: FINDINGS 5.6). True
    if anything was dropped, so the caller flushes.

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_rmap_zap_gfn_range, kvm_zap_rmap (v6.18)
    """
    flush = False
    for _level, _gfn, head in slot_rmap_heads(slot, start, end):
        for sptep in head:
            drop_spte(kvm, mmu, sptep)
            flush = True
    return flush


def kvm_rmap_age_gfn_range(
    kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, start: int, end: int, test_only: bool
) -> bool:
    """Was a gfn of [start, end) accessed through a leaf since the last look? Unless
    ``test_only``, clear the A bits, so the next access (which the hardware walker marks
    again) is seen. No flush: aging is best-effort.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_rmap_age_gfn_range (v6.18)
    """
    young = False
    for _level, _gfn, head in slot_rmap_heads(slot, start, end):
        for sptep in head:
            spte = sptep.get()
            if not is_accessed_spte(mmu.masks, spte):
                continue
            if test_only:
                return True
            # The kernel clears the bit with an atomic clear_bit, not through
            # mmu_spte_update: the hardware may set A and D concurrently.
            sptep.sp.set_spte(sptep.index, spte & ~mmu.masks.accessed_mask)
            young = True
    return young
