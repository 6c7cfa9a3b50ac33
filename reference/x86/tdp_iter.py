"""The TDP MMU's page tables, the SPTE accesses on them, and the iterator that walks them.

The TDP MMU (tdp_mmu.py) keeps its own paging structures: a tree of pages of 512 SPTEs per
root, walked by the hardware for every guest access (EPT or NPT) and by KVM without
mmu_lock held for write. Four things live here, as in the kernel's tdp_iter.[ch]:

* :class:`TdpMmuPage`: one page table (the TDP fields of struct kvm_mmu_page), stored
  sparsely (an absent index holds SHADOW_NONPRESENT_VALUE). Pages get pfns of their own,
  far above guest memory, and are never reused, so (pfn, index) names one SPTE for a run.
* :class:`TdpTables`: the memory of those pages. Every read and write goes through it and
  is recorded in a :class:`TdpMmuHistory`: each store with the value the writer based it on
  and who wrote it, each read of a freed page (a use after free), each page freed with the
  RCU readers still inside. The invariants (spec/invariants/x86_tdp.py) are questions about
  that record; the model itself never looks at it.
* :class:`TdpIter`: struct tdp_iter. A pre-order walk from a root over a gfn range: step
  down into a present non-leaf SPTE, else to the next SPTE of the table, else up. A walk
  that yielded restarts from the root at the first gfn it has not finished
  (``next_last_level_gfn``), and :func:`tdp_mmu_iter_cond_resched` refuses to yield twice
  at the same gfn, so a walk always makes progress however often it is interrupted.
* :class:`ReadSide`: what such a walker holds (an RCU read section, and the read side of
  mmu_lock unless it ages locklessly), left and taken again around each yield.

kernel: arch/x86/kvm/mmu/tdp_iter.c, tdp_iter.h (kvm_tdp_mmu_read_spte,
kvm_tdp_mmu_write_spte, kvm_tdp_mmu_write_spte_atomic, tdp_mmu_clear_spte_bits,
for_each_tdp_pte_min_level); arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_iter_cond_resched (v6.18)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from kvmspec.reference.concurrency import KernelOp, Preempt, Rcu, RwLock, WaitUntil
from kvmspec.reference.x86.paging import PT64_ENT_PER_PAGE, PT64_ROOT_5LEVEL, pt_index
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)
from kvmspec.spec.uapi.constants import PAGE_SHIFT

TDP_PAGES_BASE_PFN = 1 << 32
"""Where the model allocates TDP page tables in host physical memory: above any guest page
and below the EPT profile's 46-bit physical-address limit (pfns below 2^34)."""


def kvm_pages_per_hpage(level: int) -> int:
    """How many 4K gfns one SPTE at ``level`` covers (KVM_PAGES_PER_HPAGE)."""
    return 1 << ((level - 1) * 9)


def gfn_round_for_level(gfn: int, level: int) -> int:
    """kernel: arch/x86/kvm/mmu/mmu_internal.h:gfn_round_for_level (v6.18)"""
    return gfn & -kvm_pages_per_hpage(level)


class TdpMmuPage:
    """One TDP page table: its level, the first gfn it translates, its SPTEs, and the
    parent SPTE that links it (``ptep``, None for a root). Roots also carry the reference
    count and the invalid / scheduled-to-zap flags of X14. ``unlinked`` is set when the
    page leaves the tree (its parent SPTE was changed), ``freed`` when its memory is
    given back (after an RCU grace period)."""

    __slots__ = (
        "as_id",
        "freed",
        "gfn",
        "invalid",
        "level",
        "pfn",
        "ptep",
        "readers_at_unlink",
        "root_count",
        "scheduled_root_to_zap",
        "spt",
        "unlinked",
    )

    def __init__(self, pfn: int, level: int, gfn: int, as_id: int, ptep: TdpPtep | None) -> None:
        self.pfn = pfn
        self.level = level
        self.gfn = gfn
        self.as_id = as_id
        self.ptep = ptep
        self.spt: dict[int, int] = {}
        self.invalid = False
        self.root_count = 0
        self.scheduled_root_to_zap = False
        self.unlinked = False
        self.readers_at_unlink: frozenset[int] = frozenset()
        self.freed = False

    def __repr__(self) -> str:
        return f"TdpMmuPage(pfn={self.pfn:#x}, L{self.level}, gfn={self.gfn:#x})"


