"""Which memslots cover a host virtual address: the hva interval tree of a memslot set.

Several slots may map the same host memory (aliases), so a query can return more than one
slot. The kernel keeps an augmented interval tree of slots; the model keeps an ordered map of
elementary segments instead: each key starts a run of addresses covered by the same slot ids,
up to the next key. A point query is one ordered-map lookup, and inserting a slot that aliases
nothing touches two keys. The index holds slot *ids* (unique within a set, M2): a slot's host
range never changes, so replacing a slot by an updated copy with the same id leaves the index
as it is, exactly as the kernel's remove-and-insert would.

kernel: virt/kvm/kvm_main.c:kvm_replace_memslot (hva_tree); queried as in
__kvm_handle_hva_range (v6.18)
"""

from __future__ import annotations

from sortedcontainers import SortedDict

from kvmspec.reference.ordered import floor_item

Cover = tuple[int, ...]


class HvaIndex:
    """Slot ids by host virtual address range [start, end)."""

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        # segment start -> ids of the slots covering [start, next segment start)
        self._segments: SortedDict = SortedDict()

    def _cover_at(self, hva: int) -> Cover:
        """The ids covering ``hva``: those of the last segment starting at or below it."""
        floor = floor_item(self._segments, hva)
        if floor is None:
            return ()
        cover: Cover = floor[1]
        return cover

    def _split(self, at: int) -> None:
        """Make ``at`` the start of a segment, keeping coverage unchanged."""
        if at not in self._segments:
            self._segments[at] = self._cover_at(at)

    def _starts_within(self, start: int, end: int) -> list[int]:
        """The segment starts in [start, end), where ``start`` is one of them.

        Most slots alias nothing, so [start, end) is usually a single segment: one floor
        lookup proves it, cheaper than iterating over a range of the map.
        """
        last = floor_item(self._segments, end - 1)
        if last is not None and last[0] == start:
            return [start]
        return list(self._segments.irange(start, end, inclusive=(True, False)))

    def insert(self, start: int, end: int, slot_id: int) -> None:
        """Add a slot id (not already present) over [start, end).

        No boundary needs merging afterwards: ``slot_id`` is now on the inside of both ends
        and on neither outside, so the covers on either side of ``start`` and ``end`` differ.
        """
        self._split(start)
        self._split(end)
        segments = self._segments
        for key in self._starts_within(start, end):
            segments[key] = (*segments[key], slot_id)

    def remove(self, start: int, end: int, slot_id: int) -> None:
        """Take a slot id off [start, end), then drop the boundaries at either end that no
        longer separate different covers."""
        segments = self._segments
        inside = self._starts_within(start, end)
        for key in inside:
            segments[key] = tuple(i for i in segments[key] if i != slot_id)
        # At ``end``: the last segment inside against the one that follows (if any).
        if segments.get(end) == segments[inside[-1]]:
            del segments[end]
        # At ``start``: the first segment inside against whatever covers the address below.
        if segments[start] == self._cover_at(start - 1):
            del segments[start]

    def ids_at(self, hva: int) -> Cover:
        """The id of every slot whose host range contains ``hva``."""
        return self._cover_at(hva)

    def ids_overlapping(self, start: int, end: int) -> set[int]:
        """The id of every slot whose host range intersects [start, end)."""
        found = set(self._cover_at(start))
        for key in self._segments.irange(start, end, inclusive=(False, False)):
            found.update(self._segments[key])
        return found

    def covers(self) -> list[tuple[int, Cover]]:
        """Every stored boundary with the ids covering the run it starts, in address order
        (what the invariants compare against the slots)."""
        return list(self._segments.items())
