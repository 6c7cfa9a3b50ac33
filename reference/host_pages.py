"""The host's physical memory: pages and huge pages, memfd files, device memory, swap.

What a host PTE can point at:

* **RAM**, in pages (struct page). Pages are allocated in folios of one page or of one huge
  page (HPAGE_NR pages, aligned like the buddy allocator aligns them). A folio's references,
  mappings and long-term pins are counted once, on its head page; each page keeps its own
  contents and dirty bit. Only touched pages have a record: the tail pages of a huge page
  appear when something reads, writes or maps them.
* **The shared zero page** (ZERO_PFN): what an untouched anonymous page reads as. It is never
  refcounted, never written, and has no record here.
* **Device memory** (a PCI BAR, a VFIO region): pfns a driver maps with remap_pfn_range into
  a VM_PFNMAP VMA. They have no struct page: nothing to refcount, pin, migrate or reclaim.
* **Swap**: an anonymous page that reclaim took away leaves a swap entry in the page table,
  holding its contents until the next access brings them back, in a new page (or in the
  same one, if the swap cache still holds it).

Contents are sparse everywhere: ``data`` None (or no record at all) means all zeroes.

kernel: include/linux/mm_types.h:struct page, struct folio; mm/page_alloc.c; mm/shmem.c;
mm/memory.c:remap_pfn_range; mm/swap_state.c (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from kvmspec.reference.ordered import floor_item

ZERO_PFN = 0
"""The shared zero page: what an untouched anonymous page reads as."""

DEVICE_PFN_BASE = 1 << 32
"""Device pfns start here: far above any RAM pfn the model hands out, and low enough that the
physical address stays below 2^48, so that an arm64 stage-2 descriptor (output address bits
47:12) can point at device memory."""


@dataclass(eq=False)
class MemFile:
    """A memfd (a shmem file of ``size`` bytes): its pages belong to the file, by page index,
    whichever mappings map them. Unmapping or MADV_DONTNEED only drops a mapping; the page
    cache keeps the page (and one reference to it)."""

    name: str
    size: int
    pages: dict[int, int] = field(default_factory=dict)
    """The page cache: page index -> pfn."""


@dataclass(eq=False)
class Device:
    """Device memory of ``npages`` pages at ``first_pfn``, mappable with mmap (VM_PFNMAP).
    It reads back what was written to it (zero elsewhere), like a BAR of on-device RAM."""

    name: str
    first_pfn: int
    npages: int
    data: dict[int, bytearray] = field(default_factory=dict)
    """pfn -> contents of the pages written so far."""


@dataclass(slots=True, eq=False)
class HostPage:
    """One physical page (struct page). ``refcount``, ``mapcount`` and ``pins`` are the
    folio's and live on its head; a tail page points at its head and counts nothing.

    ``refcount`` holds the references: one per mapping (also counted in ``mapcount``), one
    for the page cache or the swap cache, and transient ones (get_page). ``pins`` counts
    long-term pins apart (the kernel adds them to the refcount with a large bias, to tell
    them apart). The folio is freed when both drop to zero.
    """

    pfn: int
    refcount: int = 1
    pins: int = 0
    data: bytearray | None = None
    dirty: bool = False
    mapcount: int = 0
    nr_pages: int = 1
    """Head pages: the folio's size in pages (1, or HPAGE_NR for a huge page)."""
    head: HostPage | None = field(default=None, repr=False)
    """Tail pages: the head page of their folio."""
    file: MemFile | None = None
    """The memfd whose page cache holds this folio, if any."""
    index: int = 0
    """Where the folio sits: its page index in ``file``, or for anonymous memory the virtual
    page number (hva / page size) it was created at (the kernel's folio->index)."""


def folio_of(page: HostPage) -> HostPage:
    """The head page, which carries the folio's counts."""
    return page.head if page.head is not None else page


@dataclass(slots=True)
class HostPte:
    """A host page-table entry that maps something (or, for a PMD, the head of a huge page)."""

    pfn: int
    writable: bool
    young: bool = True
    dirty: bool = False


@dataclass(slots=True)
class SwapEntry:
    """What a host PTE holds after reclaim: the page's contents in swap. ``cached`` is the
    page itself while the swap cache still holds it (someone else had a reference when it
    was unmapped): the next access maps that same page again."""

    data: bytearray | None
    cached: HostPage | None = None


