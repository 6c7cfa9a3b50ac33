"""The stage-2 operations of the page-table library: map, unmap, permission changes and
aging, each a walker over :mod:`~kvmspec.reference.arm64.pgtable`.

Every change that replaces a valid entry by a different valid one goes through
break-before-make (A1): :func:`stage2_try_break_pte` locks the entry (invalid, with
KVM_INVALID_PTE_LOCKED) and invalidates the TLB for what it held, the cache maintenance the
new mapping needs is done, and :func:`stage2_make_pte` writes the new entry. In a shared
walk the lock is a cmpxchg against the value the walker read, so of two walkers racing on
one entry exactly one wins and the other gets EAGAIN (A2). Changes that the architecture
allows in place (permissions, AF, software bits) use :func:`stage2_try_set_pte`: a plain
store when the walker has the tables to itself, a cmpxchg in a shared walk, so a change the
hardware or another walker made after the read is never overwritten.

Every operation is a generator (``KernelOp[int]`` returning 0 or a negative errno, as the
kernel's functions return): run it with ``run_to_completion``, or interleave it with others.

kernel: arch/arm64/kvm/hyp/pgtable.c (v6.18)
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from kvmspec.reference.arm64.descriptors import (
    KVM_INVALID_PTE_LOCKED,
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PTE_LEAF_ATTR_HI,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_HI_S2_XN_XN,
    KVM_PTE_LEAF_ATTR_HI_SW,
    KVM_PTE_LEAF_ATTR_LO,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_LEAF_ATTR_LO_S2_SH,
    KVM_PTE_LEAF_ATTR_LO_S2_SH_IS,
    KVM_PTE_LEAF_ATTR_S2_DBM,
    KVM_PTE_LEAF_ATTR_S2_PERMS,
    KvmPgtableProt,
    field_get,
    field_prep,
    kvm_init_table_pte,
    kvm_init_valid_leaf_pte,
    kvm_pte_table,
    kvm_pte_to_phys,
    kvm_pte_valid,
    kvm_s2_memattr,
    kvm_stage2_geometry,
    stage2_pte_is_counted,
    stage2_pte_is_locked,
)
from kvmspec.reference.arm64.history import Stage2History
from kvmspec.reference.arm64.pgtable import (
    NO_WALK_FLAGS,
    KvmMmuMemoryCache,
    KvmPgtable,
    KvmPgtableMmOps,
    KvmPgtableVisitCtx,
    KvmPgtableWalker,
    KvmPgtableWalkFlags,
    WriteInfo,
    kvm_pgtable_walk,
)
from kvmspec.reference.arm64.s2_mmu import (
    KvmS2Mmu,
    Stage2Features,
    __kvm_tlb_flush_vmid_ipa,
    __kvm_tlb_flush_vmid_ipa_nsh,
    kvm_tlb_flush_vmid_range,
)
from kvmspec.reference.concurrency import KernelOp, Preempt, Rcu

Flags = KvmPgtableWalkFlags


def kvm_pgtable_stage2_init(
    ia_bits: int,
    page_shift: int,
    rcu: Rcu,
    features: Stage2Features,
    force_pte_cb: Callable[[int, int, int], bool] | None = None,
) -> KvmPgtable:
    """A VM's empty stage 2: the geometry for its IPA size and granule, and a zeroed PGD of
    kvm_pgd_pages concatenated pages. ``rcu`` is the RCU that shared walkers read under.

    kernel: arch/arm64/kvm/hyp/pgtable.c:__kvm_pgtable_stage2_init (v6.18)
    """
    geometry = kvm_stage2_geometry(ia_bits, page_shift)
    history = Stage2History()
    mm_ops = KvmPgtableMmOps(geometry, history, rcu)
    pgd = mm_ops.zalloc_pages_exact(geometry.kvm_pgd_pages())
    return KvmPgtable(geometry, mm_ops, KvmS2Mmu(features, history), pgd, force_pte_cb)


# -- attributes ------------------------------------------------------------------------------


def stage2_has_fwb(pgt: KvmPgtable) -> bool:
    return pgt.mmu.features.fwb


def stage2_set_prot_attr(pgt: KvmPgtable, prot: KvmPgtableProt) -> tuple[int, int]:
    """(0, the leaf attributes for ``prot``) or (-EINVAL, 0). The attributes: memory type,
    S2AP, SH inner shareable, AF set (a fresh mapping counts as accessed), XN unless
    executable, the software bits. With hardware dirty state (``hd``, a model option) a
    writable mapping also gets DBM, so write-protecting it later leaves it writable-clean.
    Device or non-cacheable memory is never executable (A6): asking for X there, or for
    both memory types at once, is refused.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_set_prot_attr (v6.18)
    """
    uncached = prot & (KvmPgtableProt.DEVICE | KvmPgtableProt.NORMAL_NC)
    if uncached == KvmPgtableProt.DEVICE | KvmPgtableProt.NORMAL_NC:
        return -errno.EINVAL, 0
    if uncached and prot & KvmPgtableProt.X:
        return -errno.EINVAL, 0
    if prot & KvmPgtableProt.DEVICE:
        attr = kvm_s2_memattr("DEVICE_nGnRE", stage2_has_fwb(pgt))
    elif prot & KvmPgtableProt.NORMAL_NC:
        attr = kvm_s2_memattr("NORMAL_NC", stage2_has_fwb(pgt))
    else:
        attr = kvm_s2_memattr("NORMAL", stage2_has_fwb(pgt))
    if not prot & KvmPgtableProt.X:
        attr |= field_prep(KVM_PTE_LEAF_ATTR_HI_S2_XN, KVM_PTE_LEAF_ATTR_HI_S2_XN_XN)
    if prot & KvmPgtableProt.R:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KvmPgtableProt.W:
        attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
        if pgt.mmu.features.hd:
            attr |= KVM_PTE_LEAF_ATTR_S2_DBM
    attr |= field_prep(KVM_PTE_LEAF_ATTR_LO_S2_SH, KVM_PTE_LEAF_ATTR_LO_S2_SH_IS)
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_AF
    return 0, attr | (int(prot) & KVM_PTE_LEAF_ATTR_HI_SW)


def kvm_pgtable_stage2_pte_prot(pte: int) -> KvmPgtableProt:
    """The permissions a leaf grants, as a prot (used to rebuild a block as pages).

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_pte_prot (v6.18)
    """
    prot = KvmPgtableProt(pte & KVM_PTE_LEAF_ATTR_HI_SW)
    if not kvm_pte_valid(pte):
        return prot
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R:
        prot |= KvmPgtableProt.R
    if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
        prot |= KvmPgtableProt.W
    if field_get(KVM_PTE_LEAF_ATTR_HI_S2_XN, pte) == 0:
        prot |= KvmPgtableProt.X
    return prot


def stage2_pte_needs_update(old: int, new: int) -> bool:
    """False when the new leaf equals the old one but for permissions: the fault path then
    returns EAGAIN and relaxes permissions instead (no break-before-make needed)."""
    if not kvm_pte_valid(old) or not kvm_pte_valid(new):
        return True
    return bool((old ^ new) & ~KVM_PTE_LEAF_ATTR_S2_PERMS)


def stage2_pte_cacheable(pgt: KvmPgtable, pte: int) -> bool:
    memattr = pte & KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR
    return kvm_pte_valid(pte) and memattr == kvm_s2_memattr("NORMAL", stage2_has_fwb(pgt))


def stage2_pte_executable(pte: int) -> bool:
    return kvm_pte_valid(pte) and not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN


# -- the three primitives of every update -----------------------------------------------------


def stage2_try_set_pte(ctx: KvmPgtableVisitCtx, new: int) -> bool:
    """Write ``new`` over the value the walker read. Alone on the tables (mmu_lock held for
    write) a plain store suffices; in a shared walk it is a cmpxchg against ``ctx.old``, and
    False means someone (another walker, or the hardware setting AF or dirty) changed the
    entry since: the caller returns EAGAIN rather than overwrite that change.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_set_pte (v6.18)
    """
    mm_ops = ctx.mm_ops
    if not ctx.shared:
        mm_ops.store(ctx.ptep, new, ctx.write_info())
        return True
    if mm_ops.read(ctx.ptep, "cmpxchg") != ctx.old:
        return False
    mm_ops.store(ctx.ptep, new, ctx.write_info())
    return True


def stage2_try_break_pte(ctx: KvmPgtableVisitCtx, mmu: KvmS2Mmu) -> bool:
    """Break: lock the entry (invalid + LOCKED), then invalidate what the TLBs may hold for
    its old value (the whole range under a table, the IPA for a leaf) and drop the old
    value's reference on the table page. False if another walker holds the lock or the
    entry changed since it was read; a walker with the tables to itself never meets a
    locked entry (WARN).

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_try_break_pte (v6.18)
    """
    mm_ops = ctx.mm_ops
    if stage2_pte_is_locked(ctx.old):
        mm_ops.warn_on(not ctx.shared, "A2: an exclusive walker met a LOCKED entry")
        return False
    if not stage2_try_set_pte(ctx, KVM_INVALID_PTE_LOCKED):
        return False
    if not ctx.flags & Flags.SKIP_BBM_TLBI:
        if kvm_pte_table(ctx.old, ctx.level):
            size = mm_ops.geometry.kvm_granule_size(ctx.level)
            kvm_tlb_flush_vmid_range(mmu, ctx.addr & ~(size - 1), size)
        elif kvm_pte_valid(ctx.old):
            __kvm_tlb_flush_vmid_ipa(mmu, ctx.addr, ctx.level)
    if stage2_pte_is_counted(ctx.old):
        mm_ops.put_page(ctx.ptep.table)
    return True


def stage2_make_pte(ctx: KvmPgtableVisitCtx, new: int) -> None:
    """Make: write the new entry over our LOCKED one (a release store, so the contents of
    a new table are visible before the entry that links it), taking a reference on the
    table page if the new value is counted.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_make_pte (v6.18)
    """
    mm_ops = ctx.mm_ops
    current = mm_ops.read(ctx.ptep, "stage2_make_pte")
    mm_ops.warn_on(not stage2_pte_is_locked(current), "A2: make on an entry not LOCKED")
    if stage2_pte_is_counted(new):
        mm_ops.get_page(ctx.ptep.table)
    info = ctx.write_info()
    mm_ops.store(ctx.ptep, new, WriteInfo(info.ipa, info.size, current, "software", ctx.shared))


# -- map -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stage2MapData:
    """struct stage2_map_data: the output address of the range's start, the attributes,
    the memory cache for new tables, and whether only pages may be used."""

    phys: int
    attr: int
    memcache: KvmMmuMemoryCache | None
    force_pte: bool


def kvm_block_mapping_supported(ctx: KvmPgtableVisitCtx, phys: int) -> bool:
    """A4: a leaf at this level fits: the level allows one, the rest of the range covers
    it, and both the IPA and the output address are aligned to its size."""
    geometry = ctx.mm_ops.geometry
    granule = geometry.kvm_granule_size(ctx.level)
    if not geometry.kvm_level_supports_block_mapping(ctx.level):
        return False
    if granule > ctx.end - ctx.addr:
        return False
    return phys % granule == 0 and ctx.addr % granule == 0


def stage2_leaf_mapping_allowed(ctx: KvmPgtableVisitCtx, data: Stage2MapData) -> bool:
    phys = data.phys + (ctx.addr - ctx.start)
    if data.force_pte and ctx.level < KVM_PGTABLE_LAST_LEVEL:
        return False
    return kvm_block_mapping_supported(ctx, phys)


def stage2_map_walker_try_leaf(
    pgt: KvmPgtable, ctx: KvmPgtableVisitCtx, data: Stage2MapData
) -> KernelOp[int]:
    """Install the leaf for ``ctx.addr`` at this level. E2BIG: a leaf does not fit here
    (go one level down). EAGAIN: the same mapping but for permissions is already there,
    or another walker won the entry. Only the software bits changing is done in place;
    everything else goes through break-before-make, cleaning the data cache first for
    cacheable memory without FWB (A5) and the instruction cache for executable memory."""
    mm_ops = ctx.mm_ops
    if not stage2_leaf_mapping_allowed(ctx, data):
        return -errno.E2BIG
    phys = data.phys + (ctx.addr - ctx.start)
    granule = mm_ops.geometry.kvm_granule_size(ctx.level)
    new = kvm_init_valid_leaf_pte(phys, data.attr, ctx.level, mm_ops.geometry.page_shift)
    if not stage2_pte_needs_update(ctx.old, new):
        return -errno.EAGAIN
    if not ctx.shared and not (ctx.old ^ new) & ~KVM_PTE_LEAF_ATTR_HI_SW:
        if stage2_pte_is_counted(ctx.old) != stage2_pte_is_counted(new):
            if stage2_pte_is_counted(ctx.old):
                mm_ops.put_page(ctx.ptep.table)
            else:
                mm_ops.get_page(ctx.ptep.table)
        stage2_try_set_pte(ctx, new)
        return 0
    if not stage2_try_break_pte(ctx, pgt.mmu):
        return -errno.EAGAIN
    yield Preempt(f"break-before-make: IPA {ctx.addr:#x} LOCKED")
    if not ctx.flags & Flags.SKIP_CMO:
        if stage2_pte_cacheable(pgt, new) and not stage2_has_fwb(pgt):
            mm_ops.dcache_clean_inval_poc(phys, granule)
        if stage2_pte_executable(new):
            mm_ops.icache_inval_pou(phys, granule)
    stage2_make_pte(ctx, new)
    return 0


def stage2_map_walker(pgt: KvmPgtable, data: Stage2MapData) -> KvmPgtableWalker:
    """TABLE_PRE replaces a whole table by a block when the block fits (the old table is
    freed through RCU, since shared walkers may still be inside it); LEAF installs the
    leaf, or a new table under it when the leaf is too big for the range.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_map_walker, stage2_map_walk_table_pre,
    stage2_map_walk_leaf (v6.18)
    """

    def cb(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        mm_ops = ctx.mm_ops
        page_shift = mm_ops.geometry.page_shift
        if visit == Flags.TABLE_PRE:
            if not stage2_leaf_mapping_allowed(ctx, data):
                return 0
            child = mm_ops.phys_to_virt(kvm_pte_to_phys(ctx.old, page_shift))
            ret = yield from stage2_map_walker_try_leaf(pgt, ctx, data)
            if ret:
                return ret
            mm_ops.free_unlinked_table(child, ctx.level)
            return 0
        if visit != Flags.LEAF:
            return -errno.EINVAL
        ret = yield from stage2_map_walker_try_leaf(pgt, ctx, data)
        if ret != -errno.E2BIG:
            return ret
        if mm_ops.warn_on(ctx.level == KVM_PGTABLE_LAST_LEVEL, "map: no leaf fits a page"):
            return -errno.EINVAL
        table = mm_ops.zalloc_page(data.memcache)
        if table is None:
            return -errno.ENOMEM
        if not stage2_try_break_pte(ctx, pgt.mmu):
            mm_ops.put_page(table)
            return -errno.EAGAIN
        yield Preempt(f"break-before-make: IPA {ctx.addr:#x} LOCKED for a new table")
        # Replacing a block: the rest of the block's range is faulted back in lazily.
        stage2_make_pte(ctx, kvm_init_table_pte(table.pa, page_shift))
        return 0

    return KvmPgtableWalker(cb, Flags.TABLE_PRE | Flags.LEAF)


def kvm_pgtable_stage2_map(
    pgt: KvmPgtable,
    addr: int,
    size: int,
    phys: int,
    prot: KvmPgtableProt,
    mc: KvmMmuMemoryCache | None,
    flags: KvmPgtableWalkFlags = NO_WALK_FLAGS,
) -> KernelOp[int]:
    """Map [addr, addr + size) to ``phys`` with ``prot``, using the largest leaves that fit
    (A4) unless the table forces pages for this range (dirty logging). ``flags`` carries
    SHARED and HANDLE_FAULT when the fault path calls it under the read lock.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_map (v6.18)
    """
    error, attr = stage2_set_prot_attr(pgt, prot)
    if error:
        return error
    force_pte = pgt.force_pte_cb is not None and pgt.force_pte_cb(addr, addr + size, prot)
    data = Stage2MapData(phys & ~(pgt.geometry.page_size - 1), attr, mc, force_pte)
    walker = stage2_map_walker(pgt, data)
    walker = KvmPgtableWalker(walker.cb, walker.flags | flags)
    return (yield from kvm_pgtable_walk(pgt, addr, size, walker))


# -- unmap -----------------------------------------------------------------------------------


def stage2_unmap_defer_tlb_flush(pgt: KvmPgtable) -> bool:
    """With range TLBIs, one invalidation at the end replaces one per leaf; only with FWB,
    since without it the walk does cache maintenance per leaf anyway."""
    return pgt.mmu.features.tlb_range and stage2_has_fwb(pgt)


def kvm_pgtable_stage2_unmap(pgt: KvmPgtable, addr: int, size: int) -> KernelOp[int]:
    """Remove every leaf and owner annotation in the range; on the way back up, unlink and
    free each table left empty (count 1). A whole block is removed even when the range
    covers part of it: the rest is faulted back lazily. Cacheable memory is cleaned to
    PoC when FWB is absent. Runs with mmu_lock held for write (not shared).

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_unmap, stage2_unmap_walker,
    stage2_unmap_put_pte (v6.18)
    """
    mmu = pgt.mmu

    def stage2_unmap_walker(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        yield from ()  # runs alone under the write lock: nothing to wait for
        mm_ops = ctx.mm_ops
        geometry = mm_ops.geometry
        if not kvm_pte_valid(ctx.old):
            if stage2_pte_is_counted(ctx.old):
                mm_ops.store(ctx.ptep, 0, ctx.write_info())
                mm_ops.put_page(ctx.ptep.table)
            return 0
        child = None
        need_flush = False
        if kvm_pte_table(ctx.old, ctx.level):
            child = mm_ops.phys_to_virt(kvm_pte_to_phys(ctx.old, geometry.page_shift))
            if mm_ops.page_count(child) != 1:
                return 0
        elif stage2_pte_cacheable(pgt, ctx.old):
            need_flush = not stage2_has_fwb(pgt)
        # stage2_unmap_put_pte: clear, then invalidate unless deferred to the end.
        mm_ops.store(ctx.ptep, 0, ctx.write_info())
        granule = geometry.kvm_granule_size(ctx.level)
        if child is not None:
            kvm_tlb_flush_vmid_range(mmu, ctx.addr & ~(granule - 1), granule)
        elif not stage2_unmap_defer_tlb_flush(pgt):
            __kvm_tlb_flush_vmid_ipa(mmu, ctx.addr, ctx.level)
        mm_ops.put_page(ctx.ptep.table)
        if need_flush:
            mm_ops.dcache_clean_inval_poc(kvm_pte_to_phys(ctx.old, geometry.page_shift), granule)
        if child is not None:
            mm_ops.put_page(child)
        return 0

    walker = KvmPgtableWalker(stage2_unmap_walker, Flags.LEAF | Flags.TABLE_POST)
    ret = yield from kvm_pgtable_walk(pgt, addr, size, walker)
    if stage2_unmap_defer_tlb_flush(pgt):
        kvm_tlb_flush_vmid_range(mmu, addr, size)
    return ret


# -- attribute updates: wrprotect, relax_perms, mkyoung --------------------------------------


@dataclass(slots=True)
class Stage2AttrResult:
    """What stage2_update_leaf_attrs reports: the errno, the last leaf's old value and
    level (None when no valid leaf was visited)."""

    ret: int
    pte: int = 0
    level: int | None = None


def stage2_update_leaf_attrs(
    pgt: KvmPgtable,
    addr: int,
    size: int,
    attr_set: int,
    attr_clr: int,
    flags: KvmPgtableWalkFlags,
) -> KernelOp[Stage2AttrResult]:
    """Set and clear leaf attribute bits on every valid leaf of the range, in place (no
    break-before-make: only permissions and AF change). An invalid entry is EAGAIN;
    adding execute permission invalidates the instruction cache first.

    kernel: arch/arm64/kvm/hyp/pgtable.c:stage2_update_leaf_attrs, stage2_attr_walker
    (v6.18)
    """
    attr_mask = KVM_PTE_LEAF_ATTR_LO | KVM_PTE_LEAF_ATTR_HI
    result = Stage2AttrResult(0)

    def stage2_attr_walker(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        yield from ()  # the race window is the walker's, before this callback
        if not kvm_pte_valid(ctx.old):
            return -errno.EAGAIN
        result.level = ctx.level
        result.pte = ctx.old
        pte = (ctx.old & ~(attr_clr & attr_mask)) | (attr_set & attr_mask)
        if pte != ctx.old:
            if stage2_pte_executable(pte) and not stage2_pte_executable(ctx.old):
                granule = ctx.mm_ops.geometry.kvm_granule_size(ctx.level)
                ctx.mm_ops.icache_inval_pou(
                    kvm_pte_to_phys(pte, ctx.mm_ops.geometry.page_shift), granule
                )
            if not stage2_try_set_pte(ctx, pte):
                return -errno.EAGAIN
        return 0

    walker = KvmPgtableWalker(stage2_attr_walker, flags | Flags.LEAF)
    result.ret = yield from kvm_pgtable_walk(pgt, addr, size, walker)
    return result


def kvm_pgtable_stage2_wrprotect(pgt: KvmPgtable, addr: int, size: int) -> KernelOp[int]:
    """Clear W on every leaf of the range (dirty logging). No TLBI here: the caller
    flushes before relying on it (A7).

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_wrprotect (v6.18)
    """
    result = yield from stage2_update_leaf_attrs(
        pgt, addr, size, 0, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, NO_WALK_FLAGS
    )
    return result.ret


def kvm_pgtable_stage2_relax_perms(
    pgt: KvmPgtable, addr: int, prot: KvmPgtableProt, flags: KvmPgtableWalkFlags
) -> KernelOp[int]:
    """Add the permissions of ``prot`` to the leaf at ``addr`` (a permission fault at the
    granule already mapped), then invalidate that IPA on this CPU so the faulting access
    sees the new permissions. Software bits are EINVAL: they are not permissions.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_relax_perms (v6.18)
    """
    if prot & KVM_PTE_LEAF_ATTR_HI_SW:
        return -errno.EINVAL
    attr_set = 0
    attr_clr = 0
    if prot & KvmPgtableProt.R:
        attr_set |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R
    if prot & KvmPgtableProt.W:
        attr_set |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    if prot & KvmPgtableProt.X:
        attr_clr |= KVM_PTE_LEAF_ATTR_HI_S2_XN
    result = yield from stage2_update_leaf_attrs(pgt, addr, 1, attr_set, attr_clr, flags)
    if result.ret in (0, -errno.EAGAIN):
        __kvm_tlb_flush_vmid_ipa_nsh(pgt.mmu, addr, result.level)
    return result.ret


def kvm_pgtable_stage2_mkyoung(
    pgt: KvmPgtable, addr: int, flags: KvmPgtableWalkFlags
) -> KernelOp[int]:
    """Set AF on the leaf at ``addr``: KVM's answer to an access-flag fault on hardware
    without FEAT_HAFDBS (handle_access_fault). No TLBI: an entry with AF clear is never
    cached, so there is nothing stale.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_mkyoung (v6.18)
    """
    result = yield from stage2_update_leaf_attrs(pgt, addr, 1, KVM_PTE_LEAF_ATTR_LO_S2_AF, 0, flags)
    return result.ret


# -- aging -----------------------------------------------------------------------------------


def kvm_pgtable_stage2_test_clear_young(
    pgt: KvmPgtable, addr: int, size: int, mkold: bool, flags: KvmPgtableWalkFlags = NO_WALK_FLAGS
) -> KernelOp[bool]:
    """Was any leaf of the range accessed (AF set)? With ``mkold``, clear AF on each. An
    invalid entry is skipped, never written (it could be another walker's LOCKED entry).
    No TLBI: the core MMU notifier flushes (clear_flush_young), or deliberately does not.

    v6.18 calls this with mmu_lock held for write (``flags`` 0). Seed 001 proposed calling
    it without the lock (SHARED: an RCU reader, so tables are not freed under it; and
    cmpxchg through stage2_try_set_pte, so neither the hardware's AF and dirty updates nor
    another walker's change made after the read is overwritten): the entry keeps them and
    the walk goes on (EAGAIN does not stop a walk that is not a fault's).

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_test_clear_young,
    stage2_age_walker (v6.18)
    """
    young = False

    def stage2_age_walker(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        nonlocal young
        yield from ()  # the race window is the walker's, before this callback
        new = ctx.old & ~KVM_PTE_LEAF_ATTR_LO_S2_AF
        if not kvm_pte_valid(ctx.old) or new == ctx.old:
            return 0
        young = True
        if mkold and not stage2_try_set_pte(ctx, new):
            return -errno.EAGAIN
        return 0

    walker = KvmPgtableWalker(stage2_age_walker, flags | Flags.LEAF)
    ret = yield from kvm_pgtable_walk(pgt, addr, size, walker)
    pgt.mm_ops.warn_on(ret != 0, f"test_clear_young: walk returned {ret}")
    return young
