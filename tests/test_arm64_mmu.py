"""The arm64 MMU glued to the generic layer (reference/arm64/mmu.py) and its fault path
(reference/arm64/fault.py), driven through the harness of kvmspec.fuzz.arm64_harness:
MMIO and injected aborts, READONLY slots, permission faults relaxed in place, pages while
dirty logging and blocks again after it, no block where the slot forbids one (A4), device
memory execute-never (A6), the notifier retry check, seed 001's emptied
kvm_arch_flush_shadow_all, and the state machine of kvmspec.fuzz.arm64_machine."""

from __future__ import annotations

import errno

import pytest

from kvmspec.fuzz import arm64_harness
from kvmspec.fuzz.arm64_harness import (
    DEVICE_SLOT,
    HPAGE,
    PAGE,
    SHIFTED_SLOT,
    THP_SLOT,
    Arm64Harness,
)
from kvmspec.fuzz.arm64_machine import arm64_machine
from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.seed_bugs import EmptiedFlushShadowAll
from kvmspec.reference import host_pages, kvm_main
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.arm64 import fault
from kvmspec.reference.arm64.descriptors import (
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    MT_S2_FWB_DEVICE_nGnRE,
    field_get,
)
from kvmspec.reference.arm64.fault import AbortOutcome
from kvmspec.reference.arm64.history import PteWrite, Tlbi
from kvmspec.reference.arm64.mmu import Arm64Mmu, Arm64MmuLocklessAging
from kvmspec.reference.arm64.s2_mmu import Stage2Features
from kvmspec.reference.concurrency import Preempt, run_to_completion
from kvmspec.reference.host import LEVEL_PMD, PROT_READ, PROT_WRITE
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import KvmGfnRange
from kvmspec.spec.invariants.arm64 import Leaf, stage2_leaves
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

THP_GPA = arm64_harness.THP_GPA


def leaf_at(vm: Arm64Harness, ipa: int) -> Leaf | None:
    assert vm.mmu.pgt is not None
    for leaf in stage2_leaves(vm.mmu.pgt):
        if leaf.ipa <= ipa < leaf.ipa + leaf.size:
            return leaf
    return None


def mapped_leaf(vm: Arm64Harness, ipa: int) -> Leaf:
    leaf = leaf_at(vm, ipa)
    assert leaf is not None, f"IPA {ipa:#x} is not mapped"
    return leaf


def huge_vm(split_chunk_size: int = 0) -> Arm64Harness:
    """A VM whose THP slot's first 2 MiB frame is a host huge page holding data."""
    vm = Arm64Harness(split_chunk_size=split_chunk_size)
    vm.host_write(THP_SLOT, 5, 0x55)
    assert vm.host.madvise_collapse(vm.thp_hva, HPAGE) == 0
    return vm


# -- kvm_handle_guest_abort: MMIO and injected aborts ----------------------------------------------


def test_no_slot_is_mmio_and_a_fetch_or_a_stage_1_walk_there_gets_an_abort() -> None:
    vm = Arm64Harness()
    hole = arm64_harness.HOLE_GPA
    assert vm.access(0, hole, "load").outcome is AbortOutcome.MMIO
    assert vm.access(0, hole, "store", b"x").outcome is AbortOutcome.MMIO
    assert vm.access(0, hole, "fetch").outcome is AbortOutcome.INJECT_PABT
    assert vm.access(0, hole, "s1ptw").outcome is AbortOutcome.INJECT_DABT
    vm.check()


def test_beyond_the_ipa_space_is_an_abort_and_beyond_parange_a_size_fault() -> None:
    vm = Arm64Harness()
    beyond = arm64_harness.UNBACKED["beyond_ipa"]
    assert vm.access(0, beyond, "load").outcome is AbortOutcome.INJECT_DABT
    assert vm.access(0, beyond, "fetch").outcome is AbortOutcome.INJECT_PABT
    far = arm64_harness.UNBACKED["beyond_pa"]
    assert vm.access(0, far, "store", b"x").outcome is AbortOutcome.INJECT_SIZE_FAULT
    vm.check()


