"""The x86 TDP MMU: the iterator and its forward progress; faults, zaps, aging and dirty-log
walks interleaved under the read side of mmu_lock (X13, X15); root reference counts and
RCU-deferred frees (X14); DELETE zapping invalidated roots before it returns; dirty
logging by write-protection and by PML; the translations against the host (N4) and the
TLBs (X5); and, for every checker of spec/invariants/x86_tdp.py, a planted bug it catches.
The state machine of kvmspec.fuzz.tdp_machine runs at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from kvmspec.fuzz.generic_harness import RulesBroken
from kvmspec.fuzz.profiles import bug_hunt
from kvmspec.fuzz.tdp_machine import DATA_PAGES, TdpMachine, TdpVm, tdp_machine
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.mmu_notifier import kvm_mmu_notifier_test_young
from kvmspec.reference.page_fault import Fault
from kvmspec.reference.x86 import tdp_mmu, tdp_mmu_roots
from kvmspec.reference.x86.paging import PG_LEVEL_4K, PT_WRITABLE_MASK
from kvmspec.reference.x86.spte import (
    EPT_MASKS,
    FROZEN_SPTE,
    SHADOW_NONPRESENT_VALUE,
    is_access_track_spte,
    is_last_spte,
    is_shadow_present_pte,
    kvm_mmu_reset_all_pte_masks,
    kvm_mmu_set_ept_masks,
    spte_to_pfn,
)
from kvmspec.reference.x86.tdp_arch import TdpMmu
from kvmspec.reference.x86.tdp_fault import RetPf, tdp_guest_access
from kvmspec.reference.x86.tdp_iter import (
    ReadSide,
    TdpIter,
    TdpMmuPage,
    TdpPtep,
    TdpTables,
    for_each_tdp_pte_min_level,
    tdp_mmu_iter_cond_resched,
)
from kvmspec.reference.x86.tdp_mmu_roots import TdpMmuState
from kvmspec.spec.invariants import Violation

PAGE = 4096


def run_until(op: KernelOp[object], point: str) -> None:
    """Advance ``op`` until it yields at a point whose name contains ``point``."""
    while True:
        yielded = next(op)
        if isinstance(yielded, Preempt) and point in yielded.point:
            return


def finish(op: KernelOp[object]) -> object:
    return run_to_completion(op)


def rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def leaf(vm: TdpVm, page: int) -> int:
    """The SPTE mapping data page ``page`` in vCPU 0's root (non-present if none)."""
    root = vm.mmu.vcpu_mmu(0).root
    assert root is not None
    for it in for_each_tdp_pte_min_level(
        vm.mmu.tables, "test", root, PG_LEVEL_4K, vm.gfn(page), vm.gfn(page) + 1
    ):
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            return it.old_spte
    return SHADOW_NONPRESENT_VALUE


def l1_table(vm: TdpVm, page: int) -> TdpMmuPage:
    """The 4K-level table that holds the leaf of data page ``page``."""
    gfn = vm.gfn(page)
    return next(sp for sp in vm.tables(1) if sp.gfn <= gfn < sp.gfn + 512)


def where(it: TdpIter) -> tuple[int, bool]:
    return it.level, it.yielded


def fate(sp: TdpMmuPage) -> tuple[bool, bool]:
    """(unlinked, freed)."""
    return sp.unlinked, sp.freed


def mapped_vm(pages: range = range(DATA_PAGES), **options: bool) -> TdpVm:
    vm = TdpVm(**options)  # type: ignore[arg-type]
    for page in pages:
        assert vm.access(page, bytes([page]) * 8).outcome is Fault.MAPPED
    assert vm.violations() == []
    return vm


# -- the iterator ---------------------------------------------------------------------------


def test_iterator_visits_every_leaf_of_a_misaligned_range_once_across_two_tables() -> None:
    vm = mapped_vm()
    root = vm.mmu.vcpu_mmu(0).root
    assert root is not None
    start, end = vm.gfn(1), vm.gfn(7)  # the slot straddles a 2M boundary: two L1 tables
    seen = [
        it.gfn
        for it in for_each_tdp_pte_min_level(vm.mmu.tables, "test", root, 1, start, end)
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level)
    ]
    assert seen == list(range(start, end))
    assert len(vm.tables(1)) == 2


