"""The model's pure arithmetic, stated as contracts CrossHair can explore (``make crosshair``).

Three rules of the reference are arithmetic a fuzzer rarely reaches the edges of: the dirty
ring's u32 indexes (which wrap only after 2^32 pushes), the hashed page table's hash and its
inverse in the resize code (tables of 2^18 to 2^46 bytes), and the stage-2 level arithmetic
(three granules, every IPA size). Each function here drives the model's own functions with
plain integers and booleans, which CrossHair turns into symbolic values, and states the rule
as PEP 316 postconditions (spec/dbc.py). Nothing here re-implements the model: the bodies
only call it, so a mistake in the model breaks a postcondition. (The uAPI decisions keep
their entries beside them: ``memslot_rules.decide_for_crosshair`` and
``dirty_log_rules.clear_dirty_log_for_crosshair``.)

The model's modules are used through their module objects (``hpt.hpt_hash``), so a test that
plants a wrong version of one of them in the module is seen here too (tests/test_crosshair.py).

kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_push, kvm_dirty_ring_reset;
arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hv_find_lock_hpte;
arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_rehash_hpte;
arch/arm64/kvm/hyp/pgtable.c:kvm_get_vtcr, kvm_pgd_pages, kvm_pgtable_idx (v6.18)
"""

from __future__ import annotations

from typing import NamedTuple

from kvmspec.reference import dirty_ring
from kvmspec.reference.arm64 import descriptors
from kvmspec.reference.ppc import hpt, hpte, resize
from kvmspec.spec.dbc import checked
from kvmspec.spec.uapi.constants import KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_RING_RSVD_ENTRIES

# -- the dirty ring (D7, D9) ----------------------------------------------------------------


class RingAfterReset(NamedTuple):
    """What a ring looks like after KVM_RESET_DIRTY_RINGS: how many entries it consumed and
    their offsets (in the order it consumed them), both indexes, how many entries are still
    in use and the places they sit at, and the places that hold an entry at all."""

    reset: int
    offsets: tuple[int, ...]
    dirty_index: int
    reset_index: int
    used: int
    places: tuple[int, ...]
    stored: tuple[int, ...]


@checked
def dirty_ring_reset_for_crosshair(
    entries_shift: int, start: int, pushes: int, harvested: int
) -> RingAfterReset:
    """A ring of 2^entries_shift entries whose two indexes stand at ``start`` (a ring that
    has been filled and reset that many times already, near the u32 wrap or not) gets
    ``pushes`` dirty pages, at offsets 0, 1, ...; userspace flags RESET on the entries whose
    bit is set in ``harvested`` (bit n: the n-th pushed), in whatever order it likes; then
    KVM_RESET_DIRTY_RINGS.

    The reset consumes exactly the harvested entries at the front of the ring, in ring
    order, and stops at the first one userspace has not flagged (D9); the indexes advance by
    what was pushed and what was consumed, modulo 2^32, and the ring holds an entry exactly
    at the places of those in use, all inside the ring (D7). The number of pushes is kept
    small: each is a path for CrossHair.

    pre: 8 <= entries_shift <= 16
    pre: 0 <= start <= 0xFFFFFFFF
    pre: 0 <= pushes <= 3
    pre: 0 <= harvested < 2**pushes
    post: harvested % 2**__return__.reset == 2**__return__.reset - 1
    post: harvested >> __return__.reset & 1 == 0
    post: __return__.offsets == tuple(range(__return__.reset))
    post: __return__.dirty_index == (start + pushes) % 2**32
    post: __return__.reset_index == (start + __return__.reset) % 2**32
    post: __return__.used == pushes - __return__.reset
    post: sorted(__return__.places) == list(__return__.stored)
    post: min(__return__.stored, default=0) >= 0
    post: max(__return__.stored, default=0) < 2**entries_shift
    """
    size = 1 << entries_shift
    ring = dirty_ring.KvmDirtyRing(size, KVM_DIRTY_RING_RSVD_ENTRIES)
    ring.dirty_index = ring.reset_index = start
    for offset in range(pushes):
        ring.push(0, offset)
    # Userspace writes the RESET flags straight into the ring it mmap()ed.
    for n, place in enumerate(ring.places_in_use()):
        if harvested >> n & 1:
            ring.entries[place].flags |= KVM_DIRTY_GFN_F_RESET
    consumed = ring.reset()
    return RingAfterReset(
        reset=len(consumed),
        offsets=tuple(entry.offset for entry in consumed),
        dirty_index=ring.dirty_index,
        reset_index=ring.reset_index,
        used=ring.used(),
        places=tuple(ring.places_in_use()),
        stored=tuple(sorted(ring.entries)),
    )


