"""The x86 shadow MMU: a CPL3 guest with 4-level page tables in guest memory reads and
writes through shadow pages; write-protection and emulation of guest page-table writes
(X6, FINDINGS 5.6); MMIO SPTEs and their generations (X11); the fast zap and obsolete
roots (X10, FINDINGS 5.4); cached roots on CR3 switches; dirty logging; the N4 race; and
the state machine of kvmspec.fuzz.x86_machine (shadow layout), which checks the
rmaps, parent_ptes, TLBs and the other shadow invariants after every step."""

from __future__ import annotations

import pytest

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.x86_harness import (
    DATA_GFN,
    DATA_GVA,
    DATA_PAGES,
    HPAGE,
    NO_SLOT_GFN,
    NX,
    PAGE,
    PD,
    PML4,
    PML4_2,
    PT,
    PTE,
    RW,
    TABLE_PAGES,
    ShadowHarness,
    U,
    W,
)
from kvmspec.fuzz.x86_known_findings import SYNCED_STALE_MMIO
from kvmspec.fuzz.x86_layouts import make_harness
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import Preempt, run_to_completion
from kvmspec.reference.dirty_log import kvm_get_dirty_log_protect
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86 import (
    guest_access,
    page_track,
    paging_tmpl,
    roots,
    set_spte,
    unsync,
    zap,
)
from kvmspec.reference.x86.guest_access import Outcome, ShadowAccess, guest_invlpg
from kvmspec.reference.x86.mmio_spte import MMIO_SPTE_GEN_MASK, is_noslot_pfn, mark_mmio_spte
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    ShadowMmuState,
    SptePtr,
    kvm_mmu_page_set_access,
)
from kvmspec.reference.x86.paging import ACC_ALL, PFERR_USER_MASK
from kvmspec.reference.x86.paging_tmpl import KvmGuestMemory, fname_page_fault
from kvmspec.reference.x86.roots import vcpu_enter_guest
from kvmspec.reference.x86.set_spte import KvmPageFault, RetPf
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
from kvmspec.spec.invariants import Violation
from kvmspec.spec.invariants.x86 import TrustedMmioSpte
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
    """FINDINGS 5.6: the guest rewrites its own PDE; KVM catches the write (the PD's gfn is
    write-tracked, X6), emulates it, and the new mapping takes effect at once. (A PTE
    write goes another way: the PT goes unsync, see below.)"""
    vm = ShadowHarness()
    vm.host.host_write(vm.data_hva, b"1111")
    vm.host.host_write(vm.data_hva + PAGE, b"2222")
    spare_pt, mmio_pt = 9, 10  # two more PTs, as the PT but for data page 0
    for table, target in ((spare_pt, DATA_GFN + 1), (mmio_pt, NO_SLOT_GFN)):
        for i in range(TABLE_PAGES):
            vm.write_table(table, i, i * PAGE | PTE)
        vm.write_table(table, DATA_GFN, target * PAGE | PTE)
    assert vm.read(DATA_GVA).data == b"1111"

    def set_pde(value: int) -> None:
        assert vm.write(PD * PAGE, value.to_bytes(8, "little")).outcome is Outcome.DONE

    set_pde(spare_pt * PAGE | PTE)
    assert vm.mmu.stat["pf_emulate"] == 1 and vm.mmu.stat["mmu_pte_write"] == 1
    assert vm.read(DATA_GVA).data == b"2222"
    set_pde(mmio_pt * PAGE | PTE)
    access = vm.read(DATA_GVA)
    assert access.outcome is Outcome.MMIO and access.mmio is not None
    assert access.mmio.gpa == NO_SLOT_GFN * PAGE
    set_pde(0)
    assert vm.read(DATA_GVA).outcome is Outcome.SHUTDOWN  # the guest's own #PF
    # The MMIO translation cached through mmio_pt may live until the guest flushes the page
    # (these raw PDE writes are beyond the harness's record of what each vCPU may use).
    vm.invlpg(0, 0)
    assert vm.violations() == []


