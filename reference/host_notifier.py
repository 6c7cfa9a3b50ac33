"""The host's MMU-notifier interface: what a secondary MMU such as KVM is told, and why.

A secondary MMU keeps its own translations of the process's memory (KVM's stage-2 or EPT
tables), so the host must tell it before a page can go away or change, and after. Each
invalidation carries the reason (the event) with its range; aging asks whether a range was
used; ``release`` says the whole address space is going away.

kernel: include/linux/mmu_notifier.h:enum mmu_notifier_event, struct mmu_notifier_ops,
struct mmu_notifier_range (v6.18)
"""

from __future__ import annotations

import enum
from typing import Protocol


class MmuNotifierEvent(enum.IntEnum):
    """Why a range is invalidated (the kernel's values, in the kernel's order).

    A listener may use the reason to do less work, for example a device driver that skips
    its own migrations. KVM does not look at it: every invalidation unmaps the range.
    """

    UNMAP = 0
    """The range is leaving the address space (munmap, the VMAs torn down)."""
    CLEAR = 1
    """The pages go but the range stays mapped: MADV_DONTNEED, reclaim, migration,
    copy-on-write, collapsing or splitting a huge page."""
    PROTECTION_VMA = 2
    """The VMA's protection changes (mprotect)."""
    PROTECTION_PAGE = 3
    """One page's protection changes (write-protected for writeback)."""
    SOFT_DIRTY = 4
    """Soft-dirty bits are cleared (a write to /proc/pid/clear_refs)."""
    RELEASE = 5
    """The mm is gone; only interval notifiers receive it, as an invalidation of everything.
    A classic notifier such as KVM's gets the ``release`` callback instead."""
    MIGRATE = 6
    """Device-private migration (migrate_vma), with the device as the range's owner."""
    EXCLUSIVE = 7
    """A device takes exclusive access to the pages (make_device_exclusive)."""


class MmuNotifier(Protocol):
    """The callbacks a secondary MMU registers (struct mmu_notifier_ops)."""

    def invalidate_range_start(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        """[start, end) is about to change: drop every translation of it, and create none
        until the matching end."""

    def invalidate_range_end(self, start: int, end: int, event: MmuNotifierEvent) -> None:
        """The change of [start, end) is done: translations may be created again."""

    def clear_flush_young(self, start: int, end: int) -> bool:
        """Was [start, end) accessed? Clear the accessed state and flush, so that the next
        access is seen."""

    def clear_young(self, start: int, end: int) -> bool:
        """The same without a flush: cheaper, may miss accesses through cached entries."""

    def test_young(self, address: int) -> bool:
        """Was the page at ``address`` accessed? Changes nothing."""

    def release(self) -> None:
        """The address space is being torn down: drop every translation. No other callback
        follows: the subscription ends here."""
