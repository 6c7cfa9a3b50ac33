"""Dirty logging from the inside, on the flat MMU: the named scenarios of D2, D3, D5 and D10,
and the generic machine catching models that break dirty logging, aging or N8.

Each mutant test plants one bug of the kind the rule exists for and checks that the harness
(the state machine with its contracts and invariants) reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.fuzz.generic_machine import generic_machine
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.reference import kvm_main
from kvmspec.reference.capabilities import kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import kvm_clear_dirty_log_protect, kvm_get_dirty_log_protect
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.guest_memory import kvm_write_guest_page, vgic_its_save_tables
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, guest_access
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.spec.dirty_contract import _first_unreported
from kvmspec.spec.invariants.dirty import (
    check_rings_and_bitmaps,
    check_writable_translations_logged,
)
from kvmspec.spec.invariants.warnings import check_no_warnings
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
GPA = 0x100000
SLOT = 0


class Vm:
    """One model VM with the flat MMU, vCPU 0, and an 8-page slot 0 at GPA."""

    def __init__(
        self, caps: tuple[tuple[str, int], ...] = (), profile: PlatformProfile = DEFAULT_PROFILE
    ) -> None:
        self.mmu = FlatMmu()
        self.kvm = Kvm(profile, self.mmu)
        self.host = HostMm(PAGE, profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        for name, arg in caps:
            assert kvm_vm_ioctl_enable_cap(self.kvm, CAPABILITIES[name], 0, (arg,)) == 0
        assert kvm_vm_ioctl_create_vcpu(self.kvm, 0) == 0
        _, self.hva = self.host.mmap(8 * PAGE, PROT_READ | PROT_WRITE)
        self.set_flags(0)

    def set_flags(self, flags: int) -> None:
        region = MemoryRegion(SLOT, flags, GPA, 8 * PAGE, self.hva)
        op = kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)
        assert run_to_completion(op) == 0

    def write(self, page: int) -> Fault:
        return guest_access(self.kvm, self.host, 0, GPA + page * PAGE, b"w")[0]

    def get(self) -> set[int]:
        errno, words = run_to_completion(kvm_get_dirty_log_protect(self.kvm, SLOT))
        assert errno == 0
        return {bit for bit in range(64) if words[0] >> bit & 1}

    def clear(self, mask: int) -> None:
        op = kvm_clear_dirty_log_protect(self.kvm, SLOT, 0, 8, [mask])
        assert run_to_completion(op) == 0

    def reprotected(self) -> list[int]:
        """The masks the arch was asked to write-protect, in order."""
        masks = []
        for kind, detail in self.mmu.events:
            if kind == "reprotect":
                assert isinstance(detail, tuple)
                masks.append(detail[2])
        return masks


MANUAL = (("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),)
MANUAL_INITIALLY_SET = (
    (
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
    ),
)


def test_d2_write_after_get_is_logged() -> None:
    """GET is get-and-clear: it re-protects what it reports before userspace sees it, so a
    write after the report faults again and the next GET reports it again."""
    vm = Vm()
    assert vm.write(1) is Fault.MAPPED  # mapped writable before logging
    vm.set_flags(KVM_MEM_LOG_DIRTY_PAGES)  # which write-protects it
    assert vm.write(1) is Fault.MAPPED and vm.write(2) is Fault.MAPPED
    assert vm.get() == {1, 2}
    assert vm.get() == set()
    assert vm.write(2) is Fault.MAPPED
    assert vm.get() == {2}
    assert list(check_writable_translations_logged(vm.kvm, vm.mmu)) == []


def test_d3_clear_reprotects_exactly() -> None:
    """With manual protection GET neither clears nor protects; CLEAR with extra bits in the
    mask clears and write-protects only the pages that were dirty."""
    vm = Vm(MANUAL)
    vm.set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.write(0) is Fault.MAPPED and vm.write(1) is Fault.MAPPED
    before = len(vm.reprotected())
    assert vm.get() == {0, 1} and vm.get() == {0, 1}
    assert len(vm.reprotected()) == before  # GET protected nothing
    vm.clear(0b1111)
    assert vm.reprotected()[before:] == [0b11]
    assert vm.get() == set()
    assert vm.write(1) is Fault.MAPPED  # protected again, so logged again
    assert vm.get() == {1}


def test_d5_initially_set() -> None:
    """INITIALLY_SET: the new bitmap is all ones, so enabling logging protects nothing; a
    CLEAR protects what it clears, and later writes there are logged."""
    vm = Vm(MANUAL_INITIALLY_SET)
    assert vm.write(0) is Fault.MAPPED
    vm.set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.mmu.ptes[(0, GPA // PAGE)].writable  # nothing was protected
    assert vm.get() == set(range(8))
    vm.clear(0b1)
    assert vm.get() == set(range(1, 8))
    assert vm.write(0) is Fault.MAPPED
    assert vm.get() == set(range(8))
    assert list(check_writable_translations_logged(vm.kvm, vm.mmu)) == []


def test_d10_write_without_vcpu() -> None:
    """KVM may dirty guest memory with no vCPU running only on arm64 while saving ITS tables;
    with rings, such a write goes to the backup bitmap. Anywhere else it is a WARN."""
    x86 = Vm((("KVM_CAP_DIRTY_LOG_RING", 4096),))
    x86.set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    assert kvm_write_guest_page(x86.kvm, x86.host, 0, GPA // PAGE, 0, b"x", None) == 0
    found = [str(v) for v in check_no_warnings(x86.kvm)]
    assert found == [
        "D10: WARN: mark_page_dirty_in_slot: guest memory dirtied with no running vCPU"
    ]

    caps = (("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", 4096), ("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", 0))
    arm64 = Vm(caps, ARM64)
    arm64.set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    assert vgic_its_save_tables(arm64.kvm, arm64.host, [(GPA + 3 * PAGE, b"its")]) == 0
    assert list(check_no_warnings(arm64.kvm)) == []
    assert list(check_rings_and_bitmaps(arm64.kvm)) == []
    assert arm64.get() == {3}
    ring = arm64.kvm.vcpus[0].dirty_ring
    assert ring is not None and ring.used() == 0


# --- the machine catches planted bugs --------------------------------------------------------


def _machine_finds(profile: PlatformProfile, pattern: str, examples: int = 6000) -> None:
    machine = generic_machine(profile)
    # Finding the bug is the point; shrinking it would only cost time.
    machine.TestCase.settings = bug_hunt(examples)
    with pytest.raises(AssertionError, match=pattern):
        machine.TestCase().runTest()


def _no_reprotect(self: FlatMmu, kvm: Kvm, slot: object, gfn_offset: int, mask: int) -> None:
    """A harvest that forgets to write-protect what it reported."""


def _age_and_write_protect(self: FlatMmu, kvm: Kvm, gfn_range: object) -> bool:
    """Aging that also takes write permission away."""
    for pte in self.ptes.values():
        pte.writable = False
    return True


MUTANTS: dict[str, tuple[str, str, Callable[..., object], str]] = {
    "harvest-forgets-reprotect": (
        "kvmspec.reference.flat_mmu.FlatMmu",
        "kvm_arch_mmu_enable_log_dirty_pt_masked",
        _no_reprotect,
        r"D1|C-DIRTY-COMPLETE",
    ),
    "logging-on-forgets-reprotect": (
        "kvmspec.reference.flat_mmu.FlatMmu",
        "kvm_arch_commit_memory_region",
        lambda self, kvm, old, new, change: None,
        r"D1|C-DIRTY-COMPLETE",
    ),
    "release-forgets-dirty": (
        "kvmspec.reference.page_fault",
        "kvm_release_faultin_page",
        lambda host, page, unused, dirty: None,
        r"N8",
    ),
    "aging-drops-write": (
        "kvmspec.reference.flat_mmu.FlatMmu",
        "kvm_age_gfn",
        _age_and_write_protect,
        r"N7",
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_machine_catches(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, attribute, replacement, pattern = MUTANTS[mutant]
    monkeypatch.setattr(f"{target}.{attribute}", replacement)
    _machine_finds(DEFAULT_PROFILE, pattern)


@given(
    st.lists(st.integers(0, (1 << 64) - 1) | st.just((1 << 64) - 1), max_size=4),
    st.integers(0, 300),
    st.sets(st.integers(0, 300), max_size=40),
)
def test_the_first_unreported_page_is_found_word_by_word(
    bitmap: list[int], npages: int, cleared: set[int]
) -> None:
    """D5's search, word by word, finds what a page-by-page search finds."""

    def reported(offset: int) -> bool:
        word = offset // 64
        return word < len(bitmap) and bool(bitmap[word] >> offset % 64 & 1)

    naive = next(
        (offset for offset in range(npages) if offset not in cleared and not reported(offset)),
        None,
    )
    assert _first_unreported(bitmap, npages, cleared) == naive


def test_a_terabyte_slot_reported_all_dirty_is_judged_in_proportion_to_its_bitmap() -> None:
    """The D5 search over an all-ones bitmap of a 1 TiB slot (2^28 pages) looks at each of
    its 2^22 words once instead of each page."""
    npages = 1 << 28
    bitmap = [(1 << 64) - 1] * (npages // 64)
    started = time.process_time()
    assert _first_unreported(bitmap, npages, set()) is None
    assert time.process_time() - started < 30
