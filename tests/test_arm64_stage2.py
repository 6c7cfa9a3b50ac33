"""Stage-2 operations and their races: break-before-make (A1) checked over the history of
every descriptor, a LOCKED entry making a second walker retry (A2), seed 001's lockless
test-and-clear of the access flag racing the hardware, tables unlinked under a reader
freed only after it leaves, eager splitting, and the hardware walker's faults and TLB."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from kvmspec.reference.arm64 import split, stage2
from kvmspec.reference.arm64.descriptors import (
    KVM_PGTABLE_PROT_RW,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_LEAF_ATTR_S2_DBM,
    KvmPgtableProt,
    decode_descriptor,
)
from kvmspec.reference.arm64.hw_access import guest_access
from kvmspec.reference.arm64.pgtable import (
    NO_WALK_FLAGS,
    KvmMmuMemoryCache,
    KvmPgtable,
    KvmPgtableMmOps,
    KvmPgtableVisitCtx,
    KvmPgtableWalkFlags,
    TablePage,
    kvm_pgtable_stage2_free_unlinked,
)
from kvmspec.reference.arm64.s2_mmu import Stage2Features, __kvm_tlb_flush_vmid
from kvmspec.reference.arm64.split import kvm_pgtable_stage2_split
from kvmspec.reference.arm64.stage2 import (
    kvm_pgtable_stage2_init,
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_mkyoung,
    kvm_pgtable_stage2_test_clear_young,
    kvm_pgtable_stage2_unmap,
    kvm_pgtable_stage2_wrprotect,
)
from kvmspec.reference.concurrency import KernelOp, Preempt, Rcu, run_to_completion
from kvmspec.spec.invariants.arm64 import (
    check_break_before_make,
    check_no_lost_hardware_updates,
    check_no_reads_after_free,
    check_stage2,
    check_warnings,
)

F = KvmPgtableWalkFlags
FAULT = F.SHARED | F.HANDLE_FAULT
"""How user_mem_abort maps: under the read side of mmu_lock, stopping on EAGAIN."""
MB2 = 2 << 20
PAGE = 4096


def new_pgt(features: Stage2Features | None = None) -> KvmPgtable:
    return kvm_pgtable_stage2_init(40, 12, Rcu("rcu"), features or Stage2Features())


def map_op(
    pgt: KvmPgtable, ipa: int, size: int, pa: int, flags: F = NO_WALK_FLAGS
) -> KernelOp[int]:
    prot = KVM_PGTABLE_PROT_RW
    return kvm_pgtable_stage2_map(pgt, ipa, size, pa, prot, KvmMmuMemoryCache(8), flags)


def step_until(op: KernelOp[object], point: Callable[[str], bool]) -> None:
    """Advance ``op`` until it yields at a point matching ``point``."""
    while True:
        step = next(op)
        assert isinstance(step, Preempt)
        if point(step.point):
            return


def finish(op: KernelOp[object]) -> object:
    try:
        while True:
            next(op)
    except StopIteration as done:
        return done.value


def leaf(pgt: KvmPgtable, ipa: int) -> int:
    """The level-3 descriptor for ``ipa`` (the tests map pages under one level-2 table)."""
    mm_ops = pgt.mm_ops
    table = pgt.pgd[0] if pgt.pgd else None
    assert table is not None
    level = pgt.geometry.start_level
    while level < 3:
        pte = table.entries[pgt.geometry.kvm_pgtable_idx(ipa, level)]
        table = mm_ops.phys_to_virt(pte & ((1 << 48) - 1) & ~0xFFF)
        level += 1
    return table.entries.get(pgt.geometry.kvm_pgtable_idx(ipa, 3), 0)


def all_clean(pgt: KvmPgtable) -> None:
    """Every stage-2 invariant holds (spec/invariants/arm64.py: A1, A3, A4, A6, seed 001
    and the library's WARN_ONs)."""
    assert check_stage2(pgt) == []


# -- map and break-before-make ----------------------------------------------------------------


def test_aligned_ranges_get_blocks_and_misaligned_ones_pages() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4020_0000)) == 0
    assert run_to_completion(map_op(pgt, 2 * MB2, MB2, 0x4040_1000)) == 0  # PA not aligned
    assert run_to_completion(guest_access(pgt, 0, MB2 + 5, False)).level == 2
    result = run_to_completion(guest_access(pgt, 0, 2 * MB2 + PAGE + 5, False))
    assert (result.level, result.pa) == (3, 0x4040_2005)
    all_clean(pgt)


def test_remapping_to_another_address_breaks_before_making() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).pa == 0x4000_0000
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x5000_0000)) == 0
    # The TLBI of the break removed the vCPU's entry: the next access sees the new page.
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).pa == 0x5000_0000
    all_clean(pgt)


