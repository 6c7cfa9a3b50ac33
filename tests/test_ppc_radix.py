"""POWER radix MMU: the leaf level a fault chooses (R1), the dirty harvest's order (C cleared,
tlbie, reported: R1), a fault racing an invalidation (N4), slot deletion and moves (M13),
aging, dirty logging switching huge leaves off and on, and, for every check of
``kvmspec.spec.invariants.ppc_radix.check_radix``, a planted bug that it catches. The radix
machine's harness: a MOVE keeps what the dirty log owes (C-DIRTY-COMPLETE) and a page a fault
maps is young (C-AGING), each with a planted bug it catches.
"""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.radix_machine import RadixHarness, RadixMachine
from kvmspec.reference import kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm, HostPte
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import (
    KvmMmuNotifier,
    kvm_mmu_notifier_clear_flush_young,
    kvm_mmu_notifier_clear_young,
    kvm_mmu_notifier_test_young,
)
from kvmspec.reference.page_fault import Fault
from kvmspec.reference.ppc import radix_fault, radix_mmu, radix_pgtable
from kvmspec.reference.ppc.radix_fault import (
    kvmppc_book3s_radix_page_fault,
    kvmppc_radix_leaf_level,
    radix_guest_access,
)
from kvmspec.reference.ppc.radix_mmu import RadixMmu, kvm_vm_ioctl_get_dirty_log_hv
from kvmspec.reference.ppc.radix_pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_WRITE,
    PMD_SHIFT,
    PUD_SHIFT,
    HarvestEvent,
    RadixLeaf,
    RadixPgtable,
    find_kvm_secondary_pte,
    kvmppc_radix_update_pte,
    leaves_in,
    radix_host_mm,
)
from kvmspec.spec.invariants.ppc_radix import check_radix
from kvmspec.spec.platforms import PPC64_HV_RADIX as PPC64_RADIX
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion, MrChange

PAGE = PPC64_RADIX.page_size  # 64 KiB
HUGE = 1 << PMD_SHIFT  # 2 MiB: the host's THP and the radix PMD leaf
RW = PROT_READ | PROT_WRITE
RAM_GPA, LOGGED_GPA = 0, 8 * HUGE
"""Slot 0: 4 MiB at gpa 0 on huge pages; slot 1: 2 MiB at 16 MiB, dirty-logged, also on a
huge page; nothing between (emulated MMIO)."""


