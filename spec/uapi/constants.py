"""uAPI facts: flag bits, limits, capability numbers and errno names.

Everything here is a number that userspace can see, taken from include/uapi/linux/kvm.h and
include/linux/kvm_host.h (v6.18). Values that differ between architectures live in the
platform profiles (:mod:`kvmspec.spec.platforms`), not here.
"""

from __future__ import annotations

import errno

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

# struct kvm_userspace_memory_region(2).flags (uapi/linux/kvm.h)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# Flags KVM keeps in the upper half of memslot->flags, never visible through the uAPI
# (include/linux/kvm_host.h).
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEMSLOT_GMEM_ONLY = 1 << 17

# KVM_MEM_SLOTS_NUM is SHRT_MAX; the architecture reserves the top ids for internal slots.
KVM_MEM_SLOTS_NUM = 32767
# The largest slot in pages: the dirty bitmap index must fit in an int.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

# Bit 63 of a memslot generation: a swap of the active set is in progress.
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63

# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) arguments
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# The dirty ring (uapi/linux/kvm.h, include/linux/kvm_dirty_ring.h)
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
KVM_DIRTY_GFN_ENTRY_SIZE = 16  # sizeof(struct kvm_dirty_gfn)

# guest_memfd flags (6.18)
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

# x86 quirks (arch/x86/include/uapi/asm/kvm.h)
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7

# Capability numbers (uapi/linux/kvm.h). Only the ones the memory subsystem answers.
CAPABILITIES: dict[str, int] = {
    "KVM_CAP_MMU_SHADOW_CACHE_CONTROL": 2,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS": 30,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_MULTI_ADDRESS_SPACE": 118,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_DISABLE_QUIRKS2": 213,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_GUEST_MEMFD_FLAGS": 244,
}
CAPABILITY_NAMES: dict[int, str] = {number: name for name, number in CAPABILITIES.items()}


def errno_name(code: int) -> str | int:
    """The symbolic name of an errno (``"EINVAL"``), or 0 for success.

    Traces name errnos symbolically so that they mean the same on every libc.
    """
    if code == 0:
        return 0
    return errno.errorcode.get(code, str(code))


def errno_code(name: str | int) -> int:
    """Inverse of :func:`errno_name`: ``"EEXIST"`` -> 17, ``0`` -> 0."""
    if isinstance(name, int):
        return name
    code = getattr(errno, name, None)
    if not isinstance(code, int):
        raise ValueError(f"unknown errno name {name!r}")
    return code
