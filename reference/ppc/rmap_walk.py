"""What the host does to the guest's HPT through the rmap chains.

The guest decides which translations exist; the host can only take pages away. When it does
(an MMU-notifier invalidation, a memslot deletion or move), KVM walks the chain of every
affected guest page and makes each entry ABSENT: still an entry to the guest, no longer one
to the hardware, so the next access traps and the page is faulted in again (seed 000:
"translations are rebuilt on demand"). Aging and dirty logging walk the same chains to read
and clear the hardware's R and C bits.

Every walk takes the rmap lock, then *tries* each entry's lock (P1): an entry lock is held
by paths that go on to take rmap locks, so spinning on it here could deadlock. In the model
nothing else runs during a walk, so a try that fails means a lock was leaked, and is
reported as a Deadlock.

kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_unmap_hpte, kvm_unmap_rmapp,
kvm_unmap_gfn_range_hv, kvmppc_core_flush_memslot_hv, kvm_age_rmapp, kvm_test_age_rmapp,
kvm_test_clear_dirty_npages, kvmppc_hv_get_dirty_log_hpt;
arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_invalidate_hpte, kvmppc_clear_ref_hpte (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import Deadlock
from kvmspec.reference.ppc.hpt import (
    KVMPPC_RMAP_INDEX,
    KVMPPC_RMAP_PRESENT,
    KVMPPC_RMAP_RC_SHIFT,
    KVMPPC_RMAP_REFERENCED,
    KvmHptInfo,
    SlotRmap,
    chain_members,
    hpte_write_r,
    hpte_write_v,
    kvmppc_update_dirty_map,
    lock_rmap,
    rmap_write,
    slot_rmap,
    try_lock_hpte,
    unlock_hpte,
    unlock_rmap,
)
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_KEY,
    HPTE_R_R,
    HPTE_V_ABSENT,
    HPTE_V_HVLOCK,
    HPTE_V_VALID,
    hpte_is_writable,
    hpte_rpn,
    kvmppc_actual_pgsz,
)
from kvmspec.reference.ppc.tlb import HptTlbs, do_tlbies

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


def kvmppc_invalidate_hpte(kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, index: int) -> None:
    """Clear V in a locked entry and tlbie it: from the return on, the hardware neither
    translates through the entry nor changes its R and C.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_invalidate_hpte (v6.18)
    """
    hpte_write_v(kvm, hpt, index, hpt.v(index) & ~HPTE_V_VALID)
    do_tlbies(hpt, tlbs, [index])


def kvmppc_clear_ref_hpte(kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, index: int) -> None:
    """Clear R in a locked, valid entry and tlbie it, so the next access sets R again.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_clear_ref_hpte (v6.18)
    """
    hpte_write_r(kvm, hpt, index, hpt.r(index) & ~HPTE_R_R)
    do_tlbies(hpt, tlbs, [index])


def kvmppc_unmap_hpte(
    kvm: Kvm,
    hpt: KvmHptInfo,
    tlbs: HptTlbs,
    index: int,
    slot: KvmMemorySlot,
    rmap: SlotRmap,
    gfn: int,
) -> None:
    """Take entry ``index`` off the chain of ``gfn`` (the caller holds both locks), and if
    it is valid for that page, make it ABSENT: clear V, tlbie, drop the key, then harvest
    R and C into the rmap word, the dirty bitmap and the guest's view (P3).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_unmap_hpte (v6.18)
    """
    offset = gfn - slot.base_gfn
    word = rmap.get(offset)
    rev = hpt.rev_entry(index)
    if rev.forw == index:
        word &= ~(KVMPPC_RMAP_PRESENT | KVMPPC_RMAP_INDEX)  # the chain is now empty
    else:
        hpt.rev_entry(rev.back).forw = rev.forw
        hpt.rev_entry(rev.forw).back = rev.back
        word = (word & ~KVMPPC_RMAP_INDEX) | rev.forw
        rev.forw = rev.back = index
    rmap_write(kvm, rmap, offset, word)

    ptel = rev.guest_rpte
    psize = kvmppc_actual_pgsz(hpt.v(index), ptel)
    if hpt.v(index) & HPTE_V_VALID and hpte_rpn(ptel, psize, kvm.profile.page_shift) == gfn:
        hpte_write_v(kvm, hpt, index, hpt.v(index) | HPTE_V_ABSENT)
        kvmppc_invalidate_hpte(kvm, hpt, tlbs, index)
        hpte_write_r(kvm, hpt, index, hpt.r(index) & ~HPTE_R_KEY)
        rcbits = hpt.r(index) & (HPTE_R_R | HPTE_R_C)
        rmap_write(kvm, rmap, offset, rmap.get(offset) | rcbits << KVMPPC_RMAP_RC_SHIFT)
        if rcbits & HPTE_R_C:
            kvmppc_update_dirty_map(kvm, slot, gfn, psize)
        rev.guest_rpte = ptel | rcbits


def _try_lock_or_deadlock(hpt: KvmHptInfo, index: int) -> None:
    """The try-lock of a walk. The kernel drops the rmap lock, waits for the entry's holder
    and restarts; with nothing else running, that holder can never come."""
    if not try_lock_hpte(hpt, index, HPTE_V_HVLOCK):
        raise Deadlock(f"HPTE {index:#x} is locked and nobody can release it")


def kvm_unmap_rmapp(
    kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, slot: KvmMemorySlot, gfn: int
) -> None:
    """Invalidate every entry on the chain of ``gfn``, head first, until the chain is empty.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_unmap_rmapp (v6.18)
    """
    rmap = slot_rmap(slot)
    offset = gfn - slot.base_gfn
    while True:
        lock_rmap(rmap, offset)
        word = rmap.get(offset)
        if not word & KVMPPC_RMAP_PRESENT:
            unlock_rmap(rmap, offset)
            return
        index = word & KVMPPC_RMAP_INDEX
        _try_lock_or_deadlock(hpt, index)
        kvmppc_unmap_hpte(kvm, hpt, tlbs, index, slot, rmap, gfn)
        unlock_rmap(rmap, offset)
        unlock_hpte(kvm, hpt, index, hpt.v(index))


def kvmppc_core_flush_memslot_hv(
    kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, slot: KvmMemorySlot
) -> None:
    """Invalidate every entry that maps a page of ``slot`` (seed 000: "removes all
    translations mapped via memslots"), leaving every rmap word of the slot without a chain.

    Testing PRESENT without the lock is fine: the slot is INVALID, so nothing can add an
    entry to its chains any more. Only words that exist are visited (the kernel visits all
    npages, most of them zero).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_core_flush_memslot_hv (v6.18)
    """
    rmap = slot_rmap(slot)
    for offset in sorted(rmap.words):
        if rmap.get(offset) & KVMPPC_RMAP_PRESENT:
            kvm_unmap_rmapp(kvm, hpt, tlbs, slot, slot.base_gfn + offset)


def kvm_age_rmapp(kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, slot: KvmMemorySlot, gfn: int) -> bool:
    """Was the page referenced since the last aging? Consumes REFERENCED in the rmap word
    (left by entries that were unmapped), and clears R in every valid entry of the chain
    that has it (moving it into the guest's view, where H_READ still shows it).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_age_rmapp (v6.18)
    """
    rmap = slot_rmap(slot)
    offset = gfn - slot.base_gfn
    young = False
    lock_rmap(rmap, offset)
    word = rmap.get(offset)
    if word & KVMPPC_RMAP_REFERENCED:
        rmap_write(kvm, rmap, offset, word & ~KVMPPC_RMAP_REFERENCED)
        young = True
    for index in chain_members(hpt, rmap.get(offset)):
        if not hpt.r(index) & HPTE_R_R:
            continue
        _try_lock_or_deadlock(hpt, index)
        if hpt.v(index) & HPTE_V_VALID and hpt.r(index) & HPTE_R_R:
            kvmppc_clear_ref_hpte(kvm, hpt, tlbs, index)
            hpt.rev_entry(index).guest_rpte |= HPTE_R_R
            young = True
        unlock_hpte(kvm, hpt, index, hpt.v(index))
    unlock_rmap(rmap, offset)
    return young


def kvm_test_age_rmapp(kvm: Kvm, hpt: KvmHptInfo, slot: KvmMemorySlot, gfn: int) -> bool:
    """Was the page referenced? REFERENCED in the rmap word, or R in an entry of its chain.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_test_age_rmapp (v6.18)
    """
    rmap = slot_rmap(slot)
    offset = gfn - slot.base_gfn
    if rmap.get(offset) & KVMPPC_RMAP_REFERENCED:
        return True
    lock_rmap(rmap, offset)
    referenced = any(hpt.r(index) & HPTE_R_R for index in chain_members(hpt, rmap.get(offset)))
    unlock_rmap(rmap, offset)
    return referenced


def kvm_test_clear_dirty_npages(
    kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, rmap: SlotRmap, offset: int, vcpus_running: bool
) -> int:
    """How many host pages from this rmap's page on were changed, by C bits found in its
    chain's entries (more than one for a huge entry). Each entry with C gets C cleared.

    C is read only after the entry was made absent and tlbie'd (P3). An entry without C is
    skipped when it is read-only (it cannot have a C in flight: making it read-only took a
    tlbie) or when vCPUs run (the caller will harvest again anyway); otherwise it is
    invalidated too, to collect a C the hardware still owed it.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_test_clear_dirty_npages (v6.18)
    """
    page = 1 << kvm.profile.page_shift
    npages_dirty = 0
    lock_rmap(rmap, offset)
    for index in chain_members(hpt, rmap.get(offset)):
        r = hpt.r(index)
        if not r & HPTE_R_C and (not hpte_is_writable(r) or vcpus_running):
            continue
        _try_lock_or_deadlock(hpt, index)
        v = hpt.v(index)
        if not v & HPTE_V_VALID:
            unlock_hpte(kvm, hpt, index, v)
            continue
        # Temporarily absent so that C is stable.
        hpte_write_v(kvm, hpt, index, v | HPTE_V_ABSENT)
        kvmppc_invalidate_hpte(kvm, hpt, tlbs, index)
        v, r = hpt.v(index), hpt.r(index)
        if r & HPTE_R_C:
            hpte_write_r(kvm, hpt, index, r & ~HPTE_R_C)
            hpt.rev_entry(index).guest_rpte |= HPTE_R_C
            size = kvmppc_actual_pgsz(v, r)
            npages_dirty = max(npages_dirty, (size + page - 1) // page)
        unlock_hpte(kvm, hpt, index, (v & ~(HPTE_V_ABSENT | HPTE_V_HVLOCK)) | HPTE_V_VALID)
    unlock_rmap(rmap, offset)
    return npages_dirty


def kvmppc_hv_get_dirty_log_hpt(
    kvm: Kvm, hpt: KvmHptInfo, tlbs: HptTlbs, slot: KvmMemorySlot, vcpus_running: bool
) -> set[int]:
    """The page offsets of ``slot`` whose entries were written since the last harvest, from
    the C bits (a huge entry dirties every host page it covers: its chain is that of its
    first page, so the following pages are counted from there).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_hv_get_dirty_log_hpt (v6.18)
    """
    rmap = slot_rmap(slot)
    dirty: set[int] = set()
    for offset in sorted(rmap.words):
        npages = kvm_test_clear_dirty_npages(kvm, hpt, tlbs, rmap, offset, vcpus_running)
        dirty.update(range(offset, offset + npages))
    return dirty
