"""struct kvm_vcpu, as far as memory management sees it: an id and a dirty ring.

kernel: include/linux/kvm_host.h:struct kvm_vcpu; virt/kvm/kvm_main.c:kvm_vm_ioctl_create_vcpu
(v6.18)
"""

from __future__ import annotations

from errno import EEXIST, EINVAL
from typing import TYPE_CHECKING

from kvmspec.reference.dirty_ring import KvmDirtyRing
from kvmspec.spec.uapi.constants import KVM_DIRTY_GFN_ENTRY_SIZE
from kvmspec.spec.uapi.dirty_log_rules import dirty_ring_reserved_entries

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm

KVM_MAX_VCPUS = 1024
KVM_MAX_VCPU_IDS = 4096


class KvmVcpu:
    __slots__ = ("dirty_ring", "vcpu_id")

    def __init__(self, vcpu_id: int, dirty_ring: KvmDirtyRing | None) -> None:
        self.vcpu_id = vcpu_id
        self.dirty_ring = dirty_ring


def kvm_vm_ioctl_create_vcpu(kvm: Kvm, vcpu_id: int) -> int:
    """KVM_CREATE_VCPU: EINVAL for an id beyond KVM_MAX_VCPU_IDS or too many vCPUs, EEXIST for
    a duplicate id. A VM with a dirty ring gives each new vCPU its ring now, which is why the
    ring size cannot change once a vCPU exists.

    kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl_create_vcpu (v6.18)
    """
    if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS:
        return EINVAL
    if kvm.created_vcpus >= KVM_MAX_VCPUS:
        return EINVAL
    if vcpu_id in kvm.vcpus:
        return EEXIST
    ring = None
    if kvm.dirty_ring_size:
        ring = KvmDirtyRing(
            kvm.dirty_ring_size // KVM_DIRTY_GFN_ENTRY_SIZE,
            dirty_ring_reserved_entries(kvm.profile),
        )
    kvm.created_vcpus += 1
    kvm.vcpus[vcpu_id] = KvmVcpu(vcpu_id, ring)
    return 0