def _yielding_walk(
    tables: TdpTables, side: ReadSide, root: TdpMmuPage, start: int, end: int, out: list[int]
) -> Iterator[object]:
    """A walk that offers to yield before every SPTE, as the zap and dirty-log walks do,
    and records the leaves it processes."""
    for it in for_each_tdp_pte_min_level(tables, "walker", root, 1, start, end):
        if (yield from tdp_mmu_iter_cond_resched(it, side)):
            continue
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            out.append(it.gfn)


def test_a_walk_that_yields_everywhere_restarts_at_the_next_gfn_and_ends() -> None:
    """Each yield restarts the walk from the root at the first gfn not done; the yield
    rule (never twice without progress) makes it end, processing each leaf once, even when
    another CPU maps more pages at every yield."""
    vm = mapped_vm(range(0, DATA_PAGES, 2))
    root = vm.mmu.vcpu_mmu(0).root
    assert root is not None
    side = ReadSide(vm.kvm.rcu, vm.kvm.mmu_lock)
    side.enter()
    out: list[int] = []
    walk = _yielding_walk(vm.mmu.tables, side, root, vm.gfn(0), vm.gfn(DATA_PAGES), out)
    yields = 0
    for _ in walk:
        yields += 1
        assert yields < 100, "the walk does not make progress"
        page = 1 + 2 * (yields % (DATA_PAGES // 2))
        finish(vm.fault(page, write=False, vcpu_id=1))  # another CPU, between two steps
    side.leave()
    assert yields > 5
    assert out == sorted(set(out))  # each leaf once, in order
    assert {vm.gfn(page) for page in range(0, DATA_PAGES, 2)} <= set(out)


def test_after_a_restart_the_walk_may_not_yield_again_before_moving_on() -> None:
    vm = mapped_vm(range(2))
    root = vm.mmu.vcpu_mmu(0).root
    assert root is not None
    side = ReadSide(vm.kvm.rcu, None)
    side.enter()
    walk = for_each_tdp_pte_min_level(vm.mmu.tables, "t", root, 1, vm.gfn(0), vm.gfn(2))
    it: TdpIter = next(walk)
    assert run_to_completion(tdp_mmu_iter_cond_resched(it, side)) is False  # no progress yet
    while it.gfn != vm.gfn(1):
        next(walk)  # down to the first leaf, then sideways: progress
    op = tdp_mmu_iter_cond_resched(it, side)
    assert isinstance(next(op), Preempt)
    assert vm.kvm.rcu.active == set()  # it left the RCU read section while yielding
    with pytest.raises(StopIteration):
        next(op)
    assert where(it) == (1, True)
    next(walk)  # the restart: from the root, at the same gfn
    assert where(it) == (root.level, False)
    assert run_to_completion(tdp_mmu_iter_cond_resched(it, side)) is False
    side.leave()


# -- two faults, and a planted cmpxchg that forgets to compare --------------------------------


def _race_two_faults(vm: TdpVm) -> tuple[object, object]:
    """vCPU 0 and vCPU 1 fault on the same page; both build the leaf from an empty SPTE
    before either exchanges it."""
    first = vm.fault(3, write=True, vcpu_id=0)
    second = vm.fault(3, write=True, vcpu_id=1)
    run_until(first, "leaf built")
    run_until(second, "leaf built")
    return finish(first), finish(second)


def test_two_faults_on_one_gfn_one_wins_the_other_retries_without_side_effects() -> None:
    vm = TdpVm()
    assert _race_two_faults(vm) == (RetPf.FIXED, RetPf.RETRY)
    history = vm.mmu.tables.history
    assert not [w for w in history.writes if w.actor.startswith("fault(vcpu 1)")]
    assert vm.mmu.page_stats[1] == 1
    assert vm.violations() == []
    assert vm.access(3, None, vcpu_id=1).outcome is Fault.MAPPED  # no further fault
    assert vm.mmu.page_stats[1] == 1


def test_two_faults_racing_to_link_a_table_the_loser_frees_its_own() -> None:
    vm = mapped_vm(range(1))
    first = vm.fault(7, write=False, vcpu_id=0)  # page 7 is in the second 4K table
    second = vm.fault(7, write=False, vcpu_id=1)
    run_until(first, "table allocated")
    run_until(second, "table allocated")
    assert finish(first) is RetPf.FIXED
    assert finish(second) is RetPf.RETRY
    never_linked = [sp for sp in vm.mmu.tables.pages.values() if sp.freed and not sp.unlinked]
    assert len(never_linked) == 1 and vm.mmu.tdp_mmu_pages == 4
    assert vm.violations() == []


def test_planted_cmpxchg_that_stores_without_comparing_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cmpxchg_spte(self: TdpTables, ptep: TdpPtep, old: int, new: int, actor: str) -> int:
        self._store(ptep, new, old, actor)
        return old

    monkeypatch.setattr(TdpTables, "cmpxchg_spte", cmpxchg_spte)
    vm = TdpVm()
    assert _race_two_faults(vm) == (RetPf.FIXED, RetPf.FIXED)
    found = vm.violations()
    assert "X15" in rules(found)
    assert any("expecting" in v.message for v in found)  # the store over a changed SPTE
    assert any("stats" in v.message for v in found)  # two leaves counted, one mapped


def test_planted_bookkeeping_after_a_failed_exchange_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def set_spte_atomic(kvm, mmu, it, new_spte):  # type: ignore[no-untyped-def]
        stale = it.old_spte
        ret = tdp_mmu.__dict__["__tdp_mmu_set_spte_atomic"](kvm, mmu, it, new_spte)
        tdp_mmu.handle_changed_spte(kvm, mmu, it.sptep, it.gfn, stale, new_spte, it.level, True)
        return ret

    monkeypatch.setattr(tdp_mmu, "tdp_mmu_set_spte_atomic", set_spte_atomic)
    monkeypatch.setattr("kvmspec.reference.x86.tdp_fault.tdp_mmu_set_spte_atomic", set_spte_atomic)
    vm = TdpVm()
    assert _race_two_faults(vm) == (RetPf.FIXED, RetPf.RETRY)
    found = vm.violations()
    assert any(v.rule == "X15" and "bookkeeping" in v.message for v in found)


def test_a_fault_that_resolved_its_pfn_before_an_invalidation_retries() -> None:
    vm = mapped_vm(range(1))
    fault = vm.fault(1, write=True, vcpu_id=1)
    run_until(fault, "pfn resolved")
    assert vm.host.madvise_dontneed(vm.hva + PAGE, PAGE) == 0  # frees the page it holds
    assert finish(fault) is RetPf.RETRY
    assert leaf(vm, 1) == SHADOW_NONPRESENT_VALUE
    assert vm.violations() == []


def test_planted_fault_that_ignores_the_invalidation_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "kvmspec.reference.x86.tdp_fault.is_page_fault_stale", lambda kvm, vcpu_mmu, fault: False
    )
    vm = mapped_vm(range(1))
    fault = vm.fault(1, write=True, vcpu_id=1)
    run_until(fault, "pfn resolved")
    vm.host.madvise_dontneed(vm.hva + PAGE, PAGE)
    assert finish(fault) is RetPf.FIXED
    assert "N4" in rules(vm.violations())


# -- a zap under the read lock racing a fault (X13) -------------------------------------------


def test_a_table_zap_racing_a_fault_freezes_it_and_leaves_nothing_frozen() -> None:
    """A fault has built its leaf in the 4K table T; the NX recovery zap unlinks T under
    the read lock and freezes T's SPTEs; the fault's exchange then fails on FROZEN and it
    retries. T is freed only once the fault (an RCU reader) has left."""
    vm = mapped_vm(range(2))
    table = l1_table(vm, 2)
    fault = vm.fault(2, write=True, vcpu_id=1)
    run_until(fault, "leaf built")
    assert finish(vm.zap_tables([table])) == 1
    assert fate(table) == (True, False)
    assert all(spte == FROZEN_SPTE for spte in table.spt.values()) and len(table.spt) == 512
    assert vm.violations(quiescent=False) == []
    assert finish(fault) is RetPf.RETRY
    assert fate(table) == (True, True)
    assert vm.violations() == []
    assert vm.access(2, b"after!!!").outcome is Fault.MAPPED
    assert vm.access(0, None).data == bytes([0]) * 8
    assert vm.violations() == []


def test_planted_zap_that_leaves_a_frozen_spte_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def freeze_and_forget(kvm, mmu, sp):  # type: ignore[no-untyped-def]
        parent = sp.ptep
        it = TdpIter(mmu.tables, "buggy_zap", parent.sp, sp.level, sp.gfn)
        it.level, it.gfn = sp.level + 1, sp.gfn
        it.pt_path[it.level] = parent.sp
        it.old_spte = mmu.tables.read_spte(parent, it.actor)
        yield Preempt("buggy zap")
        return tdp_mmu.__dict__["__tdp_mmu_set_spte_atomic"](kvm, mmu, it, FROZEN_SPTE) == 0

    monkeypatch.setattr(tdp_mmu, "kvm_tdp_mmu_zap_possible_nx_huge_page", freeze_and_forget)
    vm = mapped_vm(range(2))
    table = l1_table(vm, 0)
    assert finish(vm.zap_tables([table])) == 1
    found = vm.violations()
    assert any(v.rule == "X13" and "left frozen" in v.message for v in found)
    # A writer that ignores the freeze then overwrites it: only the freezer may.
    parent = table.ptep
    assert parent is not None
    vm.mmu.tables.cmpxchg_spte(parent, FROZEN_SPTE, SHADOW_NONPRESENT_VALUE, "intruder")
    assert any("frozen by buggy_zap" in v.message for v in vm.violations(quiescent=False))


# -- lockless aging racing faults and dirty logging -------------------------------------------


def test_lockless_aging_racing_write_protection_loses_no_update() -> None:
    """Aging reads an accessed writable leaf, then dirty logging write-protects it (under
    the read lock) and the guest reads it (the CPU sets A again): aging's atomic AND
    clears A and nothing else, so W stays clear, D stays set."""
    vm = mapped_vm(range(2))
    age = vm.age(0, 1)
    run_until(age, "accessed leaf read")
    assert finish(vm.wrprot()) is True
    vm.kvm.arch.kvm_flush_remote_tlbs(vm.kvm)
    assert vm.access(0, None).outcome is Fault.MAPPED
    assert finish(age) is True
    spte = leaf(vm, 0)
    assert not spte & PT_WRITABLE_MASK
    assert spte & EPT_MASKS.dirty_mask and not spte & EPT_MASKS.accessed_mask
    assert vm.violations() == []


def test_lockless_aging_racing_a_fault_reports_young_and_loses_nothing() -> None:
    """A read fault maps the zero page; aging reads it; a write fault replaces it (the
    host copies on write, the notifier zaps the leaf, the fault maps the new page
    writable); aging then clears A in the new leaf only."""
    vm = TdpVm()
    assert vm.access(0, None).outcome is Fault.MAPPED
    age = vm.age(0, 1)
    run_until(age, "accessed leaf read")
    assert vm.access(0, b"written!").outcome is Fault.MAPPED
    assert finish(age) is True
    spte = leaf(vm, 0)
    assert spte & PT_WRITABLE_MASK and not spte & EPT_MASKS.accessed_mask
    assert vm.violations() == []
    assert vm.access(0, None).data == b"written!"


def test_aging_without_ad_bits_access_tracks_and_the_next_access_restores() -> None:
    """EPT without A/D bits: aging saves R and X and clears RWX (access tracking); the
    next guest access faults and the fault path makes the leaf accessible again."""
    masks = kvm_mmu_set_ept_masks(
        kvm_mmu_reset_all_pte_masks(46), has_ad_bits=False, has_exec_only=True
    )
    vm = TdpVm(masks)
    assert vm.access(0, b"12345678").outcome is Fault.MAPPED
    assert finish(vm.age(0, 1)) is True
    assert is_access_track_spte(masks, leaf(vm, 0))
    assert finish(vm.age(0, 1, test_only=True)) is False
    vm.kvm.arch.kvm_flush_remote_tlbs(vm.kvm)
    assert vm.access(0, None).data == b"12345678"
    assert not is_access_track_spte(masks, leaf(vm, 0))
    assert finish(vm.age(0, 1, test_only=True)) is True
    assert vm.violations() == []


def test_host_aging_runs_without_mmu_lock_while_a_fault_holds_it_for_read() -> None:
    """x86 selects lockless aging: the host's reclaim asks KVM while a fault is in the
    middle of its walk under the read lock, and nothing waits (with aging under the write
    lock, this step could not run)."""
    vm = mapped_vm(range(2))
    fault = vm.fault(4, write=False, vcpu_id=1)
    run_until(fault, "table allocated")
    assert vm.kvm.mmu_lock.readers == 1
    assert vm.host.age(vm.hva, flush=False) is True  # the guest wrote page 0
    assert not leaf(vm, 0) & EPT_MASKS.accessed_mask
    assert vm.host.age(vm.hva, flush=False) is False
    assert finish(fault) is RetPf.FIXED
    assert vm.violations() == []


def test_the_notifier_test_young_asks_without_clearing() -> None:
    vm = mapped_vm(range(1))
    assert kvm_mmu_notifier_test_young(vm.kvm, vm.hva) is True
    assert kvm_mmu_notifier_test_young(vm.kvm, vm.hva) is True  # nothing was cleared
    assert kvm_mmu_notifier_test_young(vm.kvm, vm.hva + PAGE) is False  # not mapped
    assert leaf(vm, 0) & EPT_MASKS.accessed_mask


def test_planted_aging_by_plain_store_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def age_spte(kvm, mmu, it):  # type: ignore[no-untyped-def]
        mmu.tables._store(it.sptep, it.old_spte & ~mmu.masks.accessed_mask, it.old_spte, it.actor)

    monkeypatch.setattr(tdp_mmu, "kvm_tdp_mmu_age_spte", age_spte)
    vm = mapped_vm(range(2))
    age = vm.age(0, 1)
    run_until(age, "accessed leaf read")
    finish(vm.wrprot())
    finish(age)
    assert leaf(vm, 0) & PT_WRITABLE_MASK  # write protection lost: writes would go unlogged
    assert any(v.rule == "X15" and "expecting" in v.message for v in vm.violations())


# -- roots (X14) ------------------------------------------------------------------------------


def test_a_root_is_freed_only_after_the_rcu_readers_leave() -> None:
    vm = mapped_vm(range(2))
    assert vm.access(1, None, vcpu_id=1).outcome is Fault.MAPPED
    root = vm.mmu.vcpu_mmu(0).root
    assert root is not None and root.root_count == 2 + 1  # two vCPUs and the MMU
    age = vm.age(0, 2)
    run_until(age, "accessed leaf read")  # a lockless walker inside the root
    assert vm.set_region(None, 0) == 0  # DELETE: fast zap
    assert root.invalid and root.root_count == 2  # the MMU's reference is gone
    for vcpu_id in (0, 1):
        assert vm.access(0, None, vcpu_id).outcome is Fault.MMIO  # drops the invalid root
    assert root.root_count == 0 and root not in vm.mmu.roots
    assert fate(root) == (True, False)  # the ager is still inside
    assert vm.violations(quiescent=False) == []
    finish(age)
    assert fate(root) == (True, True)
    assert vm.violations() == []


def test_planted_root_free_without_a_grace_period_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def put_root(kvm, mmu: TdpMmuState, root: TdpMmuPage) -> None:  # type: ignore[no-untyped-def]
        root.root_count -= 1
        if root.root_count == 0:
            mmu.roots.remove(root)
            mmu.tables.unlink(root, kvm.rcu)
            mmu.tables.free_page(root, kvm.rcu)  # no call_rcu

    for module in (tdp_mmu_roots, tdp_mmu):
        monkeypatch.setattr(module, "kvm_tdp_mmu_put_root", put_root)
    vm = mapped_vm(range(2))
    age = vm.age(0, 2)
    run_until(age, "accessed leaf read")
    vm.set_region(None, 0)
    for vcpu_id in (0, 1):
        vm.access(0, None, vcpu_id)
    assert any("RCU readers inside" in v.message for v in vm.violations(quiescent=False))


def test_planted_root_without_the_mmus_own_reference_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = tdp_mmu_roots.kvm_tdp_mmu_alloc_root

    def alloc_root(kvm, mmu, vcpu_mmu, as_id):  # type: ignore[no-untyped-def]
        fresh = not mmu.roots
        real(kvm, mmu, vcpu_mmu, as_id)
        if fresh:
            vcpu_mmu.root.root_count = 1  # the vCPU's reference only

    monkeypatch.setattr(tdp_mmu_roots, "kvm_tdp_mmu_alloc_root", alloc_root)
    vm = TdpVm()
    vm.access(0, None)
    assert any(v.rule == "X14" and "MMU reference" in v.message for v in vm.violations())


def test_delete_returns_only_after_the_invalidated_roots_are_zapped() -> None:
    vm = mapped_vm()
    old_root = vm.mmu.vcpu_mmu(0).root
    assert old_root is not None
    assert vm.set_region(None, 0) == 0
    assert old_root.invalid and not old_root.scheduled_root_to_zap
    assert not any(is_shadow_present_pte(s) for s in old_root.spt.values())
    assert vm.mmu.page_stats[1] == 0 and vm.mmu.tdp_mmu_pages == 0
    assert vm.violations() == []
    # MOVE back in place: vCPUs load a fresh root and fault the pages in again.
    assert vm.set_region(0x400, 0) == 0
    assert vm.access(5, None).data == bytes([5]) * 8
    assert vm.mmu.vcpu_mmu(0).root is not old_root
    assert vm.violations() == []


def test_move_zaps_the_old_root_and_the_guest_finds_its_data_at_the_new_place() -> None:
    vm = mapped_vm()
    old_root = vm.mmu.vcpu_mmu(0).root
    assert vm.set_region(0x400, 0) == 0  # MOVE
    assert old_root is not None and old_root.invalid
    assert not any(is_shadow_present_pte(s) for s in old_root.spt.values())
    assert vm.violations() == []
    assert vm.access(4, None).data == bytes([4]) * 8
    assert vm.gfn(4) == 0x404 and leaf(vm, 4) != SHADOW_NONPRESENT_VALUE
    assert vm.violations() == []


def test_delete_without_the_zap_all_quirk_zaps_only_the_slot_in_place() -> None:
    vm = mapped_vm(zap_all_quirk=False)
    root = vm.mmu.vcpu_mmu(0).root
    assert vm.set_region(None, 0) == 0
    assert vm.mmu.vcpu_mmu(0).root is root and root is not None and not root.invalid
    assert vm.mmu.page_stats[1] == 0
    assert vm.mmu.tdp_mmu_pages == 4  # the tables stay, empty
    assert vm.violations() == []


def test_the_vmm_exiting_zaps_every_table_under_the_write_lock() -> None:
    vm = mapped_vm()
    tables = vm.tables(1) + vm.tables(2) + vm.tables(3)
    vm.host.exit_mmap()  # the notifier's release: kvm_arch_flush_shadow_all
    assert all(fate(sp) == (True, True) for sp in tables)  # no reader: freed at once
    assert vm.mmu.page_stats[1] == 0 and vm.mmu.tdp_mmu_pages == 0
    assert vm.violations() == []


class _NoZapOfInvalidatedRoots(TdpMmu):
    """Planted: the fast zap invalidates the roots and returns without zapping them."""

    def kvm_arch_flush_shadow_memslot(self, kvm, slot):  # type: ignore[no-untyped-def]
        with kvm.mmu_lock.write():
            tdp_mmu_roots.kvm_tdp_mmu_invalidate_roots(kvm, self)


class _NoZapVm(TdpVm):
    def make_mmu(self, masks, pml):  # type: ignore[no-untyped-def]
        return _NoZapOfInvalidatedRoots(masks, pml)


def test_planted_delete_that_skips_zapping_invalidated_roots_is_caught() -> None:
    vm = _NoZapVm()
    vm.access(0, b"12345678")
    vm.set_region(None, 0)
    found = [v.message for v in vm.violations() if v.rule == "X14"]
    assert any("still scheduled to zap" in m for m in found)
    assert any("still maps memory" in m for m in found)


# -- dirty logging ----------------------------------------------------------------------------


def test_dirty_logging_write_protects_and_harvest_reprotects_per_mask() -> None:
    vm = mapped_vm()
    assert vm.log_dirty(True) == 0
    assert all(not leaf(vm, page) & PT_WRITABLE_MASK for page in range(DATA_PAGES))
    assert all(not tlb for tlb in (v.tlb for v in vm.mmu.vcpus.values()))  # flushed
    assert vm.access(1, b"one-one!").outcome is Fault.MAPPED
    assert vm.access(6, b"six-six!").outcome is Fault.MAPPED
    assert leaf(vm, 1) & PT_WRITABLE_MASK and leaf(vm, 6) & PT_WRITABLE_MASK
    assert vm.get_dirty_log() == [1 << 1 | 1 << 6]
    assert not leaf(vm, 1) & PT_WRITABLE_MASK and not leaf(vm, 6) & PT_WRITABLE_MASK
    assert vm.access(6, b"again!!!").outcome is Fault.MAPPED
    assert vm.get_dirty_log() == [1 << 6]
    assert vm.violations() == []


def test_dirty_logging_with_pml_clears_dirty_bits_per_mask() -> None:
    vm = mapped_vm(pml=True)
    dirty = EPT_MASKS.dirty_mask
    assert vm.log_dirty(True) == 0
    assert all(leaf(vm, p) & PT_WRITABLE_MASK for p in range(DATA_PAGES))  # W stays
    assert all(not leaf(vm, p) & dirty for p in range(DATA_PAGES))
    assert vm.access(2, b"pml-log!").outcome is Fault.MAPPED  # no fault: the CPU sets D
    assert vm.access(3, b"pml-log!").outcome is Fault.MAPPED
    assert leaf(vm, 2) & dirty and leaf(vm, 3) & dirty
    assert vm.get_dirty_log() == [1 << 2 | 1 << 3]
    assert not leaf(vm, 2) & dirty and not leaf(vm, 3) & dirty
    assert vm.access(3, b"pml-two!").outcome is Fault.MAPPED
    assert vm.get_dirty_log() == [1 << 3]
    assert vm.violations() == []


class _NoReprotect(TdpMmu):
    """Planted: a harvest does not re-arm logging for the pages it reported."""

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, kvm, slot, gfn_offset, mask):  # type: ignore[no-untyped-def]
        pass