def test_a_missing_tlbi_is_caught_by_the_break_before_make_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    run_to_completion(guest_access(pgt, 0, MB2, False))
    monkeypatch.setattr(stage2, "__kvm_tlb_flush_vmid_ipa", lambda mmu, ipa, level: None)
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x5000_0000)) == 0
    found = check_break_before_make(pgt.mm_ops.history)
    assert len(found) == 1
    assert found[0].rule == "A1" and "no TLBI after the invalid entry" in found[0].message
    assert [v.rule for v in check_stage2(pgt)] == ["A1"]
    # And the vCPU indeed still uses the old page.
    assert run_to_completion(guest_access(pgt, 0, MB2, False)).pa == 0x4000_0000


def test_a_second_walker_on_a_locked_entry_gets_eagain() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    first = map_op(pgt, MB2, PAGE, 0x5000_0000, FAULT)
    step_until(first, lambda point: "LOCKED" in point)
    assert decode_descriptor(leaf(pgt, MB2), 3, 12).locked
    # The hardware sees a LOCKED entry as invalid: a translation fault, retried by KVM.
    assert run_to_completion(guest_access(pgt, 1, MB2, False)).fault == "translation"
    second = map_op(pgt, MB2, PAGE, 0x6000_0000, FAULT)
    assert run_to_completion(second) == -errno.EAGAIN
    assert finish(first) == 0
    assert run_to_completion(guest_access(pgt, 1, MB2, False)).pa == 0x5000_0000
    all_clean(pgt)


def test_an_exclusive_walker_meeting_a_locked_entry_is_a_warning() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    first = map_op(pgt, MB2, PAGE, 0x5000_0000, FAULT)
    step_until(first, lambda point: "LOCKED" in point)
    # The walk carries on past the EAGAIN (it is not a fault's walk), leaving the entry.
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x6000_0000)) == 0
    assert decode_descriptor(leaf(pgt, MB2), 3, 12).locked
    assert pgt.mm_ops.history.warnings == ["A2: an exclusive walker met a LOCKED entry"]
    assert [str(v) for v in check_warnings(pgt.mm_ops.history)] == [
        "A2: WARN: an exclusive walker met a LOCKED entry"
    ]


# -- seed 001: lockless test_clear_young against the hardware ------------------------------


def writable_clean_page(pgt: KvmPgtable) -> None:
    """A mapped page with DBM set, write-protected (dirty logging) and accessed."""
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    assert run_to_completion(kvm_pgtable_stage2_wrprotect(pgt, MB2, PAGE)) == 0
    __kvm_tlb_flush_vmid(pgt.mmu)
    pte = leaf(pgt, MB2)
    assert pte & KVM_PTE_LEAF_ATTR_S2_DBM and pte & KVM_PTE_LEAF_ATTR_LO_S2_AF
    assert not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W


def race_ager_with_guest_write(pgt: KvmPgtable) -> bool:
    """Seed 001's race: the lockless ager reads the entry, the guest writes the page (the
    hardware sets the dirty state), then the ager writes the entry back without AF."""
    ager = kvm_pgtable_stage2_test_clear_young(pgt, MB2, PAGE, True, F.SHARED)
    step_until(ager, lambda point: point.startswith("walker read level 3"))
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault is None
    young = finish(ager)
    assert isinstance(young, bool)
    return young


def test_seed_001_lockless_aging_keeps_a_concurrent_hardware_dirty_update() -> None:
    pgt = new_pgt(Stage2Features(ha=True, hd=True))
    writable_clean_page(pgt)
    assert race_ager_with_guest_write(pgt)
    pte = leaf(pgt, MB2)
    assert pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, "the guest's write is still recorded"
    assert pte & KVM_PTE_LEAF_ATTR_LO_S2_AF, "the cmpxchg failed, so AF stays set"
    all_clean(pgt)


def test_seed_001_aging_keeps_af_set_again_after_another_ager() -> None:
    pgt = new_pgt(Stage2Features(ha=True, hd=True))
    writable_clean_page(pgt)
    ager = kvm_pgtable_stage2_test_clear_young(pgt, MB2, PAGE, True, F.SHARED)
    step_until(ager, lambda point: point.startswith("walker read level 3"))
    # Another ager clears AF; then the guest writes: the hardware sets AF and dirty again.
    assert run_to_completion(kvm_pgtable_stage2_test_clear_young(pgt, MB2, PAGE, True, F.SHARED))
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault is None
    assert finish(ager) is True
    pte = leaf(pgt, MB2)
    assert pte & KVM_PTE_LEAF_ATTR_LO_S2_AF and pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    all_clean(pgt)


def plain_store(ctx: KvmPgtableVisitCtx, new: int) -> bool:
    """The planted bug: stage2_try_set_pte without the cmpxchg in a shared walk."""
    ctx.mm_ops.store(ctx.ptep, new, ctx.write_info())
    return True


