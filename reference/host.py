"""The VMM's address space and its host page tables, as KVM sees them.

KVM never owns guest memory: it maps pages of the VMM's address space, found through the
host's page tables. This module models that address space sparsely:

* VMAs with their protections, of three kinds: anonymous private memory, shared mappings of
  a memfd (the file owns the pages, so every mapping of it sees the same data), and
  VM_PFNMAP mappings of device memory (pfns without a struct page);
* a host PTE (pfn, writable, young, dirty) only for pages that were touched, a PMD for each
  huge page, and a swap entry for each page reclaim took away;
* the system calls that change them (mmap, munmap, mprotect, madvise), the VMM's own
  accesses, and long-term pins.

A host PTE is writable exactly when its VMA is and it does not map the zero page: every
anonymous page the model creates is exclusive to this one process (no fork, no KSM), so the
kernel never needs to keep one read-only for copy-on-write.

Every change that can take a page away from a guest tells the registered MMU notifier first
and last (invalidate_range_start, then the change, then invalidate_range_end), with the
kernel's event kind, in the kernel's order, so that KVM can drop its mappings in between.
Errors are errnos, as the system calls return them, never exceptions. Huge pages live in
host_thp.py; aging, reclaim and migration in host_reclaim.py; physical memory in
host_pages.py.

kernel: mm/mmap.c:do_mmap, mm/vma.c:do_vmi_munmap, mm/mprotect.c:do_mprotect_pkey,
mm/madvise.c:madvise_walk_vmas, mm/memory.c:handle_mm_fault, mm/gup.c (pins),
mm/mmap.c:exit_mmap, mm/mmu_notifier.c (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from errno import EFAULT, EINVAL, ENOMEM

from sortedcontainers import SortedDict

from kvmspec.reference import host_reclaim, host_thp
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.host_notifier import MmuNotifier, MmuNotifierEvent
from kvmspec.reference.host_pages import (
    ZERO_PFN,
    Device,
    HostPage,
    HostPte,
    MemFile,
    PhysicalMemory,
    SwapEntry,
    folio_of,
)
from kvmspec.reference.ordered import floor_item

__all__ = [
    "LEVEL_NONE",
    "LEVEL_PMD",
    "LEVEL_PTE",
    "PROTECTIONS",
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "ZERO_PFN",
    "Device",
    "HostMm",
    "HostPage",
    "HostPte",
    "MemFile",
    "MmuNotifier",
    "MmuNotifierEvent",
    "Vma",
    "get_page",
    "put_page",
]

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
PROTECTIONS = {"none": PROT_NONE, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}

LEVEL_NONE, LEVEL_PTE, LEVEL_PMD = 0, 1, 2
"""How the host maps an address: not at all, by a PTE (one page), by a PMD (a huge page).
The numbering is x86's PG_LEVEL_4K and PG_LEVEL_2M."""

# Where the model places mappings: top-down below the usual mmap base, 2 MiB aligned so that
# huge pages are possible, with a guard gap between regions.
MMAP_TOP = 0x7F00_0000_0000
MMAP_ALIGN = 2 << 20


@dataclass(slots=True)
class Vma:
    """One VMA. ``backing`` None is anonymous private memory; a MemFile is a shared mapping
    of it from page ``pgoff``; a Device is a VM_PFNMAP mapping of its memory from ``pgoff``.
    ``hugepage`` is VM_HUGEPAGE (MADV_HUGEPAGE): khugepaged may collapse the range."""

    start: int
    end: int
    prot: int
    backing: MemFile | Device | None = None
    pgoff: int = 0
    hugepage: bool = False

    def index(self, hva: int, page_size: int) -> int:
        """The page index in the backing file or device that ``hva`` maps."""
        return self.pgoff + (hva - self.start) // page_size


