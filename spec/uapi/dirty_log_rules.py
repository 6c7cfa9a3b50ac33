"""The dirty-log ioctls and capabilities as pure decisions.

Userspace learns which guest pages were written either from a per-slot bitmap
(KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG) or from per-vCPU rings of dirty gfns. These functions
decide the errno of each request from the few facts that matter; the reference model executes
them and then performs the change.

kernel: virt/kvm/kvm_main.c:kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect,
kvm_vm_ioctl_enable_cap_generic, kvm_vm_ioctl_enable_dirty_log_ring,
kvm_vm_ioctl_reset_dirty_pages (v6.18)
"""

from __future__ import annotations

from errno import E2BIG, EINVAL, ENOENT, ENXIO

from kvmspec.spec.dbc import checked
from kvmspec.spec.platforms import ARM64, X86_64, PlatformProfile
from kvmspec.spec.uapi.constants import (
    KVM_DIRTY_GFN_ENTRY_SIZE,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_RSVD_ENTRIES,
)

BITS_PER_LONG = 64


def dirty_bitmap_words(npages: int) -> int:
    """The number of 64-bit words of a slot's dirty bitmap: one bit per page, rounded up.

    kernel: include/linux/kvm_host.h:kvm_dirty_bitmap_bytes (v6.18)
    """
    return (npages + BITS_PER_LONG - 1) // BITS_PER_LONG


def slot_address_errno(profile: PlatformProfile, slot: int) -> int:
    """The dirty-log ioctls take a u32 slot: as_id in bits 16-31, id in 0-15; EINVAL if out of
    range. Internal slots are not reachable either."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= profile.nr_address_spaces or slot_id >= profile.user_mem_slots:
        return EINVAL
    return 0


@checked
def get_dirty_log_errno(
    profile: PlatformProfile, uses_dirty_bitmap: bool, slot: int, slot_has_bitmap: bool
) -> int:
    """KVM_GET_DIRTY_LOG: ENXIO when the VM logs to rings only, EINVAL for a bad slot number,
    ENOENT when the slot does not exist or is not dirty-logged.

    post: __return__ in (0, ENXIO, EINVAL, ENOENT)

    kernel: virt/kvm/kvm_main.c:kvm_get_dirty_log_protect (v6.18)
    """
    if not uses_dirty_bitmap:
        return ENXIO
    if slot_address_errno(profile, slot):
        return EINVAL
    if not slot_has_bitmap:
        return ENOENT
    return 0


@checked
def clear_dirty_log_errno(
    profile: PlatformProfile,
    uses_dirty_bitmap: bool,
    slot: int,
    slot_npages: int | None,
    first_page: int,
    num_pages: int,
) -> int:
    """KVM_CLEAR_DIRTY_LOG. ``slot_npages`` is None when the slot is missing or not logged.

    The range must start on a 64-page boundary and stay inside the slot, and may end short of
    the slot's end only on a 64-page boundary (whole bitmap words). Manual protection does not
    have to be enabled: the kernel does not check it.

    pre: 0 <= first_page < 2**64 and 0 <= num_pages < 2**32
    pre: slot_npages is None or 0 < slot_npages < 2**31
    post: __return__ in (0, ENXIO, EINVAL, ENOENT)
    post: __return__ != 0 or (slot_npages is not None and first_page + num_pages <= slot_npages)

    kernel: virt/kvm/kvm_main.c:kvm_clear_dirty_log_protect, kvm_vm_ioctl_clear_dirty_log (v6.18)
    """
    if not uses_dirty_bitmap:
        return ENXIO
    if slot_address_errno(profile, slot):
        return EINVAL
    if first_page % BITS_PER_LONG:
        return EINVAL
    if slot_npages is None:
        return ENOENT
    if first_page > slot_npages or num_pages > slot_npages - first_page:
        return EINVAL
    if num_pages < slot_npages - first_page and num_pages % BITS_PER_LONG:
        return EINVAL
    return 0


def _slot_ok(x86: bool, slot: int) -> bool:
    """Does the u32 ``slot`` name a user slot of an address space the VM has? x86 has two
    address spaces (SMM is the second) and 32764 user slots, arm64 one and 32767 (SHRT_MAX)."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    return as_id < (2 if x86 else 1) and slot_id < (32764 if x86 else 32767)


def _fits(first_page: int, num_pages: int, npages: int) -> bool:
    """Does the range start on a 64-page boundary, end inside a slot of ``npages`` pages,
    and cover whole 64-page bitmap words except where it ends at the slot's end?"""
    end = first_page + num_pages
    return first_page % 64 == 0 and end <= npages and (num_pages % 64 == 0 or end == npages)


