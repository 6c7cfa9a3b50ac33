"""Seed 004 on the x86 shadow MMU: KVM's private pages are ordinary, unpinned pages of the
VMM's memory, so the host can migrate them; the notifier zaps what maps them, the next
access faults the new page in, and the APIC-access page's host address, which the VMCS
holds, is reloaded by every vCPU before it next enters the guest.

The checker is check_apic_access_addr of spec/invariants/x86.py (run by check_shadow_mmu
after every action of the x86 harness): no private page is pinned (S004-NOT-PINNED), and
no vCPU without a pending reload holds an APIC-access address other than the page the host
maps now (S004-APIC-ACCESS-RELOAD). Planted bugs show it catches a notifier that forgets
the reload request and a vCPU that drops the request without reloading."""

from __future__ import annotations

import random
from errno import EBUSY, EEXIST

import pytest

from kvmspec.fuzz import fuzz_x86
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.seed_bugs import unmap_without_reload
from kvmspec.fuzz.x86_harness import (
    APIC_GFN,
    APIC_GVA,
    DATA_GFN,
    DATA_GVA,
    PAGE,
    PTE,
    ShadowHarness,
)
from kvmspec.fuzz.x86_layouts import LAYOUTS
from kvmspec.reference.concurrency import Preempt
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.x86 import roots
from kvmspec.reference.x86.apic_access import (
    KVM_REQ_APIC_PAGE_RELOAD,
    VMX_EPT_IDENTITY_PAGETABLE_ADDR,
    init_rmode_identity_map,
    vmx_set_apic_access_page_addr,
)
from kvmspec.reference.x86.guest_access import Outcome
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import is_last_spte, is_shadow_present_pte, spte_to_pfn
from kvmspec.spec.invariants.x86 import check_apic_access_addr


def _leaf_pfn(vm: ShadowHarness, vcpu: int, gva: int) -> int | None:
    """The pfn the vCPU's shadow tables map ``gva`` to (None: no present leaf)."""
    sp = vm.mmu.vcpu_mmu(vcpu).root.sp
    while sp is not None:
        spte = sp.spt.get((gva >> (12 + 9 * (sp.role.level - 1))) & 511, 0)
        if not is_shadow_present_pte(spte):
            return None
        if is_last_spte(spte, sp.role.level):
            return spte_to_pfn(spte)
        sp = vm.mmu.spte_to_child_sp(spte)
    return None


def _host_pfn(vm: ShadowHarness, hva: int) -> int:
    pte = vm.host.lookup(hva)
    assert pte is not None
    return pte.pfn


def _apic_addrs(vm: ShadowHarness) -> list[int | None]:
    return [vcpu_mmu.apic_access_addr for _, vcpu_mmu in sorted(vm.mmu.vcpus.items())]


def _rules(vm: ShadowHarness) -> set[str]:
    return {v.rule for v in check_apic_access_addr(vm.kvm, vm.mmu, vm.host)}


def test_seed_004_the_apic_access_page_migrates_and_vcpus_reload_it() -> None:
    vm = ShadowHarness()
    # The page is not faulted in until a vCPU first loads its address (on entry).
    assert vm.host.lookup(vm.apic_hva) is None
    assert vm.write(APIC_GVA + 9, b"\x09", vcpu_id=0).outcome is Outcome.DONE
    assert vm.read(APIC_GVA, 8, vcpu_id=1).outcome is Outcome.DONE
    vm.check()
    old = _host_pfn(vm, vm.apic_hva)
    assert _apic_addrs(vm) == [old * PAGE, old * PAGE]
    assert _leaf_pfn(vm, 0, APIC_GVA) == old
    assert vm.host.memory.pages[old].pins == 0

    assert vm.host.migrate_page(vm.apic_hva) == 0  # not pinned: it moves
    new = _host_pfn(vm, vm.apic_hva)
    assert new != old and old not in vm.host.memory.pages
    assert _leaf_pfn(vm, 0, APIC_GVA) is None  # the notifier zapped the SPTE
    assert all(KVM_REQ_APIC_PAGE_RELOAD in m.requests for m in vm.mmu.vcpus.values())
    vm.check()  # the old address is still in the VMCS, but a reload is pending

    # vCPU 0 enters: it reloads the address, refaults the gpa onto the new page.
    access = vm.read(APIC_GVA + 9, 1, vcpu_id=0)
    assert access.outcome is Outcome.DONE and access.data == b"\x09"  # the contents moved
    assert _apic_addrs(vm) == [new * PAGE, old * PAGE]
    assert KVM_REQ_APIC_PAGE_RELOAD not in vm.mmu.vcpu_mmu(0).requests
    assert KVM_REQ_APIC_PAGE_RELOAD in vm.mmu.vcpu_mmu(1).requests
    assert _leaf_pfn(vm, 0, APIC_GVA) == new
    vm.check()
    assert vm.write(APIC_GVA, b"\x42", vcpu_id=1).outcome is Outcome.DONE
    assert _apic_addrs(vm) == [new * PAGE, new * PAGE]
    assert vm.host.memory.read(new, 0, 1) == b"\x42"
    vm.check()


