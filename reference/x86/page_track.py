"""Write-protecting the guest page tables that KVM shadows.

A shadow page is only right while the guest table it copies is unchanged, so KVM must see
every write to that table. It does so by never mapping the table's gfn writable: the
guest's write then faults, and KVM emulates it, updating the shadow page on the way
(zap.kvm_mmu_track_write). Invariant X6: a gfn shadowed by a page with guest PTEs (not
unsync) has no writable SPTE anywhere.

Two mechanisms, by level of the shadow page (account_shadowed):

* an upper-level table (level > 4K) takes a *write-track* reference on its gfn
  (``slot->arch.gfn_write_track``); a write-tracked gfn is refused write access outright,
  both by the fault path (page_fault_handle_page_track) and by make_spte;
* a last-level table only write-protects the SPTEs that map its gfn now; a later fault
  that would map the gfn writable asks mmu_try_to_unsync_pages, which lets the page go
  *unsync* (writable, resynchronized at the guest's next TLB flush: unsync.py) instead,
  except while KVM is itself synchronizing or prefetching.

Both also raise the disallow_lpage count of the gfn's huge frames (lpage.py, X8), so no
new huge leaf covers a shadowed table. A huge leaf that covers it already is write-protected
with the gfn's other leaves, not dropped: reads keep going through it, and the next write
fault replaces it with smaller pages (seed 002, "lazily drop large spte").

kernel: arch/x86/kvm/mmu/mmu.c:account_shadowed, unaccount_shadowed,
mmu_try_to_unsync_pages; arch/x86/kvm/mmu/page_track.c:__kvm_write_track_add_gfn,
__kvm_write_track_remove_gfn, kvm_gfn_is_write_tracked, update_gfn_write_track (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.x86.lpage import kvm_mmu_gfn_allow_lpage, kvm_mmu_gfn_disallow_lpage
from kvmspec.reference.x86.mmu_page import (
    KvmMmuPage,
    ShadowMmuState,
    for_each_valid_sp,
    kvm_unsync_page,
    sp_has_gptes,
)
from kvmspec.reference.x86.mmu_spte import kvm_mmu_slot_gfn_write_protect
from kvmspec.reference.x86.paging import PG_LEVEL_4K
from kvmspec.reference.x86.rmap import gfn_to_index

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot


def slot_write_track(slot: KvmMemorySlot) -> dict[int, int]:
    """``slot->arch.gfn_write_track``: 4K index -> references, only where not zero."""
    track = slot.arch["gfn_write_track"]
    assert isinstance(track, dict), f"{slot} has no write-track counts"
    return track


def update_gfn_write_track(kvm: Kvm, slot: KvmMemorySlot, gfn: int, count: int) -> None:
    """kernel: arch/x86/kvm/mmu/page_track.c:update_gfn_write_track (v6.18)"""
    track = slot_write_track(slot)
    index = gfn_to_index(gfn, slot.base_gfn, PG_LEVEL_4K)
    value = track.get(index, 0) + count
    if kvm.warn_on(value < 0, "X6", f"write-track count of gfn {gfn:#x} went negative"):
        return
    if value:
        track[index] = value
    else:
        track.pop(index, None)


def kvm_gfn_is_write_tracked(slot: KvmMemorySlot | None, gfn: int) -> bool:
    """kernel: arch/x86/kvm/mmu/page_track.c:kvm_gfn_is_write_tracked (v6.18)"""
    if slot is None:
        return False
    return gfn_to_index(gfn, slot.base_gfn, PG_LEVEL_4K) in slot_write_track(slot)


def __kvm_write_track_add_gfn(kvm: Kvm, mmu: ShadowMmuState, slot: KvmMemorySlot, gfn: int) -> None:
    """Take a write-track reference on ``gfn``, forbid huge mappings over it, and remove
    its writable mappings now (huge ones included: they are write-protected).

    kernel: arch/x86/kvm/mmu/page_track.c:__kvm_write_track_add_gfn (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("write-tracking a gfn")
    update_gfn_write_track(kvm, slot, gfn, 1)
    kvm_mmu_gfn_disallow_lpage(kvm, slot, gfn)
    if kvm_mmu_slot_gfn_write_protect(kvm, mmu, slot, gfn, PG_LEVEL_4K):
        kvm.arch.kvm_flush_remote_tlbs(kvm)


def __kvm_write_track_remove_gfn(kvm: Kvm, slot: KvmMemorySlot, gfn: int) -> None:
    """kernel: arch/x86/kvm/mmu/page_track.c:__kvm_write_track_remove_gfn (v6.18)"""
    kvm.lockdep_assert_mmu_lock_held_write("write-untracking a gfn")
    update_gfn_write_track(kvm, slot, gfn, -1)
    kvm_mmu_gfn_allow_lpage(kvm, slot, gfn)


def account_shadowed(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """A new page shadows the guest table at ``sp.gfn``: count it, and protect the gfn
    (write-tracked for an upper level; for the last level, huge mappings disallowed and
    its SPTEs write-protected).

    kernel: arch/x86/kvm/mmu/mmu.c:account_shadowed (v6.18)
    """
    mmu.indirect_shadow_pages += 1
    slot = kvm.memslots(0).gfn_to_memslot(sp.gfn)
    if kvm.warn_on(slot is None, "X6", f"{sp} shadows a gfn outside every memslot"):
        return
    assert slot is not None
    if sp.role.level > PG_LEVEL_4K:
        __kvm_write_track_add_gfn(kvm, mmu, slot, sp.gfn)
        return
    kvm_mmu_gfn_disallow_lpage(kvm, slot, sp.gfn)
    if kvm_mmu_slot_gfn_write_protect(kvm, mmu, slot, sp.gfn, PG_LEVEL_4K):
        kvm.arch.kvm_flush_remote_tlbs(kvm)


def unaccount_shadowed(kvm: Kvm, mmu: ShadowMmuState, sp: KvmMmuPage) -> None:
    """The page is zapped: drop what account_shadowed took. Its SPTEs stay read-only until
    a fault finds the gfn unprotected and maps it writable again.

    kernel: arch/x86/kvm/mmu/mmu.c:unaccount_shadowed (v6.18)
    """
    mmu.indirect_shadow_pages -= 1
    slot = kvm.memslots(0).gfn_to_memslot(sp.gfn)
    if kvm.warn_on(slot is None, "X6", f"{sp} outlived the memslot of its gfn"):
        return
    assert slot is not None
    if sp.role.level > PG_LEVEL_4K:
        __kvm_write_track_remove_gfn(kvm, slot, sp.gfn)
    else:
        kvm_mmu_gfn_allow_lpage(kvm, slot, sp.gfn)


def mmu_try_to_unsync_pages(
    kvm: Kvm,
    mmu: ShadowMmuState,
    slot: KvmMemorySlot | None,
    gfn: int,
    *,
    synchronizing: bool,
    prefetch: bool,
) -> bool:
    """May ``gfn`` be mapped writable? True means "keep it write-protected" (the kernel's
    EPERM or EEXIST): the gfn is write-tracked (an upper-level table), or a valid page
    shadows it as a guest table while KVM is synchronizing (the guest's TLB flush must be
    emulated to the end first) or prefetching. Otherwise every such page, necessarily a
    last-level one, becomes unsync and the write is allowed.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_try_to_unsync_pages (v6.18)
    """
    if kvm_gfn_is_write_tracked(slot, gfn):
        return True
    for sp in for_each_valid_sp(mmu, gfn):
        if not sp_has_gptes(sp):
            continue
        if synchronizing:
            return True
        if sp.unsync:
            continue
        if prefetch:
            return True
        kvm.warn_on(sp.role.level != PG_LEVEL_4K, "X7", f"unsyncing {sp} above 4K")
        kvm_unsync_page(mmu, sp)
    return False
