"""Transparent huge pages: collapsing small pages into a huge one, and splitting it again.

A huge page (HPAGE_NR pages, 2 MiB with 4 KiB pages) is one folio mapped by one PMD, so the
host maps the whole block at once, and KVM may map it with one large translation
(:meth:`HostMm.mapping_level` tells it). The model creates huge pages only by collapse:

* **khugepaged** visits blocks of VM_HUGEPAGE VMAs and collapses one when enough of it is in
  use: it asks each mapped page's young bit and, when that is clear, the secondary MMUs
  (test_young), so a page only the guest uses counts as used.
* **MADV_COLLAPSE** collapses the blocks of a range now, without the "is it used" checks.

Collapsing copies the pages into a new huge page: their frames change, so the block is
invalidated (CLEAR) first. Splitting the PMD back into PTEs keeps every frame, yet the
kernel still invalidates the block (CLEAR): the mapping size KVM may rely on shrinks. After
a split the folio stays huge, mapped page by page, until it is freed or split itself.

Huge pages are kept sparse: a PMD and the head page's record; a tail page gets a record
when touched. Splitting writes HPAGE_NR PTEs, as the kernel's split does.

The model's settings: transparent_hugepage/enabled is "madvise", khugepaged's
max_ptes_none is HPAGE_NR - 1 and max_ptes_swap HPAGE_NR / 8 (the defaults), and shmem's
huge pages are "deny" (memfd mappings never collapse). Faults map small pages only.

kernel: mm/khugepaged.c:hpage_collapse_scan_pmd, collapse_huge_page,
__collapse_huge_page_isolate, madvise_collapse, madvise_collapse_errno;
mm/huge_memory.c:__split_huge_pmd, split_huge_pmd_locked (v6.18)
"""

from __future__ import annotations

import enum
from errno import EAGAIN, EINVAL, ENOMEM
from typing import TYPE_CHECKING

from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.host_pages import ZERO_PFN, HostPte, PhysicalMemory, folio_of

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm, Vma


class Scan(enum.Enum):
    """Why a block did or did not collapse (the kernel's scan results the model can reach)."""

    SUCCEED = "succeed"
    PMD_MAPPED = "pmd_mapped"
    """Already a huge page."""
    ADDRESS_RANGE = "address_range"
    """The block does not fit inside the VMA."""
    PMD_NULL = "pmd_null"
    """Nothing was ever mapped in the block (no page table)."""
    EXCEED_NONE_PTE = "exceed_none_pte"
    EXCEED_SWAP_PTE = "exceed_swap_pte"
    PAGE_RO = "page_ro"
    """No page of the block is mapped writable."""
    PAGE_COUNT = "page_count"
    """A page has references beyond its mapping (a pin, a fault in progress)."""
    LACK_REFERENCED_PAGE = "lack_referenced_page"


def madvise_collapse_errno(result: Scan) -> int:
    """What MADV_COLLAPSE answers for a block that did not collapse: EAGAIN when trying again
    may work (references are transient), EINVAL when the range itself is the problem (every
    other result MADV_COLLAPSE can meet in the model).

    kernel: mm/khugepaged.c:madvise_collapse_errno (v6.18)
    """
    return EAGAIN if result is Scan.PAGE_COUNT else EINVAL


def thp_capable(vma: Vma, khugepaged: bool) -> bool:
    """May ``vma`` hold huge pages? Anonymous memory only (see the module's settings);
    khugepaged also needs VM_HUGEPAGE.

    kernel: mm/huge_memory.c:__thp_vma_allowable_orders (v6.18)
    """
    return vma.backing is None and (vma.hugepage or not khugepaged)