@dataclass(frozen=True, slots=True)
class TdpPtep:
    """A pointer to one SPTE (tdp_ptep_t)."""

    sp: TdpMmuPage
    index: int

    @property
    def slot(self) -> tuple[int, int]:
        return (self.sp.pfn, self.index)


@dataclass(frozen=True, slots=True)
class SpteWrite:
    """One store to an SPTE. ``based_on`` is the value a compare-and-exchange expected
    (None for an exchange, which returns whatever was there); ``actor`` names the
    operation that wrote (``hardware`` for the CPU's A/D updates)."""

    slot: tuple[int, int]
    before: int
    after: int
    based_on: int | None
    actor: str
    unlinked: bool
    """The table had already left the tree (nobody but RCU readers can reach it)."""


@dataclass(frozen=True, slots=True)
class SpteChange:
    """One call of handle_changed_spte: the bookkeeping of one SPTE change."""

    slot: tuple[int, int]
    gfn: int
    level: int
    old: int
    new: int
    shared: bool


@dataclass(frozen=True, slots=True)
class PageFree:
    """A page table's memory given back, and the RCU readers that had been inside when it
    was unlinked and were still inside at the free (must be none: X14, X5)."""

    pfn: int
    still_inside: frozenset[int]


@dataclass(slots=True)
class TdpMmuHistory:
    """What happened to the TDP tables, oldest first (read by the invariants only)."""

    writes: list[SpteWrite] = field(default_factory=list)
    changes: list[SpteChange] = field(default_factory=list)
    frees: list[PageFree] = field(default_factory=list)
    reads_after_free: list[str] = field(default_factory=list)


class TdpTables:
    """The memory of the TDP page tables: allocation, freeing, and every SPTE access."""

    def __init__(self) -> None:
        self.pages: dict[int, TdpMmuPage] = {}
        """Every page ever allocated, by pfn (freed ones stay, marked)."""
        self.history = TdpMmuHistory()

    def alloc_page(self, level: int, gfn: int, as_id: int, ptep: TdpPtep | None) -> TdpMmuPage:
        """A zeroed page from the vCPU's memory cache (tdp_mmu_alloc_sp + tdp_mmu_init_sp):
        every SPTE non-present."""
        sp = TdpMmuPage(TDP_PAGES_BASE_PFN + len(self.pages), level, gfn, as_id, ptep)
        self.pages[sp.pfn] = sp
        return sp

    def unlink(self, sp: TdpMmuPage, rcu: Rcu) -> None:
        """The page left the tree: remember which RCU readers might still be walking it."""
        sp.unlinked = True
        sp.readers_at_unlink = frozenset(rcu.active)

    def free_page(self, sp: TdpMmuPage, rcu: Rcu) -> None:
        """Give the page's memory back (tdp_mmu_free_sp). Callers reach this through
        ``call_rcu`` for any page a reader could have seen."""
        sp.freed = True
        self.history.frees.append(PageFree(sp.pfn, sp.readers_at_unlink & rcu.active))

    def free_page_rcu(self, sp: TdpMmuPage, rcu: Rcu) -> None:
        """call_rcu(tdp_mmu_free_sp_rcu_callback): free once every reader inside has left.

        kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_free_sp_rcu_callback (v6.18)
        """
        rcu.call_rcu(lambda: self.free_page(sp, rcu))

    def spte_to_child_pt(self, spte: int, level: int) -> TdpMmuPage | None:
        """The table a present non-leaf SPTE links to, else None.

        kernel: arch/x86/kvm/mmu/tdp_iter.c:spte_to_child_pt (v6.18)
        """
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return None
        return self.pages[spte_to_pfn(spte)]

    # -- the accesses ---------------------------------------------------------------------

    def read_spte(self, ptep: TdpPtep, who: str) -> int:
        """READ_ONCE of an SPTE (kvm_tdp_mmu_read_spte). A read of a freed page is a use
        after free, recorded."""
        if ptep.sp.freed:
            self.history.reads_after_free.append(
                f"{who} read SPTE {ptep.index} of freed {ptep.sp!r}"
            )
        return ptep.sp.spt.get(ptep.index, SHADOW_NONPRESENT_VALUE)

    def _store(self, ptep: TdpPtep, new: int, based_on: int | None, actor: str) -> int:
        before = ptep.sp.spt.get(ptep.index, SHADOW_NONPRESENT_VALUE)
        if new == SHADOW_NONPRESENT_VALUE:
            ptep.sp.spt.pop(ptep.index, None)
        else:
            ptep.sp.spt[ptep.index] = new
        self.history.writes.append(
            SpteWrite(ptep.slot, before, new, based_on, actor, ptep.sp.unlinked)
        )
        return before

    def xchg_spte(self, ptep: TdpPtep, new: int, actor: str) -> int:
        """Write ``new`` and return what was there, atomically: the hardware may set A/D
        in the SPTE at any moment, and an exchange never loses those.

        kernel: arch/x86/kvm/mmu/tdp_iter.h:kvm_tdp_mmu_write_spte_atomic,
        kvm_tdp_mmu_write_spte (v6.18)
        """
        return self._store(ptep, new, None, actor)

    def cmpxchg_spte(self, ptep: TdpPtep, old: int, new: int, actor: str) -> int:
        """try_cmpxchg64: store ``new`` only if the SPTE still holds ``old``; returns what
        the SPTE held (equal to ``old`` exactly when the store happened)."""
        current = self.read_spte(ptep, actor)
        if current != old:
            return current
        return self._store(ptep, new, old, actor)

    def set_bits_atomic(self, ptep: TdpPtep, bits: int, actor: str) -> int:
        """An atomic OR (the CPU setting A/D in a leaf it walks); returns the old value."""
        current = self.read_spte(ptep, actor)
        return self._store(ptep, current | bits, current, actor)

    def clear_bits_atomic(self, ptep: TdpPtep, mask: int, actor: str) -> int:
        """An atomic AND (lock and): clear ``mask`` whatever else changed; returns the old
        value.

        kernel: arch/x86/kvm/mmu/tdp_iter.h:tdp_mmu_clear_spte_bits_atomic (v6.18)
        """
        current = self.read_spte(ptep, actor)
        return self._store(ptep, current & ~mask, current, actor)


