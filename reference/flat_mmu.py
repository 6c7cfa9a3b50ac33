"""The smallest MMU that meets KVM's contracts: a flat gfn-to-pfn map and a TLB per vCPU.

A teaching device and a test bed for the generic layer. Real MMUs (x86 SPTEs, arm64 stage-2,
POWER HPT) keep trees or hash tables of translations; this one keeps a dictionary from
(address space, gfn) to (pfn, writable), which is all the generic code needs to talk to:

* the fault path installs a translation (:meth:`FlatMmu.map`);
* MMU notifiers and memslot flushes remove them (``kvm_unmap_gfn_range``,
  ``kvm_arch_flush_shadow_memslot``, and all of them at once ``kvm_arch_flush_shadow_all``)
  and ask for a TLB flush;
* dirty logging write-protects them when it starts (``kvm_arch_commit_memory_region``) and
  after each harvest (``kvm_arch_mmu_enable_log_dirty_pt_masked``);
* aging reads and clears an accessed bit.

Each vCPU has a TLB that caches translations as the guest uses them. Removing or
write-protecting a translation leaves the TLB stale until a flush, exactly the window the
kernel's flush points close; the invariants check that no stale entry survives a flush point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange

Key = tuple[int, int]
"""(address space, gfn)."""


@dataclass(slots=True)
class FlatPte:
    pfn: int
    writable: bool
    accessed: bool = True


class FlatMmu(KvmArch):
    """Translations by (as_id, gfn), and one TLB per vCPU id."""

    def __init__(self) -> None:
        super().__init__()
        self.ptes: dict[Key, FlatPte] = {}
        self.tlbs: dict[int, dict[Key, FlatPte]] = {}

    # -- what the fault path and the guest use ----------------------------------------------

    def map(self, kvm: Kvm, as_id: int, gfn: int, pfn: int, writable: bool) -> None:
        """Install a translation (under mmu_lock, after the retry check). A present
        translation is never pointed at another pfn in place (X4): it is replaced whole."""
        kvm.lockdep_assert_mmu_lock_held_write("installing a translation")
        self.ptes[(as_id, gfn)] = FlatPte(pfn, writable)

    def translate(self, vcpu_id: int, as_id: int, gfn: int) -> FlatPte | None:
        """What the guest's hardware walk finds: the TLB first, then the table (which the
        TLB then caches, as hardware does)."""
        tlb = self.tlbs.setdefault(vcpu_id, {})
        entry = tlb.get((as_id, gfn))
        if entry is None:
            entry = self.ptes.get((as_id, gfn))
            if entry is not None:
                entry.accessed = True
                tlb[(as_id, gfn)] = FlatPte(entry.pfn, entry.writable)
        return entry

    def drop_faulting_entry(self, vcpu_id: int, as_id: int, gfn: int) -> None:
        """A translation that caused a fault is not kept in the TLB (x86 and arm64 hardware
        both drop it), so the retried access sees what the fault installed."""
        self.tlbs.setdefault(vcpu_id, {}).pop((as_id, gfn), None)

    def _remove(self, kvm: Kvm, as_id: int, start: int, end: int) -> bool:
        kvm.lockdep_assert_mmu_lock_held_write("removing translations")
        keys = [key for key in self.ptes if key[0] == as_id and start <= key[1] < end]
        for key in keys:
            del self.ptes[key]
        return bool(keys)

    # -- the arch hooks the generic layer calls -----------------------------------------------

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        return self._remove(kvm, gfn_range.slot.as_id, gfn_range.start, gfn_range.end)

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        if not self.ptes:
            return  # nothing is mapped anywhere (a VM whose guest never ran)
        with kvm.mmu_lock.write():
            if kvm.quirk_slot_zap_all():
                # x86 with KVM_X86_QUIRK_SLOT_ZAP_ALL (the default): every DELETE or MOVE
                # drops every translation, not only the slot's (FINDINGS 5.4). Found by the
                # guest differential machine: a write-protected translation of another slot
                # survived here, so a later read did not fault and was not logged.
                removed = bool(self.ptes)
                self.ptes.clear()
            else:
                removed = self._remove(kvm, slot.as_id, slot.base_gfn, slot.end_gfn)
        if removed:
            self.kvm_flush_remote_tlbs(kvm)

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        """When a slot starts dirty logging, write-protect every translation of it and flush,
        so the next guest write to each page faults and is logged (D1). With manual
        protection and INITIALLY_SET the bitmap starts all ones, so there is nothing to
        protect yet: CLEAR protects pages as userspace clears them (D5)."""
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        if new is None or change is MrChange.DELETE or not new.dirty_logging:
            return
        if old is not None and old.dirty_logging:
            return  # logging was already on: nothing changes for dirty tracking
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET or not self.ptes:
            return
        protected = False
        with kvm.mmu_lock.write():
            for (as_id, gfn), pte in self.ptes.items():
                if as_id == new.as_id and new.base_gfn <= gfn < new.end_gfn and pte.writable:
                    pte.writable = False
                    protected = True
        if protected:
            self.kvm_flush_remote_tlbs_memslot(kvm, new)

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        super().kvm_arch_flush_shadow_all(kvm)
        with kvm.mmu_lock.write():
            self.ptes.clear()
        self.kvm_flush_remote_tlbs(kvm)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        super().kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)
        kvm.lockdep_assert_mmu_lock_held_write("write-protecting for dirty logging")
        bit = 0
        while mask >> bit:
            if mask >> bit & 1:
                pte = self.ptes.get((slot.as_id, slot.base_gfn + gfn_offset + bit))
                if pte is not None:
                    pte.writable = False
            bit += 1

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_age_gfn(kvm, gfn_range)
        kvm.lockdep_assert_mmu_lock_held_write("aging translations")
        young = False
        for (as_id, gfn), pte in self.ptes.items():
            if as_id == gfn_range.slot.as_id and gfn_range.start <= gfn < gfn_range.end:
                young |= pte.accessed
                pte.accessed = False
        return young

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_test_age_gfn(kvm, gfn_range)
        return any(
            pte.accessed
            for (as_id, gfn), pte in self.ptes.items()
            if as_id == gfn_range.slot.as_id and gfn_range.start <= gfn < gfn_range.end
        )

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        super().kvm_flush_remote_tlbs(kvm)
        for tlb in self.tlbs.values():
            tlb.clear()

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        for tlb in self.tlbs.values():
            stale = [k for k in tlb if k[0] == slot.as_id and slot.base_gfn <= k[1] < slot.end_gfn]
            for key in stale:
                del tlb[key]
