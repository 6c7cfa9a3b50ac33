"""The hashed page table (HPT), its reverse map, and the per-slot rmap words.

The HPT is 2^order bytes of 16-byte entries in groups of eight (a PTEG, 128 bytes). The
hardware finds the translation of a virtual address by hashing it to one group (the
primary hash) or its mirror (the secondary hash: the primary XOR the table mask) and
searching those 16 entries. The guest owns the contents, through hypercalls; KVM owns the
table and puts host real addresses in it.

Beside each entry KVM keeps a reverse-map entry: the guest's own "r" word (``guest_rpte``)
and two links. For every guest page, the memslot keeps one 64-bit rmap word whose low 32
bits name the head of a circular doubly linked list of the entries that map that page (P2).
When the host takes a page away (an MMU notifier, a memslot deletion), KVM follows that list
to every entry it must invalidate.

Two kinds of bit locks protect all of it (P1): HVLOCK in each entry's "v" word, and the LOCK
bit of each rmap word. The order is rmap first, then entry, and only with a *try*-lock on the
entry: a path holding an entry lock may take an rmap lock (H_ENTER, H_REMOVE), so spinning on
an entry while holding an rmap would deadlock (ABBA). The model runs each path in one step,
so a lock found held means a path left it held: :func:`lock_rmap` raises Deadlock, the
writers of a word record a P1 warning when its lock is not held.

Storage is sparse: only touched entries and rmap words exist, so a default 16 MiB table
(order 24, one million entries) costs nothing until the guest enters translations.

kernel: arch/powerpc/include/asm/kvm_host.h:struct revmap_entry, struct kvm_hpt_info,
KVMPPC_RMAP_*; arch/powerpc/include/asm/kvm_book3s_64.h:try_lock_hpte, unlock_hpte,
__unlock_hpte, lock_rmap, unlock_rmap, slot_is_aligned; arch/powerpc/kvm/book3s_64_mmu_hv.c:
kvmppc_allocate_hpt; arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_add_revmap_chain,
remove_revmap_chain, revmap_for_hpte, kvmppc_update_dirty_map, kvmppc_hv_find_lock_hpte (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EINVAL
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import Deadlock
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_R,
    HPTE_V_1TB_SEG,
    HPTE_V_ABSENT,
    HPTE_V_AVPN,
    HPTE_V_HVLOCK,
    HPTE_V_LARGE,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
    hpte_rpn,
    kvmppc_actual_pgsz,
    kvmppc_hpte_base_page_shift,
)

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot

PPC_MIN_HPT_ORDER = 18
PPC_MAX_HPT_ORDER = 46
KVM_DEFAULT_HPT_ORDER = 24
"""A 16 MiB table by default (2^20 entries)."""
HPTES_PER_GROUP = 8

# -- the rmap word: per memslot and guest page --------------------------------------------

KVMPPC_RMAP_TYPE_MASK = 0xFF00_0000_0000_0000
KVMPPC_RMAP_HPT = 0x0100_0000_0000_0000
"""The word belongs to an HPT guest (nested and secure guests use other types)."""
KVMPPC_RMAP_LOCK_BIT = 43
KVMPPC_RMAP_LOCK = 1 << KVMPPC_RMAP_LOCK_BIT
KVMPPC_RMAP_RC_SHIFT = 32
KVMPPC_RMAP_REFERENCED = HPTE_R_R << KVMPPC_RMAP_RC_SHIFT
"""Bit 40: an entry mapping the page was referenced when it was taken away (aging)."""
KVMPPC_RMAP_RC = (HPTE_R_R | HPTE_R_C) << KVMPPC_RMAP_RC_SHIFT
"""Bits 40 and 39: the R and C bits harvested from entries that left the chain. (C no
longer has a name or a reader: since v4.15 a harvested C goes straight into the slot's
dirty bitmap, and the old CHANGED bit with its page-order field is gone.)"""
KVMPPC_RMAP_PRESENT = 1 << 32
"""The chain is not empty."""
KVMPPC_RMAP_INDEX = 0xFFFF_FFFF
"""The index of the chain's head entry."""


@dataclass(slots=True)
class RevmapEntry:
    """struct revmap_entry: the guest's "r" word and the entry's links in its rmap chain
    (itself both ways when it is alone, or on no chain)."""

    guest_rpte: int = 0
    forw: int = 0
    back: int = 0


class SlotRmap:
    """``memslot->arch.rmap``: the rmap word of each page of a slot, by page offset, for
    the words that are not zero. ``freed`` marks an array the kernel vfree()d."""

    __slots__ = ("freed", "words")

    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.freed = False

    def get(self, offset: int) -> int:
        return self.words.get(offset, 0)

    def put(self, offset: int, word: int) -> None:
        if word:
            self.words[offset] = word
        else:
            self.words.pop(offset, None)