class PhysicalMemory:
    """RAM pages by pfn (only touched ones), and the devices' pfn ranges."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: SortedDict = SortedDict()  # pfn -> HostPage
        self.devices: list[Device] = []
        self.next_pfn = 1
        self.next_device_pfn = DEVICE_PFN_BASE

    # -- allocation ---------------------------------------------------------------------------

    def alloc(self, nr_pages: int = 1) -> HostPage:
        """A new folio of ``nr_pages`` pages (naturally aligned) with no reference yet: the
        mapping or the cache that keeps it takes one. Only its head gets a record."""
        pfn = -(-self.next_pfn // nr_pages) * nr_pages
        self.next_pfn = pfn + nr_pages
        head = HostPage(pfn, refcount=0, nr_pages=nr_pages)
        self.pages[pfn] = head
        return head

    def add_device(self, name: str, size: int) -> Device:
        """A device with ``size`` bytes of mappable memory (its pfns are reserved here)."""
        npages = -(-size // self.page_size)
        device = Device(name, self.next_device_pfn, npages)
        self.next_device_pfn += npages
        self.devices.append(device)
        return device

    # -- lookups ------------------------------------------------------------------------------

    def page(self, pfn: int) -> HostPage | None:
        """The struct page of ``pfn``: None for the zero page, device memory and free pfns.
        A tail of a huge page gets its record the first time it is asked for."""
        page: HostPage | None = self.pages.get(pfn)
        if page is not None or pfn == ZERO_PFN:
            return page
        floor = floor_item(self.pages, pfn)
        if floor is None:
            return None
        head = folio_of(floor[1])
        if pfn >= head.pfn + head.nr_pages:
            return None
        tail = HostPage(pfn, refcount=0, head=head)
        self.pages[pfn] = tail
        return tail

    def subpages(self, head: HostPage) -> list[HostPage]:
        """The pages of a folio that have a record, head first."""
        keys = self.pages.irange(head.pfn, head.pfn + head.nr_pages - 1)
        return [self.pages[pfn] for pfn in keys]

    def device_of(self, pfn: int) -> Device | None:
        for device in self.devices:
            if device.first_pfn <= pfn < device.first_pfn + device.npages:
                return device
        return None

    # -- references ---------------------------------------------------------------------------

    def put(self, page: HostPage) -> None:
        """Drop one reference to ``page``'s folio; the last one frees every page of it."""
        folio = folio_of(page)
        folio.refcount -= 1
        self._free_if_unused(folio)

    def unpin(self, page: HostPage) -> None:
        """Drop one long-term pin of ``page``'s folio (which may free it)."""
        folio = folio_of(page)
        assert folio.pins > 0, f"pfn {page.pfn} is not pinned"
        folio.pins -= 1
        self._free_if_unused(folio)

    def _free_if_unused(self, folio: HostPage) -> None:
        if folio.refcount == 0 and folio.pins == 0:
            for freed in self.subpages(folio):
                del self.pages[freed.pfn]

    @staticmethod
    def extra_references(folio: HostPage) -> int:
        """References beyond the folio's mappings and the page cache: pins and transient
        references, which keep the folio where it is (it cannot move, collapse or split)."""
        return folio.refcount - folio.mapcount - (folio.file is not None) + folio.pins

    # -- contents -----------------------------------------------------------------------------

    def read(self, pfn: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in the page (RAM or device) at ``pfn``."""
        data = self._contents(pfn)
        return bytes(size) if data is None else bytes(data[offset : offset + size])

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` in the page at ``pfn`` (never the zero page)."""
        contents = self._contents(pfn, create=True)
        assert contents is not None, f"write to pfn {pfn}, which has no memory behind it"
        contents[offset : offset + len(data)] = data

    def _contents(self, pfn: int, create: bool = False) -> bytearray | None:
        device = self.device_of(pfn) if pfn >= DEVICE_PFN_BASE else None
        if device is not None:
            if create:
                return device.data.setdefault(pfn, bytearray(self.page_size))
            return device.data.get(pfn)
        page = self.page(pfn)
        if page is None:
            return None
        if page.data is None and create:
            page.data = bytearray(self.page_size)
        return page.data