def test_an_invalid_slot_is_mmio_while_it_is_deleted() -> None:
    vm = Arm64Harness()
    gpa, _ = vm.address(SHIFTED_SLOT, 3)
    vm.guest_read(0, SHIFTED_SLOT, 3, 0, "load")
    view = vm.views[SHIFTED_SLOT]
    region = MemoryRegion(SHIFTED_SLOT, 0, view.base_gfn * PAGE, 0, view.hva)
    op = kvm_main.kvm_vm_ioctl_set_memory_region(vm.kvm, region, 1)
    step = next(op)
    while not (isinstance(step, Preempt) and "mappings dropped" in step.point):
        step = op.send(None)
    slot = vm.kvm.memslots(0).gfn_to_memslot(gpa // PAGE)
    assert slot is not None and slot.invalid
    assert leaf_at(vm, gpa) is None  # flushed by kvm_arch_flush_shadow_memslot
    assert vm.access(0, gpa, "load").outcome is AbortOutcome.MMIO
    assert run_to_completion(op) == 0


def test_a_readonly_slot_maps_loads_read_only_and_a_store_is_mmio() -> None:
    vm = Arm64Harness()
    vm.place_shifted_slot(0, readonly=True)
    vm.host_write(SHIFTED_SLOT, 3, 0x33)
    gpa, hva = vm.address(SHIFTED_SLOT, 3)
    assert vm.access(0, gpa, "load").data[:1] == b"\x33"
    assert not mapped_leaf(vm, gpa).pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert vm.access(0, gpa, "store", b"\x44").outcome is AbortOutcome.MMIO
    assert hva is not None and vm.host_holds(hva, 1) == b"\x33"
    assert vm.access(0, gpa, "s1ptw").done  # a walk read of tables in ROM is mapped
    vm.check()


def test_an_address_the_host_does_not_map_is_efault() -> None:
    vm = Arm64Harness()
    vm.munmap(THP_SLOT, 7)
    gpa, _ = vm.address(THP_SLOT, 7)
    assert vm.access(1, gpa, "load").outcome is AbortOutcome.EFAULT
    vm.mprotect(THP_SLOT, 8, PROT_READ)
    assert vm.access(1, gpa + PAGE, "load").done
    assert vm.access(1, gpa + PAGE, "store", b"x").outcome is AbortOutcome.EFAULT
    vm.check()


def test_the_ipa_limit_at_memslot_creation_is_efault() -> None:
    vm = Arm64Harness()
    _, hva = vm.host.mmap(2 * PAGE, PROT_READ | PROT_WRITE)
    assert vm.set_region(5, 0, (1 << 40) - PAGE, 2, hva) == errno.EFAULT
    assert vm.set_region(5, 0, (1 << 40) - 2 * PAGE, 2, hva) == 0
    vm.check()


# -- user_mem_abort: permissions, block sizes, dirty logging ---------------------------------------


def _writes_to(vm: Arm64Harness, ipa: int) -> list[PteWrite]:
    assert vm.mmu.pgt is not None
    events = vm.mmu.pgt.mm_ops.history.events
    return [e for e in events if isinstance(e, PteWrite) and e.ipa <= ipa < e.ipa + e.size]


def test_a_permission_fault_relaxes_the_leaf_in_place() -> None:
    vm = Arm64Harness()
    vm.toggle_log(SHIFTED_SLOT)
    gpa, _ = vm.address(SHIFTED_SLOT, 3)
    vm.host_write(SHIFTED_SLOT, 3, 1)
    assert vm.access(0, gpa, "load").done  # logging: mapped read-only
    before = mapped_leaf(vm, gpa)
    assert not before.pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert vm.access(0, gpa, "store", b"\x02").done
    after = mapped_leaf(vm, gpa)
    last = _writes_to(vm, gpa)[-1]
    # One store to the same entry, from the read-only value to the writable one: no break.
    assert (last.before, last.after) == (before.pte, after.pte)
    assert after.pte == before.pte | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert vm.mmu.pgt is not None
    tlbi = vm.mmu.pgt.mm_ops.history.events[-1]
    assert isinstance(tlbi, Tlbi) and tlbi.kind == "vmid_ipa_nsh"
    assert vm.access(0, gpa, "fetch").done  # an exec permission fault: XN cleared in place
    assert not mapped_leaf(vm, gpa).pte & KVM_PTE_LEAF_ATTR_HI_S2_XN
    assert _writes_to(vm, gpa)[-1].before == after.pte
    vm.check()


def test_a_thp_is_mapped_by_a_block() -> None:
    vm = huge_vm()
    vm.guest_read(0, THP_SLOT, 5, 0, "load")
    leaf = mapped_leaf(vm, THP_GPA + 5 * PAGE)
    assert (leaf.ipa, leaf.size) == (THP_GPA, HPAGE)
    vm.check()


def test_logging_maps_pages_and_blocks_come_back_when_it_stops() -> None:
    vm = huge_vm()
    vm.guest_read(0, THP_SLOT, 5, 0, "load")
    vm.toggle_log(THP_SLOT)
    block = mapped_leaf(vm, THP_GPA)
    assert block.size == HPAGE and not block.pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    vm.guest_store(0, THP_SLOT, 5, 9)
    assert mapped_leaf(vm, THP_GPA + 5 * PAGE).size == PAGE  # the block became a table
    vm.guest_read(1, THP_SLOT, 6, 0, "load")
    assert mapped_leaf(vm, THP_GPA + 6 * PAGE).size == PAGE
    vm.get_dirty_log(THP_SLOT)
    vm.check()
    vm.toggle_log(THP_SLOT)
    vm.guest_read(1, THP_SLOT, 7, 0, "load")
    leaf = mapped_leaf(vm, THP_GPA + 7 * PAGE)
    assert (leaf.ipa, leaf.size) == (THP_GPA, HPAGE)  # the table went, a block again
    vm.check()


def test_eager_splitting_turns_blocks_into_pages_when_logging_starts() -> None:
    vm = huge_vm(split_chunk_size=HPAGE)
    vm.guest_read(0, THP_SLOT, 5, 0, "load")
    vm.toggle_log(THP_SLOT)
    assert vm.mmu.pgt is not None
    leaves = [leaf for leaf in stage2_leaves(vm.mmu.pgt) if leaf.ipa < THP_GPA + HPAGE]
    assert len(leaves) == 512 and {leaf.size for leaf in leaves} == {PAGE}
    assert not any(leaf.pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W for leaf in leaves)
    vm.check()


def test_initially_set_logging_protects_and_splits_only_what_clear_clears() -> None:
    vm = Arm64Harness(split_chunk_size=HPAGE, dirty_mode="manual-initially-set")
    vm.host_write(THP_SLOT, 5, 0x55)
    assert vm.host.madvise_collapse(vm.thp_hva, HPAGE) == 0
    vm.guest_store(0, THP_SLOT, 5, 1)
    vm.toggle_log(THP_SLOT)
    block = mapped_leaf(vm, THP_GPA)
    assert block.size == HPAGE and block.pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W  # all dirty
    vm.clear_dirty_log(THP_SLOT, 0, 1 << 5)
    assert vm.mmu.pgt is not None
    leaves = [leaf for leaf in stage2_leaves(vm.mmu.pgt) if leaf.ipa < THP_GPA + HPAGE]
    assert {leaf.size for leaf in leaves} == {PAGE}  # split at the CLEAR
    # The whole block lost W before it was split: its other pages fault once more.
    assert not any(leaf.pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W for leaf in leaves)
    vm.guest_store(1, THP_SLOT, 5, 2)
    vm.guest_store(1, THP_SLOT, 70, 2)
    vm.get_dirty_log(THP_SLOT)
    vm.check()


class NoReprotect(Arm64Mmu):
    """A harvest or CLEAR that write-protects nothing again."""

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        KvmArch.kvm_arch_mmu_enable_log_dirty_pt_masked(self, kvm, slot, gfn_offset, mask)


@pytest.mark.parametrize("dirty_mode", ["bitmap", "manual"])
def test_a_harvest_that_reprotects_nothing_is_caught(dirty_mode: str) -> None:
    vm = Arm64Harness(mmu_class=NoReprotect, dirty_mode=dirty_mode)
    vm.toggle_log(THP_SLOT)
    vm.guest_store(0, THP_SLOT, 3, 7)
    vm.get_dirty_log(THP_SLOT)
    vm.clear_dirty_log(THP_SLOT, 0, 1 << 3)
    with pytest.raises(RulesBroken, match=r"D1: IPA .* is writable, page 3 clean"):
        vm.check()


@pytest.mark.parametrize("place", [0, 1])
def test_a_slot_incongruent_or_without_a_whole_block_never_gets_one(place: int) -> None:
    vm = Arm64Harness()
    vm.place_shifted_slot(place, readonly=False)
    region = vm.shifted_hva - PAGE
    for frame in (0, 1):
        vm.host.host_write(region + frame * HPAGE + 5 * PAGE, b"\x01")
        assert vm.host.madvise_collapse(region + frame * HPAGE, HPAGE) == 0
    for page in (0, 1, 300, 510, 511):
        vm.guest_read(0, SHIFTED_SLOT, page, 0, "load")
        gpa, hva = vm.address(SHIFTED_SLOT, page)
        assert hva is not None and vm.host.mapping_level(hva) == LEVEL_PMD
        assert mapped_leaf(vm, gpa).size == PAGE
    vm.check()


def test_an_access_flag_fault_sets_af_without_hardware_af() -> None:
    vm = Arm64Harness(features=Stage2Features(ha=False))
    vm.guest_store(0, THP_SLOT, 3, 7)
    gpa, _ = vm.address(THP_SLOT, 3)
    vm.age(THP_SLOT, 3, "clear_flush_young")
    assert not mapped_leaf(vm, gpa).pte & KVM_PTE_LEAF_ATTR_LO_S2_AF
    vm.guest_read(0, THP_SLOT, 3, 0, "load")  # the access-flag fault, then the load
    assert mapped_leaf(vm, gpa).pte & KVM_PTE_LEAF_ATTR_LO_S2_AF
    vm.check()


# -- device memory (A6) ----------------------------------------------------------------------------


def test_device_memory_is_mapped_execute_never_and_a_fetch_there_gets_an_abort() -> None:
    vm = Arm64Harness()
    vm.guest_store(0, DEVICE_SLOT, 1, 0x42)
    gpa, _ = vm.address(DEVICE_SLOT, 1)
    leaf = mapped_leaf(vm, gpa)
    assert field_get(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, leaf.pte) == MT_S2_FWB_DEVICE_nGnRE
    assert leaf.pte & KVM_PTE_LEAF_ATTR_HI_S2_XN
    assert vm.access(0, gpa, "fetch").outcome is AbortOutcome.INJECT_PABT
    assert mapped_leaf(vm, gpa) == leaf
    vm.guest_read(1, DEVICE_SLOT, 1, 0, "load")
    vm.check()


def test_dirty_logging_is_refused_for_device_memory() -> None:
    vm = Arm64Harness()
    view = vm.views[DEVICE_SLOT]
    flags = KVM_MEM_LOG_DIRTY_PAGES
    gpa = view.base_gfn * PAGE
    assert vm.set_region(DEVICE_SLOT, flags, gpa, view.npages, view.hva) == errno.EINVAL
    vm.check()


def test_device_memory_is_addressable_by_a_stage_2_descriptor() -> None:
    """The host model puts device pfns where a 48-bit output address reaches them, so the
    harness always has its device slot, and its leaves point at the device's own pfns."""
    vm = Arm64Harness()
    assert DEVICE_SLOT in vm.views
    assert (host_pages.DEVICE_PFN_BASE * PAGE) >> 48 == 0


# -- the notifier retry check (N4) -----------------------------------------------------------------


def test_a_fault_racing_an_invalidation_installs_nothing() -> None:
    vm = Arm64Harness()
    vm.host_write(SHIFTED_SLOT, 3, 0x11)
    vm.race_fault_with_dontneed(0, SHIFTED_SLOT, 3, 0x22)
    vm.check()
    gpa, _ = vm.address(SHIFTED_SLOT, 3)
    assert vm.access(0, gpa, "load").data[:1] == b"\x22"


def test_a_fault_path_without_the_retry_check_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fault, "mmu_invalidate_retry", lambda kvm, seq: False)
    vm = Arm64Harness()
    vm.host_write(SHIFTED_SLOT, 3, 0x11)
    vm.race_fault_with_dontneed(0, SHIFTED_SLOT, 3, 0x22)
    with pytest.raises(RulesBroken) as broken:
        vm.check()
    rules = {line.split(":")[0] for line in broken.value.violations}
    assert {"N4", "C-COHERENCE"} <= rules


