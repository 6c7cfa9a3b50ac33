"""The vCPUs' roots on CR3 switches (X17): a vCPU keeps its current root and three cached
ones (KVM_MMU_NUM_PREV_ROOTS); a CR3 load reuses a root only for the same CR3, rotating
the cache, and puts the root that falls out of it. The harness's guest has five processes
(PML4s), one more than a vCPU keeps roots for, so that its switches do both. Also the
vCPUs' MMIO caches (X5), and the lookup of shadow pages: one per gfn and role (X18), and
the unsync pages a lookup meets."""

from __future__ import annotations

import sys

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmspec.fuzz import fuzz_x86, x86_decoder
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.x86_harness import (
    DATA_GFN,
    DATA_GVA,
    NO_SLOT_GFN,
    PAGE,
    PML4S,
    ShadowHarness,
)
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.x86 import roots, unsync
from kvmspec.reference.x86.guest_access import Outcome
from kvmspec.reference.x86.mmu_page import KvmMmuPageRole, ShadowMmuState
from kvmspec.reference.x86.tlb import KVM_MMU_NUM_PREV_ROOTS, KvmMmuRootInfo, VcpuMmu
from kvmspec.reference.x86.unsync import KVM_REQ_MMU_SYNC
from kvmspec.spec.invariants.x86_roots import check_roots_follow_cr3
from kvmspec.spec.platforms import DEFAULT_PROFILE


def _held_pgds(vm: ShadowHarness, vcpu_id: int) -> list[int]:
    """The CR3s of the roots a vCPU holds: its current one first, then the cached ones."""
    vcpu_mmu = vm.mmu.vcpu_mmu(vcpu_id)
    return [r.pgd for r in (vcpu_mmu.root, *vcpu_mmu.prev_roots) if r.sp is not None]


def test_the_guest_has_one_process_more_than_a_vcpu_keeps_roots_for() -> None:
    assert len(set(PML4S)) == KVM_MMU_NUM_PREV_ROOTS + 2


def test_cr3_switches_among_five_processes_rotate_and_drop_roots() -> None:
    """vCPU 0 runs each process in turn. The first four switches keep every root (the cache
    has room); the fifth puts the oldest, whose page stays hashed with no root count, and
    switching back to that process loads a root again, finding the same page by its gfn."""
    vm = ShadowHarness()
    pml4_pgds = [pml4 * PAGE for pml4 in PML4S]
    for n, pml4 in enumerate(PML4S):
        vm.switch_cr3(0, pml4)
        assert vm.read(DATA_GVA).outcome is Outcome.DONE
        vm.check()
        held = pml4_pgds[max(0, n - KVM_MMU_NUM_PREV_ROOTS) : n + 1]
        assert _held_pgds(vm, 0) == held[::-1]  # the newest first
    pages = vm.mmu.sp_by_pfn.values()
    oldest = [sp for sp in pages if sp.gfn == PML4S[0] and sp.role.level == 4]
    assert len(oldest) == 1 and oldest[0].root_count == 0  # put, still hashed
    # No cached root fits: the current root goes to the cache, the oldest cached one (the
    # second process's) is put, and the vCPU has no current root until it enters.
    vm.switch_cr3(0, PML4S[0])
    assert vm.mmu.vcpu_mmu(0).root.sp is None
    assert _held_pgds(vm, 0) == pml4_pgds[2:][::-1]
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.mmu.vcpu_mmu(0).root.sp is oldest[0] and oldest[0].root_count == 1
    assert _held_pgds(vm, 0) == [pml4_pgds[0], *pml4_pgds[2:][::-1]]
    assert vm.violations() == []


def _keeps_the_evicted_root(
    kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, new_pgd: int, role: KvmMmuPageRole
) -> bool:
    """Planted: fast_pgd_switch without the put of the root that falls out of the cache. The
    vCPU keeps that root as its current one, and the next entry, finding a root, runs the
    guest on another process's tables."""
    prev = vcpu_mmu.prev_roots
    if vcpu_mmu.root.sp is not None:
        if roots.is_root_usable(vcpu_mmu.root, new_pgd, role):
            return True
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            vcpu_mmu.root, prev[i] = prev[i], vcpu_mmu.root
            if roots.is_root_usable(vcpu_mmu.root, new_pgd, role):
                return True
        return False
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        if roots.is_root_usable(prev[i], new_pgd, role):
            vcpu_mmu.root, prev[i] = prev[i], vcpu_mmu.root
            prev[i:] = [*prev[i + 1 :], KvmMmuRootInfo(0, None)]
            return True
    return False


