"""POWER Book3S HV with a hashed page table, as the generic layer sees it: the KvmArch hooks.

On x86 and arm64, KVM builds the guest's translations itself on page faults. An HPT guest
builds them: it enters every translation with H_ENTER (hcalls.py), and KVM only puts host
addresses into them and keeps track. So most hooks here are about taking pages *away*:

* a memslot that is created gets an empty rmap array; one that moves or changes flags keeps
  its array (the kernel shares it);
* DELETE and MOVE flush the slot: every entry on the slot's chains is made ABSENT and
  tlbie'd, and the chains are emptied (seed 000). The guest keeps its entries; its next
  access traps and finds MMIO (the slot is gone) or the page again (fault.py);
* an MMU-notifier invalidation does the same for the range's pages, with its own tlbies, so
  it never asks the generic layer for a flush;
* aging reads and clears R bits; dirty logging harvests C bits
  (:func:`kvm_vm_ioctl_get_dirty_log_hv` replaces the generic GET_DIRTY_LOG on POWER:
  nothing is write-protected for logging);
* a memslot change that is not a deletion bumps ``mmio_update``, invalidating every vCPU's
  cache of MMIO translations (P7).

``kvm_arch_flush_shadow_all`` is the base class's: the kernel's is empty on POWER (the HPT is
freed with the VM).

kernel: arch/powerpc/kvm/book3s_hv.c:kvmppc_core_prepare_memory_region_hv,
kvmppc_core_commit_memory_region_hv, kvmppc_core_free_memslot_hv,
kvm_vm_ioctl_get_dirty_log_hv; arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_unmap_gfn_range_hv,
kvm_age_gfn_hv, kvm_test_age_gfn_hv, kvmppc_core_flush_memslot_hv;
arch/powerpc/kvm/powerpc.c:kvm_arch_flush_shadow_memslot (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import KernelOp
from kvmspec.reference.ppc.hpt import KVM_DEFAULT_HPT_ORDER, SlotRmap, kvmppc_allocate_hpt
from kvmspec.reference.ppc.rmap_walk import (
    kvm_age_rmapp,
    kvm_test_age_rmapp,
    kvm_unmap_rmapp,
    kvmppc_core_flush_memslot_hv,
    kvmppc_hv_get_dirty_log_hpt,
)
from kvmspec.reference.ppc.tlb import HptTlbs, flush_all_tlbs, hardware_access
from kvmspec.spec.uapi.dirty_log_rules import BITS_PER_LONG, get_dirty_log_errno
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange
    from kvmspec.reference.ppc.fault import HptVcpuArch
    from kvmspec.reference.ppc.resize import KvmResizeHpt


class HptMmu(KvmArch):
    """``kvm->arch`` of an HPT guest: the table, the vCPUs' TLBs, the MMIO cache generation
    (``mmio_update``), whether vCPUs are running (dirty harvests are cheaper then), whether
    they may enter the guest (``mmu_ready``, cleared while an HPT resize commits), the
    pending resize (resize.py) and each vCPU's fault state (fault.py)."""

    def __init__(self, order: int = KVM_DEFAULT_HPT_ORDER) -> None:
        super().__init__()
        errno, hpt = kvmppc_allocate_hpt(order)
        if errno or hpt is None:
            raise ValueError(f"HPT order {order} is outside the range the kernel accepts")
        self.hpt = hpt
        self.tlbs = HptTlbs()
        self.mmio_update = 0
        self.vcpus_running = False
        self.mmu_ready = True
        self.resize_hpt: KvmResizeHpt | None = None
        self.vcpu_arch: dict[int, HptVcpuArch] = {}

    # -- memslot metadata ----------------------------------------------------------------

    def kvm_arch_prepare_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> int:
        errno = super().kvm_arch_prepare_memory_region(kvm, old, new, change)
        if errno or new is None:
            return errno
        if change is MrChange.CREATE:
            new.arch["rmap"] = SlotRmap()
        elif old is not None:
            # MOVE and FLAGS_ONLY keep the array. For a MOVE it is empty of chains by now
            # (the slot was flushed while INVALID); its harvested R/C bits stay behind.
            new.arch["rmap"] = old.arch["rmap"]
        return 0

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        """A new or changed slot may turn an address that was emulated MMIO into RAM, so
        every cached MMIO translation is invalidated (P7)."""
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        if change is not MrChange.DELETE:
            self.mmio_update += 1

    def kvm_arch_free_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_arch_free_memslot(kvm, slot)
        rmap = slot.arch.get("rmap")
        if isinstance(rmap, SlotRmap):
            rmap.freed = True

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Seed 000: every entry that maps a page of the slot is invalidated, and the
        slot's rmap chains are emptied, before the slot is deleted or moved."""
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        kvmppc_core_flush_memslot_hv(kvm, self.hpt, self.tlbs, slot)

    # -- MMU notifiers ---------------------------------------------------------------------

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Invalidate every entry mapping a page of the range. The tlbies are done already,
        so the generic layer need not flush (False).

        kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_unmap_gfn_range_hv (v6.18)
        """
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        for gfn in range(gfn_range.start, gfn_range.end):
            kvm_unmap_rmapp(kvm, self.hpt, self.tlbs, gfn_range.slot, gfn)
        return False

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_age_gfn_hv (v6.18)"""
        super().kvm_age_gfn(kvm, gfn_range)
        young = False
        for gfn in range(gfn_range.start, gfn_range.end):
            young |= kvm_age_rmapp(kvm, self.hpt, self.tlbs, gfn_range.slot, gfn)
        return young

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Only the range's first page is tested: the generic layer asks about one host
        page, which is one gfn.

        kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_test_age_gfn_hv (v6.18)
        """
        super().kvm_test_age_gfn(kvm, gfn_range)
        return kvm_test_age_rmapp(kvm, self.hpt, gfn_range.slot, gfn_range.start)

    # -- TLBs ----------------------------------------------------------------------------------

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        super().kvm_flush_remote_tlbs(kvm)
        flush_all_tlbs(self.hpt, self.tlbs)

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """The TLBs are not indexed by gfn, so a slot's flush is a full one."""
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        flush_all_tlbs(self.hpt, self.tlbs)

    # -- the hardware -----------------------------------------------------------------------

    def guest_access(self, vcpu_id: int, pte_index: int, write: bool) -> bool:
        """A guest load or store through entry ``pte_index``: True if the hardware did it,
        False if it trapped to the hypervisor (see tlb.hardware_access)."""
        return hardware_access(self.hpt, self.tlbs, vcpu_id, pte_index, write)