# -- the checks of the harness catch planted bugs --------------------------------------------------


def test_seed_001_an_emptied_flush_shadow_all_is_caught() -> None:
    vm = Arm64Harness(mmu_class=EmptiedFlushShadowAll)
    vm.guest_store(0, THP_SLOT, 3, 7)
    vm.check()
    vm.release()
    with pytest.raises(RulesBroken, match="S001-FLUSH-ALL"):
        vm.check()


def test_seed_001_the_machine_finds_an_emptied_flush_shadow_all() -> None:
    machine = arm64_machine(mmu_classes=(EmptiedFlushShadowAll,))
    machine.TestCase.settings = bug_hunt(200)
    with pytest.raises(AssertionError, match="S001-FLUSH-ALL"):
        machine.TestCase().runTest()


def test_the_kernels_flush_shadow_all_destroys_the_stage_2() -> None:
    vm = Arm64Harness()
    vm.guest_store(0, THP_SLOT, 3, 7)
    pgt = vm.mmu.pgt
    assert pgt is not None
    pages = pgt.mm_ops.pages.values()
    vm.release()
    vm.check()
    assert all(page.freed for page in pages)  # every table, the PGD included
    assert vm.vms == 2


def test_a_fault_path_ignoring_the_slot_layout_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A4's memslot half: mapping a block whatever the slot's gpa and hva."""
    monkeypatch.setattr(fault, "fault_supports_stage2_huge_mapping", lambda *args: True)
    vm = Arm64Harness()
    region = vm.shifted_hva - PAGE
    vm.host.host_write(region + 5 * PAGE, b"\x01")
    assert vm.host.madvise_collapse(region, HPAGE) == 0
    vm.guest_read(0, SHIFTED_SLOT, 5, 0, "load")
    with pytest.raises(RulesBroken, match=r"A4: block .* not congruent"):
        vm.check()


def test_a_write_fault_that_logs_nothing_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fault, "mark_page_dirty_in_slot", lambda *args: None)
    vm = Arm64Harness()
    vm.toggle_log(THP_SLOT)
    vm.guest_store(0, THP_SLOT, 3, 7)
    with pytest.raises(RulesBroken, match=r"D1: .* writable, page 3 clean"):
        vm.check()


class NoMemslotTlbFlush(Arm64Mmu):
    """Write-protection for logging that never flushes the slot's TLB entries (A7)."""

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        KvmArch.kvm_flush_remote_tlbs_memslot(self, kvm, slot)


