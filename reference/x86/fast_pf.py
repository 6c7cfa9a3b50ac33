"""The fast page fault: fixing a write-protected or access-tracked SPTE without mmu_lock.

Two kinds of fault need no new translation, only a bit the SPTE lost on purpose:

* a write to an SPTE that is still MMU-writable but not writable: dirty logging (or a huge
  page split) took W away so that the next write is noticed; granting W again, and logging
  the page dirty, is all there is to do;
* any access to an access-tracked SPTE (EPT without A/D bits: aging cleared RWX and saved
  R and X): restoring them is all there is to do.

KVM does both without mmu_lock, walking the tables locklessly and changing the SPTE with
one compare-and-exchange (fast_pf_fix_direct_spte). If anything changed the SPTE between
the read and the exchange, a zap above all, the exchange fails and the walk starts over:
the fast path can never bring back an SPTE that was zapped (X16). It stays out of two cases
it cannot settle alone: W is granted only on an MMU-writable SPTE (a shadowed page table or
a read-only host page takes the slow path), and never on a huge SPTE in a dirty-logged slot
(only one page of it would be logged).

The kernel runs it only for a direct MMU (TDP, from direct_page_fault), whose pages all map
a fixed gfn range: an indirect page maps whatever the guest's PTE said when it was made,
which may have changed (locking.rst, "Fast page fault"). The model's MMU is shadow paging,
whose fault path (FNAME(page_fault)) never calls it; the direct pages it has (below guest
huge pages) are what the model runs it on, and an indirect page ends it (the kernel has
none). Not modelled: freeing a page under the lockless walk (the kernel's remote TLB flush
waits for such walkers before any page is freed; the zaps a test races here drop leaves).

kernel: arch/x86/kvm/mmu/mmu.c:page_fault_can_be_fast, fast_page_fault,
fast_pf_get_last_sptep, fast_pf_fix_direct_spte, is_access_allowed;
Documentation/virt/kvm/locking.rst, "Fast page fault" (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.x86.mmu_page import ShadowMmuState, SptePtr
from kvmspec.reference.x86.paging import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    pt_index,
)
from kvmspec.reference.x86.paging_tmpl import KvmPageFault, RetPf
from kvmspec.reference.x86.spte import (
    SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    SHADOW_NONPRESENT_VALUE,
    SpteMasks,
    check_spte_change,
    is_access_allowed,
    is_access_track_spte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    restore_acc_track_spte,
)
from kvmspec.reference.x86.tlb import VcpuMmu

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.vcpu import KvmVcpu

FAST_PF_MAX_RETRIES = 4
"""After this many failed exchanges the fast path gives up (the slow path follows)."""


def page_fault_can_be_fast(masks: SpteMasks, fault: KvmPageFault) -> bool:
    """Could the fast path settle this fault? Not a reserved-bit fault (an MMIO SPTE); a
    fault on a non-present SPTE only without A/D bits (it may be access-tracked); a fault
    on a present one only if it is a write (W may be restorable).

    kernel: arch/x86/kvm/mmu/mmu.c:page_fault_can_be_fast (v6.18)
    """
    if fault.error_code & PFERR_RSVD_MASK:
        return False
    if not fault.error_code & PFERR_PRESENT_MASK:
        return not masks.ad_enabled
    return fault.write


def fast_pf_get_last_sptep(
    mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, addr: int
) -> tuple[SptePtr | None, int]:
    """The last SPTE of the lockless walk of ``addr`` (the leaf, or the non-present entry
    where the walk stopped), with the value read.

    kernel: arch/x86/kvm/mmu/mmu.c:fast_pf_get_last_sptep (v6.18)
    """
    sp = vcpu_mmu.root.sp
    if sp is None or sp is mmu.dummy_root:
        return None, SHADOW_NONPRESENT_VALUE
    while True:
        sptep = SptePtr(sp, pt_index(addr, sp.role.level))
        spte = sptep.get()
        if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.role.level):
            return sptep, spte
        sp = mmu.spte_to_child_sp(spte)


def check_fast_pf_change(
    masks: SpteMasks, sptep: SptePtr, old_spte: int, new_spte: int
) -> str | None:
    """X16 for one exchange of the fast path: a leaf of a direct page, changed only in W, A
    and the access-tracking bits, and made writable only if it was MMU-writable. Returns
    what is wrong, or None (the model's own check, read from the bits themselves)."""
    may_change = PT_WRITABLE_MASK | masks.accessed_mask | masks.acc_track_mask
    may_change |= SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    where = f"fast page fault changed {sptep}: {old_spte:#x} -> {new_spte:#x}"
    if not sptep.sp.role.direct:
        return f"X16: {where} in an indirect page"
    if (old_spte ^ new_spte) & ~may_change:
        return f"X16: {where}, beyond W, A and access tracking"
    if new_spte & PT_WRITABLE_MASK and not old_spte & masks.mmu_writable_mask:
        return f"X16: {where}, W without MMU-writable"
    return None


def fast_pf_fix_direct_spte(
    kvm: Kvm,
    mmu: ShadowMmuState,
    vcpu: KvmVcpu | None,
    fault: KvmPageFault,
    sptep: SptePtr,
    old_spte: int,
    new_spte: int,
) -> bool:
    """Replace ``old_spte`` by ``new_spte`` with a compare-and-exchange: False if the SPTE
    changed since it was read. Granting W logs the gfn dirty (the SPTE's D bit is not set,
    so a PML log may record the page again on the write; harmless). The model judges the
    change as every SPTE write (X3, X4) and by check_fast_pf_change (X16), recording a WARN.

    kernel: arch/x86/kvm/mmu/mmu.c:fast_pf_fix_direct_spte (v6.18)
    """
    if sptep.get() != old_spte:  # try_cmpxchg64
        return False
    for problem in (
        check_fast_pf_change(mmu.masks, sptep, old_spte, new_spte),
        check_spte_change(mmu.masks, old_spte, new_spte, sptep.sp.role.level),
    ):
        if problem is not None:
            kvm.warn_on(True, problem.split(":")[0], problem)
    sptep.sp.set_spte(sptep.index, new_spte)
    if is_writable_pte(new_spte) and not is_writable_pte(old_spte):
        mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, vcpu)
    return True