# -- the hashed page table ------------------------------------------------------------------

_LP_OF_BASE_SHIFT = {12: 0, 16: 1 << hpte.LP_SHIFT, 24: 0, 34: 3 << hpte.LP_SHIFT}
"""An "r" word whose LP field encodes a page of each base size (kvmppc_hpte_page_shifts)."""


class HptPlacement(NamedTuple):
    """Where an address's entry goes: its primary and secondary groups, the index of the
    entry, and where the resize code sends that entry in a table of the same order and in
    one of another order, next to the group the hash gives in that other table."""

    primary: int
    secondary: int
    hpte_index: int
    rehashed_same_order: int
    rehashed: int
    group_in_new_table: int


@checked
def hpt_placement_for_crosshair(
    order: int,
    new_order: int,
    vsid: int,
    segment_1t: bool,
    base_shift: int,
    ea: int,
    use_secondary: bool,
    slot: int,
) -> HptPlacement:
    """The entry for effective address ``ea`` in a segment (``vsid``, 256 MiB or 1 TiB,
    pages of 2^base_shift), placed in slot ``slot`` of its primary or secondary group in a
    table of 2^order bytes; then the resize code's view of the same entry.

    The groups are inside the table, distinct, and each other's complement under the hash
    mask. The resize code recovers the hash from the entry's AVPN and the group it sits in
    (the entry does not store its address): rehashing into a table of the same order gives
    the entry back its own place, and into a table of ``new_order`` puts it in the group the
    hash of its address gives there (the secondary one if it was secondary), at the same
    slot. A VSID has up to 50 bits (38 in a 1 TiB segment): what the AVPN field holds.

    pre: hpt.PPC_MIN_HPT_ORDER <= order <= hpt.PPC_MAX_HPT_ORDER
    pre: hpt.PPC_MIN_HPT_ORDER <= new_order <= hpt.PPC_MAX_HPT_ORDER
    pre: 0 <= vsid < (2**38 if segment_1t else 2**50)
    pre: base_shift in (12, 16, 24) or (base_shift == 34 and segment_1t)
    pre: 0 <= ea < 2**64 and 0 <= slot < hpt.HPTES_PER_GROUP
    post: 0 <= __return__.primary < 2 ** (order - 7)
    post: __return__.secondary != __return__.primary
    post: __return__.secondary == ~__return__.primary & (2 ** (order - 7) - 1)
    post: 0 <= __return__.hpte_index < 2 ** (order - 4)
    post: __return__.rehashed_same_order == __return__.hpte_index
    post: __return__.rehashed // hpt.HPTES_PER_GROUP == __return__.group_in_new_table
    post: __return__.rehashed % hpt.HPTES_PER_GROUP == slot
    """
    table = hpt.KvmHptInfo(order)
    segment = hpt.Segment(vsid, segment_1t, base_shift)
    primary = hpt.hpt_hash(table, segment, ea)
    secondary = hpt.hpt_secondary_hash(table, primary)
    group = secondary if use_secondary else primary
    index = group * hpt.HPTES_PER_GROUP + slot
    v = hpt.hpte_encode_v(segment, ea) | hpte.HPTE_V_VALID
    if use_secondary:
        v |= hpte.HPTE_V_SECONDARY
    r = _LP_OF_BASE_SHIFT[base_shift]

    new_table = hpt.KvmHptInfo(new_order)
    new_group = hpt.hpt_hash(new_table, segment, ea)
    if use_secondary:
        new_group = hpt.hpt_secondary_hash(new_table, new_group)
    return HptPlacement(
        primary=primary,
        secondary=secondary,
        hpte_index=index,
        rehashed_same_order=resize.resize_hpt_new_index(v, r, index, order, order),
        rehashed=resize.resize_hpt_new_index(v, r, index, order, new_order),
        group_in_new_table=new_group,
    )