def test_write_protection_without_the_callers_flush_is_caught() -> None:
    vm = Arm64Harness(mmu_class=NoMemslotTlbFlush)
    vm.guest_store(0, THP_SLOT, 3, 7)
    vm.toggle_log(THP_SLOT)
    with pytest.raises(RulesBroken, match="A7: vcpu 0 TLB holds IPA"):
        vm.check()


class NoSlotFlush(Arm64Mmu):
    """DELETE and MOVE that leave the slot's stage-2 mappings behind."""

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        KvmArch.kvm_arch_flush_shadow_memslot(self, kvm, slot)


def test_a_delete_that_flushes_nothing_is_caught() -> None:
    vm = Arm64Harness(mmu_class=NoSlotFlush)
    vm.guest_read(0, SHIFTED_SLOT, 3, 0, "load")
    vm.place_shifted_slot(None, readonly=False)
    with pytest.raises(RulesBroken, match="M13: IPA"):
        vm.check()


def test_flushing_a_slot_unmaps_that_slot_only() -> None:
    vm = Arm64Harness()
    vm.guest_read(0, SHIFTED_SLOT, 3, 0, "load")
    vm.guest_read(0, THP_SLOT, 3, 0, "load")
    moved_from, _ = vm.address(SHIFTED_SLOT, 3)
    vm.place_shifted_slot(1, readonly=False)
    assert leaf_at(vm, moved_from) is None
    assert leaf_at(vm, THP_GPA + 3 * PAGE) is not None
    vm.check()


