"""arm64 stage-2 descriptors (INVENTORY D2): field round trips, output addresses with every
granule, and the geometry KVM derives from the IPA size (start level, concatenated PGD
pages, block levels)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.reference.arm64.descriptors import (
    GRANULE_SHIFTS,
    KVM_INVALID_PTE_LOCKED,
    KVM_MAX_OWNER_ID,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    KVM_PTE_VALID,
    Stage2Descriptor,
    decode_descriptor,
    encode_descriptor,
    kvm_phys_to_pte,
    kvm_pte_to_phys,
    kvm_stage2_geometry,
    stage2_pte_is_counted,
    stage2_pte_is_locked,
)


def test_bit_positions_are_those_of_the_inventory() -> None:
    assert KVM_PTE_VALID == 1 << 0
    assert KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R == 1 << 6
    assert KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W == 1 << 7
    assert KVM_PTE_LEAF_ATTR_LO_S2_AF == 1 << 10
    assert KVM_INVALID_PTE_LOCKED == 1 << 10
    assert KVM_MAX_OWNER_ID == 0xFF


@st.composite
def leaves(draw: st.DrawFn) -> tuple[Stage2Descriptor, int, int]:
    page_shift = draw(st.sampled_from(GRANULE_SHIFTS))
    level = draw(st.integers(min_value=1, max_value=3))
    pa_bits = 52 if page_shift == 16 else 48
    pfn = draw(st.integers(min_value=0, max_value=(1 << (pa_bits - page_shift)) - 1))
    desc = Stage2Descriptor(
        "page" if level == 3 else "block",
        output_address=pfn << page_shift,
        memattr=draw(st.integers(0, 15)),
        readable=draw(st.booleans()),
        writable=draw(st.booleans()),
        shareability=draw(st.integers(0, 3)),
        access_flag=draw(st.booleans()),
        dbm=draw(st.booleans()),
        xn=draw(st.integers(0, 3)),
        software=draw(st.integers(0, 15)),
    )
    return desc, level, page_shift


@given(leaves())
def test_leaf_fields_round_trip(case: tuple[Stage2Descriptor, int, int]) -> None:
    desc, level, page_shift = case
    pte = encode_descriptor(desc, level, page_shift)
    assert decode_descriptor(pte, level, page_shift) == desc
    assert stage2_pte_is_counted(pte)
    assert not stage2_pte_is_locked(pte)


@given(st.integers(0, KVM_MAX_OWNER_ID), st.booleans())
def test_invalid_descriptors_round_trip(owner_id: int, locked: bool) -> None:
    desc = Stage2Descriptor("invalid", owner_id=owner_id, locked=locked)
    pte = encode_descriptor(desc, 3, 12)
    assert decode_descriptor(pte, 3, 12) == desc
    assert not pte & KVM_PTE_VALID
    assert stage2_pte_is_locked(pte) == locked
    assert stage2_pte_is_counted(pte) == (owner_id != 0 or locked)


@given(st.sampled_from(GRANULE_SHIFTS), st.integers(0, 2), st.integers(0, (1 << 36) - 1))
def test_table_descriptors_round_trip(page_shift: int, level: int, pfn: int) -> None:
    pa = (pfn << page_shift) & ((1 << 48) - 1)
    desc = Stage2Descriptor("table", pa)
    assert decode_descriptor(encode_descriptor(desc, level, page_shift), level, page_shift) == desc


def test_a_table_descriptor_at_level_3_is_a_page() -> None:
    pte = encode_descriptor(Stage2Descriptor("table", 0x5000), 2, 12)
    assert decode_descriptor(pte, 3, 12).kind == "page"
    with pytest.raises(ValueError, match="is a page"):
        encode_descriptor(Stage2Descriptor("block", 0x5000), 3, 12)


def test_64k_granule_keeps_pa_bits_51_48_in_descriptor_bits_15_12() -> None:
    pa = (0xA << 48) | (0x1234 << 16)
    pte = kvm_phys_to_pte(pa, 16)
    assert (pte >> 12) & 0xF == 0xA
    assert kvm_pte_to_phys(pte, 16) == pa
    # With 4K pages those bits are output address bits, and bits 51:48 are not kept.
    assert kvm_pte_to_phys(kvm_phys_to_pte(pa, 12), 12) == pa & ((1 << 48) - 1)


@pytest.mark.parametrize(
    ("ia_bits", "page_shift", "start_level", "pgd_pages"),
    [
        (32, 12, 2, 4),
        (36, 12, 1, 1),
        (40, 12, 1, 2),  # the default 40-bit IPA: three levels, two concatenated pages
        (42, 12, 1, 8),
        (44, 12, 0, 1),
        (48, 12, 0, 1),
        (40, 14, 2, 16),
        (48, 14, 1, 2),
        (32, 16, 2, 1),  # 64K: one level would do, KVM uses at least two
        (40, 16, 2, 1),
        (43, 16, 2, 2),
        (52, 16, 1, 1),
    ],
)
def test_levels_per_ipa_size_and_granule(
    ia_bits: int, page_shift: int, start_level: int, pgd_pages: int
) -> None:
    geometry = kvm_stage2_geometry(ia_bits, page_shift)
    assert geometry.start_level == start_level
    assert geometry.kvm_pgd_pages() == pgd_pages


@given(st.sampled_from(GRANULE_SHIFTS), st.integers(32, 52))
def test_the_pgd_covers_the_ipa_space_with_at_most_16_pages(page_shift: int, ia_bits: int) -> None:
    if ia_bits > 48 and page_shift != 16:
        with pytest.raises(ValueError, match="IPA size"):
            kvm_stage2_geometry(ia_bits, page_shift)
        return
    geometry = kvm_stage2_geometry(ia_bits, page_shift)
    levels = 4 - geometry.start_level
    assert levels >= 2
    assert 1 <= geometry.kvm_pgd_pages() <= 16
    start_entries = 1 << max(ia_bits - geometry.kvm_granule_shift(geometry.start_level), 0)
    assert geometry.kvm_pgd_pages() * geometry.ptrs_per_pte >= start_entries
    assert (geometry.kvm_pgd_pages() - 1) * geometry.ptrs_per_pte < start_entries


@pytest.mark.parametrize(
    ("page_shift", "block_levels", "sizes"),
    [
        (12, [1, 2, 3], [1 << 30, 2 << 20, 4 << 10]),
        (14, [2, 3], [32 << 20, 16 << 10]),
        (16, [2, 3], [512 << 20, 64 << 10]),
    ],
)
def test_block_levels_per_granule(
    page_shift: int, block_levels: list[int], sizes: list[int]
) -> None:
    geometry = kvm_stage2_geometry(40, page_shift)
    supported = [lvl for lvl in range(4) if geometry.kvm_level_supports_block_mapping(lvl)]
    assert supported == block_levels
    assert [geometry.kvm_granule_size(lvl) for lvl in block_levels] == sizes
