"""Huge SPTEs on the x86 shadow MMU: a guest 2 MiB page over a THP-backed hva gets a 2M leaf
(FINDINGS 5.4); dirty logging splits it and gives it back; the huge-page counts of a slot
(X8); seed 002's large SPTE that is write-protected, not dropped, when a page inside it
becomes a shadowed guest table, its seven-step scenario, and the planted bugs it names;
and a state machine with THP collapse and split, LOG toggles and 2M guest mappings that
checks every shadow invariant after each step."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86 import guest_access, mmu_spte, page_track
from kvmspec.reference.x86.guest_access import Outcome, ShadowAccess, guest_instruction
from kvmspec.reference.x86.lpage import SlotLpageInfo
from kvmspec.reference.x86.mmu_page import KvmMmuPage
from kvmspec.reference.x86.paging import PG_LEVEL_2M, PG_LEVEL_4K
from kvmspec.reference.x86.roots import kvm_set_cr3
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import (
    LEGACY_MASKS_HERE,
    is_large_pte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
)
from kvmspec.spec.invariants.x86 import check_shadow_mmu
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
HPAGE = 512 * PAGE
RW = PROT_READ | PROT_WRITE
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
PTE = P | W | U | A | D
SLOT_PAGES = 1024
"""Slot 0: gpa 0, two 2M frames. Frame 0 is data; frame 1 holds most of the tables."""
PML4_A, PDPT_A, PD_A, PT, PT_SPLIT = 512, 513, 514, 515, 520
"""Process A: its PD maps gva [0, 2M) with one 2M page (gfn 0..511) and gva [2M, 4M)
with the PT, 4K by 4K onto frame 1 (so the guest can write its own tables)."""
PML4_B, PDPT_B, PD_B = 516, 517, 4
"""Process B maps the same, but its PD lives at gfn 4, inside A's 2M page (seed 002)."""
PML4_C, PDPT_C, PD_C = 518, 519, 8
"""Process C too, with its PD at gfn 8: writing gfn 8 writes the table on its own path
(seed 002, step 7)."""


def table_gva(gfn: int) -> int:
    """Where every process sees a table page: frame 1 through the PT, frame 0 directly."""
    return (gfn - 512) * PAGE + HPAGE if gfn >= 512 else gfn * PAGE


class HugeVm:
    """One VM on the shadow MMU, with a THP-capable slot and three guest processes."""

    def __init__(self) -> None:
        self.host = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
        self.mmu = ShadowMmu(LEGACY_MASKS_HERE, self.host)
        self.kvm = Kvm(DEFAULT_PROFILE, self.mmu)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        _, self.hva = self.host.mmap(SLOT_PAGES * PAGE, RW)
        assert self.hva % HPAGE == 0
        assert self.host.madvise_hugepage(self.hva, SLOT_PAGES * PAGE) == 0
        assert self.set_flags(0) == 0
        for pml4, pdpt, pd in (
            (PML4_A, PDPT_A, PD_A),
            (PML4_B, PDPT_B, PD_B),
            (PML4_C, PDPT_C, PD_C),
        ):
            self.write_table(pml4, 0, pdpt * PAGE | PTE)
            self.write_table(pdpt, 0, pd * PAGE | PTE)
            self.write_table(pd, 0, PTE | PS)  # gva [0, 2M) -> gfn 0..511, one 2M page
            self.write_table(pd, 1, PT * PAGE | PTE)
        for i in range(512):
            self.write_table(PT, i, (512 + i) * PAGE | PTE)
            self.write_table(PT_SPLIT, i, i * PAGE | PTE)
        assert self.host.madvise_collapse(self.hva, HPAGE) == 0  # frame 0 becomes a THP
        for vcpu_id in (0, 1):
            assert kvm_vm_ioctl_create_vcpu(self.kvm, vcpu_id) == 0
            self.set_cr3(vcpu_id, PML4_A)

    def set_flags(self, flags: int) -> int:
        region = MemoryRegion(0, flags, 0, SLOT_PAGES * PAGE, self.hva)
        return run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))

    def write_table(self, gfn: int, index: int, value: int) -> None:
        data = value.to_bytes(8, "little")
        assert self.host.host_write(self.hva + gfn * PAGE + 8 * index, data) == 0

    def set_cr3(self, vcpu_id: int, pml4: int) -> None:
        kvm_set_cr3(self.kvm, self.mmu, self.mmu.vcpu_mmu(vcpu_id), pml4 * PAGE)

    def read(self, gva: int, vcpu_id: int = 0) -> ShadowAccess:
        return guest_instruction(self.kvm, self.host, vcpu_id, gva, None, 8)

    def write(
        self, gva: int, data: bytes, vcpu_id: int = 0, emulatable: bool = True
    ) -> ShadowAccess:
        return guest_instruction(
            self.kvm, self.host, vcpu_id, gva, data, rip=0x1000, emulatable=emulatable
        )

    def leaf(self, vcpu_id: int, gva: int) -> tuple[int, int] | None:
        """(level, SPTE) of the leaf the vCPU's shadow tables hold for ``gva``."""
        sp: KvmMmuPage | None = self.mmu.vcpu_mmu(vcpu_id).root.sp
        while sp is not None:
            spte = sp.spt.get((gva >> (12 + 9 * (sp.role.level - 1))) & 511, 0)
            if not is_shadow_present_pte(spte):
                return None
            if sp.role.level == PG_LEVEL_4K or is_large_pte(spte):
                return sp.role.level, spte
            sp = self.mmu.spte_to_child_sp(spte)
        return None

    def violations(self) -> list[str]:
        return [str(v) for v in check_shadow_mmu(self.kvm, self.mmu, self.host)]