def test_a_guest_pte_write_unsyncs_the_table_until_the_guest_flushes() -> None:
    """X7: the guest's write to its (shadowed) PT is not emulated: the PT's shadow page goes
    unsync and the write goes straight to memory. The old translation lives on until the
    guest flushes: INVLPG syncs that one SPTE (the page stays unsync), a CR3 load syncs
    the whole page and write-protects its gfn again (X6)."""
    vm = ShadowHarness()
    vm.host.host_write(vm.data_hva, b"1111")
    vm.host.host_write(vm.data_hva + PAGE, b"2222")
    assert vm.read(DATA_GVA).data == b"1111"
    assert vm.guest_set_pte(DATA_GFN, (DATA_GFN + 1) * PAGE | PTE).outcome is Outcome.DONE
    assert vm.mmu.stat["pf_emulate"] == 0 and vm.mmu.stat["mmu_unsync"] == 1
    (pt_sp,) = vm.mmu.shadow_pages(PT)
    root = vm.mmu.vcpu_mmu(0).root.sp
    assert pt_sp.unsync and root is not None and root.unsync_children == 1
    assert vm.violations() == []
    assert vm.read(DATA_GVA).data == b"1111"  # stale, as a real TLB may be
    guest_invlpg(vm.kvm, vm.host, 0, DATA_GVA)
    assert vm.read(DATA_GVA).data == b"2222"
    assert pt_sp.unsync and vm.violations() == []
    assert vm.guest_set_pte(DATA_GFN, DATA_GFN * PAGE | PTE).outcome is Outcome.DONE
    assert vm.mmu.stat["pf_emulate"] == 0  # still unsync: still no exit
    vm.set_cr3(0, PML4)  # the same CR3: still a flush, and a sync
    assert vm.read(DATA_GVA).data == b"1111"
    unsync = [sp for sp in vm.mmu.sp_by_pfn.values() if sp.unsync]
    assert unsync == [] and root.unsync_children == 0 and vm.mmu.stat["mmu_unsync"] == 0
    assert vm.violations() == []  # the PT's gfn is write-protected again
    assert vm.guest_set_pte(DATA_GFN, 0).outcome is Outcome.DONE
    assert vm.mmu.stat["mmu_unsync"] == 1 and vm.mmu.stat["pf_emulate"] == 0
    vm.set_cr3(0, PML4_2)  # another process: its root shares the PT, synced before use
    assert vm.read(DATA_GVA).outcome is Outcome.SHUTDOWN
    assert vm.violations() == []


def test_an_unsync_page_its_parents_do_not_know_of_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: kvm_unsync_page marks the page but not the links to it. check_unsync
    finds the missing bit; and the CR3 load, whose sync walks the bits, leaves the guest's
    new PTE unsynced, which the harness's coherence check finds too."""

    def unsync_without_parents(mmu: ShadowMmu, sp: KvmMmuPage) -> None:
        sp.unsync = True

    monkeypatch.setattr(page_track, "kvm_unsync_page", unsync_without_parents)
    vm = ShadowHarness()
    vm.host_write(1, 0x22, 8)
    vm.guest_read(0, 0, 0)
    vm.guest_remap(0, 0, DATA_GFN + 1, False)
    assert any("no bit set" in line for line in vm.violations())
    vm.switch_cr3(0, PML4)
    vm.guest_read(0, 0, 0)
    assert any(line.startswith("COHERENCE") for line in vm.found)


def _straddling_store(vm: ShadowHarness) -> None:
    """The PT made write-tracked (also shadowed as a directory), then a 4-byte store across
    the PTEs of data pages 2 and 3 that points page 3 at gfn DATA_GFN + 5."""
    for i in range(DATA_PAGES):
        vm.guest_read(0, i, 0)
    vm.guest_read_pt_as_pd(0, 100, 0, 0)
    vm.check()
    vm.guest_remap_straddling(0, 2, 5)


def test_a_store_across_two_guest_ptes_zaps_the_shadow_page() -> None:
    """detect_write_misaligned: KVM emulates the store (the PT is write-tracked) and, since it
    changes two guest PTEs, zaps every shadow page of the PT instead of one SPTE."""
    vm = ShadowHarness()
    _straddling_store(vm)
    assert vm.mmu.stat["mmu_flooded"] == 2  # the PT's page-table and directory shadows
    assert vm.expected_gfn(3) == DATA_GFN + 5
    vm.guest_read(1, 3, 0)
    vm.check()


def _misalignment_that_subtracts(gpa: int, nbytes: int) -> bool:
    """A planted detect_write_misaligned (a mutant mutmut makes): it subtracts the length,
    so a 4-byte store at offset 6 of a PTE looks aligned."""
    offset = gpa % PAGE
    if offset % 8 == 0 and nbytes == 1:
        return False
    return bool((offset ^ (offset - nbytes - 1)) & ~7) or nbytes < 4


