"""The architecture's VM ioctls that the model knows, and each architecture's answer to a VM
ioctl it does not handle.

The generic VM ioctl hands whatever it does not know to the architecture. Of those, the
memory subsystem has one: x86's KVM_SET_NR_MMU_PAGES, the shadow-page limit
(:mod:`kvmspec.reference.x86.mmu_pages`). Elsewhere the same number is just an unknown
ioctl: arm64 answers EINVAL, POWER (Book3S HV) ENOTTY. KVM_GET_NR_MMU_PAGES is gone from
x86 too (ENOTTY), though the uAPI header still defines it.

kernel: virt/kvm/kvm_main.c:kvm_vm_ioctl; arch/x86/kvm/x86.c:kvm_arch_vm_ioctl;
arch/arm64/kvm/arm.c:kvm_arch_vm_ioctl; arch/powerpc/kvm/powerpc.c:kvm_arch_vm_ioctl;
arch/powerpc/kvm/book3s_hv.c:kvm_arch_vm_ioctl_hv (v6.18)
"""

from __future__ import annotations

from errno import EINVAL, ENOTTY
from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_page import MmuPageCounts
from kvmspec.reference.x86.mmu_pages import KVM_MIN_ALLOC_MMU_PAGES, kvm_vm_ioctl_set_nr_mmu_pages

if TYPE_CHECKING:
    from kvmspec.reference.concurrency import KernelOp
    from kvmspec.reference.kvm import Kvm

UNKNOWN_VM_IOCTL_ERRNO = {"arm64": EINVAL, "ppc64": ENOTTY}
"""The errno of kvm_arch_vm_ioctl for a VM ioctl the architecture does not handle, where
KVM_SET_NR_MMU_PAGES is one (x86 answers ENOTTY to the others)."""


def kvm_arch_vm_ioctl_set_nr_mmu_pages(kvm: Kvm, nr_mmu_pages: int) -> KernelOp[int]:
    """KVM_SET_NR_MMU_PAGES as the VM's architecture answers it: x86 sets the shadow-page
    limit; every other architecture does not know the ioctl. Returns 0 or the errno.

    A model VM on x86 whose MMU keeps no shadow-page limit (the flat MMU, which stands in
    for the TDP MMU in traces) answers what the ioctl's own check says, and keeps nothing:
    that MMU has no shadow page to limit.
    """
    arch = kvm.arch
    if kvm.profile.arch != "x86_64":
        yield from ()
        return UNKNOWN_VM_IOCTL_ERRNO[kvm.profile.arch]
    if isinstance(arch, MmuPageCounts):
        return (yield from kvm_vm_ioctl_set_nr_mmu_pages(kvm, arch, nr_mmu_pages))
    return EINVAL if nr_mmu_pages < KVM_MIN_ALLOC_MMU_PAGES else 0
