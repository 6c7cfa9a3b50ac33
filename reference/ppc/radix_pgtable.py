"""The partition-scoped radix tree of a POWER9 (or later) guest, its TLB, and tlbie.

A radix guest builds its own (process-scoped) page tables; KVM only owns the second stage,
the partition-scoped tree that turns guest real addresses (gpa) into host real addresses.
KVM fills it on page faults (radix_mmu.py) and empties it when the host takes pages away.
Unlike the hashed page table, nothing here is entered by the guest.

The tree covers a 52-bit gpa space in four levels, with the host's radix geometry: the
lowest level takes 5 index bits with 64 KiB base pages (9 with 4 KiB), then 9, 9 and 13.
Whatever the base page size, an entry of the PMD level covers 2 MiB and one of the PUD
level 1 GiB, and both may be leaves (huge pages). KVM numbers the leaf levels 0 (a base
page), 1 (2 MiB) and 2 (1 GiB). The model keeps each table as a dict of the indexes in use:
a missing key is the kernel's zero entry.

A leaf carries the hardware's bits (present, "this is a PTE", read/write/execute rights,
R = _PAGE_ACCESSED and C = _PAGE_DIRTY) and the host real address. The hardware sets R when
it walks to a leaf and C on the first store; the translation it caches in the TLB remembers
that C is set, so later stores through that TLB entry never touch the leaf again. Clearing
C in a leaf is therefore only half of the job: until a tlbie for the page completes, stores
keep going through the old TLB entry without setting C, invisible to a dirty-log harvest.
Every unmap and every C clear here is followed by :func:`kvmppc_radix_tlbie_page` before the
page is given back or reported dirty (R1), and the model records those events in order so
that the invariant checker can see the order, not just the result.

Not modelled: nested (L2) guests and their rmaps, secure (ultravisor) guests, and the page
walk cache (the TLB here caches leaves only, so freeing a table needs no PWC flush).

kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_create_pte, kvmppc_unmap_pte,
kvmppc_radix_tlbie_page, kvmppc_radix_update_pte, kvmppc_unmap_free_pmd_entry_table,
kvmppc_unmap_free_pud_entry_table; arch/powerpc/include/asm/book3s/64/pgtable.h;
arch/powerpc/include/asm/book3s/64/radix-64k.h, radix-4k.h (v6.18)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sortedcontainers import SortedDict

from kvmspec.reference.host import HostMm
from kvmspec.reference.ppc.hpt import kvmppc_update_dirty_map

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot

# -- PTE bits (book3s/64/pgtable.h) ----------------------------------------------------------

_PAGE_EXEC = 0x001
_PAGE_WRITE = 0x002
_PAGE_READ = 0x004
_PAGE_DIRTY = 0x080
"""C: the page was changed."""
_PAGE_ACCESSED = 0x100
"""R: the page was referenced."""
_PAGE_PTE = 1 << 62
"""A leaf, not a pointer to the next level."""
_PAGE_PRESENT = 1 << 63
_PAGE_PA_MAX = 53
PTE_BITS_MUST_MATCH = ~(_PAGE_WRITE | _PAGE_DIRTY | _PAGE_ACCESSED)
"""Two faults on one page may disagree on write permission and R/C, never on the rest."""

RADIX_GPA_BITS = 52
PMD_SHIFT = 21
PUD_SHIFT = 30
PGDIR_SHIFT = 39
LEVEL_SHIFTS = {1: PMD_SHIFT, 2: PUD_SHIFT}
"""Leaf level -> the shift of the page it maps (level 0 is the base page)."""


def radix_pte_index_bits(page_shift: int) -> int:
    """Index bits of the lowest level: 5 with 64 KiB pages, 9 with 4 KiB (the PMD covers
    2 MiB in both cases).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:p9_supported_radix_bits (v6.18)
    """
    return PMD_SHIFT - page_shift


def pte_rpn_mask(page_shift: int) -> int:
    """The real-address bits of a PTE (PTE_RPN_MASK)."""
    return ((1 << _PAGE_PA_MAX) - 1) & ~((1 << page_shift) - 1)


def leaf_shift(level: int, page_shift: int) -> int:
    """The shift of the page a leaf of ``level`` maps."""
    return LEVEL_SHIFTS.get(level, page_shift)


def radix_host_mm(page_size: int, task_size: int) -> HostMm:
    """The VMM's address space on a radix host: a transparent huge page is one PMD, 2 MiB
    with 64 KiB pages as with 4 KiB ones (HostMm's default, one page of 8-byte entries, is
    the x86/arm64 geometry: 512 MiB with 64 KiB pages).

    kernel: arch/powerpc/include/asm/book3s/64/radix-64k.h:RADIX_PTE_INDEX_SIZE (v6.18)
    """
    mm = HostMm(page_size, task_size)
    mm.hpage_size = 1 << PMD_SHIFT
    mm.hpage_nr = mm.hpage_size // page_size
    return mm


# -- the tree ---------------------------------------------------------------------------------


class RadixTable:
    """One page-table page: index -> a leaf word (int) or the next level's table. Each entry
    covers ``1 << entry_shift`` bytes of gpa."""

    __slots__ = ("entries", "entry_shift")

    def __init__(self, entry_shift: int) -> None:
        self.entry_shift = entry_shift
        self.entries: dict[int, int | RadixTable] = {}


@dataclass(slots=True)
class RadixLeaf:
    """Where a present leaf lives: its table and index, the gpa it starts at, the shift of
    the page it maps (what __find_linux_pte returns; the kernel says 0 for a base page)."""

    table: RadixTable
    index: int
    gpa: int
    shift: int

    @property
    def pte(self) -> int:
        value = self.table.entries[self.index]
        assert isinstance(value, int)
        return value

    @property
    def size(self) -> int:
        return 1 << self.shift


@dataclass(slots=True)
class TlbEntry:
    """A cached translation of one base page: the host pfn, whether stores may use it, and
    whether C is already set for it (then stores through it do not touch the leaf)."""

    pfn: int
    writable: bool
    dirty: bool


HarvestEventKind = Literal["c_cleared", "tlbie", "reported"]


@dataclass(frozen=True, slots=True)
class HarvestEvent:
    """One step of taking C away from a range of base pages: C cleared in a leaf, a tlbie
    completed, or the pages reported dirty (to the slot's bitmap or to userspace)."""

    kind: HarvestEventKind
    gfn: int
    npages: int


class RadixPgtable:
    """``kvm->arch.pgtable`` with the hardware that walks it: the root table, the TLB of
    every vCPU (one dict: a tlbie reaches them all), and the recent unmap/harvest events."""

    def __init__(self, page_shift: int) -> None:
        self.page_shift = page_shift
        self.pte_bits = radix_pte_index_bits(page_shift)
        self.root = RadixTable(PGDIR_SHIFT)
        self.tlb: SortedDict = SortedDict()  # gfn -> TlbEntry
        self.events: deque[HarvestEvent] = deque(maxlen=1024)

    def index_bits(self, table: RadixTable) -> int:
        """How many index bits ``table``'s level uses."""
        if table.entry_shift == PGDIR_SHIFT:
            return RADIX_GPA_BITS - PGDIR_SHIFT
        if table.entry_shift == self.page_shift:
            return self.pte_bits
        return 9

    def next_shift(self, table: RadixTable) -> int:
        """The entry shift of the level below ``table``."""
        return {PGDIR_SHIFT: PUD_SHIFT, PUD_SHIFT: PMD_SHIFT}.get(
            table.entry_shift, self.page_shift
        )

    def index(self, table: RadixTable, gpa: int) -> int:
        return (gpa >> table.entry_shift) & ((1 << self.index_bits(table)) - 1)


def find_kvm_secondary_pte(pgt: RadixPgtable, gpa: int) -> RadixLeaf | None:
    """The present leaf that translates ``gpa``, or None. (The kernel returns a pointer to
    an empty PTE slot as well, which every caller then tests with pte_present.)

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:find_kvm_secondary_pte (v6.18)
    """
    table = pgt.root
    while True:
        index = pgt.index(table, gpa)
        entry = table.entries.get(index)
        if entry is None:
            return None
        if isinstance(entry, int):
            base = gpa & ~((1 << table.entry_shift) - 1)
            return RadixLeaf(table, index, base, table.entry_shift)
        table = entry


def leaves_in(pgt: RadixPgtable, start: int, end: int) -> list[RadixLeaf]:
    """Every present leaf overlapping gpa [start, end), in gpa order. The model's way to
    visit a range: the kernel looks up every base page of it, which visits the same leaves."""
    found: list[RadixLeaf] = []
    _collect(pgt, pgt.root, 0, start, end, found)
    return found


def _collect(
    pgt: RadixPgtable, table: RadixTable, base: int, start: int, end: int, found: list[RadixLeaf]
) -> None:
    span = 1 << table.entry_shift
    for index in sorted(table.entries):
        gpa = base + index * span
        if gpa + span <= start or gpa >= end:
            continue
        entry = table.entries[index]
        if isinstance(entry, int):
            found.append(RadixLeaf(table, index, gpa, table.entry_shift))
        else:
            _collect(pgt, entry, gpa, start, end, found)


# -- TLB and tlbie ----------------------------------------------------------------------------


def kvmppc_radix_tlbie_page(pgt: RadixPgtable, gpa: int, shift: int) -> None:
    """tlbie for the page of ``1 << shift`` bytes containing ``gpa``, and wait for it: no
    vCPU caches a translation of it any more, so the next access walks the tree again (and
    sets R and C there again).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_radix_tlbie_page (v6.18)
    """
    start = (gpa & ~((1 << shift) - 1)) >> pgt.page_shift
    npages = 1 << (shift - pgt.page_shift)
    for gfn in list(pgt.tlb.irange(start, start + npages, inclusive=(True, False))):
        del pgt.tlb[gfn]
    pgt.events.append(HarvestEvent("tlbie", start, npages))


def radix_flush_all_tlbs(pgt: RadixPgtable) -> None:
    """Every vCPU drops every translation of the partition (a full flush)."""
    pgt.tlb.clear()


def kvmppc_radix_update_pte(leaf: RadixLeaf, clr: int, set_: int) -> int:
    """Atomically clear ``clr`` and set ``set_`` in a leaf; returns the old value. Clearing
    every bit removes the leaf (the model drops the dict key for the zero entry).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_radix_update_pte (v6.18)
    """
    old = leaf.pte
    new = (old & ~clr) | set_
    if new:
        leaf.table.entries[leaf.index] = new
    else:
        del leaf.table.entries[leaf.index]
    return old


def kvmppc_unmap_pte(
    kvm: Kvm, pgt: RadixPgtable, leaf: RadixLeaf, gpa: int, memslot: KvmMemorySlot | None
) -> None:
    """Remove a leaf (the caller holds mmu_lock): clear it, complete the tlbie, and only then
    fold its C bit into the slot's dirty bitmap. Read before the tlbie, C could still change
    behind KVM's back; after it, no vCPU can write the page through this translation.

    ``gpa`` is the address the caller looked up (inside the leaf); the kernel marks the dirty
    bits from that page on, for the leaf's size. A huge leaf never sits in a logged slot, so
    for the pages of a bitmap the two agree.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_unmap_pte (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("kvmppc_unmap_pte")
    old = kvmppc_radix_update_pte(leaf, ~0, 0)
    pgt.events.append(
        HarvestEvent("c_cleared", leaf.gpa >> pgt.page_shift, leaf.size >> pgt.page_shift)
    )
    kvmppc_radix_tlbie_page(pgt, leaf.gpa, leaf.shift)
    gfn = gpa >> pgt.page_shift
    if memslot is None:
        memslot = kvm.memslots(0).gfn_to_memslot(gfn)
        if memslot is None:
            return
    if old & _PAGE_DIRTY and memslot.dirty_bitmap is not None:
        kvmppc_update_dirty_map(kvm, memslot, gfn, leaf.size)
        pgt.events.append(HarvestEvent("reported", gfn, leaf.size >> pgt.page_shift))


def _unmap_free_entry_table(
    kvm: Kvm, pgt: RadixPgtable, table: RadixTable, index: int, base: int
) -> None:
    """A huge leaf is about to replace the table at ``index`` (covering gpa ``base`` on):
    unlink the table (and, in the kernel, flush the page walk cache) and free it. Leaves are
    not expected under it (a table is only replaced after its pages were unmapped, say when
    dirty logging stopped); any found is WARNed about and unmapped, tlbie included.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_unmap_free_pmd_entry_table,
    kvmppc_unmap_free_pud_entry_table, kvmppc_unmap_free_pte, kvmppc_unmap_free_pmd (v6.18)
    """
    subtree = table.entries.pop(index)
    assert isinstance(subtree, RadixTable)
    orphans: list[RadixLeaf] = []
    _collect(pgt, subtree, base, base, base + (1 << table.entry_shift), orphans)
    for leaf in orphans:
        kvm.warn_on(True, "N4", "a huge leaf replaced a table that still mapped pages")
        kvmppc_unmap_pte(kvm, pgt, leaf, leaf.gpa, None)


def kvmppc_create_pte(kvm: Kvm, pgt: RadixPgtable, pte: int, gpa: int, level: int) -> None:
    """Install ``pte`` as a leaf of ``level`` (0: base page, 1: 2 MiB, 2: 1 GiB) for ``gpa``,
    with mmu_lock held and the caller's retry check passed.

    Tables are created on the way down. A huge leaf in the way of a smaller one is unmapped
    (with its tlbie) and replaced by a table; a table in the way of a huge leaf is freed. A
    leaf already there at the same level is either the same (another vCPU won the race) or
    gains the new write permission and R/C bits; anything else differing is a WARN.

    The kernel allocates the tables before taking mmu_lock and returns -EAGAIN when what it
    allocated no longer fits what it finds under the lock; the model allocates under the
    lock (an allocation cannot fail here), so that retry does not arise.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_create_pte (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("kvmppc_create_pte")
    target_shift = leaf_shift(level, pgt.page_shift)
    table = pgt.root
    while True:
        index = pgt.index(table, gpa)
        entry = table.entries.get(index)
        base = gpa & ~((1 << table.entry_shift) - 1)
        if table.entry_shift == target_shift:
            break
        if isinstance(entry, int):
            # A huge leaf where a smaller page goes: it must go first.
            leaf = RadixLeaf(table, index, base, table.entry_shift)
            kvmppc_unmap_pte(kvm, pgt, leaf, base, None)
            entry = None
        if entry is None:
            entry = RadixTable(pgt.next_shift(table))
            table.entries[index] = entry
        table = entry
    if isinstance(entry, RadixTable):
        _unmap_free_entry_table(kvm, pgt, table, index, base)
        entry = None
    if entry is None:
        table.entries[index] = pte
        return
    if entry == pte:
        return
    kvm.warn_on(
        bool((entry ^ pte) & PTE_BITS_MUST_MATCH),
        "N4",
        f"two faults disagree on the leaf for gpa {gpa:#x}",
    )
    kvmppc_radix_update_pte(RadixLeaf(table, index, base, table.entry_shift), 0, pte)