def test_a_store_across_two_guest_ptes_taken_for_one_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the planted misalignment test KVM drops the first PTE's SPTE only, and the
    second page's SPTE still maps the old gfn: X6."""
    monkeypatch.setattr(zap, "detect_write_misaligned", _misalignment_that_subtracts)
    vm = ShadowHarness()
    _straddling_store(vm)
    with pytest.raises(RulesBroken, match=r"X6: .* maps gfn 0x13, the guest entry is 0x15067"):
        vm.check()


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
    vcpu_enter_guest(vm.kvm, vm.host, vm.mmu, vm.mmu.vcpu_mmu(1), KvmGuestMemory(vm.kvm, vm.host))
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
    vcpu_enter_guest(vm.kvm, vm.host, vm.mmu, vcpu_mmu, KvmGuestMemory(vm.kvm, vm.host))
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

TestShadowMmuMachine = x86_machine(DEFAULT_PROFILE, ("shadow",)).TestCase
TestMmioMachine = x86_machine(DEFAULT_PROFILE, ("mmio",)).TestCase
"""The mmio layout, as the campaign runs it: the known kernel finding passes, nothing else."""


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


def test_finding_a_sync_gives_a_stale_mmio_spte_the_current_generation() -> None:
    """A finding of the mmio layout's fuzzing (v6.18, MMIO caching on): an MMIO SPTE in an
    unsync PT outlives the creation of a slot over its gfn (a CREATE zaps nothing), stale
    as it should be. But the guest's next flush syncs the PT, and FNAME(sync_spte) remakes
    an MMIO SPTE whose guest PTE still names the same gfn (sync_mmio_spte, mark_mmio_spte)
    in the *current* generation, without asking whether the gfn has a slot now. From then
    on the fast path trusts it: the guest's accesses to RAM exit to the VMM as MMIO."""
    vm = ShadowHarness(mmio_caching=True)
    _, hva = vm.host.mmap(PAGE, RW)
    assert vm.host.host_write(hva, b"slot") == 0
    assert vm.read(DATA_GVA).outcome is Outcome.DONE
    assert vm.guest_set_pte(DATA_GFN, NO_SLOT_GFN * PAGE | PTE).outcome is Outcome.DONE
    (pt_sp,) = vm.mmu.shadow_pages(PT)
    assert pt_sp.unsync  # the PTE write went straight to memory
    guest_invlpg(vm.kvm, vm.host, 0, DATA_GVA)
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO  # an MMIO SPTE in the unsync PT
    assert vm.set_region(2, 0, NO_SLOT_GFN, 1, hva) == 0
    assert vm.violations() == []  # stale: it would be faulted into the new slot
    guest_invlpg(vm.kvm, vm.host, 0, DATA_GVA)  # the sync remakes it
    assert any("is trusted over" in line for line in vm.violations())
    access = vm.read(DATA_GVA)
    assert access.outcome is Outcome.MMIO and access.mmio is not None
    assert access.mmio.gpa == NO_SLOT_GFN * PAGE  # not b"slot": the VMM gets the access


def test_finding_a_stale_mmio_spte_passes_for_a_writable_leaf() -> None:
    """A finding of this model (v6.18, MMIO caching on; found by review of the prefetch
    model): with legacy SPTEs an MMIO SPTE keeps the guest's write right in bit 1, the
    writable bit. make_spte skips mmu_try_to_unsync_pages when the SPTE it replaces is a
    writable leaf, and at 4K any SPTE counts as a leaf (is_last_spte), so a stale MMIO SPTE
    passes for one. When its gfn has meanwhile got a slot and become a guest page table
    (shadowed, so write-protected: X6), the fault that replaces the MMIO SPTE maps that
    table writable; the guest's writes to it are then never seen, and the table's shadow
    page keeps translations the guest removed (leaves_follow_guest_ptes)."""
    vm = ShadowHarness(mmio_caching=True)
    vm.guest_remap(0, 0, NO_SLOT_GFN, False)
    vm.switch_cr3(0, PML4)
    assert vm.read(DATA_GVA).outcome is Outcome.MMIO  # an MMIO SPTE for gfn 40, W in bit 1
    _, hva = vm.host.mmap(PAGE, RW)  # gfn 40 gets a slot, holding a guest PT
    assert vm.host.host_write(hva, (DATA_GFN * PAGE | PTE).to_bytes(8, "little")) == 0
    assert vm.set_region(2, 0, NO_SLOT_GFN, 1, hva) == 0
    pde = (NO_SLOT_GFN * PAGE | PTE).to_bytes(8, "little")
    assert vm.write(PD * PAGE + 8 * 101, pde).outcome is Outcome.DONE
    assert vm.read(101 * HPAGE).outcome is Outcome.DONE  # gfn 40 is now a shadowed PT
    assert vm.violations() == []
    assert vm.read(DATA_GVA).outcome is Outcome.DONE  # replaces the stale MMIO SPTE
    assert any("maps shadowed guest table gfn 0x28 writable" in v for v in vm.violations())
    unmap = (0x1234 * PAGE | PTE).to_bytes(8, "little")
    assert vm.write(DATA_GVA, unmap).outcome is Outcome.DONE  # no exit: KVM never sees it
    assert any("the guest entry is 0x1234067" in v for v in vm.violations())


