"""struct kvm_memslots: one set of memslots of one address space, with its three indexes.

Each address space has two sets. vCPUs and notifiers read the *active* one; a memslot update
edits the *inactive* one and then swaps them (kvm_main.py). A set indexes the same slots
three ways: by id, by guest frame number (an ordered tree, so a gfn lookup is O(log n)), and
by host virtual address (an interval index, since several slots may alias one hva).

kernel: include/linux/kvm_host.h:struct kvm_memslots, search_memslots, id_to_memslot,
kvm_check_memslot_overlap (v6.18)
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter

from sortedcontainers import SortedKeyList

from kvmspec.reference.hva_index import HvaIndex
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.ordered import floor_value

_base_gfn = attrgetter("base_gfn")


class KvmMemslots:
    """One memslot set."""

    __slots__ = ("as_id", "generation", "gfn_tree", "hva_tree", "id_hash", "last_used_slot")

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        # Generations start at the address space id and grow by the number of address
        # spaces, so two address spaces never share a generation (kvm_create_vm).
        self.generation = as_id
        self.id_hash: dict[int, KvmMemorySlot] = {}
        self.gfn_tree: SortedKeyList = SortedKeyList(key=_base_gfn)  # slots by base_gfn
        self.hva_tree = HvaIndex()
        self.last_used_slot: KvmMemorySlot | None = None

    def __len__(self) -> int:
        return len(self.id_hash)

    def __iter__(self) -> Iterator[KvmMemorySlot]:
        """Slots in gfn order (kvm_for_each_memslot)."""
        return iter(self.gfn_tree)

    def id_to_memslot(self, slot_id: int) -> KvmMemorySlot | None:
        """kernel: include/linux/kvm_host.h:id_to_memslot (v6.18)"""
        return self.id_hash.get(slot_id)

    def search_memslots(self, gfn: int) -> KvmMemorySlot | None:
        """The slot containing ``gfn``, or None.

        kernel: include/linux/kvm_host.h:search_memslots (v6.18)
        """
        # The last slot starting at or below gfn is the only one that can contain it, since
        # slots never overlap (M1).
        slot: KvmMemorySlot | None = floor_value(self.gfn_tree, gfn)
        if slot is not None and gfn < slot.end_gfn:
            return slot
        return None

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        """A lookup that tries the last slot found first: most accesses hit the same slot.

        kernel: include/linux/kvm_host.h:____gfn_to_memslot (called as __gfn_to_memslot on
        one set; the kernel's gfn_to_memslot picks the set from the vCPU first) (v6.18)
        """
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.end_gfn:
            return slot
        slot = self.search_memslots(gfn)
        if slot is not None:
            self.last_used_slot = slot
        return slot

    def kvm_check_memslot_overlap(self, slot_id: int, start: int, end: int) -> bool:
        """Does [start, end) intersect a slot with another id?

        Walking down from the last slot that starts below ``end``, the first slot that ends
        at or before ``start`` proves every earlier one does too (slots never overlap).

        kernel: virt/kvm/kvm_main.c:kvm_check_memslot_overlap (v6.18)
        """
        below = end - 1
        while (slot := floor_value(self.gfn_tree, below)) is not None:
            if slot.end_gfn <= start:
                return False
            if slot.id != slot_id:
                return True
            below = slot.base_gfn - 1  # the slot itself (a MOVE): look further down
        return False

    def hva_to_memslots(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Every slot whose host range intersects [start, end): the lookup MMU notifiers make
        to turn a host range into the gfns it backs (the generic-machinery layer calls it; the
        invariants check the index behind it now).

        kernel: virt/kvm/kvm_main.c:__kvm_handle_hva_range (kvm_for_each_memslot_in_hva_range)
        (v6.18)
        """
        return [self.id_hash[slot_id] for slot_id in self.hva_tree.ids_overlapping(start, end)]
