"""The shadow MMU's prefetch (reference/x86/pte_prefetch.py): a fault on a 4K page maps the
empty neighbours of its aligned group of 8 ahead of the guest, under the rules the kernel
applies (FNAME(pte_prefetch), kvm_mmu_prefetch_sptes): guest PTEs present and accessed,
host pages already mapped writable, no writable leaf in a dirty-logged slot, none while an
invalidation is in progress; prefetched leaves are born old. The conformance trace
s5-prefetched-neighbour-read-is-not-logged.jsonl shows the kernel doing it."""

from __future__ import annotations

from kvmspec.fuzz.x86_harness import (
    DATA_GFN,
    DATA_GVA,
    DATA_PAGES,
    HPAGE,
    NO_SLOT_GFN,
    PAGE,
    PML4,
    PT,
    PTE,
    ShadowHarness,
)
from kvmspec.fuzz.x86_huge_harness import HugeHarness
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.x86.guest_access import Outcome
from kvmspec.reference.x86.mmu_page import SptePtr
from kvmspec.reference.x86.paging import PT_ACCESSED_MASK, PT_DIRTY_MASK
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    is_accessed_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY


def data_sptes(vm: ShadowHarness) -> dict[int, int]:
    """Data page index -> its present SPTE in the PT's shadow page."""
    (pt_sp,) = vm.mmu.shadow_pages(PT)
    sptes = {i: SptePtr(pt_sp, DATA_GFN + i).get() for i in range(DATA_PAGES)}
    return {i: spte for i, spte in sptes.items() if is_shadow_present_pte(spte)}


def touched_vm() -> ShadowHarness:
    """A VM whose VMM has written every data page (so the host maps each one writable)."""
    vm = ShadowHarness()
    for i in range(DATA_PAGES):
        assert vm.host.host_write(vm.data_hva + i * PAGE, bytes([i + 1])) == 0
    return vm


def host_pfn(vm: ShadowHarness, i: int) -> int:
    pte = vm.host.lookup(vm.data_hva + i * PAGE)
    assert pte is not None
    return pte.pfn


def test_a_fault_maps_its_neighbours_born_old() -> None:
    vm = touched_vm()
    assert vm.read(DATA_GVA + 3 * PAGE).outcome is Outcome.DONE
    sptes = data_sptes(vm)
    assert sorted(sptes) == list(range(DATA_PAGES))  # the whole aligned group of 8
    for i, spte in sptes.items():
        assert spte_to_pfn(spte) == host_pfn(vm, i)
        assert is_writable_pte(spte)  # the guest PTEs are dirty: no need to fault on a write
        assert is_accessed_spte(vm.mmu.masks, spte) == (i == 3)  # only the faulting one
    assert vm.violations() == []
    # A neighbour is used without a fault.
    faults = vm.mmu.stat["pf_fixed"]
    assert vm.read(DATA_GVA + 5 * PAGE, 1).data == bytes([6])
    assert vm.mmu.stat["pf_fixed"] == faults


def test_a_clean_guest_pte_gives_a_read_only_neighbour() -> None:
    vm = touched_vm()
    vm.write_table(PT, DATA_GFN + 1, (DATA_GFN + 1) * PAGE | (PTE & ~PT_DIRTY_MASK))
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    sptes = data_sptes(vm)
    assert not is_writable_pte(sptes[1]) and is_writable_pte(sptes[2])
    # The guest's write faults, so that its PTE gets D.
    assert vm.write(DATA_GVA + PAGE, b"w").outcome is Outcome.DONE
    assert is_writable_pte(data_sptes(vm)[1])
    assert vm.violations() == []


def test_the_prefetch_stops_at_a_guest_pte_never_accessed_or_a_page_the_host_lacks() -> None:
    vm = touched_vm()
    vm.write_table(PT, DATA_GFN + 3, (DATA_GFN + 3) * PAGE | (PTE & ~PT_ACCESSED_MASK))
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert sorted(data_sptes(vm)) == [0, 1, 2]

    vm = ShadowHarness()  # the VMM wrote pages 0, 1 and 5 only
    for i in (0, 1, 5):
        assert vm.host.host_write(vm.data_hva + i * PAGE, b"x") == 0
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert sorted(data_sptes(vm)) == [0, 1]  # page 2 is not in the host's page tables
    assert vm.host.lookup(vm.data_hva + 2 * PAGE) is None  # and the prefetch faulted nothing in
    assert vm.violations() == []


def test_no_writable_leaf_is_prefetched_into_a_dirty_logged_slot() -> None:
    vm = touched_vm()
    assert vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, DATA_GFN, DATA_PAGES, vm.data_hva) == 0
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert sorted(data_sptes(vm)) == [0]  # dirty guest PTEs: the first neighbour stops it

    vm = touched_vm()
    for i in range(DATA_PAGES):  # clean guest PTEs: read-only leaves may be prefetched
        vm.write_table(PT, DATA_GFN + i, (DATA_GFN + i) * PAGE | (PTE & ~PT_DIRTY_MASK))
    assert vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, DATA_GFN, DATA_PAGES, vm.data_hva) == 0
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    sptes = data_sptes(vm)
    assert sorted(sptes) == list(range(DATA_PAGES))
    assert not any(is_writable_pte(spte) for spte in sptes.values())
    errno, bitmap = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 1))
    assert errno == 0 and not any(bitmap)  # a read logs nothing
    assert vm.violations() == []


