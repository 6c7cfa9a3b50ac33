"""struct kvm: one virtual machine's memory-management state.

kernel: include/linux/kvm_host.h:struct kvm; virt/kvm/kvm_main.c:kvm_create_vm (v6.18)
"""

from __future__ import annotations

from kvmspec.reference.arch import KvmArch
from kvmspec.reference.concurrency import Mutex, Rcu, RwLock, Srcu
from kvmspec.reference.guest_memfd import GmemFile
from kvmspec.reference.memslots import KvmMemslots
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import KVM_X86_QUIRK_SLOT_ZAP_ALL
from kvmspec.spec.uapi.dirty_log_rules import uses_dirty_bitmap


class Kvm:
    """A VM. Each address space has two memslot sets; ``active_index[as_id]`` says which one
    vCPUs see (the kernel's ``kvm->memslots[as_id]`` pointer)."""

    def __init__(self, profile: PlatformProfile, arch: KvmArch | None = None) -> None:
        self.profile = profile
        self.arch = arch if arch is not None else KvmArch()
        # kvm->__memslots[as_id][0..1], and which of the two is published.
        self.memslot_sets: list[tuple[KvmMemslots, KvmMemslots]] = [
            (KvmMemslots(as_id), KvmMemslots(as_id)) for as_id in range(profile.nr_address_spaces)
        ]
        self.active_index: list[int] = [0] * profile.nr_address_spaces
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        # Serialises memslot updates and dirty-log harvests (kvm->slots_lock).
        self.slots_lock = Mutex("slots_lock")
        # Held from copying the active set until the new one is published (slots_arch_lock).
        self.slots_arch_lock = Mutex("slots_arch_lock")
        # Readers of the memslots (vCPUs, faults) hold kvm->srcu; a swap waits them out.
        self.srcu = Srcu("kvm->srcu")
        # Every change to the MMU's translations happens under mmu_lock (a reader-writer
        # lock on x86 and arm64); lockless walkers are RCU readers instead.
        self.mmu_lock = RwLock("kvm->mmu_lock")
        self.rcu = Rcu("rcu")
        # MMU notifier invalidations that have started and not ended; a memslot swap waits
        # for zero so that every start/end pair sees the same memslots (invariant M11).
        self.mn_active_invalidate_count = 0
        # The fault-exclusion counters of mmu_notifier.py: finished invalidations, open
        # ones, and the union of the open ones' gfn ranges ([start, end), -1 when unset).
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = -1
        self.mmu_invalidate_range_end = -1
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False
        self.disabled_quirks = 0
        self.created_vcpus = 0
        self.vcpus: dict[int, KvmVcpu] = {}
        self.gmem_files: list[GmemFile] = []
        # arm64 saves the vgic ITS tables into guest memory from an ioctl, with no vCPU
        # running; only then may KVM dirty guest memory without a vCPU (D10).
        self.save_its_tables_in_progress = False
        # Every WARN_ON (and lockdep assertion) that fired, as (rule, message). The kernel
        # keeps running after a WARN, so does the model; each one is a finding, and the
        # invariants report it under the rule it breaks.
        self.warnings: list[tuple[str, str]] = []

    # Accessors named as in the kernel ------------------------------------------------------

    def memslots(self, as_id: int) -> KvmMemslots:
        """The active set of an address space (__kvm_memslots)."""
        return self.memslot_sets[as_id][self.active_index[as_id]]

    def inactive_memslots(self, as_id: int) -> KvmMemslots:
        """The set a writer edits (kvm_get_inactive_memslots)."""
        return self.memslot_sets[as_id][self.active_index[as_id] ^ 1]

    def use_dirty_bitmap(self) -> bool:
        """kernel: virt/kvm/dirty_ring.c:kvm_use_dirty_bitmap (v6.18)"""
        return uses_dirty_bitmap(bool(self.dirty_ring_size), self.dirty_ring_with_bitmap)

    def all_memslots_empty(self) -> bool:
        """kernel: virt/kvm/kvm_main.c:kvm_are_all_memslots_empty (v6.18)"""
        return all(len(self.memslots(as_id)) == 0 for as_id in range(len(self.memslot_sets)))

    def warn_on(self, condition: bool, rule: str, message: str) -> bool:
        """WARN_ON_ONCE: record ``message`` against ``rule`` when ``condition`` holds;
        returns ``condition``."""
        if condition and (rule, message) not in self.warnings:
            self.warnings.append((rule, message))
        return condition

    def lockdep_assert_mmu_lock_held_write(self, what: str) -> None:
        """lockdep_assert_held_write(&kvm->mmu_lock): ``what`` changes translations."""
        self.warn_on(not self.mmu_lock.held_for_write, "LOCKING", f"{what} without mmu_lock")

    def quirk_slot_zap_all(self) -> bool:
        """KVM_X86_QUIRK_SLOT_ZAP_ALL is on unless userspace disabled it (x86 only)."""
        return self.profile.quirk_slot_zap_all and not (
            self.disabled_quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL
        )