def fast_page_fault(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, vcpu: KvmVcpu | None, fault: KvmPageFault
) -> KernelOp[RetPf]:
    """Try to settle ``fault`` without mmu_lock (see the module docstring): FIXED, SPURIOUS
    (another vCPU fixed it already), or INVALID (the slow path must run). ``fault`` carries
    the gfn and its slot, as the kernel's does. Between reading the SPTE and the exchange,
    another CPU may run: a zap there makes the exchange fail, and the next walk finds
    nothing to fix.

    kernel: arch/x86/kvm/mmu/mmu.c:fast_page_fault (v6.18)
    """
    masks = mmu.masks
    if not page_fault_can_be_fast(masks, fault):
        return RetPf.INVALID
    write = fault.write
    fetch = bool(fault.error_code & PFERR_FETCH_MASK)
    ret = RetPf.INVALID
    retry_count = 0
    while True:
        sptep, spte = fast_pf_get_last_sptep(mmu, vcpu_mmu, fault.addr)
        if sptep is None or not is_shadow_present_pte(spte):
            break
        sp = sptep.sp
        if not is_last_spte(spte, sp.role.level):
            break
        if is_access_allowed(masks, spte, write=write, fetch=fetch):
            ret = RetPf.SPURIOUS  # fixed meanwhile, or a TLB flushed lazily
            break
        new_spte = spte
        if not masks.ad_enabled and is_access_track_spte(masks, spte):
            new_spte = restore_acc_track_spte(masks, new_spte) | masks.accessed_mask
        if write and is_mmu_writable_spte(masks, spte):
            new_spte |= PT_WRITABLE_MASK
            # A huge SPTE would log only one of its pages: the slow path maps 4K.
            if sp.role.level > PG_LEVEL_4K and fault.slot is not None and fault.slot.dirty_logging:
                break
        if new_spte == spte or not is_access_allowed(masks, new_spte, write=write, fetch=fetch):
            break
        if not sp.role.direct:
            break  # the kernel's fast path only ever sees direct pages
        yield Preempt("fast page fault: SPTE read, compare-and-exchange next")
        if fast_pf_fix_direct_spte(kvm, mmu, vcpu, fault, sptep, spte, new_spte):
            ret = RetPf.FIXED
            break
        retry_count += 1
        if retry_count > FAST_PF_MAX_RETRIES:
            break
    if ret is not RetPf.INVALID:
        mmu.stat["pf_fast"] += 1
    return ret
