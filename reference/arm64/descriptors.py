"""The arm64 stage-2 translation table format: granules, levels and descriptor bits.

A stage-2 table translates an intermediate physical address (IPA, the guest's physical
address) to a host physical address. Each table is one page of 64-bit descriptors; the
page size (the *granule*, 4K, 16K or 64K) fixes how many IPA bits one level resolves
(``page_shift - 3``) and so how many levels a given IPA size needs. The levels are numbered
0 to 3 from the root; level 3 holds pages, the levels above hold tables or blocks.

The bit positions are those of INVENTORY D2 and the kernel's kvm_pgtable.h (v6.18), in the
pre-LPA2 encoding (output address bits 47:12, plus bits 51:48 in descriptor bits 15:12 with
the 64K granule); LPA2's level -1 and 52-bit 4K/16K tables are not modelled.

kernel: arch/arm64/include/asm/kvm_pgtable.h; arch/arm64/include/asm/stage2_pgtable.h;
arch/arm64/kvm/hyp/pgtable.c:kvm_get_vtcr, kvm_pgd_pages (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag


def genmask(high: int, low: int) -> int:
    """Bits ``high`` down to ``low`` set (the kernel's GENMASK)."""
    return ((1 << (high - low + 1)) - 1) << low


def field_get(mask: int, value: int) -> int:
    """The field ``mask`` of ``value``, shifted down (FIELD_GET)."""
    return (value & mask) >> ((mask & -mask).bit_length() - 1)


def field_prep(mask: int, value: int) -> int:
    """``value`` placed in the field ``mask`` (FIELD_PREP)."""
    return (value << ((mask & -mask).bit_length() - 1)) & mask


# -- levels --------------------------------------------------------------------------------

KVM_PGTABLE_MAX_LEVELS = 4
KVM_PGTABLE_FIRST_LEVEL = 0
KVM_PGTABLE_LAST_LEVEL = 3

GRANULE_SHIFTS = (12, 14, 16)
"""The three translation granules: 4K, 16K and 64K pages."""

KVM_PHYS_SHIFT_MIN = 32
"""The smallest IPA size KVM configures (ARM64_MIN_PARANGE_BITS)."""


@dataclass(frozen=True, slots=True)
class Stage2Geometry:
    """The shape of one VM's stage-2 tables: granule, IPA size, and the level the walk
    starts at. ``kvm_stage2_geometry`` derives the start level the way KVM programs
    VTCR_EL2.SL0."""

    page_shift: int
    ia_bits: int
    start_level: int

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def ptrs_per_pte(self) -> int:
        """Descriptors per table page (PTRS_PER_PTE): a page of 8-byte entries."""
        return 1 << (self.page_shift - 3)

    @property
    def min_block_level(self) -> int:
        """KVM_PGTABLE_MIN_BLOCK_LEVEL: 1 GB blocks exist with 4K pages only; with 16K and
        64K the largest block KVM uses is at level 2 (32 MB and 512 MB)."""
        return 1 if self.page_shift == 12 else 2

    def kvm_granule_shift(self, level: int) -> int:
        """log2 of the IPA range one entry at ``level`` covers (ARM64_HW_PGTABLE_LEVEL_SHIFT).
        Defined for level -1 too: the shift just above the start level sizes the PGD."""
        return (self.page_shift - 3) * (KVM_PGTABLE_MAX_LEVELS - level) + 3

    def kvm_granule_size(self, level: int) -> int:
        return 1 << self.kvm_granule_shift(level)

    def kvm_level_supports_block_mapping(self, level: int) -> bool:
        """A leaf may sit at ``level`` (a block above level 3, a page at level 3)."""
        return level >= self.min_block_level

    def kvm_pgtable_idx(self, addr: int, level: int) -> int:
        """The index of ``addr``'s entry in its table at ``level``."""
        return (addr >> self.kvm_granule_shift(level)) & (self.ptrs_per_pte - 1)

    def kvm_pgd_page_idx(self, addr: int) -> int:
        """Which of the concatenated PGD pages holds ``addr``'s start-level entry."""
        mask = (1 << self.ia_bits) - 1
        return (addr & mask) >> self.kvm_granule_shift(self.start_level - 1)

    def kvm_pgd_pages(self) -> int:
        """How many pages the PGD concatenates: the start level may resolve up to four more
        bits than one page holds, so up to 16 pages (kvm_pgd_pages)."""
        return self.kvm_pgd_page_idx((1 << self.ia_bits) - 1) + 1


def stage2_pgtable_levels(ia_bits: int, page_shift: int) -> int:
    """Levels needed for ``ia_bits`` when the first level may concatenate 16 tables, so it
    resolves 4 bits more than a page (stage2_pgtable_levels: ARM64_HW_PGTABLE_LEVELS of
    ia_bits - 4)."""
    return (ia_bits - 4 - 4) // (page_shift - 3)


def kvm_stage2_geometry(ia_bits: int, page_shift: int) -> Stage2Geometry:
    """The stage-2 shape KVM configures for an IPA size: at least two levels, so a host PMD
    huge page never has to be split at stage 2 (kvm_get_vtcr), starting at level
    ``4 - levels``.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_get_vtcr, kvm_pgtable_stage2_init (v6.18)
    """
    if page_shift not in GRANULE_SHIFTS:
        raise ValueError(f"no {1 << page_shift}-byte translation granule")
    max_bits = 52 if page_shift == 16 else 48
    if not KVM_PHYS_SHIFT_MIN <= ia_bits <= max_bits:
        raise ValueError(f"IPA size {ia_bits} outside {KVM_PHYS_SHIFT_MIN}..{max_bits}")
    levels = max(stage2_pgtable_levels(ia_bits, page_shift), 2)
    return Stage2Geometry(page_shift, ia_bits, KVM_PGTABLE_MAX_LEVELS - levels)


# -- descriptor bits -----------------------------------------------------------------------

KVM_PTE_VALID = 1 << 0
KVM_PTE_TYPE = 1 << 1
KVM_PTE_TYPE_BLOCK = 0
KVM_PTE_TYPE_PAGE = 1
KVM_PTE_TYPE_TABLE = 1

KVM_PTE_ADDR_51_48 = genmask(15, 12)
"""Output address bits 51:48 with the 64K granule and 52-bit physical addresses."""

KVM_PTE_LEAF_ATTR_LO = genmask(11, 2)
KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR = genmask(5, 2)
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R = 1 << 6
KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W = 1 << 7
KVM_PTE_LEAF_ATTR_LO_S2_SH = genmask(9, 8)
KVM_PTE_LEAF_ATTR_LO_S2_SH_IS = 3
KVM_PTE_LEAF_ATTR_LO_S2_AF = 1 << 10

KVM_PTE_LEAF_ATTR_HI = genmask(63, 50)
KVM_PTE_LEAF_ATTR_HI_SW = genmask(58, 55)
KVM_PTE_LEAF_ATTR_HI_S2_XN = genmask(54, 53)
KVM_PTE_LEAF_ATTR_HI_S2_XN_PXN = 1
KVM_PTE_LEAF_ATTR_HI_S2_XN_XN = 2
KVM_PTE_LEAF_ATTR_HI_S2_XN_UXN = 3

KVM_PTE_LEAF_ATTR_S2_DBM = 1 << 51
"""Dirty Bit Modifier (Arm ARM, stage-2 block and page descriptors): with VTCR_EL2.HD the
hardware records a write by setting S2AP[1] (W) instead of taking a permission fault, so a
DBM descriptor with W clear is "writable-clean" and with W set "writable-dirty". KVM v6.18
does not enable HD; the model offers it (``Stage2Features.hd``) because seed 001's aging must
not lose such an update."""

KVM_PTE_LEAF_ATTR_S2_PERMS = (
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W | KVM_PTE_LEAF_ATTR_HI_S2_XN
)

KVM_INVALID_PTE_OWNER_MASK = genmask(9, 2)
KVM_MAX_OWNER_ID = field_get(KVM_INVALID_PTE_OWNER_MASK, KVM_INVALID_PTE_OWNER_MASK)

KVM_INVALID_PTE_LOCKED = 1 << 10
"""An invalid descriptor with this bit is locked by a walker in the middle of
break-before-make: only that walker may write it (stage2_try_break_pte)."""

# Stage-2 memory types (MemAttr, bits 5:2), without and with FEAT_S2FWB.
MT_S2_NORMAL = 0xF
MT_S2_NORMAL_NC = 0x5
MT_S2_DEVICE_nGnRE = 0x1
MT_S2_FWB_NORMAL = 0x6
MT_S2_FWB_NORMAL_NC = 0x5
MT_S2_FWB_DEVICE_nGnRE = 0x1


class KvmPgtableProt(IntFlag):
    """enum kvm_pgtable_prot: what the caller asks a mapping to allow. The software bits are
    the descriptor's own bits 58:55, so they can be copied across unchanged."""

    X = 1 << 0
    W = 1 << 1
    R = 1 << 2
    DEVICE = 1 << 3
    NORMAL_NC = 1 << 4
    SW0 = 1 << 55
    SW1 = 1 << 56
    SW2 = 1 << 57
    SW3 = 1 << 58


KVM_PGTABLE_PROT_RW = KvmPgtableProt.R | KvmPgtableProt.W
KVM_PGTABLE_PROT_RWX = KVM_PGTABLE_PROT_RW | KvmPgtableProt.X


def kvm_s2_memattr(memtype: str, fwb: bool) -> int:
    """PAGE_S2_MEMATTR: the MemAttr field for ``memtype`` (NORMAL, NORMAL_NC or
    DEVICE_nGnRE); FEAT_S2FWB changes the encodings so stage 2 can force write-back."""
    table = {
        "NORMAL": (MT_S2_NORMAL, MT_S2_FWB_NORMAL),
        "NORMAL_NC": (MT_S2_NORMAL_NC, MT_S2_FWB_NORMAL_NC),
        "DEVICE_nGnRE": (MT_S2_DEVICE_nGnRE, MT_S2_FWB_DEVICE_nGnRE),
    }
    return field_prep(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, table[memtype][1 if fwb else 0])


_ADDR_MASKS = {shift: genmask(47, shift) for shift in (12, 14, 16)}


def kvm_pte_addr_mask(page_shift: int) -> int:
    """KVM_PTE_ADDR_MASK: output address bits 47 down to the granule (4K, 16K or 64K;
    computed once, since every walk asks)."""
    return _ADDR_MASKS[page_shift]


def kvm_phys_to_pte(pa: int, page_shift: int) -> int:
    """The output-address bits of a descriptor pointing at ``pa``."""
    pte = pa & kvm_pte_addr_mask(page_shift)
    if page_shift == 16:
        pte |= field_prep(KVM_PTE_ADDR_51_48, (pa & genmask(51, 48)) >> 48)
    return pte


def kvm_pte_to_phys(pte: int, page_shift: int) -> int:
    """The output address of a descriptor."""
    pa = pte & kvm_pte_addr_mask(page_shift)
    if page_shift == 16:
        pa |= field_get(KVM_PTE_ADDR_51_48, pte) << 48
    return pa


def kvm_pte_valid(pte: int) -> bool:
    return bool(pte & KVM_PTE_VALID)


def kvm_pte_table(pte: int, level: int) -> bool:
    """A valid descriptor pointing at a next-level table: type 1 above the last level (at
    level 3 type 1 means a page)."""
    if level == KVM_PGTABLE_LAST_LEVEL or not kvm_pte_valid(pte):
        return False
    return field_get(KVM_PTE_TYPE, pte) == KVM_PTE_TYPE_TABLE


def kvm_init_table_pte(child_pa: int, page_shift: int) -> int:
    """A table descriptor for the table page at ``child_pa``."""
    return (
        kvm_phys_to_pte(child_pa, page_shift)
        | field_prep(KVM_PTE_TYPE, KVM_PTE_TYPE_TABLE)
        | KVM_PTE_VALID
    )


def kvm_init_valid_leaf_pte(pa: int, attr: int, level: int, page_shift: int) -> int:
    """A block (levels 1-2) or page (level 3) descriptor mapping ``pa`` with the leaf
    attributes of ``attr``."""
    kind = KVM_PTE_TYPE_PAGE if level == KVM_PGTABLE_LAST_LEVEL else KVM_PTE_TYPE_BLOCK
    pte = kvm_phys_to_pte(pa, page_shift)
    pte |= attr & (KVM_PTE_LEAF_ATTR_LO | KVM_PTE_LEAF_ATTR_HI)
    pte |= field_prep(KVM_PTE_TYPE, kind)
    return pte | KVM_PTE_VALID


def kvm_init_invalid_leaf_owner(owner_id: int) -> int:
    """An invalid descriptor that records which entity owns the page (pKVM's host stage 2:
    owner 0 is the table's owner, so a zero descriptor means "not annotated")."""
    if not 0 <= owner_id <= KVM_MAX_OWNER_ID:
        raise ValueError(f"owner id {owner_id} does not fit KVM_INVALID_PTE_OWNER_MASK")
    return field_prep(KVM_INVALID_PTE_OWNER_MASK, owner_id)


def stage2_pte_is_counted(pte: int) -> bool:
    """Does this entry hold a reference on its table page? Valid entries do, and so do
    invalid ones carrying an owner annotation: any nonzero value (stage2_pte_is_counted).
    A LOCKED entry is the exception in practice, because the walker that locked it dropped
    the old entry's reference and takes the new one's only when it writes it."""
    return pte != 0


def stage2_pte_is_locked(pte: int) -> bool:
    """Is a break-before-make in progress on this entry?"""
    return not kvm_pte_valid(pte) and bool(pte & KVM_INVALID_PTE_LOCKED)


# -- a decoded view, for reading and for round-trip tests -----------------------------------


@dataclass(frozen=True, slots=True)
class Stage2Descriptor:
    """Every field of a stage-2 descriptor at a known level. ``kind`` is ``table``,
    ``block``, ``page`` or ``invalid``; the leaf fields are meaningful for blocks and pages,
    ``owner_id`` and ``locked`` for invalid descriptors."""

    kind: str
    output_address: int = 0
    memattr: int = 0
    readable: bool = False
    writable: bool = False
    shareability: int = 0
    access_flag: bool = False
    dbm: bool = False
    xn: int = 0
    software: int = 0
    owner_id: int = 0
    locked: bool = False


def decode_descriptor(pte: int, level: int, page_shift: int) -> Stage2Descriptor:
    """Split a descriptor into its fields."""
    if not kvm_pte_valid(pte):
        return Stage2Descriptor(
            "invalid",
            owner_id=field_get(KVM_INVALID_PTE_OWNER_MASK, pte),
            locked=bool(pte & KVM_INVALID_PTE_LOCKED),
        )
    if kvm_pte_table(pte, level):
        return Stage2Descriptor("table", kvm_pte_to_phys(pte, page_shift))
    return Stage2Descriptor(
        "page" if level == KVM_PGTABLE_LAST_LEVEL else "block",
        output_address=kvm_pte_to_phys(pte, page_shift),
        memattr=field_get(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, pte),
        readable=bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R),
        writable=bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W),
        shareability=field_get(KVM_PTE_LEAF_ATTR_LO_S2_SH, pte),
        access_flag=bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_AF),
        dbm=bool(pte & KVM_PTE_LEAF_ATTR_S2_DBM),
        xn=field_get(KVM_PTE_LEAF_ATTR_HI_S2_XN, pte),
        software=field_get(KVM_PTE_LEAF_ATTR_HI_SW, pte),
    )


