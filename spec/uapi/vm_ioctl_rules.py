"""What KVM_SET_NR_MMU_PAGES must answer, stated from outside the reference.

The ioctl is x86's: it sets the VM's shadow-page limit (rule X12), and refuses a limit below
64 shadow pages with EINVAL; nothing bounds it from above. The same ioctl number on another
architecture is an ioctl that architecture does not know, answered as it answers any such:
EINVAL on arm64, ENOTTY on POWER. Measured on this machine's kernel:
corpus/conformance/x86_64-linux-6.18-pvm/s2-set-nr-mmu-pages.jsonl.

kernel: arch/x86/kvm/x86.c:kvm_vm_ioctl_set_nr_mmu_pages; arch/arm64/kvm/arm.c:
kvm_arch_vm_ioctl; arch/powerpc/kvm/book3s_hv.c:kvm_arch_vm_ioctl_hv (v6.18)
"""

from __future__ import annotations

from errno import EINVAL, ENOTTY

from kvmspec.spec.platforms import PlatformProfile

MIN_NR_MMU_PAGES = 64
"""The smallest shadow-page limit KVM_SET_NR_MMU_PAGES accepts (KVM_MIN_ALLOC_MMU_PAGES)."""

_UNKNOWN_IOCTL = {"arm64": EINVAL, "ppc64": ENOTTY}


def set_nr_mmu_pages_errno(profile: PlatformProfile, nr_mmu_pages: int) -> int:
    """The errno KVM_SET_NR_MMU_PAGES(``nr_mmu_pages``) must return on a VM of ``profile``
    (0: accepted)."""
    if profile.arch != "x86_64":
        return _UNKNOWN_IOCTL[profile.arch]
    return EINVAL if nr_mmu_pages < MIN_NR_MMU_PAGES else 0
