"""mmu_set_spte: install one shadow leaf, for a page fault or ahead of one (a prefetch).

Both the fault path (paging_tmpl.fname_fetch) and the prefetch of the neighbouring guest PTEs
(pte_prefetch.py) end here, so the fault's own types live here too: the state of a fault
(struct kvm_page_fault) and the outcomes of its handler (enum ret_pf).

kernel: arch/x86/kvm/mmu/mmu.c:mmu_set_spte; arch/x86/kvm/mmu/mmu_internal.h:struct
kvm_page_fault, enum ret_pf (v6.18)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.host import HostPage
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86.mmio_spte import is_noslot_pfn, mark_mmio_spte
from kvmspec.reference.x86.mmu_page import (
    ShadowMmuState,
    SptePtr,
    kvm_mmu_page_set_access,
)
from kvmspec.reference.x86.mmu_spte import drop_parent_pte, drop_spte, mmu_spte_update
from kvmspec.reference.x86.page_track import mmu_try_to_unsync_pages
from kvmspec.reference.x86.paging import PFERR_PRESENT_MASK, PFERR_WRITE_MASK, PG_LEVEL_4K
from kvmspec.reference.x86.rmap import rmap_add
from kvmspec.reference.x86.spte import (
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_spte,
    spte_to_pfn,
)


class RetPf(enum.Enum):
    """enum ret_pf, and the negative errno the kernel returns to KVM_RUN."""

    RETRY = "retry"
    """Enter the guest again (also after injecting the guest's own #PF)."""
    EMULATE = "emulate"
    """No slot (an MMIO SPTE may have been installed on the way), or a write to a READONLY
    one: emulate (MMIO for the VMM)."""
    WRITE_PROTECTED = "write_protected"
    """A write to a gfn KVM keeps read-only (a shadowed guest page table): emulate it."""
    INVALID = "invalid"
    """The reserved-bit fast path could not settle the fault (a stale MMIO SPTE): take the
    normal fault path."""
    FIXED = "fixed"
    SPURIOUS = "spurious"
    EFAULT = "efault"
    """KVM_RUN fails with EFAULT: the host cannot provide the page."""
    ENOSPC = "enospc"
    """KVM_RUN fails with ENOSPC: no shadow page could be recycled for the fault
    (mmu_pages.py)."""


@dataclass(slots=True)
class KvmPageFault:
    """struct kvm_page_fault, the fields the shadow MMU uses."""

    addr: int
    error_code: int
    gfn: int = 0
    slot: KvmMemorySlot | None = None
    pfn: int = 0
    map_writable: bool = False
    mmu_seq: int = 0
    page: HostPage | None = None
    """The page's reference held by the fault (the kernel's refcounted_page)."""
    max_level: int = PG_LEVEL_4K
    """The largest leaf the fault may install: the guest's page size (walker.level)."""
    req_level: int = PG_LEVEL_4K
    """What kvm_mmu_max_mapping_level allowed."""
    goal_level: int = PG_LEVEL_4K
    """The level of the leaf FNAME(fetch) installs."""

    @property
    def write(self) -> bool:
        return bool(self.error_code & PFERR_WRITE_MASK)

    @property
    def present(self) -> bool:
        return bool(self.error_code & PFERR_PRESENT_MASK)


def mmu_set_spte(
    kvm: Kvm,
    mmu: ShadowMmuState,
    slot: KvmMemorySlot | None,
    sptep: SptePtr,
    pte_access: int,
    gfn: int,
    pfn: int,
    fault: KvmPageFault | None,
    vcpu: KvmVcpu | None,
) -> RetPf:
    """Install the leaf for ``gfn`` (backed by ``pfn``) at ``sptep``, for ``fault`` or, with
    no fault, as a prefetch (pte_prefetch.py): a prefetched leaf is born old, and its page
    was taken writable from the host. A leaf for another pfn is dropped first
    (and the TLBs flushed: X4); then a gfn without a slot gets an MMIO SPTE and the access
    is emulated. An identical leaf is SPURIOUS; a write the gfn cannot take (a shadowed
    page table) leaves a read-only leaf and returns WRITE_PROTECTED. A new leaf enters its
    rmap; a writable one is logged dirty.

    kernel: arch/x86/kvm/mmu/mmu.c:mmu_set_spte (v6.18 with upstream aad885e77496, "Drop/zap
    existing present SPTE even when creating an MMIO SPTE"); arch/x86/kvm/mmu/spte.c:make_spte
    (v6.18)
    """
    level = sptep.sp.role.level
    was_rmapped = False
    flush = False
    old_spte = sptep.get()
    if is_shadow_present_pte(old_spte):
        if level > PG_LEVEL_4K and not is_large_pte(old_spte):
            drop_parent_pte(kvm, mmu, mmu.spte_to_child_sp(old_spte), sptep)
            flush = True
        elif pfn != spte_to_pfn(old_spte):
            kvm.warn_on(not is_last_spte(old_spte, level), "X2", f"{sptep} is not a leaf")
            drop_spte(kvm, mmu, sptep)
            flush = True
        else:
            was_rmapped = True
    # Only after the drop: a stale present SPTE (its guest PTE changed behind KVM's back,
    # in an unsync table or by the VMM) must leave its rmap first. v6.18 made the MMIO SPTE
    # before this point; the fix (upstream aad885e77496) is in 6.18's stable releases.
    if is_noslot_pfn(pfn) or slot is None:
        mmu.stat["pf_mmio_spte_created"] += 1
        mark_mmio_spte(kvm, mmu, sptep, gfn, pte_access)
        if flush:
            kvm.arch.kvm_flush_remote_tlbs(kvm)
        return RetPf.EMULATE

    def unsync_hook(*, synchronizing: bool, prefetch: bool) -> bool:
        return mmu_try_to_unsync_pages(
            kvm, mmu, slot, gfn, synchronizing=synchronizing, prefetch=prefetch
        )

    made = make_spte(
        mmu.masks,
        level=level,
        ad_disabled=False,
        pte_access=pte_access,
        pfn=pfn,
        old_spte=sptep.get(),
        prefetch=fault is None,
        synchronizing=False,
        host_writable=fault is None or fault.map_writable,
        mmu_try_to_unsync_pages=unsync_hook,
    )
    ret = RetPf.FIXED
    if sptep.get() == made.spte:
        ret = RetPf.SPURIOUS
    else:
        flush |= mmu_spte_update(kvm, mmu, sptep, made.spte)
    if is_writable_pte(made.spte):
        mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
    if made.wrprot and fault is not None and fault.write:
        ret = RetPf.WRITE_PROTECTED
    if flush:
        kvm.arch.kvm_flush_remote_tlbs(kvm)
    if not was_rmapped:
        kvm.warn_on(ret is RetPf.SPURIOUS, "X1", f"spurious fault on unmapped {sptep}")
        rmap_add(kvm, slot, sptep, gfn, pte_access)
    else:
        # Already rmapped (same pfn): only the access may have changed; the gfn stays the
        # rmap's.
        kvm_mmu_page_set_access(sptep.sp, sptep.index, pte_access)
    return ret
