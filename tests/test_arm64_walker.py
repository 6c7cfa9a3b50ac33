"""The stage-2 walker: the kernel's visit order (TABLE_PRE, children, TABLE_POST; LEAF
for leaves), every leaf of a misaligned range visited exactly once, ERANGE beyond the IPA
space, and table reference counts (A3) after maps and unmaps."""

from __future__ import annotations

import errno
import itertools

from hypothesis import given
from hypothesis import strategies as st

from kvmspec.reference.arm64.descriptors import KVM_PGTABLE_PROT_RW
from kvmspec.reference.arm64.pgtable import (
    KvmMmuMemoryCache,
    KvmPgtable,
    KvmPgtableVisitCtx,
    KvmPgtableWalker,
    KvmPgtableWalkFlags,
    kvm_pgtable_walk,
)
from kvmspec.reference.arm64.s2_mmu import Stage2Features
from kvmspec.reference.arm64.stage2 import (
    kvm_pgtable_stage2_init,
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_unmap,
)
from kvmspec.reference.concurrency import KernelOp, Rcu, run_to_completion
from kvmspec.spec.invariants.arm64 import (
    check_leaves,
    check_no_freed_table_reachable,
    check_no_reads_after_free,
    check_table_refcounts,
)

F = KvmPgtableWalkFlags
MB2 = 2 << 20
GB = 1 << 30


def new_pgt() -> KvmPgtable:
    return kvm_pgtable_stage2_init(40, 12, Rcu("rcu"), Stage2Features())


def map_range(pgt: KvmPgtable, ipa: int, size: int, pa: int) -> None:
    ret = run_to_completion(
        kvm_pgtable_stage2_map(pgt, ipa, size, pa, KVM_PGTABLE_PROT_RW, KvmMmuMemoryCache(64))
    )
    assert ret == 0


Visit = tuple[str, int, int]


def record(pgt: KvmPgtable, addr: int, size: int, flags: KvmPgtableWalkFlags) -> list[Visit]:
    visits: list[Visit] = []

    def cb(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        yield from ()
        visits.append((visit.name or "", ctx.level, ctx.addr))
        return 0

    assert run_to_completion(kvm_pgtable_walk(pgt, addr, size, KvmPgtableWalker(cb, flags))) == 0
    return visits


def test_visit_order_is_pre_children_post() -> None:
    pgt = new_pgt()
    map_range(pgt, MB2, 4096, 0x8000_0000)  # a page: tables at levels 1 and 2
    visits = record(pgt, MB2, 2 * 4096, F.LEAF | F.TABLE_PRE | F.TABLE_POST)
    assert visits == [
        ("TABLE_PRE", 1, MB2),
        ("TABLE_PRE", 2, MB2),
        ("LEAF", 3, MB2),
        ("LEAF", 3, MB2 + 4096),
        ("TABLE_POST", 2, MB2),
        ("TABLE_POST", 1, MB2),
    ]


def test_a_walk_steps_over_an_empty_entry_at_its_level() -> None:
    pgt = new_pgt()
    # Nothing mapped: one LEAF per 1 GB entry at the start level.
    assert record(pgt, GB - 4096, 8192, F.LEAF) == [("LEAF", 1, GB - 4096), ("LEAF", 1, GB)]


def test_a_range_beyond_the_ipa_space_is_erange() -> None:
    pgt = new_pgt()
    visits: list[int] = []

    def cb(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        yield from ()
        visits.append(ctx.addr)
        return 0

    walker = KvmPgtableWalker(cb, F.LEAF)
    assert run_to_completion(kvm_pgtable_walk(pgt, (1 << 40) - 4096, 8192, walker)) == -errno.ERANGE
    assert visits == []


mappings = st.lists(
    st.tuples(st.integers(0, 63), st.sampled_from([4096, MB2]), st.integers(1, 3)),
    max_size=6,
)


def build(layout: list[tuple[int, int, int]]) -> KvmPgtable:
    """Pages and blocks within the first 128 MB: (slot, leaf size, how many leaves)."""
    pgt = new_pgt()
    for slot, size, count in layout:
        ipa = slot * MB2 if size == MB2 else slot * MB2 + slot * 4096
        map_range(pgt, ipa, size * count, 0x1_0000_0000 + ipa)
    return pgt


@given(mappings, st.integers(0, 130 * MB2), st.integers(1, 8 * MB2))
def test_each_leaf_of_a_misaligned_range_is_visited_exactly_once(
    layout: list[tuple[int, int, int]], start: int, size: int
) -> None:
    pgt = build(layout)
    visits = record(pgt, start, size, F.LEAF)
    covered = []
    for _visit, level, addr in visits:
        granule = pgt.geometry.kvm_granule_size(level)
        covered.append((addr & ~(granule - 1), granule))
    # The leaves tile the page-aligned range: in order, without gap or overlap.
    first = start & ~4095
    end = (start + size + 4095) & ~4095
    assert covered[0][0] <= first < covered[0][0] + covered[0][1]
    for (base, granule), (next_base, _) in itertools.pairwise(covered):
        assert next_base == base + granule
    last_base, last_granule = covered[-1]
    assert last_base < end <= last_base + last_granule


@given(mappings, st.lists(st.tuples(st.integers(0, 64 * MB2), st.integers(1, 4 * MB2)), max_size=4))
def test_table_refcounts_after_maps_and_unmaps(
    layout: list[tuple[int, int, int]], unmaps: list[tuple[int, int]]
) -> None:
    pgt = build(layout)
    assert check_table_refcounts(pgt) == []
    assert check_leaves(pgt) == []
    for start, size in unmaps:
        assert run_to_completion(kvm_pgtable_stage2_unmap(pgt, start, size)) == 0
        assert check_table_refcounts(pgt) == []
        assert check_no_freed_table_reachable(pgt) == []
        assert check_leaves(pgt) == []
    assert check_no_reads_after_free(pgt.mm_ops.history) == []


def test_unmapping_everything_frees_every_table_below_the_pgd() -> None:
    pgt = build([(1, 4096, 3), (5, MB2, 2)])
    assert run_to_completion(kvm_pgtable_stage2_unmap(pgt, 0, 1 << 40)) == 0
    pgd = {page.pa for page in pgt.pgd or []}
    live = [page for page in pgt.mm_ops.pages.values() if page.pa not in pgd and not page.freed]
    assert live == []
    assert check_table_refcounts(pgt) == []
