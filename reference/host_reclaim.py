"""Memory management behind the VMM's back: aging, reclaim to swap, and page migration.

None of these is a system call of the VMM: the kernel decides to look at a page (is it in
use?), to take it away (reclaim), or to move it (compaction, memory hot-remove). Each is
modelled as "the kernel picked the page at this address", and each tells the secondary MMUs
what the kernel tells them: aging asks whether the guest used the page, and taking a page
away or moving it invalidates its mappings first (CLEAR).

Long-term pins are what KVM's users care about most here: a pinned page never moves and is
never reclaimed (seed 004's reason not to pin the APIC-access page is that it then cannot
migrate).

kernel: mm/vmscan.c:shrink_folio_list, folio_check_references; mm/rmap.c:folio_referenced,
try_to_unmap_one, try_to_migrate_one; mm/migrate.c:migrate_pages;
mm/compaction.c:isolate_migratepages_block (v6.18)
"""

from __future__ import annotations

import enum
from errno import EBUSY, EFAULT
from typing import TYPE_CHECKING

from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.host_pages import (
    ZERO_PFN,
    Device,
    HostPage,
    HostPte,
    PhysicalMemory,
    SwapEntry,
    folio_of,
)

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm


class Reclaim(enum.Enum):
    """What reclaim did with the page it picked."""

    SWAPPED_OUT = "swapped_out"
    """Unmapped and freed; the contents wait in swap. The next access brings them back in a
    new page (a new pfn)."""
    SWAP_CACHED = "swap_cached"
    """Unmapped, contents in swap, but another reference (a fault in progress, a driver)
    keeps the frame in the swap cache: the next access maps that same frame again."""
    REFERENCED = "referenced"
    """Used since the last look (by the VMM, or by a guest as the notifier says): kept, and
    now aged (young bits cleared)."""
    PINNED = "pinned"
    """A long-term pin keeps the page: reclaim gives up before unmapping anything."""
    BUSY = "busy"
    """A huge page with references beyond its mappings: kept (it could not be split)."""
    SKIPPED = "skipped"
    """Not something the model reclaims: nothing mapped, the zero page, device memory (no
    struct page), or a memfd page (swapping shmem out is not modelled)."""


def age(mm: HostMm, hva: int, flush: bool = True) -> bool:
    """Aging of the mapping at ``hva`` (a huge page ages as a whole): was it used, by the VMM
    (its young bit) or by a guest (the notifier asks KVM), since the last look? Clears
    both. Classic reclaim flushes secondary TLBs so the next access is seen
    (clear_flush_young); the multi-gen LRU's walk does not (``flush`` False, clear_young).
    Nothing mapped: nothing to ask.

    kernel: mm/rmap.c:folio_referenced_one; mm/vmscan.c:lru_gen_look_around (v6.18)
    """
    haddr = hva - hva % mm.hpage_size
    entry: HostPte | None = mm.pmds.get(haddr)
    if entry is not None:
        start, end = haddr, haddr + mm.hpage_size
    else:
        start = hva - hva % mm.page_size
        end = start + mm.page_size
        entry = mm.ptes.get(start)
    if entry is None:
        return False
    young = entry.young
    entry.young = False
    if mm.notifier is not None:
        if flush:
            young |= mm.notifier.clear_flush_young(start, end)
        else:
            young |= mm.notifier.clear_young(start, end)
    return young


