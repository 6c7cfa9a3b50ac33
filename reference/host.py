"""The VMM's address space and the host pages behind it, as KVM sees them.

KVM never owns guest memory: it maps pages that belong to the VMM's address space, found
through the host's page tables. This module models that host side sparsely: VMAs with their
protections, a host PTE (pfn, writable, young, dirty) only for pages that were touched, and
physical pages with reference counts, long-term pins and contents (untouched pages read as
zero, through the shared zero page).

Every change that can take a page away from a guest tells the registered MMU notifier first
and last (invalidate_range_start, then the change, then invalidate_range_end), in the
kernel's order, so that KVM can drop its mappings in between. Errors are errnos, as the
system calls return them, never exceptions.

kernel: mm/mmap.c:do_mmap, mm/vma.c:do_vmi_munmap, mm/mprotect.c:do_mprotect_pkey,
mm/madvise.c:madvise_dontneed_free, mm/migrate.c:migrate_pages, mm/memory.c:wp_page_copy,
mm/gup.c (pins),
mm/mmu_notifier.c (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from errno import EBUSY, EFAULT, EINVAL, ENOMEM
from typing import Protocol

from sortedcontainers import SortedDict

from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.ordered import floor_item

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
PROTECTIONS = {"none": PROT_NONE, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}

# Where the model places mappings: top-down below the usual mmap base, 2 MiB aligned so that
# huge pages are possible, with a guard gap between regions.
MMAP_TOP = 0x7F00_0000_0000
MMAP_ALIGN = 2 << 20
ZERO_PFN = 0
"""The shared zero page: what an untouched anonymous page reads as."""


class MmuNotifier(Protocol):
    """What the host tells a secondary MMU (KVM) about changes to the address space."""

    def invalidate_range_start(self, start: int, end: int) -> None: ...

    def invalidate_range_end(self, start: int, end: int) -> None: ...

    def clear_flush_young(self, start: int, end: int) -> bool: ...

    def clear_young(self, start: int, end: int) -> bool: ...

    def test_young(self, address: int) -> bool: ...


@dataclass(slots=True)
class Vma:
    start: int
    end: int
    prot: int


@dataclass(slots=True)
class HostPage:
    """A physical page (struct folio, one page). ``data`` None means all zeroes."""

    pfn: int
    refcount: int = 1
    pins: int = 0
    data: bytearray | None = None
    dirty: bool = False


@dataclass(slots=True)
class HostPte:
    pfn: int
    writable: bool
    young: bool = True
    dirty: bool = False


@dataclass
class HostMm:
    """struct mm_struct of the VMM: VMAs, the host PTEs of touched pages, and the pages."""

    page_size: int
    task_size: int
    vmas: SortedDict = field(default_factory=SortedDict)  # start -> Vma
    ptes: dict[int, HostPte] = field(default_factory=dict)  # page-aligned hva -> pte
    pages: dict[int, HostPage] = field(default_factory=dict)  # pfn -> page
    notifier: MmuNotifier | None = None
    invalidating: list[tuple[int, int]] = field(default_factory=list)
    """Host ranges between their notifier start and end right now."""
    next_pfn: int = 1
    next_top: int = 0

    def __post_init__(self) -> None:
        self.next_top = min(MMAP_TOP, self.task_size)

    # -- lookups ----------------------------------------------------------------------------

    def find_vma(self, address: int) -> Vma | None:
        """The VMA containing ``address``, or None."""
        floor = floor_item(self.vmas, address)
        if floor is None:
            return None
        vma: Vma = floor[1]
        return vma if address < vma.end else None

    def _vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs that intersect [start, end), in address order."""
        floor = floor_item(self.vmas, start)
        first = floor[0] if floor is not None else start
        found = []
        for key in self.vmas.irange(first, end, inclusive=(True, False)):
            vma: Vma = self.vmas[key]
            if vma.end > start:
                found.append(vma)
        return found

    def _covered(self, start: int, end: int) -> bool:
        """Is every byte of [start, end) inside some VMA?"""
        address = start
        while address < end:
            vma = self.find_vma(address)
            if vma is None:
                return False
            address = vma.end
        return True

    def _aligned(self, start: int, length: int) -> bool:
        return start % self.page_size == 0 and length > 0

    def _pages_in(self, start: int, end: int) -> list[int]:
        """The touched pages in [start, end), sorted."""
        return sorted(hva for hva in self.ptes if start <= hva < end)

    # -- notifier plumbing --------------------------------------------------------------------

    def _invalidate_start(self, start: int, end: int) -> None:
        self.invalidating.append((start, end))
        if self.notifier is not None:
            self.notifier.invalidate_range_start(start, end)

    def _invalidate_end(self, start: int, end: int) -> None:
        if self.notifier is not None:
            self.notifier.invalidate_range_end(start, end)
        self.invalidating.remove((start, end))

    def _drop_pte(self, hva: int) -> None:
        """Unmap one page; a dirty PTE makes the page dirty; the last reference frees it."""
        pte = self.ptes.pop(hva)
        page = self.pages.get(pte.pfn)
        if page is None:
            return
        page.dirty |= pte.dirty
        put_page(self, page)

    # -- system calls -------------------------------------------------------------------------

    def mmap(self, size: int, prot: int) -> tuple[int, int]:
        """mmap(NULL, size, prot, MAP_PRIVATE | MAP_ANONYMOUS): (errno, address)."""
        if size <= 0:
            return EINVAL, 0
        length = -(-size // self.page_size) * self.page_size
        start = (self.next_top - length) // MMAP_ALIGN * MMAP_ALIGN
        if start < MMAP_ALIGN:
            return ENOMEM, 0
        self.next_top = start - MMAP_ALIGN
        self.vmas[start] = Vma(start, start + length, prot)
        return 0, start

    def munmap(self, start: int, length: int) -> int:
        """munmap: EINVAL for an unaligned start or a zero length; unmapping a hole is not an
        error (a second munmap of the same range returns 0)."""
        if not self._aligned(start, length):
            return EINVAL
        end = start + -(-length // self.page_size) * self.page_size
        if self._vmas_in(start, end):
            run_to_completion(self._zap(start, end))
        self._carve(start, end)
        return 0

    def mprotect(self, start: int, length: int, prot: int) -> int:
        """mprotect: EINVAL unaligned, ENOMEM if part of the range is not mapped. Taking write
        permission away invalidates first, so no secondary MMU keeps a writable mapping."""
        if not self._aligned(start, length):
            return EINVAL
        end = start + -(-length // self.page_size) * self.page_size
        if not self._covered(start, end):
            return ENOMEM
        touched = self._pages_in(start, end)
        losing_write = not prot & PROT_WRITE and any(self.ptes[h].writable for h in touched)
        if losing_write:
            self._invalidate_start(start, end)
            for hva in touched:
                self.ptes[hva].writable = False
            self._invalidate_end(start, end)
        self._carve(start, end, prot)
        return 0

    def madvise_dontneed(self, start: int, length: int) -> int:
        """madvise(MADV_DONTNEED): the pages are dropped; the next access reads zeroes."""
        return run_to_completion(self.madvise_dontneed_op(start, length))

    def madvise_dontneed_op(self, start: int, length: int) -> KernelOp[int]:
        """:meth:`madvise_dontneed` as a racy path: other CPUs may run between the notifier's
        start and the zap, and between the zap and the end (a memslot update must wait)."""
        if not self._aligned(start, length):
            return EINVAL
        end = start + -(-length // self.page_size) * self.page_size
        if not self._covered(start, end):
            return ENOMEM
        yield from self._zap(start, end)
        return 0

    def _zap(self, start: int, end: int) -> KernelOp[None]:
        """Unmap every page of [start, end) between the notifier's start and end: secondary
        MMUs drop their mappings before the pages can be freed."""
        self._invalidate_start(start, end)
        yield Preempt("host: invalidation started, zapping the host PTEs")
        for hva in self._pages_in(start, end):
            self._drop_pte(hva)
        yield Preempt("host: host PTEs zapped, ending the invalidation")
        self._invalidate_end(start, end)

    def _carve(self, start: int, end: int, prot: int | None = None) -> None:
        """Cut [start, end) out of the VMAs (prot None), or give it protection ``prot``,
        splitting VMAs at the edges."""
        for vma in self._vmas_in(start, end):
            del self.vmas[vma.start]
            if vma.start < start:
                self.vmas[vma.start] = Vma(vma.start, start, vma.prot)
            if end < vma.end:
                self.vmas[end] = Vma(end, vma.end, vma.prot)
            if prot is not None:
                inner_start, inner_end = max(vma.start, start), min(vma.end, end)
                self.vmas[inner_start] = Vma(inner_start, inner_end, prot)

    # -- the pages behind the addresses -------------------------------------------------------

    def fault_in(self, hva: int, write: bool) -> tuple[int, HostPte | None]:
        """Make the page at ``hva`` present, as a user access or get_user_pages would:
        EFAULT without a VMA or without the needed permission; a read of an untouched page
        maps the zero page read-only, a write gives the page its own frame."""
        vma = self.find_vma(hva)
        if vma is None or not vma.prot & PROT_READ or (write and not vma.prot & PROT_WRITE):
            return EFAULT, None
        page_hva = hva - hva % self.page_size
        pte = self.ptes.get(page_hva)
        if pte is None:
            pte = HostPte(ZERO_PFN, writable=False)
            if write:
                pte = HostPte(self._alloc_page().pfn, writable=True)
            self.ptes[page_hva] = pte
        elif write and pte.pfn == ZERO_PFN:
            # Breaking copy-on-write changes the page behind the address: secondary MMUs
            # that mapped the zero page must let go of it first (wp_page_copy).
            self._invalidate_start(page_hva, page_hva + self.page_size)
            pte = HostPte(self._alloc_page().pfn, writable=True)
            self.ptes[page_hva] = pte
            self._invalidate_end(page_hva, page_hva + self.page_size)
        if write:
            pte.dirty = True
        pte.young = True
        return 0, pte

    def _alloc_page(self) -> HostPage:
        page = HostPage(self.next_pfn)
        self.next_pfn += 1
        self.pages[page.pfn] = page
        return page

    def host_write(self, hva: int, data: bytes) -> int:
        """The VMM writes ``data`` at ``hva`` (within one page): 0 or EFAULT."""
        errno, pte = self.fault_in(hva, write=True)
        if errno or pte is None:
            return errno
        page = self.pages[pte.pfn]
        if page.data is None:
            page.data = bytearray(self.page_size)
        offset = hva % self.page_size
        page.data[offset : offset + len(data)] = data
        return 0

    def host_read(self, hva: int, size: int) -> tuple[int, bytes]:
        """The VMM reads ``size`` bytes at ``hva`` (within one page): (0 or EFAULT, bytes)."""
        errno, pte = self.fault_in(hva, write=False)
        if errno or pte is None:
            return errno, b""
        page = self.pages.get(pte.pfn)
        offset = hva % self.page_size
        if page is None or page.data is None:
            return 0, bytes(size)
        return 0, bytes(page.data[offset : offset + size])

    def migrate_page(self, hva: int) -> int:
        """Move the page at ``hva`` to a new frame (compaction, memory hot-remove). A page
        with a long-term pin cannot move (EBUSY): seed 004's reason not to pin the APIC-access
        page. Secondary MMUs are invalidated first and refault to the new frame."""
        page_hva = hva - hva % self.page_size
        pte = self.ptes.get(page_hva)
        if pte is None or pte.pfn == ZERO_PFN:
            return 0
        old = self.pages[pte.pfn]
        if old.pins or old.refcount > 1:
            return EBUSY
        self._invalidate_start(page_hva, page_hva + self.page_size)
        new = self._alloc_page()
        new.data = old.data
        new.dirty = old.dirty or pte.dirty
        pte.pfn = new.pfn
        del self.pages[old.pfn]
        self._invalidate_end(page_hva, page_hva + self.page_size)
        return 0

    def age(self, hva: int, flush: bool = True) -> bool:
        """Reclaim's aging of one page: was it used (by the VMM or, through the notifier, by
        a guest) since the last look? Clears both. Classic reclaim flushes secondary TLBs so
        the next access is seen; the multi-gen LRU walk does not (``flush`` False)."""
        page_hva = hva - hva % self.page_size
        pte = self.ptes.get(page_hva)
        young = pte is not None and pte.young
        if pte is not None:
            pte.young = False
        if self.notifier is not None:
            end = page_hva + self.page_size
            if flush:
                young |= self.notifier.clear_flush_young(page_hva, end)
            else:
                young |= self.notifier.clear_young(page_hva, end)
        return young


def get_page(page: HostPage) -> None:
    page.refcount += 1


def put_page(mm: HostMm, page: HostPage) -> None:
    """Drop a reference; the last one frees the page."""
    page.refcount -= 1
    if page.refcount == 0:
        del mm.pages[page.pfn]
