"""The fast page fault (X16) on the TDP MMU: a store to a leaf that dirty logging
write-protected (MMU-writable kept) gets W back with one compare-and-exchange and is logged;
an access-tracked leaf (EPT without A/D bits) gets R and X back; a zap between the fast
path's read and its exchange makes the exchange fail, so nothing zapped comes back, and the
full fault path maps the page anew. Planted bugs: a plain store in place of the exchange,
W granted whatever MMU-writable says, and a fix that maps another page, each caught by
check_fast_page_faults (and the host and compare-and-exchange checks beside it)."""

from __future__ import annotations

import pytest
from test_x86_tdp_mmu import leaf

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.tdp_machine import EPT_WITHOUT_AD_BITS, TdpVm, tdp_machine
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.host import PROT_READ
from kvmspec.reference.page_fault import Fault
from kvmspec.reference.x86 import tdp_fault
from kvmspec.reference.x86.paging import PT_WRITABLE_MASK
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    is_access_track_spte,
    is_mmu_writable_spte,
)
from kvmspec.reference.x86.tdp_fault import FAST_PF_ACTOR, RetPf
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.x86_tdp import check_fast_page_faults

PAGE = 4096
FAST_STEP = "fast page fault: SPTE read"


def fast_writes(vm: TdpVm) -> int:
    return sum(w.actor.startswith(FAST_PF_ACTOR) for w in vm.mmu.tables.history.writes)


def x16(found: list[Violation]) -> list[str]:
    return [v.message for v in found if v.rule == "X16"]


def logged_and_harvested() -> TdpVm:
    """Dirty logging on, the guest wrote page 2, and a harvest reported it and
    write-protected its leaf for the next store (MMU-writable kept)."""
    vm = TdpVm()
    assert vm.log_dirty(True) == 0
    assert vm.access(2, b"one-one!").outcome is Fault.MAPPED
    assert vm.get_dirty_log() == [1 << 2]
    spte = leaf(vm, 2)
    assert not spte & PT_WRITABLE_MASK and is_mmu_writable_spte(vm.mmu.masks, spte)
    assert vm.violations() == []
    return vm


def run_to_exchange(op: KernelOp[object]) -> None:
    """Advance a fault until its fast path has read the leaf and is about to exchange it."""
    while True:
        point = next(op)
        if isinstance(point, Preempt) and FAST_STEP in point.point:
            return


def test_a_dirty_logged_write_fixed_by_the_fast_path_is_logged() -> None:
    vm = logged_and_harvested()
    assert run_to_completion(vm.fault(2, write=True)) is RetPf.FIXED
    assert leaf(vm, 2) & PT_WRITABLE_MASK
    assert fast_writes(vm) == 1
    assert vm.violations() == []
    assert vm.get_dirty_log() == [1 << 2]
    # Once fixed, the same fault is spurious: another vCPU got there first.
    assert vm.access(2, b"two-two!").outcome is Fault.MAPPED
    assert run_to_completion(vm.fault(2, write=True, vcpu_id=1)) is RetPf.SPURIOUS
    assert vm.violations() == []


def test_the_fast_path_leaves_read_faults_and_read_only_pages_alone() -> None:
    """With A/D bits a fault that found no leaf is never fast; a store to a leaf that maps a
    page the host gives read-only (not MMU-writable) goes to the full path, which refuses
    it (EFAULT) without the fast path writing anything."""
    vm = TdpVm()
    assert run_to_completion(vm.fault(1, write=False)) is RetPf.FIXED  # the full path
    assert vm.host.mprotect(vm.hva + 3 * PAGE, PAGE, PROT_READ) == 0
    assert vm.access(3, None).outcome is Fault.MAPPED
    assert not is_mmu_writable_spte(vm.mmu.masks, leaf(vm, 3))
    assert run_to_completion(vm.fault(3, write=True)) is RetPf.EFAULT
    assert fast_writes(vm) == 0
    assert vm.violations() == []


def test_an_access_tracked_leaf_is_restored_by_the_fast_path() -> None:
    """EPT without A/D bits: aging saves R and X and clears RWX; the next load faults with
    no usable leaf, and the fast path puts R and X back (W stays clear: only a store, on an
    MMU-writable leaf, gives it back, again on the fast path)."""
    vm = TdpVm(EPT_WITHOUT_AD_BITS)
    assert vm.access(0, b"12345678").outcome is Fault.MAPPED
    assert run_to_completion(vm.age(0, 1)) is True
    assert is_access_track_spte(vm.mmu.masks, leaf(vm, 0))
    vm.kvm.arch.kvm_flush_remote_tlbs(vm.kvm)
    assert vm.access(0, None).data == b"12345678"
    spte = leaf(vm, 0)
    assert not is_access_track_spte(vm.mmu.masks, spte) and not spte & PT_WRITABLE_MASK
    assert vm.access(0, b"87654321").outcome is Fault.MAPPED
    assert leaf(vm, 0) & PT_WRITABLE_MASK
    assert fast_writes(vm) == 2
    assert vm.violations() == []