SYNC_FINDING_STEPS = (
    ("change_data_slot", (None,)),
    ("guest_write", (0, 0, 9)),  # an MMIO SPTE for gfn DATA_GFN
    ("change_data_slot", (DATA_GFN,)),  # stale now
    ("guest_remap_misaligned", (1, 0, DATA_GFN)),  # the PT goes unsync
    ("invlpg", (0, 0)),  # FNAME(sync_spte) remakes the MMIO SPTE in the current generation
    ("guest_read", (0, 0, 0)),  # the VMM gets the load
    ("guest_write", (1, 0, 7)),
)
"""test_finding_a_sync_gives_a_stale_mmio_spte_the_current_generation with the harness's
actions (the seed mmio-sync-finding-let-pass begins so)."""


def _fuzzers_mmio_harness(lines: list[str]) -> ShadowHarness:
    """The mmio layout's VM as the fuzzers build it (make_harness: the known findings pass),
    logging to ``lines``."""
    vm = make_harness("mmio", DEFAULT_PROFILE, lines.append)
    assert isinstance(vm, ShadowHarness)
    return vm


def _apply(vm: ShadowHarness, steps: tuple[tuple[str, tuple[int | None, ...]], ...]) -> None:
    for method, args in steps:
        getattr(vm, method)(*args)
        vm.check()


def test_the_fuzzers_let_the_sync_finding_pass() -> None:
    """The fuzzers' harness (make_harness) lets SYNCED_STALE_MMIO pass: the remade SPTE's
    X11 report, and the accesses through it that exit to the VMM, also once a later sync
    remakes it with the guest's new rights, until a MOVE zaps it. A harness built by a test
    reports both."""
    lines: list[str] = []
    vm = _fuzzers_mmio_harness(lines)
    _apply(vm, SYNC_FINDING_STEPS)
    assert any(
        line.startswith(f"known kernel finding, let pass: {SYNCED_STALE_MMIO}") for line in lines
    )
    assert any("is trusted over" in line for line in vm.violations())  # reported, let pass
    (remade,) = vm.known_findings.synced_stale_mmio_sptes().items()
    # Let pass by what the report is about (the SPTE), not by its words.
    reports = [v for v in vm.rule_violations() if v.rule == "X11"]
    assert [v.about for v in reports] == [TrustedMmioSpte(*remade)]
    assert vm.known_findings.unexplained(reports) == []
    same_words = Violation("X11", reports[0].message)
    assert vm.known_findings.unexplained([same_words]) == [same_words]
    _apply(vm, (("guest_restrict", (0, 0, W)), ("invlpg", (0, 0)), ("guest_read", (1, 0, 8))))
    (again,) = vm.known_findings.synced_stale_mmio_sptes().items()
    assert again[0] == remade[0] and again[1] != remade[1]  # remade without the write right
    vm.change_data_slot(64)
    vm.check()
    assert vm.known_findings.synced_stale_mmio_sptes() == {}
    strict = ShadowHarness(mmio_caching=True)
    for method, args in SYNC_FINDING_STEPS:
        getattr(strict, method)(*args)
    with pytest.raises(RulesBroken) as broken:
        strict.check()
    assert "X11" in str(broken.value)
    assert "COHERENCE" in str(broken.value)


def test_letting_the_sync_finding_pass_hides_no_trusted_stale_mmio_spte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug of test_an_mmu_that_trusts_every_mmio_spte_is_caught, on the fuzzers'
    harness: the stale MMIO SPTE was never in an unsync page, so it is no sync's doing and
    the load that exits to the VMM is reported."""
    monkeypatch.setattr(guest_access, "check_mmio_spte", lambda generation, spte: True)
    vm = _fuzzers_mmio_harness([])
    _apply(vm, (("change_data_slot", (None,)), ("guest_read", (0, 1, 0))))
    vm.change_data_slot(DATA_GFN)
    vm.guest_read(0, 1, 0)
    with pytest.raises(RulesBroken, match="COHERENCE"):
        vm.check()


def test_an_mmio_fast_path_that_caches_every_right_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: handle_mmio_page_fault caches all rights for the emulator instead of
    the MMIO SPTE's own. A store to a read-only page of a gfn without a slot then exits to
    the VMM; the guest's page tables make it the guest's own #PF."""
    monkeypatch.setattr(guest_access, "get_mmio_spte_access", lambda masks, spte: ACC_ALL)
    vm = _fuzzers_mmio_harness([])
    _apply(
        vm,
        (
            ("guest_remap", (0, 0, NO_SLOT_GFN, False)),
            ("guest_restrict", (0, 0, W)),
            ("invlpg", (0, 0)),
            ("guest_read", (0, 0, 0)),  # an MMIO SPTE without the write right
        ),
    )
    vm.guest_write(0, 0, 5)  # the fast path: the emulator checks the cached rights
    with pytest.raises(RulesBroken, match="COHERENCE"):
        vm.check()


