"""The shadow MMU's page fault: walk the guest's tables, resolve the page, build the shadow.

A guest access faults when the shadow tables have no (or too weak) a translation of its
virtual address. KVM then does in software what the hardware would have done with the
guest's own tables, and records the result where the hardware looks:

1. walk the guest's page tables (guest_walk.walk_addr_generic): a failed walk is the
   guest's own page fault, injected into it;
2. a write to a write-tracked gfn (an upper-level guest page table) cannot be mapped:
   it is emulated (RET_PF_WRITE_PROTECTED);
3. resolve the pfn with the generic protocol (kvm_mmu_faultin_pfn): snapshot
   mmu_invalidate_seq, look up the memslot (none or a write to a READONLY one: emulate;
   INVALID: retry), get the page from the host (EFAULT if it cannot);
4. under mmu_lock: give up if the root became obsolete or an invalidation covered the gfn
   since the snapshot (is_page_fault_stale); make sure a shadow page is left, recycling old
   ones if few are (mmu_pages.py: ENOSPC if none can be); then build the shadow pages down
   to the leaf (FNAME(fetch)), each shadowing the guest table the walk read at that level,
   choose the leaf's size (lpage.kvm_mmu_hugepage_adjust), and set the leaf
   (set_spte.mmu_set_spte).

A guest huge page is mapped with a huge leaf when the host backs it with a huge page and
nothing forbids it (lpage.py); otherwise in smaller pieces through *direct* shadow pages.
A gfn without a memslot is MMIO: with MMIO caching on, the fault goes on to the leaf and
installs an MMIO SPTE there (mark_mmio_spte), then asks for emulation; off (as on this
machine), it asks for emulation at once. After the leaf, the fault maps the empty neighbours
of its 4K leaf ahead of the guest (pte_prefetch.py). Not modelled: CR0.WP=0 supervisor writes.

kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(page_fault), FNAME(fetch),
FNAME(gpte_changed); arch/x86/kvm/mmu/mmu.c:kvm_mmu_faultin_pfn, __kvm_mmu_faultin_pfn,
kvm_handle_error_pfn, kvm_handle_noslot_fault, kvm_mmu_max_gfn, is_page_fault_stale,
page_fault_handle_page_track, kvm_mmu_finish_page_fault (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.gfn_to_hva import (
    gfn_to_hva_many,
    gfn_to_hva_memslot_prot,
    kvm_is_error_hva,
)
from kvmspec.reference.guest_memory import kvm_read_guest_atomic, kvm_read_guest_page
from kvmspec.reference.host import HostMm, get_page
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import (
    mmu_invalidate_retry_gfn,
    mmu_invalidate_retry_gfn_unsafe,
)
from kvmspec.reference.page_fault import kvm_release_faultin_page
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86.guest_walk import (
    PTE_SIZE,
    GuestWalker,
    X86Exception,
    gpte_access,
    walk_addr_generic,
)
from kvmspec.reference.x86.lpage import kvm_mmu_hugepage_adjust
from kvmspec.reference.x86.mmio_spte import (
    KVM_PFN_NOSLOT,
    vcpu_cache_mmio_info,
)
from kvmspec.reference.x86.mmu_page import (
    ShadowMmuState,
    SptePtr,
    gfn_round_for_level,
    is_obsolete_sp,
)
from kvmspec.reference.x86.mmu_pages import make_mmu_pages_available
from kvmspec.reference.x86.mmu_spte import (
    link_shadow_page,
)
from kvmspec.reference.x86.page_track import kvm_gfn_is_write_tracked
from kvmspec.reference.x86.paging import (
    ACC_ALL,
    PFERR_RSVD_MASK,
    PG_LEVEL_4K,
    pt_index,
)
from kvmspec.reference.x86.pte_prefetch import PTE_PREFETCH_NUM, fname_pte_prefetch
from kvmspec.reference.x86.roots import kvm_mmu_get_child_sp
from kvmspec.reference.x86.set_spte import KvmPageFault, RetPf, mmu_set_spte
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, VcpuMmu
from kvmspec.reference.x86.unsync import mmu_sync_children
from kvmspec.spec.uapi.constants import PAGE_SHIFT, PAGE_SIZE


@dataclass(frozen=True, slots=True)
class PageFaultResult:
    ret: RetPf
    exception: X86Exception | None = None
    """The guest's own page fault, when its walk failed (injected; ``ret`` is RETRY)."""


