"""Unsync shadow pages: letting the guest write a last-level page table directly, and
bringing the shadow page back in step at the guest's next TLB flush.

A shadowed guest page table is normally write-protected (page_track.py), so each write the
guest makes to it exits and is emulated. For last-level tables that is too slow (a guest
rewrites its PTEs all the time), and the architecture allows better: a CPU may go on using
a stale translation until the OS flushes its TLB (INVLPG, or a CR3 load). So when a fault
would map a shadowed 4K table's gfn writable, KVM marks the table's shadow page *unsync*
(mmu_try_to_unsync_pages) and maps it writable: the guest's PTE writes then go straight
to memory, and the shadow page lags behind. The guest's TLB flushes are what KVM waits for:

* a CR3 load (KVM_REQ_MMU_SYNC, served before the vCPU next enters the guest) syncs every
  unsync page below the current root (kvm_mmu_sync_roots, mmu_sync_children): the page's
  gfn is write-protected again first, then every SPTE is compared with its guest PTE
  (FNAME(sync_spte)) and dropped or updated;
* INVLPG syncs just the SPTEs on the address's path, in the current and cached roots
  (kvm_mmu_invlpg), and leaves the pages unsync;
* a fault that finds an unsync page by lookup syncs it for itself, leaving it unsync.

To find the unsync pages below a root without walking every table, each parent keeps a
bitmap of its links that lead to one (mmu_page.py; X7). Only last-level pages go unsync:
upper-level tables are write-tracked, which refuses it (X7), and a shadowed gfn stays
write-protected while any of its pages is synced (X6).

Not modelled: the mmu_unsync_pages_lock (only the TDP MMU needs it), the yield points in
mmu_sync_children (the sync runs as one step), and the role check of kvm_sync_page_check
(the model's guest has one paging mode).

kernel: arch/x86/kvm/mmu/mmu.c:kvm_sync_page, __kvm_sync_page, kvm_sync_spte,
mmu_sync_children, kvm_vcpu_write_protect_gfn, is_unsync_root, kvm_mmu_sync_roots,
kvm_mmu_invlpg, kvm_mmu_invalidate_addr, __kvm_mmu_invalidate_addr, sync_mmio_spte;
arch/x86/kvm/mmu/paging_tmpl.h:FNAME(sync_spte), FNAME(prefetch_invalid_gpte);
arch/x86/kvm/x86.c:kvm_invalidate_pcid (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.x86.guest_walk import (
    PTE_SIZE,
    GuestMemory,
    PagingMode,
    gpte_access,
    is_rsvd_bits_set,
    protect_clean_gpte,
    reset_guest_rsvds_bits_mask,
)
from kvmspec.reference.x86.mmio_spte import (
    get_mmio_spte_gfn,
    is_mmio_spte,
    mark_mmio_spte,
    vcpu_clear_mmio_info,
)
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    ShadowMmuState,
    SptePtr,
    kvm_mmu_page_get_gfn,
    kvm_mmu_page_set_translation,
    kvm_unlink_unsync_page,
    mmu_pages_clear_parents,
    mmu_unsync_walk,
)
from kvmspec.reference.x86.mmu_spte import (
    drop_spte,
    kvm_mmu_slot_gfn_write_protect,
    mmu_spte_clear_no_track,
    mmu_spte_update,
)
from kvmspec.reference.x86.page_track import mmu_try_to_unsync_pages
from kvmspec.reference.x86.paging import (
    PG_LEVEL_4K,
    PT64_BASE_ADDR_MASK,
    PT_ACCESSED_MASK,
    PT_PRESENT_MASK,
    pt_index,
)
from kvmspec.reference.x86.spte import is_last_spte, is_shadow_present_pte, make_spte, spte_to_pfn
from kvmspec.reference.x86.tlb import VcpuMmu
from kvmspec.reference.x86.zap import (
    kvm_mmu_prepare_zap_page,
    kvm_mmu_remote_flush_or_zap,
    mmu_page_zap_pte,
)
from kvmspec.spec.uapi.constants import PAGE_SHIFT

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm

KVM_REQ_MMU_SYNC = "mmu_sync"
"""Sync the unsync pages below the current root before entering the guest (a CR3 load)."""


def prefetch_invalid_gpte(
    kvm: Kvm, mmu: ShadowMmuState, mode: PagingMode, sptep: SptePtr, gpte: int
) -> bool:
    """A guest PTE that must not be shadowed: not present, not accessed yet (the CPU would
    set A on its first use; KVM leaves that to a fault), or with reserved bits. Its SPTE is
    dropped; True then.

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(prefetch_invalid_gpte) (v6.18)
    """
    rsvd = reset_guest_rsvds_bits_mask(mode)
    if (
        not gpte & PT_PRESENT_MASK
        or not gpte & PT_ACCESSED_MASK
        or is_rsvd_bits_set(rsvd, gpte, PG_LEVEL_4K)
    ):
        drop_spte(kvm, mmu, sptep)
        return True
    return False


def sync_mmio_spte(kvm: Kvm, mmu: ShadowMmuState, sptep: SptePtr, gfn: int, access: int) -> bool:
    """An MMIO SPTE is synced by remaking it (a new generation, the new access), or cleared
    when the guest PTE now names another gfn. True if the SPTE was an MMIO one.

    kernel: arch/x86/kvm/mmu/mmu.c:sync_mmio_spte (v6.18)
    """
    spte = sptep.get()
    if not is_mmio_spte(mmu.masks, spte):
        return False
    if gfn != get_mmio_spte_gfn(mmu.masks, spte):
        mmu_spte_clear_no_track(kvm, mmu, sptep)
    else:
        mark_mmio_spte(kvm, mmu, sptep, gfn, access)
    return True


def fname_sync_spte(
    kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, mode: PagingMode, sp: KvmMmuPage, i: int
) -> int:
    """Bring SPTE ``i`` of an unsync page in step with the guest PTE it shadows: dropped if
    the PTE is no longer valid or names another gfn, its rights reduced if they changed
    (never raised to writable: ``synchronizing`` refuses that while a shadowed gfn is
    involved, and a sync never grants what the old SPTE did not). Returns 1 when a TLB
    flush is needed, 0 when not, -1 when the guest PTE cannot be read (the page is zapped).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(sync_spte) (v6.18)
    """
    gpte = mem.read_u64((sp.gfn << PAGE_SHIFT) + i * PTE_SIZE)
    if gpte is None:
        return -1
    sptep = SptePtr(sp, i)
    if prefetch_invalid_gpte(kvm, mmu, mode, sptep, gpte):
        return 1
    gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    pte_access = protect_clean_gpte(sp.role.access & gpte_access(gpte), gpte)
    if sync_mmio_spte(kvm, mmu, sptep, gfn, pte_access):
        return 0
    if gfn != kvm_mmu_page_get_gfn(sp, i):
        drop_spte(kvm, mmu, sptep)
        return 1
    if sp.shadowed_translation[i][1] == pte_access:
        return 0  # the rights did not change: nothing to do
    kvm_mmu_page_set_translation(sp, i, gfn, pte_access)
    spte = sptep.get()
    slot = kvm.memslots(0).gfn_to_memslot(gfn)

    def unsync_hook(*, synchronizing: bool, prefetch: bool) -> bool:
        return mmu_try_to_unsync_pages(
            kvm, mmu, slot, gfn, synchronizing=synchronizing, prefetch=prefetch
        )

    made = make_spte(
        mmu.masks,
        level=sp.role.level,
        ad_disabled=False,
        pte_access=pte_access,
        pfn=spte_to_pfn(spte),
        old_spte=spte,
        prefetch=True,
        synchronizing=True,
        host_writable=bool(spte & mmu.masks.host_writable_mask),
        mmu_try_to_unsync_pages=unsync_hook,
    )
    return int(mmu_spte_update(kvm, mmu, sptep, made.spte))


def kvm_sync_page(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: GuestMemory,
    mode: PagingMode,
    sp: KvmMmuPage,
    invalid_list: list[KvmMmuPage],
) -> int:
    """Sync every SPTE of ``sp``; a guest PTE that cannot be read zaps the page (-1).
    Returns 1 when a TLB flush is needed, else 0. Whether the page stays unsync is the
    caller's business.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_sync_page, __kvm_sync_page, kvm_sync_spte (v6.18)
    """
    flush = 0
    for i in sorted(sp.spt):
        ret = fname_sync_spte(kvm, mmu, mem, mode, sp, i)
        if ret < 0:
            kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
            return -1
        flush |= ret
    return flush


def kvm_vcpu_write_protect_gfn(kvm: Kvm, mmu: ShadowMmuState, gfn: int) -> bool:
    """Write-protect every mapping of ``gfn`` for good; True if a flush is needed.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_vcpu_write_protect_gfn (v6.18)
    """
    slot = kvm.memslots(0).gfn_to_memslot(gfn)
    if slot is None:
        return False
    return kvm_mmu_slot_gfn_write_protect(kvm, mmu, slot, gfn, PG_LEVEL_4K)


def mmu_sync_children(
    kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, mode: PagingMode, parent: KvmMmuPage
) -> None:
    """Sync every unsync page below ``parent``, for good: first write-protect their gfns
    (and flush, so the guest cannot change a table while it is being compared), then mark
    each synced, sync it, and clear its bits up the path. Under mmu_lock for write.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_sync_children (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    flush = False
    while found := mmu_unsync_walk(kvm, mmu, parent):
        protected = False
        for sp, _path in found:
            protected |= kvm_vcpu_write_protect_gfn(kvm, mmu, sp.gfn)
        if protected:
            kvm_mmu_remote_flush_or_zap(kvm, mmu, invalid_list, True)
            flush = False
        for sp, path in found:
            kvm_unlink_unsync_page(kvm, mmu, sp)
            flush |= kvm_sync_page(kvm, mmu, mem, mode, sp, invalid_list) > 0
            mmu_pages_clear_parents(kvm, path)
    kvm_mmu_remote_flush_or_zap(kvm, mmu, invalid_list, flush)


def kvm_mmu_sync_roots(kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, vcpu_mmu: VcpuMmu) -> None:
    """The guest flushed its TLB with a CR3 load: forget the MMIO translation, and sync the
    unsync pages below the current root, if it has any (the root's own flag and count are
    read without mmu_lock; mmu_try_to_unsync_pages sets them before the SPTE that lets the
    guest write).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_sync_roots, is_unsync_root (v6.18)
    """
    root = vcpu_mmu.root.sp
    if root is None:
        return
    vcpu_clear_mmio_info(mmu, vcpu_mmu.vcpu_id, None)
    if root is mmu.dummy_root or not (root.unsync or root.unsync_children):
        return
    with kvm.mmu_lock.write():
        mmu_sync_children(kvm, mmu, mem, vcpu_mmu.mode, root)


def __kvm_mmu_invalidate_addr(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: GuestMemory,
    vcpu_mmu: VcpuMmu,
    addr: int,
    root: KvmMmuPage | None,
) -> None:
    """Walk ``addr``'s path from ``root`` and sync the one SPTE it meets in an unsync page
    (dropping it if the guest PTE cannot be read); the walk goes down only while the page
    has unsync children.

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_invalidate_addr (v6.18)
    """
    vcpu_clear_mmio_info(mmu, vcpu_mmu.vcpu_id, addr)
    if root is None or root is mmu.dummy_root:
        return
    with kvm.mmu_lock.write():
        sp = root
        while True:
            sptep = SptePtr(sp, pt_index(addr, sp.role.level))
            if sp.unsync and sptep.index in sp.spt:
                ret = fname_sync_spte(kvm, mmu, mem, vcpu_mmu.mode, sp, sptep.index)
                if ret < 0:
                    mmu_page_zap_pte(kvm, mmu, sptep)
                if ret:
                    kvm.arch.kvm_flush_remote_tlbs(kvm)
            if not sp.unsync_children:
                break
            spte = sptep.get()
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.role.level):
                break
            sp = mmu.spte_to_child_sp(spte)


def kvm_mmu_invlpg(
    kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, vcpu_mmu: VcpuMmu, gva: int
) -> None:
    """The guest's INVLPG (intercepted with shadow paging): drop the vCPU's TLB entry for
    ``gva``, then sync its path in the current root and in every cached one (a cached root
    may be switched to without another flush).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_invlpg, kvm_mmu_invalidate_addr;
    arch/x86/kvm/vmx/vmx.c:vmx_flush_tlb_gva (v6.18)
    """
    vcpu_mmu.tlb.pop(gva >> PAGE_SHIFT, None)
    mmu.stat["invlpg"] += 1
    for root in [vcpu_mmu.root, *vcpu_mmu.prev_roots]:
        __kvm_mmu_invalidate_addr(kvm, mmu, mem, vcpu_mmu, gva, root.sp)
