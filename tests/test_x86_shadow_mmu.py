"""The x86 shadow MMU: a CPL3 guest with 4-level page tables in guest memory reads and
writes through shadow pages; write-protection and emulation of guest page-table writes
(X6, FINDINGS 5.6); the fast zap and obsolete roots (X10, FINDINGS 5.4); cached roots on
CR3 switches; dirty logging; the N4 race; and a state machine that checks the rmaps,
parent_ptes, TLBs and the other shadow invariants after every step."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86.guest_access import Outcome, ShadowAccess, guest_instruction
from kvmspec.reference.x86.paging import PFERR_USER_MASK
from kvmspec.reference.x86.paging_tmpl import RetPf, fname_page_fault
from kvmspec.reference.x86.roots import kvm_set_cr3, vcpu_enter_guest
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import LEGACY_MASKS_HERE
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
from kvmspec.spec.invariants.x86 import check_shadow_mmu
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_X86_QUIRK_SLOT_ZAP_ALL
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
RW = PROT_READ | PROT_WRITE
P, W, U, A, D = 1, 2, 4, 0x20, 0x40
PTE = P | W | U | A | D
PML4, PML4_B, PDPT, PD, PT = 1, 5, 2, 3, 4
"""Table gfns in slot 0: two PML4s (two processes) sharing one PDPT, PD and PT."""
TABLE_PAGES = 8
DATA_GFN, DATA_PAGES = 16, 8
"""Slot 1: the data pages. The PT maps gva page i to gfn i for i < 8 (the tables
themselves, so the guest can write them) and gva page 16 + i to gfn 16 + i."""
NO_SLOT_GFN = 40


class ShadowVm:
    """One VM on the shadow MMU with the VMM's memory, two slots and two vCPUs."""

    def __init__(self, zap_all_quirk: bool = True) -> None:
        self.mmu = ShadowMmu(LEGACY_MASKS_HERE)
        self.kvm = Kvm(DEFAULT_PROFILE, self.mmu)
        if not zap_all_quirk:
            self.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL
        self.host = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.tables_hva = self.host.mmap(TABLE_PAGES * PAGE, RW)
        _, self.data_hva = self.host.mmap(DATA_PAGES * PAGE, RW)
        assert self.set_region(0, 0, 0, TABLE_PAGES, self.tables_hva) == 0
        assert self.set_region(1, 0, DATA_GFN, DATA_PAGES, self.data_hva) == 0
        self.data_base: int | None = DATA_GFN
        for pml4 in (PML4, PML4_B):
            self.write_table(pml4, 0, PDPT * PAGE | PTE)
        self.write_table(PDPT, 0, PD * PAGE | PTE)
        self.write_table(PD, 0, PT * PAGE | PTE)
        for i in range(TABLE_PAGES):
            self.write_table(PT, i, i * PAGE | PTE)
        for i in range(DATA_PAGES):
            self.write_table(PT, DATA_GFN + i, (DATA_GFN + i) * PAGE | PTE)
        for vcpu_id in (0, 1):
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0
            self.set_cr3(vcpu_id, PML4)

    def set_region(self, slot: int, flags: int, gfn: int, npages: int, hva: int) -> int:
        region = MemoryRegion(slot, flags, gfn * PAGE, npages * PAGE, hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def write_table(self, gfn: int, index: int, value: int) -> None:
        """The VMM writes a guest page-table entry (before the guest runs)."""
        assert (
            self.host.host_write(
                self.tables_hva + gfn * PAGE + 8 * index, value.to_bytes(8, "little")
            )
            == 0
        )

    def set_cr3(self, vcpu_id: int, pml4: int) -> None:
        kvm_set_cr3(self.kvm, self.mmu, self.mmu.vcpu_mmu(vcpu_id), pml4 * PAGE)

    def read(self, gva: int, size: int = 4, vcpu_id: int = 0) -> ShadowAccess:
        return guest_instruction(self.kvm, self.host, vcpu_id, gva, None, size)

    def write(self, gva: int, data: bytes, vcpu_id: int = 0) -> ShadowAccess:
        return guest_instruction(self.kvm, self.host, vcpu_id, gva, data)

    def guest_set_pte(self, index: int, value: int, vcpu_id: int = 0) -> ShadowAccess:
        """The guest rewrites entry ``index`` of its PT through its own mapping of it."""
        return self.write(PT * PAGE + 8 * index, value.to_bytes(8, "little"), vcpu_id)

    def violations(self) -> list[str]:
        return [str(v) for v in check_shadow_mmu(self.kvm, self.mmu, self.host)]


DATA_GVA = DATA_GFN * PAGE


def test_guest_and_host_see_the_same_memory_through_shadow_pages() -> None:
    vm = ShadowVm()
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
    vm = ShadowVm()
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
    vm = ShadowVm()
    vm.host.host_write(vm.data_hva, b"1111")
    vm.host.host_write(vm.data_hva + PAGE, b"2222")
    assert vm.read(DATA_GVA).data == b"1111"
    vm.write_table(PT, DATA_GFN, (DATA_GFN + 1) * PAGE | PTE)
    assert vm.read(DATA_GVA).data == b"1111"


def test_fast_zap_makes_every_root_obsolete_and_vcpus_drop_them() -> None:
    """X10 and FINDINGS 5.4: with KVM_X86_QUIRK_SLOT_ZAP_ALL, deleting any slot zaps every
    shadow page; each vCPU drops its obsolete root before it runs again."""
    vm = ShadowVm()
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
    vm = ShadowVm(zap_all_quirk=False)
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
    vm = ShadowVm()
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    root_a = vm.mmu.vcpu_mmu(0).root.sp
    vm.set_cr3(0, PML4_B)
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    root_b = vm.mmu.vcpu_mmu(0).root.sp
    assert root_b is not root_a and root_b is not None and root_b.gfn == PML4_B
    misses = vm.mmu.stat["mmu_cache_miss"]
    vm.set_cr3(0, PML4)
    assert vm.mmu.vcpu_mmu(0).root.sp is root_a  # from prev_roots, before any access
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.mmu.stat["mmu_cache_miss"] == misses
    assert vm.violations() == []


def test_dirty_logging_write_protects_and_logs_guest_writes() -> None:
    vm = ShadowVm()
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
    vm = ShadowVm()
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


# -- the state machine ---------------------------------------------------------------------

page_index = st.integers(0, DATA_PAGES - 1)


class ShadowMmuMachine(RuleBasedStateMachine):
    """Guest loads and stores on two vCPUs, guest PTE rewrites and writes to upper-level
    tables (emulated writes to write-protected tables, flooding), CR3 switches, host
    writes and MADV_DONTNEED (notifier invalidations), and DELETE, re-CREATE and MOVE of
    the data slot, with or without the zap-all quirk. After every step: the shadow
    invariants, and every guest load returns what the host holds at the gfn the guest's
    page tables name."""

    def __init__(self) -> None:
        super().__init__()
        self.vm = ShadowVm()

    @rule(quirk=st.booleans())
    def set_quirk(self, quirk: bool) -> None:
        if quirk:
            self.vm.kvm.disabled_quirks &= ~KVM_X86_QUIRK_SLOT_ZAP_ALL
        else:
            self.vm.kvm.disabled_quirks |= KVM_X86_QUIRK_SLOT_ZAP_ALL

    def expected_gfn(self, i: int) -> int | None:
        """The gfn the guest's PT maps gva page 16 + i to (None: not present)."""
        _, raw = self.vm.host.host_read(self.vm.tables_hva + PT * PAGE + 8 * (DATA_GFN + i), 8)
        pte = int.from_bytes(raw, "little")
        return (pte >> 12) & ((1 << 40) - 1) if pte & P else None

    def expected_hva(self, gfn: int) -> int | None:
        base = self.vm.data_base
        if base is None or not base <= gfn < base + DATA_PAGES:
            return None
        return self.vm.data_hva + (gfn - base) * PAGE

    @rule(vcpu=st.sampled_from([0, 1]), i=page_index, offset=st.integers(0, PAGE - 8))
    def guest_read(self, vcpu: int, i: int, offset: int) -> None:
        access = self.vm.read(DATA_GVA + i * PAGE + offset, 8, vcpu)
        gfn = self.expected_gfn(i)
        if gfn is None:
            assert access.outcome is Outcome.SHUTDOWN
            return
        hva = self.expected_hva(gfn)
        if hva is None:
            assert access.outcome is Outcome.MMIO
            return
        assert access.outcome is Outcome.DONE
        assert access.data == self.vm.host.host_read(hva + offset, 8)[1]

    @rule(vcpu=st.sampled_from([0, 1]), i=page_index, byte=st.integers(0, 255))
    def guest_write(self, vcpu: int, i: int, byte: int) -> None:
        access = self.vm.write(DATA_GVA + i * PAGE + byte, bytes([byte]), vcpu)
        gfn = self.expected_gfn(i)
        hva = self.expected_hva(gfn) if gfn is not None else None
        if hva is not None:
            assert access.outcome is Outcome.DONE
            assert self.vm.host.host_read(hva + byte, 1)[1] == bytes([byte])

    @rule(
        vcpu=st.sampled_from([0, 1]),
        i=page_index,
        to=st.sampled_from([*range(DATA_GFN, DATA_GFN + DATA_PAGES), NO_SLOT_GFN, None]),
        clean=st.booleans(),
    )
    def guest_remap(self, vcpu: int, i: int, to: int | None, clean: bool) -> None:
        flags = PTE & ~(A | D) if clean else PTE
        value = 0 if to is None else to * PAGE | flags
        assert self.vm.guest_set_pte(DATA_GFN + i, value, vcpu).outcome is Outcome.DONE

    @rule(
        vcpu=st.sampled_from([0, 1]),
        table=st.sampled_from([PML4, PDPT, PD]),
        index=st.integers(100, 103),
    )
    def guest_clear_unused_upper_entries(self, vcpu: int, table: int, index: int) -> None:
        """The guest clears three unused entries of an upper-level table: emulated
        writes, and the third in a row without a fault through the page is flooding, which
        zaps the whole shadow page (and unlinks everything below it)."""
        for entry in range(index, index + 3):
            access = self.vm.write(table * PAGE + 8 * entry, bytes(8), vcpu)
            assert access.outcome is Outcome.DONE

    @rule(vcpu=st.sampled_from([0, 1]), pml4=st.sampled_from([PML4, PML4_B]))
    def switch_cr3(self, vcpu: int, pml4: int) -> None:
        self.vm.set_cr3(vcpu, pml4)

    @rule(i=page_index, data=st.binary(min_size=1, max_size=8))
    def host_write(self, i: int, data: bytes) -> None:
        assert self.vm.host.host_write(self.vm.data_hva + i * PAGE, data) == 0

    @rule(i=page_index, n=st.integers(1, 3))
    def madvise_dontneed(self, i: int, n: int) -> None:
        n = min(n, DATA_PAGES - i)
        assert self.vm.host.madvise_dontneed(self.vm.data_hva + i * PAGE, n * PAGE) == 0

    @rule(where=st.sampled_from([DATA_GFN, 64, None]))
    def change_data_slot(self, where: int | None) -> None:
        """CREATE, DELETE or MOVE the data slot (same host memory throughout)."""
        npages = 0 if where is None else DATA_PAGES
        gfn = where if where is not None else self.vm.data_base or DATA_GFN
        errno = self.vm.set_region(1, 0, gfn, npages, self.vm.data_hva)
        if errno == 0:
            self.vm.data_base = where

    @invariant()
    def shadow_invariants_hold(self) -> None:
        assert self.vm.violations() == []


TestShadowMmuMachine = ShadowMmuMachine.TestCase
