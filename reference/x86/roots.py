"""Getting shadow pages, and each vCPU's roots: what it loads for its guest CR3.

A vCPU's root is the shadow page of the guest's top-level table, found in (or added to)
the hash like any other page and pinned by ``root_count`` while the vCPU uses it. When
the guest loads another CR3, KVM first looks in the vCPU's few previous roots
(fast_pgd_switch): a context switch back to a recent process then costs no rebuild.
Zapped and obsolete roots are dropped when the vCPU next enters the guest, on request
(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS); a root whose last user lets go is zapped then. A CR3
load is also the guest's TLB flush: it asks for the unsync pages below the root to be
synced (KVM_REQ_MMU_SYNC, unsync.py) before the guest runs again. The same entry path
serves the request to reload the APIC-access page's address (apic_access.py).

kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_find_shadow_page, kvm_mmu_alloc_shadow_page,
kvm_mmu_get_shadow_page,
kvm_mmu_get_child_sp, mmu_alloc_root, mmu_alloc_shadow_roots, kvm_mmu_load,
mmu_free_root_page, kvm_mmu_free_roots, is_obsolete_root, kvm_mmu_free_obsolete_roots,
is_root_usable, cached_root_find_and_keep_current, cached_root_find_without_current,
fast_pgd_switch, kvm_mmu_new_pgd; arch/x86/kvm/x86.c:kvm_set_cr3, kvm_invalidate_pcid,
vcpu_enter_guest, kvm_vcpu_exit_request (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.gfn_to_hva import kvm_is_visible_memslot
from kvmspec.reference.x86.apic_access import (
    KVM_REQ_APIC_PAGE_RELOAD,
    kvm_vcpu_reload_apic_access_page,
)
from kvmspec.reference.x86.guest_walk import GuestMemory
from kvmspec.reference.x86.mmio_spte import vcpu_clear_mmio_info
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    KvmMmuPageRole,
    ShadowMmuState,
    SptePtr,
    for_each_valid_sp,
    is_obsolete_sp,
    kvm_mmu_child_role,
    sp_has_gptes,
)
from kvmspec.reference.x86.mmu_pages import make_mmu_pages_available
from kvmspec.reference.x86.page_track import account_shadowed
from kvmspec.reference.x86.paging import ACC_ALL, PG_LEVEL_4K, PT64_BASE_ADDR_MASK
from kvmspec.reference.x86.pvm_top_level import pvm_enter_guest
from kvmspec.reference.x86.spte import is_large_pte, is_shadow_present_pte
from kvmspec.reference.x86.tlb import (
    KVM_MMU_NUM_PREV_ROOTS,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_TLB_FLUSH,
    KvmMmuRootInfo,
    VcpuMmu,
)
from kvmspec.reference.x86.unsync import KVM_REQ_MMU_SYNC, kvm_mmu_sync_roots, kvm_sync_page
from kvmspec.reference.x86.zap import kvm_mmu_commit_zap_page, kvm_mmu_prepare_zap_page
from kvmspec.spec.uapi.constants import PAGE_SHIFT

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm
    from kvmspec.reference.kvm import Kvm


def kvm_mmu_find_shadow_page(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: GuestMemory,
    vcpu_mmu: VcpuMmu,
    gfn: int,
    role: KvmMmuPageRole,
) -> KvmMmuPage | None:
    """The valid page of ``gfn`` with exactly ``role``, if one exists. Looking up an
    upper-level page zaps the unsync pages of the gfn (the guest now uses it as another
    kind of table, which will be write-protected). A page found unsync is synced for this
    fault's sake but stays unsync (its gfn stays writable until the guest's next flush);
    if that sync fails, the page is zapped and None returned, so a fresh one is made. A
    page found has its write-flooding count reset: the guest uses the table again.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_find_shadow_page (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    found = None
    for sp in for_each_valid_sp(mmu, gfn):
        if sp.role != role:
            if role.level > PG_LEVEL_4K and sp.unsync:
                kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
            continue
        if not sp.role.direct:
            if sp.unsync:
                ret = kvm_sync_page(kvm, mmu, mem, vcpu_mmu.mode, sp, invalid_list)
                if ret < 0:
                    break
                kvm.warn_on(bool(invalid_list), "X7", "a transient sync zapped pages")
                if ret > 0:
                    kvm.arch.kvm_flush_remote_tlbs(kvm)
            sp.write_flooding_count = 0
        found = sp
        break
    if found is None:
        mmu.stat["mmu_cache_miss"] += 1
    kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)
    return found