@checked
def clear_dirty_log_for_crosshair(
    x86: bool, uses_bitmap: bool, slot: int, npages: int, first_page: int, num_pages: int
) -> int:
    """:func:`clear_dirty_log_errno` with plain arguments, for CrossHair to explore, on x86
    or arm64; ``npages`` is the slot's size, 0 for a slot missing or not dirty-logged.

    The postconditions are the rule as userspace meets it, in the kernel's order: ENXIO for
    a VM without bitmaps comes before everything; a bad slot number and a first page off a
    64-page boundary (EINVAL) come before the slot lookup (ENOENT), which comes before the
    range check. An accepted range lies inside the slot (so every bitmap word it clears is
    the slot's) in whole words except at the slot's end. Each errno is given only for its
    own reasons, so together the lines fix the answer for every input.

    pre: 0 <= slot <= 0xFFFFFFFF and 0 <= num_pages <= 0xFFFFFFFF
    pre: 0 <= first_page < 2**64 and 0 <= npages < 2**31
    post: __return__ in (0, ENXIO, EINVAL, ENOENT)
    post: (__return__ == ENXIO) == (not uses_bitmap)
    post: not uses_bitmap or _slot_ok(x86, slot) or __return__ == EINVAL
    post: not uses_bitmap or first_page % 64 == 0 or __return__ == EINVAL
    post: __return__ != ENOENT or (npages == 0 and first_page % 64 == 0)
    post: __return__ != 0 or (npages > 0 and _fits(first_page, num_pages, npages))
    post: __return__ != EINVAL or not (_slot_ok(x86, slot) and _fits(first_page, num_pages, npages))

    kernel: virt/kvm/kvm_main.c:kvm_clear_dirty_log_protect (v6.18)
    """
    profile = X86_64 if x86 else ARM64
    return clear_dirty_log_errno(profile, uses_bitmap, slot, npages or None, first_page, num_pages)


def enable_manual_dirty_log_protect_errno(profile: PlatformProfile, flags: int, arg0: int) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): INITIALLY_SET is accepted only with
    ENABLE; flags must be 0. It may be changed, or switched off, at any time.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_enable_cap_generic (v6.18)
    """
    if not profile.manual_dirty_log_protect:
        return EINVAL
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = profile.manual_dirty_log_protect
    if flags or arg0 & ~allowed:
        return EINVAL
    return 0


def dirty_ring_reserved_entries(profile: PlatformProfile) -> int:
    """Entries each ring keeps free for pushes that happen before the vCPU can exit.

    kernel: virt/kvm/dirty_ring.c:kvm_dirty_ring_get_rsvd_entries (v6.18)
    """
    return KVM_DIRTY_RING_RSVD_ENTRIES + profile.dirty_ring_extra_reserved


def enable_dirty_log_ring_errno(
    profile: PlatformProfile,
    acq_rel: bool,
    size: int,
    ring_already_enabled: bool,
    vcpus_created: bool,
) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING or ..._ACQ_REL), ``size`` in bytes (the low 32
    bits of args[0]: the kernel passes it on as a u32).

    The size must be a power of two, hold at least the reserved entries and one page, and at
    most KVM_DIRTY_RING_MAX_ENTRIES entries (E2BIG). The ring can be set once, and only
    before any vCPU exists, because each vCPU allocates its ring at creation. Every size
    error comes before those two; the capability's flags are not checked.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_enable_dirty_log_ring (v6.18)
    """
    supported = profile.dirty_ring_acq_rel if acq_rel else profile.dirty_ring_tso
    if not supported:
        return EINVAL
    if size == 0 or size & (size - 1):
        return EINVAL
    if (
        size < dirty_ring_reserved_entries(profile) * KVM_DIRTY_GFN_ENTRY_SIZE
        or size < profile.page_size
    ):
        return EINVAL
    if size > profile.dirty_ring_max_bytes:
        return E2BIG
    if ring_already_enabled:
        return EINVAL
    if vcpus_created:
        return EINVAL
    return 0


def enable_dirty_ring_with_bitmap_errno(
    profile: PlatformProfile, flags: int, ring_enabled: bool, any_memslot: bool
) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP): needs the ring, flags 0, and no
    memslot yet, so that every slot created afterwards allocates its bitmap.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_enable_cap_generic (v6.18)
    """
    if not profile.dirty_ring_with_bitmap or not ring_enabled or flags:
        return EINVAL
    if any_memslot:
        return EINVAL
    return 0


def uses_dirty_bitmap(ring_enabled: bool, ring_with_bitmap: bool) -> bool:
    """Slots get bitmaps unless the VM logs to rings only.

    kernel: virt/kvm/dirty_ring.c:kvm_use_dirty_bitmap (v6.18)
    """
    return not ring_enabled or ring_with_bitmap