@pytest.mark.parametrize("pml", [False, True])
def test_planted_harvest_without_reprotection_is_caught(pml: bool) -> None:
    class Vm(TdpVm):
        def make_mmu(self, masks, pml):  # type: ignore[no-untyped-def]
            return _NoReprotect(masks, pml)

    vm = Vm(pml=pml)
    vm.log_dirty(True)
    vm.access(0, b"12345678")
    assert vm.violations() == []
    assert vm.get_dirty_log() == [1]
    assert "D1" in rules(vm.violations())  # writable (and dirty) again, bit cleared


# -- translations against the host (N4) and the TLBs (X5) -------------------------------------


class _NoUnmap(TdpMmu):
    """Planted: MMU-notifier invalidations are ignored."""

    def kvm_unmap_gfn_range(self, kvm, gfn_range):  # type: ignore[no-untyped-def]
        return False


class _NoFlush(TdpMmu):
    """Planted: remote TLB flushes do nothing."""

    def kvm_flush_remote_tlbs(self, kvm):  # type: ignore[no-untyped-def]
        pass


def test_an_access_across_two_pages_and_one_beyond_the_slot() -> None:
    vm = mapped_vm(range(0))
    gpa = vm.gfn(1) * PAGE - 4
    assert tdp_guest_access(vm.kvm, vm.host, vm.mmu, 0, gpa, b"acrossXX").outcome is Fault.MAPPED
    assert vm.host.host_read(vm.hva + PAGE - 4, 4) == (0, b"acro")
    assert vm.host.host_read(vm.hva + PAGE, 4) == (0, b"ssXX")
    assert tdp_guest_access(vm.kvm, vm.host, vm.mmu, 1, gpa, None, 8).data == b"acrossXX"
    last = vm.gfn(DATA_PAGES) * PAGE - 2
    access = tdp_guest_access(vm.kvm, vm.host, vm.mmu, 0, last, b"mmio")
    assert access.outcome is Fault.MMIO and access.mmio is not None
    assert vm.host.host_read(vm.hva + DATA_PAGES * PAGE - 2, 2) == (0, b"mm")
    assert vm.violations() == []