def kvm_mmu_alloc_shadow_page(
    kvm: Kvm, mmu: ShadowMmuState, gfn: int, role: KvmMmuPageRole
) -> KvmMmuPage:
    """A new, empty page at the head of active_mmu_pages and of its gfn's hash list, of the
    current generation, accounted against the shadow-page limit. A page that shadows a
    guest table protects that table's gfn (account_shadowed).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_alloc_shadow_page, kvm_account_mmu_page (v6.18)
    """
    sp = KvmMmuPage(gfn, role, mmu.next_pfn, mmu.mmu_valid_gen)
    mmu.next_pfn += 1
    mmu.sp_by_pfn[sp.pfn] = sp
    mmu.active_mmu_pages.insert(0, sp)
    mmu.mmu_page_hash.setdefault(gfn, []).insert(0, sp)
    mmu.n_used_mmu_pages += 1  # kvm_account_mmu_page: counted against the limit (mmu_pages.py)
    if sp_has_gptes(sp):
        account_shadowed(kvm, mmu, sp)
    return sp


def kvm_mmu_get_shadow_page(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: GuestMemory,
    vcpu_mmu: VcpuMmu,
    gfn: int,
    role: KvmMmuPageRole,
) -> KvmMmuPage:
    """The valid page of (gfn, role), created if there is none. ``mem`` and ``vcpu_mmu``
    are the faulting vCPU's, to sync an unsync page found on the way.

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_get_shadow_page (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("getting a shadow page")
    sp = kvm_mmu_find_shadow_page(kvm, mmu, mem, vcpu_mmu, gfn, role)
    if sp is None:
        sp = kvm_mmu_alloc_shadow_page(kvm, mmu, gfn, role)
    return sp


def kvm_mmu_get_child_sp(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: GuestMemory,
    vcpu_mmu: VcpuMmu,
    sptep: SptePtr,
    gfn: int,
    direct: bool,
    access: int,
) -> KvmMmuPage | None:
    """The page to link below ``sptep``, or None (the kernel's -EEXIST) when a link is
    already there: the fault then just follows it.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_get_child_sp (v6.18)
    """
    spte = sptep.get()
    if is_shadow_present_pte(spte) and not is_large_pte(spte):
        return None
    role = kvm_mmu_child_role(sptep.sp, direct, access)
    return kvm_mmu_get_shadow_page(kvm, mmu, mem, vcpu_mmu, gfn, role)


def mmu_alloc_shadow_roots(
    kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, vcpu_mmu: VcpuMmu
) -> int:
    """Load the root for the vCPU's CR3: the level-4 page of the CR3's gfn, pinned by one
    more root_count. A CR3 outside every visible memslot gets the dummy root (every
    access faults, and the guest's walk then fails). Returns 0, or -ENOSPC when no shadow
    page is left for the root (mmu_pages.py), the vCPU staying without one.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_alloc_shadow_roots, mmu_alloc_root (v6.18)
    """
    root_pgd = vcpu_mmu.cr3
    root_gfn = (root_pgd & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    slot = kvm.memslots(0).gfn_to_memslot(root_gfn)
    if not kvm_is_visible_memslot(slot, kvm.profile.user_mem_slots):
        vcpu_mmu.root = KvmMmuRootInfo(0, mmu.dummy_root)
        return 0
    with kvm.mmu_lock.write():
        r = make_mmu_pages_available(kvm, mmu)
        if r:
            return r
        role = KvmMmuPageRole(vcpu_mmu.mode.root_level, direct=False, access=ACC_ALL)
        sp = kvm_mmu_get_shadow_page(kvm, mmu, mem, vcpu_mmu, root_gfn, role)
        sp.root_count += 1
        vcpu_mmu.root = KvmMmuRootInfo(root_pgd, sp)
    return 0


def kvm_mmu_load(kvm: Kvm, mmu: ShadowMmuState, mem: GuestMemory, vcpu_mmu: VcpuMmu) -> int:
    """Allocate the root, sync what is unsync below it (an existing page may have been
    found), then flush the vCPU's TLB: whatever it held came from another root. Returns 0
    or the root allocation's negative errno.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_load (v6.18)
    """
    r = mmu_alloc_shadow_roots(kvm, mmu, mem, vcpu_mmu)
    if r:
        return r
    kvm_mmu_sync_roots(kvm, mmu, mem, vcpu_mmu)
    vcpu_mmu.flush_tlb()
    return 0


def mmu_free_root_page(
    kvm: Kvm, mmu: ShadowMmuState, root: KvmMmuRootInfo, invalid_list: list[KvmMmuPage]
) -> None:
    """Put one root: the last put of a zapped root zaps it for good.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_free_root_page (v6.18)
    """
    sp = root.sp
    if sp is None:
        return
    if sp is not mmu.dummy_root:
        kvm.lockdep_assert_mmu_lock_held_write("putting a root")
        sp.root_count -= 1
        if not sp.root_count and sp.role.invalid:
            kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
    root.sp = None
    root.pgd = 0


def kvm_mmu_free_roots(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, current: bool, previous: set[int]
) -> None:
    """Put the current root (if ``current``) and the previous roots numbered in
    ``previous``.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_free_roots (v6.18)
    """
    invalid_list: list[KvmMmuPage] = []
    with kvm.mmu_lock.write():
        for i in sorted(previous):
            mmu_free_root_page(kvm, mmu, vcpu_mmu.prev_roots[i], invalid_list)
        if current:
            mmu_free_root_page(kvm, mmu, vcpu_mmu.root, invalid_list)
        kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)


def is_obsolete_root(mmu: ShadowMmuState, root: KvmMmuRootInfo) -> bool:
    """A root to drop: obsolete, or the dummy root (which cannot tell whether a memslot
    appeared under the CR3 since).

    kernel: arch/x86/kvm/mmu/mmu.c:is_obsolete_root (v6.18)
    """
    if root.sp is None:
        return False
    return root.sp is mmu.dummy_root or is_obsolete_sp(mmu, root.sp)


def kvm_mmu_free_obsolete_roots(kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu) -> None:
    """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_free_obsolete_roots (v6.18)"""
    current = is_obsolete_root(mmu, vcpu_mmu.root)
    previous = {i for i, root in enumerate(vcpu_mmu.prev_roots) if is_obsolete_root(mmu, root)}
    if current or previous:
        kvm_mmu_free_roots(kvm, mmu, vcpu_mmu, current, previous)


def is_root_usable(root: KvmMmuRootInfo, pgd: int, role: KvmMmuPageRole) -> bool:
    """A cached root serves ``pgd`` if it shadows that CR3 with the same role (a zapped
    root has role.invalid set, so it never matches).

    kernel: arch/x86/kvm/mmu/mmu.c:is_root_usable (v6.18)
    """
    return root.sp is not None and root.pgd == pgd and root.sp.role == role


def fast_pgd_switch(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, new_pgd: int, role: KvmMmuPageRole
) -> bool:
    """Make a cached root for ``new_pgd`` current, if there is one; the current root goes
    to the cache in its place (the cache rotates). Without a hit the current root is
    freed (a dummy root is never cached) and False is returned: the next entry loads one.

    kernel: arch/x86/kvm/mmu/mmu.c:fast_pgd_switch, cached_root_find_and_keep_current,
    cached_root_find_without_current (v6.18)
    """
    if vcpu_mmu.root.sp is mmu.dummy_root:
        kvm_mmu_free_roots(kvm, mmu, vcpu_mmu, current=True, previous=set())
    prev = vcpu_mmu.prev_roots
    if vcpu_mmu.root.sp is not None:
        if is_root_usable(vcpu_mmu.root, new_pgd, role):
            return True
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            vcpu_mmu.root, prev[i] = prev[i], vcpu_mmu.root
            if is_root_usable(vcpu_mmu.root, new_pgd, role):
                return True
        kvm_mmu_free_roots(kvm, mmu, vcpu_mmu, current=True, previous=set())
        return False
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        if is_root_usable(prev[i], new_pgd, role):
            vcpu_mmu.root, prev[i] = prev[i], vcpu_mmu.root
            # Bubble the remaining roots up; the last slot becomes free.
            prev[i:] = [*prev[i + 1 :], KvmMmuRootInfo(0, None)]
            return True
    return False


def kvm_mmu_new_pgd(kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, new_pgd: int) -> None:
    """The guest loads CR3 ``new_pgd``: switch to a cached root, or leave none (the next
    entry allocates one). A cached root may be obsolete; the pending request to free
    obsolete roots, made with every generation flip, takes care of that.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_new_pgd (v6.18)
    """
    role = KvmMmuPageRole(vcpu_mmu.mode.root_level, direct=False, access=ACC_ALL)
    if not fast_pgd_switch(kvm, mmu, vcpu_mmu, new_pgd, role):
        return
    # The cached MMIO translation belonged to the old CR3's tables.
    vcpu_clear_mmio_info(mmu, vcpu_mmu.vcpu_id, None)
    if vcpu_mmu.root.sp is not None:
        vcpu_mmu.root.sp.write_flooding_count = 0


def kvm_set_cr3(kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, cr3: int) -> None:
    """The guest writes CR3 (PCIDs off): a new root for a new value, and in any case a TLB
    flush and a sync of the root's unsync pages before the guest runs again.

    kernel: arch/x86/kvm/x86.c:kvm_set_cr3, kvm_invalidate_pcid (v6.18)
    """
    if cr3 != vcpu_mmu.cr3:
        kvm_mmu_new_pgd(kvm, mmu, vcpu_mmu, cr3)
    vcpu_mmu.cr3 = cr3
    vcpu_mmu.requests.add(KVM_REQ_MMU_SYNC)
    vcpu_mmu.requests.add(KVM_REQ_TLB_FLUSH)


def vcpu_enter_guest(
    kvm: Kvm, host: HostMm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, mem: GuestMemory
) -> int:
    """What the vCPU does about the MMU before entering the guest: serve its requests
    (drop obsolete roots, sync unsync pages, flush the TLB, reload the APIC-access page's
    address), then load a root if it has none (and, under PVM, take the vCPU's copy of its
    top level: pvm_top_level.py). ``mem`` is guest memory as KVM reads it (the
    guest PTEs a sync compares), ``host`` the VMM's memory (where the APIC-access page is
    looked up). Returns 1 when the vCPU entered; 0 when a request made while serving the
    others (an APIC-access reload that met an invalidation asks for itself again) cancelled
    the entry, and the caller comes back here first; a negative errno when KVM_RUN fails
    (-ENOSPC: no shadow page was left for the root).

    kernel: arch/x86/kvm/x86.c:vcpu_enter_guest, kvm_vcpu_exit_request;
    arch/x86/kvm/mmu.h:kvm_mmu_reload (v6.18)
    """
    if KVM_REQ_MMU_FREE_OBSOLETE_ROOTS in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        kvm_mmu_free_obsolete_roots(kvm, mmu, vcpu_mmu)
    if KVM_REQ_MMU_SYNC in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_MMU_SYNC)
        kvm_mmu_sync_roots(kvm, mmu, mem, vcpu_mmu)
    if KVM_REQ_TLB_FLUSH in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_TLB_FLUSH)
        vcpu_mmu.flush_tlb()
    if KVM_REQ_APIC_PAGE_RELOAD in vcpu_mmu.requests:
        vcpu_mmu.requests.discard(KVM_REQ_APIC_PAGE_RELOAD)
        kvm_vcpu_reload_apic_access_page(kvm, host, vcpu_mmu)
    if vcpu_mmu.root.sp is None:
        r = kvm_mmu_load(kvm, mmu, mem, vcpu_mmu)
        if r:
            return r
    pvm_enter_guest(kvm, mmu, vcpu_mmu)
    return int(KVM_REQ_APIC_PAGE_RELOAD not in vcpu_mmu.requests)
