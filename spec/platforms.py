"""Platform profiles: the numbers and options that make one KVM differ from another.

A profile is data. Behaviour that changes between kernel versions, configurations or
architectures is a named field here, never an ``if`` scattered through the model. The
reference, the rules and the targets all read the same profile.

``x86_64-linux-6.18-pvm`` reproduces the KVM of the machines this project is developed on
(measured in ``shared/kvm-reference/linux-kvm-here/FINDINGS.md``): x86-64 with the shadow MMU,
one address space (no SMM), 32764 user slots and a 52-bit gfn limit.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace

from kvmspec.spec.uapi.constants import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_DIRTY_GFN_ENTRY_SIZE,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_MEM_SLOTS_NUM,
)


@dataclass(frozen=True)
class PlatformProfile:
    """What one platform's KVM promises about memory, as numbers and switches."""

    name: str
    arch: str
    """``x86_64``, ``arm64`` or ``ppc64``."""
    page_shift: int
    nr_address_spaces: int
    """kvm_arch_nr_memslot_as_ids(): 2 on x86 with SMM, otherwise 1."""
    user_mem_slots: int
    """KVM_USER_MEM_SLOTS: KVM_MEM_SLOTS_NUM minus the architecture's internal slots."""
    internal_slots: tuple[tuple[str, int], ...]
    """Internal memslots (name, id), with ids at and above ``user_mem_slots``."""
    user_address_limit: int
    """TASK_SIZE_MAX: ``userspace_addr + memory_size`` must not exceed it (access_ok)."""
    max_gfn: int | None
    """The last gfn arch prepare accepts for CREATE and MOVE (None: no arch limit)."""
    max_gfn_errno: int
    """The errno of that check: EINVAL on x86, EFAULT on arm64 (IPA size)."""
    has_readonly_mem: bool
    supports_guest_memfd: bool
    guest_memfd_flags: int
    vm_types: int
    """KVM_CAP_VM_TYPES: bit N set when KVM_CREATE_VM accepts type N."""
    manual_dirty_log_protect: int
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: the allowed argument bits (0: unsupported)."""
    dirty_ring_tso: bool
    """KVM_CAP_DIRTY_LOG_RING (total store order architectures)."""
    dirty_ring_acq_rel: bool
    """KVM_CAP_DIRTY_LOG_RING_ACQ_REL (weakly ordered architectures)."""
    dirty_ring_with_bitmap: bool
    dirty_ring_extra_reserved: int
    """kvm_cpu_dirty_log_size(): extra ring entries held back (the PML buffer on Intel)."""
    mmu: str
    """``shadow`` or ``tdp`` on x86, ``stage2`` on arm64, ``hpt`` or ``radix`` on POWER."""
    quirk_slot_zap_all: bool
    """KVM_X86_QUIRK_SLOT_ZAP_ALL: DELETE and MOVE zap every mapping, not just the slot's."""
    invalid_slot_fault: str
    """How a fault on an INVALID slot is handled: ``retry`` (x86) or ``mmio`` (arm64, POWER)."""
    extra_capabilities: dict[str, int] = field(default_factory=dict)
    """KVM_CHECK_EXTENSION answers that are not derived from the fields above."""
    pvm_top_level_copy: bool = False
    """x86 shadow MMU under this machine's PVM backend: a vCPU that runs beside another one
    walks its own copy of the root's top-level entries, filled lazily and renewed by TLB
    flushes (reference/x86/pvm_top_level.py; measured, not architectural)."""

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def dirty_ring_max_bytes(self) -> int:
        return KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_ENTRY_SIZE

    @property
    def dirty_ring_supported(self) -> bool:
        return self.dirty_ring_tso or self.dirty_ring_acq_rel

    def internal_slot_ids(self) -> tuple[int, ...]:
        return tuple(slot_id for _name, slot_id in self.internal_slots)


_X86_INTERNAL = (
    ("TSS_PRIVATE_MEMSLOT", 32764),
    ("APIC_ACCESS_PAGE_PRIVATE_MEMSLOT", 32765),
    ("IDENTITY_PAGETABLE_PRIVATE_MEMSLOT", 32766),
)
_X86_TASK_SIZE_MAX = (1 << 47) - (1 << 12)