def test_a_notifier_invalidation_unmaps_and_flushes() -> None:
    vm = mapped_vm(range(2))
    assert vm.host.madvise_dontneed(vm.hva, PAGE) == 0
    assert leaf(vm, 0) == SHADOW_NONPRESENT_VALUE
    assert vm.violations() == []
    assert vm.access(0, None).data == bytes(8)


@pytest.mark.parametrize(("mmu_class", "rule"), [(_NoUnmap, "N4"), (_NoFlush, "X5")])
def test_planted_missing_unmap_or_flush_is_caught(mmu_class: type[TdpMmu], rule: str) -> None:
    class Vm(TdpVm):
        def make_mmu(self, masks, pml):  # type: ignore[no-untyped-def]
            return mmu_class(masks, pml)

    vm = Vm()
    vm.access(0, b"12345678")
    old_pfn = spte_to_pfn(leaf(vm, 0))
    assert vm.host.madvise_dontneed(vm.hva, PAGE) == 0
    assert rule in rules(vm.violations())
    assert old_pfn != 0


# -- the state machine ------------------------------------------------------------------------


@pytest.mark.parametrize(("ad_bits", "pml"), [(True, False), (True, True), (False, False)])
def test_tdp_machine(ad_bits: bool, pml: bool) -> None:
    machine = tdp_machine(ad_bits, pml)
    machine.TestCase.settings = settings(settings.default, max_examples=60, stateful_step_count=40)
    machine.TestCase().runTest()