def test_seed_004_a_pinned_apic_page_blocks_migration_as_the_old_code_did() -> None:
    vm = ShadowHarness()
    vm.guest_read_apic(0, 0)
    vm.check()
    # What the code of the thread's time did: hold the page for good.
    errno, pfn = vm.host.pin_user_page(vm.apic_hva)
    assert errno == 0 and pfn == _host_pfn(vm, vm.apic_hva)
    assert vm.host.migrate_page(vm.apic_hva) == EBUSY
    assert _host_pfn(vm, vm.apic_hva) == pfn  # it stayed: hot-remove could not take it
    assert _rules(vm) == {"S004-NOT-PINNED"}
    with pytest.raises(RulesBroken, match="S004-NOT-PINNED"):
        vm.check()
    vm.host.unpin_user_page(pfn)
    assert vm.host.migrate_page(vm.apic_hva) == 0 and _host_pfn(vm, vm.apic_hva) != pfn
    assert _rules(vm) == set()


def test_a_notifier_that_forgets_the_apic_reload_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: kvm_unmap_gfn_range zaps the SPTEs but asks no vCPU to reload the
    APIC-access address. The vCPUs then enter with the old page's address."""

    vm = ShadowHarness()
    vm.guest_read_apic(0, 0)
    vm.guest_read_apic(1, 0)
    vm.check()
    old = _host_pfn(vm, vm.apic_hva)
    monkeypatch.setattr(ShadowMmu, "kvm_unmap_gfn_range", unmap_without_reload)
    vm.migrate_apic_page()
    with pytest.raises(RulesBroken, match="S004-APIC-ACCESS-RELOAD: vcpu 0"):
        vm.check()
    vm.guest_read_apic(0, 0)  # the memory access refaults fine; the VMCS does not follow
    assert vm.mmu.vcpu_mmu(0).apic_access_addr == old * PAGE
    assert _rules(vm) == {"S004-APIC-ACCESS-RELOAD"}


