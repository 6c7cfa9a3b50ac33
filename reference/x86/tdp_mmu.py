"""The TDP MMU's SPTE updates: atomic and exclusive writes, their bookkeeping, and the walks
that zap, age, write-protect and clear dirty bits.

Most TDP MMU paths run with mmu_lock held only for *read*, so several CPUs change SPTEs at
once (faults, zaps of invalidated roots, dirty-log walks), and aging and the hardware do
without the lock at all. Two rules keep that safe:

* an SPTE changes under the read lock only by compare-and-exchange against the value the
  walker read (:func:`tdp_mmu_set_spte_atomic`). A failed exchange has no side effect at
  all: the walker gets the current value and retries or gives up (X15). The bookkeeping
  of a change (:func:`handle_changed_spte`: page statistics, freeing a removed table)
  runs once, by the writer whose exchange succeeded;
* a table removed from the tree under the read lock may still be walked by others, so
  :func:`handle_removed_pt` *freezes* each of its SPTEs (FROZEN_SPTE, not present, never
  written by anyone else: a writer that reads it backs off and retries), and frees the
  table after an RCU grace period (X13).

Under the write lock (:func:`tdp_mmu_set_spte`) nobody else writes SPTEs but the hardware
setting A/D bits, so an exchange that returns the old value suffices, and FROZEN is never
written or met.

Every walk here is a generator that yields between reading an SPTE and exchanging it
(where another CPU may change it) and at each :func:`tdp_mmu_iter_cond_resched`. The
walks run under the write lock (notifier unmaps, zap all, CLEAR_DIRTY_LOG's masks) never
yield: the kernel may drop the lock there to reschedule, which only delays them.

kernel: arch/x86/kvm/mmu/tdp_mmu.c (v6.18)
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.x86.mmio_spte import is_mmio_spte
from kvmspec.reference.x86.paging import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, PT_WRITABLE_MASK
from kvmspec.reference.x86.spte import (
    FROZEN_SPTE,
    SHADOW_NONPRESENT_VALUE,
    check_spte_writable_invariants,
    is_accessed_spte,
    is_frozen_spte,
    is_last_spte,
    is_shadow_present_pte,
    is_writable_pte,
    mark_spte_for_access_track,
    spte_ad_enabled,
    spte_to_pfn,
)
from kvmspec.reference.x86.tdp_iter import (
    ReadSide,
    SpteChange,
    TdpIter,
    TdpMmuPage,
    TdpPtep,
    for_each_tdp_pte_min_level,
    kvm_pages_per_hpage,
    tdp_mmu_iter_cond_resched,
)
from kvmspec.reference.x86.tdp_mmu_roots import (
    TdpMmuState,
    for_each_tdp_mmu_root_yield_safe,
    kvm_tdp_mmu_put_root,
)

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange

EBUSY = -errno.EBUSY

TDP_MMU_MAX_GFN_EXCLUSIVE = 1 << (46 - 12)
"""Walks stop at host MAXPHYADDR (the EPT profile's 46 bits): no slot reaches beyond."""


def _flush(kvm: Kvm) -> None:
    """kvm_flush_remote_tlbs and its ranged variants (the model flushes everything)."""
    kvm.arch.kvm_flush_remote_tlbs(kvm)


# -- bookkeeping ------------------------------------------------------------------------------


def handle_changed_spte(
    kvm: Kvm,
    mmu: TdpMmuState,
    ptep: TdpPtep,
    gfn: int,
    old_spte: int,
    new_spte: int,
    level: int,
    shared: bool,
) -> None:
    """The bookkeeping of one SPTE change, by the one writer that made it: the leaf count
    per level (page stats), and a table whose link was replaced is removed
    (:func:`handle_removed_pt`). A present leaf never becomes a present leaf with another
    pfn (X4: the kernel BUGs, "a missing MMU notifier"). Dirty and accessed state is not
    propagated here: the fault marks the page dirty when it maps it writable.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:handle_changed_spte (v6.18)
    """
    was_present = is_shadow_present_pte(old_spte)
    is_present = is_shadow_present_pte(new_spte)
    was_leaf = was_present and is_last_spte(old_spte, level)
    is_leaf = is_present and is_last_spte(new_spte, level)
    pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)
    kvm.warn_on(bool(gfn & (kvm_pages_per_hpage(level) - 1)), "X15", f"unaligned gfn {gfn:#x}")
    kvm.warn_on(
        was_leaf and is_leaf and pfn_changed,
        "X4",
        f"TDP MMU: present leaf for gfn {gfn:#x} changed pfn in place",
    )
    if old_spte == new_spte:
        return
    mmu.tables.history.changes.append(SpteChange(ptep.slot, gfn, level, old_spte, new_spte, shared))
    if is_leaf:
        problem = check_spte_writable_invariants(mmu.masks, new_spte)
        kvm.warn_on(problem is not None, "X3", str(problem))
    if not was_present and not is_present:
        # Only MMIO SPTEs come and go, and tables freeze: nothing else is expected.
        kvm.warn_on(
            not is_mmio_spte(mmu.masks, old_spte)
            and not is_mmio_spte(mmu.masks, new_spte)
            and not is_frozen_spte(new_spte),
            "X13",
            f"non-present SPTE {old_spte:#x} replaced by non-present {new_spte:#x}",
        )
        return
    if is_leaf != was_leaf:
        mmu.page_stats[level] += 1 if is_leaf else -1
    # A link replaced by a leaf or by nothing took its table out of the tree. A link that
    # points elsewhere would mean a table moved, which never happens (a WARN).
    if (
        was_present
        and not was_leaf
        and (is_leaf or not is_present or kvm.warn_on(pfn_changed, "X15", "table link moved"))
    ):
        child = mmu.tables.spte_to_child_pt(old_spte, level)
        assert child is not None
        handle_removed_pt(kvm, mmu, child, shared)