def madvise_collapse(mm: HostMm, start: int, length: int) -> int:
    """madvise(MADV_COLLAPSE): collapse every huge-page block that lies wholly inside the
    range, VMA by VMA. 0 when every block is (or already was) huge; otherwise the errno of
    the last block that failed (EAGAIN or EINVAL); EINVAL for a VMA that cannot hold huge
    pages; ENOMEM for holes, after the mapped parts are done.

    kernel: mm/khugepaged.c:madvise_collapse; mm/madvise.c:madvise_walk_vmas (v6.18)
    """
    errno, end = mm.madvise_range(start, length)
    if errno or end == start:
        return errno
    parts, holes = mm.madvise_walk(start, end)
    for part_start, part_end, vma in parts:
        if not thp_capable(vma, khugepaged=False):
            return EINVAL
        first = -(-part_start // mm.hpage_size) * mm.hpage_size
        last = part_end - part_end % mm.hpage_size
        failed = None
        for haddr in range(first, last, mm.hpage_size):
            result = collapse(mm, vma, haddr, khugepaged=False)
            if result not in (Scan.SUCCEED, Scan.PMD_MAPPED):
                failed = result
        if failed is not None:
            return madvise_collapse_errno(failed)
    return ENOMEM if holes else 0


def khugepaged_scan(mm: HostMm, hva: int) -> bool:
    """khugepaged's visit to the huge-page block containing ``hva``: True if it collapsed.

    kernel: mm/khugepaged.c:khugepaged_scan_mm_slot, hpage_collapse_scan_pmd (v6.18)
    """
    vma = mm.find_vma(hva)
    if vma is None or not thp_capable(vma, khugepaged=True):
        return False
    return collapse(mm, vma, hva - hva % mm.hpage_size, khugepaged=True) is Scan.SUCCEED


def collapse(mm: HostMm, vma: Vma, haddr: int, khugepaged: bool) -> Scan:
    """Scan the block at ``haddr`` and, if it qualifies, collapse it into a new huge page.

    The scan walks the block's entries in address order. It stops at a page with extra
    references (PAGE_COUNT) and, for khugepaged, at too many swapped-out pages. A block with
    no writable page is refused (PAGE_RO). khugepaged also wants a used page: young in the
    host PTE, or (asked only when that is clear) young for a secondary MMU; with swapped-out
    pages, half the block must be used.

    The collapse swaps the missing pages in, invalidates the block (CLEAR) and clears its
    page table; then it checks the pages again, khugepaged asking test_young once more
    (secondary MMUs hold no mapping now, so only host young bits count) and giving up,
    with nothing changed, if no page is used any more. Otherwise the contents are copied
    into a new huge page that one PMD maps, and the small pages are released.

    kernel: mm/khugepaged.c:hpage_collapse_scan_pmd, collapse_huge_page,
    __collapse_huge_page_swapin, __collapse_huge_page_isolate, __collapse_huge_page_copy
    (v6.18)
    """
    end = haddr + mm.hpage_size
    if haddr in mm.pmds:
        return Scan.PMD_MAPPED
    if haddr < vma.start or end > vma.end:
        return Scan.ADDRESS_RANGE
    present = mm.keys_in(mm.ptes, haddr, end)
    swapped = mm.keys_in(mm.swap, haddr, end)
    if not present and not swapped:
        return Scan.PMD_NULL
    none_or_zero = mm.hpage_nr - len(present) - len(swapped)
    unmapped = writable = referenced = 0
    for hva in sorted(present + swapped):
        if hva in mm.swap:
            unmapped += 1
            if khugepaged and unmapped > mm.hpage_nr // 8:
                return Scan.EXCEED_SWAP_PTE
            continue
        pte: HostPte = mm.ptes[hva]
        if pte.pfn == ZERO_PFN:
            none_or_zero += 1
            continue
        writable |= pte.writable
        page = mm.memory.page(pte.pfn)
        assert page is not None, "an anonymous PTE maps a real page or the zero page"
        if PhysicalMemory.extra_references(folio_of(page)):
            return Scan.PAGE_COUNT
        if khugepaged and _referenced(mm, hva, pte):
            referenced += 1
    if khugepaged and none_or_zero > mm.hpage_nr - 1:
        return Scan.EXCEED_NONE_PTE
    if not writable:
        return Scan.PAGE_RO
    if khugepaged and (not referenced or (unmapped and referenced < mm.hpage_nr // 2)):
        return Scan.LACK_REFERENCED_PAGE

    for hva in swapped:
        mm.swap_in(vma, hva, write=False)
    mm.invalidate_start(haddr, end, MmuNotifierEvent.CLEAR)
    mm.invalidate_end(haddr, end, MmuNotifierEvent.CLEAR)
    sources = [(hva, mm.ptes[hva]) for hva in mm.keys_in(mm.ptes, haddr, end)]
    if khugepaged:
        used = [_referenced(mm, hva, pte) for hva, pte in sources if pte.pfn != ZERO_PFN]
        if not any(used):
            return Scan.LACK_REFERENCED_PAGE

    huge = mm.memory.alloc(mm.hpage_nr)
    huge.index = haddr // mm.page_size
    for hva, pte in sources:
        page = mm.memory.page(pte.pfn)
        if page is not None and page.data is not None:
            target = mm.memory.page(huge.pfn + (hva - haddr) // mm.page_size)
            assert target is not None
            target.data = bytearray(page.data)
        mm.unmap_pte(hva)
    huge.mapcount = huge.refcount = 1
    mm.pmds[haddr] = HostPte(huge.pfn, mm.writable(vma, huge.pfn), dirty=True)
    return Scan.SUCCEED


def _referenced(mm: HostMm, hva: int, pte: HostPte) -> bool:
    """khugepaged's "was this page used": the host's young bit, else the secondary MMUs'."""
    return pte.young or (mm.notifier is not None and mm.notifier.test_young(hva))


def split_huge_pmd(mm: HostMm, haddr: int) -> bool:
    """Replace the PMD at ``haddr`` (if there is one) by HPAGE_NR PTEs mapping the same
    pages, with its permissions, young and dirty bits, under a CLEAR invalidation of the
    block. The folio stays one huge page; each PTE holds a reference to it. Returns whether
    there was a PMD to split.

    kernel: mm/huge_memory.c:__split_huge_pmd, __split_huge_pmd_locked (v6.18)
    """
    pmd: HostPte | None = mm.pmds.get(haddr)
    if pmd is None:
        return False
    end = haddr + mm.hpage_size
    mm.invalidate_start(haddr, end, MmuNotifierEvent.CLEAR)
    del mm.pmds[haddr]
    for index in range(mm.hpage_nr):
        mm.ptes[haddr + index * mm.page_size] = HostPte(
            pmd.pfn + index, pmd.writable, pmd.young, pmd.dirty
        )
    folio = mm.memory.pages[pmd.pfn]
    folio.mapcount += mm.hpage_nr - 1
    folio.refcount += mm.hpage_nr - 1
    mm.invalidate_end(haddr, end, MmuNotifierEvent.CLEAR)
    return True