def test_a_page_prefetched_before_logging_starts_is_read_without_being_logged() -> None:
    """The conformance trace's scenario: the neighbour keeps its (now write-protected) leaf
    when logging starts, so reading it takes no fault and logs nothing; the kernel did the
    same on this machine."""
    vm = touched_vm()
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, DATA_GFN, DATA_PAGES, vm.data_hva) == 0
    assert vm.read(DATA_GVA + PAGE).outcome is Outcome.DONE
    errno, bitmap = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 1))
    assert errno == 0 and not any(bitmap)
    assert vm.write(DATA_GVA + 2 * PAGE, b"w").outcome is Outcome.DONE  # a write is logged
    errno, bitmap = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 1))
    assert errno == 0 and bitmap == [1 << 2]
    assert vm.violations() == []


def test_nothing_is_prefetched_while_an_invalidation_is_in_progress() -> None:
    vm = touched_vm()
    last = vm.data_hva + (DATA_PAGES - 1) * PAGE
    vm.host.invalidate_start(last, last + PAGE, MmuNotifierEvent.CLEAR)
    assert vm.read(DATA_GVA).outcome is Outcome.DONE  # not the page being invalidated
    assert sorted(data_sptes(vm)) == [0]
    vm.host.invalidate_end(last, last + PAGE, MmuNotifierEvent.CLEAR)
    assert vm.violations() == []


def test_a_guest_huge_page_mapped_in_4k_prefetches_runs_of_empty_entries() -> None:
    """Below a guest 2M page the shadow pages are direct: the prefetch maps the empty runs
    around the faulting entry, each run's gfns contiguous, with the rights of the page."""
    vm = HugeHarness()
    vm.host_thp(collapse=False)  # the host maps frame 0 with 4K PTEs: 4K leaves
    gva = 0x20 * PAGE
    assert vm.read(gva + 2 * PAGE).outcome is Outcome.DONE  # entry 0x22 of the direct page
    leaves = {i: vm.leaf(0, gva + i * PAGE) for i in range(8)}
    assert all(leaf is not None and leaf[0] == 1 for leaf in leaves.values()), leaves
    for i, leaf in leaves.items():
        assert leaf is not None
        pte = vm.host.lookup(vm.hva + gva + i * PAGE)
        assert pte is not None and spte_to_pfn(leaf[1]) == pte.pfn
        assert is_accessed_spte(vm.mmu.masks, leaf[1]) == (i == 2)
    assert vm.leaf(0, gva + 8 * PAGE) is None  # the next group is left alone
    assert gva + 8 * PAGE < HPAGE
    assert vm.violations() == []


def test_an_unusable_guest_pte_drops_its_mmio_neighbour_and_stops_the_prefetch() -> None:
    """With MMIO caching on, a neighbour may hold an MMIO SPTE, which is not present: the
    prefetch looks at its guest PTE. Now not present, it drops the MMIO SPTE (the guest no
    longer uses that translation) and ends the prefetch there."""
    vm = ShadowHarness(mmio_caching=True)
    for i in range(2, DATA_PAGES):
        assert vm.host.host_write(vm.data_hva + i * PAGE, b"x") == 0
    vm.guest_remap(0, 1, NO_SLOT_GFN, False)
    vm.switch_cr3(0, PML4)
    # An MMIO fault prefetches too; page 0 is not in the host yet, so that stops at once.
    assert vm.read(DATA_GVA + PAGE).outcome is Outcome.MMIO
    assert data_sptes(vm) == {}
    assert vm.host.host_write(vm.data_hva, b"x") == 0
    (pt_sp,) = vm.mmu.shadow_pages(PT)
    mmio = SptePtr(pt_sp, DATA_GFN + 1)
    assert mmio.get() and not is_shadow_present_pte(mmio.get())
    vm.guest_remap(0, 1, None, False)  # the PT is unsync: straight to memory
    assert vm.read(DATA_GVA).outcome is Outcome.DONE  # page 0 faults; page 1 is next to it
    assert mmio.get() == SHADOW_NONPRESENT_VALUE  # dropped
    assert sorted(data_sptes(vm)) == [0]  # the prefetch stopped at page 1
    assert vm.violations() == []


def test_nothing_is_prefetched_from_a_readonly_slot() -> None:
    """A prefetch takes its pages writable from the host: a READONLY slot gives it no
    host address (kvm_prefetch_pages fails), even for a read-only leaf."""
    vm = touched_vm()
    assert vm.set_region(1, 0, DATA_GFN, 0, vm.data_hva) == 0  # flags cannot change: again
    assert vm.set_region(1, KVM_MEM_READONLY, DATA_GFN, DATA_PAGES, vm.data_hva) == 0
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert sorted(data_sptes(vm)) == [0]
    assert vm.violations() == []
