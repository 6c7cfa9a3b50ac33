"""Prefetching: a fault that maps one 4K page maps its empty neighbours too.

After FNAME(fetch) has installed the leaf a fault asked for, the shadow MMU looks at the
other entries of the same aligned group of PTE_PREFETCH_NUM (8) entries in that last-level
shadow page and maps each one that is still empty, before the guest touches it. A guest that
walks through its memory then takes one fault per group instead of one per page.

* Only at 4K, and never while an MMU-notifier invalidation is in progress: a neighbour's
  host page may be on its way out, and nothing would tell the fault to retry.
* A shadow page of a guest page table (indirect) maps each neighbour as its guest PTE says,
  one at a time. The guest PTEs are the ones the fault read with its own (gpte_changed reads
  the aligned group). The prefetch stops at the first neighbour it cannot map; a guest PTE
  that is not present, not yet accessed or has reserved bits also drops the neighbour's SPTE
  (it may be an MMIO SPTE): the guest never used that translation, so KVM must not either.
* A direct shadow page (a guest huge page mapped with 4K leaves) maps runs of empty entries,
  whose gfns are contiguous, with the rights of the page's role.
* A page is mapped only if the host already maps it writable (no host fault is taken: the
  fault's caller holds mmu_lock), in a slot that is neither INVALID nor READONLY (the page
  is asked for writable), with every page of the run inside the slot. A writable leaf
  never goes into a dirty-logged slot, since it would be written without being logged. A
  clean guest PTE gives a read-only leaf (protect_clean_gpte), which may.
* The leaf is born old (A clear): aging must not count an access that never happened.

The effect shows through the uAPI: a page prefetched before dirty logging starts keeps a
(now write-protected) SPTE, so a later guest read of it does not fault and does not log it
(corpus/conformance/x86_64-linux-6.18-pvm/s5-prefetched-neighbour-read-is-not-logged.jsonl,
recorded on this machine's KVM).

kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(pte_prefetch), FNAME(prefetch_gpte);
arch/x86/kvm/mmu/mmu.c:kvm_mmu_prefetch_sptes, direct_pte_prefetch_many,
__direct_pte_prefetch, gfn_to_memslot_dirty_bitmap; virt/kvm/kvm_main.c:kvm_prefetch_pages
(v6.18)
"""

from __future__ import annotations

from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import HostMm, HostPage
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.page_fault import kvm_release_faultin_page
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86.guest_walk import PagingMode, gpte_access, protect_clean_gpte
from kvmspec.reference.x86.mmu_page import KvmMmuPage, ShadowMmuState, SptePtr, kvm_mmu_page_get_gfn
from kvmspec.reference.x86.paging import ACC_WRITE_MASK, PG_LEVEL_4K, PT64_BASE_ADDR_MASK
from kvmspec.reference.x86.set_spte import mmu_set_spte
from kvmspec.reference.x86.spte import is_shadow_present_pte
from kvmspec.reference.x86.unsync import prefetch_invalid_gpte
from kvmspec.spec.uapi.constants import PAGE_SHIFT

PTE_PREFETCH_NUM = 8
"""The size (in entries) of the aligned group of SPTEs one fault may fill."""


def gfn_to_memslot_dirty_bitmap(kvm: Kvm, gfn: int, no_dirty_log: bool) -> KvmMemorySlot | None:
    """The slot a prefetch may map ``gfn`` from: none for an INVALID slot, and none for a
    dirty-logged slot when the leaf would be writable (``no_dirty_log``).

    kernel: arch/x86/kvm/mmu/mmu.c:gfn_to_memslot_dirty_bitmap (v6.18)
    """
    slot = kvm.memslots(0).gfn_to_memslot(gfn)
    if slot is None or slot.invalid:
        return None
    if no_dirty_log and slot.dirty_logging:  # kvm_slot_dirty_track_enabled
        return None
    return slot


def kvm_prefetch_pages(
    host: HostMm, slot: KvmMemorySlot, gfn: int, nr_pages: int
) -> list[HostPage] | None:
    """The pages behind ``nr_pages`` gfns from ``gfn``, each referenced: None (the kernel's
    -1) when the slot gives no writable host address (a READONLY slot), no pages when the slot
    ends first, else the prefix the host already maps writable.

    kernel: virt/kvm/kvm_main.c:kvm_prefetch_pages (v6.18)
    """
    hva, pages_left = gfn_to_hva_many(slot, gfn, True, PAGE_SHIFT)
    if kvm_is_error_hva(hva):
        return None
    if pages_left < nr_pages:
        return []
    return host.get_user_pages_fast_only(hva, nr_pages)


