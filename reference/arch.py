"""The hooks an architecture fills in, and the memslot layer's own (empty) MMU.

The generic code in kvm_main.py calls these at fixed points of every memslot update and
dirty-log harvest. This base class is the memslot layer with no MMU at all: nothing maps guest
memory, so there is nothing to flush, zap or write-protect, and every hook only records that
it ran (tests use the record to check the order of the generic protocol). Architectures
(issue-by-issue: a minimal flat MMU, x86, arm64, POWER) subclass it.

kernel: include/linux/kvm_host.h (kvm_arch_* declarations) (v6.18)
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from kvmspec.spec.uapi.memslot_rules import MrChange, kvm_arch_prepare_memory_region_errno

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot
    from kvmspec.reference.mmu_notifier import KvmGfnRange

ArchEvent = tuple[str, object]


class KvmArch:
    """Architecture hooks. ``events`` keeps the most recent hook calls, oldest first.

    ``lockless_aging`` says the architecture ages without mmu_lock (an RCU walk and a
    compare-and-exchange on each accessed bit): the generic notifier then calls kvm_age_gfn
    and kvm_test_age_gfn without taking the lock. In v6.18 x86 (for its TDP MMU; the shadow
    MMU takes the lock itself) and s390 select CONFIG_KVM_MMU_LOCKLESS_AGING; arm64 ages
    under the lock, and seed 001 is the thread that proposed doing it locklessly there.
    """

    lockless_aging = False

    def __init__(self) -> None:
        self.events: deque[ArchEvent] = deque(maxlen=256)

    def kvm_arch_prepare_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> int:
        """Validate the new slot against the MMU's limits and allocate arch metadata."""
        self.events.append(("prepare", change))
        if new is None:
            return 0
        return kvm_arch_prepare_memory_region_errno(kvm.profile, change, new.base_gfn, new.npages)

    def kvm_arch_commit_memory_region(
        self,
        kvm: Kvm,
        old: KvmMemorySlot | None,
        new: KvmMemorySlot | None,
        change: MrChange,
    ) -> None:
        """React to the committed change (enable write-protection for logging, and so on)."""
        self.events.append(("commit", change))

    def kvm_arch_flush_shadow_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Remove every mapping that goes through ``slot`` (which is INVALID by now)."""
        self.events.append(("flush_shadow_memslot", slot))

    def kvm_arch_flush_shadow_all(self, kvm: Kvm) -> None:
        """Remove every mapping of guest memory (the VMM's address space is going away)."""
        self.events.append(("flush_shadow_all", None))

    def kvm_arch_guest_memory_reclaimed(self, kvm: Kvm) -> None:
        """Memory that guests could reach was taken away (cache maintenance on some arches)."""
        self.events.append(("guest_memory_reclaimed", None))

    def kvm_arch_memslots_updated(self, kvm: Kvm, generation: int) -> None:
        """A new memslot generation is published (x86 invalidates MMIO SPTEs with it)."""
        self.events.append(("memslots_updated", generation))

    def kvm_arch_mmu_enable_log_dirty_pt_masked(
        self, kvm: Kvm, slot: KvmMemorySlot, gfn_offset: int, mask: int
    ) -> None:
        """Write-protect the pages of ``mask`` (bit i = page gfn_offset + i) again, so that the
        next guest write to each is logged."""
        self.events.append(("reprotect", (slot, gfn_offset, mask)))

    def kvm_unmap_gfn_range(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Drop every mapping of the range (an MMU-notifier invalidation); True if the TLBs
        must be flushed. With no MMU there is nothing mapped."""
        self.events.append(("unmap_gfn_range", gfn_range))
        return False

    def kvm_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Clear the accessed state of the range's mappings; True if any was accessed."""
        self.events.append(("age_gfn", gfn_range))
        return False

    def kvm_test_age_gfn(self, kvm: Kvm, gfn_range: KvmGfnRange) -> bool:
        """Was any mapping of the range accessed? Changes nothing."""
        self.events.append(("test_age_gfn", gfn_range))
        return False

    def kvm_flush_remote_tlbs(self, kvm: Kvm) -> None:
        """Make every vCPU drop every stale translation before userspace is answered."""
        self.events.append(("flush_tlbs", None))

    def kvm_arch_free_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Release the architecture's per-slot metadata (rmaps, lpage_info, ...)."""
        self.events.append(("free_memslot", slot))

    def kvm_flush_remote_tlbs_memslot(self, kvm: Kvm, slot: KvmMemorySlot) -> None:
        """Make every vCPU drop stale translations of ``slot`` before userspace is answered."""
        self.events.append(("flush_tlbs_memslot", slot))