def test_a_vcpu_that_drops_the_reload_request_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: the vCPU takes KVM_REQ_APIC_PAGE_RELOAD off its list but does not load
    the new address. While the request is pending nothing is wrong yet; the entry that
    ignores it is."""
    vm = ShadowHarness()
    vm.guest_read_apic(0, 0)
    vm.check()
    old = _host_pfn(vm, vm.apic_hva)
    monkeypatch.setattr(roots, "kvm_vcpu_reload_apic_access_page", lambda kvm, host, vcpu: None)
    vm.migrate_apic_page()
    vm.check()  # requests pending
    vm.guest_read_apic(0, 0)
    assert vm.mmu.vcpu_mmu(0).apic_access_addr == old * PAGE
    with pytest.raises(RulesBroken, match="S004-APIC-ACCESS-RELOAD: vcpu 0 APIC_ACCESS_ADDR"):
        vm.check()


def test_an_apic_reload_during_an_invalidation_does_not_enter_the_guest() -> None:
    """A reload that meets an open invalidation of the page cannot trust the page it found:
    it asks for itself again, and the vCPU does not enter the guest; the access ends as
    RETRY (the vCPU would spin in KVM_RUN) until the invalidation ends."""
    vm = ShadowHarness()
    vm.guest_read_apic(0, 0)
    vm.check()
    vm.host.invalidate_start(vm.apic_hva, vm.apic_hva + PAGE, MmuNotifierEvent.CLEAR)
    assert vm.read(APIC_GVA, 8, vcpu_id=1).outcome is Outcome.RETRY
    assert KVM_REQ_APIC_PAGE_RELOAD in vm.mmu.vcpu_mmu(1).requests
    assert vm.mmu.vcpu_mmu(1).apic_access_addr is None  # never loaded
    vm.host.invalidate_end(vm.apic_hva, vm.apic_hva + PAGE, MmuNotifierEvent.CLEAR)
    vm.check()
    assert vm.read(APIC_GVA, 8, vcpu_id=1).outcome is Outcome.DONE
    assert vm.mmu.vcpu_mmu(1).apic_access_addr == _host_pfn(vm, vm.apic_hva) * PAGE
    vm.check()


def test_an_apic_reload_racing_a_migration_reloads_again() -> None:
    """The page moves between the reload's sequence snapshot and its lookup: the reload
    writes nothing and asks for itself again; the next entry loads the new page."""
    vm = ShadowHarness()
    vm.guest_read_apic(0, 0)
    vcpu_mmu = vm.mmu.vcpu_mmu(1)
    vcpu_mmu.requests.discard(KVM_REQ_APIC_PAGE_RELOAD)  # as vcpu_enter_guest does
    op = vmx_set_apic_access_page_addr(vm.kvm, vm.host, vcpu_mmu)
    assert isinstance(next(op), Preempt)  # the sequence is read
    assert vm.host.migrate_page(vm.apic_hva) == 0
    for _ in op:  # the page found, then mmu_lock: the sequence moved
        pass
    assert _apic_addrs(vm)[1] is None
    assert KVM_REQ_APIC_PAGE_RELOAD in vcpu_mmu.requests
    vm.check()
    vm.guest_read_apic(1, 0)
    assert _apic_addrs(vm)[1] == _host_pfn(vm, vm.apic_hva) * PAGE
    vm.check()


def test_x4_a_migrated_data_page_is_zapped_and_refaulted_not_changed_in_place() -> None:
    vm = ShadowHarness()
    vm.guest_write(0, 2, 7)
    vm.guest_read(1, 2, 0)
    vm.check()
    hva = vm.data_hva + 2 * PAGE
    old = _host_pfn(vm, hva)
    assert _leaf_pfn(vm, 0, DATA_GVA + 2 * PAGE) == old
    vm.migrate_page(2)
    new = _host_pfn(vm, hva)
    assert new != old
    assert _leaf_pfn(vm, 0, DATA_GVA + 2 * PAGE) is None  # zapped, not rewritten
    assert all(not m.tlb for m in vm.mmu.vcpus.values())  # and flushed
    assert not vm.kvm.warnings  # no X4 WARN: no present leaf changed pfn
    assert not any(KVM_REQ_APIC_PAGE_RELOAD in m.requests for m in vm.mmu.vcpus.values())
    vm.check()
    fixed = vm.mmu.stat["pf_fixed"]
    access = vm.read(DATA_GVA + 2 * PAGE + 7, 1, vcpu_id=0)
    assert access.outcome is Outcome.DONE and access.data == b"\x07"
    assert vm.mmu.stat["pf_fixed"] == fixed + 1  # the next access refaulted
    assert _leaf_pfn(vm, 0, DATA_GVA + 2 * PAGE) == new
    vm.check()


def test_seed_004_the_identity_map_is_not_pinned_and_is_refaulted_after_migration() -> None:
    """The EPT identity map needs nothing but the notifier: KVM keeps no address of it, the
    guest reaches it by guest-physical address. (The guest here maps it like data.)"""
    vm = ShadowHarness()
    assert init_rmode_identity_map(vm.kvm, vm.host, vm.mmu) == 0
    identity_gfn = VMX_EPT_IDENTITY_PAGETABLE_ADDR // PAGE
    vm.guest_set_pte(DATA_GFN, identity_gfn * PAGE | PTE)
    vm.invlpg(0, 0)
    first_pde = (0x1 | 0x2 | 0x4 | 0x20 | 0x40 | 0x80).to_bytes(4, "little")
    assert vm.read(DATA_GVA, 4).data == first_pde
    slot = vm.kvm.memslots(0).gfn_to_memslot(identity_gfn)
    assert slot is not None and slot.id > vm.profile.user_mem_slots  # a private slot
    old = _host_pfn(vm, slot.userspace_addr)
    assert _leaf_pfn(vm, 0, DATA_GVA) == old
    vm.check()
    addrs = _apic_addrs(vm)
    assert vm.host.migrate_page(slot.userspace_addr) == 0
    assert _leaf_pfn(vm, 0, DATA_GVA) is None
    assert _apic_addrs(vm) == addrs  # no reload: nothing holds the identity map's address
    assert KVM_REQ_APIC_PAGE_RELOAD not in vm.mmu.vcpu_mmu(0).requests
    vm.check()
    assert vm.read(DATA_GVA + 4 * 1023, 4).data == ((1023 << 22) | 0xE7).to_bytes(4, "little")
    assert _leaf_pfn(vm, 0, DATA_GVA) == _host_pfn(vm, slot.userspace_addr) != old
    vm.check()


def test_the_apic_access_page_is_a_private_slot_userspace_cannot_touch() -> None:
    vm = ShadowHarness()
    slot = vm.kvm.memslots(0).gfn_to_memslot(APIC_GFN)
    assert slot is not None and slot.npages == 1
    assert slot.id >= vm.profile.user_mem_slots
    # A user slot over the APIC page overlaps KVM's: EEXIST.
    assert vm.set_region(2, 0, APIC_GFN, 1, vm.data_hva) == EEXIST


def test_the_x86_fuzzer_finds_a_notifier_that_forgets_the_apic_reload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same planted bug, found by random inputs of fuzz/fuzz_x86.py in the shadow
    layout: any migration of the APIC-access page after a vCPU loaded it is enough."""

    monkeypatch.setattr(ShadowMmu, "kvm_unmap_gfn_range", unmap_without_reload)
    rng = random.Random(4)
    inputs = (bytes([LAYOUTS.index("shadow")]) + rng.randbytes(128) for _ in range(200))
    found = next((run for data in inputs if (run := fuzz_x86.run_input(data)).violations), None)
    assert found is not None, "200 random inputs did not find the missing APIC reload"
    assert any(v.startswith("S004-APIC-ACCESS-RELOAD") for v in found.violations), found