# -- aging: v6.18 under mmu_lock, seed 001's proposal without it -----------------------------------


@pytest.mark.parametrize("mmu_class", [Arm64Mmu, Arm64MmuLocklessAging])
def test_aging_clears_af_with_or_without_mmu_lock(mmu_class: type[Arm64Mmu]) -> None:
    vm = Arm64Harness(mmu_class=mmu_class)
    vm.guest_store(0, THP_SLOT, 3, 7)
    gpa, _ = vm.address(THP_SLOT, 3)
    vm.age(THP_SLOT, 3, "clear_young")
    last = _writes_to(vm, gpa)[-1]
    assert last.before & ~last.after == KVM_PTE_LEAF_ATTR_LO_S2_AF
    assert last.shared is mmu_class.lockless_aging
    assert mmu_class.lockless_aging is (mmu_class is Arm64MmuLocklessAging)
    vm.check()


ORDERS = [(), (0, 0, 0, 0, 1, 1, 1, 1), (1, 0) * 20, (2, 1, 0, 3) * 10, (3, 3, 3, 0, 1, 2) * 6]


@pytest.mark.parametrize("mmu_class", [Arm64Mmu, Arm64MmuLocklessAging])
@pytest.mark.parametrize("logging", [False, True])
def test_faults_the_hardware_and_lockless_aging_interleaved_keep_every_rule(
    mmu_class: type[Arm64Mmu], logging: bool
) -> None:
    """Two faults under the read side of mmu_lock, a hardware store and (with seed 001's
    ager) aging without the lock, stepped in several orders over pages of one block."""
    vm = huge_vm()
    if logging:
        vm.guest_read(0, THP_SLOT, 5, 0, "load")
        vm.toggle_log(THP_SLOT)  # the block is write-protected: stores fault on it
    for order in ORDERS:
        vm.interleave(order, 5, 6, store=True)
        vm.check()
        vm.interleave(order, 7, 5, store=False)
        vm.check()
    vm.get_dirty_log(THP_SLOT)
    vm.check()


