"""struct kvm_memslots: one set of memslots of one address space, with its three indexes.

Each address space has two sets. vCPUs and notifiers read the *active* one; a memslot update
edits the *inactive* one and then swaps them (kvm_main.py). A set indexes the same slots
three ways: by id, by guest frame number (an ordered tree, so a gfn lookup is O(log n)), and
by host virtual address (an interval index, since several slots may alias one hva).

kernel: include/linux/kvm_host.h:struct kvm_memslots, search_memslots, id_to_memslot,
kvm_for_each_memslot_in_gfn_range (v6.18)
"""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

from kvmspec.reference.hva_index import HvaIndex
from kvmspec.reference.memslot import KvmMemorySlot


class KvmMemslots:
    """One memslot set."""

    __slots__ = ("as_id", "generation", "gfn_tree", "hva_tree", "id_hash", "last_used_slot")

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        # Generations start at the address space id and grow by the number of address
        # spaces, so two address spaces never share a generation (kvm_create_vm).
        self.generation = as_id
        self.id_hash: dict[int, KvmMemorySlot] = {}
        self.gfn_tree: SortedDict = SortedDict()  # base_gfn -> slot
        self.hva_tree = HvaIndex()
        self.last_used_slot: KvmMemorySlot | None = None

    def __len__(self) -> int:
        return len(self.id_hash)

    def __iter__(self) -> Iterator[KvmMemorySlot]:
        """Slots in gfn order (kvm_for_each_memslot)."""
        return iter(self.gfn_tree.values())

    def id_to_memslot(self, slot_id: int) -> KvmMemorySlot | None:
        """kernel: include/linux/kvm_host.h:id_to_memslot (v6.18)"""
        return self.id_hash.get(slot_id)

    def search_memslots(self, gfn: int, approx: bool = False) -> KvmMemorySlot | None:
        """The slot containing ``gfn``, or None.

        With ``approx``, return the slot that would be next in gfn order when no slot
        contains ``gfn`` (the start point of a range walk).

        kernel: include/linux/kvm_host.h:search_memslots (v6.18)
        """
        index = self.gfn_tree.bisect_right(gfn) - 1
        if index >= 0:
            slot: KvmMemorySlot = self.gfn_tree.peekitem(index)[1]
            if gfn < slot.end_gfn:
                return slot
        if approx and index + 1 < len(self.gfn_tree):
            following: KvmMemorySlot = self.gfn_tree.peekitem(index + 1)[1]
            return following
        return None

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        """A lookup that tries the last slot found first: most accesses hit the same slot.

        kernel: include/linux/kvm_host.h:____gfn_to_memslot (v6.18)
        """
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.end_gfn:
            return slot
        slot = self.search_memslots(gfn)
        if slot is not None:
            self.last_used_slot = slot
        return slot

    def slots_in_gfn_range(self, start: int, end: int) -> Iterator[KvmMemorySlot]:
        """Every slot that intersects [start, end), in gfn order.

        kernel: include/linux/kvm_host.h:kvm_for_each_memslot_in_gfn_range (v6.18)
        """
        first = self.search_memslots(start, approx=True)
        if first is None:
            return
        for slot in self.gfn_tree.irange(minimum=first.base_gfn, maximum=end - 1):
            yield self.gfn_tree[slot]

    def hva_to_memslots(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Every slot whose host range intersects [start, end) (the notifier lookup)."""
        return self.hva_tree.slots_overlapping(start, end)
