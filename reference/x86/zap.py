"""Zapping shadow pages: unlink now, flush, free later.

Removing a shadow page is a two-phase affair, because a vCPU may be walking it (in
hardware, through its TLB, or in KVM's lockless walks) at the moment it is unlinked:

1. *prepare* (under mmu_lock for write): drop every SPTE of the page (leaves leave their
   rmaps, links leave their children's parent_ptes; the children themselves stay), unlink
   it from every parent, stop shadowing its guest table, mark it invalid, and put it on an
   ``invalid_list``. A page that is some vCPU's root cannot be freed yet: it only leaves
   the active list, and the vCPUs are asked to drop obsolete roots;
2. *commit*: flush every vCPU's TLB, then free the pages on the list. Freeing before the
   flush would let a vCPU walk freed memory (X5).

On top of that: the whole-VM "fast zap" that makes every page obsolete at once by
flipping ``mmu_valid_gen`` (X10), zapping everything (the VMM's mm is going away), zapping
a memslot's pages, and the emulated guest write to a shadowed page table.

Zapping an upper-level page first zaps the unsync pages below it
(mmu_zap_unsync_children). Not modelled: the NX huge page lists, and the points where the
long zaps drop mmu_lock to reschedule (they run as one step).

kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_prepare_zap_page, kvm_mmu_prepare_zap_page,
mmu_zap_unsync_children,
kvm_mmu_commit_zap_page, kvm_mmu_remote_flush_or_zap, mmu_page_zap_pte,
kvm_mmu_page_unlink_children, kvm_mmu_unlink_parents, kvm_mmu_zap_all_fast,
kvm_zap_obsolete_pages, kvm_mmu_zap_all, kvm_mmu_zap_memslot_pages_and_flush,
__kvm_mmu_unprotect_gfn_and_retry, kvm_mmu_track_write, detect_write_misaligned,
detect_write_flooding (v6.18)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kvmspec.reference.x86.guest_walk import PTE_SIZE
from kvmspec.reference.x86.mmio_spte import is_mmio_spte
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    ShadowMmuState,
    SptePtr,
    for_each_valid_sp,
    is_obsolete_sp,
    kvm_mmu_free_shadow_page,
    kvm_unlink_unsync_page,
    mmu_pages_clear_parents,
    mmu_unsync_walk,
    sp_has_gptes,
)
from kvmspec.reference.x86.mmu_spte import drop_parent_pte, drop_spte, mmu_spte_clear_no_track
from kvmspec.reference.x86.page_track import unaccount_shadowed
from kvmspec.reference.x86.paging import PG_LEVEL_4K
from kvmspec.reference.x86.spte import is_last_spte, is_shadow_present_pte
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
from kvmspec.spec.uapi.constants import PAGE_SIZE

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


def kvm_make_all_cpus_request(mmu: ShadowMmuState, request: str) -> None:
    """Ask every vCPU to do ``request`` before it next enters the guest.

    kernel: virt/kvm/kvm_main.c:kvm_make_all_cpus_request (v6.18)
    """
    for vcpu_mmu in mmu.vcpus.values():
        vcpu_mmu.requests.add(request)


def mmu_page_zap_pte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr) -> None:
    """Clear one SPTE of a page: a leaf is dropped with its rmap entry; a link only
    unlinks the child, which stays in the hash (a later fault may link it again); an MMIO
    SPTE, which has no bookkeeping, is just cleared.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_page_zap_pte (v6.18)
    """
    spte = sptep.get()
    if not is_shadow_present_pte(spte):
        if is_mmio_spte(mmu.masks, spte):
            mmu_spte_clear_no_track(kvm, mmu, sptep)
        return
    if is_last_spte(spte, sptep.sp.role.level):
        drop_spte(kvm, mmu, sptep)
    else:
        drop_parent_pte(kvm, mmu, mmu.spte_to_child_sp(spte), sptep)


def kvm_mmu_page_unlink_children(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_unlink_children (v6.18)"""
    for index in sorted(sp.spt):
        mmu_page_zap_pte(kvm, mmu, SptePtr(sp, index))


