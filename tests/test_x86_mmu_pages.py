"""The shadow-page limit (reference/x86/mmu_pages.py) and X12 (spec/invariants/x86_page_limit.py):
accounting, recycling oldest first, ENOSPC only when every page held is a root in use,
KVM_SET_NR_MMU_PAGES (and its trace operation on every architecture), the memslot default,
and planted bugs the checks catch."""

from __future__ import annotations

import errno

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.ops import CheckExtension, SetNrMmuPages
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.session import Session
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.fuzz.x86_harness import DATA_GFN, DATA_PAGES, MMU_PAGE_LIMITS, PML4_2, ShadowHarness
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, run_to_completion
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86 import paging_tmpl, roots
from kvmspec.reference.x86.guest_access import Outcome, guest_instruction
from kvmspec.reference.x86.mmu_pages import (
    KVM_MIN_ALLOC_MMU_PAGES,
    kvm_mmu_available_pages,
    kvm_mmu_change_mmu_pages,
    kvm_vm_ioctl_set_nr_mmu_pages,
)
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import LEGACY_MASKS_HERE
from kvmspec.reference.x86.tdp_arch import TdpMmu
from kvmspec.spec.invariants.x86_page_limit import check_enospc, check_mmu_page_limit, held_pages
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PPC64_HV, X86_64, PlatformProfile
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096


def _warm(vm: ShadowHarness) -> None:
    """Both vCPUs run, on the two PML4s, over several data pages: every table is shadowed."""
    vm.switch_cr3(1, PML4_2)
    for i in range(DATA_PAGES):
        vm.guest_read(i % 2, i, 0)
    vm.check()


def test_every_page_held_is_counted_and_the_default_limit_follows_the_memslots() -> None:
    vm = ShadowHarness()
    # Two slots of 8 + 8 pages and KVM's private APIC-access page: far below 50 * 64.
    assert vm.mmu.n_max_mmu_pages == KVM_MIN_ALLOC_MMU_PAGES
    _warm(vm)
    assert vm.mmu.n_used_mmu_pages == held_pages(vm.mmu) >= 5
    assert check_mmu_page_limit(vm.mmu) == []


def test_a_lower_limit_recycles_the_oldest_pages_that_are_no_root() -> None:
    vm = ShadowHarness()
    _warm(vm)
    pages = list(vm.mmu.active_mmu_pages)  # newest first
    roots_in_use = [sp for sp in pages if sp.root_count]
    limit = len(roots_in_use) + 1
    kvm_mmu_change_mmu_pages(vm.kvm, vm.mmu, limit)
    kept = [sp for sp in pages if sp in vm.mmu.active_mmu_pages]
    gone = [sp for sp in pages if sp not in kept]
    assert vm.mmu.n_used_mmu_pages == limit == vm.mmu.n_max_mmu_pages
    assert all(sp.role.invalid and sp.freed for sp in gone)
    assert set(roots_in_use) <= set(kept)
    # FIFO: the page kept besides the roots is newer than every page zapped.
    (other,) = [sp for sp in kept if not sp.root_count]
    assert pages.index(other) < min(pages.index(sp) for sp in gone)
    assert vm.mmu.stat["mmu_recycled"] == len(gone)


def test_faults_under_a_small_limit_recycle_and_every_access_completes() -> None:
    vm = ShadowHarness()
    _warm(vm)
    vm.set_mmu_page_limit(MMU_PAGE_LIMITS[0])
    recycled = vm.mmu.stat["mmu_recycled"]
    for i in range(DATA_PAGES):
        vm.guest_write(i % 2, i, i + 1)
        vm.guest_read((i + 1) % 2, i, 0)
        vm.check()
    assert vm.mmu.stat["mmu_recycled"] > recycled
    # Every access completed under the small limit: none failed with ENOSPC (the harness
    # would have raised the limit to the default and run it again).
    assert vm.mmu.n_max_mmu_pages == MMU_PAGE_LIMITS[0]


def test_a_limit_no_larger_than_the_roots_in_use_fails_kvm_run_with_enospc() -> None:
    vm = ShadowHarness()
    _warm(vm)
    kvm_mmu_change_mmu_pages(vm.kvm, vm.mmu, 1)
    # Two roots are in use, and recycling may not take them: the limit stays at 2.
    assert vm.mmu.n_used_mmu_pages == vm.mmu.n_max_mmu_pages == 2
    access = guest_instruction(vm.kvm, vm.host, 0, DATA_GFN * PAGE, None, 8)
    assert access.outcome is Outcome.ENOSPC
    assert check_enospc(vm.mmu) == []
    assert vm.mmu.n_used_mmu_pages == 2  # nothing was allocated
    # More room, and the same access goes through.
    kvm_mmu_change_mmu_pages(vm.kvm, vm.mmu, 3)
    assert guest_instruction(vm.kvm, vm.host, 0, DATA_GFN * PAGE, None, 8).outcome is Outcome.DONE
    vm.check()


