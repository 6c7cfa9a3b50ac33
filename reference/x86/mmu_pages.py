"""The shadow-page limit: how many shadow pages a VM may hold, and what KVM does when a fault
needs more than are left.

Every shadow page KVM allocates is *accounted* (``n_used_mmu_pages``) until it is zapped
for good; the VM may hold ``n_max_mmu_pages`` of them. The limit follows the memslots (one
shadow page for every 50 guest pages, at least 64) until the VMM sets it with
KVM_SET_NR_MMU_PAGES, after which memslot changes leave it alone.

The check is deliberately soft. Before a fault (or a root load) allocates, it makes sure
that at least one page is left: if fewer than 5 are, it zaps the oldest pages that are no
vCPU's root, as many as would make 25 free, and only if not even one is free afterwards
does the fault fail, with ENOSPC for KVM_RUN. A fault may then allocate up to one page per
level below the root, so the count can overshoot the limit by a few pages; the next
fault's check brings it back (X12). Roots in use are never recycled: a limit below the
pages vCPUs have loaded as roots leaves every fault failing until roots are dropped or the
limit grows.

Not modelled: the shadow MMU's huge-page splitting (its -ENOSPC below 5 free pages), since
the model's shadow MMU never splits eagerly; v6.18 has no shrinker any more.

kernel: arch/x86/kvm/mmu/mmu.c:make_mmu_pages_available, kvm_mmu_available_pages,
kvm_mmu_zap_oldest_mmu_pages, kvm_mmu_change_mmu_pages; arch/x86/kvm/x86.c:
kvm_vm_ioctl_set_nr_mmu_pages, kvm_arch_commit_memory_region (v6.18)
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmspec.reference.x86.mmu_page import KvmMmuPage, MmuPageCounts, ShadowMmuState
from kvmspec.reference.x86.paging import PT64_ROOT_4LEVEL
from kvmspec.reference.x86.zap import kvm_mmu_commit_zap_page, kvm_mmu_prepare_zap_page
from kvmspec.spec.uapi.memslot_rules import MrChange

if TYPE_CHECKING:
    from kvmspec.reference.concurrency import KernelOp
    from kvmspec.reference.kvm import Kvm

KVM_MIN_FREE_MMU_PAGES = 5
"""Below this many free pages, a fault first recycles old pages."""
KVM_REFILL_PAGES = 25
"""How many free pages recycling aims for."""
KVM_MIN_ALLOC_MMU_PAGES = 64
"""The smallest limit: the memslot default's floor, and KVM_SET_NR_MMU_PAGES's minimum."""
KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO = 50
"""The memslot default: one shadow page for every this many guest pages."""
MAX_PAGES_PER_FAULT = PT64_ROOT_4LEVEL - 1
"""The pages one fault may allocate after the check: one table per level below the root
(the root itself is allocated by the root load, behind its own check)."""


def kvm_mmu_available_pages(arch: MmuPageCounts) -> int:
    """Pages that may still be allocated: the limit minus the accounted pages, never less
    than none.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_available_pages (v6.18)
    """
    if arch.n_max_mmu_pages > arch.n_used_mmu_pages:
        return arch.n_max_mmu_pages - arch.n_used_mmu_pages
    return 0


def kvm_mmu_zap_oldest_mmu_pages(kvm: Kvm, mmu: ShadowMmuState, nr_to_zap: int) -> int:
    """Zap pages oldest first (from the tail of active_mmu_pages), skipping every vCPU's
    root, until ``nr_to_zap`` are gone or none is left to take; then flush and free them. A
    page's zap may take its unsync children with it, which counts them too (the total can
    pass ``nr_to_zap``) and changes the list, so the walk starts again from the tail.
    Returns how many were zapped.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_zap_oldest_mmu_pages (v6.18)
    """
    kvm.lockdep_assert_mmu_lock_held_write("recycling shadow pages")
    invalid_list: list[KvmMmuPage] = []
    total_zapped = 0
    restart = True
    while restart and total_zapped < nr_to_zap:
        restart = False
        for sp in reversed(list(mmu.active_mmu_pages)):
            if sp.root_count:
                continue
            before = len(invalid_list)
            unstable = kvm_mmu_prepare_zap_page(kvm, mmu, sp, invalid_list)
            # A page with no root_count goes on the invalid list, with its unsync children.
            total_zapped += len(invalid_list) - before
            if total_zapped >= nr_to_zap:
                break
            if unstable:
                restart = True
                break
    kvm_mmu_commit_zap_page(kvm, mmu, invalid_list)
    mmu.stat["mmu_recycled"] += total_zapped
    return total_zapped


def make_mmu_pages_available(kvm: Kvm, mmu: ShadowMmuState) -> int:
    """Before a fault or a root load allocates: with fewer than KVM_MIN_FREE_MMU_PAGES
    pages free, recycle as many old ones as would make KVM_REFILL_PAGES free. 0, or -ENOSPC
    when not even one page is free afterwards (every accounted page is a root in use).

    kernel: arch/x86/kvm/mmu/mmu.c:make_mmu_pages_available (v6.18)
    """
    avail = kvm_mmu_available_pages(mmu)
    if avail >= KVM_MIN_FREE_MMU_PAGES:
        return 0
    kvm_mmu_zap_oldest_mmu_pages(kvm, mmu, KVM_REFILL_PAGES - avail)
    # Only one page is promised, though the caller may take a few: the limit is soft.
    if not kvm_mmu_available_pages(mmu):
        return -errno.ENOSPC
    return 0


def kvm_mmu_change_mmu_pages(kvm: Kvm, arch: MmuPageCounts, goal_nr_mmu_pages: int) -> None:
    """Set the limit. Above the new limit, the oldest pages are zapped down to it; the
    roots that cannot be leave the limit at the count that remains.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_change_mmu_pages (v6.18)
    """
    with kvm.mmu_lock.write():
        if arch.n_used_mmu_pages > goal_nr_mmu_pages:
            # Only the shadow MMU accounts pages, so only it can be above a limit.
            assert isinstance(arch, ShadowMmuState)
            kvm_mmu_zap_oldest_mmu_pages(kvm, arch, arch.n_used_mmu_pages - goal_nr_mmu_pages)
            goal_nr_mmu_pages = arch.n_used_mmu_pages
        arch.n_max_mmu_pages = goal_nr_mmu_pages


def kvm_vm_ioctl_set_nr_mmu_pages(
    kvm: Kvm, arch: MmuPageCounts, nr_mmu_pages: int
) -> KernelOp[int]:
    """KVM_SET_NR_MMU_PAGES: the VMM sets the limit (at least KVM_MIN_ALLOC_MMU_PAGES, else
    EINVAL), and from then on memslot changes no longer recompute it. Returns 0 or the
    errno. Under slots_lock, so that no memslot change recomputes the limit meanwhile.

    kernel: arch/x86/kvm/x86.c:kvm_arch_vm_ioctl, kvm_vm_ioctl_set_nr_mmu_pages (v6.18)
    """
    if nr_mmu_pages < KVM_MIN_ALLOC_MMU_PAGES:
        return errno.EINVAL
    owner = object()
    yield from kvm.slots_lock.lock(owner)
    try:
        kvm_mmu_change_mmu_pages(kvm, arch, nr_mmu_pages)
        arch.n_requested_mmu_pages = nr_mmu_pages
    finally:
        kvm.slots_lock.unlock(owner)
    return 0


def kvm_mmu_commit_default_mmu_pages(kvm: Kvm, arch: MmuPageCounts, change: MrChange) -> None:
    """A memslot CREATE or DELETE recomputes the limit from the pages of every memslot
    (``kvm->nr_memslot_pages``, already updated), unless the VMM set one. MOVE and
    FLAGS_ONLY change no page count, and leave it.

    kernel: arch/x86/kvm/x86.c:kvm_arch_commit_memory_region (v6.18)
    """
    if arch.n_requested_mmu_pages or change not in (MrChange.CREATE, MrChange.DELETE):
        return
    nr_mmu_pages = kvm.nr_memslot_pages // KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO
    kvm_mmu_change_mmu_pages(kvm, arch, max(nr_mmu_pages, KVM_MIN_ALLOC_MMU_PAGES))