def race_with_a_zap(vm: TdpVm) -> RetPf:
    """vCPU 0 stores to page 2: its fast path reads the write-protected leaf; then the host
    drops the page (MADV_DONTNEED: the notifier zaps the leaf), then the exchange runs."""
    op = vm.fault(2, write=True)
    run_to_exchange(op)
    assert vm.host.madvise_dontneed(vm.hva + 2 * PAGE, PAGE) == 0
    assert leaf(vm, 2) == SHADOW_NONPRESENT_VALUE
    result = run_to_completion(op)
    assert isinstance(result, RetPf)
    return result


def test_a_zap_between_the_read_and_the_exchange_is_not_undone() -> None:
    """X16: the zap changed the SPTE, so the exchange fails; the retried walk finds no leaf
    and the full path maps the page the host has now (a new, zeroed one)."""
    vm = logged_and_harvested()
    old = leaf(vm, 2)
    assert race_with_a_zap(vm) is RetPf.FIXED
    assert fast_writes(vm) == 0
    new = leaf(vm, 2)
    assert new & PT_WRITABLE_MASK and new >> 12 != old >> 12
    assert vm.violations() == []
    assert vm.access(2, None).data == bytes(8)


def store_without_compare(  # type: ignore[no-untyped-def]
    kvm, mmu, vcpu, fault, sptep, old_spte, new_spte, actor
) -> bool:
    """The planted fast_pf_fix_direct_spte: a plain store (recorded as based on the value
    the walk read), then the dirty marking as the kernel does it."""
    mmu.tables._store(sptep, new_spte, old_spte, actor)
    if new_spte & PT_WRITABLE_MASK and not old_spte & PT_WRITABLE_MASK:
        mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, vcpu)
    return True


def test_a_fast_path_that_stores_without_compare_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: a plain store in place of the compare-and-exchange writes the old
    leaf, made writable, over the zap: a mapping of a page the host took away."""

    monkeypatch.setattr(tdp_fault, "fast_pf_fix_direct_spte", store_without_compare)
    vm = logged_and_harvested()
    assert race_with_a_zap(vm) is RetPf.FIXED
    found = vm.violations()
    assert any("not a present leaf" in message for message in x16(found))
    assert {"X15", "N4"} <= {v.rule for v in found}


def test_a_fast_path_that_ignores_mmu_writable_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: W granted whatever MMU-writable says, over a page the host maps
    read-only."""
    monkeypatch.setattr(tdp_fault, "is_mmu_writable_spte", lambda masks, spte: True)
    vm = TdpVm()
    assert vm.host.mprotect(vm.hva + 3 * PAGE, PAGE, PROT_READ) == 0
    assert vm.access(3, None).outcome is Fault.MAPPED
    assert run_to_completion(vm.fault(3, write=True)) is RetPf.FIXED
    found = vm.violations()
    assert any("W without MMU-writable" in message for message in x16(found))
    assert "N4" in {v.rule for v in found}


def test_a_fast_path_that_maps_another_page_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the fixed SPTE built from the wrong pfn."""
    fix = tdp_fault.fast_pf_fix_direct_spte

    def off_by_one(kvm, mmu, vcpu, fault, sptep, old_spte, new_spte, actor):  # type: ignore[no-untyped-def]
        return fix(kvm, mmu, vcpu, fault, sptep, old_spte, new_spte + PAGE, actor)

    monkeypatch.setattr(tdp_fault, "fast_pf_fix_direct_spte", off_by_one)
    vm = logged_and_harvested()
    assert run_to_completion(vm.fault(2, write=True)) is RetPf.FIXED
    assert any("the mapping changed" in message for message in x16(vm.violations()))
    assert check_fast_page_faults(vm.mmu) != []


@pytest.mark.parametrize("ad_bits", [True, False])
def test_tdp_machine_finds_a_fast_path_that_ignores_mmu_writable(
    monkeypatch: pytest.MonkeyPatch, ad_bits: bool
) -> None:
    """The campaign's x86-tdp machines reach the fast path: with W granted whatever
    MMU-writable says, a run that stores to a page mapped read-only fails, by X16 or, when
    the page is the host's zero page, by the store landing in the zero page itself."""
    monkeypatch.setattr(tdp_fault, "is_mmu_writable_spte", lambda masks, spte: True)
    machine = tdp_machine(ad_bits)
    machine.TestCase.settings = bug_hunt(1000)
    with pytest.raises((RulesBroken, AssertionError), match=r"X16|write to pfn 0,"):
        machine.TestCase().runTest()
