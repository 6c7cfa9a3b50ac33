"""X12, the shadow-page limit (reference/x86/mmu_pages.py), checked from outside its
bookkeeping.

Between actions, the count KVM keeps (``n_used_mmu_pages``) must be the number of shadow
pages it holds: every page allocated and not yet freed, which is the active pages and the
zapped roots vCPUs still hold. And it must stay within the limit, up to the soft check's
overshoot: a fault that found one page left may take one per level below the root. A
KVM_RUN that fails with ENOSPC must have had a reason: the VM was at its limit and every
page it held was a root in use, the only pages recycling may not take.
"""

from __future__ import annotations

from kvmspec.reference.x86.mmu_page import ShadowMmuState
from kvmspec.reference.x86.mmu_pages import MAX_PAGES_PER_FAULT, kvm_mmu_available_pages
from kvmspec.spec.invariants import Violation


def held_pages(mmu: ShadowMmuState) -> int:
    """The shadow pages the VM holds (allocated, not freed): between actions, nothing
    waits on an invalid list, so these are the pages still hashed."""
    return sum(len(pages) for pages in mmu.mmu_page_hash.values())


def check_mmu_page_limit(mmu: ShadowMmuState) -> list[Violation]:
    """X12 between actions: the count is the pages held, and within the limit but for the
    last fault's overshoot.

    kernel: arch/x86/kvm/mmu/mmu.c:make_mmu_pages_available, kvm_account_mmu_page,
    kvm_unaccount_mmu_page (v6.18)
    """
    found = []
    held = held_pages(mmu)
    if mmu.n_used_mmu_pages != held:
        found.append(
            Violation("X12", f"n_used_mmu_pages is {mmu.n_used_mmu_pages}, {held} pages held")
        )
    ceiling = mmu.n_max_mmu_pages + MAX_PAGES_PER_FAULT - 1
    if held > ceiling:
        found.append(
            Violation(
                "X12",
                f"{held} shadow pages held, the limit {mmu.n_max_mmu_pages} allows at most "
                f"{ceiling}",
            )
        )
    return found


def check_enospc(mmu: ShadowMmuState) -> list[Violation]:
    """X12 when KVM_RUN failed with ENOSPC: the recycling before it left no page available,
    and only roots in use (which it may not take) are held.

    kernel: arch/x86/kvm/mmu/mmu.c:make_mmu_pages_available,
    kvm_mmu_zap_oldest_mmu_pages (v6.18)
    """
    found = []
    available = kvm_mmu_available_pages(mmu)
    if available:
        found.append(
            Violation(
                "X12",
                f"ENOSPC with {available} of {mmu.n_max_mmu_pages} shadow pages available",
            )
        )
    recyclable = [sp for sp in mmu.active_mmu_pages if not sp.root_count]
    if recyclable:
        found.append(Violation("X12", f"ENOSPC while {recyclable[-1]} could be recycled"))
    return found