# -- stage-2 levels -------------------------------------------------------------------------


class Stage2Walk(NamedTuple):
    """The shape of the walk for one IPA: how many levels, how many pages the PGD
    concatenates and which of them the walk starts in, and the entry index at each level
    from the start level down to level 3."""

    levels: int
    pgd_pages: int
    pgd_page: int
    indexes: tuple[int, ...]


def _bits_walked(page_shift: int, walk: Stage2Walk) -> int:
    """The IPA bits a walk of this shape resolves: the page offset, page_shift - 3 bits a
    level, and the bits that choose among the concatenated PGD pages."""
    return page_shift + walk.levels * (page_shift - 3) + walk.pgd_pages.bit_length() - 1


def _most_bits(page_shift: int, levels: int) -> int:
    """The most IPA bits ``levels`` levels can resolve: with 16 PGD pages concatenated."""
    return page_shift + levels * (page_shift - 3) + 4


def _ipa_of(page_shift: int, walk: Stage2Walk, offset: int) -> int:
    """The address whose walk is ``walk``: the PGD page, then each level's index, then the
    offset in the page, side by side."""
    ipa = walk.pgd_page
    for index in walk.indexes:
        ipa = ipa << (page_shift - 3) | index
    return ipa << page_shift | offset


@checked
def stage2_walk_for_crosshair(page_shift: int, ia_bits: int, ipa: int) -> Stage2Walk:
    """The stage-2 walk KVM sets up for an IPA size and granule, taken for address ``ipa``.

    The number of levels follows from the IPA size: enough for the walk to resolve every
    IPA bit with at most 16 concatenated PGD pages, and no more (but at least two). Each
    index fits its table (the start level's through the PGD page), and putting the indexes
    back side by side gives the address again: the walk loses no bit and reads none twice.

    pre: page_shift in descriptors.GRANULE_SHIFTS
    pre: 32 <= ia_bits <= (52 if page_shift == 16 else 48)
    pre: 0 <= ipa < 2**ia_bits
    post: 2 <= __return__.levels <= 4 and len(__return__.indexes) == __return__.levels
    post: __return__.pgd_pages in (1, 2, 4, 8, 16)
    post: _bits_walked(page_shift, __return__) >= ia_bits
    post: __return__.pgd_pages == 1 or _bits_walked(page_shift, __return__) == ia_bits
    post: __return__.levels == 2 or _most_bits(page_shift, __return__.levels - 1) < ia_bits
    post: 0 <= __return__.pgd_page < __return__.pgd_pages
    post: 0 <= min(__return__.indexes) <= max(__return__.indexes) < 2 ** (page_shift - 3)
    post: _ipa_of(page_shift, __return__, ipa % 2**page_shift) == ipa
    """
    geometry = descriptors.kvm_stage2_geometry(ia_bits, page_shift)
    last = descriptors.KVM_PGTABLE_LAST_LEVEL
    return Stage2Walk(
        levels=last + 1 - geometry.start_level,
        pgd_pages=geometry.kvm_pgd_pages(),
        pgd_page=geometry.kvm_pgd_page_idx(ipa),
        indexes=tuple(
            geometry.kvm_pgtable_idx(ipa, level) for level in range(geometry.start_level, last + 1)
        ),
    )
