"""KVM_CHECK_EXTENSION and KVM_ENABLE_CAP for the memory capabilities.

What a VM reports and accepts follows from its platform profile; enabling a capability
changes the VM only when the rules of ``kvmspec.spec.uapi.dirty_log_rules`` accept it.

kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_check_extension_generic,
kvm_vm_ioctl_enable_cap_generic, kvm_vm_ioctl_enable_dirty_log_ring; arch/x86/kvm/x86.c:
kvm_vm_ioctl_enable_cap (KVM_CAP_DISABLE_QUIRKS2) (v6.18)
"""

from __future__ import annotations

from errno import EINVAL

from kvmspec.reference.kvm import Kvm
from kvmspec.spec.uapi.constants import CAPABILITY_NAMES, U32_MAX
from kvmspec.spec.uapi.dirty_log_rules import (
    enable_dirty_log_ring_errno,
    enable_dirty_ring_with_bitmap_errno,
    enable_manual_dirty_log_protect_errno,
)


def kvm_vm_ioctl_check_extension(kvm: Kvm, cap: int) -> int:
    """The value KVM_CHECK_EXTENSION returns on the VM fd (0: not supported or unknown).

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_check_extension_generic, then the
    architecture's kvm_vm_ioctl_check_extension for what the generic code does not know
    (v6.18)
    """
    profile = kvm.profile
    name = CAPABILITY_NAMES.get(cap)
    if name is None:
        return 0
    if name in profile.extra_capabilities:
        return profile.extra_capabilities[name]
    ring_bytes = profile.dirty_ring_max_bytes
    answers = {
        "KVM_CAP_USER_MEMORY": 1,
        "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS": 1,
        "KVM_CAP_SYNC_MMU": 1,
        # x86 answers it in kvm_vm_ioctl_check_extension: KVM_SET_NR_MMU_PAGES exists.
        "KVM_CAP_MMU_SHADOW_CACHE_CONTROL": int(profile.arch == "x86_64"),
        "KVM_CAP_NR_MEMSLOTS": profile.user_mem_slots,
        "KVM_CAP_READONLY_MEM": int(profile.has_readonly_mem),
        # With one address space the capability is not compiled in, so it answers 0.
        "KVM_CAP_MULTI_ADDRESS_SPACE": (
            profile.nr_address_spaces if profile.nr_address_spaces > 1 else 0
        ),
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": profile.manual_dirty_log_protect,
        "KVM_CAP_DIRTY_LOG_RING": ring_bytes if profile.dirty_ring_tso else 0,
        "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": ring_bytes if profile.dirty_ring_acq_rel else 0,
        "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": int(profile.dirty_ring_with_bitmap),
        "KVM_CAP_USER_MEMORY2": 1,
        "KVM_CAP_MEMORY_ATTRIBUTES": 0,
        "KVM_CAP_GUEST_MEMFD": int(profile.supports_guest_memfd),
        "KVM_CAP_GUEST_MEMFD_FLAGS": profile.guest_memfd_flags,
        "KVM_CAP_VM_TYPES": profile.vm_types,
        "KVM_CAP_DISABLE_QUIRKS2": 0,
    }
    return answers[name]


def kvm_vm_ioctl_enable_cap(kvm: Kvm, cap: int, flags: int, args: tuple[int, ...]) -> int:
    """KVM_ENABLE_CAP on the VM fd: 0 or an errno; an error changes nothing.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_enable_cap_generic (manual protection and the
    dirty ring), which passes every other capability to the architecture's
    kvm_vm_ioctl_enable_cap (arch/x86/kvm/x86.c: KVM_CAP_DISABLE_QUIRKS2) (v6.18)
    """
    name = CAPABILITY_NAMES.get(cap)
    arg0 = args[0] if args else 0
    profile = kvm.profile

    if name == "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2":
        errno = enable_manual_dirty_log_protect_errno(profile, flags, arg0)
        if not errno:
            kvm.manual_dirty_log_protect = arg0
        return errno

    if name in ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"):
        # The ring size parameter is a u32: the upper half of args[0] is dropped.
        size = arg0 & U32_MAX
        errno = enable_dirty_log_ring_errno(
            profile,
            acq_rel=name == "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            size=size,
            ring_already_enabled=bool(kvm.dirty_ring_size),
            vcpus_created=bool(kvm.created_vcpus),
        )
        if not errno:
            kvm.dirty_ring_size = size
        return errno

    if name == "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP":
        errno = enable_dirty_ring_with_bitmap_errno(
            profile, flags, bool(kvm.dirty_ring_size), not kvm.all_memslots_empty()
        )
        if not errno:
            kvm.dirty_ring_with_bitmap = True
        return errno

    if name == "KVM_CAP_DISABLE_QUIRKS2":
        supported = profile.extra_capabilities.get(name, 0)
        if flags or arg0 & ~supported:
            return EINVAL
        kvm.disabled_quirks |= arg0
        return 0

    return EINVAL