def test_a_guest_2m_page_over_a_thp_gets_a_2m_spte() -> None:
    """FINDINGS 5.4 (THP): a 2 MiB guest page over a THP-backed hva is one 2M SPTE."""
    vm = HugeVm()
    assert vm.write(5 * PAGE, b"huge").outcome is Outcome.DONE
    leaf = vm.leaf(0, 5 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M and is_writable_pte(leaf[1])
    assert vm.host.host_read(vm.hva + 5 * PAGE, 4) == (0, b"huge")
    fixed = vm.mmu.stat["pf_fixed"]
    assert vm.read(300 * PAGE).outcome is Outcome.DONE  # the same leaf: no fault
    assert vm.mmu.stat["pf_fixed"] == fixed
    assert vm.violations() == []


def test_without_a_thp_the_guest_2m_page_is_mapped_4k_and_collapse_brings_it_back() -> None:
    vm = HugeVm()
    assert vm.host.split_huge_pmd(vm.hva)
    assert vm.read(5 * PAGE).outcome is Outcome.DONE
    assert vm.leaf(0, 5 * PAGE) == (PG_LEVEL_4K, vm.leaf(0, 5 * PAGE)[1])  # type: ignore[index]
    assert vm.violations() == []
    assert vm.host.madvise_collapse(vm.hva, HPAGE) == 0  # the notifier zaps the 4K leaf
    assert vm.leaf(0, 5 * PAGE) is None
    assert vm.read(5 * PAGE).outcome is Outcome.DONE
    leaf = vm.leaf(0, 5 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M
    assert vm.violations() == []


def test_dirty_logging_splits_the_huge_spte_and_stopping_it_recovers_it() -> None:
    """FINDINGS 5.4 (THP) and D4: LOG on write-protects the 2M SPTE; 16 writes map 16 4K
    SPTEs and are reported page by page; LOG off zaps them, and the next access maps 2M."""
    vm = HugeVm()
    assert vm.read(0).outcome is Outcome.DONE
    assert vm.set_flags(KVM_MEM_LOG_DIRTY_PAGES) == 0
    leaf = vm.leaf(0, 0)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M
    assert not is_writable_pte(leaf[1]) and is_mmu_writable_spte(LEGACY_MASKS_HERE, leaf[1])
    pages = [3 * i + 1 for i in range(16)]
    for page in pages:
        assert vm.write(page * PAGE, b"d").outcome is Outcome.DONE
        assert vm.violations() == []
    assert all(vm.leaf(0, page * PAGE) is not None for page in pages)
    assert {vm.leaf(0, page * PAGE)[0] for page in pages} == {PG_LEVEL_4K}  # type: ignore[index]
    errno, bitmap = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))
    assert errno == 0 and bitmap[0] == sum(1 << page for page in pages)
    assert vm.set_flags(0) == 0
    assert all(vm.leaf(0, page * PAGE) is None for page in pages)
    assert vm.write(7 * PAGE, b"h").outcome is Outcome.DONE
    leaf = vm.leaf(0, 7 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M and is_writable_pte(leaf[1])
    assert vm.violations() == []


def test_lpage_info_of_misaligned_and_incongruent_slots() -> None:
    """X8's layout part: a slot's first and last frame are disallowed when not whole, and
    every frame when its gpa and hva disagree modulo the size (set to 1, not added)."""
    info = SlotLpageInfo(base_gfn=1, npages=1024, userspace_addr=HPAGE + PAGE)
    assert [info.disallow_lpage(PG_LEVEL_2M, i) for i in range(3)] == [1, 0, 1]
    assert info.disallow_lpage(3, 0) == 1  # the one 1G frame is both head and tail
    aligned = SlotLpageInfo(base_gfn=512, npages=1024, userspace_addr=HPAGE)
    assert [aligned.disallow_lpage(PG_LEVEL_2M, i) for i in range(2)] == [0, 0]
    incongruent = SlotLpageInfo(base_gfn=512, npages=1024, userspace_addr=HPAGE + PAGE)
    assert [incongruent.disallow_lpage(PG_LEVEL_2M, i) for i in range(2)] == [1, 1]


def shadow_gfn_4_on_vcpu_1(vm: HugeVm) -> None:
    """Process B on vCPU 1 reads gva 0: its PD, gfn 4, becomes a shadowed guest table."""
    vm.set_cr3(1, PML4_B)
    assert vm.read(0, vcpu_id=1).outcome is Outcome.DONE


def test_seed_002_large_spte_write_protect_makes_progress() -> None:
    """Seed 002, the seven steps: (1) a large read-write SPTE over gfn 0; (2) gfn 4 gets
    shadowed; (3) the large SPTE is write-protected, not dropped, and reads go on through
    it; (4) a write to gfn 4 faults; (5) the emulator fails; (6) gfn 4 is unshadowed and
    the write refaults: the large SPTE becomes writable again and the write completes.
    (7) When gfn 4 is a table on the writer's own path, the refault shadows it again
    ("goto 2"): the second failure at the same instruction and address is reported
    instead of retried. Every access ends within a bounded number of faults."""
    vm = HugeVm()
    assert vm.write(0, b"1").outcome is Outcome.DONE  # step 1
    large = vm.leaf(0, 4 * PAGE)
    assert large is not None and large[0] == PG_LEVEL_2M and is_writable_pte(large[1])
    shadow_gfn_4_on_vcpu_1(vm)  # step 2
    large = vm.leaf(0, 4 * PAGE)  # step 3
    assert large is not None and large[0] == PG_LEVEL_2M and not is_writable_pte(large[1])
    assert vm.leaf(1, 0) is not None and vm.leaf(1, 0)[0] == PG_LEVEL_4K  # type: ignore[index]
    assert vm.violations() == []
    fixed = vm.mmu.stat["pf_fixed"]
    assert vm.read(4 * PAGE).outcome is Outcome.DONE and vm.mmu.stat["pf_fixed"] == fixed
    emulated = vm.mmu.stat["pf_emulate"]
    data = (0x1234).to_bytes(8, "little")
    assert vm.write(4 * PAGE + 8 * 300, data, emulatable=False).outcome is Outcome.DONE  # 4-6
    assert vm.mmu.stat["pf_emulate"] == emulated + 1
    assert vm.host.host_read(vm.hva + 4 * PAGE + 8 * 300, 8) == (0, data)
    large = vm.leaf(0, 4 * PAGE)
    assert large is not None and large[0] == PG_LEVEL_2M and is_writable_pte(large[1])
    assert vm.violations() == []

    vm.set_cr3(0, PML4_C)  # step 7: C writes gfn 8, its own PD
    emulated = vm.mmu.stat["pf_emulate"]
    access = vm.write(8 * PAGE + 8 * 300, data, emulatable=False)
    assert access.outcome is Outcome.EMULATION_FAILED
    assert vm.mmu.stat["pf_emulate"] == emulated + 2  # one retry, then reported
    assert vm.violations() == []
    assert vm.write(8 * PAGE + 8 * 300, data).outcome is Outcome.DONE  # the emulator can
    assert vm.violations() == []


def test_seed_002_without_the_retry_guard_the_refault_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: every failed emulation unprotects and retries. Step 7 then loops for
    ever (shadow gfn 8, fault, fail, unprotect, refault...): no progress."""
    vm = HugeVm()
    monkeypatch.setattr(guest_access, "kvm_mmu_write_protect_fault", lambda *args: True)
    vm.set_cr3(0, PML4_C)
    with pytest.raises(AssertionError, match="no progress"):
        vm.write(8 * PAGE, bytes(8), emulatable=False)


def test_seed_002_a_large_spte_left_writable_over_a_shadowed_gfn_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug, the opposite of the lazy drop: shadowing gfn 4 neither drops nor
    write-protects the large SPTE over it (only 4K leaves are protected). X6 sees a
    writable mapping of a shadowed guest table."""
    vm = HugeVm()
    assert vm.write(0, b"1").outcome is Outcome.DONE
    monkeypatch.setattr(
        page_track,
        "kvm_mmu_slot_gfn_write_protect",
        lambda kvm, mmu, slot, gfn, level: mmu_spte.rmap_write_protect(
            kvm, mmu, slot, gfn, PG_LEVEL_4K, pt_protect=True
        ),
    )
    shadow_gfn_4_on_vcpu_1(vm)
    assert any(v.startswith("X6") for v in vm.violations())


def test_seed_002_shadowing_that_forgets_disallow_lpage_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: shadowing gfn 4 does not count against its 2M frame (as when the
    huge-page size was chosen before the tables were shadowed, the 2012 code). B's fault
    maps its own page table writable through a 2M leaf: X6 (a writable mapping of a
    shadowed table) and X8 (the frame's count misses the shadow page)."""
    vm = HugeVm()
    monkeypatch.setattr(page_track, "kvm_mmu_gfn_disallow_lpage", lambda *args: None)
    shadow_gfn_4_on_vcpu_1(vm)
    rules = {v.split(":")[0] for v in vm.violations()}
    assert {"X6", "X8"} <= rules


# -- the state machine ---------------------------------------------------------------------

data_page = st.integers(0, 511).filter(lambda i: i not in (PD_B, PD_C))


class HugeMachine(RuleBasedStateMachine):
    """Guest loads and stores in the 2M page on two vCPUs and three processes (B and C
    shadow tables inside it), emulated and failing stores to those tables, the guest
    switching its PD entry between the 2M page and a 4K table, THP collapse and split,
    MADV_DONTNEED, LOG toggles and harvests. After every step: every shadow invariant, and
    every load returns what the host holds."""

    def __init__(self) -> None:
        super().__init__()
        self.vm = HugeVm()

    @rule(vcpu=st.sampled_from([0, 1]), pml4=st.sampled_from([PML4_A, PML4_B, PML4_C]))
    def switch_cr3(self, vcpu: int, pml4: int) -> None:
        self.vm.set_cr3(vcpu, pml4)

    @rule(vcpu=st.sampled_from([0, 1]), i=data_page, offset=st.integers(0, PAGE - 8))
    def guest_read(self, vcpu: int, i: int, offset: int) -> None:
        access = self.vm.read(i * PAGE + offset, vcpu)
        assert access.outcome is Outcome.DONE
        assert access.data == self.vm.host.host_read(self.vm.hva + i * PAGE + offset, 8)[1]

    @rule(vcpu=st.sampled_from([0, 1]), i=data_page, byte=st.integers(0, 255))
    def guest_write(self, vcpu: int, i: int, byte: int) -> None:
        assert self.vm.write(i * PAGE + byte, bytes([byte]), vcpu).outcome is Outcome.DONE
        assert self.vm.host.host_read(self.vm.hva + i * PAGE + byte, 1)[1] == bytes([byte])

    @rule(
        vcpu=st.sampled_from([0, 1]),
        table=st.sampled_from([PD_B, PD_C]),
        entry=st.integers(100, 103),
        emulatable=st.booleans(),
    )
    def guest_write_table_in_the_huge_page(
        self, vcpu: int, table: int, entry: int, emulatable: bool
    ) -> None:
        """A store to an unused entry of B's or C's PD: emulated, or the emulator fails
        and KVM unprotects and retries (seed 002); it ends either way."""
        access = self.vm.write(table * PAGE + 8 * entry, bytes(8), vcpu, emulatable)
        assert access.outcome in (Outcome.DONE, Outcome.EMULATION_FAILED)

    @rule(vcpu=st.sampled_from([0, 1]), huge=st.booleans())
    def guest_remap_2m(self, vcpu: int, huge: bool) -> None:
        """Process A's PD entry 0: the 2M page, or a 4K table mapping the same gfns."""
        value = PTE | PS if huge else PT_SPLIT * PAGE | PTE
        access = self.vm.write(table_gva(PD_A), value.to_bytes(8, "little"), vcpu)
        assert access.outcome is Outcome.DONE

    @rule(collapse=st.booleans())
    def host_thp(self, collapse: bool) -> None:
        if collapse:
            self.vm.host.madvise_collapse(self.vm.hva, HPAGE)
        else:
            self.vm.host.split_huge_pmd(self.vm.hva)

    @rule(i=data_page)
    def host_khugepaged_or_dontneed(self, i: int) -> None:
        if i % 2:
            self.vm.host.khugepaged_scan(self.vm.hva)
        elif i not in range(0, 16):  # keep the tables inside the page
            assert self.vm.host.madvise_dontneed(self.vm.hva + i * PAGE, PAGE) == 0

    @rule(log=st.booleans())
    def toggle_log(self, log: bool) -> None:
        assert self.vm.set_flags(KVM_MEM_LOG_DIRTY_PAGES if log else 0) == 0

    @rule()
    def harvest(self) -> None:
        run_to_completion(kvm_get_dirty_log_protect(self.vm.kvm, 0))

    @invariant()
    def shadow_invariants_hold(self) -> None:
        assert self.vm.violations() == []


TestHugeMachine = HugeMachine.TestCase