def test_seed_001_a_plain_store_instead_of_cmpxchg_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pgt = new_pgt(Stage2Features(ha=True, hd=True))
    writable_clean_page(pgt)
    monkeypatch.setattr(stage2, "stage2_try_set_pte", plain_store)
    race_ager_with_guest_write(pgt)
    assert not leaf(pgt, MB2) & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, "the dirty state was lost"
    found = check_no_lost_hardware_updates(pgt.mm_ops.history)
    assert len(found) == 1
    assert found[0].rule == "S001-NO-LOST-UPDATE" and "dirty" in found[0].message


def test_aging_never_writes_an_invalid_entry() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    mapper = map_op(pgt, MB2, PAGE, 0x5000_0000, FAULT)
    step_until(mapper, lambda point: "LOCKED" in point)
    writes = len(pgt.mm_ops.history.events)
    ager = kvm_pgtable_stage2_test_clear_young(pgt, MB2, PAGE, True, F.SHARED)
    assert run_to_completion(ager) is False
    assert len(pgt.mm_ops.history.events) == writes
    assert finish(mapper) == 0
    all_clean(pgt)


# -- RCU: unlinked tables outlive their readers ------------------------------------------------


def replace_table_under_a_reader(pgt: KvmPgtable) -> TablePage:
    """Pages under a level-2 table; a shared ager stops inside that table; a fault maps a
    2 MB block over the range, unlinking the table; returns the unlinked table."""
    assert run_to_completion(map_op(pgt, MB2, 2 * PAGE, 0x4000_0000)) == 0
    ager = kvm_pgtable_stage2_test_clear_young(pgt, MB2, MB2, False, F.SHARED)
    step_until(ager, lambda point: point.startswith("walker read level 3"))
    table = pgt.mm_ops.pages[max(pgt.mm_ops.pages)]  # the level-3 table, allocated last
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4000_0000 + 0, FAULT)) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2 + 3 * PAGE, False)).level == 2
    assert not table.freed, "freed while the ager is still inside"
    assert finish(ager) is True
    return table


def test_a_table_unlinked_under_a_reader_is_freed_only_after_it_leaves() -> None:
    pgt = new_pgt()
    table = replace_table_under_a_reader(pgt)
    assert table.freed
    all_clean(pgt)


def free_at_once(mm_ops: KvmPgtableMmOps, table: TablePage, level: int) -> None:
    """The planted bug: free an unlinked table without waiting for RCU readers."""
    run_to_completion(kvm_pgtable_stage2_free_unlinked(mm_ops, table, level))


def test_a_reader_inside_a_freed_table_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KvmPgtableMmOps, "free_unlinked_table", free_at_once)
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, 2 * PAGE, 0x4000_0000)) == 0
    ager = kvm_pgtable_stage2_test_clear_young(pgt, MB2, MB2, False, F.SHARED)
    step_until(ager, lambda point: point.startswith("walker read level 3"))
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4000_0000, FAULT)) == 0
    finish(ager)
    found = check_no_reads_after_free(pgt.mm_ops.history)
    assert found and {v.rule for v in found} == {"S001-RCU-TABLES"}


# -- splitting, permissions, the hardware's faults and TLB ------------------------------------


def test_splitting_a_block_maps_the_same_memory_with_pages() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4020_0000)) == 0
    mc = KvmMmuMemoryCache(1)
    assert run_to_completion(kvm_pgtable_stage2_split(pgt, 0, 1 << 30, mc)) == 0
    assert mc.nobjs == 0
    for offset in (0, 5 * PAGE, MB2 - PAGE):
        result = run_to_completion(guest_access(pgt, 0, MB2 + offset, True))
        assert (result.level, result.pa) == (3, 0x4020_0000 + offset)
    all_clean(pgt)


def test_splitting_a_1g_block_one_level_at_a_time_when_pages_are_short() -> None:
    """Pages all at once would take 513 table pages (one level-2 table and 512 level-3
    ones); with fewer, the block becomes a table of 2 MB blocks and the walk splits those
    it reaches as it descends."""
    pgt = new_pgt()
    assert split.stage2_block_get_nr_page_tables(pgt, 1) == 513
    assert run_to_completion(map_op(pgt, 1 << 30, 1 << 30, 0x8000_0000)) == 0
    mc = KvmMmuMemoryCache(2)
    assert run_to_completion(kvm_pgtable_stage2_split(pgt, 1 << 30, MB2, mc)) == 0
    assert mc.nobjs == 0
    assert run_to_completion(guest_access(pgt, 0, (1 << 30) + 5 * PAGE, False)).level == 3
    result = run_to_completion(guest_access(pgt, 0, (1 << 30) + 7 * MB2 + 9, False))
    assert (result.level, result.pa) == (2, 0x8000_0000 + 7 * MB2 + 9)
    all_clean(pgt)