X86_64_LINUX_6_18_PVM = PlatformProfile(
    name="x86_64-linux-6.18-pvm",
    arch="x86_64",
    page_shift=12,
    nr_address_spaces=1,
    user_mem_slots=KVM_MEM_SLOTS_NUM - len(_X86_INTERNAL),
    internal_slots=_X86_INTERNAL,
    user_address_limit=_X86_TASK_SIZE_MAX,
    max_gfn=(1 << 40) - 1,  # 52-bit guest physical addresses, shadow paging
    max_gfn_errno=errno.EINVAL,
    has_readonly_mem=True,
    supports_guest_memfd=True,
    guest_memfd_flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    vm_types=1 << 0,
    manual_dirty_log_protect=KVM_DIRTY_LOG_MANUAL_CAPS,
    dirty_ring_tso=True,
    dirty_ring_acq_rel=True,
    dirty_ring_with_bitmap=False,
    dirty_ring_extra_reserved=0,
    mmu="shadow",
    quirk_slot_zap_all=True,
    invalid_slot_fault="retry",
    extra_capabilities={"KVM_CAP_DISABLE_QUIRKS2": 0x5FF},
    pvm_top_level_copy=True,
)

X86_64 = PlatformProfile(
    name="x86_64",
    arch="x86_64",
    page_shift=12,
    nr_address_spaces=2,  # address space 1 is System Management Mode
    user_mem_slots=KVM_MEM_SLOTS_NUM - len(_X86_INTERNAL),
    internal_slots=_X86_INTERNAL,
    user_address_limit=_X86_TASK_SIZE_MAX,
    max_gfn=(1 << 40) - 1,
    max_gfn_errno=errno.EINVAL,
    has_readonly_mem=True,
    supports_guest_memfd=True,
    guest_memfd_flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    vm_types=1 << 0,
    manual_dirty_log_protect=KVM_DIRTY_LOG_MANUAL_CAPS,
    dirty_ring_tso=True,
    dirty_ring_acq_rel=True,
    dirty_ring_with_bitmap=False,
    dirty_ring_extra_reserved=0,
    mmu="tdp",
    quirk_slot_zap_all=True,
    invalid_slot_fault="retry",
    extra_capabilities={"KVM_CAP_DISABLE_QUIRKS2": 0x5FF},
)

ARM64 = PlatformProfile(
    name="arm64",
    arch="arm64",
    page_shift=12,  # 4K granule
    nr_address_spaces=1,
    user_mem_slots=KVM_MEM_SLOTS_NUM,
    internal_slots=(),
    user_address_limit=1 << 48,
    max_gfn=(1 << (40 - 12)) - 1,  # the default 40-bit IPA space
    max_gfn_errno=errno.EFAULT,
    has_readonly_mem=True,
    supports_guest_memfd=True,
    guest_memfd_flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    vm_types=1 << 0,
    manual_dirty_log_protect=KVM_DIRTY_LOG_MANUAL_CAPS,
    dirty_ring_tso=False,
    dirty_ring_acq_rel=True,
    dirty_ring_with_bitmap=True,
    dirty_ring_extra_reserved=0,
    mmu="stage2",
    quirk_slot_zap_all=False,
    invalid_slot_fault="mmio",
)

PPC64_HV = PlatformProfile(
    name="ppc64-hv",
    arch="ppc64",
    page_shift=16,  # 64K base pages, the usual Book3S-64 configuration
    nr_address_spaces=1,
    user_mem_slots=KVM_MEM_SLOTS_NUM,
    internal_slots=(),
    user_address_limit=1 << 52,
    max_gfn=None,
    max_gfn_errno=errno.EINVAL,
    has_readonly_mem=False,
    supports_guest_memfd=False,
    guest_memfd_flags=0,
    vm_types=1 << 0,
    manual_dirty_log_protect=0,  # no KVM_GENERIC_DIRTYLOG_READ_PROTECT on POWER
    dirty_ring_tso=False,
    dirty_ring_acq_rel=False,
    dirty_ring_with_bitmap=False,
    dirty_ring_extra_reserved=0,
    mmu="hpt",
    quirk_slot_zap_all=False,
    invalid_slot_fault="mmio",
)

PPC64_HV_RADIX = replace(PPC64_HV, name="ppc64-hv-radix", mmu="radix")
"""POWER9 and later with a radix guest: the same memslot uAPI as ``ppc64-hv``, with the
partition-scoped radix tree (reference/ppc/radix_*.py) instead of the hashed page table."""

PROFILES: dict[str, PlatformProfile] = {
    profile.name: profile
    for profile in (X86_64_LINUX_6_18_PVM, X86_64, ARM64, PPC64_HV, PPC64_HV_RADIX)
}
DEFAULT_PROFILE = X86_64_LINUX_6_18_PVM