def slot_rmap(slot: KvmMemorySlot) -> SlotRmap:
    """The rmap array of ``slot`` (allocated by prepare for CREATE, shared otherwise)."""
    rmap = slot.arch["rmap"]
    assert isinstance(rmap, SlotRmap), f"{slot} has no HPT rmap"
    return rmap


def lock_rmap(rmap: SlotRmap, offset: int) -> None:
    """Take the LOCK bit of one rmap word. Held already means a path kept it across its
    end: nobody could ever release it, so the spin would never end.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:lock_rmap (v6.18)
    """
    word = rmap.get(offset)
    if word & KVMPPC_RMAP_LOCK:
        raise Deadlock(f"rmap word {offset:#x} is locked and nobody can release it")
    rmap.put(offset, word | KVMPPC_RMAP_LOCK)


def unlock_rmap(rmap: SlotRmap, offset: int) -> None:
    """kernel: arch/powerpc/include/asm/kvm_book3s_64.h:unlock_rmap (v6.18)"""
    rmap.put(offset, rmap.get(offset) & ~KVMPPC_RMAP_LOCK)


def rmap_write(kvm: Kvm, rmap: SlotRmap, offset: int, word: int) -> None:
    """Change an rmap word, which only its lock holder may do (P1)."""
    kvm.warn_on(not rmap.get(offset) & KVMPPC_RMAP_LOCK, "P1", "rmap word changed unlocked")
    rmap.put(offset, word | KVMPPC_RMAP_LOCK)


# -- the table ------------------------------------------------------------------------------

_NEVER_WRITTEN = (0, 0)
"""The words of an entry the table has never stored to: zero, as the allocation left them."""


class KvmHptInfo:
    """struct kvm_hpt_info: the table's order, its entries and their reverse-map entries."""

    __slots__ = ("hptes", "order", "rev")

    def __init__(self, order: int) -> None:
        self.order = order
        self.hptes: dict[int, list[int]] = {}  # index -> [v, r], entries ever written
        self.rev: dict[int, RevmapEntry] = {}

    @property
    def npte(self) -> int:
        """kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_hpt_npte (v6.18)"""
        return 1 << (self.order - 4)

    @property
    def mask(self) -> int:
        """The number of groups minus one: hashes are taken modulo the group count.

        kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_hpt_mask (v6.18)
        """
        return (1 << (self.order - 7)) - 1

    def v(self, index: int) -> int:
        return self.hptes.get(index, _NEVER_WRITTEN)[0]

    def r(self, index: int) -> int:
        return self.hptes.get(index, _NEVER_WRITTEN)[1]

    def rev_entry(self, index: int) -> RevmapEntry:
        """The reverse-map entry of ``index``, created linked to itself (on no chain) the
        first time it is asked for."""
        rev = self.rev.get(index)
        if rev is None:
            rev = self.rev[index] = RevmapEntry(forw=index, back=index)
        return rev

    def store(self, index: int, v: int, r: int) -> None:
        """The raw store of both words (the lock discipline is the callers')."""
        self.hptes[index] = [v, r]


def kvmppc_allocate_hpt(order: int) -> tuple[int, KvmHptInfo | None]:
    """A zeroed table of 2^order bytes: (0, the table), or EINVAL for an order outside
    18..46.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_allocate_hpt (v6.18)
    """
    if not PPC_MIN_HPT_ORDER <= order <= PPC_MAX_HPT_ORDER:
        return EINVAL, None
    return 0, KvmHptInfo(order)


def try_lock_hpte(hpt: KvmHptInfo, index: int, bits: int) -> bool:
    """Set HVLOCK unless any of ``bits`` (which include HVLOCK) is set: H_ENTER passes
    VALID and ABSENT too, to take only a free entry.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:try_lock_hpte (v6.18)
    """
    v = hpt.v(index)
    if v & bits:
        return False
    hpt.store(index, v | HPTE_V_HVLOCK, hpt.r(index))
    return True


def lock_hpte(hpt: KvmHptInfo, index: int) -> None:
    """Spin on try_lock_hpte: held already means nobody will ever release it."""
    if not try_lock_hpte(hpt, index, HPTE_V_HVLOCK):
        raise Deadlock(f"HPTE {index:#x} is locked and nobody can release it")


def unlock_hpte(kvm: Kvm, hpt: KvmHptInfo, index: int, v: int) -> None:
    """Release the entry by writing its "v" word without HVLOCK.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:unlock_hpte, __unlock_hpte (v6.18)
    """
    kvm.warn_on(not hpt.v(index) & HPTE_V_HVLOCK, "P1", "HPTE unlocked by a non-holder")
    hpt.store(index, v & ~HPTE_V_HVLOCK, hpt.r(index))


