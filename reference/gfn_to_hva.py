"""Translating between guest frame numbers and host virtual addresses through a memslot.

Every way KVM reaches guest memory starts here: a gfn is looked up in the active memslots and
turned into the VMM's host virtual address. Two error addresses carry the reason a
translation failed: KVM_HVA_ERR_BAD (no slot, or a slot being deleted or moved, so no new
reference may be created) and KVM_HVA_ERR_RO_BAD (a write to a READONLY slot, which the
architecture turns into an MMIO exit).

kernel: virt/kvm/kvm_main.c:__gfn_to_hva_many, gfn_to_hva_memslot_prot;
include/linux/kvm_host.h:__gfn_to_hva_memslot, hva_to_gfn_memslot, kvm_is_error_hva,
kvm_is_visible_memslot (v6.18)
"""

from __future__ import annotations

from kvmspec.reference.memslot import KvmMemorySlot

# Error hvas live at the start of the kernel's direct map, where no user address can be
# (x86-64 PAGE_OFFSET with 4-level paging). Any hva at or above it is an error.
PAGE_OFFSET = 0xFFFF_8880_0000_0000
KVM_HVA_ERR_BAD = PAGE_OFFSET
KVM_HVA_ERR_RO_BAD = PAGE_OFFSET + 4096


def kvm_is_error_hva(hva: int) -> bool:
    return hva >= PAGE_OFFSET


def kvm_is_visible_memslot(slot: KvmMemorySlot | None, user_mem_slots: int) -> bool:
    """A slot the guest may use: it exists, is a user slot, and is not being deleted or moved.

    kernel: include/linux/kvm_host.h:kvm_is_visible_memslot (v6.18)
    """
    return slot is not None and slot.id < user_mem_slots and not slot.invalid


def __gfn_to_hva_memslot(slot: KvmMemorySlot, gfn: int, page_shift: int) -> int:
    """The hva of ``gfn`` inside ``slot`` (the caller checked the gfn is in the slot)."""
    return slot.userspace_addr + ((gfn - slot.base_gfn) << page_shift)


def gfn_to_hva_many(
    slot: KvmMemorySlot | None, gfn: int, write: bool, page_shift: int
) -> tuple[int, int]:
    """(hva, pages left in the slot from ``gfn``), or an error hva and 0.

    An INVALID slot is found by lookups (so its references can be removed) but yields no
    hva: nothing new may map its pages (seed 000, M12).

    kernel: virt/kvm/kvm_main.c:__gfn_to_hva_many (v6.18)
    """
    if slot is None or slot.invalid:
        return KVM_HVA_ERR_BAD, 0
    if write and slot.readonly:
        return KVM_HVA_ERR_RO_BAD, 0
    return __gfn_to_hva_memslot(slot, gfn, page_shift), slot.end_gfn - gfn


def gfn_to_hva_memslot_prot(
    slot: KvmMemorySlot | None, gfn: int, page_shift: int
) -> tuple[int, bool]:
    """The hva for a read, and whether a write through it is allowed (False for READONLY).

    kernel: virt/kvm/kvm_main.c:gfn_to_hva_memslot_prot (v6.18)
    """
    hva, _pages = gfn_to_hva_many(slot, gfn, write=False, page_shift=page_shift)
    writable = slot is not None and not kvm_is_error_hva(hva) and not slot.readonly
    return hva, writable


def hva_to_gfn_memslot(hva: int, slot: KvmMemorySlot, page_shift: int) -> int:
    """The gfn that ``hva`` backs in ``slot`` (notifiers map host ranges back to gfns).

    kernel: include/linux/kvm_host.h:hva_to_gfn_memslot (v6.18)
    """
    return slot.base_gfn + ((hva - slot.userspace_addr) >> page_shift)
