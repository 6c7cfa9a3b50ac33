"""POWER Book3S HV with the radix MMU, as the generic layer sees it: the KvmArch hooks and
what the host does to the partition-scoped tree.

A radix guest (POWER9 and later) owns its page tables; KVM owns the second stage and fills it
on faults (radix_fault.py). Everything here takes translations away or reads their R and C
bits, always with mmu_lock held and always with a tlbie before the page is given back or
reported dirty (radix_pgtable.py says why):

* an MMU-notifier invalidation unmaps each leaf of the range (:func:`kvm_unmap_radix`); the
  tlbies are done already, so the generic layer is told no flush is needed;
* aging reads and clears R (:func:`kvm_age_radix`), with no tlbie: a vCPU that keeps
  using its cached translation does not set R again, so aging may miss accesses, which it
  is allowed to (the kernel's code asks itself whether it should flush);
* a memslot that is deleted or moved, or whose dirty logging is switched on or off, is
  flushed (:func:`kvmppc_radix_flush_memslot`), and the flush bumps mmu_invalidate_seq so a
  fault that read the slot before cannot install a leaf after. Switching logging on this way
  removes the huge leaves, and the next faults map base pages (R1);
* KVM_GET_DIRTY_LOG harvests C bits (:func:`kvmppc_hv_get_dirty_log_radix`): for each dirty
  leaf, C is cleared, the tlbie completes, and only then are its pages reported (R1).
  Nothing is write-protected for logging: a leaf is created with C set when it is writable.

kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvm_unmap_radix, kvm_age_radix,
kvm_test_age_radix, kvm_radix_test_clear_dirty, kvmppc_hv_get_dirty_log_radix,
kvmppc_radix_flush_memslot; arch/powerpc/kvm/book3s_hv.c:kvmppc_core_commit_memory_region_hv,
kvm_vm_ioctl_get_dirty_log_hv; arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_unmap_gfn_range_hv,
kvm_age_gfn_hv, kvm_test_age_gfn_hv, kvmppc_core_flush_memslot_hv (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.ppc.radix_pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    HarvestEvent,
    RadixLeaf,
    RadixPgtable,
    find_kvm_secondary_pte,
    kvmppc_radix_tlbie_page,
    kvmppc_radix_update_pte,
    kvmppc_unmap_pte,
    leaves_in,
    radix_flush_all_tlbs,
)
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.dirty_log_rules import BITS_PER_LONG, get_dirty_log_errno
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange


class RadixMmu(KvmArch):
    """``kvm->arch`` of a radix guest: the partition-scoped tree with its TLB, and the MMIO
    cache generation (``mmio_update``, shared with HPT guests)."""

    def __init__(self, page_shift: int) -> None:
        super().__init__()
        self.pgtable = RadixPgtable(page_shift)
        self.mmio_update = 0

    # -- memslots ------------------------------------------------------------------------------

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        """A change other than a deletion may turn emulated MMIO into RAM: MMIO caches are
        invalidated. A FLAGS_ONLY change of dirty logging flushes the slot: turning logging
        on removes the huge leaves so that dirtiness is tracked per base page, turning it off
        lets huge leaves come back. (DELETE and MOVE were flushed while INVALID; a new slot
        has nothing mapped.)

        kernel: arch/powerpc/kvm/book3s_hv.c:kvmppc_core_commit_memory_region_hv (v6.18)
        """
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        if change is not MrChange.DELETE:
            self.mmio_update += 1
        if (
            change is MrChange.FLAGS_ONLY
            and old is not None
            and new is not None
            and (old.flags ^ new.flags) & KVM_MEM_LOG_DIRTY_PAGES
        ):
            kvmppc_radix_flush_memslot(kvm, self.pgtable, old)

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Seed 000 for radix: every leaf of the slot goes before it is deleted or moved.

        kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_core_flush_memslot_hv (v6.18)
        """
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        kvmppc_radix_flush_memslot(kvm, self.pgtable, slot)

    # -- MMU notifiers (the generic layer holds mmu_lock) ----------------------------------------

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Unmap every leaf of the range, each with its tlbie: no flush is asked for.

        kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_unmap_gfn_range_hv (v6.18)
        """
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        for leaf, gfn in _leaves_of_range(self.pgtable, gfn_range.start, gfn_range.end):
            kvm_unmap_radix(kvm, self.pgtable, gfn_range.slot, leaf, gfn)
        return False

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_age_gfn_hv (v6.18)"""
        super().kvm_age_gfn(kvm, gfn_range)
        young = False
        for leaf, _gfn in _leaves_of_range(self.pgtable, gfn_range.start, gfn_range.end):
            young |= kvm_age_radix(kvm, leaf)
        return young

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Only the range's first page is tested, as on HPT guests.

        kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_test_age_gfn_hv (v6.18)
        """
        super().kvm_test_age_gfn(kvm, gfn_range)
        return kvm_test_age_radix(self.pgtable, gfn_range.start)

    # -- TLBs ----------------------------------------------------------------------------------

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        super().kvm_flush_remote_tlbs(kvm)
        radix_flush_all_tlbs(self.pgtable)

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        radix_flush_all_tlbs(self.pgtable)


def kvm_radix(kvm: Kvm) -> RadixMmu:
    """``kvm->arch`` of a VM that must be a radix guest."""
    arch = kvm.arch
    assert isinstance(arch, RadixMmu), "not a radix guest"
    return arch


def _leaves_of_range(pgt: RadixPgtable, start: int, end: int) -> list[tuple[RadixLeaf, int]]:
    """The leaves a per-gfn walk of [start, end) finds, each with the first gfn of the range
    inside it (the gfn the kernel's loop finds it with). The kernel visits every gfn; the
    model visits the leaves, which is the same work for every gfn that has one."""
    shift = pgt.page_shift
    found = []
    for leaf in leaves_in(pgt, start << shift, end << shift):
        found.append((leaf, max(leaf.gpa >> shift, start)))
    return found


def kvm_unmap_radix(
    kvm: Kvm, pgt: RadixPgtable, memslot: KvmMemorySlot, leaf: RadixLeaf, gfn: int
) -> None:
    """Unmap the leaf that translates ``gfn`` (tlbie included, C into the slot's bitmap).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvm_unmap_radix (v6.18)
    """
    kvmppc_unmap_pte(kvm, pgt, leaf, gfn << pgt.page_shift, memslot)


def kvm_age_radix(kvm: Kvm, leaf: RadixLeaf) -> bool:
    """Was the leaf referenced since the last aging? Clears R, without a tlbie.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvm_age_radix (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("kvm_age_radix")
    if not leaf.pte & _PAGE_ACCESSED:
        return False
    kvmppc_radix_update_pte(leaf, _PAGE_ACCESSED, 0)
    return True


def kvm_test_age_radix(pgt: RadixPgtable, gfn: int) -> bool:
    """Is the leaf translating ``gfn`` referenced? Changes nothing.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvm_test_age_radix (v6.18)
    """
    leaf = find_kvm_secondary_pte(pgt, gfn << pgt.page_shift)
    return leaf is not None and bool(leaf.pte & _PAGE_ACCESSED)


def kvmppc_radix_flush_memslot(kvm: Kvm, pgt: RadixPgtable, memslot: KvmMemorySlot) -> None:
    """Unmap every leaf of the slot, then move mmu_invalidate_seq: a fault that looked the
    slot up before this and resolved a page from it retries instead of installing it.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_radix_flush_memslot (v6.18)
    """
    with kvm.mmu_lock.write():
        for leaf, gfn in _leaves_of_range(pgt, memslot.base_gfn, memslot.end_gfn):
            kvmppc_unmap_pte(kvm, pgt, leaf, gfn << pgt.page_shift, memslot)
        kvm.mmu_invalidate_seq += 1


def kvm_radix_test_clear_dirty(kvm: Kvm, pgt: RadixPgtable, leaf: RadixLeaf) -> int:
    """How many base pages the leaf dirtied since the last harvest (0 if C is clear). A
    dirty leaf has C cleared and its tlbie completed before this returns, so the caller
    reports the pages only once no vCPU can store to them without setting C again (R1).

    The kernel finds the leaf without mmu_lock and looks again under it; the model does
    both in one step. In a logged slot every leaf is a base page, since logging removed the
    huge leaves and forbids new ones: the kernel BUGs on a huge one; the model WARNs and
    counts all of its pages, as kernels before that BUG did.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvm_radix_test_clear_dirty (v6.18)
    """
    with kvm.mmu_lock.write():
        if not leaf.pte & _PAGE_DIRTY:
            return 0
        kvm.warn_on(leaf.shift != pgt.page_shift, "R1", "a huge leaf in a dirty-logged slot")
        kvmppc_radix_update_pte(leaf, _PAGE_DIRTY, 0)
        npages = leaf.size >> pgt.page_shift
        pgt.events.append(HarvestEvent("c_cleared", leaf.gpa >> pgt.page_shift, npages))
        kvmppc_radix_tlbie_page(pgt, leaf.gpa, leaf.shift)
        return npages


def kvmppc_hv_get_dirty_log_radix(
    kvm: Kvm, pgt: RadixPgtable, memslot: KvmMemorySlot
) -> KernelOp[set[int]]:
    """The page offsets of ``memslot`` that were written since the last harvest, from the
    leaves' C bits, each reported after its leaf's tlbie. mmu_lock is taken per leaf, so
    vCPUs, faults and notifiers run in between.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_hv_get_dirty_log_radix (v6.18)
    """
    dirty: set[int] = set()
    shift = pgt.page_shift
    for leaf in leaves_in(pgt, memslot.base_gfn << shift, memslot.end_gfn << shift):
        yield Preempt("dirty harvest: between leaves")
        if find_kvm_secondary_pte(pgt, leaf.gpa) != leaf:
            continue  # unmapped (or replaced) meanwhile: its C went to the bitmap
        npages = kvm_radix_test_clear_dirty(kvm, pgt, leaf)
        if npages:
            offset = (leaf.gpa >> shift) - memslot.base_gfn
            dirty.update(range(offset, offset + npages))
            pgt.events.append(HarvestEvent("reported", leaf.gpa >> shift, npages))
    return dirty


def kvm_vm_ioctl_get_dirty_log_hv(kvm: Kvm, slot: int) -> KernelOp[tuple[int, list[int]]]:
    """KVM_GET_DIRTY_LOG on a radix guest: (errno, the words userspace receives). The C bits
    of the slot's leaves are harvested (and cleared), then the bits KVM already put in the
    slot's bitmap (leaves unmapped while dirty, KVM's own writes) are taken with them.

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
        harvested = yield from kvmppc_hv_get_dirty_log_radix(kvm, kvm_radix(kvm).pgtable, memslot)
        bitmap = memslot.dirty_bitmap
        words = [bitmap.xchg_word(index) for index in range(bitmap.nr_words)]
        for offset in harvested:
            words[offset // BITS_PER_LONG] |= 1 << (offset % BITS_PER_LONG)
        return 0, words
    finally:
        kvm.slots_lock.unlock(owner)
