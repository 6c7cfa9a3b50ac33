"""The arm64 stage-2 MMU as the generic layer sees it: the KvmArch hooks.

The page-table library (pgtable.py, stage2.py, split.py) knows nothing about memslots,
notifiers or dirty logging; arch/arm64/kvm/mmu.c glues it to them, and so does this module:

* a new or changed slot must lie inside the VM's IPA space (EFAULT otherwise), and a slot
  over device memory (a VM_PFNMAP VMA) cannot log dirty pages (EINVAL);
* when a slot starts dirty logging, its leaves are write-protected and the slot's TLB
  entries flushed (unless the bitmap starts all set: then CLEAR protects page by page),
  and, when userspace set a split chunk size, its blocks are split into pages eagerly;
  each harvest write-protects the harvested pages again;
* DELETE and MOVE unmap the slot's IPA range; an MMU-notifier invalidation unmaps the
  range (the unmap walker invalidates the TLB itself, so the notifier need not flush);
* aging tests and clears the access flag of the range's leaves, under mmu_lock in v6.18
  (:class:`Arm64Mmu`); seed 001 proposed doing it without the lock, an RCU walk with
  compare-and-exchange (:class:`Arm64MmuLocklessAging`);
* ``kvm_arch_flush_shadow_all`` (the VMM's address space is going away) destroys the whole
  stage 2: every table freed, no translation left. Seed 001's patch emptied it; the
  reviewer: "This entirely fails to uphold the exact expectations of the call."

The fault path (user_mem_abort) is in :mod:`~kvmspec.reference.arm64.fault`.

kernel: arch/arm64/kvm/mmu.c:kvm_arch_prepare_memory_region, kvm_arch_commit_memory_region,
kvm_mmu_wp_memory_region, kvm_mmu_split_memory_region, kvm_mmu_split_huge_pages,
kvm_arch_mmu_enable_log_dirty_pt_masked, kvm_arch_flush_shadow_memslot,
kvm_arch_flush_shadow_all, kvm_uninit_stage2_mmu, kvm_free_stage2_pgd, kvm_unmap_gfn_range,
kvm_age_gfn, kvm_test_age_gfn, kvm_arch_flush_remote_tlbs, kvm_arch_flush_remote_tlbs_range,
kvm_arch_free_memslot (v6.18)
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.arm64.descriptors import (
    KVM_PGTABLE_LAST_LEVEL,
    kvm_pte_table,
    kvm_pte_to_phys,
    stage2_pte_is_counted,
)
from kvmspec.reference.arm64.pgtable import (
    NO_WALK_FLAGS,
    KvmMmuMemoryCache,
    KvmPgtable,
    KvmPgtableWalkFlags,
    TablePage,
)
from kvmspec.reference.arm64.s2_mmu import (
    KvmS2Mmu,
    Stage2Features,
    __kvm_tlb_flush_vmid,
    kvm_tlb_flush_vmid_range,
)
from kvmspec.reference.arm64.split import kvm_pgtable_stage2_split
from kvmspec.reference.arm64.stage2 import (
    kvm_pgtable_stage2_init,
    kvm_pgtable_stage2_test_clear_young,
    kvm_pgtable_stage2_unmap,
    kvm_pgtable_stage2_wrprotect,
)
from kvmspec.reference.concurrency import Rcu, run_to_completion
from kvmspec.reference.host import Device, HostMm
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange


def kvm_ipa_bits(profile: PlatformProfile) -> int:
    """The IPA size of a VM created with the default type: the profile's last gfn plus one,
    in bits (40 on arm64 unless KVM_VM_TYPE_ARM_IPA_SIZE asks for another)."""
    assert profile.max_gfn is not None, "an arm64 profile bounds the IPA space"
    return (profile.max_gfn + 1).bit_length() - 1 + profile.page_shift


class Arm64Mmu(KvmArch):
    """``kvm->arch.mmu`` of an arm64 VM: its stage 2 (None once destroyed), the VMM's
    address space ``mm`` (whose VMAs decide block sizes and device memory), and the eager
    split chunk size (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE; 0, the default, splits
    nothing when logging starts). ``rcu`` is what shared (lockless) walkers read under."""

    def __init__(
        self,
        profile: PlatformProfile,
        mm: HostMm | None = None,
        features: Stage2Features | None = None,
        split_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.mm = mm
        self.rcu = Rcu("rcu")
        self.split_chunk_size = split_chunk_size
        # Each vCPU's page cache for new tables (vcpu->arch.mmu_page_cache), by vCPU id.
        self.vcpu_memcaches: dict[int, KvmMmuMemoryCache] = {}
        self.ia_bits = kvm_ipa_bits(profile)
        self.pgt: KvmPgtable | None = kvm_pgtable_stage2_init(
            self.ia_bits, profile.page_shift, self.rcu, features or Stage2Features()
        )

    # -- memslot hooks -------------------------------------------------------------------

    def kvm_arch_prepare_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> int:
        """A new, moved or re-flagged slot must end inside the IPA space (EFAULT), and no
        VMA it covers may be device memory (VM_PFNMAP) while it asks for dirty logging:
        KVM cannot write-protect what it does not map through struct pages (EINVAL).
        Holes between VMAs are allowed here; a fault there finds no VMA.

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_prepare_memory_region (v6.18)
        """
        self.events.append(("prepare", change))
        if new is None or change not in (MrChange.CREATE, MrChange.MOVE, MrChange.FLAGS_ONLY):
            return 0
        shift = kvm.profile.page_shift
        if new.base_gfn + new.npages > (1 << self.ia_bits) >> shift:
            return errno.EFAULT
        if self.mm is None or not new.dirty_logging:
            return 0
        end = new.userspace_addr + (new.npages << shift)
        for vma in self.mm.vmas_in(new.userspace_addr, end):
            if isinstance(vma.backing, Device):
                return errno.EINVAL
        return 0

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        """A slot that logs dirty pages (after anything but DELETE) is write-protected
        whole and its blocks split, so that every write faults and is logged on a page;
        unless the bitmap started all set, in which case each CLEAR does it for the pages
        it clears (kvm_arch_mmu_enable_log_dirty_pt_masked).

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_commit_memory_region (v6.18)
        """
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        if new is None or change is MrChange.DELETE or not new.dirty_logging:
            return
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            return
        self.kvm_mmu_wp_memory_region(kvm, new)
        self.kvm_mmu_split_memory_region(kvm, new)

    def kvm_mmu_wp_memory_region(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Clear W on every leaf of the slot, then flush the slot's TLB entries (the walk
        itself invalidates nothing: A7).

        kernel: arch/arm64/kvm/mmu.c:kvm_mmu_wp_memory_region, stage2_wp_range (v6.18)
        """
        start, size = self._slot_range(kvm, slot)
        with kvm.mmu_lock.write():
            self.stage2_wp_range(start, size)
        self.kvm_flush_remote_tlbs_memslot(kvm, slot)

    def stage2_wp_range(self, start: int, size: int) -> None:
        """Write-protect [start, start + size) if the stage 2 exists.

        kernel: arch/arm64/kvm/mmu.c:stage2_wp_range (v6.18)
        """
        if self.pgt is not None:
            run_to_completion(kvm_pgtable_stage2_wrprotect(self.pgt, start, size))

    def kvm_mmu_split_memory_region(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """kernel: arch/arm64/kvm/mmu.c:kvm_mmu_split_memory_region (v6.18)"""
        start, size = self._slot_range(kvm, slot)
        with kvm.mmu_lock.write():
            self.kvm_mmu_split_huge_pages(start, start + size)

    def kvm_mmu_split_huge_pages(self, addr: int, end: int) -> int:
        """Split the blocks of [addr, end) into pages, one chunk of ``split_chunk_size`` at
        a time, each with a memory cache filled for the worst case (a 1 GB block). Nothing
        when the chunk size is 0: eager splitting is off, and the first write fault on a
        block replaces it by a table then.

        kernel: arch/arm64/kvm/mmu.c:kvm_mmu_split_huge_pages,
        kvm_mmu_split_nr_page_tables (v6.18)
        """
        chunk = self.split_chunk_size
        if chunk == 0 or self.pgt is None:
            return 0
        pgt = self.pgt
        capacity = kvm_mmu_split_nr_page_tables(pgt, chunk)
        while addr < end:
            next_addr = min(end, (addr // chunk + 1) * chunk)
            # Topped up before each chunk (the kernel drops mmu_lock to do it).
            cache = KvmMmuMemoryCache(capacity)
            ret = run_to_completion(kvm_pgtable_stage2_split(pgt, addr, next_addr - addr, cache))
            if ret:
                return ret
            addr = next_addr
        return 0

    def kvm_arch_free_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """arm64 keeps no per-slot metadata: nothing to free.

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_free_memslot (v6.18)
        """
        super().kvm_arch_free_memslot(kvm, slot)

    # -- removing mappings ---------------------------------------------------------------

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Unmap the slot's IPA range (the slot is INVALID by now, so no fault maps it
        again): the unmap walk invalidates the TLB as it goes.

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_flush_shadow_memslot (v6.18)
        """
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        start, size = self._slot_range(kvm, slot)
        with kvm.mmu_lock.write():
            self.kvm_stage2_unmap_range(start, size)

    def kvm_stage2_unmap_range(self, start: int, size: int) -> None:
        """kernel: arch/arm64/kvm/mmu.c:kvm_stage2_unmap_range, __unmap_stage2_range (v6.18)"""
        if self.pgt is not None:
            ret = run_to_completion(kvm_pgtable_stage2_unmap(self.pgt, start, size))
            self.pgt.mm_ops.warn_on(ret != 0, f"unmap_stage2_range: walk returned {ret}")

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        """The VMM's address space is being torn down: destroy the stage 2, every table
        with it, so that no translation to a page the host is about to free survives.

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_flush_shadow_all, kvm_uninit_stage2_mmu,
        kvm_free_stage2_pgd (v6.18)
        """
        super().kvm_arch_flush_shadow_all(kvm)
        with kvm.mmu_lock.write():
            pgt = self.pgt
            self.pgt = None
        if pgt is not None:
            kvm_pgtable_stage2_destroy(pgt)

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Unmap the range; False, since the unmap walk has invalidated the TLB already.

        kernel: arch/arm64/kvm/mmu.c:kvm_unmap_gfn_range (v6.18)
        """
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        shift = kvm.profile.page_shift
        self.kvm_stage2_unmap_range(
            gfn_range.start << shift, (gfn_range.end - gfn_range.start) << shift
        )
        return False

    # -- aging and dirty logging ---------------------------------------------------------

    age_walk_flags = NO_WALK_FLAGS
    """v6.18: aging walks with mmu_lock held for write (the generic notifier takes it)."""

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Clear AF on the range's leaves; True if any was set. No TLBI (A7).

        kernel: arch/arm64/kvm/mmu.c:kvm_age_gfn (v6.18)
        """
        super().kvm_age_gfn(kvm, gfn_range)
        return self._test_clear_young(kvm, gfn_range, mkold=True)

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """kernel: arch/arm64/kvm/mmu.c:kvm_test_age_gfn (v6.18)"""
        super().kvm_test_age_gfn(kvm, gfn_range)
        return self._test_clear_young(kvm, gfn_range, mkold=False)

    def _test_clear_young(self, kvm: Kvm, gfn_range: KvmGfnRange, mkold: bool) -> bool:
        if self.pgt is None:
            return False
        shift = kvm.profile.page_shift
        start = gfn_range.start << shift
        size = (gfn_range.end - gfn_range.start) << shift
        op = kvm_pgtable_stage2_test_clear_young(self.pgt, start, size, mkold, self.age_walk_flags)
        return run_to_completion(op)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        """Write-protect the harvested pages again: the whole span from the first to the
        last page of ``mask`` (pages in between that were not harvested too, which costs
        them one extra fault). With INITIALLY_SET logging never split the slot when it
        started, so the span's blocks are split now. The caller holds mmu_lock and flushes.

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_mmu_enable_log_dirty_pt_masked (v6.18)
        """
        super().kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)
        kvm.lockdep_assert_mmu_lock_held_write("write-protecting for dirty logging")
        shift = kvm.profile.page_shift
        base_gfn = slot.base_gfn + gfn_offset
        start = (base_gfn + (mask & -mask).bit_length() - 1) << shift
        end = (base_gfn + mask.bit_length()) << shift
        self.stage2_wp_range(start, end - start)
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            self.kvm_mmu_split_huge_pages(start, end)

    # -- TLB flushes ---------------------------------------------------------------------

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        """Invalidate the whole VMID (see :func:`kvm_arch_flush_remote_tlbs`)."""
        super().kvm_flush_remote_tlbs(kvm)
        if self.pgt is not None:
            kvm_arch_flush_remote_tlbs(self.pgt.mmu)

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Invalidate the slot's IPA range (the generic memslot flush goes through
        kvm_flush_remote_tlbs_range, which arm64 implements with a range TLBI).

        kernel: arch/arm64/kvm/mmu.c:kvm_arch_flush_remote_tlbs_range (v6.18)
        """
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        if self.pgt is not None:
            start, size = self._slot_range(kvm, slot)
            kvm_tlb_flush_vmid_range(self.pgt.mmu, start, size)

    @staticmethod
    def _slot_range(kvm: Kvm, slot: KvmMemorySlot) -> tuple[int, int]:
        shift = kvm.profile.page_shift
        return slot.base_gfn << shift, slot.npages << shift


class Arm64MmuLocklessAging(Arm64Mmu):
    """Seed 001's proposal (not v6.18): age without mmu_lock. The generic notifier then
    calls the aging hooks unlocked, and the walk is SHARED: an RCU reader (so no table is
    freed under it) that clears AF with compare-and-exchange (so neither the hardware's
    AF and dirty updates nor another walker's change is overwritten).
    """

    lockless_aging = True
    age_walk_flags = KvmPgtableWalkFlags.SHARED


def kvm_arch_flush_remote_tlbs(mmu: KvmS2Mmu) -> None:
    """Invalidate every stage-2 translation of the VM's VMID.

    kernel: arch/arm64/kvm/mmu.c:kvm_arch_flush_remote_tlbs (v6.18)
    """
    __kvm_tlb_flush_vmid(mmu)


def kvm_mmu_split_nr_page_tables(pgt: KvmPgtable, range_size: int) -> int:
    """Table pages that splitting every block of a range this size down to pages may need:
    one per block-level entry the range can touch, at each block level.

    kernel: arch/arm64/kvm/mmu.c:kvm_mmu_split_nr_page_tables (v6.18)
    """
    geometry = pgt.geometry
    return sum(
        -(-range_size // geometry.kvm_granule_size(level))
        for level in range(geometry.min_block_level, KVM_PGTABLE_LAST_LEVEL)
    )


def kvm_pgtable_stage2_destroy(pgt: KvmPgtable) -> None:
    """Free every table of the stage 2, from the leaves up, then the PGD pages: each
    counted entry drops the reference it holds on its table, and each table, once its
    entries are gone, its own last one. Nothing walks the tables any more (the VM's stage 2
    was unpublished first).

    The kernel walks the whole IPA space with stage2_free_walker (LEAF and TABLE_POST);
    only counted entries do anything there, so the model visits just those, which keeps
    the cost in proportion to what is mapped rather than to the IPA space.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_destroy, stage2_free_walker
    (v6.18)
    """
    if pgt.pgd is None:
        return
    for page in pgt.pgd:
        _stage2_free_table(pgt, page, pgt.geometry.start_level)
    pgt.pgd = None


def _stage2_free_table(pgt: KvmPgtable, table: TablePage, level: int) -> None:
    """Drop the references of ``table``'s counted entries (descending into child tables
    first, as TABLE_POST visits them after their children), then the table's own."""
    mm_ops = pgt.mm_ops
    for index in sorted(table.entries):
        pte = table.entries[index]
        if not stage2_pte_is_counted(pte):
            continue
        if kvm_pte_table(pte, level):
            child = mm_ops.phys_to_virt(kvm_pte_to_phys(pte, pgt.geometry.page_shift))
            _stage2_free_table(pgt, child, level + 1)
        mm_ops.put_page(table)
    mm_ops.put_page(table)
