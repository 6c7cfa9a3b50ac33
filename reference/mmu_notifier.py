"""KVM's side of the MMU notifiers: invalidation counting, the retry checks, aging.

When the host changes a page that a guest may map (munmap, madvise, migration, reclaim), the
host's memory manager calls KVM before and after. Between ``invalidate_range_start`` and
``invalidate_range_end`` KVM must not create a mapping of an affected page, and a page fault
that resolved its pfn before the invalidation must not install it afterwards. Two counters
make that possible without a lock around the whole fault:

* ``mmu_invalidate_in_progress`` counts open invalidations, and ``mmu_invalidate_range_*``
  holds the union of their gfn ranges;
* ``mmu_invalidate_seq`` counts finished ones. A fault snapshots it before resolving the pfn
  and retries if it moved (or if an open invalidation covers its gfn) when it installs.

Each callback here runs as one step (the kernel holds mmu_lock for the range work); the
memslot update path waits for ``mn_active_invalidate_count`` to reach zero before publishing
a new memslot set (invariant M11), so a start/end pair always sees the same memslots.

kernel: virt/kvm/kvm_main.c:kvm_mmu_invalidate_begin, kvm_mmu_invalidate_range_add,
kvm_mmu_invalidate_end, kvm_mmu_notifier_invalidate_range_start/_end, __kvm_handle_hva_range,
kvm_mmu_notifier_clear_flush_young, kvm_mmu_notifier_clear_young,
kvm_mmu_notifier_test_young, kvm_mmu_notifier_release, kvm_flush_shadow_all;
include/linux/kvm_host.h:mmu_invalidate_retry, mmu_invalidate_retry_gfn,
mmu_invalidate_retry_gfn_unsafe (v6.18)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from kvmspec.reference.gfn_to_hva import hva_to_gfn_memslot
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot

INVALID_GPA = -1
"""No range recorded yet: a fault that sees this while an invalidation is open must retry."""


@dataclass(frozen=True, slots=True)
class KvmGfnRange:
    """struct kvm_gfn_range: the gfns [start, end) of one slot that back a host range."""

    slot: KvmMemorySlot
    start: int
    end: int


def kvm_mmu_invalidate_begin(kvm: Kvm) -> None:
    """Open an invalidation. The first open one resets the range to "none yet".

    kernel: virt/kvm/kvm_main.c:kvm_mmu_invalidate_begin (v6.18)
    """
    kvm.mmu_invalidate_in_progress += 1
    if kvm.mmu_invalidate_in_progress == 1:
        kvm.mmu_invalidate_range_start = INVALID_GPA
        kvm.mmu_invalidate_range_end = INVALID_GPA


def kvm_mmu_invalidate_range_add(kvm: Kvm, start: int, end: int) -> None:
    """Widen the open range to cover [start, end) as well (the union of all open ranges).

    kernel: virt/kvm/kvm_main.c:kvm_mmu_invalidate_range_add (v6.18)
    """
    if kvm.mmu_invalidate_range_start == INVALID_GPA:
        kvm.mmu_invalidate_range_start = start
        kvm.mmu_invalidate_range_end = end
    else:
        kvm.mmu_invalidate_range_start = min(kvm.mmu_invalidate_range_start, start)
        kvm.mmu_invalidate_range_end = max(kvm.mmu_invalidate_range_end, end)


def kvm_mmu_invalidate_end(kvm: Kvm) -> None:
    """Close an invalidation: the sequence count moves *before* in_progress drops, so a fault
    that sees in_progress at zero also sees the new sequence (the kernel's write barrier).

    kernel: virt/kvm/kvm_main.c:kvm_mmu_invalidate_end (v6.18)
    """
    kvm.mmu_invalidate_seq += 1
    kvm.mmu_invalidate_in_progress -= 1
    if kvm.mmu_invalidate_in_progress < 0:
        raise AssertionError("KVM_BUG_ON: mmu_invalidate_in_progress went negative (N1)")


def mmu_invalidate_retry(kvm: Kvm, seq: int) -> bool:
    """Must a fault that snapshotted ``seq`` retry? Yes while any invalidation is open, or
    once one finished since the snapshot.

    kernel: include/linux/kvm_host.h:mmu_invalidate_retry (v6.18)
    """
    return kvm.mmu_invalidate_in_progress > 0 or kvm.mmu_invalidate_seq != seq


def mmu_invalidate_retry_gfn(kvm: Kvm, seq: int, gfn: int) -> bool:
    """The precise check made under mmu_lock: retry only if an open invalidation covers
    ``gfn`` (or has not recorded its range yet), or if the sequence moved.

    kernel: include/linux/kvm_host.h:mmu_invalidate_retry_gfn (v6.18)
    """
    if kvm.mmu_invalidate_in_progress:
        if kvm.mmu_invalidate_range_start == INVALID_GPA:
            return True
        if kvm.mmu_invalidate_range_start <= gfn < kvm.mmu_invalidate_range_end:
            return True
    return kvm.mmu_invalidate_seq != seq


def mmu_invalidate_retry_gfn_unsafe(kvm: Kvm, seq: int, gfn: int) -> bool:
    """The lockless pre-check a fault may make before taking mmu_lock to avoid useless work.
    It can be wrong either way; only the check under the lock decides.

    kernel: include/linux/kvm_host.h:mmu_invalidate_retry_gfn_unsafe (v6.18)
    """
    return mmu_invalidate_retry_gfn(kvm, seq, gfn)


def kvm_hva_range_to_gfn_ranges(kvm: Kvm, start: int, end: int) -> list[KvmGfnRange]:
    """Every (slot, gfn range) whose host memory intersects [start, end), in every address
    space. Aliased slots each get their range: all their mappings of the page must go.

    kernel: virt/kvm/kvm_main.c:__kvm_handle_hva_range (v6.18)
    """
    shift = kvm.profile.page_shift
    page = 1 << shift
    ranges = []
    for as_id in range(kvm.profile.nr_address_spaces):
        for slot in kvm.memslots(as_id).hva_to_memslots(start, end):
            slot_end = slot.userspace_addr + (slot.npages << shift)
            first = hva_to_gfn_memslot(max(start, slot.userspace_addr), slot, shift)
            last = hva_to_gfn_memslot(min(end, slot_end) + page - 1, slot, shift)
            ranges.append(KvmGfnRange(slot, first, last))
    ranges.sort(key=lambda r: (r.slot.as_id, r.start))
    return ranges


def kvm_mmu_notifier_invalidate_range_start(kvm: Kvm, start: int, end: int) -> bool:
    """The host is about to change [start, end). Returns whether any slot was affected.

    Memslot writers must wait from now on (mn_active_invalidate_count). For each affected
    slot the invalidation opens (once), records the gfn range, and the architecture drops
    its mappings; the TLB is flushed before returning, so no vCPU keeps using them (N5).

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_invalidate_range_start (v6.18)
    """
    kvm.mn_active_invalidate_count += 1
    ranges = kvm_hva_range_to_gfn_ranges(kvm, start, end)
    flush = False
    with kvm.mmu_lock.write():
        for index, gfn_range in enumerate(ranges):
            if index == 0:
                kvm_mmu_invalidate_begin(kvm)
            kvm_mmu_invalidate_range_add(kvm, gfn_range.start, gfn_range.end)
            flush |= kvm.arch.kvm_unmap_gfn_range(kvm, gfn_range)
    if flush:
        kvm.arch.kvm_flush_remote_tlbs(kvm)
    if ranges:
        kvm.arch.kvm_arch_guest_memory_reclaimed(kvm)
    return bool(ranges)


def kvm_mmu_notifier_invalidate_range_end(kvm: Kvm, start: int, end: int) -> None:
    """The host finished changing [start, end): close the invalidation (if a slot was
    affected) and let a waiting memslot writer go on.

    The memslots cannot have changed since the matching start (the writer waited), so the
    same slots are found again.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_invalidate_range_end (v6.18)
    """
    if kvm_hva_range_to_gfn_ranges(kvm, start, end):
        with kvm.mmu_lock.write():
            kvm_mmu_invalidate_end(kvm)
    kvm.mn_active_invalidate_count -= 1
    if kvm.mn_active_invalidate_count < 0:
        raise AssertionError("mn_active_invalidate_count went negative (N6)")


def kvm_mmu_notifier_clear_young(kvm: Kvm, start: int, end: int) -> bool:
    """Was [start, end) accessed through a guest mapping? Clears the accessed state, without
    a flush: aging is best-effort, a missed access only costs a slightly wrong reclaim choice.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_clear_young (v6.18)
    """
    young = False
    with _aging_lock(kvm):
        for gfn_range in kvm_hva_range_to_gfn_ranges(kvm, start, end):
            young |= kvm.arch.kvm_age_gfn(kvm, gfn_range)
    return young


def _aging_lock(kvm: Kvm) -> AbstractContextManager[None]:
    """Aging takes mmu_lock for write, unless the architecture ages locklessly
    (CONFIG_KVM_MMU_LOCKLESS_AGING, selected by x86 and s390 in v6.18: an RCU walk and a
    compare-and-exchange on each accessed bit, as seed 001 proposed for arm64), in which
    case it takes nothing here.

    kernel: virt/kvm/kvm_main.c:kvm_handle_hva_range (v6.18)"""
    return nullcontext() if kvm.arch.lockless_aging else kvm.mmu_lock.write()


def kvm_mmu_notifier_clear_flush_young(kvm: Kvm, start: int, end: int) -> bool:
    """The same, then a TLB flush, so that the next access is seen (classic reclaim).

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_clear_flush_young (v6.18)
    """
    young = kvm_mmu_notifier_clear_young(kvm, start, end)
    if young:
        kvm.arch.kvm_flush_remote_tlbs(kvm)
    return young


def kvm_mmu_notifier_test_young(kvm: Kvm, address: int) -> bool:
    """Was the page at ``address`` accessed? Reports without clearing anything.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_test_young (v6.18)
    """
    page = 1 << kvm.profile.page_shift
    with _aging_lock(kvm):
        return any(
            kvm.arch.kvm_test_age_gfn(kvm, gfn_range)
            for gfn_range in kvm_hva_range_to_gfn_ranges(kvm, address, address + page)
        )


def kvm_flush_shadow_all(kvm: Kvm) -> None:
    """Remove every mapping of guest memory, in every address space, and say so.

    kernel: virt/kvm/kvm_main.c:kvm_flush_shadow_all (v6.18)
    """
    kvm.arch.kvm_arch_flush_shadow_all(kvm)
    kvm.arch.kvm_arch_guest_memory_reclaimed(kvm)


def kvm_mmu_notifier_release(kvm: Kvm) -> None:
    """The VMM's address space is being torn down (exit_mmap): no host page will stay, so KVM
    drops every mapping at once, inside an SRCU read section since it walks the memslots.
    No invalidation is opened: a fault after this finds no host page to map, and the host
    calls nothing after this.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_release (v6.18)
    """
    srcu = kvm.srcu.read_lock()
    try:
        kvm_flush_shadow_all(kvm)
    finally:
        kvm.srcu.read_unlock(srcu)


class KvmMmuNotifier:
    """KVM's registration with the host's MMU notifier: the host calls these methods, each
    forwarding to the callback above.

    KVM unmaps on every invalidation whatever the event: its range_start handler reads only
    the range's addresses and whether it may sleep (mmu_notifier_range_blockable), never
    ``range->event``, so an mprotect, a migration and an munmap all look the same to it.

    kernel: virt/kvm/kvm_main.c:kvm_mmu_notifier_ops, kvm_init_mmu_notifier (v6.18)
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def invalidate_range_start(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        kvm_mmu_notifier_invalidate_range_start(self.kvm, start, end)

    def invalidate_range_end(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        kvm_mmu_notifier_invalidate_range_end(self.kvm, start, end)

    def clear_flush_young(self, start: int, end: int) -> bool:
        return kvm_mmu_notifier_clear_flush_young(self.kvm, start, end)

    def clear_young(self, start: int, end: int) -> bool:
        return kvm_mmu_notifier_clear_young(self.kvm, start, end)

    def test_young(self, address: int) -> bool:
        return kvm_mmu_notifier_test_young(self.kvm, address)

    def release(self) -> None:
        kvm_mmu_notifier_release(self.kvm)
