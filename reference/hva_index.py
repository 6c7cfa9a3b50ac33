"""Which memslots cover a host virtual address: the hva interval tree of a memslot set.

Several slots may map the same host memory (aliases), so a query can return more than one
slot. The kernel keeps an augmented interval tree; the model keeps an ordered map of
elementary segments instead: each key starts a run of addresses covered by the same tuple of
slots, up to the next key. A point query is one ordered-map lookup; inserting a slot that
aliases nothing touches two keys.

kernel: virt/kvm/kvm_main.c:kvm_replace_memslot (hva_tree), __kvm_handle_hva_range (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

if TYPE_CHECKING:
    from kvmspec.reference.memslot import KvmMemorySlot

Cover = tuple["KvmMemorySlot", ...]


class HvaIndex:
    """Slots by host virtual address range [start, end)."""

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        # segment start -> the slots covering [start, next segment start)
        self._segments: SortedDict = SortedDict()

    def _cover_at(self, hva: int) -> Cover:
        index = self._segments.bisect_right(hva) - 1
        if index < 0:
            return ()
        cover: Cover = self._segments.peekitem(index)[1]
        return cover

    def _split(self, at: int) -> None:
        """Make ``at`` the start of a segment, keeping coverage unchanged."""
        if at not in self._segments:
            self._segments[at] = self._cover_at(at)

    def _merge(self, at: int) -> None:
        """Drop the segment boundary at ``at`` if it separates equal coverage."""
        if at not in self._segments:
            return
        index = self._segments.index(at)
        previous: Cover = self._segments.peekitem(index - 1)[1] if index > 0 else ()
        if self._segments[at] == previous:
            del self._segments[at]

    def insert(self, start: int, end: int, slot: KvmMemorySlot) -> None:
        self._split(start)
        self._split(end)
        for key in list(self._segments.irange(start, end, inclusive=(True, False))):
            self._segments[key] = (*self._segments[key], slot)
        self._merge(end)
        self._merge(start)

    def remove(self, start: int, end: int, slot: KvmMemorySlot) -> None:
        for key in list(self._segments.irange(start, end, inclusive=(True, False))):
            self._segments[key] = tuple(s for s in self._segments[key] if s is not slot)
        self._merge(end)
        self._merge(start)

    def slots_at(self, hva: int) -> Cover:
        """Every slot whose host range contains ``hva``."""
        return self._cover_at(hva)

    def slots_overlapping(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Every slot whose host range intersects [start, end), each once, in no set order."""
        found: dict[int, KvmMemorySlot] = {}
        for slot in self._cover_at(start):
            found[id(slot)] = slot
        for key in self._segments.irange(start, end, inclusive=(False, False)):
            for slot in self._segments[key]:
                found[id(slot)] = slot
        return list(found.values())

    def segments(self) -> int:
        """The number of stored boundaries (a measure of the index's memory)."""
        return len(self._segments)