@dataclass
class HostMm:
    """struct mm_struct of the VMM: VMAs, the page tables of touched pages, and the memory."""

    page_size: int
    task_size: int
    vmas: SortedDict = field(default_factory=SortedDict)  # start -> Vma
    ptes: SortedDict = field(default_factory=SortedDict)  # page-aligned hva -> HostPte
    pmds: SortedDict = field(default_factory=SortedDict)  # huge-page-aligned hva -> HostPte
    swap: SortedDict = field(default_factory=SortedDict)  # page-aligned hva -> SwapEntry
    notifier: MmuNotifier | None = None
    invalidating: list[tuple[int, int]] = field(default_factory=list)
    """Host ranges between their notifier start and end right now."""
    memory: PhysicalMemory = field(init=False)
    hpage_nr: int = field(init=False)
    """Pages in a huge page: one page table's worth of 8-byte entries (512 with 4 KiB)."""
    hpage_size: int = field(init=False)
    next_top: int = field(init=False)

    def __post_init__(self) -> None:
        self.memory = PhysicalMemory(self.page_size)
        self.hpage_nr = self.page_size // 8
        self.hpage_size = self.page_size * self.hpage_nr
        self.next_top = min(MMAP_TOP, self.task_size)

    @property
    def pages(self) -> SortedDict:
        """RAM pages with a record, by pfn (see host_pages.PhysicalMemory)."""
        return self.memory.pages

    # -- lookups ----------------------------------------------------------------------------

    def find_vma(self, address: int) -> Vma | None:
        """The VMA containing ``address``, or None."""
        floor = floor_item(self.vmas, address)
        if floor is None:
            return None
        vma: Vma = floor[1]
        return vma if address < vma.end else None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs that intersect [start, end), in address order."""
        floor = floor_item(self.vmas, start)
        first = floor[0] if floor is not None else start
        found = []
        for key in self.vmas.irange(first, end, inclusive=(True, False)):
            vma: Vma = self.vmas[key]
            if vma.end > start:
                found.append(vma)
        return found

    @staticmethod
    def keys_in(table: SortedDict, start: int, end: int) -> list[int]:
        """The keys of ``table`` in [start, end), in order."""
        return list(table.irange(start, end, inclusive=(True, False)))

    def lookup(self, hva: int) -> HostPte | None:
        """What the host page tables map at ``hva``, as a PTE for that one page (a copy, for a
        page inside a huge page). None for nothing or a swap entry.

        kernel: mm/pagewalk.c:folio_walk_start (v6.18)
        """
        page_hva = hva - hva % self.page_size
        pte: HostPte | None = self.ptes.get(page_hva)
        if pte is not None:
            return pte
        haddr = hva - hva % self.hpage_size
        pmd: HostPte | None = self.pmds.get(haddr)
        if pmd is None:
            return None
        return replace(pmd, pfn=pmd.pfn + (page_hva - haddr) // self.page_size)

    def translate(self, hva: int) -> tuple[int, bool] | None:
        """What :meth:`lookup` says about ``hva``, as (pfn, writable), without copying the
        PMD of a huge page (the invariants ask this for every page of every leaf)."""
        page_hva = hva - hva % self.page_size
        pte: HostPte | None = self.ptes.get(page_hva)
        if pte is not None:
            return pte.pfn, pte.writable
        haddr = hva - hva % self.hpage_size
        pmd: HostPte | None = self.pmds.get(haddr)
        if pmd is None:
            return None
        return pmd.pfn + (page_hva - haddr) // self.page_size, pmd.writable

    def mapping_level(self, hva: int) -> int:
        """LEVEL_PMD, LEVEL_PTE or LEVEL_NONE: the size of the host mapping of ``hva``, which
        bounds the size of the mapping KVM may create for it.

        kernel: arch/x86/kvm/mmu/mmu.c:host_pfn_mapping_level;
        arch/arm64/kvm/mmu.c:get_user_mapping_size (v6.18)
        """
        if hva - hva % self.hpage_size in self.pmds:
            return LEVEL_PMD
        return LEVEL_PTE if hva - hva % self.page_size in self.ptes else LEVEL_NONE

    # -- the MMU notifier ---------------------------------------------------------------------

    def invalidate_start(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        """mmu_notifier_invalidate_range_start: secondary MMUs drop their mappings of
        [start, end) and create none until the matching end."""
        self.invalidating.append((start, end))
        if self.notifier is not None:
            self.notifier.invalidate_range_start(start, end, event)

    def invalidate_end(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        """mmu_notifier_invalidate_range_end."""
        if self.notifier is not None:
            self.notifier.invalidate_range_end(start, end, event)
        self.invalidating.remove((start, end))

    # -- page-table entries -------------------------------------------------------------------

    def writable(self, vma: Vma, pfn: int) -> bool:
        """Whether a host PTE of ``vma`` mapping ``pfn`` is writable (see the module's doc)."""
        return bool(vma.prot & PROT_WRITE) and pfn != ZERO_PFN

    def map_page(self, hva: int, page: HostPage, vma: Vma, write: bool) -> HostPte:
        """Install a PTE for ``page`` at ``hva``: the mapping takes a reference."""
        folio = folio_of(page)
        folio.mapcount += 1
        folio.refcount += 1
        pte = HostPte(page.pfn, self.writable(vma, page.pfn), dirty=write)
        self.ptes[hva] = pte
        return pte

    def unmap_pte(self, hva: int) -> None:
        """Remove one PTE; a dirty PTE makes the page dirty; its reference goes."""
        pte: HostPte = self.ptes.pop(hva)
        page = self.memory.page(pte.pfn)
        if page is None:
            return  # the zero page or device memory: nothing is counted
        page.dirty |= pte.dirty
        folio_of(page).mapcount -= 1
        self.memory.put(page)

    def unmap_pmd(self, haddr: int) -> None:
        """Remove a huge page's PMD, and its reference."""
        pmd: HostPte = self.pmds.pop(haddr)
        folio: HostPage = self.memory.pages[pmd.pfn]
        folio.dirty |= pmd.dirty
        folio.mapcount -= 1
        self.memory.put(folio)

    def drop_swap_entry(self, hva: int) -> None:
        """Free a swap entry (and the swap cache's reference to its page, if it has one)."""
        entry: SwapEntry = self.swap.pop(hva)
        if entry.cached is not None:
            self.memory.put(entry.cached)

    def swap_in(self, vma: Vma, hva: int, write: bool) -> HostPte:
        """Bring the page swapped out at ``hva`` back: the swap cache's page if it is still
        there, else a new page with the contents. No notifier call: nothing was mapped.

        kernel: mm/memory.c:do_swap_page (v6.18)
        """
        entry: SwapEntry = self.swap.pop(hva)
        if entry.cached is not None:
            pte = self.map_page(hva, entry.cached, vma, write)
            self.memory.put(entry.cached)  # the swap cache's reference
            return pte
        page = self.memory.alloc()
        page.index = hva // self.page_size
        page.data = entry.data
        return self.map_page(hva, page, vma, write)

    # -- system calls -------------------------------------------------------------------------

    def mmap(
        self,
        size: int,
        prot: int,
        backing: MemFile | Device | None = None,
        offset: int = 0,
        hugepage: bool = False,
    ) -> tuple[int, int]:
        """mmap(NULL, size, prot, flags, fd, offset): (errno, address).

        Without ``backing``, MAP_PRIVATE | MAP_ANONYMOUS; with a MemFile, MAP_SHARED of the
        memfd (access beyond the file's size faults with SIGBUS, EFAULT here); with a Device,
        its driver's mmap (a range beyond the device's memory is EINVAL, as VFIO answers).
        ``hugepage`` is a madvise(MADV_HUGEPAGE) of the new range.

        kernel: mm/mmap.c:do_mmap; drivers/vfio/pci/vfio_pci_core.c:vfio_pci_core_mmap (v6.18)
        """
        if size <= 0 or offset % self.page_size or offset < 0:
            return EINVAL, 0
        length = -(-size // self.page_size) * self.page_size
        pgoff = offset // self.page_size
        if isinstance(backing, Device) and pgoff + length // self.page_size > backing.npages:
            return EINVAL, 0
        start = (self.next_top - length) // MMAP_ALIGN * MMAP_ALIGN
        if start < MMAP_ALIGN:
            return ENOMEM, 0
        self.next_top = start - MMAP_ALIGN
        self.vmas[start] = Vma(start, start + length, prot, backing, pgoff, hugepage)
        return 0, start

    def munmap(self, start: int, length: int) -> int:
        """munmap: EINVAL for an unaligned start, a zero length or a range beyond the address
        space; unmapping a hole is not an error (a second munmap of the same range returns
        0). The VMAs are split first (a huge page across an edge is split then), then the
        whole range is zapped under one UNMAP invalidation.

        kernel: mm/vma.c:do_vmi_munmap, vms_gather_munmap_vmas; mm/memory.c:unmap_vmas (v6.18)
        """
        if start % self.page_size or start > self.task_size or length > self.task_size - start:
            return EINVAL
        if length <= 0:
            return EINVAL
        end = start + -(-length // self.page_size) * self.page_size
        if not self.vmas_in(start, end):
            return 0
        self.split_vma(start)
        self.split_vma(end)
        run_to_completion(self._zap(start, end, MmuNotifierEvent.UNMAP))
        for vma in self.vmas_in(start, end):
            del self.vmas[vma.start]
        return 0

    def mprotect(self, start: int, length: int, prot: int) -> int:
        """mprotect: EINVAL for an unaligned start or unknown bits; 0 for a zero length;
        ENOMEM when the range starts in a hole, or meets one (the VMAs before the hole keep
        their new protection). A VMA whose protection changes is split to the range and, if
        anything is mapped in it, its entries change under a PROTECTION_VMA invalidation.

        The kernel's invalidation starts at the first populated upper-level page table; the
        model invalidates when a page of the part is mapped or swapped, over the whole part.

        kernel: mm/mprotect.c:do_mprotect_pkey, mprotect_fixup, change_protection (v6.18)
        """
        if start % self.page_size:
            return EINVAL
        if length == 0:
            return 0
        end = start + -(-length // self.page_size) * self.page_size
        if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
            return EINVAL
        address = start
        while address < end:
            vma = self.find_vma(address)
            if vma is None:
                return ENOMEM
            part_end = min(end, vma.end)
            if vma.prot != prot:
                self._change_protection(address, part_end, prot)
            address = part_end
        return 0

    def _change_protection(self, start: int, end: int, prot: int) -> None:
        self.split_vma(start)
        self.split_vma(end)
        vma: Vma = self.vmas[start]
        populated = any(
            self.keys_in(table, start, end) for table in (self.ptes, self.pmds, self.swap)
        )
        if populated:
            self.invalidate_start(start, end, MmuNotifierEvent.PROTECTION_VMA)
        vma.prot = prot
        for table in (self.ptes, self.pmds):
            for hva in self.keys_in(table, start, end):
                table[hva].writable = self.writable(vma, table[hva].pfn)
        if populated:
            self.invalidate_end(start, end, MmuNotifierEvent.PROTECTION_VMA)

    def madvise_dontneed(self, start: int, length: int) -> int:
        """madvise(MADV_DONTNEED): the pages are dropped; the next access to anonymous memory
        reads zeroes, to a memfd the file's data again."""
        return run_to_completion(self.madvise_dontneed_op(start, length))

    def madvise_dontneed_op(self, start: int, length: int) -> KernelOp[int]:
        """:meth:`madvise_dontneed` as a racy path: other CPUs may run between the notifier's
        start and the zap, and between the zap and the end (a memslot update must wait).

        Each VMA of the range is zapped under its own CLEAR invalidation. A VM_PFNMAP VMA
        stops the walk with EINVAL; holes give ENOMEM after the mapped parts are done.

        kernel: mm/madvise.c:madvise_walk_vmas, madvise_dontneed_free,
        madvise_dontneed_free_valid_vma; mm/memory.c:zap_page_range_single (v6.18)
        """
        errno, end = self.madvise_range(start, length)
        if errno or end == start:
            return errno
        parts, holes = self.madvise_walk(start, end)
        for part_start, part_end, vma in parts:
            if isinstance(vma.backing, Device):
                return EINVAL
            yield from self._zap(part_start, part_end, MmuNotifierEvent.CLEAR)
        return ENOMEM if holes else 0

    def madvise_hugepage(self, start: int, length: int) -> int:
        """madvise(MADV_HUGEPAGE): mark the range VM_HUGEPAGE, so khugepaged may collapse it
        (the model's transparent_hugepage/enabled is "madvise"). Splits VMAs, changes no
        page: no notifier call. ENOMEM for holes, after the mapped parts are done.

        kernel: mm/madvise.c:madvise_vma_behavior; mm/khugepaged.c:hugepage_madvise (v6.18)
        """
        errno, end = self.madvise_range(start, length)
        if errno or end == start:
            return errno
        parts, holes = self.madvise_walk(start, end)
        for part_start, part_end, vma in parts:
            if not vma.hugepage:
                self.split_vma(part_start)
                self.split_vma(part_end)
                self.vmas[part_start].hugepage = True
        return ENOMEM if holes else 0

    def madvise_collapse(self, start: int, length: int) -> int:
        """madvise(MADV_COLLAPSE): collapse every aligned huge-page block of the range now
        (see :func:`host_thp.madvise_collapse`)."""
        return host_thp.madvise_collapse(self, start, length)

    def madvise_range(self, start: int, length: int) -> tuple[int, int]:
        """madvise's own checks: (EINVAL for an unaligned start, or 0, and the range's end).
        A zero length is a successful no-op (end == start).

        kernel: mm/madvise.c:madvise_lock, do_madvise (v6.18)
        """
        if start % self.page_size or length < 0:
            return EINVAL, start
        return 0, start + -(-length // self.page_size) * self.page_size

    def madvise_walk(self, start: int, end: int) -> tuple[list[tuple[int, int, Vma]], bool]:
        """The parts of [start, end) inside each VMA, in order, and whether holes were met.

        kernel: mm/madvise.c:madvise_walk_vmas (v6.18)
        """
        parts = []
        address = start
        holes = False
        for vma in self.vmas_in(start, end):
            holes |= vma.start > address
            part_start = max(start, vma.start)
            address = min(end, vma.end)
            parts.append((part_start, address, vma))
        return parts, holes or address < end

    def split_vma(self, address: int) -> None:
        """Split the VMA that contains ``address`` (if any, and not at its start) in two
        there. A huge page mapped across ``address`` is split first.

        kernel: mm/vma.c:__split_vma; mm/huge_memory.c:vma_adjust_trans_huge (v6.18)
        """
        vma = self.find_vma(address)
        if vma is None or vma.start == address:
            return
        if address % self.hpage_size:
            host_thp.split_huge_pmd(self, address - address % self.hpage_size)
        pgoff = vma.index(address, self.page_size)
        self.vmas[address] = replace(vma, start=address, pgoff=pgoff)
        vma.end = address

    def _zap(self, start: int, end: int, event: MmuNotifierEvent) -> KernelOp[None]:
        """Unmap every page of [start, end) between the notifier's start and end: secondary
        MMUs drop their mappings before the pages can be freed. A huge page only partly in
        the range is split first (inside the zap, with its own CLEAR invalidation).

        kernel: mm/memory.c:unmap_vmas, zap_page_range_single, zap_pmd_range (v6.18)
        """
        self.invalidate_start(start, end, event)
        yield Preempt("host: invalidation started, zapping the host PTEs")
        for haddr in self.keys_in(self.pmds, start - self.hpage_size + 1, end):
            if start <= haddr and haddr + self.hpage_size <= end:
                self.unmap_pmd(haddr)
            else:
                host_thp.split_huge_pmd(self, haddr)
        for hva in self.keys_in(self.ptes, start, end):
            self.unmap_pte(hva)
        for hva in self.keys_in(self.swap, start, end):
            self.drop_swap_entry(hva)
        yield Preempt("host: host PTEs zapped, ending the invalidation")
        self.invalidate_end(start, end, event)

    def exit_mmap(self) -> None:
        """The VMM exits: the notifier's ``release`` runs first (KVM drops every mapping),
        which also ends the subscription; then the whole address space is unmapped, with
        nobody left to notify. Long-term pinned pages outlive it until unpinned.

        kernel: mm/mmap.c:exit_mmap; mm/mmu_notifier.c:__mmu_notifier_release (v6.18)
        """
        if self.notifier is not None:
            self.notifier.release()
            self.notifier = None
        run_to_completion(self._zap(0, self.task_size, MmuNotifierEvent.UNMAP))
        self.vmas.clear()

    # -- the pages behind the addresses -------------------------------------------------------

    def fault_in(self, hva: int, write: bool) -> tuple[int, HostPte | None]:
        """Make the page at ``hva`` present, as a user access or get_user_pages would:
        EFAULT without a VMA, without the needed permission, or beyond a memfd's end (the
        kernel's SIGBUS). Returns the PTE (for a page of a huge page, a copy for that page).

        Anonymous memory: a read of an untouched page maps the zero page read-only, a write
        gives the page its own frame, a swapped-out page comes back. A memfd page is the
        file's (allocated on first touch). A device page is the device's pfn.

        kernel: mm/memory.c:handle_mm_fault, do_anonymous_page, do_shared_fault,
        do_swap_page, wp_page_copy (v6.18)
        """
        vma = self.find_vma(hva)
        if vma is None or not vma.prot & PROT_READ or (write and not vma.prot & PROT_WRITE):
            return EFAULT, None
        page_hva = hva - hva % self.page_size
        pmd: HostPte | None = self.pmds.get(hva - hva % self.hpage_size)
        pte: HostPte | None = self.ptes.get(page_hva)
        if pmd is not None:
            pmd.dirty |= write
            pmd.young = True
            pte = self.lookup(hva)
        elif pte is None:
            errno, pte = self._fault_missing(vma, page_hva, write)
            if errno:
                return errno, None
        elif write and pte.pfn == ZERO_PFN:
            # Breaking copy-on-write changes the page behind the address: secondary MMUs
            # that mapped the zero page must let go of it first.
            end = page_hva + self.page_size
            self.invalidate_start(page_hva, end, MmuNotifierEvent.CLEAR)
            del self.ptes[page_hva]
            page = self.memory.alloc()
            page.index = page_hva // self.page_size
            pte = self.map_page(page_hva, page, vma, write)
            self.invalidate_end(page_hva, end, MmuNotifierEvent.CLEAR)
        assert pte is not None
        pte.dirty |= write
        pte.young = True
        self.memory.page(pte.pfn)  # a page of a huge page gets its record when touched
        return 0, pte

    def _fault_missing(self, vma: Vma, hva: int, write: bool) -> tuple[int, HostPte | None]:
        """A fault where no PTE exists (nothing to invalidate: nobody mapped anything)."""
        backing = vma.backing
        if isinstance(backing, Device):
            pfn = backing.first_pfn + vma.index(hva, self.page_size)
            pte = HostPte(pfn, self.writable(vma, pfn), dirty=write)
            self.ptes[hva] = pte
            return 0, pte
        if isinstance(backing, MemFile):
            index = vma.index(hva, self.page_size)
            if index * self.page_size >= backing.size:
                return EFAULT, None
            cached = backing.pages.get(index)
            if cached is None:
                page = self.memory.alloc()
                page.file, page.index, page.refcount = backing, index, 1  # the page cache's
                backing.pages[index] = page.pfn
            else:
                page = self.memory.pages[cached]
            return 0, self.map_page(hva, page, vma, write)
        if hva in self.swap:
            return 0, self.swap_in(vma, hva, write)
        if not write:
            pte = HostPte(ZERO_PFN, writable=False)
            self.ptes[hva] = pte
            return 0, pte
        page = self.memory.alloc()
        page.index = hva // self.page_size
        return 0, self.map_page(hva, page, vma, write)

    def host_write(self, hva: int, data: bytes) -> int:
        """The VMM writes ``data`` at ``hva`` (within one page): 0 or EFAULT."""
        errno, pte = self.fault_in(hva, write=True)
        if errno or pte is None:
            return errno
        self.memory.write(pte.pfn, hva % self.page_size, data)
        return 0

    def host_read(self, hva: int, size: int) -> tuple[int, bytes]:
        """The VMM reads ``size`` bytes at ``hva`` (within one page): (0 or EFAULT, bytes)."""
        errno, pte = self.fault_in(hva, write=False)
        if errno or pte is None:
            return errno, b""
        return 0, self.memory.read(pte.pfn, hva % self.page_size, size)

    def pin_user_page(self, hva: int) -> tuple[int, int]:
        """pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) of one page: (errno, pfn). The page is
        faulted in for writing and pinned: it cannot migrate, be reclaimed or collapse until
        unpinned. EFAULT for a VM_PFNMAP VMA (no struct page to pin) or a failed fault.

        kernel: mm/gup.c:pin_user_pages, check_vma_flags (v6.18)
        """
        vma = self.find_vma(hva)
        if vma is not None and isinstance(vma.backing, Device):
            return EFAULT, 0
        errno, pte = self.fault_in(hva, write=True)
        if errno or pte is None:
            return errno, 0
        page = self.memory.page(pte.pfn)
        assert page is not None, "a write fault always maps a real page"
        folio_of(page).pins += 1
        return 0, pte.pfn

    def get_user_pages_fast_only(self, hva: int, nr_pages: int) -> list[HostPage]:
        """Take a reference to each of the ``nr_pages`` pages from ``hva`` that the page tables
        already map writable, stopping at the first that is not: the pages got, a prefix.
        Nothing is faulted in and no lock is taken, so a missing, read-only (the zero page)
        or swapped-out page, or one without a struct page (device memory), ends it.

        kernel: mm/gup.c:get_user_pages_fast_only with FOLL_WRITE (v6.18)
        """
        pages: list[HostPage] = []
        for index in range(nr_pages):
            pte = self.lookup(hva + index * self.page_size)
            if pte is None or not pte.writable:
                break
            page = self.memory.page(pte.pfn)
            if page is None:
                break
            get_page(page)
            pages.append(page)
        return pages

    def unpin_user_page(self, pfn: int) -> None:
        """Release a pin taken by :meth:`pin_user_page`.

        kernel: mm/gup.c:unpin_user_page (v6.18)
        """
        page = self.memory.page(pfn)
        assert page is not None, f"pfn {pfn} has no struct page"
        self.memory.unpin(page)

    # -- memory management behind the VMM's back (host_thp.py, host_reclaim.py) ---------------

    def migrate_page(self, hva: int) -> int:
        """Move the page (or huge page) at ``hva`` to a new frame: 0, EBUSY or EFAULT (see
        :func:`host_reclaim.migrate_page`)."""
        return host_reclaim.migrate_page(self, hva)

    def age(self, hva: int, flush: bool = True) -> bool:
        """Reclaim's aging of the mapping at ``hva`` (see :func:`host_reclaim.age`)."""
        return host_reclaim.age(self, hva, flush)

    def reclaim(self, hva: int) -> host_reclaim.Reclaim:
        """Reclaim picks the page at ``hva`` (see :func:`host_reclaim.reclaim`)."""
        return host_reclaim.reclaim(self, hva)

    def khugepaged_scan(self, hva: int) -> bool:
        """khugepaged visits the huge-page block of ``hva`` (see
        :func:`host_thp.khugepaged_scan`)."""
        return host_thp.khugepaged_scan(self, hva)

    def split_huge_pmd(self, hva: int) -> bool:
        """Split the huge page mapping of ``hva`` into PTEs, if there is one (see
        :func:`host_thp.split_huge_pmd`)."""
        return host_thp.split_huge_pmd(self, hva - hva % self.hpage_size)


def get_page(page: HostPage) -> None:
    """Take a reference to ``page``'s folio."""
    folio_of(page).refcount += 1


def put_page(mm: HostMm, page: HostPage) -> None:
    """Drop a reference to ``page``'s folio; the last one frees it."""
    mm.memory.put(page)
