"""Eager page splitting: when dirty logging starts, KVM splits the VM's blocks into pages
ahead of time, so guest writes fault on pages rather than on whole blocks. Each block is
rebuilt off to the side as an unlinked table mapping the same memory with the same
permissions, then swapped in with break-before-make.

kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_split, stage2_split_walker,
kvm_pgtable_stage2_create_unlinked, stage2_block_get_nr_page_tables (v6.18)
"""

from __future__ import annotations

import errno

from kvmspec.reference.arm64.descriptors import (
    KVM_PGTABLE_LAST_LEVEL,
    KvmPgtableProt,
    kvm_init_table_pte,
    kvm_pte_to_phys,
    kvm_pte_valid,
)
from kvmspec.reference.arm64.pgtable import (
    KvmMmuMemoryCache,
    KvmPgtable,
    KvmPgtableVisitCtx,
    KvmPgtableWalkData,
    KvmPgtableWalker,
    KvmPgtableWalkFlags,
    TablePage,
    __kvm_pgtable_walk,
    kvm_pgtable_stage2_free_unlinked,
    kvm_pgtable_walk,
)
from kvmspec.reference.arm64.stage2 import (
    Stage2MapData,
    kvm_pgtable_stage2_pte_prot,
    stage2_make_pte,
    stage2_map_walker,
    stage2_set_prot_attr,
    stage2_try_break_pte,
)
from kvmspec.reference.concurrency import KernelOp, Preempt

Flags = KvmPgtableWalkFlags


def stage2_block_get_nr_page_tables(pgt: KvmPgtable, level: int) -> int:
    """Table pages needed to split a block at ``level`` down to pages: none at the last
    level, one for a level-2 block, one plus a page per entry for a 1 GB block."""
    if level == KVM_PGTABLE_LAST_LEVEL:
        return 0
    if level == KVM_PGTABLE_LAST_LEVEL - 1:
        return 1
    if level == KVM_PGTABLE_LAST_LEVEL - 2:
        return 1 + pgt.geometry.ptrs_per_pte
    return -errno.EINVAL


def kvm_pgtable_stage2_create_unlinked(
    pgt: KvmPgtable,
    phys: int,
    level: int,
    prot: KvmPgtableProt,
    mc: KvmMmuMemoryCache,
    force_pte: bool,
) -> KernelOp[TablePage | int]:
    """Build, off to the side, a table that maps what one ``level`` entry maps (``phys``
    onwards) with smaller leaves: pages only with ``force_pte``, else the largest leaves
    one level down. No TLBI or CMO is needed, since nothing can reach it yet. Returns the
    table or a negative errno.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_create_unlinked (v6.18)
    """
    geometry = pgt.geometry
    if phys % geometry.kvm_granule_size(level):
        return -errno.EINVAL
    error, attr = stage2_set_prot_attr(pgt, prot)
    if error:
        return error
    data = Stage2MapData(phys, attr, mc, force_pte)
    map_walker = stage2_map_walker(pgt, data)
    walker = KvmPgtableWalker(map_walker.cb, Flags.LEAF | Flags.SKIP_BBM_TLBI | Flags.SKIP_CMO)
    table = pgt.mm_ops.zalloc_page(mc)
    if table is None:
        return -errno.ENOMEM
    # The IPA is irrelevant for an unlinked table: walk [0, size of a level entry).
    walk = KvmPgtableWalkData(walker, 0, 0, geometry.kvm_granule_size(level))
    ret = yield from __kvm_pgtable_walk(walk, pgt.mm_ops, table, level + 1)
    if ret:
        yield from kvm_pgtable_stage2_free_unlinked(pgt.mm_ops, table, level)
        return ret
    return table


def kvm_pgtable_stage2_split(
    pgt: KvmPgtable, addr: int, size: int, mc: KvmMmuMemoryCache
) -> KernelOp[int]:
    """Eager page splitting (dirty logging starts): replace each block of the range by a
    table mapping the same memory with the same permissions, built unlinked and swapped
    in with break-before-make. With enough pages in the cache the new table maps pages
    directly; otherwise one level at a time, and the walk descends into the new table and
    splits again.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_split, stage2_split_walker
    (v6.18)
    """

    def stage2_split_walker(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        mm_ops = ctx.mm_ops
        if ctx.level == KVM_PGTABLE_LAST_LEVEL or not kvm_pte_valid(ctx.old):
            return 0
        nr_pages = stage2_block_get_nr_page_tables(pgt, ctx.level)
        if nr_pages < 0:
            return nr_pages
        force_pte = mc.nobjs >= nr_pages
        if not force_pte:
            nr_pages = 1
        if mc.nobjs < nr_pages:
            return -errno.ENOMEM
        phys = kvm_pte_to_phys(ctx.old, mm_ops.geometry.page_shift)
        prot = kvm_pgtable_stage2_pte_prot(ctx.old)
        child = yield from kvm_pgtable_stage2_create_unlinked(
            pgt, phys, ctx.level, prot, mc, force_pte
        )
        if isinstance(child, int):
            return child
        if not stage2_try_break_pte(ctx, pgt.mmu):
            yield from kvm_pgtable_stage2_free_unlinked(mm_ops, child, ctx.level)
            return -errno.EAGAIN
        yield Preempt(f"split: IPA {ctx.addr:#x} LOCKED")
        stage2_make_pte(ctx, kvm_init_table_pte(child.pa, mm_ops.geometry.page_shift))
        return 0

    walker = KvmPgtableWalker(stage2_split_walker, Flags.LEAF)
    return (yield from kvm_pgtable_walk(pgt, addr, size, walker))
