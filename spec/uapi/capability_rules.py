"""What KVM_CHECK_EXTENSION must answer on a VM fd for the memory capabilities.

The answers are the uAPI's promises as Documentation/virt/kvm/api.rst states them, filled
in with the platform profile: a VMM sizes its memslot table from KVM_CAP_NR_MEMSLOTS, picks
the dirty ring size from KVM_CAP_DIRTY_LOG_RING and decides to ask for READONLY slots from
KVM_CAP_READONLY_MEM, so a wrong answer breaks it as surely as a wrong errno would. The
values measured on this machine's kernel are in FINDINGS.md section 2.

This is the contract's statement, written apart from the reference's
(``kvmspec.reference.capabilities``, which follows the kernel's generic-then-arch code), so
that each checks the other.
"""

from __future__ import annotations

from kvmspec.spec.platforms import PlatformProfile

ALWAYS_ONE = frozenset(
    {
        "KVM_CAP_USER_MEMORY",
        "KVM_CAP_USER_MEMORY2",
        "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS",
        "KVM_CAP_SYNC_MMU",
    }
)
"""Capabilities every 6.18 kernel has, answered with 1: the memslot ioctls (both versions),
the fix that joins adjacent regions, and MMU notifiers."""


def check_extension_answer(profile: PlatformProfile, name: str) -> int:
    """The value KVM_CHECK_EXTENSION(``name``) must return on a VM of ``profile``; 0 means
    the capability is absent (unknown capabilities are absent too)."""
    if name in profile.extra_capabilities:
        return profile.extra_capabilities[name]
    if name in ALWAYS_ONE:
        return 1
    if name == "KVM_CAP_NR_MEMSLOTS":
        return profile.user_mem_slots
    if name == "KVM_CAP_MMU_SHADOW_CACHE_CONTROL":
        # The shadow-page limit (KVM_SET_NR_MMU_PAGES) is x86's alone.
        return 1 if profile.arch == "x86_64" else 0
    if name == "KVM_CAP_READONLY_MEM":
        return 1 if profile.has_readonly_mem else 0
    if name == "KVM_CAP_MULTI_ADDRESS_SPACE":
        # The capability exists only where there is more than one address space (SMM).
        return profile.nr_address_spaces if profile.nr_address_spaces > 1 else 0
    if name == "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2":
        return profile.manual_dirty_log_protect  # the flags KVM_ENABLE_CAP accepts
    if name == "KVM_CAP_DIRTY_LOG_RING":
        return profile.dirty_ring_max_bytes if profile.dirty_ring_tso else 0
    if name == "KVM_CAP_DIRTY_LOG_RING_ACQ_REL":
        return profile.dirty_ring_max_bytes if profile.dirty_ring_acq_rel else 0
    if name == "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP":
        return 1 if profile.dirty_ring_with_bitmap else 0
    if name == "KVM_CAP_GUEST_MEMFD":
        return 1 if profile.supports_guest_memfd else 0
    if name == "KVM_CAP_GUEST_MEMFD_FLAGS":
        return profile.guest_memfd_flags
    if name == "KVM_CAP_VM_TYPES":
        return profile.vm_types  # a bit per VM type KVM_CREATE_VM accepts
    # KVM_CAP_MEMORY_ATTRIBUTES (no private memory on these profiles), KVM_CAP_DISABLE_QUIRKS2
    # where the profile does not list the quirks, and anything unknown.
    return 0