def handle_removed_pt(kvm: Kvm, mmu: TdpMmuState, sp: TdpMmuPage, shared: bool) -> None:
    """A table was cut out of the tree by the caller's change. Its SPTEs are handled as
    changes to FROZEN (recursively removing tables below), then the page is freed after
    an RCU grace period: walkers that read the old link may still be inside.

    Under the read lock such a walker may also still *write* in it, so every SPTE (empty
    ones too) is frozen with an exchange, which stops any later compare-and-exchange.
    (The kernel spins on an SPTE that another thread froze first, until that thread writes
    it; in v6.18 only TDX's mirror SPTEs are frozen elsewhere, which the model has not,
    so meeting one is a finding.) Under the write lock only the present ones matter.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:handle_removed_pt, tdp_mmu_unlink_sp (v6.18)
    """
    mmu.tables.unlink(sp, kvm.rcu)
    mmu.tdp_mmu_pages -= 1
    actor = "handle_removed_pt"
    indexes = range(512) if shared else sorted(sp.spt)
    for index in indexes:
        ptep = TdpPtep(sp, index)
        gfn = sp.gfn + index * kvm_pages_per_hpage(sp.level)
        if shared:
            old_spte = mmu.tables.xchg_spte(ptep, FROZEN_SPTE, actor)
            kvm.warn_on(is_frozen_spte(old_spte), "X13", f"{sp!r}[{index}] frozen by another")
        else:
            old_spte = mmu.tables.read_spte(ptep, actor)
            if not is_shadow_present_pte(old_spte):
                continue
            old_spte = mmu.tables.xchg_spte(ptep, FROZEN_SPTE, actor)
        handle_changed_spte(kvm, mmu, ptep, gfn, old_spte, FROZEN_SPTE, sp.level, shared)
    mmu.tables.free_page_rcu(sp, kvm.rcu)


# -- the two ways to write an SPTE ------------------------------------------------------------


def __tdp_mmu_set_spte_atomic(kvm: Kvm, mmu: TdpMmuState, it: TdpIter, new_spte: int) -> int:
    """Compare-and-exchange against ``it.old_spte``: 0, or EBUSY with ``it.old_spte``
    refreshed to what the SPTE holds now (nothing else happens). The caller never tries
    to change a frozen SPTE: it backs off when it reads one.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:__tdp_mmu_set_spte_atomic (v6.18)
    """
    kvm.warn_on(
        it.yielded or is_frozen_spte(it.old_spte),
        "X13",
        f"{it.actor} set an SPTE it saw frozen (or after yielding)",
    )
    current = mmu.tables.cmpxchg_spte(it.sptep, it.old_spte, new_spte, it.actor)
    if current != it.old_spte:
        it.old_spte = current
        return EBUSY
    return 0


