"""The hardware's 64-bit paging entry: its bits, the levels, and the index arithmetic.

x86-64 paging translates an address through up to five tables of 512 eight-byte entries; each
level consumes 9 bits of the address above the 12-bit page offset. Guest page tables and
KVM's shadow page tables (in the legacy format) use the same entry layout, so both
:mod:`~kvmspec.reference.x86.guest_walk` and :mod:`~kvmspec.reference.x86.spte` take their
bits from here. ``ACC_*`` is KVM's own encoding of access rights; ``PFERR_*`` are the bits of
the hardware's page-fault error code, the form in which KVM also describes an access.

kernel: arch/x86/kvm/mmu.h (PT_* masks, rsvd_bits); arch/x86/kvm/mmu/mmu_internal.h
(__PT_LEVEL_SHIFT, __PT_INDEX, __PT_LVL_ADDR_MASK); arch/x86/kvm/mmu/spte.h (ACC_*);
arch/x86/include/asm/kvm_host.h (PFERR_*) (v6.18)
"""

from __future__ import annotations

from kvmspec.spec.uapi.constants import PAGE_SHIFT

# -- Bits of a paging entry (identical in guest PTEs and legacy-format SPTEs) ---------------

PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_SHIFT = 1
PT_WRITABLE_MASK = 1 << PT_WRITABLE_SHIFT
PT_USER_SHIFT = 2
PT_USER_MASK = 1 << PT_USER_SHIFT
PT_ACCESSED_SHIFT = 5
PT_ACCESSED_MASK = 1 << PT_ACCESSED_SHIFT
PT_DIRTY_SHIFT = 6
PT_DIRTY_MASK = 1 << PT_DIRTY_SHIFT
PT_PAGE_SIZE_SHIFT = 7
PT_PAGE_SIZE_MASK = 1 << PT_PAGE_SIZE_SHIFT
"""PS: the entry maps a 2 MiB (level 2) or 1 GiB (level 3) page instead of a table."""
PT64_NX_SHIFT = 63
PT64_NX_MASK = 1 << PT64_NX_SHIFT
"""XD: no instruction fetch through this entry (only when EFER.NXE is set)."""

# -- Levels ---------------------------------------------------------------------------------

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PT64_ROOT_4LEVEL = 4
PT64_ROOT_5LEVEL = 5
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G

PT64_LEVEL_BITS = 9
PT64_ENT_PER_PAGE = 1 << PT64_LEVEL_BITS

PT64_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
"""Bits 51:12, where an entry keeps the physical address it points to. x86-64 physical
addresses have at most 52 bits; bits above MAXPHYADDR are reserved (see guest_walk)."""

# -- KVM's access rights (spte.h) -----------------------------------------------------------
# ACC_WRITE and ACC_USER are the W and U bit positions, so they can be copied from an entry;
# ACC_EXEC takes bit 0 (P), which is always set in a present entry and so free to reuse.

ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = PT_USER_MASK
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# -- The page-fault error code (#PF, and what KVM passes around as "access") ----------------

PFERR_PRESENT_MASK = 1 << 0
"""The fault was a protection violation on a present entry (clear: not present)."""
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
"""A reserved bit was set in an entry of the walk."""
PFERR_FETCH_MASK = 1 << 4


def rsvd_bits(start: int, end: int) -> int:
    """A mask of bits ``start`` to ``end`` inclusive (empty when end < start).

    kernel: arch/x86/kvm/mmu.h:rsvd_bits (v6.18)
    """
    if end < start:
        return 0
    return ((2 << (end - start)) - 1) << start


def pt_level_shift(level: int) -> int:
    """The address bit where the index into a level-``level`` table starts (12, 21, 30...).

    kernel: arch/x86/kvm/mmu/mmu_internal.h:__PT_LEVEL_SHIFT (v6.18)
    """
    return PAGE_SHIFT + (level - 1) * PT64_LEVEL_BITS


def pt_index(address: int, level: int) -> int:
    """Which of the 512 entries of a level-``level`` table translates ``address``.

    kernel: arch/x86/kvm/mmu/mmu_internal.h:__PT_INDEX (v6.18)
    """
    return (address >> pt_level_shift(level)) & (PT64_ENT_PER_PAGE - 1)


def pt_lvl_addr_mask(level: int) -> int:
    """The address bits of a leaf at ``level``: bits 51:12 without the ones the page
    covers (a 2 MiB leaf keeps bits 51:21).

    kernel: arch/x86/kvm/mmu/mmu_internal.h:__PT_LVL_ADDR_MASK (v6.18)
    """
    return PT64_BASE_ADDR_MASK & ~((1 << pt_level_shift(level)) - 1)


def pt_lvl_offset_mask(level: int) -> int:
    """The address bits above the 4 KiB offset that select a 4 KiB page inside a leaf at
    ``level`` (bits 20:12 for a 2 MiB leaf, none for a 4 KiB one).

    kernel: arch/x86/kvm/mmu/mmu_internal.h:__PT_LVL_OFFSET_MASK (v6.18)
    """
    return PT64_BASE_ADDR_MASK & ((1 << pt_level_shift(level)) - 1)