def reclaim(mm: HostMm, hva: int) -> Reclaim:
    """Reclaim (kswapd, or direct reclaim) picks the anonymous page at ``hva``.

    First it ages the page (clear_flush_young through the notifier): a used page is kept.
    A pinned page is kept too, before anything is unmapped (its contents may be under DMA).
    Then a small page is unmapped under a CLEAR invalidation of that page: its PTE becomes a
    swap entry holding the contents, and the page is freed, or stays in the swap cache while
    someone else holds a reference.

    A huge page mapped by its PMD goes to swap whole (THP swap-out): with references beyond
    its mapping it is kept untouched (it could not be split if need be); else one CLEAR
    invalidation of the block turns the PMD into HPAGE_NR swap entries. A huge page already
    split into PTEs is split itself first (a CLEAR invalidation of the block; its pages
    become ordinary pages with the same frames), then the page at ``hva`` is reclaimed; the
    kernel goes on with the other pages in the same pass, the model leaves them mapped
    until reclaim picks them.

    kernel: mm/vmscan.c:shrink_folio_list, folio_check_references; mm/rmap.c:
    try_to_unmap_one; mm/swap_state.c:add_to_swap; mm/huge_memory.c:__folio_split (v6.18)
    """
    vma = mm.find_vma(hva)
    if vma is None or vma.backing is not None:
        return Reclaim.SKIPPED
    haddr = hva - hva % mm.hpage_size
    if haddr in mm.pmds:
        return _reclaim_huge(mm, haddr)
    page_hva = hva - hva % mm.page_size
    pte: HostPte | None = mm.ptes.get(page_hva)
    if pte is None or pte.pfn == ZERO_PFN:
        return Reclaim.SKIPPED
    page = mm.memory.page(pte.pfn)
    assert page is not None, "an anonymous PTE maps a real page or the zero page"
    folio = folio_of(page)
    if folio.nr_pages > 1:
        young = False
        for mapped_hva, _ in mappings_of(mm, folio):
            young |= age(mm, mapped_hva)
        if young:
            return Reclaim.REFERENCED
        if folio.pins:
            return Reclaim.PINNED
        if PhysicalMemory.extra_references(folio):
            return Reclaim.BUSY
        _split_folio(mm, folio)
        page = mm.memory.pages[pte.pfn]
    if age(mm, page_hva):
        return Reclaim.REFERENCED
    if page.pins:
        return Reclaim.PINNED

    end = page_hva + mm.page_size
    mm.invalidate_start(page_hva, end, MmuNotifierEvent.CLEAR)
    # The mapping's reference passes to the swap cache (add_to_swap, then the unmap); is
    # anyone else still holding the page?
    page.dirty |= pte.dirty
    del mm.ptes[page_hva]
    page.mapcount -= 1
    if PhysicalMemory.extra_references(page) - 1:
        mm.swap[page_hva] = SwapEntry(None, cached=page)
        outcome = Reclaim.SWAP_CACHED
    else:
        mm.swap[page_hva] = SwapEntry(page.data)
        mm.memory.put(page)
        outcome = Reclaim.SWAPPED_OUT
    mm.invalidate_end(page_hva, end, MmuNotifierEvent.CLEAR)
    return outcome


def _reclaim_huge(mm: HostMm, haddr: int) -> Reclaim:
    folio: HostPage = mm.memory.pages[mm.pmds[haddr].pfn]
    if age(mm, haddr):
        return Reclaim.REFERENCED
    if folio.pins:
        return Reclaim.PINNED
    if PhysicalMemory.extra_references(folio):
        return Reclaim.BUSY
    end = haddr + mm.hpage_size
    mm.invalidate_start(haddr, end, MmuNotifierEvent.CLEAR)
    contents = {page.pfn - folio.pfn: page.data for page in mm.memory.subpages(folio)}
    for index in range(mm.hpage_nr):
        mm.swap[haddr + index * mm.page_size] = SwapEntry(contents.get(index))
    mm.unmap_pmd(haddr)
    mm.invalidate_end(haddr, end, MmuNotifierEvent.CLEAR)
    return Reclaim.SWAPPED_OUT


def _split_folio(mm: HostMm, folio: HostPage) -> None:
    """Split a huge page that PTEs map into ordinary pages with the same frames, under one
    CLEAR invalidation of its block (the kernel unmaps it to migration entries and maps it
    back). Each page keeps the references of its own mappings; unmapped pages are freed.
    The caller checked that nothing else references the folio.

    kernel: mm/huge_memory.c:__folio_split, unmap_folio, remap_page (v6.18)
    """
    first_pfn, first_index, nr_pages = folio.pfn, folio.index, folio.nr_pages
    start = first_index * mm.page_size
    end = start + nr_pages * mm.page_size
    mm.invalidate_start(start, end, MmuNotifierEvent.CLEAR)
    mapped = {pte.pfn for _, pte in mappings_of(mm, folio)}
    pages = [mm.memory.page(pfn) for pfn in range(first_pfn, first_pfn + nr_pages)]
    for pfn, page in enumerate(pages, first_pfn):
        assert page is not None
        if pfn in mapped:
            page.head, page.nr_pages = None, 1
            page.refcount = page.mapcount = 1
            page.index = first_index + pfn - first_pfn
        else:
            del mm.memory.pages[pfn]
    mm.invalidate_end(start, end, MmuNotifierEvent.CLEAR)


