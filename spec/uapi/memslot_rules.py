"""KVM_SET_USER_MEMORY_REGION(2) as a pure decision: request in, errno or change out.

The kernel validates a memslot request with a fixed sequence of checks, and the first one that
fails decides the errno. The order is part of the uAPI: a request with two faults must get the
errno of the earlier check. :func:`decide_set_memory_region` is that sequence, written once.
The reference model executes it (``kvmspec.reference.kvm_main``), and the harness uses it to
judge other implementations, so there is no second copy of the rules.

The checks that come after the change is classified and that depend on other objects (binding
a guest_memfd, the architecture's prepare hook) are separate functions, called by the
reference in the kernel's order: :func:`kvmspec.spec.uapi.guest_memfd_rules.kvm_gmem_bind_errno`
and :func:`kvm_arch_prepare_memory_region_errno`.

kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl, kvm_vm_ioctl_set_memory_region,
kvm_set_memory_region, check_memory_region_flags (v6.18)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from errno import EEXIST, EINVAL, EIO
from typing import NamedTuple, Protocol

from kvmspec.spec.dbc import checked
from kvmspec.spec.platforms import DEFAULT_PROFILE, PlatformProfile
from kvmspec.spec.uapi.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    U64_MAX,
)

UNSIGNED_LONG_MAX = U64_MAX  # every platform modelled is 64-bit


class MrChange(enum.Enum):
    """enum kvm_mr_change: what a successful request does to the memslot."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