class RadixVm:
    """A radix guest with two slots backed by transparent huge pages."""

    def __init__(self, mmu: RadixMmu | None = None) -> None:
        self.mmu = mmu if mmu is not None else RadixMmu(PPC64_RADIX.page_shift)
        self.kvm = Kvm(PPC64_RADIX, self.mmu)
        self.host: HostMm = radix_host_mm(PAGE, PPC64_RADIX.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        self.hvas: dict[int, int] = {}
        for slot, gpa, size, flags in (
            (0, RAM_GPA, 2 * HUGE, 0),
            (1, LOGGED_GPA, HUGE, KVM_MEM_LOG_DIRTY_PAGES),
        ):
            self.hvas[slot] = self.huge_memory(size)
            assert self.set_region(slot, flags, gpa, size, self.hvas[slot]) == 0

    @property
    def pgt(self) -> RadixPgtable:
        return self.mmu.pgtable

    def huge_memory(self, size: int) -> int:
        """Anonymous memory, touched and collapsed into huge pages: its hva."""
        errno, hva = self.host.mmap(size, RW, hugepage=True)
        assert errno == 0
        for block in range(0, size, HUGE):
            assert self.host.host_write(hva + block, b"v") == 0
        assert self.host.madvise_collapse(hva, size) == 0
        return hva

    def set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> int:
        region = MemoryRegion(slot, flags, gpa, size, hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def access(self, gpa: int, data: bytes | None = None) -> Fault:
        outcome, _ = radix_guest_access(self.kvm, self.host, gpa, data)
        return outcome

    def leaves(self) -> list[tuple[int, int]]:
        """(gpa, size) of every leaf."""
        return [(leaf.gpa, leaf.size) for leaf in leaves_in(self.pgt, 0, 1 << 52)]

    def leaf(self, gpa: int) -> RadixLeaf:
        leaf = find_kvm_secondary_pte(self.pgt, gpa)
        assert leaf is not None
        return leaf

    def dirty_log(self, slot: int) -> list[int]:
        """The page offsets KVM_GET_DIRTY_LOG reports for ``slot``."""
        errno, words = run_to_completion(kvm_vm_ioctl_get_dirty_log_hv(self.kvm, slot))
        assert errno == 0
        return [i for i in range(len(words) * 64) if words[i // 64] >> (i % 64) & 1]

    def radix_read(self, gpa: int) -> bytes:
        """A one-byte guest load that must complete."""
        outcome, data = radix_guest_access(self.kvm, self.host, gpa, None)
        assert outcome is Fault.MAPPED
        return data

    def violations(self) -> list[str]:
        return [str(v) for v in check_radix(self.kvm, self.mmu, self.host)]


# -- R1: the level of a leaf ----------------------------------------------------------------------


def test_radix_huge_leaf_only_when_congruent_and_not_logged() -> None:
    vm = RadixVm()
    # Congruent, not logged, on a host huge page: one 2 MiB leaf serves the whole block.
    assert vm.access(RAM_GPA + 3 * PAGE, b"hello") is Fault.MAPPED
    assert vm.leaves() == [(RAM_GPA, HUGE)]
    assert vm.host.host_read(vm.hvas[0] + 3 * PAGE, 5) == (0, b"hello")
    # The same host huge page behind a logged slot: base pages only.
    assert vm.access(LOGGED_GPA + PAGE) is Fault.MAPPED
    assert vm.leaf(LOGGED_GPA + PAGE).size == PAGE
    # A slot whose gpa and hva disagree within 2 MiB: base pages, each from inside the
    # host's huge page.
    hva = vm.huge_memory(HUGE)
    assert vm.set_region(2, 0, 16 * HUGE + PAGE, HUGE - PAGE, hva) == 0
    assert vm.set_region(3, 0, 24 * HUGE, HUGE, hva) == 0  # the same block, congruent
    assert vm.access(16 * HUGE + 2 * PAGE, b"x") is Fault.MAPPED
    assert vm.leaf(16 * HUGE + 2 * PAGE).size == PAGE
    assert vm.radix_read(24 * HUGE + PAGE) == b"x"
    assert vm.leaf(24 * HUGE + PAGE).size == HUGE
    # Memory the host maps with base pages: base leaves, even when congruent.
    errno, small = vm.host.mmap(HUGE, RW)
    assert errno == 0 and small % HUGE == 0
    assert vm.set_region(4, 0, 32 * HUGE, HUGE, small) == 0
    assert vm.access(32 * HUGE) is Fault.MAPPED
    assert vm.leaf(32 * HUGE).size == PAGE
    assert vm.violations() == []


def test_radix_leaf_level_follows_the_host_page_size_exactly() -> None:
    """The level choice on its own (the model's host has no 1 GiB pages): a 1 GiB host
    page gives a 1 GiB leaf when gpa and hva agree within 1 GiB, and base pages (not 2 MiB
    leaves) when they agree only within 2 MiB."""
    shift = PPC64_RADIX.page_shift
    giga = 1 << PUD_SHIFT
    assert kvmppc_radix_leaf_level(5 * giga + PAGE, 3 * giga + PAGE, PUD_SHIFT, shift, False) == 2
    assert kvmppc_radix_leaf_level(giga + HUGE, 3 * giga, PUD_SHIFT, shift, False) == 0
    assert kvmppc_radix_leaf_level(HUGE + PAGE, 7 * HUGE + PAGE, PMD_SHIFT, shift, False) == 1
    assert kvmppc_radix_leaf_level(HUGE + PAGE, 7 * HUGE + PAGE, PMD_SHIFT, shift, True) == 0
    assert kvmppc_radix_leaf_level(HUGE + PAGE, 7 * HUGE, PMD_SHIFT, shift, False) == 0
    assert kvmppc_radix_leaf_level(HUGE, 7 * HUGE, shift, shift, False) == 0


def test_the_kernel_does_not_keep_a_huge_leaf_inside_its_slot() -> None:
    """kvmppc_book3s_instantiate_page checks only that gpa and hva agree modulo the huge
    page, not that the huge page lies inside the slot: a 1 MiB slot in front of a host huge
    page gets a 2 MiB leaf that also maps the next 1 MiB of gpa, which belongs to no slot.
    The model does what the kernel does; the check reports the leaf (M13)."""
    vm = RadixVm()
    hva = vm.huge_memory(HUGE)
    assert vm.set_region(2, 0, 16 * HUGE, HUGE // 2, hva) == 0
    assert vm.access(16 * HUGE) is Fault.MAPPED
    assert vm.leaves()[-1] == (16 * HUGE, HUGE)
    assert vm.violations() == [
        "M13: leaf gpa 0x2000000 (2048 KiB) maps gfns outside every usable memslot"
    ]


# -- R1: the dirty harvest ------------------------------------------------------------------------


def test_radix_dirty_harvest_tlbies_before_reporting() -> None:
    vm = RadixVm()
    assert vm.access(LOGGED_GPA + 2 * PAGE, b"a") is Fault.MAPPED
    assert vm.access(LOGGED_GPA + 5 * PAGE) is Fault.MAPPED  # a read of a writable page
    assert vm.pgt.tlb
    vm.pgt.events.clear()
    # A writable leaf is born dirty, so both pages are reported (a read over-reports).
    assert vm.dirty_log(1) == [2, 5]
    gfn = (LOGGED_GPA >> PPC64_RADIX.page_shift) + 2
    assert list(vm.pgt.events)[:3] == [
        HarvestEvent("c_cleared", gfn, 1),
        HarvestEvent("tlbie", gfn, 1),
        HarvestEvent("reported", gfn, 1),
    ]
    assert not vm.leaf(LOGGED_GPA + 2 * PAGE).pte & _PAGE_DIRTY
    assert not vm.pgt.tlb  # the next store walks the tree and sets C again
    assert vm.dirty_log(1) == []
    assert vm.access(LOGGED_GPA + 2 * PAGE, b"b") is Fault.MAPPED
    assert vm.dirty_log(1) == [2]
    assert vm.violations() == []


def test_a_harvest_that_reports_before_the_tlbie_loses_a_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: C is cleared but the tlbies are batched after the report. A store
    in between goes through a TLB entry that still believes C is set, so the leaf's C stays
    clear and the next harvest misses the page. The check sees the order (R1) and the TLB
    entry more permissive than the leaf (P6)."""
    deferred: list[RadixLeaf] = []

    def clear_without_tlbie(kvm: Kvm, pgt: RadixPgtable, leaf: RadixLeaf) -> int:
        if not leaf.pte & _PAGE_DIRTY:
            return 0
        kvmppc_radix_update_pte(leaf, _PAGE_DIRTY, 0)
        pgt.events.append(HarvestEvent("c_cleared", leaf.gpa >> pgt.page_shift, 1))
        deferred.append(leaf)
        return 1

    vm = RadixVm()
    assert vm.access(LOGGED_GPA, b"a") is Fault.MAPPED
    monkeypatch.setattr(radix_mmu, "kvm_radix_test_clear_dirty", clear_without_tlbie)
    assert vm.dirty_log(1) == [0]
    assert vm.access(LOGGED_GPA, b"b") is Fault.MAPPED  # the VMM copied "a": "b" is new
    assert sorted(vm.violations()) == [
        "P6: TLB entry for gfn 0x100 caches C that the leaf lost: no tlbie",
        "R1: gfns 0x100+1 reported before their tlbie",
    ]
    for leaf in deferred:
        radix_pgtable.kvmppc_radix_tlbie_page(vm.pgt, leaf.gpa, leaf.shift)
    assert vm.dirty_log(1) == []  # the write of "b" is lost


# -- N4: a fault racing an invalidation -----------------------------------------------------------


def start_fault(vm: RadixVm, gpa: int, write: bool) -> KernelOp[Fault]:
    """A fault stopped after it built its leaf from the host PTE, before it takes mmu_lock
    to install it."""
    fault = kvmppc_book3s_radix_page_fault(vm.kvm, vm.host, gpa, write)
    assert next(fault) == Preempt("radix fault: sequence snapshot taken")
    assert next(fault).point.startswith("radix fault: page resolved")
    assert next(fault) == Preempt("radix fault: leaf built, taking mmu_lock to install it")
    return fault


def test_radix_fault_racing_an_invalidation_retries() -> None:
    vm = RadixVm()
    fault = start_fault(vm, RAM_GPA + PAGE, write=True)
    assert vm.host.madvise_dontneed(vm.hvas[0], HUGE) == 0  # the host drops the huge page
    assert run_to_completion(fault) is Fault.RETRY
    assert vm.leaves() == []
    assert vm.access(RAM_GPA + PAGE, b"z") is Fault.MAPPED  # a fresh page, base size now
    assert vm.leaves() == [(RAM_GPA + PAGE, PAGE)]
    assert vm.violations() == []


def test_radix_fault_racing_a_slot_flush_retries() -> None:
    """kvmppc_radix_flush_memslot moves mmu_invalidate_seq. A fault that starts once the
    update published the logged slot (during its SRCU grace period, which does not wait for
    readers that came later) builds a leaf from the slot as it found it; the commit's flush
    then makes it retry instead of installing that leaf after the flush."""
    vm = RadixVm()
    region = MemoryRegion(0, KVM_MEM_LOG_DIRTY_PAGES, RAM_GPA, 2 * HUGE, vm.hvas[0])
    update = kvm_main.kvm_vm_ioctl_set_memory_region(vm.kvm, region, 1)
    assert next(update) == Preempt("memslot swap: SRCU grace period")
    fault = start_fault(vm, RAM_GPA + PAGE, write=False)
    assert run_to_completion(update) == 0
    assert run_to_completion(fault) is Fault.RETRY
    assert vm.leaves() == []
    assert vm.violations() == []


def test_without_the_retry_check_a_racing_fault_installs_a_stale_leaf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: no mmu_invalidate_retry check. The leaf built before the host
    dropped its huge page is installed after, and maps a page the host no longer has."""
    vm = RadixVm()
    monkeypatch.setattr(radix_fault, "mmu_invalidate_retry", lambda kvm, seq: False)
    fault = start_fault(vm, RAM_GPA + PAGE, write=True)
    assert vm.host.madvise_dontneed(vm.hvas[0], HUGE) == 0
    assert run_to_completion(fault) is Fault.MAPPED
    pfn = vm.leaf(RAM_GPA).pte >> PPC64_RADIX.page_shift & 0xFFFFFFFFF
    assert vm.violations() == [
        f"R1: leaf gpa 0x0 (2048 KiB) larger than the host page at {vm.hvas[0]:#x}",
        f"N4: leaf gpa 0x0 (2048 KiB) maps pfn {pfn}, the host None",
    ]


# -- M13: DELETE and MOVE -------------------------------------------------------------------------


def map_everything(vm: RadixVm) -> None:
    for gpa in (RAM_GPA, RAM_GPA + HUGE + 7 * PAGE, LOGGED_GPA, LOGGED_GPA + 3 * PAGE):
        assert vm.access(gpa, b"w") is Fault.MAPPED
    assert len(vm.leaves()) == 4


def test_radix_delete_removes_every_leaf() -> None:
    vm = RadixVm()
    map_everything(vm)
    assert vm.set_region(0, 0, RAM_GPA, 0, vm.hvas[0]) == 0
    assert vm.leaves() == [(LOGGED_GPA, PAGE), (LOGGED_GPA + 3 * PAGE, PAGE)]
    assert not any(gfn < LOGGED_GPA >> 16 for gfn in vm.pgt.tlb)
    assert vm.access(RAM_GPA + PAGE) is Fault.MMIO
    assert vm.violations() == []


def test_radix_move_removes_every_leaf_and_the_new_place_faults_in() -> None:
    vm = RadixVm()
    map_everything(vm)
    assert vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, 40 * HUGE, HUGE, vm.hvas[1]) == 0
    assert vm.leaves() == [(RAM_GPA, HUGE), (RAM_GPA + HUGE, HUGE)]
    assert vm.access(LOGGED_GPA) is Fault.MMIO
    assert vm.access(40 * HUGE + 3 * PAGE, None) is Fault.MAPPED
    assert vm.radix_read(40 * HUGE + 3 * PAGE) == b"w"
    assert vm.violations() == []


def test_a_missing_slot_flush_is_caught() -> None:
    """The planted bug: an MMU that does not flush a slot that is deleted or moved."""

    class NoFlush(RadixMmu):
        def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
            pass

    vm = RadixVm(NoFlush(PPC64_RADIX.page_shift))
    map_everything(vm)
    assert vm.set_region(0, 0, RAM_GPA, 0, vm.hvas[0]) == 0
    assert vm.violations() == [
        "M13: leaf gpa 0x0 (2048 KiB) maps gfns outside every usable memslot",
        "M13: leaf gpa 0x200000 (2048 KiB) maps gfns outside every usable memslot",
    ]


# -- aging ----------------------------------------------------------------------------------------


def test_radix_aging_reads_and_clears_r() -> None:
    vm = RadixVm()
    hva = vm.hvas[1] + 2 * PAGE
    assert vm.access(LOGGED_GPA + 2 * PAGE) is Fault.MAPPED
    leaf = vm.leaf(LOGGED_GPA + 2 * PAGE)
    assert leaf.pte & _PAGE_ACCESSED
    assert kvm_mmu_notifier_test_young(vm.kvm, hva)
    assert kvm_mmu_notifier_clear_young(vm.kvm, hva, hva + PAGE)
    assert not leaf.pte & _PAGE_ACCESSED
    assert not kvm_mmu_notifier_test_young(vm.kvm, hva)
    assert not kvm_mmu_notifier_clear_young(vm.kvm, hva, hva + PAGE)
    # No tlbie when aging: an access through the cached translation is not seen...
    assert vm.access(LOGGED_GPA + 2 * PAGE) is Fault.MAPPED
    assert not kvm_mmu_notifier_test_young(vm.kvm, hva)
    # ...until a flush: clear_flush_young flushes when it found the page young.
    kvmppc_radix_update_pte(leaf, 0, _PAGE_ACCESSED)
    assert kvm_mmu_notifier_clear_flush_young(vm.kvm, hva, hva + PAGE)
    assert vm.access(LOGGED_GPA + 2 * PAGE) is Fault.MAPPED
    assert kvm_mmu_notifier_test_young(vm.kvm, hva)
    assert vm.violations() == []


# -- dirty logging on and off ---------------------------------------------------------------------


def test_radix_dirty_logging_on_breaks_huge_leaves_into_base_pages() -> None:
    """The commit of a FLAGS_ONLY change of KVM_MEM_LOG_DIRTY_PAGES flushes the slot: the
    huge leaves go, and faults under logging map base pages; when logging stops the slot is
    flushed again and huge leaves come back (the emptied table is replaced, no WARN)."""
    vm = RadixVm()
    assert vm.access(RAM_GPA + PAGE, b"1") is Fault.MAPPED
    assert vm.leaves() == [(RAM_GPA, HUGE)]
    assert vm.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, RAM_GPA, 2 * HUGE, vm.hvas[0]) == 0
    assert vm.leaves() == []
    assert vm.access(RAM_GPA + PAGE, b"2") is Fault.MAPPED
    assert vm.leaves() == [(RAM_GPA + PAGE, PAGE)]
    assert vm.dirty_log(0) == [1]
    assert vm.set_region(0, 0, RAM_GPA, 2 * HUGE, vm.hvas[0]) == 0
    assert vm.leaves() == []
    assert vm.access(RAM_GPA + PAGE) is Fault.MAPPED
    assert vm.leaves() == [(RAM_GPA, HUGE)]
    assert vm.violations() == []


def test_a_fault_that_ignores_dirty_logging_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the level choice ignores KVM_MEM_LOG_DIRTY_PAGES. The check reports
    the huge leaf in the logged slot (R1), and so does the harvest's own WARN."""
    real = radix_fault.kvmppc_radix_leaf_level

    def ignoring_logging(gpa: int, hva: int, host_shift: int, page_shift: int, _: bool) -> int:
        return real(gpa, hva, host_shift, page_shift, False)

    monkeypatch.setattr(radix_fault, "kvmppc_radix_leaf_level", ignoring_logging)
    vm = RadixVm()
    assert vm.access(LOGGED_GPA + PAGE, b"x") is Fault.MAPPED
    assert vm.violations() == ["R1: leaf gpa 0x1000000 (2048 KiB) in dirty-logged slot 1"]
    assert vm.dirty_log(1) == list(range(HUGE // PAGE))
    assert "R1: WARN: a huge leaf in a dirty-logged slot" in vm.violations()


def test_a_leaf_larger_than_the_host_page_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the fault takes the host mapping for a huge page when it is not."""
    real = radix_fault.find_kvm_host_pte

    def pretend_huge(kvm: Kvm, host: HostMm, seq: int, hva: int) -> tuple[HostPte, int] | None:
        found = real(kvm, host, seq, hva)
        return None if found is None else (found[0], PMD_SHIFT)

    vm = RadixVm()
    errno, small = vm.host.mmap(HUGE, RW)
    assert errno == 0 and vm.set_region(2, 0, 32 * HUGE, HUGE, small) == 0
    monkeypatch.setattr(radix_fault, "find_kvm_host_pte", pretend_huge)
    assert vm.access(32 * HUGE, b"x") is Fault.MAPPED
    assert vm.violations() == [
        f"R1: leaf gpa 0x4000000 (2048 KiB) larger than the host page at {small:#x}"
    ]


# -- N4/N5/P6: host permissions, open invalidations and the TLB -----------------------------------


def test_a_writable_leaf_over_a_read_only_host_page_is_caught() -> None:
    """mprotect to read-only unmaps the leaf; the next fault maps it read-only. The planted
    bug: a fault that made it writable anyway (set by hand here)."""
    vm = RadixVm()
    assert vm.access(LOGGED_GPA, b"x") is Fault.MAPPED
    assert vm.host.mprotect(vm.hvas[1], HUGE, PROT_READ) == 0
    assert vm.leaves() == []
    assert vm.access(LOGGED_GPA) is Fault.MAPPED
    assert not vm.leaf(LOGGED_GPA).pte & _PAGE_WRITE
    assert vm.violations() == []
    kvmppc_radix_update_pte(vm.leaf(LOGGED_GPA), 0, _PAGE_WRITE)
    assert vm.violations() == [
        "N4: leaf gpa 0x1000000 (64 KiB) writable over a read-only host page"
    ]


def test_an_unmap_without_tlbie_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: unmapping without a tlbie. The TLB keeps a translation with no leaf
    (P6) while the host changes the page (N5), and the dirty page is reported without a
    tlbie after its C was cleared (R1)."""
    vm = RadixVm()
    assert vm.access(LOGGED_GPA, b"x") is Fault.MAPPED
    monkeypatch.setattr(radix_pgtable, "kvmppc_radix_tlbie_page", lambda pgt, gpa, shift: None)
    zap = vm.host.madvise_dontneed_op(vm.hvas[1], PAGE)
    assert next(zap) == Preempt("host: invalidation started, zapping the host PTEs")
    assert vm.violations() == [
        "N5: TLB entry for gfn 0x100 survives an invalidation",
        "P6: TLB entry for gfn 0x100 has no leaf: an unmap without tlbie",
        "R1: gfns 0x100+1 reported before their tlbie",
    ]
    assert run_to_completion(zap) == 0


def test_a_fault_during_an_open_invalidation_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """N5's leaf half: nothing may map a gfn between an invalidation's start and end. The
    real fault retries; the planted bug (no retry check) maps the page the host is about to
    take away."""
    vm = RadixVm()
    zap = vm.host.madvise_dontneed_op(vm.hvas[1], PAGE)
    assert next(zap) == Preempt("host: invalidation started, zapping the host PTEs")
    assert vm.access(LOGGED_GPA) is Fault.RETRY
    assert vm.violations() == []
    monkeypatch.setattr(radix_fault, "mmu_invalidate_retry", lambda kvm, seq: False)
    assert vm.access(LOGGED_GPA) is Fault.MAPPED
    assert vm.violations() == [
        "N5: leaf gpa 0x1000000 (64 KiB) maps a gfn that is being invalidated",
        "N5: TLB entry for gfn 0x100 survives an invalidation",
    ]
    assert run_to_completion(zap) == 0


# -- what the harness promises across faults, moves and aging ------------------------------------


def test_a_page_stored_to_before_a_move_is_reported_after_it() -> None:
    """A MOVE keeps the slot's dirty bitmap: the C bits the slot's flush folds into it are
    reported by the next harvest, at the same page offsets (C-DIRTY-COMPLETE)."""
    h = RadixHarness()
    assert h.guest_access(1, 0, 17, True) is Fault.MAPPED
    h.move(1)
    h.harvest(1)
    h.check()


def test_a_flush_that_folds_c_into_the_wrong_page_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: unmapping a leaf marks the slot's first page dirty instead of the
    leaf's, so the store before the MOVE is lost."""
    unmap = radix_pgtable.kvmppc_unmap_pte

    def first_page(
        kvm: Kvm, pgt: RadixPgtable, leaf: RadixLeaf, gpa: int, memslot: KvmMemorySlot | None
    ) -> None:
        assert memslot is not None  # the slot flush always names its slot
        unmap(kvm, pgt, leaf, memslot.base_gfn << pgt.page_shift, memslot)

    monkeypatch.setattr(radix_mmu, "kvmppc_unmap_pte", first_page)
    h = RadixHarness()
    assert h.guest_access(1, 0, 17, True) is Fault.MAPPED
    h.move(1)
    with pytest.raises(RulesBroken, match=r"C-DIRTY-COMPLETE: slot 1 pages \[17\] lost"):
        h.harvest(1)


def test_a_page_a_fault_maps_is_young() -> None:
    """A fault maps the page the guest's access needs, and the kernel creates the leaf
    referenced: aging right after the fault finds the page young (C-AGING)."""
    h = RadixHarness()
    assert h.racing_fault(0, 1, 17, 1, "mprotect_rw") is Fault.MAPPED  # a no-op: no race
    h.age(0, 1, 17, "test")
    h.age(0, 1, 17, "clear_flush")
    h.check()


def test_a_fault_that_maps_a_leaf_unreferenced_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the fault builds its leaf without R."""
    create_pte = radix_pgtable.kvmppc_create_pte

    def unreferenced(kvm: Kvm, pgt: RadixPgtable, pte: int, gpa: int, level: int) -> None:
        create_pte(kvm, pgt, pte & ~_PAGE_ACCESSED, gpa, level)

    monkeypatch.setattr(radix_fault, "kvmppc_create_pte", unreferenced)
    h = RadixHarness()
    assert h.racing_fault(0, 1, 17, 1, "mprotect_rw") is Fault.MAPPED
    hva = h.hva(0, 1, 17)
    with pytest.raises(RulesBroken, match=f"C-AGING: host page {hva:#x} used by the guest"):
        h.age(0, 1, 17, "test")


# -- the state machine ----------------------------------------------------------------------------


MACHINE_SETTINGS = settings(
    max_examples=25, stateful_step_count=30, deadline=None, database=None, derandomize=True
)


def test_the_radix_machine_finds_nothing_on_the_model() -> None:
    run_state_machine_as_test(RadixMachine, settings=MACHINE_SETTINGS)


class LoggingWithoutFlush(RadixMmu):
    """The planted bug: turning dirty logging on does not flush the slot, so huge leaves
    stay where logging needs base pages."""

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        KvmArch.kvm_arch_commit_memory_region(self, kvm, old, new, change)


class BrokenRadixMachine(RadixMachine):
    mmu_factory = LoggingWithoutFlush


def test_the_radix_machine_finds_a_missing_flush_when_logging_starts() -> None:
    """Without the flush, a huge leaf survives into logging (R1), or, once logging stops
    again, a huge leaf is made over the 4K table built meanwhile (the model's WARN): which
    one the run meets first depends on the run."""
    symptoms = (
        r"R1: leaf gpa 0x\w+ \(2048 KiB\) in dirty-logged slot"
        r"|N4: WARN: a huge leaf replaced a table that still mapped pages"
    )
    with pytest.raises(RulesBroken, match=symptoms):
        run_state_machine_as_test(
            BrokenRadixMachine,
            settings=settings(MACHINE_SETTINGS, max_examples=200, phases=(Phase.generate,)),
        )