def migrate_page(mm: HostMm, hva: int) -> int:
    """Move the page at ``hva`` (with its whole folio: a huge page moves whole) to a new
    frame, as compaction or memory hot-remove do: 0, EBUSY or EFAULT.

    A folio with references beyond its mappings and the page cache (a long-term pin, a
    fault in progress) is left alone (EBUSY), as compaction skips it before trying. Device
    memory has no struct page and cannot move (EFAULT, what move_pages reports for such a
    VMA). Nothing mapped, or the zero page: nothing to do (0).

    Otherwise every mapping of the folio is invalidated (CLEAR; one per mapping: a memfd
    page may be mapped at several addresses), the contents are copied to the new frames,
    and every mapping and the page cache are pointed at them. Secondary MMUs refault to the
    new frame.

    kernel: mm/migrate.c:migrate_pages, migrate_folio_unmap, move_to_new_folio,
    add_page_for_migration; mm/rmap.c:try_to_migrate_one; mm/compaction.c:
    isolate_migratepages_block (v6.18)
    """
    vma = mm.find_vma(hva)
    if vma is not None and isinstance(vma.backing, Device):
        return EFAULT
    pte = mm.lookup(hva)
    if pte is None or pte.pfn == ZERO_PFN:
        return 0
    page = mm.memory.page(pte.pfn)
    assert page is not None, "only device memory and the zero page have no struct page"
    old = folio_of(page)
    if PhysicalMemory.extra_references(old):
        return EBUSY

    mappings = mappings_of(mm, old)
    if old.nr_pages > 1:
        extents = [(old.index * mm.page_size, (old.index + old.nr_pages) * mm.page_size)]
    else:
        extents = [(mapped, mapped + mm.page_size) for mapped, _ in mappings]
    for start, end in extents:
        mm.invalidate_start(start, end, MmuNotifierEvent.CLEAR)
        mm.invalidate_end(start, end, MmuNotifierEvent.CLEAR)

    new = mm.memory.alloc(old.nr_pages)
    new.refcount, new.mapcount, new.file, new.index = (
        old.refcount,
        old.mapcount,
        old.file,
        old.index,
    )
    for source in mm.memory.subpages(old):
        target = mm.memory.page(new.pfn + source.pfn - old.pfn)
        assert target is not None
        target.data, target.dirty = source.data, source.dirty
        del mm.memory.pages[source.pfn]
    moved_by = new.pfn - old.pfn
    for _, entry in mappings:
        entry.pfn += moved_by
    if old.file is not None:
        old.file.pages[old.index] = new.pfn
    return 0


def mappings_of(mm: HostMm, folio: HostPage) -> list[tuple[int, HostPte]]:
    """The reverse map: every (hva, PTE or PMD) that maps a page of ``folio``, by address. A
    memfd page is found through the file's mappings; an anonymous folio where it was
    created (the model has no mremap and no fork, so that is where it stays).

    kernel: mm/rmap.c:rmap_walk_anon, rmap_walk_file (v6.18)
    """
    last = folio.pfn + folio.nr_pages
    if folio.file is not None:
        candidates = []
        for vma in mm.vmas.values():
            hva = vma.start + (folio.index - vma.pgoff) * mm.page_size
            if vma.backing is folio.file and vma.start <= hva < vma.end:
                candidates.append(hva)
    else:
        base = folio.index * mm.page_size
        pmd: HostPte | None = mm.pmds.get(base)
        if pmd is not None and pmd.pfn == folio.pfn:
            return [(base, pmd)]
        candidates = mm.keys_in(mm.ptes, base, base + folio.nr_pages * mm.page_size)
    found = []
    for hva in candidates:
        pte: HostPte | None = mm.ptes.get(hva)
        if pte is not None and folio.pfn <= pte.pfn < last:
            found.append((hva, pte))
    return found