def test_v6_18_mmio_spte_over_a_stale_present_spte_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """v6.18 as released made the MMIO SPTE before dropping a present one (fixed upstream by
    aad885e77496, for a VMM rewriting a shadowed gPTE). The mmio layout's fuzzing reaches it
    with guest writes alone: a PTE rewritten in an unsync PT leaves a present read-only
    SPTE; the guest's store through it faults, the walk finds a gfn without a slot, and
    the MMIO SPTE overwrites the present one: the kernel's WARN, and a leaked rmap entry."""
    fixed = set_spte.mmu_set_spte

    def v6_18_mmu_set_spte(
        kvm: Kvm,
        mmu: ShadowMmuState,
        slot: KvmMemorySlot | None,
        sptep: SptePtr,
        pte_access: int,
        gfn: int,
        pfn: int,
        fault: KvmPageFault | None,
        vcpu: KvmVcpu | None,
    ) -> RetPf:
        if is_noslot_pfn(pfn):
            mark_mmio_spte(kvm, mmu, sptep, gfn, pte_access)
            return RetPf.EMULATE
        return fixed(kvm, mmu, slot, sptep, pte_access, gfn, pfn, fault, vcpu)

    monkeypatch.setattr(paging_tmpl, "mmu_set_spte", v6_18_mmu_set_spte)
    vm = ShadowHarness(mmio_caching=True)
    vm.guest_read(0, 5, 0)  # a read-only SPTE for gva page 16 + 5
    vm.guest_remap(0, 5, NO_SLOT_GFN, False)  # unsync: straight to memory
    vm.guest_write(0, 5, 200)  # faults on the read-only SPTE
    found = vm.violations()
    assert any(line.startswith("X4: WARN: mmu_spte_set over present") for line in found)
    assert any(line.startswith("X1") for line in found)


def test_a_new_path_to_an_unsync_table_sees_its_current_entries() -> None:
    """guest_read_alias: the guest points another PD entry at its (unsync) PT, flushes the
    alias address and loads through it. KVM links the PT's existing shadow page and syncs
    it first (kvm_mmu_find_shadow_page), so the load sees the PT's new entry."""
    vm = ShadowHarness()
    vm.host_write(0, 0x11, 8)
    vm.host_write(1, 0x22, 8)
    vm.guest_read(0, 0, 0)
    vm.guest_remap(0, 0, DATA_GFN + 1, False)  # straight to memory: the PT is unsync
    (pt_sp,) = vm.mmu.shadow_pages(PT)
    assert pt_sp.unsync
    vm.guest_read_alias(0, 100, DATA_PAGES - 1, 0)
    assert pt_sp.unsync  # synced for the fault's sake, not write-protected again
    assert vm.mmu.shadow_pages(PT) == [pt_sp]  # the same shadow page, linked twice
    assert len(pt_sp.parent_ptes) == 2
    vm.check()


def test_linking_an_unsync_table_without_syncing_it_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: kvm_mmu_find_shadow_page hands out an unsync page as it is. The
    alias load then reads the old entry's page, which the flush forbids."""

    def no_sync(*args: object) -> int:
        return 0

    monkeypatch.setattr(roots, "kvm_sync_page", no_sync)
    vm = ShadowHarness()
    vm.host_write(0, 0x11, 8)
    vm.host_write(1, 0x22, 8)
    vm.guest_read(0, 0, 0)
    vm.guest_remap(0, 0, DATA_GFN + 1, False)
    vm.guest_read_alias(0, 100, DATA_PAGES - 1, 0)  # links the PT, then loads page 0
    with pytest.raises(RulesBroken, match="COHERENCE"):
        vm.check()


