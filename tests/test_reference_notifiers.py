"""KVM's side of the MMU notifiers: the counters, the range union, the retry checks, the hva
to gfn translation through aliased slots, and the memslot writer waiting for an invalidation
(M11) with a real start/end pair."""

from __future__ import annotations

import pytest

from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import WaitUntil, run_to_completion
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import (
    INVALID_GPA,
    KvmMmuNotifier,
    kvm_hva_range_to_gfn_ranges,
    kvm_mmu_invalidate_begin,
    kvm_mmu_invalidate_end,
    kvm_mmu_invalidate_range_add,
    kvm_mmu_notifier_clear_flush_young,
    kvm_mmu_notifier_clear_young,
    kvm_mmu_notifier_invalidate_range_end,
    kvm_mmu_notifier_invalidate_range_start,
    kvm_mmu_notifier_release,
    kvm_mmu_notifier_test_young,
    mmu_invalidate_retry,
    mmu_invalidate_retry_gfn,
)
from kvmspec.reference.page_fault import Fault, guest_access
from kvmspec.spec.invariants.memslots import InvariantMonitor
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

HVA = 0x7F00_0000_0000
PAGE = 4096


def vm_with_slots(*regions: tuple[int, int, int, int], arch: KvmArch | None = None) -> Kvm:
    """(slot, gpa, size, hva) per slot."""
    kvm = Kvm(DEFAULT_PROFILE, arch)
    for slot, gpa, size, hva in regions:
        request = MemoryRegion(slot, 0, gpa, size, hva)
        assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, request, 1)) == 0
    return kvm


def test_the_range_is_the_union_and_the_sequence_moves_at_end() -> None:
    kvm = Kvm(DEFAULT_PROFILE)
    seq = kvm.mmu_invalidate_seq
    kvm_mmu_invalidate_begin(kvm)
    assert kvm.mmu_invalidate_range_start == INVALID_GPA
    assert mmu_invalidate_retry_gfn(kvm, seq, 0x500)  # range not known yet: retry
    kvm_mmu_invalidate_range_add(kvm, 0x100, 0x110)
    kvm_mmu_invalidate_begin(kvm)  # a second, nested invalidation keeps the range
    kvm_mmu_invalidate_range_add(kvm, 0x200, 0x210)
    assert (kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end) == (0x100, 0x210)
    assert mmu_invalidate_retry_gfn(kvm, seq, 0x105)
    assert not mmu_invalidate_retry_gfn(kvm, seq, 0x300)  # outside every open range
    assert mmu_invalidate_retry(kvm, seq)  # the coarse check retries while any is open
    kvm_mmu_invalidate_end(kvm)
    kvm_mmu_invalidate_end(kvm)
    assert kvm.mmu_invalidate_seq == seq + 2 and kvm.mmu_invalidate_in_progress == 0
    assert mmu_invalidate_retry_gfn(kvm, seq, 0x300)  # a fault from before must retry
    assert not mmu_invalidate_retry_gfn(kvm, kvm.mmu_invalidate_seq, 0x300)
    with pytest.raises(AssertionError, match="N1"):
        kvm_mmu_invalidate_end(kvm)


def test_an_invalidation_reaches_every_aliased_slot_with_its_own_gfns() -> None:
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA), (1, 0x4000000, 16 * PAGE, HVA + 4 * PAGE))
    ranges = kvm_hva_range_to_gfn_ranges(kvm, HVA + 5 * PAGE, HVA + 7 * PAGE + 1)
    assert [(r.slot.id, r.start, r.end) for r in ranges] == [
        (0, 0x105, 0x108),  # the partial last page counts
        (1, 0x4001, 0x4004),
    ]
    assert kvm_hva_range_to_gfn_ranges(kvm, HVA + 64 * PAGE, HVA + 65 * PAGE) == []


def test_start_and_end_count_only_when_a_slot_is_hit() -> None:
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA))
    monitor = InvariantMonitor(kvm)
    assert not kvm_mmu_notifier_invalidate_range_start(kvm, HVA + (1 << 30), HVA + (2 << 30))
    assert kvm.mn_active_invalidate_count == 1 and kvm.mmu_invalidate_in_progress == 0
    kvm_mmu_notifier_invalidate_range_end(kvm, HVA + (1 << 30), HVA + (2 << 30))
    assert kvm.mmu_invalidate_seq == 0  # no slot, no sequence bump

    assert kvm_mmu_notifier_invalidate_range_start(kvm, HVA, HVA + PAGE)
    assert ("unmap_gfn_range", kvm_hva_range_to_gfn_ranges(kvm, HVA, HVA + PAGE)[0]) in (
        kvm.arch.events
    )
    assert kvm.mmu_invalidate_in_progress == 1
    kvm_mmu_notifier_invalidate_range_end(kvm, HVA, HVA + PAGE)
    assert kvm.mmu_invalidate_seq == 1 and kvm.mn_active_invalidate_count == 0
    assert monitor.check() == []


