"""Huge SPTEs on the x86 shadow MMU: a guest 2 MiB page over a THP-backed hva gets a 2M leaf
(FINDINGS 5.4); dirty logging splits it and gives it back; the huge-page counts of a slot
(X8); seed 002's large SPTE that is write-protected, not dropped, when a page inside it
becomes a shadowed guest table, its seven-step scenario, and the planted bugs it names;
and the state machine of kvmspec.fuzz.x86_machine (huge layout): THP collapse and split, LOG
toggles and 2M guest mappings, every shadow invariant checked after each step; reclaim of
the THP, whole or split, and a fault that keeps its page reference caught by it."""

from __future__ import annotations

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.x86_harness import HPAGE, PAGE
from kvmspec.fuzz.x86_huge_harness import PML4_B, PML4_C, HugeHarness
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.x86 import guest_access, mmu_spte, page_track, paging_tmpl
from kvmspec.reference.x86.guest_access import Outcome
from kvmspec.reference.x86.lpage import SlotLpageInfo
from kvmspec.reference.x86.paging import PG_LEVEL_2M, PG_LEVEL_4K
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import (
    LEGACY_MASKS_HERE,
    is_mmu_writable_spte,
    is_writable_pte,
)
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET, KVM_MEM_LOG_DIRTY_PAGES