class ReadSide:
    """What a walker without the write lock holds: an RCU read section, and the read side
    of mmu_lock unless it walks locklessly (aging). It leaves both when it yields
    (tdp_mmu_iter_cond_resched) and takes them again after; a writer that holds mmu_lock
    keeps it out until it is done (the read side spins)."""

    def __init__(self, rcu: Rcu, mmu_lock: RwLock | None) -> None:
        self.rcu = rcu
        self.mmu_lock = mmu_lock
        self.token: int | None = None
        self._held: AbstractContextManager[None] | None = None

    def wait_for_writer(self) -> KernelOp[None]:
        """read_lock(): a step that cannot run while a writer holds the lock."""
        lock = self.mmu_lock
        if lock is not None and lock.writer:
            yield WaitUntil(f"read_lock({lock.name})", lambda: not lock.writer)

    def enter(self) -> None:
        if self.mmu_lock is not None and self._held is None:
            self._held = self.mmu_lock.read()
            self._held.__enter__()
        if self.token is None:
            self.token = self.rcu.read_lock()

    def leave(self) -> None:
        if self.token is not None:
            self.rcu.read_unlock(self.token)
            self.token = None
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None


@dataclass(slots=True)
class TdpIter:
    """struct tdp_iter: where a pre-order walk is, and what it last read there."""

    tables: TdpTables
    actor: str
    root: TdpMmuPage
    min_level: int
    next_last_level_gfn: int
    """The gfn the walk is heading for: where a restart resumes."""
    yielded_gfn: int = -1
    """next_last_level_gfn when the walk last yielded: no second yield before progress."""
    level: int = 0
    gfn: int = 0
    pt_path: dict[int, TdpMmuPage] = field(default_factory=dict)
    old_spte: int = SHADOW_NONPRESENT_VALUE
    valid: bool = False
    yielded: bool = False

    @property
    def sptep(self) -> TdpPtep:
        return TdpPtep(self.pt_path[self.level], pt_index(self.gfn << PAGE_SHIFT, self.level))

    @property
    def as_id(self) -> int:
        return self.root.as_id


def tdp_iter_refresh_sptep(it: TdpIter) -> None:
    """kernel: arch/x86/kvm/mmu/tdp_iter.c:tdp_iter_refresh_sptep (v6.18)"""
    it.old_spte = it.tables.read_spte(it.sptep, it.actor)


def tdp_iter_restart(it: TdpIter) -> None:
    """Go back to the root and head again for ``next_last_level_gfn``: after a yield the
    tables may have changed anywhere above the walk.

    kernel: arch/x86/kvm/mmu/tdp_iter.c:tdp_iter_restart (v6.18)
    """
    it.yielded = False
    it.yielded_gfn = it.next_last_level_gfn
    it.level = it.root.level
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)
    it.valid = True


