"""POWER HPT encodings: page sizes, protections, cacheability, the guest's view of an entry
(P4: software bits never leak), and the hash that places an entry in its group."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    KvmHptInfo,
    Segment,
    hpt_hash,
    hpte_encode_v,
    kvmppc_allocate_hpt,
)
from kvmspec.reference.ppc.hpte import (
    HPTE_GR_RESERVED,
    HPTE_R_C,
    HPTE_R_G,
    HPTE_R_I,
    HPTE_R_M,
    HPTE_R_R,
    HPTE_R_W,
    HPTE_V_ABSENT,
    HPTE_V_HVLOCK,
    HPTE_V_LARGE,
    HPTE_V_SECONDARY,
    HPTE_V_SOFTWARE,
    HPTE_V_VALID,
    KEY_MMIO,
    PP_RWRW,
    PP_RWRX,
    PP_RWXX,
    PP_RXRX,
    PP_RXXX,
    hpte_cache_flags_ok,
    hpte_guest_view,
    hpte_is_writable,
    hpte_make_readonly,
    is_mmio_hpte,
    kvmppc_actual_pgsz,
    kvmppc_hpte_page_shifts,
)

LP_64K = 1 << 12


@pytest.mark.parametrize(
    ("v", "r", "shifts"),
    [
        (0, 0, (12, 12)),
        (HPTE_V_LARGE, 0, (24, 24)),
        (HPTE_V_LARGE, LP_64K, (16, 16)),
        (HPTE_V_LARGE, 3 << 12, (34, 34)),
        (HPTE_V_LARGE, 7 << 12, (12, 16)),
        (HPTE_V_LARGE, 8 << 12, (16, 24)),
        (HPTE_V_LARGE, 8 << 12 | 3 << 16, (12, 24)),
        (HPTE_V_LARGE, 2 << 12, (0, 0)),
        (HPTE_V_LARGE, 1 << 16, (0, 0)),
    ],
)
def test_page_size_encodings(v: int, r: int, shifts: tuple[int, int]) -> None:
    assert kvmppc_hpte_page_shifts(v, r) == shifts
    assert kvmppc_actual_pgsz(v, r) == (1 << shifts[1] if shifts[1] else 0)


@pytest.mark.parametrize(
    ("pp", "writable", "readonly"),
    [
        (PP_RWXX, True, PP_RXXX),
        (PP_RWRX, True, PP_RWRX | PP_RXRX),
        (PP_RWRW, True, PP_RXRX),
        (PP_RXRX, False, PP_RXRX),
        (PP_RXXX, False, PP_RXXX),
    ],
)
def test_protections_and_make_readonly(pp: int, writable: bool, readonly: int) -> None:
    assert hpte_is_writable(pp) is writable
    assert hpte_make_readonly(pp) == readonly
    assert not hpte_is_writable(hpte_make_readonly(pp))


@pytest.mark.parametrize(
    ("wimg", "is_ci", "ok"),
    [
        (HPTE_R_M, False, True),
        (HPTE_R_W | HPTE_R_I | HPTE_R_M, False, True),  # SAO counts as M
        (HPTE_R_I | HPTE_R_G, False, False),
        (HPTE_R_I | HPTE_R_G, True, True),
        (HPTE_R_M, True, False),
        (HPTE_R_W | HPTE_R_I, True, False),
    ],
)
def test_cache_flags(wimg: int, is_ci: bool, ok: bool) -> None:
    assert hpte_cache_flags_ok(wimg, is_ci) is ok


words = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(v=words, r=words, guest_rpte=words)
def test_the_guest_view_never_shows_software_bits(v: int, r: int, guest_rpte: int) -> None:
    """P4: whatever the table holds, H_READ shows neither HVLOCK nor ABSENT, and a used
    entry's "r" is the guest's own (no host address, no reserved bit)."""
    view_v, view_r = hpte_guest_view(v, r, guest_rpte)
    assert not view_v & HPTE_V_SOFTWARE
    if v & (HPTE_V_VALID | HPTE_V_ABSENT):
        assert view_v & HPTE_V_VALID
        assert view_r == (guest_rpte | r & (HPTE_R_R | HPTE_R_C)) & ~HPTE_GR_RESERVED


def test_an_absent_mmio_entry_reads_as_the_guest_wrote_it() -> None:
    assert is_mmio_hpte(HPTE_V_ABSENT | 0x80, KEY_MMIO)
    assert not is_mmio_hpte(HPTE_V_VALID, KEY_MMIO)
    assert hpte_guest_view(HPTE_V_ABSENT | HPTE_V_HVLOCK | 0x80, KEY_MMIO | 0x5000, 0x5000) == (
        HPTE_V_VALID | 0x80,
        0x5000,
    )


def test_table_sizes() -> None:
    assert kvmppc_allocate_hpt(17)[1] is None
    assert kvmppc_allocate_hpt(47)[1] is None
    errno, hpt = kvmppc_allocate_hpt(24)
    assert errno == 0 and hpt is not None
    assert hpt.npte == 1 << 20 and hpt.mask == (1 << 17) - 1
    assert hpt.hptes == {}  # nothing is sized by the table until entries are written


@pytest.mark.parametrize(
    "segment",
    [Segment(0x123), Segment(0x4567, segment_1t=True), Segment(0x89, base_shift=16)],
)
def test_hash_groups_and_search_key(segment: Segment) -> None:
    hpt = KvmHptInfo(18)
    ea = 0x0ABC_0000 & segment.somask  # page aligned for every base size here
    primary = hpt_hash(hpt, segment, ea)
    assert 0 <= primary <= hpt.mask
    # Addresses in the same page share the group; the next page (usually) moves.
    assert hpt_hash(hpt, segment, ea + (1 << segment.base_shift) - 1) == primary
    v = hpte_encode_v(segment, ea)
    assert not v & (HPTE_V_VALID | HPTE_V_SECONDARY | HPTE_V_SOFTWARE)
    assert bool(v & HPTE_V_LARGE) == (segment.base_shift > 12)
    assert primary * HPTES_PER_GROUP < hpt.npte