def kvm_mmu_prefetch_sptes(
    kvm: Kvm,
    mmu: ShadowMmuState,
    host: HostMm,
    gfn: int,
    sptep: SptePtr,
    nr_pages: int,
    access: int,
    vcpu: KvmVcpu | None,
) -> bool:
    """Map ``nr_pages`` consecutive gfns from ``gfn`` at the SPTEs from ``sptep`` with the
    rights ``access``; False if not even the first could be mapped. Each page's reference is
    dropped at once, and the page marked dirty: the leaf may become writable later (a fast
    page fault) without the host hearing of it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_prefetch_sptes (v6.18)
    """
    slot = gfn_to_memslot_dirty_bitmap(kvm, gfn, bool(access & ACC_WRITE_MASK))
    if slot is None:
        return False
    pages = kvm_prefetch_pages(host, slot, gfn, nr_pages)
    if not pages:
        return False
    for offset, page in enumerate(pages):
        target = SptePtr(sptep.sp, sptep.index + offset)
        mmu_set_spte(kvm, mmu, slot, target, access, gfn + offset, page.pfn, None, vcpu)
        kvm_release_faultin_page(host, page, unused=False, dirty=True)
    return True


def direct_pte_prefetch_many(
    kvm: Kvm,
    mmu: ShadowMmuState,
    host: HostMm,
    sp: KvmMmuPage,
    start: int,
    end: int,
    vcpu: KvmVcpu | None,
) -> bool:
    """Prefetch the run of entries [start, end) of a direct page.

    kernel: arch/x86/kvm/mmu/mmu.c:direct_pte_prefetch_many (v6.18)
    """
    gfn = kvm_mmu_page_get_gfn(sp, start)
    return kvm_mmu_prefetch_sptes(
        kvm, mmu, host, gfn, SptePtr(sp, start), end - start, sp.role.access, vcpu
    )


def __direct_pte_prefetch(
    kvm: Kvm, mmu: ShadowMmuState, host: HostMm, sptep: SptePtr, vcpu: KvmVcpu | None
) -> None:
    """Prefetch the runs of empty entries around ``sptep`` in its direct page, in order,
    until one cannot be mapped.

    kernel: arch/x86/kvm/mmu/mmu.c:__direct_pte_prefetch (v6.18)
    """
    sp = sptep.sp
    first = sptep.index & ~(PTE_PREFETCH_NUM - 1)
    start: int | None = None
    for index in range(first, first + PTE_PREFETCH_NUM):
        if index == sptep.index or is_shadow_present_pte(SptePtr(sp, index).get()):
            if start is None:
                continue
            if not direct_pte_prefetch_many(kvm, mmu, host, sp, start, index, vcpu):
                return
            start = None
        elif start is None:
            start = index
    if start is not None:
        direct_pte_prefetch_many(kvm, mmu, host, sp, start, first + PTE_PREFETCH_NUM, vcpu)


def fname_prefetch_gpte(
    kvm: Kvm,
    mmu: ShadowMmuState,
    host: HostMm,
    mode: PagingMode,
    sptep: SptePtr,
    gpte: int,
    vcpu: KvmVcpu | None,
) -> bool:
    """Map the empty entry ``sptep`` of an indirect page as the guest PTE ``gpte`` says;
    False (and the entry dropped, if the guest PTE is not usable) when it cannot.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(prefetch_gpte) (v6.18)
    """
    if prefetch_invalid_gpte(kvm, mmu, mode, sptep, gpte):
        return False
    gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    pte_access = protect_clean_gpte(sptep.sp.role.access & gpte_access(gpte), gpte)
    return kvm_mmu_prefetch_sptes(kvm, mmu, host, gfn, sptep, 1, pte_access, vcpu)


def fname_pte_prefetch(
    kvm: Kvm,
    mmu: ShadowMmuState,
    host: HostMm,
    mode: PagingMode,
    sptep: SptePtr,
    prefetch_ptes: list[int],
    vcpu: KvmVcpu | None,
) -> None:
    """After a fault set the 4K leaf ``sptep``: prefetch the empty neighbours in its group.
    ``prefetch_ptes`` are the group's guest PTEs, read by the fault (gpte_changed).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(pte_prefetch) (v6.18)
    """
    sp = sptep.sp
    if sp.role.level > PG_LEVEL_4K:
        return
    if kvm.mmu_invalidate_in_progress:
        return
    if sp.role.direct:
        __direct_pte_prefetch(kvm, mmu, host, sptep, vcpu)
        return
    first = sptep.index & ~(PTE_PREFETCH_NUM - 1)
    for offset, gpte in enumerate(prefetch_ptes):
        neighbour = SptePtr(sp, first + offset)
        if neighbour.index == sptep.index or is_shadow_present_pte(neighbour.get()):
            continue
        if not fname_prefetch_gpte(kvm, mmu, host, mode, neighbour, gpte, vcpu):
            break