def test_a_lower_limit_can_end_below_the_goal_and_the_harness_runs_again_after_enospc() -> None:
    """The campaign's first finding on the limit (corpus/regressions, digest 6d3e5de50685),
    a false report of the harness: kvm_mmu_change_mmu_pages zaps at least the excess, and a
    zap takes the page's unsync children with it, so the limit is set to the count left, here
    2 for a goal of 3. With a vCPU's previous root still cached, both pages are roots in use
    and the next fault fails KVM_RUN with ENOSPC. The harness, as a VMM can, raises the limit
    and runs the vCPU again."""
    vm = ShadowHarness()
    vm.guest_remap(0, 0, DATA_GFN, False)  # the PT goes unsync under the PD
    assert vm.mmu.n_used_mmu_pages == 4
    vm.set_mmu_page_limit(3)
    assert vm.mmu.n_max_mmu_pages == vm.mmu.n_used_mmu_pages == 2
    vm.switch_cr3(0, PML4_2)  # vCPU 0 caches its root and loads the other PML4's
    vm.guest_read_pt_as_pd(0, 100, 0, 0)
    assert vm.mmu.n_max_mmu_pages == MMU_PAGE_LIMITS[-1]  # raised after the ENOSPC
    vm.check()


def test_enospc_with_a_page_left_to_recycle_is_reported() -> None:
    vm = ShadowHarness()
    _warm(vm)
    assert kvm_mmu_available_pages(vm.mmu) > 0
    found = check_enospc(vm.mmu)
    assert [v.rule for v in found] == ["X12", "X12"]
    assert "available" in found[0].message and "could be recycled" in found[1].message


def test_kvm_set_nr_mmu_pages_sets_the_limit_and_stops_the_memslot_default() -> None:
    vm = ShadowHarness()
    _warm(vm)
    before = vm.mmu.n_max_mmu_pages
    ioctl = kvm_vm_ioctl_set_nr_mmu_pages
    assert run_to_completion(ioctl(vm.kvm, vm.mmu, KVM_MIN_ALLOC_MMU_PAGES - 1)) == errno.EINVAL
    assert (vm.mmu.n_max_mmu_pages, vm.mmu.n_requested_mmu_pages) == (before, 0)
    assert run_to_completion(ioctl(vm.kvm, vm.mmu, 1 << 40)) == 0
    assert vm.mmu.n_max_mmu_pages == vm.mmu.n_requested_mmu_pages == 1 << 40
    _, spare = vm.host.mmap(64 * PAGE, 3)
    assert vm.set_region(2, 0, 200, 64, spare) == 0  # a CREATE no longer recomputes
    assert vm.mmu.n_max_mmu_pages == 1 << 40
    vm.check()


def _slot_change(kvm: Kvm, slot: int, flags: int, gfn: int, npages: int) -> int:
    region = MemoryRegion(slot, flags, gfn * PAGE, npages * PAGE, 0x7F00_0000_0000)
    return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1))


@pytest.mark.parametrize("arch", ["shadow", "tdp"])
def test_create_and_delete_recompute_the_default_move_and_flags_only_do_not(arch: str) -> None:
    if arch == "shadow":
        mmu: ShadowMmu | TdpMmu = ShadowMmu(LEGACY_MASKS_HERE)
        kvm = Kvm(DEFAULT_PROFILE, mmu)
    else:
        mmu = TdpMmu(LEGACY_MASKS_HERE)
        kvm = Kvm(X86_64, mmu)
    assert mmu.n_max_mmu_pages == 0  # no memslot yet
    assert _slot_change(kvm, 0, 0, 0, 50 * 100) == 0
    assert mmu.n_max_mmu_pages == 100
    assert _slot_change(kvm, 1, 0, 1 << 20, 50 * 100) == 0
    assert mmu.n_max_mmu_pages == 200
    assert _slot_change(kvm, 1, 0, 2 << 20, 50 * 100) == 0  # MOVE
    assert _slot_change(kvm, 1, KVM_MEM_LOG_DIRTY_PAGES, 2 << 20, 50 * 100) == 0  # FLAGS_ONLY
    assert mmu.n_max_mmu_pages == 200
    assert _slot_change(kvm, 1, 0, 0, 0) == 0  # DELETE
    assert mmu.n_max_mmu_pages == 100
    assert _slot_change(kvm, 0, 0, 0, 0) == 0
    assert mmu.n_max_mmu_pages == KVM_MIN_ALLOC_MMU_PAGES  # the floor
    assert mmu.n_used_mmu_pages == 0


