"""Translations agree with the host (N4, N5): checks for MMUs that expose their translations.

Once no invalidation is open, every translation KVM holds for a gfn must point at the page
the host maps at that gfn's hva. A translation to any other pfn is exactly the bug the
fault-exclusion protocol exists to prevent: a fault resolved a page, the host took it away
(MMU notifier) and mapped another, and the fault installed the old one anyway.
"""

from __future__ import annotations

from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import kvm_hva_range_to_gfn_ranges
from kvmspec.spec.invariants import Violation


def check_translations_match_host(kvm: Kvm, mmu: FlatMmu, host: HostMm) -> list[Violation]:
    if kvm.mmu_invalidate_in_progress:
        return []  # mid-invalidation the host may already have changed its PTEs
    shift = kvm.profile.page_shift
    violations = []
    for (as_id, gfn), pte in mmu.ptes.items():
        slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
        hva, _ = gfn_to_hva_many(slot, gfn, write=False, page_shift=shift)
        if slot is None or kvm_is_error_hva(hva):
            violations.append(Violation("M13", f"gfn {gfn:#x} mapped without a usable slot"))
            continue
        host_pte = host.ptes.get(hva - hva % host.page_size)
        if host_pte is None or host_pte.pfn != pte.pfn:
            found = host_pte.pfn if host_pte is not None else None
            violations.append(
                Violation("N4", f"gfn {gfn:#x} maps pfn {pte.pfn}, the host maps {found}")
            )
        elif pte.writable and not host_pte.writable:
            violations.append(Violation("N4", f"gfn {gfn:#x} writable over a read-only page"))
    return violations


def check_open_invalidations(kvm: Kvm, mmu: FlatMmu, host: HostMm) -> list[Violation]:
    """N5: while the host is between the start and the end of an invalidation, no translation
    and no TLB entry maps a gfn backed by that host range; the start removed them and flushed,
    and the retry check keeps new ones out until the end. (KVM's own record is only the union
    of the open ranges, which may cover more: the check uses the host's exact ranges.)"""
    ranges = [
        (gfn_range.slot.as_id, gfn_range.start, gfn_range.end)
        for start, end in host.invalidating
        for gfn_range in kvm_hva_range_to_gfn_ranges(kvm, start, end)
    ]

    def invalidated(as_id: int, gfn: int) -> bool:
        return any(a == as_id and lo <= gfn < hi for a, lo, hi in ranges)

    # Walk the translations, not the ranges: a range may be a terabyte wide.
    violations = [
        Violation("N5", f"gfn {gfn:#x} mapped while invalidated")
        for as_id, gfn in mmu.ptes
        if invalidated(as_id, gfn)
    ]
    for vcpu_id, tlb in mmu.tlbs.items():
        violations.extend(
            Violation("N5", f"vcpu {vcpu_id} TLB holds gfn {gfn:#x} while invalidated")
            for as_id, gfn in tlb
            if invalidated(as_id, gfn)
        )
    return violations
