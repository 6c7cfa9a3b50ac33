"""A vCPU's side of the shadow MMU: its guest CR3, its shadow roots, its requests, its TLB,
and the one host address its VMCS holds (the APIC-access page's, apic_access.py).

Each vCPU runs on the shadow page table rooted at ``root``, a shadow page of the guest's
top-level table (the page CR3 points at). Switching CR3 back to a table used recently is
cheap because the vCPU keeps up to KVM_MMU_NUM_PREV_ROOTS previous roots, each with the
CR3 it shadows. Work another CPU asks of this vCPU (flush your TLB, drop obsolete roots)
arrives as *requests*, handled before the vCPU next enters the guest.

The TLB caches what the hardware found walking the shadow tables: guest virtual page to
(pfn, writable). Nothing but a flush removes an entry, so a shadow page table changed
without a flush leaves the vCPU using the old translation: invariant X5 checks that no
entry outlives its SPTE past a point where the kernel flushes.

The generic ``KvmVcpu`` holds no architecture state, so the shadow MMU keeps one
:class:`VcpuMmu` per vCPU id (the kernel's ``vcpu->arch.mmu`` and ``vcpu->requests``).

kernel: arch/x86/include/asm/kvm_host.h:struct kvm_mmu, struct kvm_mmu_root_info,
KVM_MMU_NUM_PREV_ROOTS, KVM_REQ_TLB_FLUSH, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS;
arch/x86/include/asm/vmx.h:APIC_ACCESS_ADDR (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmspec.reference.x86.guest_walk import PagingMode

if TYPE_CHECKING:
    from kvmspec.reference.x86.mmu_page import KvmMmuPage

KVM_MMU_NUM_PREV_ROOTS = 3

KVM_REQ_TLB_FLUSH = "tlb_flush"
"""Flush this vCPU's TLB before entering the guest."""
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = "mmu_free_obsolete_roots"
"""Some root this vCPU holds may be obsolete: drop those before entering the guest."""


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """A cached translation of one guest virtual page."""

    pfn: int
    writable: bool


@dataclass(slots=True)
class KvmMmuRootInfo:
    """struct kvm_mmu_root_info: a root shadow page and the guest CR3 (pgd) it shadows."""

    pgd: int
    sp: KvmMmuPage | None
    """None is INVALID_PAGE: no root."""


@dataclass(slots=True)
class VcpuMmu:
    """One vCPU's MMU state (vcpu->arch.mmu for a 64-bit guest with shadow paging)."""

    vcpu_id: int
    cr3: int = 0
    mode: PagingMode = field(default_factory=PagingMode)
    root: KvmMmuRootInfo = field(default_factory=lambda: KvmMmuRootInfo(0, None))
    prev_roots: list[KvmMmuRootInfo] = field(
        default_factory=lambda: [KvmMmuRootInfo(0, None) for _ in range(KVM_MMU_NUM_PREV_ROOTS)]
    )
    requests: set[str] = field(default_factory=set)
    tlb: dict[int, TlbEntry] = field(default_factory=dict)
    """Guest virtual page number -> translation."""
    apic_access_addr: int | None = None
    """The VMCS's APIC_ACCESS_ADDR: the host physical address of the APIC-access page as
    last loaded (None: never loaded). Only a KVM_REQ_APIC_PAGE_RELOAD changes it."""
    last_retry_eip: int = 0
    last_retry_addr: int = 0
    """The instruction (rip) and address of the last unprotect-and-retry: the same fault
    again is emulated, never retried, so a vCPU cannot loop between the two (seed 002)."""
    top_level: dict[int, int] | None = None
    """On this machine's PVM backend (pvm_top_level.py): the vCPU's copy of its root's
    top-level entries, index -> SPTE, which the hardware reads instead of the root's own.
    None: the vCPU walks the root itself."""
    top_level_stale: bool = False
    """A flush came since the copy was taken: it is taken again at the next entry."""

    def flush_tlb(self) -> None:
        """The hardware TLB flush (kvm_vcpu_flush_tlb_all / flush_tlb_current: with shadow
        paging and no PCID they drop the same entries). Under PVM the flush also renews
        the vCPU's copy of the root's top level, when it next enters the guest."""
        self.tlb.clear()
        self.top_level_stale = self.top_level is not None