def kvm_hpt(kvm: Kvm) -> HptMmu:
    """``kvm->arch`` of a VM that must be an HPT guest (the hypercalls' way in)."""
    arch = kvm.arch
    assert isinstance(arch, HptMmu), "not an HPT guest"
    return arch


def kvm_vm_ioctl_get_dirty_log_hv(kvm: Kvm, slot: int) -> KernelOp[tuple[int, list[int]]]:
    """KVM_GET_DIRTY_LOG on POWER HV: (errno, the words userspace receives). The C bits of
    the slot's entries are harvested (and cleared), and the bits KVM already put in the
    slot's bitmap (from entries that were unmapped, H_CLEAR_MOD, KVM's own writes) are
    taken with them: get-and-clear, nothing write-protected.

    kernel: arch/powerpc/kvm/book3s_hv.c:kvm_vm_ioctl_get_dirty_log_hv (v6.18)
    """
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        memslot = kvm.memslots(0).id_to_memslot(slot)
        logged = memslot is not None and memslot.dirty_bitmap is not None
        errno = get_dirty_log_errno(kvm.profile, kvm.use_dirty_bitmap(), slot, logged)
        if errno:
            return errno, []
        assert memslot is not None and memslot.dirty_bitmap is not None
        mmu = kvm_hpt(kvm)
        harvested = kvmppc_hv_get_dirty_log_hpt(kvm, mmu.hpt, mmu.tlbs, memslot, mmu.vcpus_running)
        bitmap = memslot.dirty_bitmap
        words = [bitmap.xchg_word(index) for index in range(bitmap.nr_words)]
        for offset in harvested:
            words[offset // BITS_PER_LONG] |= 1 << (offset % BITS_PER_LONG)
        return 0, words
    finally:
        kvm.slots_lock.unlock(owner)