class MemoryRegion(NamedTuple):
    """struct kvm_userspace_memory_region2 as userspace passed it (v1 leaves the offset 0).

    The guest_memfd descriptor is not here: the caller resolves it to a file. (Requests and
    verdicts are immutable named tuples: they are made for every ioctl, and a tuple is the
    cheapest immutable record Python has.)
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0

    @property
    def as_id(self) -> int:
        """Bits 16-31 of ``slot`` choose the address space."""
        return self.slot >> 16

    @property
    def id(self) -> int:
        """Bits 0-15 of ``slot`` are the slot id within the address space."""
        return self.slot & 0xFFFF


class SlotView(Protocol):
    """What the rules need to know about an existing slot. The reference's memslot objects
    have these fields, so they are passed as they are; the black-box contract keeps its own
    :class:`SlotRecord` for what a VMM knows."""

    @property
    def base_gfn(self) -> int: ...

    @property
    def npages(self) -> int: ...

    @property
    def flags(self) -> int: ...

    @property
    def userspace_addr(self) -> int: ...


class SlotRecord(NamedTuple):
    """A slot as a VMM remembers it from the request that created or last changed it."""

    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int


class MemslotVerdict(NamedTuple):
    """The outcome of the generic checks.

    ``errno`` is 0 on success. ``change`` is None when the request is rejected or changes
    nothing (an identical re-submit). ``check`` names the check that decided, numbered as in
    docs/tour/01-memslots.md (the B.1 table of the inventory), so a divergence report can say which
    rule fired.
    """

    errno: int
    change: MrChange | None
    check: str
    base_gfn: int = 0
    npages: int = 0


LookupSlot = Callable[[int, int], SlotView | None]
"""(as_id, id) -> the slot with that id in the *active* set of that address space, or None."""

Overlaps = Callable[[int, int, int, int], bool]
"""(as_id, id, start_gfn, end_gfn) -> does [start, end) overlap a slot with another id?"""


def _reject(errno: int, check: str) -> MemslotVerdict:
    return MemslotVerdict(errno=errno, change=None, check=check)


def check_memory_region_flags(profile: PlatformProfile, flags: int) -> int:
    """The flags a region may carry on this platform: 0 if allowed, else EINVAL.

    Dirty logging is always allowed, except on guest_memfd slots (private memory cannot be
    dirty-logged). READONLY needs architecture support and is refused with GUEST_MEMFD, because
    a write to a read-only slot exits as emulated MMIO, which private memory cannot do.

    kernel: virt/kvm/kvm_main.c:check_memory_region_flags (v6.18)
    """
    valid_flags = KVM_MEM_LOG_DIRTY_PAGES
    if profile.supports_guest_memfd:
        valid_flags |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid_flags &= ~KVM_MEM_LOG_DIRTY_PAGES
    if profile.has_readonly_mem and not flags & KVM_MEM_GUEST_MEMFD:
        valid_flags |= KVM_MEM_READONLY
    if flags & ~valid_flags:
        return EINVAL
    return 0


def decide_ioctl_set_memory_region(
    profile: PlatformProfile, region: MemoryRegion, version: int
) -> MemslotVerdict | None:
    """The checks the ioctl entry points make before taking slots_lock: a rejection, or None.

    The v1 struct has no guest_memfd fields, so v1 refuses that flag; and userspace may only
    name user slot ids (the internal ones above them belong to the architecture). Only the
    low 16 bits, the id, are checked here; the address space comes later (check 10).

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl, kvm_vm_ioctl_set_memory_region (v6.18)
    """
    # 2. The v1 ioctl only knows LOG_DIRTY_PAGES and READONLY (kvm_vm_ioctl).
    if version == 1 and region.flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
        return _reject(EINVAL, "2 v1-flags")
    # 3. No internal slot ids through the uAPI.
    if region.id >= profile.user_mem_slots:
        return _reject(EINVAL, "3 slot-id")
    return None


@checked
def decide_set_memory_region(
    profile: PlatformProfile,
    region: MemoryRegion,
    version: int,
    lookup_active_slot: LookupSlot,
    overlaps_other_slot: Overlaps,
    nr_memslot_pages: int,
) -> MemslotVerdict:
    """A whole KVM_SET_USER_MEMORY_REGION(2) request as userspace sees it: the ioctl's own
    checks (:func:`decide_ioctl_set_memory_region`), then :func:`decide_kvm_set_memory_region`.

    pre: version in (1, 2)
    pre: 0 <= region.slot <= 0xFFFFFFFF and 0 <= region.flags <= 0xFFFFFFFF
    post: __return__.errno != 0 or region.id < profile.user_mem_slots
    """
    rejected = decide_ioctl_set_memory_region(profile, region, version)
    if rejected is not None:
        return rejected
    return decide_kvm_set_memory_region(
        profile, region, lookup_active_slot, overlaps_other_slot, nr_memslot_pages
    )


@checked
def decide_kvm_set_memory_region(
    profile: PlatformProfile,
    region: MemoryRegion,
    lookup_active_slot: LookupSlot,
    overlaps_other_slot: Overlaps,
    nr_memslot_pages: int,
) -> MemslotVerdict:
    """Run the generic checks of a memslot request, in the kernel's order.

    Returns the errno of the first failing check, or the kind of change to make. An identical
    re-submit of an existing (non-guest_memfd) slot succeeds with no change and no generation
    bump. The later checks (guest_memfd binding, arch prepare) are separate functions. The
    internal-slot path (kvm_set_internal_memslot) enters here directly.

    pre: 0 <= region.slot <= 0xFFFFFFFF and 0 <= region.flags <= 0xFFFFFFFF
    pre: 0 <= region.guest_phys_addr < 2**64 and 0 <= region.memory_size < 2**64
    pre: 0 <= region.userspace_addr < 2**64 and 0 <= region.guest_memfd_offset < 2**64
    post: __return__.errno in (0, EINVAL, EIO, EEXIST)
    post: __return__.errno == 0 or __return__.change is None
    post: __return__.change is not MrChange.DELETE or region.memory_size == 0
    post: __return__.change in (None, MrChange.DELETE) or region.memory_size > 0

    kernel: virt/kvm/kvm_main.c:kvm_set_memory_region (v6.18)
    """
    page_size = profile.page_size
    as_id, slot_id = region.as_id, region.id

    # 4. Flags this platform does not allow (check_memory_region_flags).
    if check_memory_region_flags(profile, region.flags):
        return _reject(EINVAL, "4 flags")

    # 6-12. Shape checks: these run before the DELETE branch, so even a delete request must
    # carry an aligned address and a valid userspace_addr.
    if region.memory_size % page_size:
        return _reject(EINVAL, "6 size-alignment")
    if region.guest_phys_addr % page_size:
        return _reject(EINVAL, "7 gpa-alignment")
    if region.userspace_addr % page_size or (
        region.userspace_addr + region.memory_size > profile.user_address_limit
    ):
        return _reject(EINVAL, "8 userspace_addr")
    if region.flags & KVM_MEM_GUEST_MEMFD and (
        region.guest_memfd_offset % page_size
        or region.guest_memfd_offset + region.memory_size > U64_MAX
    ):
        return _reject(EINVAL, "9 guest_memfd_offset")
    if as_id >= profile.nr_address_spaces or slot_id >= KVM_MEM_SLOTS_NUM:
        return _reject(EINVAL, "10 as_id")
    if region.guest_phys_addr + region.memory_size > U64_MAX:
        return _reject(EINVAL, "11 gpa-wrap")
    npages = region.memory_size >> profile.page_shift
    if slot_id < profile.user_mem_slots and npages > KVM_MEM_MAX_NR_PAGES:
        return _reject(EINVAL, "12 max-nr-pages")

    # 13. The old slot comes from the active set: that is what vCPUs see right now.
    old = lookup_active_slot(as_id, slot_id)

    # 14-16. A zero size deletes; the remaining fields are ignored.
    if region.memory_size == 0:
        if old is None or old.npages == 0:
            return _reject(EINVAL, "14 delete-missing")
        if nr_memslot_pages < old.npages:
            return _reject(EIO, "15 accounting")
        return MemslotVerdict(
            0, MrChange.DELETE, "16 delete", base_gfn=old.base_gfn, npages=old.npages
        )

    base_gfn = region.guest_phys_addr >> profile.page_shift
    if old is None or old.npages == 0:
        # 17. The total of all slots' pages must fit in an unsigned long.
        if nr_memslot_pages + npages > UNSIGNED_LONG_MAX:
            return _reject(EINVAL, "17 total-pages")
        change = MrChange.CREATE
    else:
        # 18. guest_memfd slots are immutable: they can only be deleted, and a plain slot
        # cannot become one (nor the reverse: toggling GUEST_MEMFD was a use-after-free,
        # refused since mainline 9935df5333aa, in 6.19-rc1 and backported to 6.18.3).
        if (region.flags | old.flags) & KVM_MEM_GUEST_MEMFD:
            return _reject(EINVAL, "18 gmem-immutable")
        # 19. No resize, no new host address, no READONLY toggle.
        if (
            region.userspace_addr != old.userspace_addr
            or npages != old.npages
            or (region.flags ^ old.flags) & KVM_MEM_READONLY
        ):
            return _reject(EINVAL, "19 forbidden-change")
        # 20. A new base is a MOVE (even if the flags change too); else new flags are
        # FLAGS_ONLY; else there is nothing to do.
        if base_gfn != old.base_gfn:
            change = MrChange.MOVE
        elif region.flags != old.flags:
            change = MrChange.FLAGS_ONLY
        else:
            return MemslotVerdict(0, None, "20 no-op", base_gfn=base_gfn, npages=npages)

    # 21. Overlap is checked only for CREATE and MOVE, against slots with other ids, so a MOVE
    # may overlap its own old range.
    if change in (MrChange.CREATE, MrChange.MOVE) and overlaps_other_slot(
        as_id, slot_id, base_gfn, base_gfn + npages
    ):
        return _reject(EEXIST, "21 overlap")

    return MemslotVerdict(0, change, "21 accepted", base_gfn=base_gfn, npages=npages)


def kvm_arch_prepare_memory_region_errno(
    profile: PlatformProfile, change: MrChange, base_gfn: int, npages: int
) -> int:
    """The architecture's range check at prepare time: 0, or the platform's errno.

    x86 refuses a CREATE or MOVE whose last gfn is beyond what the MMU can map (EINVAL); arm64
    refuses a slot beyond the IPA space with EFAULT. This runs after a DELETE or MOVE has
    already published the INVALID copy, so a failing MOVE still bumps the generation twice.

    kernel: arch/x86/kvm/x86.c:kvm_arch_prepare_memory_region,
    arch/arm64/kvm/mmu.c:kvm_arch_prepare_memory_region (v6.18)
    """
    if change not in (MrChange.CREATE, MrChange.MOVE) or profile.max_gfn is None:
        return 0
    if base_gfn + npages - 1 > profile.max_gfn:
        return profile.max_gfn_errno
    return 0


@checked
def decide_for_crosshair(
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    version: int,
    old_exists: bool,
    old_base_gfn: int,
    old_npages: int,
    old_flags: int,
    old_userspace_addr: int,
    overlap: bool,
    nr_memslot_pages: int,
) -> MemslotVerdict:
    """:func:`decide_set_memory_region` with plain arguments, for CrossHair to explore.

    pre: version in (1, 2)
    pre: 0 <= slot <= 0xFFFFFFFF and 0 <= flags <= 0xFFFFFFFF
    pre: 0 <= guest_phys_addr < 2**64 and 0 <= memory_size < 2**64
    pre: 0 <= userspace_addr < 2**64
    pre: 0 < old_npages <= 2**31 - 1 and 0 <= old_base_gfn < 2**52
    pre: 0 <= nr_memslot_pages < 2**64
    post: __return__.change is None or memory_size > 0 or __return__.change.value == "delete"
    post: __return__.change is None or __return__.errno == 0
    post: __return__.change is None or (slot & 0xFFFF) < 32764
    post: __return__.errno != 17 or overlap
    """
    old = (
        SlotRecord(old_base_gfn, old_npages, old_flags, old_userspace_addr) if old_exists else None
    )
    return decide_set_memory_region(
        DEFAULT_PROFILE,
        MemoryRegion(slot, flags, guest_phys_addr, memory_size, userspace_addr),
        version,
        lambda as_id, slot_id: old,
        lambda as_id, slot_id, start, end: overlap,
        nr_memslot_pages,
    )
