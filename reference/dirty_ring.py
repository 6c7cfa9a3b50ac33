"""The per-vCPU dirty ring: a ring of (slot, offset) entries shared with userspace.

KVM pushes an entry for each page a vCPU dirties; userspace harvests entries by setting their
RESET flag and calls KVM_RESET_DIRTY_RINGS, which consumes the harvested entries in order and
makes their pages write-protected again. Entries are stored sparsely (the ring holds up to
65536 of them).

Both indexes are the kernel's free-running u32 counters: they only ever grow, wrapping at
2^32, and an entry's place in the ring is the counter's low bits (the size is a power of two,
which 2^32 is a multiple of, so the place moves on by one across the wrap too). The two
functions of that arithmetic, :func:`kvm_dirty_ring_used` and :func:`kvm_dirty_ring_slot`,
carry contracts that ``make crosshair`` proves; they are not wrapped at run time because
they run for every dirty page.

kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_alloc, kvm_dirty_ring_push,
kvm_dirty_ring_reset, kvm_dirty_ring_soft_full (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.spec.uapi.constants import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, U32_MAX


def kvm_dirty_ring_used(dirty_index: int, reset_index: int) -> int:
    """How many entries were pushed and not yet reset: the u32 difference of the indexes,
    which stays right when ``dirty_index`` has wrapped past 2^32 and ``reset_index`` not yet.

    pre: 0 <= dirty_index <= 0xFFFFFFFF and 0 <= reset_index <= 0xFFFFFFFF
    post: 0 <= __return__ <= 0xFFFFFFFF
    post: (reset_index + __return__) & 0xFFFFFFFF == dirty_index

    kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_used (v6.18)
    """
    return (dirty_index - reset_index) & U32_MAX


def kvm_dirty_ring_slot(index: int, size: int) -> int:
    """The place in a ring of ``size`` entries (a power of two) of the entry at ``index``.

    pre: 0 <= index <= 0xFFFFFFFF
    pre: 1 <= size <= 65536 and size & (size - 1) == 0
    post: 0 <= __return__ < size
    post: ((index + 1) & 0xFFFFFFFF) & (size - 1) == (__return__ + 1) % size

    kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_push, kvm_dirty_ring_reset (v6.18)
    """
    return index & (size - 1)


@dataclass(slots=True)
class KvmDirtyGfn:
    """struct kvm_dirty_gfn: ``slot`` is (as_id << 16) | id, ``offset`` is from base_gfn."""

    flags: int
    slot: int
    offset: int


class KvmDirtyRing:
    """struct kvm_dirty_ring: ``size`` entries, the u32 indexes of the next push and of the
    next entry to reset, and the entries pushed and not reset, keyed by their place."""

    __slots__ = ("dirty_index", "entries", "reset_index", "size", "soft_limit")

    def __init__(self, size: int, reserved: int) -> None:
        self.size = size
        self.soft_limit = size - reserved
        self.dirty_index = 0
        self.reset_index = 0
        self.entries: dict[int, KvmDirtyGfn] = {}

    def used(self) -> int:
        """kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_used (v6.18)"""
        return kvm_dirty_ring_used(self.dirty_index, self.reset_index)

    def places_in_use(self) -> list[int]:
        """The places of the entries pushed and not yet reset, oldest first: the places
        the kernel visits going from reset_index to dirty_index, across the u32 wrap too."""
        return [
            kvm_dirty_ring_slot((self.reset_index + n) & U32_MAX, self.size)
            for n in range(self.used())
        ]

    def soft_full(self) -> bool:
        """The vCPU must exit to userspace before entering the guest again."""
        return self.used() >= self.soft_limit

    def push(self, slot: int, offset: int) -> None:
        """Publish one dirty gfn. The caller guarantees room (soft-full exits leave headroom).

        kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_push (v6.18)
        """
        if self.used() >= self.size:
            raise RuntimeError("dirty ring overflow: a push without room")
        self.entries[kvm_dirty_ring_slot(self.dirty_index, self.size)] = KvmDirtyGfn(
            KVM_DIRTY_GFN_F_DIRTY, slot, offset
        )
        self.dirty_index = (self.dirty_index + 1) & U32_MAX

    def harvest(self) -> list[KvmDirtyGfn]:
        """What userspace does with the ring it mmap()ed: read every published entry it has
        not taken yet and flag it RESET for the next KVM_RESET_DIRTY_RINGS. Returns copies
        of the entries taken, in ring order."""
        taken = []
        for place in self.places_in_use():
            entry = self.entries[place]
            if not entry.flags & KVM_DIRTY_GFN_F_RESET:
                entry.flags |= KVM_DIRTY_GFN_F_RESET
                taken.append(KvmDirtyGfn(entry.flags, entry.slot, entry.offset))
        return taken

    def reset(self) -> list[KvmDirtyGfn]:
        """Consume harvested entries in ring order, stopping at the first one userspace has
        not flagged RESET. Returns the consumed entries, whose pages the caller re-protects.

        kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_reset (v6.18)
        """
        consumed = []
        while self.reset_index != self.dirty_index:
            place = kvm_dirty_ring_slot(self.reset_index, self.size)
            entry = self.entries.get(place)
            if entry is None or not entry.flags & KVM_DIRTY_GFN_F_RESET:
                break
            del self.entries[place]
            consumed.append(entry)
            self.reset_index = (self.reset_index + 1) & U32_MAX
        return consumed