def test_tdp_machine_finds_a_planted_cmpxchg_that_does_not_compare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cmpxchg_spte(self: TdpTables, ptep: TdpPtep, old: int, new: int, actor: str) -> int:
        self._store(ptep, new, old, actor)
        return old

    monkeypatch.setattr(TdpTables, "cmpxchg_spte", cmpxchg_spte)
    TdpMachine.TestCase.settings = bug_hunt(500)
    with pytest.raises(RulesBroken, match="X15"):
        TdpMachine.TestCase().runTest()


class _QuirklessDeleteLeavesLeaves(TdpMmu):
    """Planted: without KVM_X86_QUIRK_SLOT_ZAP_ALL, a DELETE or MOVE forgets to zap the
    slot's leaves."""

    def kvm_arch_flush_shadow_memslot(self, kvm, slot):  # type: ignore[no-untyped-def]
        if kvm.quirk_slot_zap_all():
            super().kvm_arch_flush_shadow_memslot(kvm, slot)


def test_tdp_machine_finds_a_quirkless_delete_that_keeps_the_slots_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        TdpVm, "make_mmu", lambda self, masks, pml: _QuirklessDeleteLeavesLeaves(masks, pml)
    )
    TdpMachine.TestCase.settings = bug_hunt(1000)
    with pytest.raises(RulesBroken, match="N4"):
        TdpMachine.TestCase().runTest()
