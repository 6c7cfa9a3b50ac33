"""The per-vCPU dirty ring: a ring of (slot, offset) entries shared with userspace.

KVM pushes an entry for each page a vCPU dirties; userspace harvests entries by setting their
RESET flag and calls KVM_RESET_DIRTY_RINGS, which consumes the harvested entries in order and
makes their pages write-protected again. Entries are stored sparsely (the ring holds up to
65536 of them).

kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_alloc, kvm_dirty_ring_push,
kvm_dirty_ring_reset, kvm_dirty_ring_soft_full (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.spec.uapi.constants import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET


@dataclass(slots=True)
class KvmDirtyGfn:
    """struct kvm_dirty_gfn: ``slot`` is (as_id << 16) | id, ``offset`` is from base_gfn."""

    flags: int
    slot: int
    offset: int


class KvmDirtyRing:
    __slots__ = ("dirty_index", "entries", "reset_index", "size", "soft_limit")

    def __init__(self, size: int, reserved: int) -> None:
        self.size = size
        self.soft_limit = size - reserved
        self.dirty_index = 0
        self.reset_index = 0
        self.entries: dict[int, KvmDirtyGfn] = {}

    def used(self) -> int:
        """kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_used (v6.18)"""
        return self.dirty_index - self.reset_index

    def soft_full(self) -> bool:
        """The vCPU must exit to userspace before entering the guest again."""
        return self.used() >= self.soft_limit

    def push(self, slot: int, offset: int) -> None:
        """Publish one dirty gfn. The caller guarantees room (soft-full exits leave headroom).

        kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_push (v6.18)
        """
        if self.used() >= self.size:
            raise RuntimeError("dirty ring overflow: a push without room")
        self.entries[self.dirty_index % self.size] = KvmDirtyGfn(
            KVM_DIRTY_GFN_F_DIRTY, slot, offset
        )
        self.dirty_index += 1

    def harvest(self) -> list[KvmDirtyGfn]:
        """What userspace does with the ring it mmap()ed: read every published entry it has
        not taken yet and flag it RESET for the next KVM_RESET_DIRTY_RINGS. Returns copies
        of the entries taken, in ring order."""
        taken = []
        for index in range(self.reset_index, self.dirty_index):
            entry = self.entries[index % self.size]
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
            entry = self.entries.get(self.reset_index % self.size)
            if entry is None or not entry.flags & KVM_DIRTY_GFN_F_RESET:
                break
            del self.entries[self.reset_index % self.size]
            consumed.append(entry)
            self.reset_index += 1
        return consumed
