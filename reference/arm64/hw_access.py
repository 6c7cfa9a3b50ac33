"""The hardware as an actor: a guest access translated through stage 2.

A guest load or store first looks in the vCPU's TLB. On a miss the MMU walks the tables
from the PGD, one level at a time; between levels other CPUs run (a software walker may
lock, replace or unlink the entry the walk is about to read), so the walk is a generator
that yields before each read. A leaf it may use is cached in the TLB; a fault is not.

With FEAT_HAFDBS (VTCR_EL2.HA) the MMU sets a clear access flag itself, atomically; without
it the access takes an access-flag fault and KVM sets AF. With hardware dirty state
(VTCR_EL2.HD) a store to a DBM descriptor without write permission sets S2AP W (the entry
becomes writable-dirty) instead of faulting. These are the concurrent updates that seed
001's lockless aging must not lose.

A TLB invalidation completes only when the walks in flight that might have used the old
entries are done; the model makes such a walk start over from the PGD, which is what the
architecture guarantees the software can rely on, and is why a table can be freed after its
range was invalidated even though the hardware walks outside any RCU read section.

kernel: arch/arm64/kvm/mmu.c:kvm_handle_guest_abort, handle_access_fault (the faults this
returns) (v6.18); Arm ARM D8 (stage 2 translation, hardware AF and dirty state)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.reference.arm64.descriptors import (
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_LEAF_ATTR_S2_DBM,
    kvm_pte_table,
    kvm_pte_to_phys,
    kvm_pte_valid,
)
from kvmspec.reference.arm64.pgtable import KvmPgtable, Ptep, WriteInfo
from kvmspec.reference.arm64.s2_mmu import InFlightWalk, TlbEntry
from kvmspec.reference.concurrency import KernelOp, Preempt


@dataclass(frozen=True, slots=True)
class GuestAccessResult:
    """The outcome of one access: the host physical address it reached, or the stage-2
    fault it took (``translation``, ``access_flag`` or ``permission``) and at which level."""

    pa: int | None
    fault: str | None
    level: int


def guest_access(
    pgt: KvmPgtable, vcpu_id: int, ipa: int, write: bool, fetch: bool = False
) -> KernelOp[GuestAccessResult]:
    """One guest load (``write`` False) or store at ``ipa`` on vCPU ``vcpu_id``; with
    ``fetch``, an instruction fetch (a read that also needs the leaf executable: XN clear)."""
    mmu = pgt.mmu
    cached = mmu.tlb_lookup(vcpu_id, ipa)
    if cached is not None and _permits(cached.pte, write, fetch):
        return GuestAccessResult(cached.pa + (ipa - cached.ipa), None, -1)
    walk = InFlightWalk(ipa)
    mmu.walks_in_flight.append(walk)
    try:
        while True:
            walk.restart = False
            result = yield from _stage2_walk(pgt, vcpu_id, ipa, write, fetch, walk)
            if result is not None:
                return result
    finally:
        mmu.walks_in_flight.remove(walk)


def _permits(pte: int, write: bool, fetch: bool) -> bool:
    """Does a cached leaf allow the access without another walk?"""
    if fetch:
        return not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN
    return not write or bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)


def _stage2_walk(
    pgt: KvmPgtable, vcpu_id: int, ipa: int, write: bool, fetch: bool, walk: InFlightWalk
) -> KernelOp[GuestAccessResult | None]:
    """One walk from the PGD; None when a TLBI made it start over."""
    geometry = pgt.geometry
    mm_ops = pgt.mm_ops
    features = pgt.mmu.features
    assert pgt.pgd is not None, "the guest runs only while its stage 2 exists"
    table = pgt.pgd[geometry.kvm_pgd_page_idx(ipa)]
    level = geometry.start_level
    while True:
        yield Preempt(f"hardware walk of IPA {ipa:#x} at level {level}")
        if walk.restart:
            return None
        ptep = Ptep(table, geometry.kvm_pgtable_idx(ipa, level))
        pte = mm_ops.read(ptep, "the hardware walker")
        if not kvm_pte_valid(pte):
            # Also a LOCKED entry: break-before-make is invisible to the guest but as a
            # translation fault, which KVM's fault path retries (A2).
            return GuestAccessResult(None, "translation", level)
        if kvm_pte_table(pte, level):
            table = mm_ops.phys_to_virt(kvm_pte_to_phys(pte, geometry.page_shift))
            level += 1
            continue
        break
    new = pte
    if not pte & KVM_PTE_LEAF_ATTR_LO_S2_AF:
        if not features.ha:
            return GuestAccessResult(None, "access_flag", level)
        new |= KVM_PTE_LEAF_ATTR_LO_S2_AF
    if write and not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        if not (features.hd and pte & KVM_PTE_LEAF_ATTR_S2_DBM):
            return GuestAccessResult(None, "permission", level)
        new |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    if fetch and pte & KVM_PTE_LEAF_ATTR_HI_S2_XN:
        return GuestAccessResult(None, "permission", level)
    if not write and not fetch and not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        return GuestAccessResult(None, "permission", level)
    size = geometry.kvm_granule_size(level)
    base = ipa & ~(size - 1)
    if new != pte:
        # The hardware's update is one atomic read-modify-write of the descriptor.
        mm_ops.store(ptep, new, WriteInfo(base, size, pte, "hardware", False))
    pa = kvm_pte_to_phys(new, geometry.page_shift)
    pgt.mmu.tlb_fill(vcpu_id, TlbEntry(base, size, pa, new))
    return GuestAccessResult(pa + (ipa - base), None, level)
