"""The x86 shadow MMU: a CPL3 guest with 4-level page tables in guest memory reads and
writes through shadow pages; write-protection and emulation of guest page-table writes
(X6, FINDINGS 5.6); MMIO SPTEs and their generations (X11); the fast zap and obsolete
roots (X10, FINDINGS 5.4); cached roots on CR3 switches; dirty logging; the N4 race; and
the state machine of kvmspec.fuzz.x86_machine (shadow and mmio layouts), which checks the
rmaps, parent_ptes, TLBs and the other shadow invariants after every step."""

from __future__ import annotations

import pytest

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.x86_harness import (
    DATA_GFN,
    DATA_GVA,
    DATA_PAGES,
    NO_SLOT_GFN,
    PAGE,
    PML4,
    PML4_2,
    PT,
    PTE,
    RW,
    ShadowHarness,
)
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.x86 import guest_access
from kvmspec.reference.x86.guest_access import Outcome, ShadowAccess
from kvmspec.reference.x86.mmio_spte import MMIO_SPTE_GEN_MASK
from kvmspec.reference.x86.paging import PFERR_USER_MASK
from kvmspec.reference.x86.paging_tmpl import RetPf, fname_page_fault
from kvmspec.reference.x86.roots import vcpu_enter_guest
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES


def test_guest_and_host_see_the_same_memory_through_shadow_pages() -> None:
    vm = ShadowHarness()
    assert vm.read(DATA_GVA) == ShadowAccess(Outcome.DONE, bytes(4))
    assert vm.write(DATA_GVA + 8, b"gues").outcome is Outcome.DONE
    assert vm.host.host_read(vm.data_hva + 8, 4) == (0, b"gues")
    assert vm.host.host_write(vm.data_hva + PAGE, b"host") == 0
    assert vm.read(DATA_GVA + PAGE, vcpu_id=1).data == b"host"
    assert vm.write(DATA_GVA + PAGE - 2, b"span").outcome is Outcome.DONE  # across a page
    assert vm.read(DATA_GVA + PAGE - 2).data == b"span"
    assert vm.host.madvise_dontneed(vm.data_hva, PAGE) == 0
    assert vm.read(DATA_GVA + 8).data == bytes(4)  # the notifier zapped the leaf
    # One shadow page per guest table, shared by both vCPUs.
    assert len(vm.mmu.mmu_page_hash) == 4
    assert vm.violations() == []


def test_guest_page_table_write_is_emulated_and_takes_effect() -> None:
    """FINDINGS 5.6: the guest rewrites its own PTE; KVM catches the write (the PT's gfn is
    write-protected, X6), emulates it, and the new mapping takes effect at once."""
    vm = ShadowHarness()
    vm.host.host_write(vm.data_hva, b"1111")
    vm.host.host_write(vm.data_hva + PAGE, b"2222")
    assert vm.read(DATA_GVA).data == b"1111"
    assert vm.guest_set_pte(DATA_GFN, (DATA_GFN + 1) * PAGE | PTE).outcome is Outcome.DONE
    assert vm.mmu.stat["pf_emulate"] == 1 and vm.mmu.stat["mmu_pte_write"] == 1
    assert vm.read(DATA_GVA).data == b"2222"
    assert vm.guest_set_pte(DATA_GFN, NO_SLOT_GFN * PAGE | PTE).outcome is Outcome.DONE
    access = vm.read(DATA_GVA)
    assert access.outcome is Outcome.MMIO and access.mmio is not None
    assert access.mmio.gpa == NO_SLOT_GFN * PAGE
    assert vm.guest_set_pte(DATA_GFN, 0).outcome is Outcome.DONE
    assert vm.read(DATA_GVA).outcome is Outcome.SHUTDOWN  # the guest's own #PF
    assert vm.violations() == []


def test_a_host_write_to_a_guest_page_table_is_not_noticed() -> None:
    """FINDINGS 5.6: shadow coherence only covers guest writes. The VMM rewriting the PTE
    through its mapping leaves the shadow page, and the guest's translation, stale."""
    vm = ShadowHarness()
    vm.host.host_write(vm.data_hva, b"1111")
    vm.host.host_write(vm.data_hva + PAGE, b"2222")
    assert vm.read(DATA_GVA).data == b"1111"
    vm.write_table(PT, DATA_GFN, (DATA_GFN + 1) * PAGE | PTE)
    assert vm.read(DATA_GVA).data == b"1111"