def kvm_mmu_unlink_parents(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_unlink_parents (v6.18)"""
    while sp.parent_ptes:
        drop_parent_pte(kvm, mmu, sp, sp.parent_ptes[0])


def mmu_zap_unsync_children(
    kvm: Kvm, mmu: ShadowMmuState, parent: KvmMmuPage, invalid_list: list[KvmMmuPage]
) -> int:
    """Zap the unsync pages below an upper-level page that is being zapped: once it is
    gone, no TLB flush of the guest's would reach them to sync them. Returns how many.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_zap_unsync_children (v6.18)
    """
    zapped = 0
    if parent.role.level == PG_LEVEL_4K:
        return zapped
    while found := mmu_unsync_walk(kvm, mmu, parent):
        for sp, path in found:
            kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
            mmu_pages_clear_parents(kvm, path)
            zapped += 1
    return zapped


def kvm_mmu_prepare_zap_page(
    kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]
) -> bool:
    """Phase one of zapping ``sp`` (see the module docstring). A root in use leaves the
    active list but is freed only when its last user puts it (mmu_free_root_page); if it
    was still current, every vCPU is asked to drop obsolete roots. True when other pages
    were zapped with it (unsync children): a caller walking active_mmu_pages restarts.

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_prepare_zap_page (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("zapping a shadow page")
    mmu.stat["mmu_shadow_zapped"] += 1
    list_unstable = mmu_zap_unsync_children(kvm, mmu, sp, invalid_list) > 0
    kvm_mmu_page_unlink_children(kvm, mmu, sp)
    kvm_mmu_unlink_parents(kvm, mmu, sp)
    if not sp.role.invalid and sp_has_gptes(sp):
        unaccount_shadowed(kvm, mmu, sp)
    if sp.unsync:
        kvm_unlink_unsync_page(kvm, mmu, sp)
    zapped_root = False
    if not sp.root_count:
        if not sp.role.invalid:
            mmu.active_mmu_pages.remove(sp)
        invalid_list.append(sp)
        # kvm_unaccount_mmu_page: a root in use stays counted until its last user puts it.
        mmu.n_used_mmu_pages -= 1
    else:
        if not sp.role.invalid:
            mmu.active_mmu_pages.remove(sp)
        zapped_root = not is_obsolete_sp(mmu, sp)
    sp.role = replace(sp.role, invalid=True)
    # Only after the page is marked invalid: a vCPU that handles the request must see it.
    if zapped_root:
        kvm_make_all_cpus_request(mmu, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    return list_unstable


def kvm_mmu_commit_zap_page(kvm: Kvm, mmu: ShadowMmuState, invalid_list: list[KvmMmuPage]) -> None:
    """Phase two: flush every TLB (which also waits out lockless walkers), then free.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_commit_zap_page (v6.18)
    """
    if not invalid_list:
        return
    kvm.arch.kvm_flush_remote_tlbs(kvm)
    for sp in invalid_list:
        kvm.warn_on(not sp.role.invalid or sp.root_count > 0, "X5", f"freeing live {sp}")
        kvm_mmu_free_shadow_page(mmu, sp)
    invalid_list.clear()


def kvm_mmu_remote_flush_or_zap(
    kvm: Kvm, mmu: ShadowMmuState, invalid_list: list[KvmMmuPage], remote_flush: bool
) -> bool:
    """Commit the zapped pages (which flushes), or just flush if asked: one flush either way.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_remote_flush_or_zap (v6.18)
    """
    if not remote_flush and not invalid_list:
        return False
    if invalid_list:
        kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)
    else:
        kvm.arch.kvm_flush_remote_tlbs(kvm)
    return True


def kvm_zap_obsolete_pages(kvm: Kvm, mmu: ShadowMmuState) -> None:
    """Zap every page of the old generation, oldest first: the list is a FIFO, so the
    first current page ends the walk. No TLB flush is needed for the pages themselves
    (every vCPU reloads its root first), but the commit flushes anyway, to kick vCPUs out
    of lockless walks before the pages are freed.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_zap_obsolete_pages (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    restart = True
    while restart:
        restart = False
        for sp in list(reversed(mmu.active_mmu_pages)):
            if not is_obsolete_sp(mmu, sp):
                break
            if kvm.warn_on(sp.role.invalid, "X10", f"invalid {sp} on the active list"):
                continue
            if kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list):
                restart = True  # other pages left the list too
                break
    kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)


def kvm_mmu_zap_all_fast(kvm: Kvm, mmu: ShadowMmuState) -> None:
    """Make every shadow page obsolete at once by flipping ``mmu_valid_gen`` between 0 and
    1, ask every vCPU to drop its (now obsolete) roots, then zap the obsolete pages. Only
    two generations can coexist: slots_lock is held from the flip until every obsolete
    page is gone.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_all_fast (v6.18)
    """
    with kvm.mmu_lock.write():
        mmu.mmu_valid_gen = 0 if mmu.mmu_valid_gen else 1
        # Under mmu_lock, with the flip: a vCPU must not keep an old root and miss the flush.
        kvm_make_all_cpus_request(mmu, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        kvm_zap_obsolete_pages(kvm, mmu)


def kvm_mmu_zap_all(kvm: Kvm, mmu: ShadowMmuState) -> None:
    """Zap every page now (the VMM's address space is being torn down).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_all (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    with kvm.mmu_lock.write():
        restart = True
        while restart:
            restart = False
            for sp in list(mmu.active_mmu_pages):
                if kvm.warn_on(sp.role.invalid, "X10", f"invalid {sp} on the active list"):
                    continue
                if kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list):
                    restart = True  # other pages left the list too
                    break
        kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)


def kvm_mmu_zap_memslot_pages_and_flush(
    kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, flush: bool
) -> None:
    """Zap every page that shadows a gfn of ``slot``: their accounting lives in the slot's
    metadata, which is about to be freed. The kernel visits each gfn of the slot; the
    model visits the hashed gfns inside it (the same pages, without a cost per gfn).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_memslot_pages_and_flush (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    for gfn in sorted(mmu.mmu_page_hash):
        if slot.base_gfn <= gfn < slot.end_gfn:
            for sp in for_each_valid_sp(mmu, gfn):
                kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
    kvm_mmu_remote_flush_or_zap(kvm, mmu, invalid_list, flush)


def kvm_mmu_unprotect_gfn(kvm: Kvm, mmu: ShadowMmuState, gfn: int) -> bool:
    """Stop shadowing ``gfn``: zap every valid page that shadows it as a guest table, so
    its write protection (and the disallowed huge frames) go with them. True if a page
    was zapped. Huge leaves that cover the gfn read-only stay: the next write fault makes
    them writable again, unless the fault shadows the gfn anew (seed 002).

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_unprotect_gfn_and_retry (the zap) (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    with kvm.mmu_lock.write():
        for sp in for_each_valid_sp(mmu, gfn):
            if sp_has_gptes(sp):
                kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
        zapped = bool(invalid_list)
        kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)
    return zapped


def detect_write_misaligned(gpa: int, nbytes: int) -> bool:
    """Does a write not cover exactly part of one 8-byte guest PTE? A one-byte write at
    the start of a PTE is fine (Linux clears bits with a one-byte ``and``).

    kernel: arch/x86/kvm/mmu/mmu.c:detect_write_misaligned (v6.18)
    """
    offset = gpa % PAGE_SIZE
    if offset % PTE_SIZE == 0 and nbytes == 1:
        return False
    misaligned = (offset ^ (offset + nbytes - 1)) & ~(PTE_SIZE - 1)
    return bool(misaligned) or nbytes < 4


def detect_write_flooding(sp: KvmMmuPage) -> bool:
    """Three emulated writes to an upper-level table with no fault through it in between:
    the guest probably reuses the page as ordinary memory, so stop shadowing it. (A fault
    that walks the page, or a lookup that finds it, resets the count.)

    kernel: arch/x86/kvm/mmu/mmu.c:detect_write_flooding (v6.18)
    """
    if sp.role.level == PG_LEVEL_4K:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= 3


def kvm_mmu_track_write(kvm: Kvm, mmu: ShadowMmuState, gpa: int, nbytes: int) -> None:
    """KVM emulated a guest write of ``nbytes`` at ``gpa`` (already in guest memory): every
    shadow page of that gfn drops the SPTE that shadowed the written guest PTE, so the
    next access walks the guest's new entry. A misaligned or flooding write zaps the page
    instead. Host writes to the page (the VMM's own) are not seen: FINDINGS 5.6.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_track_write (v6.18)
    """
    if not mmu.indirect_shadow_pages:
        return
    gfn = gpa // PAGE_SIZE
    invalid_list: list[KvmMmuPage] = []
    flush = False
    with kvm.mmu_lock.write():
        mmu.stat["mmu_pte_write"] += 1
        for sp in for_each_valid_sp(mmu, gfn):
            if not sp_has_gptes(sp):
                continue
            if detect_write_misaligned(gpa, nbytes) or detect_write_flooding(sp):
                kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
                mmu.stat["mmu_flooded"] += 1
                continue
            sptep = SptePtr(sp, (gpa % PAGE_SIZE) // PTE_SIZE)
            entry = sptep.get()
            mmu_page_zap_pte(kvm, mmu, sptep)
            flush |= is_shadow_present_pte(entry)
        kvm_mmu_remote_flush_or_zap(kvm, mmu, invalid_list, flush)