def encode_descriptor(desc: Stage2Descriptor, level: int, page_shift: int) -> int:
    """The descriptor with these fields (the inverse of :func:`decode_descriptor`)."""
    if desc.kind == "invalid":
        pte = kvm_init_invalid_leaf_owner(desc.owner_id)
        return pte | (KVM_INVALID_PTE_LOCKED if desc.locked else 0)
    if desc.kind == "table":
        return kvm_init_table_pte(desc.output_address, page_shift)
    expected = "page" if level == KVM_PGTABLE_LAST_LEVEL else "block"
    if desc.kind != expected:
        raise ValueError(f"a leaf at level {level} is a {expected}, not a {desc.kind}")
    attr = field_prep(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, desc.memattr)
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R if desc.readable else 0
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W if desc.writable else 0
    attr |= field_prep(KVM_PTE_LEAF_ATTR_LO_S2_SH, desc.shareability)
    attr |= KVM_PTE_LEAF_ATTR_LO_S2_AF if desc.access_flag else 0
    attr |= KVM_PTE_LEAF_ATTR_S2_DBM if desc.dbm else 0
    attr |= field_prep(KVM_PTE_LEAF_ATTR_HI_S2_XN, desc.xn)
    attr |= field_prep(KVM_PTE_LEAF_ATTR_HI_SW, desc.software)
    return kvm_init_valid_leaf_pte(desc.output_address, attr, level, page_shift)