def test_fast_zap_makes_every_root_obsolete_and_vcpus_drop_them() -> None:
    """X10 and FINDINGS 5.4: with KVM_X86_QUIRK_SLOT_ZAP_ALL, deleting any slot zaps every
    shadow page; each vCPU drops its obsolete root before it runs again."""
    vm = ShadowHarness()
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.read(DATA_GVA, vcpu_id=1).outcome is Outcome.DONE
    old_root = vm.mmu.vcpu_mmu(0).root.sp
    _, spare = vm.host.mmap(PAGE, RW)
    assert vm.set_region(2, 0, 100, 1, spare) == 0
    assert vm.set_region(2, 0, 100, 0, spare) == 0  # DELETE of an unrelated slot
    assert vm.mmu.mmu_valid_gen == 1
    assert old_root is not None and old_root.role.invalid and not old_root.freed  # still held
    assert all(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS in v.requests for v in vm.mmu.vcpus.values())
    assert vm.violations() == []
    fixed = vm.mmu.stat["pf_fixed"]
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.mmu.stat["pf_fixed"] == fixed + 1  # refaulted into a new root
    new_root = vm.mmu.vcpu_mmu(0).root.sp
    assert new_root is not None and new_root is not old_root and new_root.mmu_valid_gen == 1
    vcpu_enter_guest(vm.kvm, vm.mmu, vm.mmu.vcpu_mmu(1))
    assert old_root.pfn not in vm.mmu.sp_by_pfn  # the last user let go: freed
    assert vm.violations() == []


def test_without_the_quirk_a_delete_zaps_only_its_slot() -> None:
    """FINDINGS 5.4, quirk disabled: deleting another slot refaults nothing."""
    vm = ShadowHarness(zap_all_quirk=False)
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    _, spare = vm.host.mmap(PAGE, RW)
    assert vm.set_region(2, 0, 100, 1, spare) == 0
    assert vm.set_region(2, 0, 100, 0, spare) == 0
    fixed = vm.mmu.stat["pf_fixed"]
    assert vm.read(DATA_GVA).outcome is Outcome.DONE and vm.mmu.stat["pf_fixed"] == fixed
    assert vm.set_region(1, 0, DATA_GFN, 0, vm.data_hva) == 0  # the data slot itself
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO
    assert vm.violations() == []


def test_cr3_switch_back_reuses_the_cached_root() -> None:
    vm = ShadowHarness()
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    root_a = vm.mmu.vcpu_mmu(0).root.sp
    vm.set_cr3(0, PML4_2)
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    root_b = vm.mmu.vcpu_mmu(0).root.sp
    assert root_b is not root_a and root_b is not None and root_b.gfn == PML4_2
    misses = vm.mmu.stat["mmu_cache_miss"]
    vm.set_cr3(0, PML4)
    assert vm.mmu.vcpu_mmu(0).root.sp is root_a  # from prev_roots, before any access
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.mmu.stat["mmu_cache_miss"] == misses
    assert vm.violations() == []


def test_dirty_logging_write_protects_and_logs_guest_writes() -> None:
    vm = ShadowHarness()
    assert vm.write(DATA_GVA + 3 * PAGE, b"a").outcome is Outcome.DONE
    flags = KVM_MEM_LOG_DIRTY_PAGES
    assert vm.set_region(1, flags, DATA_GFN, DATA_PAGES, vm.data_hva) == 0
    assert vm.violations() == []  # the writable leaf was write-protected and flushed
    assert vm.write(DATA_GVA + 3 * PAGE, b"b").outcome is Outcome.DONE
    assert vm.read(DATA_GVA + 5 * PAGE).outcome is Outcome.DONE
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 1)) == (0, [1 << 3])
    assert vm.write(DATA_GVA + 3 * PAGE, b"c").outcome is Outcome.DONE
    assert run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 1)) == (0, [1 << 3])
    assert vm.violations() == []


def test_a_fault_that_races_an_invalidation_installs_nothing() -> None:
    """N4 on the shadow MMU: the fault resolved its pfn, then MADV_DONTNEED took the page
    away; is_page_fault_stale sees the moved sequence under mmu_lock and retries."""
    vm = ShadowHarness()
    vm.host.host_write(vm.data_hva, b"old!")
    vcpu_mmu = vm.mmu.vcpu_mmu(0)
    vcpu_enter_guest(vm.kvm, vm.mmu, vcpu_mmu)
    vcpu = vm.kvm.vcpus[0]
    fault = fname_page_fault(vm.kvm, vm.host, vm.mmu, vcpu_mmu, vcpu, DATA_GVA, PFERR_USER_MASK)
    while next(fault) != Preempt("x86 fault: pfn resolved, taking mmu_lock"):
        pass
    assert vm.host.madvise_dontneed(vm.data_hva, PAGE) == 0
    try:
        while True:
            next(fault)
    except StopIteration as done:
        assert done.value.ret is RetPf.RETRY
    assert vm.violations() == []
    assert vm.read(DATA_GVA).data == bytes(4)