def tdp_iter_start(
    tables: TdpTables, actor: str, root: TdpMmuPage, min_level: int, start: int
) -> TdpIter:
    """A walk of ``root`` down to ``min_level``, starting with the path to ``start``.

    kernel: arch/x86/kvm/mmu/tdp_iter.c:tdp_iter_start (v6.18)
    """
    if not 1 <= root.level <= PT64_ROOT_5LEVEL:
        raise ValueError(f"bad root level {root.level}")
    it = TdpIter(tables, actor, root, min_level, start)
    it.pt_path[root.level] = root
    tdp_iter_restart(it)
    return it


def try_step_down(it: TdpIter) -> bool:
    """Into the table the current SPTE links, re-read first: it may have been zapped.

    kernel: arch/x86/kvm/mmu/tdp_iter.c:try_step_down (v6.18)
    """
    if it.level == it.min_level:
        return False
    it.old_spte = it.tables.read_spte(it.sptep, it.actor)
    child = it.tables.spte_to_child_pt(it.old_spte, it.level)
    if child is None:
        return False
    it.level -= 1
    it.pt_path[it.level] = child
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)
    return True


def try_step_side(it: TdpIter) -> bool:
    """To the next SPTE of this table, unless this was its last one. Everything before
    the new gfn is done, so a restart would resume there.

    kernel: arch/x86/kvm/mmu/tdp_iter.c:try_step_side (v6.18)
    """
    if pt_index(it.gfn << PAGE_SHIFT, it.level) == PT64_ENT_PER_PAGE - 1:
        return False
    it.gfn += kvm_pages_per_hpage(it.level)
    it.next_last_level_gfn = it.gfn
    it.old_spte = it.tables.read_spte(it.sptep, it.actor)
    return True


def try_step_up(it: TdpIter) -> bool:
    """Back to the parent table (whose SPTE here was visited already).

    kernel: arch/x86/kvm/mmu/tdp_iter.c:try_step_up (v6.18)
    """
    if it.level == it.root.level:
        return False
    it.level += 1
    it.gfn = gfn_round_for_level(it.gfn, it.level)
    tdp_iter_refresh_sptep(it)
    return True


def tdp_iter_next(it: TdpIter) -> None:
    """The next SPTE in pre-order: down if possible, else sideways, climbing up as long as
    the current table is finished; the walk ends after the root's last SPTE. A walk that
    yielded restarts from the root instead.

    kernel: arch/x86/kvm/mmu/tdp_iter.c:tdp_iter_next (v6.18)
    """
    if it.yielded:
        tdp_iter_restart(it)
        return
    if try_step_down(it):
        return
    while True:
        if try_step_side(it):
            return
        if not try_step_up(it):
            break
    it.valid = False


def for_each_tdp_pte_min_level(
    tables: TdpTables, actor: str, root: TdpMmuPage, min_level: int, start: int, end: int
) -> Iterator[TdpIter]:
    """Every SPTE (down to ``min_level``) whose range overlaps [start, end), in pre-order.
    The loop body may change the iterator (a refreshed ``old_spte``, a yield).

    kernel: arch/x86/kvm/mmu/tdp_iter.h:for_each_tdp_pte_min_level (v6.18)
    """
    it = tdp_iter_start(tables, actor, root, min_level, start)
    while it.valid and it.gfn < end:
        yield it
        tdp_iter_next(it)


def tdp_mmu_iter_cond_resched(it: TdpIter, side: ReadSide) -> KernelOp[bool]:
    """Let other CPUs run: leave the RCU read section and mmu_lock, let them run, come
    back and mark the walk to restart from the root. Only once the walk has moved on since
    its last yield: that rule is what guarantees forward progress. The kernel yields when
    rescheduling is due or the lock is contended; the model yields at every chance the
    walk stands on a present SPTE (walking past empty ones acts on nothing, so a yield
    there adds no interleaving). Only walks under the read lock yield in the model; the
    kernel's write-lock zaps also flush the TLBs before they yield, for what they zapped.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_iter_cond_resched (v6.18)
    """
    if it.next_last_level_gfn == it.yielded_gfn or not is_shadow_present_pte(it.old_spte):
        return False
    side.leave()
    yield Preempt("tdp_mmu_iter_cond_resched: RCU and mmu_lock dropped")
    yield from side.wait_for_writer()
    side.enter()
    it.yielded = True
    return True
