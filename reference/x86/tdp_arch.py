"""The x86 TDP MMU as the generic layer sees it: the KvmArch hooks.

The profile option ``mmu="tdp"``: KVM on a host with EPT (or NPT) and ``tdp_mmu=Y``. The
memslot layer, the MMU notifiers and the dirty log call these hooks (reference/arch.py);
each does what x86 does with its TDP MMU:

* dirty logging switched on write-protects the slot's leaves (or, with PML, clears their
  D bits) under the read side of mmu_lock, then flushes; each harvest re-arms the
  harvested pages the same way under the write lock;
* DELETE and MOVE flush the slot: with KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) by the
  fast zap, which invalidates every root, asks every vCPU to drop its root, and zaps the
  invalidated roots under the read lock *before returning* (X14); without it, by zapping
  the slot's leaves in every root;
* an MMU-notifier invalidation zaps the range's leaves in every root, invalid ones too;
* aging is lockless (``lockless_aging``): an RCU walk clearing A bits atomically;
* a TLB flush flushes every vCPU's TLB.

Not modelled: eager page splitting and recovering huge pages when logging stops (the
model's TDP faults never map huge pages), the shadow MMU that would run beside the TDP
MMU for nested guests, and MMIO SPTEs.

kernel: arch/x86/kvm/x86.c:kvm_mmu_slot_apply_flags,
kvm_arch_mmu_enable_log_dirty_pt_masked; arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_all_fast,
kvm_mmu_zap_memslot, kvm_arch_flush_shadow_memslot, kvm_arch_flush_shadow_all,
kvm_mmu_zap_all, kvm_unmap_gfn_range, kvm_age_gfn, kvm_test_age_gfn,
kvm_mmu_slot_remove_write_access, kvm_mmu_slot_leaf_clear_dirty,
kvm_mmu_write_protect_pt_masked, kvm_mmu_clear_dirty_pt_masked (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import KernelOp, WaitUntil, run_to_completion
from kvmspec.reference.mmu_notifier import KvmGfnRange
from kvmspec.reference.x86.mmu_pages import kvm_mmu_commit_default_mmu_pages
from kvmspec.reference.x86.paging import PG_LEVEL_2M, PG_LEVEL_4K
from kvmspec.reference.x86.spte import SpteMasks
from kvmspec.reference.x86.tdp_mmu import (
    kvm_tdp_mmu_age_gfn_range,
    kvm_tdp_mmu_clear_dirty_pt_masked,
    kvm_tdp_mmu_clear_dirty_slot,
    kvm_tdp_mmu_unmap_gfn_range,
    kvm_tdp_mmu_wrprot_slot,
    kvm_tdp_mmu_zap_all,
    kvm_tdp_mmu_zap_invalidated_roots,
)
from kvmspec.reference.x86.tdp_mmu_roots import (
    TdpMmuState,
    kvm_make_all_cpus_request,
    kvm_tdp_mmu_invalidate_roots,
)
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


def kvm_mmu_zap_all_fast(kvm: Kvm, mmu: TdpMmuState) -> KernelOp[None]:
    """Drop every mapping without walking them under the write lock: invalidate every root
    and ask each vCPU to drop its root (under the write lock, a moment), then zap the
    invalidated roots under the read lock, while vCPUs fault on new roots.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_all_fast (v6.18)
    """
    lock = kvm.mmu_lock
    if lock.writer or lock.readers:
        yield WaitUntil("write_lock(mmu_lock)", lambda: not lock.writer and not lock.readers)
    with lock.write():
        kvm_tdp_mmu_invalidate_roots(kvm, mmu)
        kvm_make_all_cpus_request(mmu, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    yield from kvm_tdp_mmu_zap_invalidated_roots(kvm, mmu)


class TdpMmu(TdpMmuState, KvmArch):
    """``kvm->arch`` of a VM on the TDP MMU: the state of tdp_mmu_roots.TdpMmuState and
    the generic layer's hooks."""

    lockless_aging = True

    def __init__(self, masks: SpteMasks, pml: bool = False) -> None:
        KvmArch.__init__(self)
        TdpMmuState.__init__(self, masks, pml)

    # -- memslots --------------------------------------------------------------------------

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        kvm_mmu_commit_default_mmu_pages(kvm, self, change)
        if new is not None and old is not None and change is MrChange.FLAGS_ONLY:
            self.kvm_mmu_slot_apply_flags(kvm, old, new)

    def kvm_mmu_slot_apply_flags(self, kvm: Kvm, old: KvmMemorySlot, new: KvmMemorySlot) -> None:
        """Dirty logging switched on: unless the bitmap starts all set (D5), clear the D
        bits of the slot's leaves (PML logs the writes that set them again) or take W
        away (the next write faults and is logged), then flush unconditionally. Switched
        off: nothing to recover, the model never maps huge pages.

        kernel: arch/x86/kvm/x86.c:kvm_mmu_slot_apply_flags;
        arch/x86/kvm/mmu/mmu.c:kvm_mmu_slot_remove_write_access,
        kvm_mmu_slot_leaf_clear_dirty (v6.18)
        """
        if new.readonly or old.dirty_logging == new.dirty_logging or not new.dirty_logging:
            return
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            return
        if self.pml:
            run_to_completion(kvm_tdp_mmu_clear_dirty_slot(kvm, self, new))
            run_to_completion(kvm_tdp_mmu_wrprot_slot(kvm, self, new, PG_LEVEL_2M))
        else:
            run_to_completion(kvm_tdp_mmu_wrprot_slot(kvm, self, new, PG_LEVEL_4K))
        self.kvm_flush_remote_tlbs_memslot(kvm, new)

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """kernel: arch/x86/kvm/mmu/mmu.c:kvm_arch_flush_shadow_memslot,
        kvm_mmu_zap_memslot (v6.18)"""
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        if kvm.quirk_slot_zap_all():
            run_to_completion(kvm_mmu_zap_all_fast(kvm, self))
            return
        with kvm.mmu_lock.write():
            gfn_range = KvmGfnRange(slot, slot.base_gfn, slot.end_gfn)
            if kvm_tdp_mmu_unmap_gfn_range(kvm, self, gfn_range, False):
                self.kvm_flush_remote_tlbs_memslot(kvm, slot)

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        """kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_all (v6.18)"""
        super().kvm_arch_flush_shadow_all(kvm)
        with kvm.mmu_lock.write():
            kvm_tdp_mmu_zap_all(kvm, self)

    # -- notifiers ---------------------------------------------------------------------------

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        return kvm_tdp_mmu_unmap_gfn_range(kvm, self, gfn_range, False)

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_age_gfn(kvm, gfn_range)
        return run_to_completion(kvm_tdp_mmu_age_gfn_range(kvm, self, gfn_range, False))

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_test_age_gfn(kvm, gfn_range)
        return run_to_completion(kvm_tdp_mmu_age_gfn_range(kvm, self, gfn_range, True))

    # -- dirty logging and TLBs --------------------------------------------------------------

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        """Re-arm logging for the harvested 4K pages: clear D with PML, else W (the caller
        holds mmu_lock for write and flushes).

        kernel: arch/x86/kvm/x86.c:kvm_arch_mmu_enable_log_dirty_pt_masked;
        arch/x86/kvm/mmu/mmu.c:kvm_mmu_write_protect_pt_masked,
        kvm_mmu_clear_dirty_pt_masked (v6.18)
        """
        super().kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)
        gfn = slot.base_gfn + gfn_offset
        kvm_tdp_mmu_clear_dirty_pt_masked(kvm, self, slot, gfn, mask, wrprot=not self.pml)

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        super().kvm_flush_remote_tlbs(kvm)
        for vcpu_mmu in self.vcpus.values():
            vcpu_mmu.flush_tlb()

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        for vcpu_mmu in self.vcpus.values():
            vcpu_mmu.flush_tlb()