# -- the state machine (kvmspec.fuzz.x86_machine, the shadow layout) ---------------------------

TestShadowMmuMachine = x86_machine(DEFAULT_PROFILE, ("shadow", "mmio")).TestCase


# -- MMIO SPTEs (X11), with the kvm module's mmio_caching on ------------------------------------


def test_a_slot_created_over_a_cached_mmio_gfn_is_faulted_into() -> None:
    """X11: the first access to a gfn without a slot installs an MMIO SPTE; the next one
    takes the reserved-bit fast path straight to emulation. Creating a slot over the gfn
    publishes a new generation, so the SPTE is stale: the next access faults into the slot
    and reads its memory."""
    vm = ShadowHarness(mmio_caching=True)
    vm.write_table(PT, DATA_GFN, NO_SLOT_GFN * PAGE | PTE)
    first = vm.read(DATA_GVA)
    assert first.outcome is Outcome.MMIO and first.mmio is not None
    assert first.mmio.gpa == NO_SLOT_GFN * PAGE
    assert vm.mmu.stat["pf_mmio_spte_created"] == 1
    taken = vm.mmu.stat["pf_taken"]
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO
    assert vm.mmu.stat["pf_taken"] == taken  # handle_mmio_page_fault settled it
    assert vm.violations() == []
    _, hva = vm.host.mmap(PAGE, RW)
    assert vm.host.host_write(hva, b"slot") == 0
    assert vm.set_region(2, 0, NO_SLOT_GFN, 1, hva) == 0  # CREATE: no zap, a new generation
    assert vm.violations() == []  # the MMIO SPTE is still there, but can never be trusted
    assert vm.read(DATA_GVA) == ShadowAccess(Outcome.DONE, b"slot")
    assert vm.mmu.stat["pf_taken"] == taken + 1
    assert vm.violations() == []


def test_an_mmu_that_trusts_every_mmio_spte_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: handle_mmio_page_fault never compares generations. The access after
    the slot's re-creation goes to the VMM, which the harness's coherence check reports."""
    monkeypatch.setattr(guest_access, "check_mmio_spte", lambda generation, spte: True)
    vm = ShadowHarness(mmio_caching=True)
    vm.change_data_slot(None)
    vm.guest_read(0, 1, 0)  # MMIO: an MMIO SPTE for gfn DATA_GFN + 1
    vm.check()
    vm.change_data_slot(DATA_GFN)
    vm.guest_read(0, 1, 0)
    with pytest.raises(RulesBroken) as broken:
        vm.check()
    assert "COHERENCE" in str(broken.value)


def _near_the_mmio_generation_wrap() -> tuple[ShadowHarness, int]:
    """A VM whose memslot generation is two CREATEs before the 19-bit MMIO generation wraps
    (as if 2^19 updates had run), with an MMIO SPTE made in that generation."""
    vm = ShadowHarness(mmio_caching=True)
    step = vm.kvm.profile.nr_address_spaces
    vm.kvm.memslots(0).generation = MMIO_SPTE_GEN_MASK + 1 - 2 * step
    vm.write_table(PT, DATA_GFN, NO_SLOT_GFN * PAGE | PTE)
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO
    _, spare = vm.host.mmap(2 * PAGE, RW)
    assert vm.set_region(2, 0, 100, 1, spare) == 0
    return vm, spare


def test_an_mmio_generation_wrap_zaps_every_shadow_page() -> None:
    vm, spare = _near_the_mmio_generation_wrap()
    gen = vm.mmu.mmu_valid_gen
    assert vm.set_region(3, 0, 101, 1, spare + PAGE) == 0  # the generation wraps to 0
    assert vm.kvm.memslots(0).generation & MMIO_SPTE_GEN_MASK == 0
    assert vm.mmu.mmu_valid_gen != gen  # kvm_mmu_zap_all_fast
    assert vm.violations() == []
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO


def test_an_mmu_that_misses_the_mmio_generation_wrap_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: no zap when the generation wraps. The old MMIO SPTE survives with a
    generation above the current one; 2^19 updates later it would be trusted again."""
    monkeypatch.setattr(ShadowMmu, "kvm_arch_memslots_updated", KvmArch.kvm_arch_memslots_updated)
    vm, spare = _near_the_mmio_generation_wrap()
    assert vm.set_region(3, 0, 101, 1, spare + PAGE) == 0
    assert any("outlived a wrap" in line for line in vm.violations())