def test_a_table_used_as_an_upper_level_table_loses_its_unsync_page() -> None:
    """guest_read_pt_as_pd: the guest's PT is unsync when a PDPT entry makes it a page
    directory too. The PD-level shadow page of its gfn zaps the unsync one, and the load
    through the new path (the PT as PD, then as PT) sees the PT's current entry."""
    vm = ShadowHarness()
    vm.host_write(0, 0x11, 8)
    vm.host_write(1, 0x22, 8)
    vm.guest_read(0, 0, 0)
    vm.guest_remap(0, 0, DATA_GFN + 1, False)
    (unsync_sp,) = vm.mmu.shadow_pages(PT)
    assert unsync_sp.unsync
    vm.guest_read_pt_as_pd(0, 100, 0, 0)
    assert unsync_sp.role.invalid or unsync_sp not in vm.mmu.shadow_pages(PT)
    assert {sp.role.level for sp in vm.mmu.shadow_pages(PT)} == {1, 2}
    vm.check()


def test_an_unsync_page_kept_under_an_upper_level_page_of_its_gfn_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: kvm_mmu_find_shadow_page does not zap the gfn's unsync pages when
    it is looked up as an upper-level table. X7 reports the unsync page left behind."""
    monkeypatch.setattr(roots, "kvm_mmu_prepare_zap_page", lambda *args: False)
    vm = ShadowHarness()
    vm.host_write(0, 0x11, 8)
    vm.guest_read(0, 0, 0)
    vm.guest_remap(0, 0, DATA_GFN + 1, False)
    vm.guest_read_pt_as_pd(0, 100, 0, 0)
    with pytest.raises(RulesBroken, match=r"X7: .* is unsync, its gfn an upper-level table"):
        vm.check()


def test_a_store_straddling_two_guest_ptes_zaps_the_shadow_page() -> None:
    """guest_remap_misaligned: one 8-byte store rewrites halves of two PTEs of the PT,
    which is also a page directory (so its gfn is write-tracked and the store emulated).
    KVM zaps the gfn's shadow pages (detect_write_misaligned); after the guest's INVLPG the
    second page reads its new gfn."""
    vm = ShadowHarness()
    vm.host_write(1, 0x22, 8)
    vm.host_write(4, 0x44, 8)
    vm.guest_read(0, 1, 0)
    vm.guest_read_pt_as_pd(0, 100, 1, 0)
    pages = vm.mmu.shadow_pages(PT)
    assert {sp.role.level for sp in pages} == {1, 2} and not any(sp.unsync for sp in pages)
    emulated = vm.mmu.stat["pf_emulate"]
    vm.guest_remap_misaligned(0, 0, DATA_GFN + 4)
    assert vm.mmu.stat["pf_emulate"] == emulated + 1
    assert all(sp.role.invalid or sp not in vm.mmu.shadow_pages(PT) for sp in pages)
    vm.invlpg(0, 1)
    vm.guest_read(0, 1, 0)
    vm.check()


def test_a_straddling_store_taken_for_an_aligned_one_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: detect_write_misaligned says no. Only the PTE where the store starts
    loses its SPTE; the second keeps the old gfn, which the guest's INVLPG does not touch
    (the page is not unsync: KVM trusts it saw every write), so the load after the flush
    reads the old page."""
    monkeypatch.setattr(zap, "detect_write_misaligned", lambda gpa, nbytes: False)
    vm = ShadowHarness()
    vm.host_write(1, 0x22, 8)
    vm.host_write(4, 0x44, 8)
    vm.guest_read(0, 1, 0)
    vm.guest_read_pt_as_pd(0, 100, 1, 0)
    vm.guest_remap_misaligned(0, 0, DATA_GFN + 4)
    vm.invlpg(0, 1)
    vm.guest_read(0, 1, 0)
    with pytest.raises(RulesBroken, match="COHERENCE"):
        vm.check()


def _mask_blind_to_bit_3(gpa: int, nbytes: int) -> bool:
    """detect_write_misaligned with the PTE mask one off (~(PTE_SIZE + 1), not ~(PTE_SIZE -
    1)): blind to a store whose first and last bytes differ in bit 3 alone."""
    offset = gpa % PAGE
    if offset % 8 == 0 and nbytes == 1:
        return False
    return bool((offset ^ (offset + nbytes - 1)) & ~9) or nbytes < 4


