"""Stage-2 table pages, their reference counts, and the page-table walker.

A table page is stored sparsely: a dict from index to descriptor, absent meaning zero. Its
reference count is the kernel's struct page refcount, which the library uses as "1 + the
number of counted entries" (A3): installing a valid or owner-annotated entry takes a
reference on the page holding it, removing one drops it, and a table whose count falls to
1 holds nothing and can be unlinked and freed.

The walker visits the entries overlapping a range, in the kernel's order: for a table
entry TABLE_PRE, then its children, then TABLE_POST; for a leaf, LEAF. After a callback the
entry is read again, so a walk descends into a table the callback just installed and steps
over a block that replaced a table. A walker is a generator that yields after reading each
entry, before its callback acts on it: that is where another CPU (a software walker, or the
hardware walking for a guest access) can change the entry under it.

Shared walkers (KVM_PGTABLE_WALK_SHARED: faults under the read side of mmu_lock) are RCU
readers for the whole walk, and a table unlinked during a shared walk is freed through
``call_rcu`` (free_unlinked_table), so no walker still inside it reads freed memory.

kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_walk, _kvm_pgtable_walk,
__kvm_pgtable_walk, __kvm_pgtable_visit, kvm_pgtable_walk_continue,
kvm_pgtable_stage2_free_unlinked; arch/arm64/include/asm/kvm_pgtable.h:
kvm_pgtable_walk_begin, kvm_pgtable_walk_end; arch/arm64/kvm/mmu.c:kvm_s2_mm_ops,
stage2_free_unlinked_table (v6.18)
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag

from kvmspec.reference.arm64.descriptors import (
    Stage2Geometry,
    kvm_pte_table,
    kvm_pte_to_phys,
    stage2_pte_is_counted,
)
from kvmspec.reference.arm64.history import Cmo, PteWrite, Stage2History
from kvmspec.reference.arm64.s2_mmu import KvmS2Mmu
from kvmspec.reference.concurrency import KernelOp, Preempt, Rcu, run_to_completion


class KvmPgtableWalkFlags(IntFlag):
    """enum kvm_pgtable_walk_flags (INVENTORY D2)."""

    LEAF = 1 << 0
    TABLE_PRE = 1 << 1
    TABLE_POST = 1 << 2
    SHARED = 1 << 3
    HANDLE_FAULT = 1 << 4
    SKIP_BBM_TLBI = 1 << 5
    SKIP_CMO = 1 << 6


NO_WALK_FLAGS = KvmPgtableWalkFlags(0)
"""A walk alone on the tables (mmu_lock held for write), with no extra behaviour."""

# The walker tests its flags at every entry: as plain ints, since ``&`` with an IntFlag
# member runs IntFlag's own (Python) operator.
_LEAF = int(KvmPgtableWalkFlags.LEAF)
_TABLE_PRE = int(KvmPgtableWalkFlags.TABLE_PRE)
_TABLE_POST = int(KvmPgtableWalkFlags.TABLE_POST)
_SHARED = int(KvmPgtableWalkFlags.SHARED)

EMPTY_MEMCACHE = "A8: kvm_mmu_memory_cache_alloc: a table page taken from an empty cache"
"""The WARN of an allocation from an empty memory cache (the rule it breaks first)."""

TABLE_PAGES_BASE = 1 << 40
"""Where the model allocates table pages in host physical memory (away from guest pages,
so a table descriptor's output address never looks like guest memory)."""


class TablePage:
    """One page of descriptors. ``refcount`` is the page's reference count."""

    __slots__ = ("entries", "freed", "pa", "refcount")

    def __init__(self, pa: int) -> None:
        self.pa = pa
        self.entries: dict[int, int] = {}
        self.refcount = 1
        self.freed = False


@dataclass(frozen=True, slots=True)
class Ptep:
    """A pointer to one descriptor (kvm_pte_t *)."""

    table: TablePage
    idx: int

    @property
    def slot(self) -> tuple[int, int]:
        return (self.table.pa, self.idx)


@dataclass(slots=True)
class KvmMmuMemoryCache:
    """struct kvm_mmu_memory_cache: pages set aside before taking mmu_lock, so that a walk
    under the lock never has to allocate (taking a page from an empty cache is a WARN, see
    :meth:`KvmPgtableMmOps.zalloc_page`)."""

    nobjs: int


@dataclass(slots=True)
class KvmPgtableMmOps:
    """struct kvm_pgtable_mm_ops for a VM's stage 2 (kvm_s2_mm_ops): allocation, page
    reference counts, deferred freeing, cache maintenance; plus the model's memory
    accesses, which record every write and every read of a freed page."""

    geometry: Stage2Geometry
    history: Stage2History
    rcu: Rcu
    pages: dict[int, TablePage] = field(default_factory=dict)
    """Every table page ever allocated, by physical address (freed ones stay, marked)."""

    def zalloc_page(self, mc: KvmMmuMemoryCache | None) -> TablePage | None:
        """A zeroed page with one reference, from the memory cache (None without a cache:
        the walk fails with ENOMEM).

        The fault path fills the cache before it takes mmu_lock, so the cache should never
        be empty here (A8). When it is, the kernel WARNs and falls back to an atomic
        allocation, which the model lets succeed.

        kernel: arch/arm64/kvm/mmu.c:stage2_memcache_zalloc_page; virt/kvm/kvm_main.c:
        kvm_mmu_memory_cache_alloc (v6.18)
        """
        if mc is None:
            return None
        if not self.warn_on(mc.nobjs == 0, EMPTY_MEMCACHE):
            mc.nobjs -= 1
        return self._new_page()

    def zalloc_pages_exact(self, count: int) -> list[TablePage]:
        """``count`` contiguous zeroed pages for a PGD (not from the memory cache)."""
        return [self._new_page() for _ in range(count)]

    def _new_page(self) -> TablePage:
        page = TablePage(TABLE_PAGES_BASE + len(self.pages) * self.geometry.page_size)
        self.pages[page.pa] = page
        return page

    def get_page(self, page: TablePage) -> None:
        page.refcount += 1

    def put_page(self, page: TablePage) -> None:
        """Drop a reference; the last one frees the page at once (kvm_s2_put_page). Only
        unlinked tables are freed through RCU (:meth:`free_unlinked_table`)."""
        page.refcount -= 1
        if page.refcount == 0:
            page.freed = True

    def warn_on(self, condition: bool, message: str) -> bool:
        """WARN_ON in the library: record ``message`` when ``condition`` holds."""
        if condition:
            self.history.warnings.append(message)
        return condition

    def page_count(self, page: TablePage) -> int:
        return page.refcount

    def phys_to_virt(self, pa: int) -> TablePage:
        return self.pages[pa]

    def free_unlinked_table(self, table: TablePage, level: int) -> None:
        """Free a table that was unlinked from a live tree once every RCU reader that
        might still be walking it has left (stage2_free_unlinked_table).

        kernel: arch/arm64/kvm/mmu.c:stage2_free_unlinked_table (v6.18)
        """
        self.rcu.call_rcu(
            lambda: run_to_completion(kvm_pgtable_stage2_free_unlinked(self, table, level))
        )

    def dcache_clean_inval_poc(self, pa: int, size: int) -> None:
        self.history.events.append(Cmo("dcache_clean_inval_poc", pa, size))

    def icache_inval_pou(self, pa: int, size: int) -> None:
        self.history.events.append(Cmo("icache_inval_pou", pa, size))

    # -- the model's memory accesses --------------------------------------------------------

    def read(self, ptep: Ptep, who: str) -> int:
        """READ_ONCE(*ptep). Reading a freed page is recorded: it is a use after free."""
        if ptep.table.freed:
            self.history.reads_after_free.append(
                f"{who} read entry {ptep.idx} of table {ptep.table.pa:#x} after it was freed"
            )
        return ptep.table.entries.get(ptep.idx, 0)

    def store(self, ptep: Ptep, new: int, write: WriteInfo) -> None:
        """Write ``new`` to the entry and record it."""
        before = ptep.table.entries.get(ptep.idx, 0)
        if new:
            ptep.table.entries[ptep.idx] = new
        else:
            ptep.table.entries.pop(ptep.idx, None)
        self.history.events.append(
            PteWrite(
                ptep.slot,
                write.ipa,
                write.size,
                before,
                new,
                write.based_on,
                write.actor,
                write.shared,
            )
        )


@dataclass(frozen=True, slots=True)
class WriteInfo:
    """What the record says about a write besides the values: the IPA range the entry
    translates, the writer's snapshot, who wrote, and whether the walk was shared."""

    ipa: int
    size: int
    based_on: int
    actor: str
    shared: bool


@dataclass(slots=True)
class KvmPgtable:
    """struct kvm_pgtable: the geometry, the PGD (up to 16 concatenated pages), and what the
    library calls through (mm_ops, the VMID's TLB state). ``force_pte_cb`` says a range
    must be mapped with pages only (dirty logging, kvm_pgtable_stage2_init's argument)."""

    geometry: Stage2Geometry
    mm_ops: KvmPgtableMmOps
    mmu: KvmS2Mmu
    pgd: list[TablePage] | None
    force_pte_cb: Callable[[int, int, int], bool] | None = None


Visitor = Callable[["KvmPgtableVisitCtx", KvmPgtableWalkFlags], KernelOp[int]]


@dataclass(frozen=True, slots=True)
class KvmPgtableWalker:
    """struct kvm_pgtable_walker: the callback and which visits it wants. The kernel's
    ``arg`` is the callback's closure here."""

    cb: Visitor
    flags: KvmPgtableWalkFlags


@dataclass(slots=True)
class KvmPgtableVisitCtx:
    """struct kvm_pgtable_visit_ctx: the entry, the value the walker read (``old``), where
    the walk is, and the walk's flags."""

    ptep: Ptep
    old: int
    mm_ops: KvmPgtableMmOps
    start: int
    addr: int
    end: int
    level: int
    flags: KvmPgtableWalkFlags

    @property
    def shared(self) -> bool:
        """kvm_pgtable_walk_shared: other software walkers may change the tables."""
        return bool(int(self.flags) & _SHARED)

    def write_info(self) -> WriteInfo:
        size = self.mm_ops.geometry.kvm_granule_size(self.level)
        return WriteInfo(self.addr & ~(size - 1), size, self.old, "software", self.shared)


@dataclass(slots=True)
class KvmPgtableWalkData:
    """struct kvm_pgtable_walk_data: the walker and the range, ``addr`` advancing."""

    walker: KvmPgtableWalker
    start: int
    addr: int
    end: int
    wants: int = field(init=False)
    """The walker's flags as a plain int (see _LEAF)."""

    def __post_init__(self) -> None:
        self.wants = int(self.walker.flags)


def kvm_pgtable_walk_continue(walker: KvmPgtableWalker, r: int) -> bool:
    """EAGAIN means the entry changed under the callback. A fault handler
    (HANDLE_FAULT) stops and lets the guest retry; other walkers (write-protecting a
    range, aging) carry on with the rest of the range. Any other error stops the walk."""
    if r == -errno.EAGAIN:
        return not walker.flags & KvmPgtableWalkFlags.HANDLE_FAULT
    return r == 0


def __kvm_pgtable_visit(
    data: KvmPgtableWalkData, mm_ops: KvmPgtableMmOps, ptep: Ptep, level: int
) -> KernelOp[int]:
    """Visit one entry: TABLE_PRE or LEAF, re-read, then descend or step over it."""
    geometry = mm_ops.geometry
    wants = data.wants
    ctx = KvmPgtableVisitCtx(
        ptep,
        mm_ops.read(ptep, "a walker"),
        mm_ops,
        data.start,
        data.addr,
        data.end,
        level,
        data.walker.flags,
    )
    # Between the read and the callback's write, other CPUs (the hardware setting AF or
    # dirty state, shared walkers) may change the entry: the callback's cmpxchg sees it.
    yield Preempt(f"walker read level {level} entry for IPA {data.addr:#x}")
    ret = 0
    reload = False
    table = kvm_pte_table(ctx.old, level)
    if table and wants & _TABLE_PRE:
        ret = yield from data.walker.cb(ctx, KvmPgtableWalkFlags.TABLE_PRE)
        reload = True
    if not table and wants & _LEAF:
        ret = yield from data.walker.cb(ctx, KvmPgtableWalkFlags.LEAF)
        reload = True
    # The callback may have replaced a block with a table (descend into it) or a table
    # with a block (step over it): decide on what the entry holds now.
    if reload:
        ctx.old = mm_ops.read(ptep, "a walker")
        table = kvm_pte_table(ctx.old, level)
    if not kvm_pgtable_walk_continue(data.walker, ret):
        return ret
    if not table:
        size = geometry.kvm_granule_size(level)
        data.addr = (data.addr & ~(size - 1)) + size
        return 0
    child = mm_ops.phys_to_virt(kvm_pte_to_phys(ctx.old, geometry.page_shift))
    ret = yield from __kvm_pgtable_walk(data, mm_ops, child, level + 1)
    if not kvm_pgtable_walk_continue(data.walker, ret):
        return ret
    if wants & _TABLE_POST:
        ret = yield from data.walker.cb(ctx, KvmPgtableWalkFlags.TABLE_POST)
    return 0 if kvm_pgtable_walk_continue(data.walker, ret) else ret


def __kvm_pgtable_walk(
    data: KvmPgtableWalkData, mm_ops: KvmPgtableMmOps, table: TablePage, level: int
) -> KernelOp[int]:
    """Visit the entries of one table from ``data.addr``'s index until the range ends."""
    geometry = mm_ops.geometry
    for idx in range(geometry.kvm_pgtable_idx(data.addr, level), geometry.ptrs_per_pte):
        if data.addr >= data.end:
            break
        ret = yield from __kvm_pgtable_visit(data, mm_ops, Ptep(table, idx), level)
        if ret:
            return ret
    return 0


def _kvm_pgtable_walk(pgt: KvmPgtable, data: KvmPgtableWalkData) -> KernelOp[int]:
    """Walk from the PGD page that holds ``data.addr``; ERANGE beyond the IPA space."""
    limit = 1 << pgt.geometry.ia_bits
    if data.addr > limit or data.end > limit:
        return -errno.ERANGE
    if pgt.pgd is None:
        return -errno.EINVAL
    idx = pgt.geometry.kvm_pgd_page_idx(data.addr)
    while data.addr < data.end:
        ret = yield from __kvm_pgtable_walk(
            data, pgt.mm_ops, pgt.pgd[idx], pgt.geometry.start_level
        )
        if ret:
            return ret
        idx += 1
    return 0


def kvm_pgtable_walk(
    pgt: KvmPgtable, addr: int, size: int, walker: KvmPgtableWalker
) -> KernelOp[int]:
    """Walk [addr, addr + size), widened to whole pages, calling ``walker`` on the entries
    it asked for. A shared walk is an RCU reader from start to end (kvm_pgtable_walk_begin
    and kvm_pgtable_walk_end), so the tables it is in cannot be freed under it.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_walk (v6.18)
    """
    page_size = pgt.geometry.page_size
    start = addr & ~(page_size - 1)
    end = (start + size + page_size - 1) & ~(page_size - 1)
    data = KvmPgtableWalkData(walker, start, start, end)
    token = None
    if data.wants & _SHARED:
        token = pgt.mm_ops.rcu.read_lock()
    try:
        return (yield from _kvm_pgtable_walk(pgt, data))
    finally:
        if token is not None:
            pgt.mm_ops.rcu.read_unlock(token)


def kvm_pgtable_stage2_free_unlinked(
    mm_ops: KvmPgtableMmOps, table: TablePage, level: int
) -> KernelOp[None]:
    """Free a table that is no longer linked (the table of a ``level`` entry): drop the
    reference every counted entry holds, free child tables on the way back up, then drop
    the table's own last reference.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_pgtable_stage2_free_unlinked,
    stage2_free_walker (v6.18)
    """

    def stage2_free_walker(ctx: KvmPgtableVisitCtx, visit: KvmPgtableWalkFlags) -> KernelOp[int]:
        yield from ()  # a visitor is a generator; this one never lets another CPU in
        if stage2_pte_is_counted(ctx.old):
            mm_ops.put_page(ctx.ptep.table)
            if kvm_pte_table(ctx.old, ctx.level):
                child = mm_ops.phys_to_virt(kvm_pte_to_phys(ctx.old, mm_ops.geometry.page_shift))
                mm_ops.put_page(child)
        return 0

    walker = KvmPgtableWalker(
        stage2_free_walker, KvmPgtableWalkFlags.LEAF | KvmPgtableWalkFlags.TABLE_POST
    )
    # The IPA range is irrelevant for an unlinked table: walk the whole of it.
    data = KvmPgtableWalkData(walker, 0, 0, mm_ops.geometry.kvm_granule_size(level))
    yield from __kvm_pgtable_walk(data, mm_ops, table, level + 1)
    mm_ops.put_page(table)