class KvmGuestMemory:
    """Guest memory as the walker reads it: through the memslots and the VMM's mapping.
    The A/D updates go straight to the host page (the kernel's cmpxchg on the user
    address); the walker lists the pages it dirtied, and the fault marks them."""

    def __init__(self, kvm: Kvm, host: HostMm) -> None:
        self.kvm = kvm
        self.host = host

    def read_u64(self, gpa: int) -> int | None:
        errno, data = kvm_read_guest_page(
            self.kvm, self.host, 0, gpa >> PAGE_SHIFT, gpa % PAGE_SIZE, PTE_SIZE
        )
        return None if errno else int.from_bytes(data, "little")

    def read_u64s_atomic(self, gpa: int, count: int) -> list[int] | None:
        """``count`` consecutive guest PTEs from ``gpa`` (within one page), in one read that
        faults nothing in (under mmu_lock): None if the page is not mapped right now."""
        errno, data = kvm_read_guest_atomic(self.kvm, self.host, 0, gpa, count * PTE_SIZE)
        if errno:
            return None
        return [
            int.from_bytes(data[i : i + PTE_SIZE], "little") for i in range(0, len(data), PTE_SIZE)
        ]

    def writable(self, gpa: int) -> bool:
        slot = self.kvm.memslots(0).gfn_to_memslot(gpa >> PAGE_SHIFT)
        return gfn_to_hva_memslot_prot(slot, gpa >> PAGE_SHIFT, PAGE_SHIFT)[1]

    def cmpxchg_u64(self, gpa: int, old: int, new: int) -> bool | None:
        current = self.read_u64(gpa)
        if current is None:
            return None
        if current != old:
            return False
        slot = self.kvm.memslots(0).gfn_to_memslot(gpa >> PAGE_SHIFT)
        hva, _ = gfn_to_hva_many(slot, gpa >> PAGE_SHIFT, True, PAGE_SHIFT)
        if kvm_is_error_hva(hva):
            return None
        return self.host.host_write(hva + gpa % PAGE_SIZE, new.to_bytes(8, "little")) == 0


def walker_pt_access(walker: GuestWalker, level: int) -> int:
    """The rights (ACC_*) that the guest entries above a level-``level`` table grant: the
    role.access of the shadow page of that table (the kernel's pt_access[level - 1])."""
    access = ACC_ALL
    for step in walker.steps:
        if step.level > level:
            access &= gpte_access(step.pte)
    return access


