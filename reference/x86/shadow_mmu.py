"""The x86 shadow MMU as the generic layer sees it: the KvmArch hooks.

The memslot layer, the MMU notifiers and the dirty log call these hooks at fixed points
(reference/arch.py). Each one does here what x86 does with shadow paging:

* a new slot (CREATE, or the new copy of a MOVE) gets empty rmaps and write-track
  counts, and its huge-page counts (lpage.py); a FLAGS_ONLY copy shares the old slot's;
  a MOVE frees the old slot's at commit;
* switching dirty logging on write-protects the slot's leaves, huge ones included, and
  flushes (D1, D4); harvesting write-protects the harvested pages again; switching it off
  zaps the 4K leaves that could be huge again (kvm_mmu_recover_huge_pages);
* DELETE and MOVE flush the slot: with KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) by a
  fast zap of *every* shadow page (FINDINGS 5.4 measured the refaults), otherwise by
  zapping the slot's leaves and the pages that shadow its gfns;
* an MMU-notifier invalidation zaps the leaves of the range through the rmaps, and asks
  every vCPU to reload the APIC-access page's address when the range is that page's
  (apic_access.py, seed 004);
* aging reads and clears the A bits of the range's leaves;
* a TLB flush flushes every vCPU's TLB (the shadow MMU has no ranged flush here);
* each new memslot generation is checked for a wrap of the 19-bit MMIO generation, which
  zaps every shadow page, MMIO SPTEs with them (X11).

kernel: arch/x86/kvm/x86.c:kvm_arch_prepare_memory_region, kvm_alloc_memslot_metadata,
kvm_arch_commit_memory_region, kvm_mmu_slot_apply_flags, kvm_arch_free_memslot,
kvm_arch_mmu_enable_log_dirty_pt_masked;
arch/x86/kvm/mmu/mmu.c:kvm_arch_flush_shadow_memslot, kvm_memslot_flush_zap_all,
kvm_mmu_zap_memslot, kvm_arch_flush_shadow_all, kvm_unmap_gfn_range, kvm_age_gfn,
kvm_test_age_gfn, kvm_mmu_slot_remove_write_access, kvm_mmu_write_protect_pt_masked,
kvm_mmu_recover_huge_pages, kvm_mmu_zap_collapsible_spte, kvm_mmu_invalidate_mmio_sptes;
arch/x86/kvm/x86.c:kvm_arch_memslots_updated (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.host import HostMm
from kvmspec.reference.x86.apic_access import KVM_REQ_APIC_PAGE_RELOAD, apic_access_page_slot
from kvmspec.reference.x86.lpage import kvm_alloc_memslot_lpage_info, kvm_mmu_max_mapping_level
from kvmspec.reference.x86.mmio_spte import kvm_mmu_invalidate_mmio_sptes
from kvmspec.reference.x86.mmu_page import ShadowMmuState
from kvmspec.reference.x86.mmu_pages import kvm_mmu_commit_default_mmu_pages
from kvmspec.reference.x86.mmu_spte import (
    drop_spte,
    kvm_mmu_slot_gfn_write_protect,
    kvm_rmap_age_gfn_range,
    kvm_rmap_zap_gfn_range,
    rmap_write_protect,
)
from kvmspec.reference.x86.paging import PG_LEVEL_2M, PG_LEVEL_4K
from kvmspec.reference.x86.rmap import kvm_alloc_memslot_rmaps, slot_rmap_heads, slot_rmaps
from kvmspec.reference.x86.spte import SpteMasks
from kvmspec.reference.x86.zap import (
    kvm_make_all_cpus_request,
    kvm_mmu_zap_all,
    kvm_mmu_zap_all_fast,
    kvm_mmu_zap_memslot_pages_and_flush,
)
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange


class ShadowMmu(ShadowMmuState, KvmArch):
    """``kvm->arch`` of a VM with shadow paging: the state of mmu_page.ShadowMmuState and
    the generic layer's hooks. ``mm`` is the VMM's address space (``kvm->mm``), whose page
    tables tell which pages the host maps huge; without it (a VM whose host is not
    modelled) no 4K leaf is ever found collapsible when dirty logging stops."""

    def __init__(
        self, masks: SpteMasks, mm: HostMm | None = None, *, pvm_top_level_copy: bool = False
    ) -> None:
        KvmArch.__init__(self)
        ShadowMmuState.__init__(self, masks, pvm_top_level_copy=pvm_top_level_copy)
        self.mm = mm
        # Whether the private slots of apic_access.py exist (kvm->arch flags of those names).
        self.apic_access_memslot_enabled = False
        self.ept_identity_pagetable_done = False

    # -- memslot metadata ----------------------------------------------------------------

    def kvm_arch_prepare_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> int:
        errno = super().kvm_arch_prepare_memory_region(kvm, old, new, change)
        if errno or new is None:
            return errno
        if change in (MrChange.CREATE, MrChange.MOVE):
            kvm_alloc_memslot_rmaps(new)
            kvm_alloc_memslot_lpage_info(new)
            new.arch["gfn_write_track"] = {}
        elif change is MrChange.FLAGS_ONLY and old is not None:
            # The kernel copies the arch struct: both slots point at the same arrays.
            new.arch = dict(old.arch)
        return 0

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        super().kvm_arch_commit_memory_region(kvm, old, new, change)
        kvm_mmu_commit_default_mmu_pages(kvm, self, change)
        if new is not None and change is MrChange.FLAGS_ONLY and old is not None:
            self.kvm_mmu_slot_apply_flags(kvm, old, new)
        if change is MrChange.MOVE and old is not None:
            self.kvm_arch_free_memslot(kvm, old)

    def kvm_mmu_slot_apply_flags(self, kvm: Kvm, old: KvmMemorySlot, new: KvmMemorySlot) -> None:
        """A FLAGS_ONLY change toggled dirty logging (a new or moved slot has no mappings
        yet; a READONLY slot has no writable ones).

        Switched on: write-protect every leaf of the slot, huge ones included (unless the
        bitmap starts all set, D5), and flush unconditionally, so each page's next write
        faults, and is logged (D1) through a 4K leaf that replaces the huge one (D4). The
        shadow MMU does not split huge leaves eagerly (eager_page_split needs the TDP MMU).
        Switched off: let huge pages come back (kvm_mmu_recover_huge_pages).

        kernel: arch/x86/kvm/x86.c:kvm_mmu_slot_apply_flags;
        arch/x86/kvm/mmu/mmu.c:kvm_mmu_slot_remove_write_access,
        kvm_mmu_slot_try_split_huge_pages (v6.18)
        """
        if new.readonly or old.dirty_logging == new.dirty_logging:
            return
        if not new.dirty_logging:
            self.kvm_mmu_recover_huge_pages(kvm, new)
            return
        if not kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            with kvm.mmu_lock.write():
                for level, gfn, _head in slot_rmap_heads(new, new.base_gfn, new.end_gfn):
                    rmap_write_protect(kvm, self, new, gfn, level, pt_protect=False)
        self.kvm_flush_remote_tlbs_memslot(kvm, new)

    def kvm_mmu_recover_huge_pages(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Dirty logging is off: zap every 4K leaf of a *direct* page (a piece of a guest
        huge page) whose gfn could now be mapped larger, so the next fault maps it huge.
        Leaves of indirect pages stay: the guest itself maps those with 4K pages. Only 4K
        leaves are looked at: while logging, the shadow MMU makes nothing larger.

        kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_recover_huge_pages,
        kvm_mmu_zap_collapsible_spte (v6.18)
        """
        if self.mm is None:
            return
        flush = False
        with kvm.mmu_lock.write():
            for level, gfn, head in slot_rmap_heads(slot, slot.base_gfn, slot.end_gfn):
                if level != PG_LEVEL_4K:
                    continue
                for sptep in head:
                    sp = sptep.sp
                    if sp.role.direct and sp.role.level < kvm_mmu_max_mapping_level(
                        self.mm, slot, gfn
                    ):
                        drop_spte(kvm, self, sptep)
                        flush = True
        if flush:
            self.kvm_flush_remote_tlbs_memslot(kvm, slot)

    def kvm_arch_free_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_arch_free_memslot(kvm, slot)
        if "rmap" in slot.arch:
            slot_rmaps(slot).freed = True

    def kvm_arch_memslots_updated(self, kvm: Kvm, generation: int) -> None:
        """A new memslot generation is published. MMIO SPTEs keep only its low 19 bits:
        when those wrap, an SPTE made 2^19 generations ago would match again, so every
        shadow page goes (kvm_mmu_zap_all_fast).

        kernel: arch/x86/kvm/x86.c:kvm_arch_memslots_updated;
        arch/x86/kvm/mmu/mmu.c:kvm_mmu_invalidate_mmio_sptes (v6.18)
        """
        super().kvm_arch_memslots_updated(kvm, generation)
        if kvm_mmu_invalidate_mmio_sptes(generation, kvm.profile.nr_address_spaces):
            kvm_mmu_zap_all_fast(kvm, self)

    # -- removing mappings ---------------------------------------------------------------

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """kernel: arch/x86/kvm/mmu/mmu.c:kvm_arch_flush_shadow_memslot,
        kvm_mmu_zap_memslot (v6.18)"""
        super().kvm_arch_flush_shadow_memslot(kvm, slot)
        if kvm.quirk_slot_zap_all():
            kvm_mmu_zap_all_fast(kvm, self)
            return
        with kvm.mmu_lock.write():
            flush = kvm_rmap_zap_gfn_range(kvm, self, slot, slot.base_gfn, slot.end_gfn)
            kvm_mmu_zap_memslot_pages_and_flush(kvm, self, slot, flush)

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        super().kvm_arch_flush_shadow_all(kvm)
        kvm_mmu_zap_all(kvm, self)

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Zap the range's leaves through the rmaps; the caller (the notifier, under
        mmu_lock) flushes when True is returned. A range of the APIC-access page's slot also
        asks every vCPU to reload that page's host address before it next enters the guest:
        the VMCS holds it, and no zap reaches it there (seed 004).

        kernel: arch/x86/kvm/mmu/mmu.c:kvm_unmap_gfn_range (v6.18)
        """
        super().kvm_unmap_gfn_range(kvm, gfn_range)
        flush = kvm_rmap_zap_gfn_range(kvm, self, gfn_range.slot, gfn_range.start, gfn_range.end)
        if gfn_range.slot.id == apic_access_page_slot(kvm):
            kvm_make_all_cpus_request(self, KVM_REQ_APIC_PAGE_RELOAD)
        return flush

    # -- aging and dirty logging ---------------------------------------------------------

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_age_gfn(kvm, gfn_range)
        return kvm_rmap_age_gfn_range(
            kvm, self, gfn_range.slot, gfn_range.start, gfn_range.end, test_only=False
        )

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        super().kvm_test_age_gfn(kvm, gfn_range)
        return kvm_rmap_age_gfn_range(
            kvm, self, gfn_range.slot, gfn_range.start, gfn_range.end, test_only=True
        )

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        """Write-protect the 4K leaves of the harvested pages (the caller holds mmu_lock and
        flushes); MMU-writable stays, so only W is cleared. A slot that started "all dirty"
        (INITIALLY_SET) may still have writable huge leaves: those over the first and last
        harvested page lose write access for good, so the next write maps 4K (D4, D5).

        kernel: arch/x86/kvm/mmu/mmu.c:kvm_arch_mmu_enable_log_dirty_pt_masked,
        kvm_mmu_write_protect_pt_masked (v6.18)
        """
        super().kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            start = slot.base_gfn + gfn_offset + (mask & -mask).bit_length() - 1
            end = slot.base_gfn + gfn_offset + mask.bit_length() - 1
            kvm_mmu_slot_gfn_write_protect(kvm, self, slot, start, PG_LEVEL_2M)
            if start >> 9 != end >> 9:  # the 64 pages straddle two 2M frames
                kvm_mmu_slot_gfn_write_protect(kvm, self, slot, end, PG_LEVEL_2M)
        bit = 0
        while mask >> bit:
            if mask >> bit & 1:
                gfn = slot.base_gfn + gfn_offset + bit
                rmap_write_protect(kvm, self, slot, gfn, PG_LEVEL_4K, pt_protect=False)
            bit += 1

    # -- TLB flushes ---------------------------------------------------------------------

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        super().kvm_flush_remote_tlbs(kvm)
        for vcpu_mmu in self.vcpus.values():
            vcpu_mmu.flush_tlb()

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        super().kvm_flush_remote_tlbs_memslot(kvm, slot)
        for vcpu_mmu in self.vcpus.values():
            vcpu_mmu.flush_tlb()
