"""Reverse maps: for each memslot, level and gfn, the leaf SPTEs that map that gfn.

Shadow page tables are indexed by guest *virtual* address, so "every mapping of gfn g"
cannot be found by walking them. When a host page goes away (an MMU notifier), a memslot
is deleted, or dirty logging must write-protect a page, KVM needs exactly that list. So
every leaf SPTE the shadow MMU installs is added to the rmap of its (slot, level, gfn), and
removed when it is dropped: invariant X1 says the rmaps and the leaf SPTEs agree exactly.

The kernel keeps each rmap head in an array per slot and level (``slot->arch.rmap``),
holding one SPTE pointer or a chain of 14-entry descriptors; the model keeps a list per
(level, index) in a dictionary, only for the heads that are not empty. The array index is
the kernel's: the gfn's huge frame number minus the slot's first one, so rmaps stay
attached to the slot, not to absolute gfns (a MOVE allocates new ones).

Left out: RMAP_RECYCLE_THRESHOLD (an rmap longer than 1000 SPTEs is zapped whole).

kernel: arch/x86/kvm/mmu/mmu.c:gfn_to_rmap, pte_list_add, pte_list_remove, rmap_add,
rmap_remove, kvm_mmu_page_get_gfn; arch/x86/kvm/x86.c:kvm_alloc_memslot_metadata;
arch/x86/include/asm/kvm_host.h:struct kvm_arch_memory_slot, gfn_to_index (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_page import (
    SptePtr,
    kvm_mmu_page_get_gfn,
    kvm_mmu_page_set_translation,
)
from kvmspec.reference.x86.paging import KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K, PT64_LEVEL_BITS

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot

RmapHead = list[SptePtr]


class SlotRmaps:
    """``slot->arch.rmap``: (level, index) -> the rmap head, for non-empty heads only."""

    __slots__ = ("freed", "heads")

    def __init__(self) -> None:
        self.heads: dict[tuple[int, int], RmapHead] = {}
        self.freed = False


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """Which entry of a slot's level-``level`` arrays covers ``gfn``.

    kernel: arch/x86/include/asm/kvm_host.h:gfn_to_index (v6.18)
    """
    shift = (level - PG_LEVEL_4K) * PT64_LEVEL_BITS
    return (gfn >> shift) - (base_gfn >> shift)


def slot_rmaps(slot: KvmMemorySlot) -> SlotRmaps:
    """The rmaps of ``slot`` (allocated with the slot by kvm_alloc_memslot_metadata)."""
    rmaps = slot.arch["rmap"]
    assert isinstance(rmaps, SlotRmaps), f"{slot} has no rmaps"
    return rmaps


def kvm_alloc_memslot_rmaps(slot: KvmMemorySlot) -> None:
    """Give a new slot (CREATE, or the new copy of a MOVE) its own empty rmaps. In the
    kernel these are arrays of npages entries per level; here they cost nothing until used.

    kernel: arch/x86/kvm/x86.c:kvm_alloc_memslot_metadata, memslot_rmap_alloc (v6.18)
    """
    slot.arch["rmap"] = SlotRmaps()


def gfn_to_rmap(gfn: int, level: int, slot: KvmMemorySlot) -> tuple[SlotRmaps, tuple[int, int]]:
    """The rmap head of (gfn, level) in ``slot``, as (the slot's rmaps, the head's key).

    kernel: arch/x86/kvm/mmu/mmu.c:gfn_to_rmap (v6.18)
    """
    rmaps = slot_rmaps(slot)
    return rmaps, (level, gfn_to_index(gfn, slot.base_gfn, level))


def rmap_head(slot: KvmMemorySlot, gfn: int, level: int) -> RmapHead:
    """The SPTEs in the rmap of (gfn, level), a copy (callers drop SPTEs as they go)."""
    rmaps, key = gfn_to_rmap(gfn, level, slot)
    return list(rmaps.heads.get(key, []))


def pte_list_add(rmaps: SlotRmaps, key: tuple[int, int], sptep: SptePtr) -> int:
    """Add an SPTE to an rmap head; returns how many SPTEs the head held before.

    kernel: arch/x86/kvm/mmu/mmu.c:pte_list_add (v6.18)
    """
    head = rmaps.heads.setdefault(key, [])
    count = len(head)
    head.append(sptep)
    return count


def pte_list_remove(kvm: Kvm, rmaps: SlotRmaps, key: tuple[int, int], sptep: SptePtr) -> None:
    """Remove an SPTE from an rmap head. Not finding it means the rmaps are corrupt: the
    kernel stops the VM (KVM_BUG_ON_DATA_CORRUPTION); the model records the WARN (X1).

    kernel: arch/x86/kvm/mmu/mmu.c:pte_list_remove (v6.18)
    """
    head = rmaps.heads.get(key)
    if kvm.warn_on(head is None or sptep not in head, "X1", f"{sptep} missing from its rmap"):
        return
    assert head is not None
    head.remove(sptep)
    if not head:
        del rmaps.heads[key]


def rmap_add(kvm: Kvm, slot: KvmMemorySlot, sptep: SptePtr, gfn: int, access: int) -> None:
    """Record a new leaf SPTE in the rmap of its gfn, at its page's level, and (indirect
    pages) what the guest PTE said, so the gfn can be found again when it is dropped.

    kernel: arch/x86/kvm/mmu/mmu.c:rmap_add, __rmap_add (v6.18)
    """
    sp = sptep.sp
    kvm_mmu_page_set_translation(sp, sptep.index, gfn, access)
    rmaps, key = gfn_to_rmap(gfn, sp.role.level, slot)
    pte_list_add(rmaps, key, sptep)


def rmap_remove(kvm: Kvm, sptep: SptePtr) -> None:
    """Take a leaf SPTE out of its rmap. The slot is looked up again from the gfn (the
    page's translation says which): the SPTE may outlive the lookup that created it, but
    never its slot, since deleting a slot zaps its SPTEs first (the INVALID copy is still
    found, and shares the rmaps).

    kernel: arch/x86/kvm/mmu/mmu.c:rmap_remove (v6.18)
    """
    sp = sptep.sp
    gfn = kvm_mmu_page_get_gfn(sp, sptep.index)
    slot = kvm.memslots(0).gfn_to_memslot(gfn)
    if kvm.warn_on(slot is None, "X1", f"{sptep} maps gfn {gfn:#x} outside every memslot"):
        return
    assert slot is not None
    rmaps, key = gfn_to_rmap(gfn, sp.role.level, slot)
    pte_list_remove(kvm, rmaps, key, sptep)


def slot_rmap_heads(slot: KvmMemorySlot, start: int, end: int) -> list[tuple[int, int, RmapHead]]:
    """(level, gfn, a copy of the head) for every non-empty rmap of ``slot`` that covers a
    gfn in [start, end), each level from 4K to the largest huge level. The kernel walks the
    arrays index by index (slot_rmap_walk_*); the model visits only non-empty heads, so a
    terabyte range costs what is mapped in it.

    kernel: arch/x86/kvm/mmu/mmu.c:for_each_slot_rmap_range, walk_slot_rmaps (v6.18)
    """
    rmaps = slot_rmaps(slot)
    start, end = max(start, slot.base_gfn), min(end, slot.end_gfn)
    if start >= end or not rmaps.heads:
        return []
    # The indexes the range covers at each level: looked up one by one when there are fewer
    # of them than non-empty heads (a notifier invalidating a page), else every head is
    # filtered (a whole-slot walk), so either way the cost is the smaller of the two.
    windows = []
    for level in range(PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL + 1):
        shift = (level - PG_LEVEL_4K) * PT64_LEVEL_BITS
        base = slot.base_gfn >> shift
        windows.append((level, shift, (start >> shift) - base, ((end - 1) >> shift) - base))
    span = sum(last - first + 1 for _level, _shift, first, last in windows)
    found = []
    if span < len(rmaps.heads):
        for level, shift, first, last in windows:
            for index in range(first, last + 1):
                head = rmaps.heads.get((level, index))
                if head:
                    first_gfn = ((slot.base_gfn >> shift) + index) << shift
                    found.append((level, max(first_gfn, slot.base_gfn), list(head)))
        return found
    for (level, index), head in sorted(rmaps.heads.items()):
        if level > KVM_MAX_HUGEPAGE_LEVEL or not head:
            continue
        shift = (level - PG_LEVEL_4K) * PT64_LEVEL_BITS
        first_gfn = ((slot.base_gfn >> shift) + index) << shift
        if first_gfn < end and first_gfn + (1 << shift) > start:
            found.append((level, max(first_gfn, slot.base_gfn), list(head)))
    return found