def gpte_changed(
    mem: KvmGuestMemory, walker: GuestWalker, level: int, prefetch_ptes: list[int]
) -> bool:
    """Does the guest entry the walk used at ``level`` still hold what it read? Another
    vCPU may have rewritten it before its table was write-protected. The read faults
    nothing in (the caller holds mmu_lock): a table page the host dropped since the walk
    counts as changed, and the fault is retried. At 4K the whole aligned group of
    PTE_PREFETCH_NUM entries around it is read at once and kept in ``prefetch_ptes``, for
    prefetching its neighbours (pte_prefetch.py).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(gpte_changed) (v6.18)
    """
    for step in walker.steps:
        if step.level != level:
            continue
        if level != PG_LEVEL_4K:
            entry = mem.read_u64s_atomic(step.pte_gpa, 1)
            return entry is None or entry[0] != step.pte
        group_gpa = step.pte_gpa & ~(PTE_PREFETCH_NUM * PTE_SIZE - 1)
        group = mem.read_u64s_atomic(group_gpa, PTE_PREFETCH_NUM)
        if group is None:
            return True
        prefetch_ptes[:] = group
        return group[(step.pte_gpa - group_gpa) // PTE_SIZE] != step.pte
    return False


def kvm_mmu_max_gfn() -> int:
    """The largest gfn KVM installs an MMIO SPTE for: with shadow paging, any gfn of a
    52-bit physical address (the guest's own tables refuse more).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_max_gfn (v6.18)
    """
    return (1 << (52 - PAGE_SHIFT)) - 1


def kvm_handle_noslot_fault(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_id: int, fault: KvmPageFault, access: int
) -> RetPf | None:
    """The gfn has no memslot: remember the MMIO translation for the emulator, then either
    emulate now (MMIO caching off, or a gfn too large to store) or go on with the "no slot"
    pfn (None, RET_PF_CONTINUE), so that the fault installs an MMIO SPTE at the leaf.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_handle_noslot_fault (v6.18)
    """
    vcpu_cache_mmio_info(
        kvm, mmu, vcpu_id, fault.addr, fault.gfn, access & mmu.masks.mmio_access_mask
    )
    fault.slot = None
    fault.pfn = KVM_PFN_NOSLOT
    fault.map_writable = False
    if not mmu.masks.enable_mmio_caching or fault.gfn > kvm_mmu_max_gfn():
        return RetPf.EMULATE
    return None


def kvm_mmu_faultin_pfn(
    kvm: Kvm,
    host: HostMm,
    fault: KvmPageFault,
    *,
    mmu: ShadowMmuState | None = None,
    vcpu_id: int = 0,
    access: int = 0,
) -> KernelOp[RetPf | None]:
    """Resolve the fault's gfn to a host page, with the generic exclusion protocol; None
    (RET_PF_CONTINUE) when ``fault`` now holds the pfn and a reference to its page, or the
    "no slot" pfn. A gfn without a slot goes to kvm_handle_noslot_fault with the shadow
    MMU ``mmu``, the vCPU and ``access`` (what the guest's tables grant, for the MMIO
    SPTE); a caller without ``mmu`` keeps no MMIO state and emulates.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_faultin_pfn, __kvm_mmu_faultin_pfn,
    kvm_handle_error_pfn (v6.18)
    """
    fault.mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("x86 fault: sequence snapshot taken")
    slot = fault.slot
    if slot is None:
        if mmu is None:
            return RetPf.EMULATE
        return kvm_handle_noslot_fault(kvm, mmu, vcpu_id, fault, access)
    if slot.invalid:
        return RetPf.RETRY  # being deleted or moved: its SPTEs must go before new ones
    if mmu_invalidate_retry_gfn_unsafe(kvm, fault.mmu_seq, fault.gfn):
        return RetPf.RETRY
    hva, _ = gfn_to_hva_many(slot, fault.gfn, fault.write, PAGE_SHIFT)
    if kvm_is_error_hva(hva):
        return RetPf.EMULATE  # KVM_PFN_ERR_RO_FAULT: a write to a READONLY slot
    yield Preempt("x86 fault: resolving the pfn (get_user_pages may sleep)")
    errno, host_pte = host.fault_in(hva, fault.write)
    if errno or host_pte is None:
        return RetPf.EFAULT
    fault.pfn = host_pte.pfn
    fault.map_writable = host_pte.writable and not slot.readonly
    fault.page = host.pages.get(fault.pfn)  # None: the zero page, never refcounted
    if fault.page is not None:
        get_page(fault.page)
    yield Preempt("x86 fault: pfn resolved, taking mmu_lock")
    return None


def is_page_fault_stale(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, fault: KvmPageFault
) -> bool:
    """Under mmu_lock: the root became obsolete (a fast zap), or an invalidation covering
    the gfn ran since the snapshot (N4). Either way the fault installs nothing.

    kernel: arch/x86/kvm/mmu/mmu.c:is_page_fault_stale (v6.18)
    """
    sp = vcpu_mmu.root.sp
    if sp is not None and sp is not mmu.dummy_root and is_obsolete_sp(mmu, sp):
        return True
    if sp is mmu.dummy_root and KVM_REQ_MMU_FREE_OBSOLETE_ROOTS in vcpu_mmu.requests:
        return True
    return fault.slot is not None and mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn)