def tdp_mmu_set_spte_atomic(kvm: Kvm, mmu: TdpMmuState, it: TdpIter, new_spte: int) -> int:
    """Set an SPTE under the read side of mmu_lock: the exchange, then (only if it
    succeeded) the bookkeeping. Returns 0 or EBUSY.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_set_spte_atomic (v6.18)
    """
    ret = __tdp_mmu_set_spte_atomic(kvm, mmu, it, new_spte)
    if ret:
        return ret
    handle_changed_spte(kvm, mmu, it.sptep, it.gfn, it.old_spte, new_spte, it.level, shared=True)
    return 0


def tdp_mmu_set_spte(
    kvm: Kvm,
    mmu: TdpMmuState,
    ptep: TdpPtep,
    old_spte: int,
    new_spte: int,
    gfn: int,
    level: int,
    actor: str,
) -> int:
    """Set an SPTE with mmu_lock held for write: an exchange (the hardware may still set
    A/D), then the bookkeeping on the value really replaced, which is returned. Never to
    or from FROZEN: nobody freezes while the writer excludes everyone.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_set_spte (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("tdp_mmu_set_spte")
    kvm.warn_on(
        is_frozen_spte(old_spte) or is_frozen_spte(new_spte),
        "X13",
        f"{actor}: exclusive write to or from FROZEN_SPTE",
    )
    old_spte = mmu.tables.xchg_spte(ptep, new_spte, actor)
    handle_changed_spte(kvm, mmu, ptep, gfn, old_spte, new_spte, level, shared=False)
    return old_spte


def tdp_mmu_iter_set_spte(kvm: Kvm, mmu: TdpMmuState, it: TdpIter, new_spte: int) -> None:
    """kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_iter_set_spte (v6.18)"""
    kvm.warn_on(it.yielded, "X13", f"{it.actor} set an SPTE after yielding")
    it.old_spte = tdp_mmu_set_spte(
        kvm, mmu, it.sptep, it.old_spte, new_spte, it.gfn, it.level, it.actor
    )


# -- zapping ----------------------------------------------------------------------------------


def __tdp_mmu_zap_root(
    kvm: Kvm, mmu: TdpMmuState, root: TdpMmuPage, side: ReadSide | None, zap_level: int
) -> KernelOp[None]:
    """Zap every present SPTE at ``zap_level`` (which takes the tables below with it).
    ``side`` is the read side held by a shared zap, None under the write lock.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:__tdp_mmu_zap_root (v6.18)
    """
    actor = mmu.new_actor("zap_root")
    for it in for_each_tdp_pte_min_level(
        mmu.tables, actor, root, zap_level, 0, TDP_MMU_MAX_GFN_EXCLUSIVE
    ):
        while True:  # retry
            if side is not None and (yield from tdp_mmu_iter_cond_resched(it, side)):
                break
            if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                break
            if side is None:
                tdp_mmu_iter_set_spte(kvm, mmu, it, SHADOW_NONPRESENT_VALUE)
                break
            yield Preempt("zap_root: SPTE read, exchanging it")
            if not tdp_mmu_set_spte_atomic(kvm, mmu, it, SHADOW_NONPRESENT_VALUE):
                break


def tdp_mmu_zap_root(
    kvm: Kvm, mmu: TdpMmuState, root: TdpMmuPage, side: ReadSide | None
) -> KernelOp[None]:
    """Zap a whole root, in passes of growing granularity (4K, 2M, 1G, then the root's
    own SPTEs) so each step stays short. The root must hold a reference, so that MMU
    notifiers still find it while the zap yields.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_zap_root (v6.18)
    """
    kvm.warn_on(root.root_count == 0, "X14", f"zapping {root!r} without a reference")
    for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.level):
        yield from __tdp_mmu_zap_root(kvm, mmu, root, side, zap_level)


def tdp_mmu_zap_leafs(
    kvm: Kvm, mmu: TdpMmuState, root: TdpMmuPage, start: int, end: int, flush: bool
) -> bool:
    """Zap the leaves of [start, end) in one root, under the write lock. Leaves of an
    invalid root need no flush (vCPUs flush when they load a new root). Returns whether
    a flush is owed.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_zap_leafs (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("tdp_mmu_zap_leafs")
    actor = mmu.new_actor("zap_leafs")
    end = min(end, TDP_MMU_MAX_GFN_EXCLUSIVE)
    for it in for_each_tdp_pte_min_level(mmu.tables, actor, root, PG_LEVEL_4K, start, end):
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        tdp_mmu_iter_set_spte(kvm, mmu, it, SHADOW_NONPRESENT_VALUE)
        if not root.invalid:
            flush = True
    return flush


def kvm_tdp_mmu_zap_all(kvm: Kvm, mmu: TdpMmuState) -> None:
    """Zap every root, invalid ones included (the VM or its mm is going away), under the
    write lock. No flush: no vCPU will run again.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_zap_all (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("kvm_tdp_mmu_zap_all")
    for root in for_each_tdp_mmu_root_yield_safe(kvm, mmu, -1, only_valid=False):
        run_to_completion(tdp_mmu_zap_root(kvm, mmu, root, None))


def kvm_tdp_mmu_zap_invalidated_roots(kvm: Kvm, mmu: TdpMmuState) -> KernelOp[None]:
    """Zap every root scheduled by kvm_tdp_mmu_invalidate_roots, under the read side of
    mmu_lock (vCPUs keep faulting on their valid roots meanwhile), and only then put the
    TDP MMU's reference: while it is being zapped, the root must stay reachable by the
    MMU notifiers. A memslot DELETE or MOVE returns only after this (X14).

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_zap_invalidated_roots (v6.18)
    """
    side = ReadSide(kvm.rcu, kvm.mmu_lock)
    yield from side.wait_for_writer()
    side.enter()
    try:
        for root in for_each_tdp_mmu_root_yield_safe(kvm, mmu, -1, only_valid=False):
            if not root.scheduled_root_to_zap:
                continue
            root.scheduled_root_to_zap = False
            kvm.warn_on(not root.invalid, "X14", f"scheduled {root!r} is valid")
            yield from tdp_mmu_zap_root(kvm, mmu, root, side)
            kvm_tdp_mmu_put_root(kvm, mmu, root)
    finally:
        side.leave()


def kvm_tdp_mmu_zap_possible_nx_huge_page(
    kvm: Kvm, mmu: TdpMmuState, sp: TdpMmuPage
) -> KernelOp[bool]:
    """Zap one (non-root) table under the read lock: exchange the SPTE that links it for
    a non-present one, if it still links it (another thread may have replaced it since).
    handle_removed_pt then freezes the table's SPTEs under the feet of faults that may
    still be walking it.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_zap_possible_nx_huge_page (v6.18)
    """
    parent = sp.ptep
    if kvm.warn_on(parent is None, "X14", f"{sp!r} is a root: it has no parent SPTE"):
        return False
    assert parent is not None
    it = TdpIter(mmu.tables, mmu.new_actor("zap_table"), parent.sp, sp.level, sp.gfn)
    it.level, it.gfn = sp.level + 1, sp.gfn
    it.pt_path[it.level] = parent.sp
    it.old_spte = mmu.tables.read_spte(parent, it.actor)
    if mmu.tables.spte_to_child_pt(it.old_spte, it.level) is not sp:
        return False
    yield Preempt("zap_possible_nx_huge_page: link read, exchanging it")
    return tdp_mmu_set_spte_atomic(kvm, mmu, it, SHADOW_NONPRESENT_VALUE) == 0


def kvm_recover_nx_huge_pages(kvm: Kvm, mmu: TdpMmuState, pages: list[TdpMmuPage]) -> KernelOp[int]:
    """The NX huge page recovery worker on the TDP MMU: under the read side of mmu_lock
    and RCU, zap each table of ``pages`` (the kernel takes them from the list of tables
    that exist only because a huge page was split for the iTLB multihit mitigation; the
    model has no such mitigation, so its callers name the tables), then flush. Returns how
    many were zapped.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_recover_nx_huge_pages (v6.18)
    """
    side = ReadSide(kvm.rcu, kvm.mmu_lock)
    yield from side.wait_for_writer()
    side.enter()
    zapped = 0
    try:
        for sp in pages:
            if not sp.unlinked and (yield from kvm_tdp_mmu_zap_possible_nx_huge_page(kvm, mmu, sp)):
                zapped += 1
        if zapped:
            _flush(kvm)
    finally:
        side.leave()
    return zapped


def kvm_tdp_mmu_unmap_gfn_range(
    kvm: Kvm, mmu: TdpMmuState, gfn_range: KvmGfnRange, flush: bool
) -> bool:
    """An MMU-notifier invalidation (or a slot's zap): the leaves of the range in *every*
    root of the slot's address space, invalid ones too, since a root being zapped
    elsewhere may still map the pages. Under the write lock; returns whether to flush.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_unmap_gfn_range (v6.18)
    """
    for root in for_each_tdp_mmu_root_yield_safe(kvm, mmu, gfn_range.slot.as_id, False):
        flush = tdp_mmu_zap_leafs(kvm, mmu, root, gfn_range.start, gfn_range.end, flush)
    return flush


# -- aging ------------------------------------------------------------------------------------


def kvm_tdp_mmu_age_spte(kvm: Kvm, mmu: TdpMmuState, it: TdpIter) -> None:
    """Make a leaf old. With A/D bits, an atomic AND clears A whatever else changed since
    the walker read it (a fault's new W, the hardware's D). Without them the SPTE is
    access-tracked by compare-and-exchange, and a failure is simply ignored: the SPTE was
    just changed, so it is young anyway.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_age_spte (v6.18)
    """
    if spte_ad_enabled(it.old_spte):
        it.old_spte = mmu.tables.clear_bits_atomic(it.sptep, mmu.masks.accessed_mask, it.actor)
    else:
        __tdp_mmu_set_spte_atomic(kvm, mmu, it, mark_spte_for_access_track(mmu.masks, it.old_spte))


def kvm_tdp_mmu_age_gfn_range(
    kvm: Kvm, mmu: TdpMmuState, gfn_range: KvmGfnRange, test_only: bool
) -> KernelOp[bool]:
    """Was any leaf of the range accessed? Unless ``test_only``, make each accessed one
    old. Lockless (CONFIG_KVM_MMU_LOCKLESS_AGING): only an RCU read section over the
    roots, so it races with faults, zaps and the hardware; each change is atomic, and a
    walk that reads a table being freed is still inside its grace period. No root
    references are taken: the RCU section keeps every root it can see alive.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:__kvm_tdp_mmu_age_gfn_range,
    kvm_tdp_mmu_age_gfn_range, kvm_tdp_mmu_test_age_gfn (v6.18)
    """
    rcu = kvm.rcu.read_lock()
    young = False
    try:
        for root in list(mmu.roots):
            if root.as_id != gfn_range.slot.as_id:
                continue
            actor = mmu.new_actor("age")
            for it in for_each_tdp_pte_min_level(
                mmu.tables, actor, root, PG_LEVEL_4K, gfn_range.start, gfn_range.end
            ):
                if not is_shadow_present_pte(it.old_spte) or not is_last_spte(
                    it.old_spte, it.level
                ):
                    continue
                if not is_accessed_spte(mmu.masks, it.old_spte):
                    continue
                if test_only:
                    return True
                young = True
                yield Preempt("age: accessed leaf read, making it old")
                kvm_tdp_mmu_age_spte(kvm, mmu, it)
    finally:
        kvm.rcu.read_unlock(rcu)
    return young


# -- dirty logging ----------------------------------------------------------------------------


def _shared_walk(
    kvm: Kvm,
    mmu: TdpMmuState,
    slot: KvmMemorySlot,
    what: str,
    min_level: int,
    change: Callable[[int], int | None],
) -> KernelOp[bool]:
    """The read-lock walk wrprot_gfn_range and clear_dirty_gfn_range share: over the
    slot's range in every valid root, each present leaf for which ``change`` gives a new
    value is set atomically, retried on EBUSY. Returns whether any SPTE changed.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:wrprot_gfn_range, clear_dirty_gfn_range (v6.18)
    """
    side = ReadSide(kvm.rcu, kvm.mmu_lock)
    yield from side.wait_for_writer()
    side.enter()
    changed = False
    try:
        for root in for_each_tdp_mmu_root_yield_safe(kvm, mmu, slot.as_id, only_valid=True):
            actor = mmu.new_actor(what)
            for it in for_each_tdp_pte_min_level(
                mmu.tables, actor, root, min_level, slot.base_gfn, slot.end_gfn
            ):
                while True:  # retry
                    if (yield from tdp_mmu_iter_cond_resched(it, side)):
                        break
                    if not is_shadow_present_pte(it.old_spte) or not is_last_spte(
                        it.old_spte, it.level
                    ):
                        break
                    new_spte = change(it.old_spte)
                    if new_spte is None:
                        break
                    yield Preempt(f"{what}: SPTE read, exchanging it")
                    if tdp_mmu_set_spte_atomic(kvm, mmu, it, new_spte) == 0:
                        changed = True
                        break
    finally:
        side.leave()
    return changed


def kvm_tdp_mmu_wrprot_slot(
    kvm: Kvm, mmu: TdpMmuState, slot: KvmMemorySlot, min_level: int
) -> KernelOp[bool]:
    """Dirty logging starts: clear W in every leaf of the slot at ``min_level`` or above,
    under the read lock (MMU-writable stays, so a later write fault restores W and logs
    the page). The caller flushes when it returns True.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_wrprot_slot, wrprot_gfn_range (v6.18)
    """

    def wrprot(spte: int) -> int | None:
        return spte & ~PT_WRITABLE_MASK if is_writable_pte(spte) else None

    return (yield from _shared_walk(kvm, mmu, slot, "wrprot_slot", min_level, wrprot))


def dirty_bit(mmu: TdpMmuState, wrprot: bool) -> int:
    """The bit that tracks writes: D when the hardware keeps A/D bits (and PML logs the
    writes that set it), W otherwise, or when write-protection is asked for."""
    if wrprot or not mmu.masks.ad_enabled:
        return PT_WRITABLE_MASK
    return mmu.masks.dirty_mask


def kvm_tdp_mmu_clear_dirty_slot(kvm: Kvm, mmu: TdpMmuState, slot: KvmMemorySlot) -> KernelOp[bool]:
    """Dirty logging starts with PML: clear the dirty bit of every leaf of the slot, under
    the read lock, so the next write sets it again and is logged.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_clear_dirty_slot,
    clear_dirty_gfn_range (v6.18)
    """
    dbit = dirty_bit(mmu, wrprot=False)

    def clear(spte: int) -> int | None:
        return spte & ~dbit if spte & dbit else None

    return (yield from _shared_walk(kvm, mmu, slot, "clear_dirty_slot", PG_LEVEL_4K, clear))


def kvm_tdp_mmu_clear_dirty_pt_masked(
    kvm: Kvm, mmu: TdpMmuState, slot: KvmMemorySlot, gfn: int, mask: int, wrprot: bool
) -> None:
    """After a harvest, re-arm logging for the 4K pages of ``mask`` (bit i: gfn + i):
    clear W or D in their leaves with mmu_lock held for write (the caller flushes). An
    atomic AND, since the hardware may be setting D meanwhile; no bookkeeping, since
    clearing W or D changes nothing that is counted.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_clear_dirty_pt_masked,
    clear_dirty_pt_masked (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("kvm_tdp_mmu_clear_dirty_pt_masked")
    dbit = dirty_bit(mmu, wrprot)
    first = gfn + (mask & -mask).bit_length() - 1
    for root in for_each_tdp_mmu_root_yield_safe(kvm, mmu, slot.as_id, only_valid=True):
        actor = mmu.new_actor("clear_dirty_pt_masked")
        remaining = mask
        for it in for_each_tdp_pte_min_level(mmu.tables, actor, root, PG_LEVEL_4K, first, gfn + 64):
            if not remaining:
                break
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            bit = 1 << (it.gfn - gfn)
            if it.level > PG_LEVEL_4K or not remaining & bit:
                continue
            remaining &= ~bit
            if it.old_spte & dbit:
                it.old_spte = mmu.tables.clear_bits_atomic(it.sptep, dbit, actor)