def test_a_guest_2m_page_over_a_thp_gets_a_2m_spte() -> None:
    """FINDINGS 5.4 (THP): a 2 MiB guest page over a THP-backed hva is one 2M SPTE."""
    vm = HugeHarness()
    assert vm.write(5 * PAGE, b"huge").outcome is Outcome.DONE
    leaf = vm.leaf(0, 5 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M and is_writable_pte(leaf[1])
    assert vm.host.host_read(vm.hva + 5 * PAGE, 4) == (0, b"huge")
    fixed = vm.mmu.stat["pf_fixed"]
    assert vm.read(300 * PAGE).outcome is Outcome.DONE  # the same leaf: no fault
    assert vm.mmu.stat["pf_fixed"] == fixed
    assert vm.violations() == []


def test_without_a_thp_the_guest_2m_page_is_mapped_4k_and_collapse_brings_it_back() -> None:
    vm = HugeHarness()
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
    vm = HugeHarness()
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


def shadow_gfn_4_on_vcpu_1(vm: HugeHarness) -> None:
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
    vm = HugeHarness()
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
    vm = HugeHarness()
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
    vm = HugeHarness()
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
    vm = HugeHarness()
    monkeypatch.setattr(page_track, "kvm_mmu_gfn_disallow_lpage", lambda *args: None)
    shadow_gfn_4_on_vcpu_1(vm)
    rules = {v.split(":")[0] for v in vm.violations()}
    assert {"X6", "X8"} <= rules


# -- the state machine (kvmspec.fuzz.x86_machine, the huge layout) -----------------------------

TestHugeMachine = x86_machine(DEFAULT_PROFILE, ("huge",)).TestCase


# -- reclaim of the THP behind the guest's 2 MiB page -----------------------------------------


def test_reclaim_swaps_the_whole_thp_out_once_idle_and_the_guest_refaults_it() -> None:
    """The guest used the THP, so reclaim's first look keeps it (KVM reports the 2M leaf
    young); the second swaps the whole THP out under one CLEAR invalidation (the 2M leaf
    goes); the guest's next load swaps its page back in and gets what it stored."""
    vm = HugeHarness()
    assert vm.write(20 * PAGE, b"keep").outcome is Outcome.DONE
    vm.reclaim(20)
    assert not vm.host.swap and vm.leaf(0, 20 * PAGE) is not None
    vm.reclaim(20)
    assert len(vm.host.swap) == 512 and vm.leaf(0, 20 * PAGE) is None
    vm.check()
    vm.guest_read(0, 20, 0)
    vm.check()
    assert vm.read(20 * PAGE).data[:4] == b"keep"


def test_reclaim_of_a_split_thp_splits_the_folio_first() -> None:
    vm = HugeHarness()
    assert vm.write(20 * PAGE, b"keep").outcome is Outcome.DONE
    assert vm.host.split_huge_pmd(vm.hva)
    for _ in range(2):
        vm.reclaim(20)
    assert list(vm.host.swap) == [vm.hva + 20 * PAGE]
    vm.guest_read(1, 20, 0)
    vm.check()


def test_planted_fault_that_keeps_its_page_reference_is_caught_by_reclaim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted: the shadow MMU's fault never drops the reference it took on the page; a
    page KVM holds cannot be swapped out, and the harness says so."""
    monkeypatch.setattr(paging_tmpl, "kvm_release_faultin_page", lambda *args, **kw: None)
    vm = HugeHarness()
    assert vm.write(20 * PAGE, b"keep").outcome is Outcome.DONE
    vm.reclaim(20)
    vm.reclaim(20)
    with pytest.raises(RulesBroken, match="reclaiming page 20: busy"):
        vm.check()


_REAL_ENABLE_LOG_DIRTY_PT_MASKED = ShadowMmu.kvm_arch_mmu_enable_log_dirty_pt_masked


def _clear_without_the_huge_leaves(
    self: ShadowMmu, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
) -> None:
    """Planted: CLEAR_DIRTY_LOG write-protects the 4K leaves of the pages it clears but, under
    INITIALLY_SET, not the huge leaves over them (the real code, told INITIALLY_SET is off)."""
    saved = kvm.manual_dirty_log_protect
    kvm.manual_dirty_log_protect = saved & ~KVM_DIRTY_LOG_INITIALLY_SET
    try:
        _REAL_ENABLE_LOG_DIRTY_PT_MASKED(self, kvm, slot, gfn_offset, mask)
    finally:
        kvm.manual_dirty_log_protect = saved


def _log_with_initially_set(vm: HugeHarness) -> None:
    """The guest writes in its 2M page, then the VMM logs the slot under INITIALLY_SET: the
    2M leaf stays writable, which D1 allows while all 512 of its pages are reported."""
    vm.guest_write(0, 20, 7)
    vm.manual_protect_initially_set()
    vm.toggle_log(True)
    leaf = vm.leaf(0, 20 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_2M and is_writable_pte(leaf[1])
    vm.check()


def test_initially_set_keeps_the_2m_leaf_writable_until_a_clear_reaches_it() -> None:
    """D5 and D1: under INITIALLY_SET enabling logging protects nothing; the first CLEAR of
    pages in the 2M page write-protects its leaf, so the next write there faults, maps 4K
    and is logged. A GET reports it; the pages never cleared are still reported too."""
    vm = HugeHarness()
    _log_with_initially_set(vm)
    vm.clear_dirty_log(20)  # pages 0..63
    leaf = vm.leaf(0, 20 * PAGE)
    assert leaf is not None and not is_writable_pte(leaf[1])
    vm.check()
    vm.guest_write(0, 30, 9)
    leaf = vm.leaf(0, 30 * PAGE)
    assert leaf is not None and leaf[0] == PG_LEVEL_4K and is_writable_pte(leaf[1])
    vm.check()
    errno, bitmap = run_to_completion(kvm_get_dirty_log_protect(vm.kvm, 0))
    assert errno == 0 and bitmap[0] == 1 << 30 and bitmap[1] == (1 << 64) - 1


def test_a_clear_that_leaves_the_2m_leaf_writable_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """D1 reports the pages the CLEAR made clean under a leaf that still lets the guest write
    them without a fault: the writes would never be reported."""
    monkeypatch.setattr(
        ShadowMmu, "kvm_arch_mmu_enable_log_dirty_pt_masked", _clear_without_the_huge_leaves
    )
    vm = HugeHarness()
    _log_with_initially_set(vm)
    vm.clear_dirty_log(20)
    with pytest.raises(RulesBroken, match="D1: gfn 0x0 of logged slot 0 writable, not recorded"):
        vm.check()


def test_the_x86_machine_finds_a_clear_that_leaves_the_2m_leaf_writable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine reaches the planted CLEAR on its own: INITIALLY_SET, logging on
    over a writable 2M leaf, then a CLEAR of pages under it."""
    monkeypatch.setattr(
        ShadowMmu, "kvm_arch_mmu_enable_log_dirty_pt_masked", _clear_without_the_huge_leaves
    )
    machine = x86_machine(DEFAULT_PROFILE, ("huge",))
    with pytest.raises(RulesBroken, match="D1"):
        run_state_machine_as_test(machine, settings=bug_hunt(4000))