def fname_fetch(
    kvm: Kvm,
    mmu: ShadowMmuState,
    mem: KvmGuestMemory,
    vcpu_mmu: VcpuMmu,
    fault: KvmPageFault,
    walker: GuestWalker,
    vcpu: KvmVcpu | None,
) -> RetPf:
    """Build the shadow path for the walk, under mmu_lock. From the root down to the
    guest leaf's level, each level links the shadow page of the guest table the walk read
    there (re-reading the guest entry after the page is created: if it changed, retry).
    Only then is the leaf's size chosen, since shadowing those tables may have forbidden
    a huge leaf over them. Below a guest huge leaf, direct pages cover its range down to
    that size (replacing a huge leaf found on the way); then the leaf, for the first gfn
    of its frame; then, unless the fault was spurious, the leaf's empty neighbours
    (pte_prefetch.py).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(fetch) (v6.18)
    """
    root = vcpu_mmu.root.sp
    top_level = vcpu_mmu.mode.root_level
    prefetch_ptes: list[int] = []
    if gpte_changed(mem, walker, top_level, prefetch_ptes):
        return RetPf.RETRY
    if root is None:
        return RetPf.RETRY
    if root is mmu.dummy_root:
        vcpu_mmu.requests.add(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        return RetPf.RETRY
    tables = {step.level: step.table_gfn for step in walker.steps}
    sp = root
    level = sp.role.level
    sptep = SptePtr(sp, pt_index(fault.addr, level))
    # The levels backed by guest tables.
    while level > walker.level:
        sp.write_flooding_count = 0
        table_gfn = tables[level - 1]
        child = kvm_mmu_get_child_sp(
            kvm,
            mmu,
            mem,
            vcpu_mmu,
            sptep,
            table_gfn,
            direct=False,
            access=walker_pt_access(walker, level - 1),
        )
        # An upper-level table is synced before it is linked: the guest needs no TLB flush
        # to make a non-present entry present, so what is below must be current now.
        if child is not None and child.unsync_children:
            mmu_sync_children(kvm, mmu, mem, vcpu_mmu.mode, child)
        if gpte_changed(mem, walker, level - 1, prefetch_ptes):
            return RetPf.RETRY
        if child is not None:
            link_shadow_page(kvm, mmu, sptep, child)
        sp = mmu.spte_to_child_sp(sptep.get())
        level -= 1
        sptep = SptePtr(sp, pt_index(fault.addr, level))
    sp.write_flooding_count = 0
    kvm_mmu_hugepage_adjust(kvm, mem.host, fault)
    # Below a guest huge page: direct pages, down to the leaf's level.
    while level > fault.goal_level:
        base_gfn = gfn_round_for_level(fault.gfn, level)
        child = kvm_mmu_get_child_sp(
            kvm, mmu, mem, vcpu_mmu, sptep, base_gfn, direct=True, access=walker.pte_access
        )
        if child is not None:
            link_shadow_page(kvm, mmu, sptep, child)
        sp = mmu.spte_to_child_sp(sptep.get())
        level -= 1
        sptep = SptePtr(sp, pt_index(fault.addr, level))
    base_gfn = gfn_round_for_level(fault.gfn, level)
    ret = mmu_set_spte(
        kvm, mmu, fault.slot, sptep, walker.pte_access, base_gfn, fault.pfn, fault, vcpu
    )
    if ret is RetPf.SPURIOUS:
        return ret
    fname_pte_prefetch(kvm, mmu, mem.host, vcpu_mmu.mode, sptep, prefetch_ptes, vcpu)
    return ret


def fname_page_fault(
    kvm: Kvm,
    host: HostMm,
    mmu: ShadowMmuState,
    vcpu_mmu: VcpuMmu,
    vcpu: KvmVcpu | None,
    addr: int,
    error_code: int,
) -> KernelOp[PageFaultResult]:
    """Handle a shadow page fault at guest virtual ``addr`` (see the module docstring).

    kernel: arch/x86/kvm/mmu/paging_tmpl.h:FNAME(page_fault) (v6.18)
    """
    srcu = kvm.srcu.read_lock()  # vcpu_run holds kvm->srcu around every fault
    try:
        mem = KvmGuestMemory(kvm, host)
        walk = yield from walk_addr_generic(
            mem, vcpu_mmu.mode, vcpu_mmu.cr3, addr, error_code & ~PFERR_RSVD_MASK
        )
        for gfn in walk.dirtied_gfns:  # the walk's A/D updates (kvm_vcpu_mark_page_dirty)
            mark_page_dirty_in_slot(kvm, kvm.memslots(0).gfn_to_memslot(gfn), gfn, vcpu)
        if isinstance(walk, X86Exception):
            return PageFaultResult(RetPf.RETRY, walk)
        fault = KvmPageFault(addr, error_code, walk.gfn, max_level=walk.level)
        fault.slot = kvm.memslots(0).gfn_to_memslot(walk.gfn)
        if fault.present and fault.write and kvm_gfn_is_write_tracked(fault.slot, fault.gfn):
            return PageFaultResult(RetPf.WRITE_PROTECTED)
        ret = yield from kvm_mmu_faultin_pfn(
            kvm, host, fault, mmu=mmu, vcpu_id=vcpu_mmu.vcpu_id, access=walk.pte_access
        )
        if ret is not None:
            return PageFaultResult(ret)
        ret = RetPf.RETRY
        try:
            with kvm.mmu_lock.write():
                if not is_page_fault_stale(kvm, mmu, vcpu_mmu, fault):
                    # Few pages left: recycle old ones first; none at all fails the fault.
                    if make_mmu_pages_available(kvm, mmu):
                        ret = RetPf.ENOSPC
                    else:
                        ret = fname_fetch(kvm, mmu, mem, vcpu_mmu, fault, walk, vcpu)
        finally:
            # kvm_mmu_finish_page_fault: release the page, dirty if it may be written.
            if fault.page is not None:
                kvm_release_faultin_page(
                    host, fault.page, unused=ret is RetPf.RETRY, dirty=fault.map_writable
                )
        if ret is RetPf.FIXED:
            mmu.stat["pf_fixed"] += 1
        return PageFaultResult(ret)
    finally:
        kvm.srcu.read_unlock(srcu)