def hpte_write_v(kvm: Kvm, hpt: KvmHptInfo, index: int, v: int) -> None:
    """Change "v" while holding the entry's lock (which stays held) (P1)."""
    kvm.warn_on(not hpt.v(index) & HPTE_V_HVLOCK, "P1", "HPTE v changed unlocked")
    hpt.store(index, v | HPTE_V_HVLOCK, hpt.r(index))


def hpte_write_r(kvm: Kvm, hpt: KvmHptInfo, index: int, r: int) -> None:
    """Change "r" while holding the entry's lock (P1)."""
    kvm.warn_on(not hpt.v(index) & HPTE_V_HVLOCK, "P1", "HPTE r changed unlocked")
    hpt.store(index, hpt.v(index), r)


# -- the hash ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """What the hash needs from the guest's SLB entry for an address: the segment's VSID,
    its size, and its base page shift (12, 16, 24 or 34). The real SLB word packs these
    with protection keys that the hash ignores."""

    vsid: int
    segment_1t: bool = False
    base_shift: int = 12

    @property
    def somask(self) -> int:
        """The offset-in-segment mask: 256 MiB or 1 TiB."""
        return (1 << 40) - 1 if self.segment_1t else (1 << 28) - 1


def hpt_hash(hpt: KvmHptInfo, segment: Segment, ea: int) -> int:
    """The primary group of effective address ``ea``: the VSID XOR the page number in the
    segment, modulo the group count (a 1 TiB VSID is folded with itself first). The
    secondary group is :func:`hpt_secondary_hash` of this one.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hv_find_lock_hpte (v6.18)
    """
    vsid = segment.vsid
    if segment.segment_1t:
        vsid ^= vsid << 25
    return (vsid ^ ((ea & segment.somask) >> segment.base_shift)) & hpt.mask


def hpt_secondary_hash(hpt: KvmHptInfo, group: int) -> int:
    """The other group an address may sit in: every bit of ``group`` under the mask
    flipped. The two groups are each other's complement within the table, so they are
    never the same group, and either one gives back the other.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hv_find_lock_hpte (v6.18)
    """
    return group ^ hpt.mask


def hpte_encode_v(segment: Segment, ea: int) -> int:
    """The "v" word a guest enters for ``ea`` (not yet VALID): segment size, AVPN (the
    virtual address >> 16, bits below the page size dropped) and L for large pages.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hv_find_lock_hpte (the search key)
    (v6.18)
    """
    sid_shift = 40 if segment.segment_1t else 28
    va_16 = (segment.vsid << (sid_shift - 16)) | ((ea & segment.somask) >> 16)
    if segment.base_shift >= 24:
        avpn = va_16 & ~((1 << (segment.base_shift - 16)) - 1)
    else:
        avpn = va_16 & ~0x7F
    v = (avpn & HPTE_V_AVPN) | (HPTE_V_1TB_SEG if segment.segment_1t else 0)
    return v | (HPTE_V_LARGE if segment.base_shift > 12 else 0)


def kvmppc_hv_find_lock_hpte(
    kvm: Kvm, hpt: KvmHptInfo, segment: Segment, ea: int, valid: int
) -> int:
    """The index of the entry translating ``ea``, locked, or -1: search the primary group,
    then the secondary one (whose entries must have H), for an entry with one of ``valid``
    (VALID, ABSENT) whose segment size, AVPN, L and H match and whose base page size is the
    segment's.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hv_find_lock_hpte (v6.18)
    """
    compare = HPTE_V_1TB_SEG | HPTE_V_AVPN | HPTE_V_SECONDARY | HPTE_V_LARGE
    want = hpte_encode_v(segment, ea)
    group = hpt_hash(hpt, segment, ea)
    for secondary in (False, True):
        if secondary:
            want |= HPTE_V_SECONDARY
            group = hpt_secondary_hash(hpt, group)
        for index in range(group * HPTES_PER_GROUP, (group + 1) * HPTES_PER_GROUP):
            v = hpt.v(index) & ~HPTE_V_HVLOCK
            if not v & valid or (v & compare) != want:
                continue
            lock_hpte(hpt, index)
            if kvmppc_hpte_base_page_shift(v, hpt.r(index)) == segment.base_shift:
                return index  # still locked
            unlock_hpte(kvm, hpt, index, v)
    return -1


# -- the rmap chains ------------------------------------------------------------------------


def slot_is_aligned(slot: KvmMemorySlot, pagesize: int, page_shift: int) -> bool:
    """Does a page of ``pagesize`` fit the slot's alignment, so that it lies in the slot
    whole when its start does? Always for pages no larger than a host page.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:slot_is_aligned (v6.18)
    """
    mask = (pagesize >> page_shift) - 1
    if pagesize <= 1 << page_shift:
        return True
    return not slot.base_gfn & mask and not slot.npages & mask


def kvmppc_add_revmap_chain(
    kvm: Kvm, hpt: KvmHptInfo, rmap: SlotRmap, offset: int, pte_index: int
) -> None:
    """Link entry ``pte_index`` at the tail of the chain of rmap word ``offset`` (whose lock
    the caller holds), or make it the whole chain; then release the rmap lock.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_add_revmap_chain (v6.18)
    """
    word = rmap.get(offset)
    rev = hpt.rev_entry(pte_index)
    if word & KVMPPC_RMAP_PRESENT:
        head_index = word & KVMPPC_RMAP_INDEX
        head = hpt.rev_entry(head_index)
        tail = hpt.rev_entry(head.back)
        rev.forw = head_index
        rev.back = head.back
        tail.forw = pte_index
        head.back = pte_index
    else:
        rev.forw = rev.back = pte_index
        word = (word & ~KVMPPC_RMAP_INDEX) | pte_index | KVMPPC_RMAP_PRESENT | KVMPPC_RMAP_HPT
        rmap_write(kvm, rmap, offset, word)
    unlock_rmap(rmap, offset)


def revmap_for_hpte(kvm: Kvm, hpte_v: int, guest_r: int) -> tuple[KvmMemorySlot | None, int]:
    """The slot and the base gfn of the page an entry maps, from the guest's "r" word.

    The lookup finds an INVALID slot too: a slot being deleted or moved must still let its
    references go (seed 000), it only refuses new ones.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:revmap_for_hpte (v6.18)
    """
    gfn = hpte_rpn(guest_r, kvmppc_actual_pgsz(hpte_v, guest_r), kvm.profile.page_shift)
    return kvm.memslots(0).search_memslots(gfn), gfn


def kvmppc_update_dirty_map(kvm: Kvm, slot: KvmMemorySlot | None, gfn: int, psize: int) -> None:
    """Mark the host pages of a page of ``psize`` at ``gfn`` dirty in the slot's bitmap
    (no bitmap: the slot is not logged, nothing to do).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_update_dirty_map (v6.18)
    """
    if slot is None or slot.dirty_bitmap is None or not psize:
        return
    page = 1 << kvm.profile.page_shift
    for i in range((psize + page - 1) // page):
        slot.dirty_bitmap.set_bit(gfn - slot.base_gfn + i)


def remove_revmap_chain(
    kvm: Kvm, hpt: KvmHptInfo, pte_index: int, hpte_v: int, hpte_r: int
) -> None:
    """Unlink an entry that was just invalidated (the tlbie has completed, so ``hpte_r``'s
    R and C are final: P3) from its chain; fold R and C into its guest view and into the
    rmap word, and a C into the slot's dirty bitmap.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:remove_revmap_chain (v6.18)
    """
    rev = hpt.rev_entry(pte_index)
    rcbits = hpte_r & (HPTE_R_R | HPTE_R_C)
    rev.guest_rpte |= rcbits
    slot, gfn = revmap_for_hpte(kvm, hpte_v, rev.guest_rpte)
    if slot is None:
        return
    rmap = slot_rmap(slot)
    offset = gfn - slot.base_gfn
    lock_rmap(rmap, offset)
    word = rmap.get(offset)
    head = word & KVMPPC_RMAP_INDEX
    hpt.rev_entry(rev.forw).back = rev.back
    hpt.rev_entry(rev.back).forw = rev.forw
    if head == pte_index:
        head = rev.forw
        if head == pte_index:
            word &= ~(KVMPPC_RMAP_PRESENT | KVMPPC_RMAP_INDEX)
        else:
            word = (word & ~KVMPPC_RMAP_INDEX) | head
    rmap_write(kvm, rmap, offset, word | rcbits << KVMPPC_RMAP_RC_SHIFT)
    if rcbits & HPTE_R_C:
        kvmppc_update_dirty_map(kvm, slot, gfn, kvmppc_actual_pgsz(hpte_v, hpte_r))
    unlock_rmap(rmap, offset)


def chain_members(hpt: KvmHptInfo, word: int) -> list[int]:
    """The entries on an rmap word's chain, head first, following ``forw`` (stops after
    npte steps, so a broken chain cannot loop forever)."""
    if not word & KVMPPC_RMAP_PRESENT:
        return []
    head = word & KVMPPC_RMAP_INDEX
    members = [head]
    index = hpt.rev_entry(head).forw
    while index != head and len(members) <= hpt.npte:
        members.append(index)
        index = hpt.rev_entry(index).forw
    return members


def hpte_valid_in_hardware(hpt: KvmHptInfo, index: int) -> bool:
    """Can the hardware translate through the entry (VALID, neither free nor ABSENT)?"""
    return (hpt.v(index) & (HPTE_V_VALID | HPTE_V_ABSENT)) == HPTE_V_VALID
