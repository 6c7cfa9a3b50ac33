"""The host side: VMAs of every kind, host PTEs and pages, the system calls' errnos, swap,
huge pages, and the MMU-notifier events a secondary MMU sees for each change, in order."""

from __future__ import annotations

from errno import EAGAIN, EBUSY, EFAULT, EINVAL, ENOMEM

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import (
    LEVEL_NONE,
    LEVEL_PMD,
    LEVEL_PTE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    ZERO_PFN,
    HostMm,
    MemFile,
    get_page,
    put_page,
)
from kvmspec.reference.host_notifier import MmuNotifierEvent
from kvmspec.reference.host_reclaim import Reclaim
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, guest_access
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
UNMAP, CLEAR, PROTECT = (
    MmuNotifierEvent.UNMAP,
    MmuNotifierEvent.CLEAR,
    MmuNotifierEvent.PROTECTION_VMA,
)

Event = tuple[object, ...]


class Recorder:
    """A notifier that records what the host told it, in order. It answers aging questions
    with ``young`` (the addresses a secondary MMU would say it used)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.young: set[int] = set()

    def invalidate_range_start(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        self.events.append(("start", start, end, event))

    def invalidate_range_end(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        self.events.append(("end", start, end, event))

    def clear_flush_young(self, start: int, end: int) -> bool:
        self.events.append(("clear_flush_young", start, end))
        return any(start <= address < end for address in self.young)

    def clear_young(self, start: int, end: int) -> bool:
        self.events.append(("clear_young", start, end))
        return any(start <= address < end for address in self.young)

    def test_young(self, address: int) -> bool:
        self.events.append(("test_young", address))
        return address in self.young

    def release(self) -> None:
        self.events.append(("release",))

    def take(self) -> list[Event]:
        """The events so far, forgetting them."""
        events, self.events = self.events, []
        return events


def invalidation(start: int, end: int, event: MmuNotifierEvent) -> list[Event]:
    return [("start", start, end, event), ("end", start, end, event)]


def host() -> tuple[HostMm, Recorder]:
    mm = HostMm(PAGE, (1 << 47) - PAGE)
    recorder = Recorder()
    mm.notifier = recorder
    return mm, recorder


# -- system calls ---------------------------------------------------------------------------


def test_system_call_errnos() -> None:
    mm, recorder = host()
    assert mm.mmap(0, RW) == (EINVAL, 0)
    assert mm.mmap(PAGE, RW, MemFile("f", PAGE), offset=1) == (EINVAL, 0)
    errno, base = mm.mmap(16 * PAGE, RW)
    assert errno == 0 and base % (2 << 20) == 0
    assert mm.munmap(base + 1, PAGE) == EINVAL
    assert mm.munmap(base, 0) == EINVAL
    assert mm.munmap(base, 1 << 47) == EINVAL  # beyond the address space
    assert mm.mprotect(base + 1, PAGE, PROT_READ) == EINVAL
    assert mm.mprotect(base, PAGE, 0x100) == EINVAL  # unknown protection bits
    assert mm.mprotect(base, 0, PROT_READ) == 0  # a zero length is a no-op, not an error
    assert mm.mprotect(base - PAGE, 2 * PAGE, PROT_READ) == ENOMEM  # starts in a hole
    assert mm.madvise_dontneed(base + 1, PAGE) == EINVAL
    assert mm.madvise_dontneed(base + PAGE, 0) == 0
    assert mm.madvise_hugepage(base + PAGE, 0) == 0
    assert mm.madvise_dontneed(base + 16 * PAGE, PAGE) == ENOMEM
    assert recorder.take() == []
    assert mm.munmap(base, 16 * PAGE) == 0
    assert recorder.take() == invalidation(base, base + 16 * PAGE, UNMAP)
    assert mm.munmap(base, 16 * PAGE) == 0  # unmapping a hole is not an error...
    assert recorder.take() == []  # ...and tells nobody anything
    assert mm.mprotect(base, 16 * PAGE, PROT_READ) == ENOMEM
    assert mm.host_write(base, b"x") == EFAULT
    assert mm.host_read(base, 1) == (EFAULT, b"")


def test_contents_zero_pages_and_protections() -> None:
    mm, recorder = host()
    _, base = mm.mmap(4 * PAGE, RW)
    assert mm.mapping_level(base) == LEVEL_NONE
    assert mm.host_read(base + 8, 4) == (0, bytes(4))
    assert mm.ptes[base].pfn == ZERO_PFN and not mm.ptes[base].writable
    assert mm.host_write(base + 8, b"abcd") == 0
    assert mm.host_read(base + 8, 4) == (0, b"abcd")
    assert mm.ptes[base].pfn != ZERO_PFN and mm.ptes[base].dirty
    assert mm.mapping_level(base) == LEVEL_PTE
    # The write replaced the zero page: secondary MMUs were told before and after.
    assert recorder.take() == invalidation(base, base + PAGE, CLEAR)

    assert mm.mprotect(base, 4 * PAGE, PROT_READ) == 0
    assert recorder.take() == invalidation(base, base + 4 * PAGE, PROTECT)
    assert not mm.ptes[base].writable
    assert mm.host_write(base, b"y") == EFAULT
    assert mm.host_read(base + 8, 4) == (0, b"abcd")
    assert mm.mprotect(base, 4 * PAGE, PROT_READ) == 0  # no change: no split, no event
    assert recorder.take() == []
    assert mm.mprotect(base + PAGE, PAGE, RW) == 0  # splits the VMA; nothing mapped there
    assert recorder.take() == []
    assert mm.host_write(base + PAGE, b"z") == 0 and mm.host_write(base, b"z") == EFAULT
    assert mm.mprotect(base, PAGE, RW) == 0  # giving write back makes the PTE writable
    assert recorder.take() == invalidation(base, base + PAGE, PROTECT)
    assert mm.ptes[base].writable

    assert mm.madvise_dontneed(base, PAGE) == 0
    assert recorder.take() == invalidation(base, base + PAGE, CLEAR)
    assert mm.host_read(base + 8, 4) == (0, bytes(4))  # dropped: reads zero again


def test_mprotect_changes_the_vmas_before_a_hole_then_answers_enomem() -> None:
    mm, recorder = host()
    _, base = mm.mmap(4 * PAGE, RW)
    for page in range(4):
        mm.host_write(base + page * PAGE, b"d")
    assert mm.munmap(base + 2 * PAGE, PAGE) == 0
    recorder.take()
    assert mm.mprotect(base, 4 * PAGE, PROT_NONE) == ENOMEM
    assert recorder.take() == invalidation(base, base + 2 * PAGE, PROTECT)
    assert mm.host_read(base, 1) == (EFAULT, b"")  # changed before the hole
    assert mm.host_read(base + 3 * PAGE, 1) == (0, b"d")  # not reached


def test_madvise_dontneed_zaps_vma_by_vma_and_reports_holes_after() -> None:
    mm, recorder = host()
    _, base = mm.mmap(4 * PAGE, RW)
    for page in range(4):
        mm.host_write(base + page * PAGE, b"d")
    mm.munmap(base + PAGE, PAGE)
    mm.mprotect(base + 2 * PAGE, PAGE, PROT_READ)  # two VMAs after the hole
    recorder.take()
    assert mm.madvise_dontneed(base, 4 * PAGE) == ENOMEM
    assert recorder.take() == [
        *invalidation(base, base + PAGE, CLEAR),
        *invalidation(base + 2 * PAGE, base + 3 * PAGE, CLEAR),
        *invalidation(base + 3 * PAGE, base + 4 * PAGE, CLEAR),
    ]
    assert not mm.ptes and not mm.pages  # every page went, holes or not


# -- the kinds of mappings ------------------------------------------------------------------


def test_a_shared_memfd_is_one_set_of_pages_behind_every_mapping() -> None:
    mm, recorder = host()
    memfd = MemFile("guest-ram", 4 * PAGE)
    _, first = mm.mmap(4 * PAGE, RW, memfd)
    _, second = mm.mmap(2 * PAGE, RW, memfd, offset=2 * PAGE)
    assert mm.host_write(first + 2 * PAGE + 8, b"seen") == 0
    assert mm.host_read(second + 8, 4) == (0, b"seen")  # the same file page
    assert mm.ptes[first + 2 * PAGE].pfn == mm.ptes[second].pfn == memfd.pages[2]
    assert mm.host_read(first, 4) == (0, bytes(4))  # a file page, never the zero page
    assert mm.ptes[first].pfn == memfd.pages[0] != ZERO_PFN
    assert recorder.take() == []  # filling holes of a file takes no page from anybody

    page = mm.pages[memfd.pages[2]]
    assert (page.refcount, page.mapcount) == (3, 2)  # the page cache and two mappings
    assert mm.madvise_dontneed(second, 2 * PAGE) == 0
    assert recorder.take() == invalidation(second, second + 2 * PAGE, CLEAR)
    assert (page.refcount, page.mapcount) == (2, 1)
    assert mm.host_read(second + 8, 4) == (0, b"seen")  # the file kept its data
    assert mm.ptes[second].pfn == page.pfn
    assert mm.munmap(first, 4 * PAGE) == 0 and mm.munmap(second, 2 * PAGE) == 0
    assert memfd.pages[2] in mm.pages  # unmapped everywhere, still the file's

    _, third = mm.mmap(8 * PAGE, RW, memfd)  # longer than the file
    assert mm.host_read(third + 2 * PAGE + 8, 4) == (0, b"seen")
    assert mm.host_read(third + 4 * PAGE, 1) == (EFAULT, b"")  # SIGBUS beyond the end


def test_device_memory_has_pfns_but_no_struct_page() -> None:
    mm, recorder = host()
    device = mm.memory.add_device("bar0", 4 * PAGE)
    assert mm.mmap(4 * PAGE, RW, device, offset=PAGE) == (EINVAL, 0)  # beyond its memory
    _, base = mm.mmap(2 * PAGE, RW, device, offset=2 * PAGE)
    assert mm.host_write(base + PAGE + 4, b"mmio") == 0
    assert mm.host_read(base + PAGE + 4, 4) == (0, b"mmio")
    pfn = mm.ptes[base + PAGE].pfn
    assert pfn == device.first_pfn + 3 and mm.ptes[base + PAGE].writable
    assert mm.memory.page(pfn) is None and pfn not in mm.pages  # nothing to refcount
    assert mm.memory.read(pfn, 4, 4) == b"mmio"
    assert mm.migrate_page(base) == EFAULT
    assert mm.pin_user_page(base) == (EFAULT, 0)
    assert mm.madvise_dontneed(base, PAGE) == EINVAL
    assert mm.reclaim(base + PAGE) is Reclaim.SKIPPED
    assert mm.madvise_collapse(base, 2 * PAGE) == EINVAL
    assert recorder.take() == []
    assert mm.munmap(base, 2 * PAGE) == 0
    assert recorder.take() == invalidation(base, base + 2 * PAGE, UNMAP)
    _, again = mm.mmap(PAGE, PROT_READ, device, offset=3 * PAGE)
    assert mm.host_read(again + 4, 4) == (0, b"mmio")  # the device kept it


# -- migration ------------------------------------------------------------------------------


def test_migration_moves_unpinned_pages_and_refuses_pinned_ones() -> None:
    """Seed 004: an unpinned page migrates (secondary MMUs are invalidated and refault to the
    new frame, contents kept); a pinned page cannot move."""
    mm, recorder = host()
    _, base = mm.mmap(2 * PAGE, RW)
    mm.host_write(base, b"data")
    recorder.take()
    old_pfn = mm.ptes[base].pfn
    assert mm.migrate_page(base) == 0
    assert mm.ptes[base].pfn != old_pfn and old_pfn not in mm.pages
    assert mm.host_read(base, 4) == (0, b"data")
    assert recorder.take() == invalidation(base, base + PAGE, CLEAR)
    assert mm.migrate_page(base + PAGE) == 0  # nothing there: nothing to do
    assert recorder.take() == []

    errno, pfn = mm.pin_user_page(base)  # a long-term pin (FOLL_LONGTERM)
    assert errno == 0 and pfn == mm.ptes[base].pfn
    assert mm.migrate_page(base) == EBUSY
    assert recorder.take() == []  # compaction skips it before unmapping anything
    mm.unpin_user_page(pfn)
    assert mm.migrate_page(base) == 0


def test_a_memfd_page_migrates_with_every_mapping_of_it() -> None:
    mm, recorder = host()
    memfd = MemFile("shared", 2 * PAGE)
    _, first = mm.mmap(2 * PAGE, RW, memfd)
    _, second = mm.mmap(2 * PAGE, RW, memfd)
    mm.host_write(first + PAGE, b"both")
    mm.host_read(second + PAGE, 4)
    old_pfn = memfd.pages[1]
    assert mm.migrate_page(second + PAGE) == 0
    assert recorder.take() == [
        *invalidation(second + PAGE, second + 2 * PAGE, CLEAR),
        *invalidation(first + PAGE, first + 2 * PAGE, CLEAR),
    ]
    new_pfn = memfd.pages[1]
    assert new_pfn != old_pfn and old_pfn not in mm.pages
    assert mm.ptes[first + PAGE].pfn == mm.ptes[second + PAGE].pfn == new_pfn
    assert mm.host_read(first + PAGE, 4) == (0, b"both")


# -- aging and reclaim ----------------------------------------------------------------------


def test_reclaim_ages_first_then_swaps_out_and_swap_in_brings_the_data_back() -> None:
    mm, recorder = host()
    _, base = mm.mmap(2 * PAGE, RW)
    mm.host_write(base, b"swap me")
    recorder.take()
    old_pfn = mm.ptes[base].pfn
    assert mm.reclaim(base) is Reclaim.REFERENCED  # just written: young
    assert recorder.take() == [("clear_flush_young", base, base + PAGE)]
    assert mm.reclaim(base) is Reclaim.SWAPPED_OUT
    assert recorder.take() == [
        ("clear_flush_young", base, base + PAGE),
        *invalidation(base, base + PAGE, CLEAR),
    ]
    assert base not in mm.ptes and base in mm.swap and old_pfn not in mm.pages
    assert mm.mapping_level(base) == LEVEL_NONE

    assert mm.host_read(base, 7) == (0, b"swap me")  # swapped in: same data...
    new_pfn = mm.ptes[base].pfn
    assert new_pfn not in (old_pfn, ZERO_PFN)  # ...in a new frame
    assert mm.ptes[base].writable and base not in mm.swap
    assert recorder.take() == []  # bringing a page in takes nothing from anybody

    recorder.young.add(base)  # a guest used it, and only the guest
    mm.age(base)
    assert mm.reclaim(base) is Reclaim.REFERENCED
    assert mm.reclaim(base + PAGE) is Reclaim.SKIPPED  # nothing there
    mm.host_read(base + PAGE, 1)
    assert mm.reclaim(base + PAGE) is Reclaim.SKIPPED  # the zero page


def test_reclaim_never_takes_a_pinned_page() -> None:
    """Reclaim ages the page, sees the pin and gives up before unmapping anything."""
    mm, recorder = host()
    _, base = mm.mmap(PAGE, RW)
    _, pfn = mm.pin_user_page(base)
    mm.age(base)
    recorder.take()
    assert mm.reclaim(base) is Reclaim.PINNED
    assert recorder.take() == [("clear_flush_young", base, base + PAGE)]
    assert mm.ptes[base].pfn == pfn and pfn in mm.pages and base not in mm.swap
    mm.unpin_user_page(pfn)
    assert mm.reclaim(base) is Reclaim.SWAPPED_OUT


def test_a_page_someone_holds_stays_in_the_swap_cache() -> None:
    mm, _ = host()
    _, base = mm.mmap(PAGE, RW)
    mm.host_write(base, b"held")
    mm.age(base)
    page = mm.pages[mm.ptes[base].pfn]
    get_page(page)  # a fault in progress, say
    assert mm.reclaim(base) is Reclaim.SWAP_CACHED
    assert base not in mm.ptes and page.pfn in mm.pages
    put_page(mm, page)
    assert page.pfn in mm.pages  # the swap cache still holds it
    assert mm.host_read(base, 4) == (0, b"held")
    assert mm.ptes[base].pfn == page.pfn  # the same frame, back from the swap cache
    assert (page.refcount, page.mapcount) == (1, 1)


def test_aging_clears_young_and_asks_the_secondary_mmu_only_for_mapped_pages() -> None:
    mm, recorder = host()
    _, base = mm.mmap(2 * PAGE, RW)
    mm.host_write(base, b"x")
    recorder.take()
    assert mm.age(base, flush=False)
    assert not mm.age(base, flush=False)
    assert not mm.age(base + PAGE)  # nothing mapped: nobody is asked
    assert recorder.take() == [("clear_young", base, base + PAGE)] * 2


# -- huge pages -----------------------------------------------------------------------------


def huge_block(mm: HostMm, hugepage: bool = False) -> int:
    """A 2 MiB block of anonymous memory with three pages written."""
    _, base = mm.mmap(HUGE, RW, hugepage=hugepage)
    for page in (0, 7, 511):
        assert mm.host_write(base + page * PAGE, bytes([page % 256]) * 4) == 0
    return base


def test_madvise_collapse_copies_the_block_into_one_huge_page() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    small_pfns = {mm.ptes[base + page * PAGE].pfn for page in (0, 7, 511)}
    recorder.take()
    assert mm.madvise_collapse(base, HUGE) == 0
    assert recorder.take() == invalidation(base, base + HUGE, CLEAR)
    head = mm.pmds[base].pfn
    assert not mm.ptes and not small_pfns & set(mm.pages)
    for page in (0, 7, 100, 511):
        assert mm.mapping_level(base + page * PAGE) == LEVEL_PMD
        pte = mm.lookup(base + page * PAGE)
        assert pte is not None and pte.pfn == head + page and pte.writable
    assert mm.host_read(base + 7 * PAGE, 4) == (0, bytes([7]) * 4)
    assert mm.host_read(base + 100 * PAGE, 4) == (0, bytes(4))
    assert len(mm.pages) == 4  # the head (page 0) and pages 7, 100, 511: only what was touched
    assert mm.madvise_collapse(base, HUGE) == 0  # already huge
    assert recorder.take() == []


def test_madvise_collapse_errnos() -> None:
    mm, recorder = host()
    _, base = mm.mmap(3 * HUGE, RW)
    assert mm.madvise_collapse(base, HUGE) == EINVAL  # nothing ever mapped there
    mm.host_read(base + HUGE, 1)
    assert mm.madvise_collapse(base + HUGE, HUGE) == EINVAL  # only the zero page
    mm.host_write(base + 2 * HUGE, b"p")
    _, pfn = mm.pin_user_page(base + 2 * HUGE)
    assert mm.madvise_collapse(base + 2 * HUGE, HUGE) == EAGAIN  # try again once unpinned
    assert mm.madvise_collapse(base, HUGE // 2) == 0  # no whole block: nothing to do
    assert mm.madvise_collapse(base + 3 * HUGE, HUGE) == ENOMEM
    assert recorder.take() == []
    mm.unpin_user_page(pfn)
    assert mm.madvise_collapse(base + 2 * HUGE, HUGE) == 0
    _, shared = mm.mmap(HUGE, RW, MemFile("no-thp", HUGE))
    mm.host_write(shared, b"s")
    assert mm.madvise_collapse(shared, HUGE) == EINVAL  # shmem huge pages are denied


def test_khugepaged_needs_vm_hugepage_and_a_used_page() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    assert not mm.khugepaged_scan(base)  # no MADV_HUGEPAGE
    assert mm.madvise_hugepage(base, HUGE) == 0
    for page in (0, 7, 511):
        mm.age(base + page * PAGE)
    recorder.take()
    assert not mm.khugepaged_scan(base)  # nobody used a page since the last look
    assert recorder.take() == [("test_young", base + page * PAGE) for page in (0, 7, 511)]

    recorder.young.add(base + 7 * PAGE)  # a secondary MMU says a page is used
    assert mm.khugepaged_scan(base)
    assert recorder.take() == [
        ("test_young", base),
        ("test_young", base + 7 * PAGE),
        ("test_young", base + 511 * PAGE),
        *invalidation(base, base + HUGE, CLEAR),
        ("test_young", base),  # asked again once the block is unmapped
        ("test_young", base + 7 * PAGE),
        ("test_young", base + 511 * PAGE),
    ]
    assert mm.mapping_level(base + PAGE) == LEVEL_PMD


def test_split_huge_pmd_keeps_the_pages_and_maps_them_one_by_one() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    head = mm.pmds[base].pfn
    recorder.take()
    assert mm.split_huge_pmd(base + 5 * PAGE)
    assert recorder.take() == invalidation(base, base + HUGE, CLEAR)
    assert not mm.split_huge_pmd(base)  # nothing left to split
    assert mm.mapping_level(base + 7 * PAGE) == LEVEL_PTE
    assert mm.ptes[base + 7 * PAGE].pfn == head + 7  # the same frames
    assert mm.host_read(base + 511 * PAGE, 4) == (0, bytes([511 % 256]) * 4)
    folio = mm.pages[head]
    assert folio.nr_pages == 512 and (folio.refcount, folio.mapcount) == (512, 512)
    assert mm.munmap(base + 7 * PAGE, PAGE) == 0
    assert (folio.refcount, folio.mapcount) == (511, 511)  # still one huge folio


def test_changing_part_of_a_huge_page_splits_it_first() -> None:
    mm, recorder = host()
    _, base = mm.mmap(2 * HUGE, RW)
    for block in (base, base + HUGE):
        mm.host_write(block, b"x")
        assert mm.madvise_collapse(block, HUGE) == 0
    recorder.take()

    # munmap splits the VMA (and with it the huge page) before its UNMAP invalidation.
    assert mm.munmap(base + PAGE, PAGE) == 0
    assert recorder.take() == [
        *invalidation(base, base + HUGE, CLEAR),
        *invalidation(base + PAGE, base + 2 * PAGE, UNMAP),
    ]
    # MADV_DONTNEED splits inside its own invalidation.
    second = base + HUGE
    assert mm.madvise_dontneed(second + PAGE, PAGE) == 0
    assert recorder.take() == [
        ("start", second + PAGE, second + 2 * PAGE, CLEAR),
        *invalidation(second, second + HUGE, CLEAR),
        ("end", second + PAGE, second + 2 * PAGE, CLEAR),
    ]
    assert mm.host_read(second, 1) == (0, b"x") and mm.host_read(second + PAGE, 1) == (0, b"\0")
    # Unmapping the rest of both blocks frees both huge pages.
    assert mm.munmap(base, 2 * HUGE) == 0 and not mm.pages


def test_a_whole_huge_page_is_unmapped_without_a_split() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    recorder.take()
    assert mm.madvise_dontneed(base, HUGE) == 0
    assert recorder.take() == invalidation(base, base + HUGE, CLEAR)
    assert not mm.pmds and not mm.ptes and not mm.pages


def test_mprotect_of_part_of_a_huge_page() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    recorder.take()
    assert mm.mprotect(base, HUGE // 2, PROT_READ) == 0
    assert recorder.take() == [
        *invalidation(base, base + HUGE, CLEAR),  # the VMA split at the middle
        *invalidation(base, base + HUGE // 2, PROTECT),
    ]
    assert not mm.ptes[base].writable and mm.ptes[base + HUGE // 2].writable
    # A whole huge page changes protection in place.
    _, other = mm.mmap(HUGE, RW)
    mm.host_write(other, b"h")
    mm.madvise_collapse(other, HUGE)
    recorder.take()
    assert mm.mprotect(other, HUGE, PROT_READ) == 0
    assert recorder.take() == invalidation(other, other + HUGE, PROTECT)
    assert mm.mapping_level(other) == LEVEL_PMD and not mm.pmds[other].writable


def test_a_huge_page_migrates_whole() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    old = mm.pmds[base].pfn
    recorder.take()
    assert mm.migrate_page(base + 7 * PAGE) == 0
    assert recorder.take() == invalidation(base, base + HUGE, CLEAR)
    new = mm.pmds[base].pfn
    assert new != old and old not in mm.pages and new % 512 == 0
    assert mm.host_read(base + 7 * PAGE, 4) == (0, bytes([7]) * 4)
    assert mm.mapping_level(base) == LEVEL_PMD


def test_a_huge_page_is_reclaimed_whole_and_comes_back_page_by_page() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    recorder.take()
    assert mm.reclaim(base + 3 * PAGE) is Reclaim.REFERENCED
    assert mm.reclaim(base + 3 * PAGE) is Reclaim.SWAPPED_OUT
    assert recorder.take() == [
        ("clear_flush_young", base, base + HUGE),
        ("clear_flush_young", base, base + HUGE),
        *invalidation(base, base + HUGE, CLEAR),
    ]
    assert not mm.pmds and not mm.pages and len(mm.swap) == 512
    assert mm.host_read(base + 511 * PAGE, 4) == (0, bytes([511 % 256]) * 4)
    assert mm.mapping_level(base + 511 * PAGE) == LEVEL_PTE


def test_reclaiming_a_page_of_a_split_huge_page_splits_the_folio() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    mm.split_huge_pmd(base)
    for page in range(512):
        mm.age(base + page * PAGE)
    head = mm.ptes[base].pfn
    recorder.take()
    assert mm.reclaim(base + 7 * PAGE) is Reclaim.SWAPPED_OUT
    events = recorder.take()
    assert events[:512] == [
        ("clear_flush_young", base + page * PAGE, base + (page + 1) * PAGE) for page in range(512)
    ]
    assert events[512:] == [
        *invalidation(base, base + HUGE, CLEAR),  # the folio is split
        ("clear_flush_young", base + 7 * PAGE, base + 8 * PAGE),
        *invalidation(base + 7 * PAGE, base + 8 * PAGE, CLEAR),
    ]
    assert mm.pages[head].nr_pages == 1 and head + 7 not in mm.pages
    assert mm.ptes[base + 8 * PAGE].pfn == head + 8  # the others keep their frames
    assert mm.host_read(base + 7 * PAGE, 4) == (0, bytes([7]) * 4)


# -- the address space going away -----------------------------------------------------------


def test_exit_mmap_releases_first_and_then_tells_nobody() -> None:
    mm, recorder = host()
    base = huge_block(mm)
    mm.madvise_collapse(base, HUGE)
    _, small = mm.mmap(2 * PAGE, RW)
    mm.host_write(small, b"a")
    _, pinned_pfn = mm.pin_user_page(small + PAGE)
    recorder.take()
    mm.exit_mmap()
    assert recorder.take() == [("release",)]
    assert mm.notifier is None and not mm.vmas and not mm.ptes and not mm.pmds
    assert set(mm.pages) == {pinned_pfn}  # a long-term pin outlives the address space
    mm.unpin_user_page(pinned_pfn)
    assert not mm.pages


# -- with KVM listening ---------------------------------------------------------------------


def test_kvm_sees_host_changes_through_its_notifier() -> None:
    kvm = Kvm(DEFAULT_PROFILE)
    mm = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    mm.notifier = KvmMmuNotifier(kvm)
    _, base = mm.mmap(16 * PAGE, RW)
    region = MemoryRegion(0, 0, 0x100000, 16 * PAGE, base)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    mm.host_write(base + 3 * PAGE, b"x")

    seq = kvm.mmu_invalidate_seq
    assert mm.madvise_dontneed(base + 3 * PAGE, PAGE) == 0
    assert kvm.mmu_invalidate_seq == seq + 1
    assert kvm.mn_active_invalidate_count == 0 and kvm.mmu_invalidate_in_progress == 0
    unmapped = [event for event in kvm.arch.events if event[0] == "unmap_gfn_range"]
    assert [(r.start, r.end) for _, r in unmapped] == [(0x103, 0x104)]  # type: ignore[attr-defined]
    assert not mm.age(base + 3 * PAGE)  # dropped, and no guest mapping was young


def test_khugepaged_gives_up_on_a_page_only_the_guest_uses() -> None:
    """khugepaged counts a page the guest uses (test_young through KVM), but the collapse
    unmaps the block from the guest before it checks again: KVM then knows of no use, and
    the collapse is abandoned, leaving the guest to refault."""
    mmu = FlatMmu()
    kvm = Kvm(DEFAULT_PROFILE, mmu)
    mm = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    mm.notifier = KvmMmuNotifier(kvm)
    _, base = mm.mmap(HUGE, RW, hugepage=True)
    region = MemoryRegion(0, 0, 0x100000, HUGE, base)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    assert guest_access(kvm, mm, 0, 0x100000, b"g")[0] == Fault.MAPPED
    mm.age(base)  # the host's and the guest's accessed bits both cleared
    assert guest_access(kvm, mm, 0, 0x100000, None)[0] == Fault.MAPPED  # the guest only
    assert not mm.ptes[base].young
    seq = kvm.mmu_invalidate_seq
    assert not mm.khugepaged_scan(base)
    assert [name for name, _ in kvm.arch.events].count("test_age_gfn") == 2
    assert kvm.mmu_invalidate_seq == seq + 1 and (0, 0x100) not in mmu.ptes
    assert mm.mapping_level(base) == LEVEL_PTE


def test_the_guest_keeps_its_data_through_collapse_and_split() -> None:
    """KVM maps pages of a huge page one by one here (the flat MMU has no large mappings):
    the collapse moves the guest's data to new frames and the guest refaults to them; the
    split keeps the frames, yet KVM is invalidated and refaults to the same ones."""
    mmu = FlatMmu()
    kvm = Kvm(DEFAULT_PROFILE, mmu)
    mm = HostMm(PAGE, DEFAULT_PROFILE.user_address_limit)
    mm.notifier = KvmMmuNotifier(kvm)
    _, base = mm.mmap(HUGE, RW)
    region = MemoryRegion(0, 0, 0x100000, HUGE, base)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    gfn = 0x100 + 9
    assert guest_access(kvm, mm, 0, gfn * PAGE, b"guest")[0] == Fault.MAPPED
    small = mmu.ptes[(0, gfn)].pfn

    assert mm.madvise_collapse(base, HUGE) == 0
    assert (0, gfn) not in mmu.ptes  # invalidated: the frame changed
    assert guest_access(kvm, mm, 0, gfn * PAGE, None, 5) == (Fault.MAPPED, b"guest")
    huge = mmu.ptes[(0, gfn)].pfn
    assert huge == mm.pmds[base].pfn + 9 != small and mm.mapping_level(base) == LEVEL_PMD
    assert guest_access(kvm, mm, 0, (gfn + 1) * PAGE, b"tail")[0] == Fault.MAPPED
    assert mm.host_read(base + 10 * PAGE, 4) == (0, b"tail")

    assert mm.split_huge_pmd(base)
    assert not mmu.ptes  # invalidated although no frame changed
    assert guest_access(kvm, mm, 0, gfn * PAGE, None, 5) == (Fault.MAPPED, b"guest")
    assert mmu.ptes[(0, gfn)].pfn == huge and mm.mapping_level(base) == LEVEL_PTE