def test_a_memslot_update_waits_for_a_running_invalidation() -> None:
    """M11 with a real notifier: start, a CREATE that must wait, end, the CREATE finishes;
    the invalidation's start and end saw the same memslots."""
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA))
    monitor = InvariantMonitor(kvm)
    kvm_mmu_notifier_invalidate_range_start(kvm, HVA, HVA + PAGE)
    request = MemoryRegion(1, 0, 0x200000, 16 * PAGE, HVA)  # aliases the invalidated page
    update = kvm_main.kvm_vm_ioctl_set_memory_region(kvm, request, 1)
    step = next(update)
    assert isinstance(step, WaitUntil) and not step.ready()
    kvm_mmu_notifier_invalidate_range_end(kvm, HVA, HVA + PAGE)
    assert kvm.mmu_invalidate_in_progress == 0  # ended once: the new slot was not visible
    assert step.ready()
    with pytest.raises(StopIteration) as done:
        while True:
            update.send(None)
    assert done.value.value == 0
    assert monitor.check() == []


def test_aging_without_an_mmu_reports_nothing_young() -> None:
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA))
    assert not kvm_mmu_notifier_clear_young(kvm, HVA, HVA + 4 * PAGE)
    assert not kvm_mmu_notifier_clear_flush_young(kvm, HVA, HVA + 4 * PAGE)
    assert not kvm_mmu_notifier_test_young(kvm, HVA)
    names = [name for name, _ in kvm.arch.events]
    assert "age_gfn" in names and "test_age_gfn" in names


def test_kvm_unmaps_whatever_the_event_says() -> None:
    """KVM's range_start never looks at the event: an mprotect, a migration and an munmap
    each drop the range's mappings, open and close one invalidation."""
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA))
    notifier = KvmMmuNotifier(kvm)
    for event in MmuNotifierEvent:
        kvm.arch.events.clear()
        seq = kvm.mmu_invalidate_seq
        notifier.invalidate_range_start(HVA, HVA + PAGE, event)
        assert kvm.mmu_invalidate_in_progress == 1
        notifier.invalidate_range_end(HVA, HVA + PAGE, event)
        assert kvm.mmu_invalidate_seq == seq + 1 and kvm.mmu_invalidate_in_progress == 0
        assert [name for name, _ in kvm.arch.events] == [
            "unmap_gfn_range",
            "guest_memory_reclaimed",
        ]


def test_release_drops_every_translation_without_an_invalidation() -> None:
    """The VMM's mm goes away: the host calls release first, and the flat MMU drops every
    translation (all slots, all address spaces) and flushes every TLB. No invalidation is
    opened, so the fault-exclusion counters do not move."""
    mmu = FlatMmu()
    host = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    _, hva = host.mmap(32 * PAGE, PROT_READ | PROT_WRITE)
    kvm = vm_with_slots(
        (0, 0x100000, 16 * PAGE, hva), (1, 0x4000000, 16 * PAGE, hva + 16 * PAGE), arch=mmu
    )
    host.notifier = KvmMmuNotifier(kvm)
    for gpa in (0x100000, 0x100000 + 3 * PAGE, 0x4000000):
        assert guest_access(kvm, host, 0, gpa, b"v")[0] == Fault.MAPPED
    assert len(mmu.ptes) == 3 and mmu.tlbs[0]
    counters = (kvm.mmu_invalidate_seq, kvm.mmu_invalidate_in_progress)
    mmu.events.clear()

    host.exit_mmap()
    assert not mmu.ptes and not mmu.tlbs[0]
    assert [name for name, _ in mmu.events] == [
        "flush_shadow_all",
        "flush_tlbs",
        "guest_memory_reclaimed",
    ]
    assert (kvm.mmu_invalidate_seq, kvm.mmu_invalidate_in_progress) == counters
    assert kvm.mn_active_invalidate_count == 0
    assert guest_access(kvm, host, 0, 0x100000, None) == (Fault.EFAULT, b"")  # nothing left


def test_release_on_the_memslot_layer_records_the_hook() -> None:
    kvm = vm_with_slots((0, 0x100000, 16 * PAGE, HVA))
    kvm_mmu_notifier_release(kvm)
    assert [name for name, _ in kvm.arch.events][-2:] == [
        "flush_shadow_all",
        "guest_memory_reclaimed",
    ]