class AgingReportsNothing(Arm64MmuLocklessAging):
    """A lockless ager that clears the access flags and reports every page idle."""

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_age_gfn(kvm, gfn_range)
        return False


def _use_age_use_age(vm: Arm64Harness) -> None:
    vm.guest_store(0, SHIFTED_SLOT, 3, 7)
    vm.age(SHIFTED_SLOT, 3, "clear_flush_young")  # young: the host's own bit too
    vm.check()
    vm.guest_read(1, SHIFTED_SLOT, 3, 0, "load")  # only the stage 2 sees this one
    vm.age(SHIFTED_SLOT, 3, "clear_flush_young")


@pytest.mark.parametrize("mmu_class", [Arm64Mmu, Arm64MmuLocklessAging])
def test_a_page_the_guest_used_since_its_last_aging_is_young(mmu_class: type[Arm64Mmu]) -> None:
    vm = Arm64Harness(mmu_class=mmu_class)
    _use_age_use_age(vm)
    vm.check()


def test_collapsing_a_huge_page_again_keeps_a_clear_without_flush_loose() -> None:
    """A false C-AGING report the arm64 machine found (bench run, this session): without
    hardware AF, clear_young cleared the block's AF but left the vCPU's TLB entry; a second
    MADV_COLLAPSE of the frame, already huge, changed nothing, yet the harness told the
    contract to forget the frame altogether, so the guest's load through the cached entry
    (no access-flag fault, AF stays clear) was judged by the next clear_flush_young."""
    vm = Arm64Harness(features=Stage2Features(ha=False))
    last = HPAGE // PAGE - 1  # the last page of frame 0
    vm.guest_store(0, THP_SLOT, 0, 1)
    vm.thp(THP_SLOT, 0, True)
    vm.guest_read(0, THP_SLOT, last, 0, "load")  # a 2 MiB block now maps the frame
    vm.age(THP_SLOT, 0, "clear_young")
    vm.thp(THP_SLOT, 0, True)  # huge already: no invalidation
    vm.guest_read(0, THP_SLOT, last, 0, "load")  # through the TLB
    vm.age(THP_SLOT, 0, "clear_flush_young")
    vm.check()


def test_an_ager_that_reports_every_page_idle_is_caught() -> None:
    vm = Arm64Harness(mmu_class=AgingReportsNothing)
    _use_age_use_age(vm)
    with pytest.raises(RulesBroken, match=r"C-AGING: host page .* used by a guest"):
        vm.check()


# -- the state machine -----------------------------------------------------------------------------


def test_the_arm64_machine_runs_clean() -> None:
    """Both MMUs, with and without hardware AF and eager splitting, under the project's
    Hypothesis profile (kvmspec-fast in the test suite)."""
    arm64_machine().TestCase().runTest()