def test_splitting_without_pages_is_enomem() -> None:
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4020_0000)) == 0
    split = kvm_pgtable_stage2_split(pgt, MB2, MB2, KvmMmuMemoryCache(0))
    assert run_to_completion(split) == -errno.ENOMEM


def test_without_hardware_af_an_old_page_faults_until_mkyoung() -> None:
    pgt = new_pgt(Stage2Features(ha=False))
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    assert run_to_completion(kvm_pgtable_stage2_test_clear_young(pgt, MB2, PAGE, True))
    __kvm_tlb_flush_vmid(pgt.mmu)
    assert run_to_completion(guest_access(pgt, 0, MB2, False)).fault == "access_flag"
    assert run_to_completion(kvm_pgtable_stage2_mkyoung(pgt, MB2, FAULT)) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2, False)).fault is None


def test_write_protection_waits_for_the_callers_flush() -> None:
    """A7: wrprotect issues no TLBI; a cached writable entry works until the caller
    flushes, then the write takes a permission fault."""
    pgt = new_pgt()
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault is None
    assert run_to_completion(kvm_pgtable_stage2_wrprotect(pgt, MB2, PAGE)) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault is None
    __kvm_tlb_flush_vmid(pgt.mmu)
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault == "permission"
    relax = stage2.kvm_pgtable_stage2_relax_perms(pgt, MB2, KvmPgtableProt.W, FAULT)
    assert run_to_completion(relax) == 0
    assert run_to_completion(guest_access(pgt, 0, MB2, True)).fault is None
    all_clean(pgt)


def test_unmap_cleans_cacheable_memory_without_fwb() -> None:
    pgt = new_pgt(Stage2Features(fwb=False))
    assert run_to_completion(map_op(pgt, MB2, PAGE, 0x4000_0000)) == 0
    assert run_to_completion(kvm_pgtable_stage2_unmap(pgt, MB2, PAGE)) == 0
    kinds = [getattr(e, "kind", None) for e in pgt.mm_ops.history.events]
    # A5: cleaned before the mapping was made, and again when it was removed.
    assert kinds.count("dcache_clean_inval_poc") == 2
    all_clean(pgt)


# -- A4 and A6: the leaves themselves -----------------------------------------------------------


def test_a_block_over_a_misaligned_output_address_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planted bug: the block test forgets the output address's alignment, so a 2 MB
    block is installed over a PA that is only page-aligned (A4)."""

    def fits_ignoring_pa(ctx: KvmPgtableVisitCtx, phys: int) -> bool:
        granule = ctx.mm_ops.geometry.kvm_granule_size(ctx.level)
        level_ok = ctx.mm_ops.geometry.kvm_level_supports_block_mapping(ctx.level)
        return level_ok and granule <= ctx.end - ctx.addr and ctx.addr % granule == 0

    pgt = new_pgt()
    monkeypatch.setattr(stage2, "kvm_block_mapping_supported", fits_ignoring_pa)
    assert run_to_completion(map_op(pgt, MB2, MB2, 0x4040_1000)) == 0
    assert [v.rule for v in check_stage2(pgt)] == ["A4"]


def test_device_memory_is_mapped_execute_never(monkeypatch: pytest.MonkeyPatch) -> None:
    """A6: a device mapping without X is XN, and one asking for X is refused with EINVAL
    (stage2_set_prot_attr). A model that installs it anyway is caught by the leaf check."""
    pgt = new_pgt()
    device = KvmPgtableProt.DEVICE | KVM_PGTABLE_PROT_RW
    mc = KvmMmuMemoryCache(8)
    assert run_to_completion(kvm_pgtable_stage2_map(pgt, MB2, PAGE, 0x9000_0000, device, mc)) == 0
    all_clean(pgt)
    executable = device | KvmPgtableProt.X
    op = kvm_pgtable_stage2_map(pgt, MB2 + PAGE, PAGE, 0x9000_1000, executable, mc)
    assert run_to_completion(op) == -errno.EINVAL
    all_clean(pgt)

    original = stage2.stage2_set_prot_attr

    def allows_executable_device(pgt: KvmPgtable, prot: KvmPgtableProt) -> tuple[int, int]:
        _error, attr = original(pgt, prot & ~KvmPgtableProt.X)
        return 0, attr & ~KVM_PTE_LEAF_ATTR_HI_S2_XN  # XN cleared: executable

    monkeypatch.setattr(stage2, "stage2_set_prot_attr", allows_executable_device)
    op = kvm_pgtable_stage2_map(pgt, MB2 + PAGE, PAGE, 0x9000_1000, executable, mc)
    assert run_to_completion(op) == 0
    assert [v.rule for v in check_stage2(pgt)] == ["A6"]