def test_a_store_one_byte_before_a_pte_zaps_the_shadow_page() -> None:
    """guest_remap_off_by_one: the 8-byte store from the last byte of data page 0's PTE
    rewrites page 1's PTE but its top byte. Emulated (the PT is also a directory), it zaps
    the shadow page, and the next load of page 1 reads its new gfn."""
    vm = ShadowHarness()
    vm.host_write(5, 0x55, 8)
    vm.guest_read(0, 1, 0)
    vm.guest_read_pt_as_pd(0, 100, 1, 0)
    vm.guest_remap_off_by_one(0, 0, DATA_GFN + 5)
    assert not any(sp.role.level == 1 for sp in vm.mmu.shadow_pages(PT))
    vm.invlpg(0, 1)
    vm.guest_read(0, 1, 0)
    assert vm.read(DATA_GVA + PAGE).data == bytes([0x55]) * 4
    vm.check()


def test_a_misaligned_mask_blind_to_bit_3_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the mask misses that straddle (though not guest_remap_misaligned's), so only
    page 0's SPTE is dropped and page 1's keeps its old gfn (X6, at once)."""
    monkeypatch.setattr(zap, "detect_write_misaligned", _mask_blind_to_bit_3)
    vm = ShadowHarness()
    assert _mask_blind_to_bit_3(PT * PAGE + 8 * DATA_GFN + 4, 8)  # guest_remap_misaligned's
    vm.guest_read(0, 1, 0)
    vm.guest_read_pt_as_pd(0, 100, 1, 0)
    vm.guest_remap_off_by_one(0, 0, DATA_GFN + 5)
    with pytest.raises(RulesBroken, match=r"X6: SptePtr\(sp=<sp shadow L1 gfn 0x4"):
        vm.check()


def test_a_synced_leaf_that_no_longer_follows_its_guest_pte_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """leaves_follow_guest_ptes: the planted bug is kvm_mmu_track_write forgetting to drop
    the SPTE of an emulated guest PTE write. The PT is write-tracked (it is also a page
    directory), so KVM must see the write; the leaf still maps the old gfn, reported at
    once, before any guest access could show it."""
    vm = ShadowHarness()
    vm.host_write(1, 0x22, 8)
    vm.guest_read(0, 1, 0)
    vm.guest_read_pt_as_pd(0, 100, 1, 0)
    vm.check()
    monkeypatch.setattr(zap, "mmu_page_zap_pte", lambda *args: False)
    vm.guest_remap(0, 1, DATA_GFN + 5, False)
    assert any(line.startswith("X6: ") and "the guest entry is" in line for line in vm.violations())


def test_a_leaf_reset_in_place_keeps_the_gfn_of_its_rmap_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mmu_set_spte on a present leaf with the same pfn keeps its rmap entry, and so keeps
    the gfn the leaf answers for (kvm_mmu_page_set_access updates only the access). Data
    pages 0 and 1 (gfns 16 and 17) are both the host's zero page; the guest makes page 1 a
    supervisor page and then points it at gfn 16 in its unsync PT, and a user load from page
    1 refaults the present leaf: same pfn, new gfn in the guest entry. The model recorded the
    new gfn while the rmap kept the old one (X1), until the campaign found it (x86 machine,
    shadow layout)."""
    kept: list[tuple[int, int]] = []
    set_access = kvm_mmu_page_set_access

    def recording(sp: KvmMmuPage, index: int, access: int) -> None:
        set_access(sp, index, access)
        kept.append((sp.gfn, sp.shadowed_translation[index][0]))

    monkeypatch.setattr(set_spte, "kvm_mmu_page_set_access", recording)
    vm = ShadowHarness()
    vm.guest_read_alias(0, 100, 0, 0)
    vm.guest_restrict(0, 1, U)
    vm.guest_read_alias(0, 100, 0, 0)
    vm.guest_remap(0, 1, DATA_GFN, False)
    vm.guest_read(0, 1, 0)
    vm.check()
    assert DATA_GFN + 1 in [gfn for _, gfn in kept]
    vm.switch_cr3(0, PML4)  # the sync compares the gfns and drops the leaf
    vm.guest_read(0, 1, 0)
    vm.check()


def test_a_right_the_guest_takes_away_is_gone_once_it_flushes() -> None:
    """guest_restrict: the guest makes data page 2 read-only (the PT goes unsync, so the
    old writable entry may live on until the guest flushes); after its CR3 load the sync
    has made the SPTE read-only, and the guest's store is its own page fault."""
    vm = ShadowHarness()
    vm.host_write(2, 0x33, 8)
    vm.guest_write(0, 2, 1)
    vm.guest_restrict(0, 2, W)
    vm.guest_write(0, 2, 2)  # may still go through: not flushed yet
    vm.switch_cr3(0, PML4)
    assert vm.write(DATA_GVA + 2 * PAGE + 3, b"x").outcome is Outcome.SHUTDOWN
    vm.guest_restrict(0, 3, U)
    vm.guest_restrict(1, 4, NX)
    vm.switch_cr3(0, PML4)
    assert vm.read(DATA_GVA + 3 * PAGE).outcome is Outcome.SHUTDOWN
    vm.guest_read(0, 4, 0)
    vm.check()


def test_a_sync_that_keeps_a_right_the_guest_took_away_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: FNAME(sync_spte) keeps the rights of the shadow page's role and
    ignores the guest PTE's own. After the CR3 load the SPTE of the read-only page is
    still writable: leaves_follow_guest_ptes reports it, and the guest's store lands."""
    monkeypatch.setattr(unsync, "gpte_access", lambda gpte: ACC_ALL)
    vm = ShadowHarness()
    vm.host_write(2, 0x33, 8)
    vm.guest_write(0, 2, 1)
    vm.guest_restrict(0, 2, W)
    vm.switch_cr3(0, PML4)  # the sync is done when the vCPU next enters the guest
    vm.guest_read(0, 0, 0)
    assert any(line.startswith("X6: ") and "grants" in line for line in vm.violations())
    vm.guest_write(0, 2, 2)
    with pytest.raises(RulesBroken, match="COHERENCE"):
        vm.check()


# -- the VMM exiting: the MMU notifier's release (kvm_mmu_zap_all) -----------------------------


def test_the_vmm_exiting_zaps_every_shadow_page_and_a_new_vm_starts() -> None:
    """The release zaps every page and commits: the TLBs are flushed, every page is freed
    but the zapped roots the vCPUs still hold, and no SPTE is left. Then a new VM runs."""
    vm = ShadowHarness(mmio_caching=True)
    vm.guest_remap(1, 1, NO_SLOT_GFN, False)
    vm.switch_cr3(1, PML4_2)
    vm.guest_read(1, 1, 0)  # an MMIO SPTE
    vm.guest_write(0, 0, 1)
    vm.check()
    mmu = vm.mmu
    assert mmu.vcpu_mmu(0).tlb and len(mmu.sp_by_pfn) > 2
    vm.release()
    vm.check()
    assert all(sp.role.invalid and sp.root_count and not sp.spt for sp in mmu.sp_by_pfn.values())
    assert not any(vcpu_mmu.tlb for vcpu_mmu in mmu.vcpus.values())
    assert vm.mmu is not mmu and vm.mmu.sp_by_pfn == {}
    vm.guest_write(0, 0, 2)
    vm.check()


def test_a_release_that_zaps_nothing_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: the shadow MMU's kvm_arch_flush_shadow_all leaves every page."""
    monkeypatch.setattr(ShadowMmu, "kvm_arch_flush_shadow_all", KvmArch.kvm_arch_flush_shadow_all)
    vm = ShadowHarness()
    vm.guest_read(0, 0, 0)
    vm.release()
    with pytest.raises(RulesBroken, match=r"X5: after the release .* was not zapped"):
        vm.check()


def zap_all_without_commit(mmu: ShadowMmu, kvm: Kvm) -> None:
    """kvm_mmu_zap_all that prepares the zap of every page but never commits it: no TLB
    flush, and no page freed."""
    invalid_list: list[KvmMmuPage] = []
    with kvm.mmu_lock.write():
        for sp in list(mmu.active_mmu_pages):
            if not sp.role.invalid:
                zap.kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)


def test_a_zap_all_that_never_commits_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShadowMmu, "kvm_arch_flush_shadow_all", zap_all_without_commit)
    vm = ShadowHarness()
    vm.guest_read(0, 0, 0)
    vm.release()
    with pytest.raises(RulesBroken) as broken:
        vm.check()
    assert "X5: after the release vcpu 0 TLB maps gva page 0x10" in str(broken.value)
    assert "X5: after the release zapped <sp shadow L1 gfn 0x4" in str(broken.value)


def test_the_machine_finds_a_store_across_two_ptes_taken_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zap, "detect_write_misaligned", _misalignment_that_subtracts)
    machine = x86_machine(DEFAULT_PROFILE, ("shadow",))
    machine.TestCase.settings = bug_hunt(2000)
    with pytest.raises(AssertionError, match="X6: "):
        machine.TestCase().runTest()


def test_the_machine_finds_a_zap_all_that_never_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShadowMmu, "kvm_arch_flush_shadow_all", zap_all_without_commit)
    machine = x86_machine(DEFAULT_PROFILE, ("shadow",))
    machine.TestCase.settings = bug_hunt(200)
    with pytest.raises(AssertionError, match="X5: after the release"):
        machine.TestCase().runTest()
