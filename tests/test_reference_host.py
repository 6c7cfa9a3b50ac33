"""The host side: VMAs, host PTEs and pages, the system calls' errnos, and the MMU-notifier
events KVM sees for each change (start before, end after)."""

from __future__ import annotations

from errno import EBUSY, EFAULT, EINVAL, ENOMEM

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE, ZERO_PFN, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.spec.platforms import DEFAULT_PROFILE
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
RW = PROT_READ | PROT_WRITE


class Recorder:
    """A notifier that records what the host told it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def invalidate_range_start(self, start: int, end: int) -> None:
        self.events.append(("start", start, end))

    def invalidate_range_end(self, start: int, end: int) -> None:
        self.events.append(("end", start, end))

    def clear_flush_young(self, start: int, end: int) -> bool:
        self.events.append(("clear_flush_young", start, end))
        return False

    def clear_young(self, start: int, end: int) -> bool:
        self.events.append(("clear_young", start, end))
        return False

    def test_young(self, address: int) -> bool:
        return False


def host() -> tuple[HostMm, Recorder]:
    mm = HostMm(PAGE, (1 << 47) - PAGE)
    recorder = Recorder()
    mm.notifier = recorder
    return mm, recorder


def test_system_call_errnos() -> None:
    mm, _ = host()
    assert mm.mmap(0, RW) == (EINVAL, 0)
    errno, base = mm.mmap(16 * PAGE, RW)
    assert errno == 0 and base % (2 << 20) == 0
    assert mm.munmap(base + 1, PAGE) == EINVAL
    assert mm.munmap(base, 0) == EINVAL
    assert mm.mprotect(base - PAGE, 2 * PAGE, PROT_READ) == ENOMEM  # partly unmapped
    assert mm.madvise_dontneed(base + 16 * PAGE, PAGE) == ENOMEM
    assert mm.munmap(base, 16 * PAGE) == 0
    assert mm.munmap(base, 16 * PAGE) == 0  # unmapping a hole is not an error
    assert mm.host_write(base, b"x") == EFAULT
    assert mm.host_read(base, 1) == (EFAULT, b"")


def test_contents_zero_pages_and_protections() -> None:
    mm, recorder = host()
    _, base = mm.mmap(4 * PAGE, RW)
    assert mm.host_read(base + 8, 4) == (0, bytes(4))
    assert mm.ptes[base].pfn == ZERO_PFN and not mm.ptes[base].writable
    assert mm.host_write(base + 8, b"abcd") == 0
    assert mm.host_read(base + 8, 4) == (0, b"abcd")
    assert mm.ptes[base].pfn != ZERO_PFN and mm.ptes[base].dirty
    # The write replaced the zero page: secondary MMUs were told before and after.
    assert recorder.events == [("start", base, base + PAGE), ("end", base, base + PAGE)]

    recorder.events.clear()
    assert mm.mprotect(base, 4 * PAGE, PROT_READ) == 0
    assert recorder.events == [("start", base, base + 4 * PAGE), ("end", base, base + 4 * PAGE)]
    assert mm.host_write(base, b"y") == EFAULT
    assert mm.host_read(base + 8, 4) == (0, b"abcd")
    assert mm.mprotect(base + PAGE, PAGE, RW) == 0  # splits the VMA
    assert mm.host_write(base + PAGE, b"z") == 0 and mm.host_write(base, b"z") == EFAULT

    recorder.events.clear()
    assert mm.madvise_dontneed(base, PAGE) == 0
    assert recorder.events[0] == ("start", base, base + PAGE)
    assert mm.host_read(base + 8, 4) == (0, bytes(4))  # dropped: reads zero again


def test_migration_moves_unpinned_pages_and_refuses_pinned_ones() -> None:
    """Seed 004: an unpinned page migrates (secondary MMUs are invalidated and refault to the
    new frame, contents kept); a pinned page cannot move."""
    mm, recorder = host()
    _, base = mm.mmap(2 * PAGE, RW)
    mm.host_write(base, b"data")
    old_pfn = mm.ptes[base].pfn
    assert mm.migrate_page(base) == 0
    assert mm.ptes[base].pfn != old_pfn and old_pfn not in mm.pages
    assert mm.host_read(base, 4) == (0, b"data")
    assert recorder.events == [("start", base, base + PAGE), ("end", base, base + PAGE)]

    mm.pages[mm.ptes[base].pfn].pins += 1  # a long-term pin (FOLL_LONGTERM)
    assert mm.migrate_page(base) == EBUSY


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
