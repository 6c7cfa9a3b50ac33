"""Which shadow page stands for which guest table (X17, X18), checked from the pages and
the vCPUs' roots themselves.

KVM finds a shadow page by the gfn of the guest table it shadows and its role (the level,
the access rights it was reached with, direct or not): a lookup comes before every
allocation, so a guest table has one shadow per role (X18). A vCPU's root is the shadow of
the top-level table its CR3 names, current or cached for a quick switch back, and a CR3
load keeps a root only for the same CR3 (X17).

kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_find_shadow_page, __kvm_mmu_get_shadow_page,
kvm_mmu_new_pgd, mmu_alloc_shadow_roots (v6.18)
"""

from __future__ import annotations

from kvmspec.reference.x86.mmu_page import KvmMmuPage, KvmMmuPageRole, is_obsolete_sp
from kvmspec.reference.x86.paging import PT64_BASE_ADDR_MASK
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.spec.invariants import Violation
from kvmspec.spec.uapi.constants import PAGE_SHIFT


def check_one_page_per_gfn_and_role(mmu: ShadowMmu) -> list[Violation]:
    """X18: a shadow page is looked up before one is made, so among the pages that are not
    obsolete no two shadow the same gfn with the same role. A second one would split the
    parents, rmaps and write-tracking of one guest table between two copies, of which a
    sync or a zap finds only the first."""
    violations = []
    for gfn, pages in sorted(mmu.mmu_page_hash.items()):
        seen: dict[KvmMmuPageRole, KvmMmuPage] = {}
        for sp in pages:
            if is_obsolete_sp(mmu, sp):
                continue
            first = seen.setdefault(sp.role, sp)
            if first is not sp:
                violations.append(Violation("X18", f"{sp} and {first} shadow gfn {gfn:#x} alike"))
    return violations


def check_roots_follow_cr3(mmu: ShadowMmu) -> list[Violation]:
    """X17: a vCPU runs on the shadow of the CR3 it loaded. Its current root, unless it is
    the dummy root (the CR3's gfn was in no visible slot), records the vCPU's CR3 and is
    the top-level page of that CR3's gfn in the vCPU's paging mode; each cached previous
    root records the CR3 whose top-level page it is. A CR3 load that keeps the old root
    when no cached one fits would let the guest translate through another process's
    tables."""
    violations = []
    for vcpu_id, vcpu_mmu in sorted(mmu.vcpus.items()):
        current = vcpu_mmu.root
        if current.sp is not None and current.sp is not mmu.dummy_root:
            sp, cr3 = current.sp, vcpu_mmu.cr3
            if (
                current.pgd != cr3
                or sp.gfn != (cr3 & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
                or sp.role.direct
                or sp.role.level != vcpu_mmu.mode.root_level
            ):
                violations.append(
                    Violation(
                        "X17",
                        f"vcpu {vcpu_id} with CR3 {cr3:#x} runs on {sp}, "
                        f"the root loaded for CR3 {current.pgd:#x}",
                    )
                )
        for i, cached in enumerate(vcpu_mmu.prev_roots):
            if cached.sp is None:
                continue
            gfn = (cached.pgd & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
            if cached.sp is mmu.dummy_root or cached.sp.gfn != gfn:
                violations.append(
                    Violation(
                        "X17",
                        f"vcpu {vcpu_id} caches {cached.sp} as previous root {i}, "
                        f"for CR3 {cached.pgd:#x}",
                    )
                )
    return violations
