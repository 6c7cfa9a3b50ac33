"""The x86 SPTE encoding: the layout facts of INVENTORY D1, make_spte in both formats, the
writability states and invariants X3/X4, access tracking, and MMIO SPTEs with their split
19-bit memslot generation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.reference.x86.mmio_spte import (
    MMIO_SPTE_GEN_HIGH_MASK,
    MMIO_SPTE_GEN_LOW_MASK,
    MMIO_SPTE_GEN_MASK,
    check_mmio_spte,
    generation_mmio_spte_mask,
    get_mmio_spte_access,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
    kvm_mmu_invalidate_mmio_sptes,
    make_mmio_spte,
)
from kvmspec.reference.x86.paging import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_NX_MASK,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
)
from kvmspec.reference.x86.spte import (
    EPT_MASKS,
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    LEGACY_MASKS_HERE,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMIO_ALLOWED_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    KvmMmuWarn,
    MadeSpte,
    SpteMasks,
    check_spte_change,
    check_spte_writable_invariants,
    is_access_allowed,
    is_access_track_spte,
    is_accessed_spte,
    is_executable_pte,
    is_frozen_spte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    kvm_mmu_reset_all_pte_masks,
    kvm_mmu_set_ept_masks,
    leaf_spte_change_needs_tlb_flush,
    make_nonleaf_spte,
    make_spte,
    mark_spte_for_access_track,
    restore_acc_track_spte,
    spte_ad_need_write_protect,
    spte_masks_for_profile,
    spte_to_pfn,
)
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, X86_64
from kvmspec.spec.uapi.constants import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS

LEGACY_MMIO = kvm_mmu_reset_all_pte_masks(48)
"""The legacy format with MMIO caching on (this machine has it off)."""
L1TF_MMIO = kvm_mmu_reset_all_pte_masks(46, l1tf_cache_bits=44)
EPT_NO_AD = kvm_mmu_set_ept_masks(
    kvm_mmu_reset_all_pte_masks(46), has_ad_bits=False, has_exec_only=False
)
ALL_MASKS = [LEGACY_MASKS_HERE, LEGACY_MMIO, L1TF_MMIO, EPT_MASKS, EPT_NO_AD]
PFN = 0x12345


def leaf(
    masks: SpteMasks,
    *,
    pfn: int = PFN,
    level: int = PG_LEVEL_4K,
    pte_access: int = ACC_ALL,
    host_writable: bool = True,
    prefetch: bool = False,
    old_spte: int = SHADOW_NONPRESENT_VALUE,
) -> MadeSpte:
    """make_spte as the fault path calls it for a fresh mapping."""
    return make_spte(
        masks,
        level=level,
        ad_disabled=not masks.ad_enabled,
        pte_access=pte_access,
        pfn=pfn,
        old_spte=old_spte,
        prefetch=prefetch,
        synchronizing=False,
        host_writable=host_writable,
    )


def bit(n: int) -> int:
    return 1 << n


# -- The layout (INVENTORY D1; the kernel's static_asserts) -------------------------------------


def test_software_bits_do_not_overlap_what_they_must_not() -> None:
    generation = MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK
    assert bit(11) == SPTE_MMU_PRESENT_MASK
    assert sum(bit(n) for n in range(3, 11)) == MMIO_SPTE_GEN_LOW_MASK
    assert sum(bit(n) for n in range(52, 63)) == MMIO_SPTE_GEN_HIGH_MASK
    assert not SPTE_MMIO_ALLOWED_MASK & (SPTE_MMU_PRESENT_MASK | generation)
    saved = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    assert saved == bit(54) | bit(56)
    assert not saved & SPTE_TDP_AD_MASK
    for ept_bit in (EPT_SPTE_HOST_WRITABLE, EPT_SPTE_MMU_WRITABLE):
        assert not ept_bit & (SPTE_TDP_AD_MASK | saved)
    assert (LEGACY_MASKS_HERE.host_writable_mask, LEGACY_MASKS_HERE.mmu_writable_mask) == (
        bit(9),
        bit(10),
    )


@pytest.mark.parametrize("masks", ALL_MASKS)
def test_empty_and_frozen_sptes_are_neither_present_nor_mmio(masks: SpteMasks) -> None:
    for spte in (SHADOW_NONPRESENT_VALUE, FROZEN_SPTE):
        assert not is_shadow_present_pte(spte)
        assert not is_mmio_spte(masks, spte)
    assert is_frozen_spte(FROZEN_SPTE) and not is_frozen_spte(SHADOW_NONPRESENT_VALUE)


def test_profiles_choose_the_format() -> None:
    assert spte_masks_for_profile(DEFAULT_PROFILE) is LEGACY_MASKS_HERE
    assert spte_masks_for_profile(X86_64) is EPT_MASKS
    with pytest.raises(ValueError):
        spte_masks_for_profile(ARM64)
    # This machine: legacy format, and MMIO caching off (no MMIO SPTE is ever recognised).
    assert not LEGACY_MASKS_HERE.ept and not LEGACY_MASKS_HERE.enable_mmio_caching
    assert not is_mmio_spte(LEGACY_MASKS_HERE, make_mmio_spte(LEGACY_MMIO, 0, 5, 0))
    # Without a reserved physical-address bit there is no legacy MMIO SPTE either.
    assert not kvm_mmu_reset_all_pte_masks(52).enable_mmio_caching


# -- make_spte ----------------------------------------------------------------------------------


def test_legacy_4k_writable_spte_bit_by_bit() -> None:
    made = leaf(LEGACY_MASKS_HERE)
    # bit 11 MMU-present, P, W, U, A (5), D (6), host-writable (9), MMU-writable (10), pfn;
    # no NX (exec allowed), no PS.
    expected = bit(11) | bit(0) | bit(1) | bit(2) | bit(5) | bit(6) | bit(9) | bit(10)
    assert made == MadeSpte(expected | PFN << 12, wrprot=False)


def test_legacy_huge_spte_and_the_nx_huge_page_mitigation() -> None:
    spte = leaf(LEGACY_MASKS_HERE, level=PG_LEVEL_2M).spte
    assert spte & PT_PAGE_SIZE_MASK and is_last_spte(spte, PG_LEVEL_2M)
    assert is_executable_pte(LEGACY_MASKS_HERE, spte)
    mitigated = make_spte(
        LEGACY_MASKS_HERE,
        level=PG_LEVEL_1G,
        ad_disabled=False,
        pte_access=ACC_ALL,
        pfn=PFN << 18,
        old_spte=SHADOW_NONPRESENT_VALUE,
        prefetch=False,
        synchronizing=False,
        host_writable=True,
        nx_huge_page_enabled=True,
    ).spte
    assert mitigated & PT64_NX_MASK and not is_executable_pte(LEGACY_MASKS_HERE, mitigated)


def test_rights_without_exec_or_user_and_read_only_hosts() -> None:
    spte = leaf(LEGACY_MASKS_HERE, pte_access=ACC_WRITE_MASK).spte
    assert spte & PT64_NX_MASK and not spte & ACC_USER_MASK
    readonly = leaf(LEGACY_MASKS_HERE, host_writable=False).spte
    assert not is_writable_pte(readonly) and not is_mmu_writable_spte(LEGACY_MASKS_HERE, readonly)
    assert not readonly & LEGACY_MASKS_HERE.host_writable_mask
    assert not readonly & LEGACY_MASKS_HERE.dirty_mask  # only writable SPTEs are born dirty


def test_a_shadowed_guest_page_table_keeps_the_spte_write_protected() -> None:
    calls: list[tuple[bool, bool]] = []

    def shadowed(*, synchronizing: bool, prefetch: bool) -> bool:
        calls.append((synchronizing, prefetch))
        return True

    made = make_spte(
        LEGACY_MASKS_HERE,
        level=PG_LEVEL_4K,
        ad_disabled=False,
        pte_access=ACC_ALL,
        pfn=PFN,
        old_spte=SHADOW_NONPRESENT_VALUE,
        prefetch=False,
        synchronizing=True,
        host_writable=True,
        mmu_try_to_unsync_pages=shadowed,
    )
    assert made.wrprot and calls == [(True, False)]
    # Host-writable, not MMU-writable, not writable: the "100" state of the D1 table.
    masks = LEGACY_MASKS_HERE
    assert made.spte & masks.host_writable_mask
    assert not is_mmu_writable_spte(masks, made.spte) and not is_writable_pte(made.spte)
    assert check_spte_writable_invariants(masks, made.spte) is None


def test_replacing_a_writable_leaf_does_not_ask_about_unsync() -> None:
    def must_not_be_called(*, synchronizing: bool, prefetch: bool) -> bool:
        raise AssertionError("mmu_try_to_unsync_pages called for a writable leaf")

    old = leaf(LEGACY_MASKS_HERE).spte
    made = make_spte(
        LEGACY_MASKS_HERE,
        level=PG_LEVEL_4K,
        ad_disabled=False,
        pte_access=ACC_ALL,
        pfn=PFN,
        old_spte=old,
        prefetch=False,
        synchronizing=False,
        host_writable=True,
        mmu_try_to_unsync_pages=must_not_be_called,
    )
    assert made == MadeSpte(old, wrprot=False)


def test_prefetched_sptes_are_born_old() -> None:
    masks = LEGACY_MASKS_HERE
    assert is_accessed_spte(masks, leaf(masks).spte)
    assert not is_accessed_spte(masks, leaf(masks, prefetch=True).spte)
    # Without A/D bits, "old" means access-tracked: no RWX at all until the next access.
    prefetched = leaf(EPT_NO_AD, prefetch=True).spte
    assert is_access_track_spte(EPT_NO_AD, prefetched)
    assert prefetched & SPTE_TDP_AD_MASK == SPTE_TDP_AD_DISABLED
    assert spte_ad_need_write_protect(prefetched)
    assert not spte_ad_need_write_protect(leaf(masks).spte)


def test_ept_spte_bits() -> None:
    spte = leaf(EPT_MASKS).spte
    # R (as ACC_USER), W, X, memory type WB (6 << 3) with IPAT (6), A (8), D (9), suppress-#VE
    # (63), bit 11, host-/MMU-writable (57, 58).
    expected = bit(0) | bit(1) | bit(2) | 6 << 3 | bit(6) | bit(8) | bit(9) | bit(11)
    expected |= bit(57) | bit(58) | bit(63)
    assert spte == expected | PFN << 12
    exec_only = leaf(EPT_MASKS, pte_access=ACC_EXEC_MASK).spte
    assert exec_only & 7 == 4  # exec-only: X without R
    assert is_access_allowed(EPT_MASKS, exec_only, write=False, fetch=True)
    assert not is_access_allowed(EPT_MASKS, exec_only, write=False, fetch=False)


def test_ept_spte_without_rights_is_a_warning() -> None:
    # With exec-only EPT, no rights would build the empty SPTE's pattern: the kernel WARNs.
    with pytest.raises(KvmMmuWarn):
        leaf(EPT_MASKS, pte_access=0)
    assert leaf(EPT_NO_AD, pte_access=0).spte & 7 == 1  # without exec-only, R is always set


@pytest.mark.parametrize("masks", [LEGACY_MASKS_HERE, EPT_MASKS])
def test_is_access_allowed(masks: SpteMasks) -> None:
    full = leaf(masks).spte
    for write, fetch in [(False, False), (True, False), (False, True)]:
        assert is_access_allowed(masks, full, write=write, fetch=fetch)
    readonly = leaf(masks, pte_access=ACC_USER_MASK).spte
    assert is_access_allowed(masks, readonly, write=False, fetch=False)
    assert not is_access_allowed(masks, readonly, write=True, fetch=False)
    assert not is_access_allowed(masks, readonly, write=False, fetch=True)


def test_nonleaf_spte_links_with_every_right() -> None:
    spte = make_nonleaf_spte(LEGACY_MASKS_HERE, 0x777, ad_disabled=False)
    assert is_shadow_present_pte(spte) and not is_last_spte(spte, PG_LEVEL_2M)
    assert spte_to_pfn(spte) == 0x777
    assert is_writable_pte(spte) and spte & ACC_USER_MASK and not spte & PT64_NX_MASK
    ept = make_nonleaf_spte(EPT_NO_AD, 0x777, ad_disabled=True)
    assert ept & SPTE_TDP_AD_MASK == SPTE_TDP_AD_DISABLED and not ept & EPT_NO_AD.accessed_mask


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        leaf(LEGACY_MASKS_HERE, level=4)
    with pytest.raises(KvmMmuWarn):  # a pfn beyond the host's 48 address bits
        leaf(LEGACY_MASKS_HERE, pfn=1 << 36)
    with pytest.raises(ValueError):
        leaf(LEGACY_MASKS_HERE, pte_access=8)
    with pytest.raises(ValueError):  # the legacy format always has A/D bits
        make_spte(
            LEGACY_MASKS_HERE,
            level=PG_LEVEL_4K,
            ad_disabled=True,
            pte_access=ACC_ALL,
            pfn=PFN,
            old_spte=0,
            prefetch=False,
            synchronizing=False,
            host_writable=True,
        )


@given(
    masks=st.sampled_from(ALL_MASKS),
    pfn=st.integers(0, (1 << 34) - 1),  # 46 address bits, the narrowest host here
    level=st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G]),
    pte_access=st.integers(0, ACC_ALL),
    host_writable=st.booleans(),
    prefetch=st.booleans(),
)
def test_made_sptes_round_trip_and_keep_x3(
    masks: SpteMasks, pfn: int, level: int, pte_access: int, host_writable: bool, prefetch: bool
) -> None:
    if masks is EPT_MASKS and not pte_access:
        return  # an exec-only EPT SPTE with no rights at all (test_ept_spte_without_rights)
    spte = leaf(
        masks,
        pfn=pfn,
        level=level,
        pte_access=pte_access,
        host_writable=host_writable,
        prefetch=prefetch,
    ).spte
    assert spte_to_pfn(spte) == pfn
    assert is_shadow_present_pte(spte) and is_last_spte(spte, level)
    assert not is_mmio_spte(masks, spte)
    assert check_spte_writable_invariants(masks, spte) is None
    may_write = bool(pte_access & ACC_WRITE_MASK and host_writable)
    assert is_mmu_writable_spte(masks, spte) == may_write
    # A prefetched SPTE without A/D bits is born access-tracked: not even W until touched.
    assert is_writable_pte(spte) == (may_write and not is_access_track_spte(masks, spte))
    aged = mark_spte_for_access_track(masks, spte)
    restored = restore_acc_track_spte(masks, aged)
    for value in (aged, restored):
        assert check_spte_change(masks, spte, value, level) is None
        assert spte_to_pfn(value) == pfn and is_shadow_present_pte(value)


# -- X3 and X4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", [LEGACY_MASKS_HERE, EPT_MASKS])
@pytest.mark.parametrize(
    ("host", "mmu", "w", "legal"),
    [
        (1, 1, 1, True),  # writable
        (1, 1, 0, True),  # write-protected for dirty logging: the fast path may set W
        (1, 0, 0, True),  # write-protected: the gfn is a shadowed guest page table
        (0, 0, 0, True),  # the host maps the page read-only
        (0, 1, 0, False),
        (0, 1, 1, False),
        (1, 0, 1, False),
        (0, 0, 1, False),
    ],
)
def test_x3_writability_states(masks: SpteMasks, host: int, mmu: int, w: int, legal: bool) -> None:
    spte = leaf(masks, pte_access=ACC_EXEC_MASK | ACC_USER_MASK, host_writable=False).spte
    spte |= host * masks.host_writable_mask | mmu * masks.mmu_writable_mask | w * PT_WRITABLE_MASK
    assert (check_spte_writable_invariants(masks, spte) is None) == legal


def test_x4_a_present_leaf_never_changes_pfn_in_place() -> None:
    masks = LEGACY_MASKS_HERE
    old = leaf(masks).spte
    moved = leaf(masks, pfn=PFN + 1).spte
    problem = check_spte_change(masks, old, moved, PG_LEVEL_4K)
    assert problem is not None and problem.startswith("X4")
    # Remapping the proper way: zap (non-present), then a new SPTE.
    assert check_spte_change(masks, old, SHADOW_NONPRESENT_VALUE, PG_LEVEL_4K) is None
    assert check_spte_change(masks, SHADOW_NONPRESENT_VALUE, moved, PG_LEVEL_4K) is None
    # Write-protecting, aging, and splitting a huge leaf into a link are changes in place.
    wrprot = old & ~(PT_WRITABLE_MASK | masks.mmu_writable_mask)
    assert check_spte_change(masks, old, wrprot, PG_LEVEL_4K) is None
    huge = leaf(masks, level=PG_LEVEL_2M).spte
    link = make_nonleaf_spte(masks, 0x999, ad_disabled=False)
    assert check_spte_change(masks, huge, link, PG_LEVEL_2M) is None


def test_x3_catches_bad_sptes_and_host_writable_flips() -> None:
    masks = LEGACY_MASKS_HERE
    old = leaf(masks).spte
    not_mmu_writable = old & ~masks.mmu_writable_mask
    problem = check_spte_change(masks, old, not_mmu_writable, PG_LEVEL_4K)
    assert problem is not None and problem.startswith("X3")
    readonly = leaf(masks, host_writable=False).spte
    became_host_writable = readonly | masks.host_writable_mask
    problem = check_spte_change(masks, readonly, became_host_writable, PG_LEVEL_4K)
    assert problem is not None and "Host-writable changed" in problem


def test_only_losing_mmu_writable_needs_an_immediate_flush() -> None:
    masks = LEGACY_MASKS_HERE
    old = leaf(masks).spte
    flush = leaf_spte_change_needs_tlb_flush
    assert flush(masks, old, old & ~(PT_WRITABLE_MASK | masks.mmu_writable_mask))
    assert not flush(masks, old, old & ~PT_WRITABLE_MASK)  # dirty logging: flushed later
    assert not flush(masks, old, old & ~(masks.accessed_mask | masks.dirty_mask))


# -- Access tracking ----------------------------------------------------------------------------


def test_access_tracking_saves_and_restores_r_and_x() -> None:
    masks = EPT_NO_AD
    spte = leaf(masks).spte
    assert spte & 7 == 7 and is_accessed_spte(masks, spte)
    aged = mark_spte_for_access_track(masks, spte)
    assert aged & 7 == 0 and not is_accessed_spte(masks, aged)
    assert (aged >> 54) & 1 and (aged >> 56) & 1 and not (aged >> 55) & 1  # R and X, not W
    assert is_access_track_spte(masks, aged) and is_shadow_present_pte(aged)
    assert is_mmu_writable_spte(masks, aged)  # the fast path may grant W again
    for write, fetch in [(False, False), (True, False), (False, True)]:
        assert not is_access_allowed(masks, aged, write=write, fetch=fetch)
    assert mark_spte_for_access_track(masks, aged) == aged
    restored = restore_acc_track_spte(masks, aged)
    assert restored == spte & ~(PT_WRITABLE_MASK | masks.accessed_mask)

    not_writable = leaf(masks, pte_access=ACC_EXEC_MASK).spte
    assert restore_acc_track_spte(masks, mark_spte_for_access_track(masks, not_writable)) == (
        not_writable & ~masks.accessed_mask
    )


def test_access_tracking_with_ad_bits_only_clears_accessed() -> None:
    for masks in (LEGACY_MASKS_HERE, EPT_MASKS):
        spte = leaf(masks).spte
        aged = mark_spte_for_access_track(masks, spte)
        assert aged == spte & ~masks.accessed_mask
        assert not is_access_track_spte(masks, aged)


def test_access_tracking_an_illegal_spte_is_a_warning() -> None:
    spte = leaf(EPT_NO_AD).spte & ~EPT_NO_AD.mmu_writable_mask  # W without MMU-writable
    with pytest.raises(KvmMmuWarn):
        mark_spte_for_access_track(EPT_NO_AD, spte)


# -- MMIO SPTEs ---------------------------------------------------------------------------------


def test_mmio_generation_is_split_across_the_spte() -> None:
    assert generation_mmio_spte_mask(1) == bit(3)
    assert generation_mmio_spte_mask(0x80) == bit(10)
    assert generation_mmio_spte_mask(0x100) == bit(52)
    assert generation_mmio_spte_mask(MMIO_SPTE_GEN_MASK) == (
        MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK
    )
    with pytest.raises(KvmMmuWarn):
        generation_mmio_spte_mask(MMIO_SPTE_GEN_MASK + 1)


def test_legacy_and_ept_mmio_sptes() -> None:
    write_user = ACC_WRITE_MASK | ACC_USER_MASK
    spte = make_mmio_spte(LEGACY_MMIO, 0, 0x42, ACC_ALL)
    # Reserved bit 51 with P: the hardware raises #PF with PFERR_RSVD; W|U are kept.
    assert spte == bit(51) | bit(0) | write_user | 0x42 << 12
    assert get_mmio_spte_access(LEGACY_MMIO, spte) == write_user
    ept = make_mmio_spte(EPT_MASKS, 0, 0x42, ACC_ALL)
    assert ept & 7 == 6 and get_mmio_spte_access(EPT_MASKS, ept) == 0  # W+X: misconfigured
    for masks, value in ((LEGACY_MMIO, spte), (EPT_MASKS, ept)):
        assert is_mmio_spte(masks, value) and not is_shadow_present_pte(value)


def test_l1tf_moves_the_high_gfn_bits() -> None:
    gfn = 1 << (39 - 12)  # address bit 39: the first one the mitigation sets (44 - 5)
    spte = make_mmio_spte(L1TF_MMIO, 0, gfn, 0)
    assert spte & sum(bit(n) for n in range(39, 44)) == sum(bit(n) for n in range(39, 44))
    assert spte & bit(44)  # bit 39 of the gpa, moved up by five
    assert get_mmio_spte_gfn(L1TF_MMIO, spte) == gfn


@given(
    masks=st.sampled_from([LEGACY_MMIO, L1TF_MMIO, EPT_MASKS]),
    generation=st.integers(0, (1 << 63) - 1),
    gfn=st.integers(0, (1 << 32) - 1),
    in_progress=st.booleans(),
)
def test_mmio_sptes_round_trip(
    masks: SpteMasks, generation: int, gfn: int, in_progress: bool
) -> None:
    memslot_generation = generation | (KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS if in_progress else 0)
    spte = make_mmio_spte(masks, memslot_generation, gfn, ACC_ALL)
    assert is_mmio_spte(masks, spte) and not is_shadow_present_pte(spte)
    assert get_mmio_spte_gfn(masks, spte) == gfn
    assert get_mmio_spte_generation(spte) == generation & MMIO_SPTE_GEN_MASK
    # Trusted only in its own generation, and never while an update is in progress.
    assert check_mmio_spte(generation, spte)
    assert not check_mmio_spte(generation | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, spte)
    assert not check_mmio_spte(generation + 1, spte)


def test_mmio_generation_wrap_forces_a_zap() -> None:
    spte = make_mmio_spte(LEGACY_MMIO, 5, 0x42, 0)
    # 2^19 generations later the SPTE matches again: that is why the wrap zaps everything.
    assert check_mmio_spte(5 + (1 << 19), spte)
    assert kvm_mmu_invalidate_mmio_sptes(1 << 19, 1)
    assert not kvm_mmu_invalidate_mmio_sptes((1 << 19) + 1, 1)
    assert not kvm_mmu_invalidate_mmio_sptes(3, 1)
    # With SMM, generations step by 2 and address space 1 has the odd ones.
    assert kvm_mmu_invalidate_mmio_sptes((1 << 19) + 1, 2)
    with pytest.raises(KvmMmuWarn):
        kvm_mmu_invalidate_mmio_sptes(KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS | 4, 1)