def test_a_cr3_switch_that_keeps_the_evicted_root_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted switch goes unnoticed while the cache has room. At the fifth process the
    vCPU is left on the first process's root with the fifth's CR3 (X17); every translation
    still looks right, since the processes share their lower tables."""
    monkeypatch.setattr(roots, "fast_pgd_switch", _keeps_the_evicted_root)
    vm = ShadowHarness()
    for pml4 in PML4S[:-1]:
        vm.switch_cr3(0, pml4)
        assert vm.read(DATA_GVA).outcome is Outcome.DONE
        vm.check()
    vm.switch_cr3(0, PML4S[-1])
    found = check_roots_follow_cr3(vm.mmu)
    assert [v.rule for v in found] == ["X17"]
    assert f"with CR3 {PML4S[-1] * PAGE:#x} runs on" in found[0].message
    assert vm.read(DATA_GVA).outcome is Outcome.DONE  # nothing the guest sees
    with pytest.raises(RulesBroken, match="X17"):
        vm.check()


def test_a_cached_root_for_another_cr3_is_caught() -> None:
    """The check of the cache: a cached root must be the page of the CR3 it records."""
    vm = ShadowHarness()
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    vm.switch_cr3(0, PML4S[1])
    cached = vm.mmu.vcpu_mmu(0).prev_roots[0]
    assert cached.sp is not None and cached.pgd == PML4S[0] * PAGE
    cached.pgd = PML4S[2] * PAGE
    found = check_roots_follow_cr3(vm.mmu)
    assert [v.rule for v in found] == ["X17"] and "as previous root 0" in found[0].message


def test_the_x86_machine_finds_a_cr3_switch_that_keeps_the_old_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine reaches the planted switch on its own: one vCPU must load five
    different CR3s."""
    monkeypatch.setattr(roots, "fast_pgd_switch", _keeps_the_evicted_root)
    machine = x86_machine(DEFAULT_PROFILE, ("shadow",))
    with pytest.raises(RulesBroken, match="X17"):
        run_state_machine_as_test(machine, settings=bug_hunt(3000))


def _mmio_cache_then_remap(vm: ShadowHarness) -> None:
    """vCPU 0's data page 0 leads to no slot: an MMIO read caches the translation. The
    guest then maps RAM there, without a flush yet."""
    vm.guest_read(0, 0, 0)
    vm.guest_context_switch(0, PML4S[1], 0)
    vm.guest_remap(0, 0, NO_SLOT_GFN, False)
    vm.invlpg(0, 0)
    vm.guest_read(0, 0, 0)
    vm.check()
    assert vm.mmu.mmio_info[0].gfn == NO_SLOT_GFN
    vm.guest_remap(0, 0, DATA_GFN + 1, False)
    vm.check()  # the cached translation is one the vCPU has not flushed: allowed


def test_a_cr3_switch_drops_the_mmio_cache_before_the_guest_runs() -> None:
    """A switch to a cached root resets the cache itself (kvm_mmu_new_pgd); every CR3 load
    also asks for a sync of the roots, which resets it again before the guest runs. So
    without PCIDs (the model's guest has none) the first reset is never the only one."""
    vm = ShadowHarness()
    _mmio_cache_then_remap(vm)
    vm.switch_cr3(0, PML4S[0])  # a hit in the rotation of the cache
    assert 0 not in vm.mmu.mmio_info
    assert KVM_REQ_MMU_SYNC in vm.mmu.vcpu_mmu(0).requests
    vm.guest_read(0, 0, 0)  # RAM now, as the guest's entry says
    vm.check()


def test_an_invlpg_drops_the_mmio_cache_of_its_page() -> None:
    vm = ShadowHarness()
    _mmio_cache_then_remap(vm)
    vm.invlpg(0, 0)
    assert 0 not in vm.mmu.mmio_info
    vm.check()


def test_an_invlpg_that_keeps_the_mmio_cache_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the shadow MMU's flushes (INVLPG, a sync of the roots) leave the MMIO cache
    alone. After an INVLPG, the check of the caches sees the translation the guest flushed:
    an instruction KVM emulates next would take it and send its access of the page to the
    VMM, not to the RAM the guest mapped there."""
    monkeypatch.setattr(unsync, "vcpu_clear_mmio_info", lambda mmu, vcpu_id, gva: None)
    vm = ShadowHarness()
    _mmio_cache_then_remap(vm)
    vm.invlpg(0, 0)
    with pytest.raises(RulesBroken, match=r"X5: vcpu 0 caches MMIO gfn 0x28 for data page 0"):
        vm.check()


def test_a_lookup_that_never_finds_a_page_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """X18, planted: kvm_mmu_find_shadow_page finds nothing, so every fault makes new shadow
    pages. The second process's root walk makes a second shadow of the shared PDPT."""
    monkeypatch.setattr(roots, "kvm_mmu_find_shadow_page", lambda *args: None)
    vm = ShadowHarness()
    vm.guest_read(0, 0, 0)
    vm.check()
    vm.guest_context_switch(0, PML4S[1], 0)
    with pytest.raises(RulesBroken, match=r"X18: <sp shadow L3 gfn 0x2 .* shadow gfn 0x2 alike"):
        vm.check()


def test_the_unsync_seed_meets_the_unsync_pt_in_a_sync_and_in_two_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fuzz_x86 seed shadow-unsync-met-on-the-way reaches three rare paths within its
    nine actions, so that every fuzzing run starts with them: FNAME(sync_spte) remaking a
    writable SPTE (it asks whether the gfn may stay unsync), a lookup of the PT's gfn with
    the PT's role that syncs the unsync page it finds, and one with a directory's role that
    zaps it."""
    reached: list[tuple[str, str]] = []

    def spy(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            reached.append((name, sys._getframe(1).f_code.co_name))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(roots, "kvm_mmu_prepare_zap_page")
    spy(roots, "kvm_sync_page")
    spy(unsync, "mmu_try_to_unsync_pages")
    seed = (x86_decoder.SEEDS / "shadow-unsync-met-on-the-way.bin").read_bytes()
    assert fuzz_x86.run_input(seed).violations == []
    assert {
        ("mmu_try_to_unsync_pages", "unsync_hook"),
        ("kvm_sync_page", "kvm_mmu_find_shadow_page"),
        ("kvm_mmu_prepare_zap_page", "kvm_mmu_find_shadow_page"),
    } <= set(reached)