def test_a_fault_that_never_recycles_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: a fault's make_mmu_pages_available always says a page is left. Once the
    guest uses its PT as a page directory too (a sixth shadow page), the count passes the
    limit's overshoot, which X12 reports."""
    monkeypatch.setattr(paging_tmpl, "make_mmu_pages_available", lambda kvm, mmu: 0)
    vm = ShadowHarness()
    vm.set_mmu_page_limit(MMU_PAGE_LIMITS[0])
    _warm(vm)
    vm.guest_read_pt_as_pd(0, 100, 0, 0)
    with pytest.raises(RulesBroken, match=r"X12: 6 shadow pages held, the limit 3"):
        vm.check()


def test_an_allocation_left_uncounted_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: every lookup or allocation of a shadow page takes one off the count (pages
    that escape the limit). The count no longer matches the pages held."""
    real = roots.kvm_mmu_get_shadow_page

    def uncounted(*args: object, **kwargs: object) -> object:
        sp = real(*args, **kwargs)  # type: ignore[arg-type]
        args[1].n_used_mmu_pages -= 1  # type: ignore[attr-defined]
        return sp

    monkeypatch.setattr(roots, "kvm_mmu_get_shadow_page", uncounted)
    vm = ShadowHarness()
    with pytest.raises(RulesBroken, match="X12: n_used_mmu_pages is"):
        _warm(vm)


def test_the_x86_machine_finds_a_limit_that_recycling_ignores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine reaches the planted bug of test_a_fault_that_never_recycles_is_caught
    on its own: it must set a small limit, then fault enough pages in."""
    monkeypatch.setattr(paging_tmpl, "make_mmu_pages_available", lambda kvm, mmu: 0)
    machine = x86_machine(DEFAULT_PROFILE, ("shadow",))
    machine.TestCase.settings = bug_hunt(400)
    with pytest.raises(RulesBroken, match="X12"):
        run_state_machine_as_test(machine, settings=bug_hunt(400))


@pytest.mark.parametrize(
    ("profile", "small", "large", "capability"),
    [
        (DEFAULT_PROFILE, "EINVAL", 0, 1),
        (X86_64, "EINVAL", 0, 1),
        (ARM64, "EINVAL", "EINVAL", 0),
        (PPC64_HV, "ENOTTY", "ENOTTY", 0),
    ],
)
def test_the_trace_operation_answers_as_each_architecture_does(
    profile: PlatformProfile, small: str, large: str | int, capability: int
) -> None:
    """x86 has the ioctl (the shadow MMU's VM keeps the limit; the flat MMU standing in for
    the TDP MMU only checks it); arm64 and POWER answer an unknown VM ioctl."""
    target = ReferenceTarget(profile)
    assert target.apply(SetNrMmuPages(63)) == {"errno": small}
    assert target.apply(SetNrMmuPages(1 << 20)) == {"errno": large}
    assert target.apply(CheckExtension("KVM_CAP_MMU_SHADOW_CACHE_CONTROL"))["result"] == capability
    if isinstance(target.kvm.arch, ShadowMmu):
        assert target.kvm.arch.n_max_mmu_pages == target.kvm.arch.n_requested_mmu_pages == 1 << 20


def test_a_wrong_kvm_set_nr_mmu_pages_answer_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: a kernel that accepts any limit. The memslot contract, which judges every
    session's operations on any target, reports the 63 it should have refused (X12)."""

    def planted(kvm: Kvm, nr_mmu_pages: int) -> KernelOp[int]:
        yield from ()
        return 0

    monkeypatch.setattr(
        "kvmspec.fuzz.targets.reference.kvm_arch_vm_ioctl_set_nr_mmu_pages", planted
    )
    session = Session(DEFAULT_PROFILE, "reference")
    assert session.apply(SetNrMmuPages(63))[1] == [
        "X12: set_nr_mmu_pages 63: expected EINVAL, observed 0"
    ]
    assert session.apply(SetNrMmuPages(64))[1] == []
    arm64 = Session(ARM64, "reference")
    assert arm64.apply(SetNrMmuPages(64))[1] == [
        "X12: set_nr_mmu_pages 64: expected EINVAL, observed 0"
    ]
