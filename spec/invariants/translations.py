"""Translations agree with the host (N4, N5, N7, N8): checks for MMUs that expose them.

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
        host_pte = host.lookup(hva)
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


Snapshot = dict[tuple[str, int, int], tuple[int, bool]]
"""(where: "table" or "tlb<vcpu>", as_id, gfn) -> (pfn, writable)."""


def translation_snapshot(mmu: FlatMmu) -> Snapshot:
    """Every translation KVM holds, in the table and in each vCPU's TLB."""
    snapshot = {("table", a, g): (pte.pfn, pte.writable) for (a, g), pte in mmu.ptes.items()}
    for vcpu_id, tlb in mmu.tlbs.items():
        for (a, g), pte in tlb.items():
            snapshot[(f"tlb{vcpu_id}", a, g)] = (pte.pfn, pte.writable)
    return snapshot


def check_aging_keeps_translations(before: Snapshot, after: Snapshot) -> list[Violation]:
    """N7: aging reads and clears accessed state only. Every translation is still there with
    the same pfn and permissions (a TLB may have been flushed, which removes entries but
    never changes one)."""
    violations = [
        Violation("N7", f"aging changed {key}: {before.get(key)} -> {value}")
        for key, value in after.items()
        if before.get(key) != value
    ]
    violations.extend(
        Violation("N7", f"aging removed {key} from the table")
        for key in before
        if key[0] == "table" and key not in after
    )
    return violations


def check_writable_pages_dirty(mmu: FlatMmu, host: HostMm) -> list[Violation]:
    """N8: the host page behind every writable translation is marked dirty. The guest can
    write it at any moment without the host seeing the write, so the host must not treat
    it as clean (drop it instead of writing it back); KVM marks it dirty when it creates
    the writable mapping."""
    writable = {pte.pfn for pte in mmu.ptes.values() if pte.writable}
    for tlb in mmu.tlbs.values():
        writable.update(pte.pfn for pte in tlb.values() if pte.writable)
    violations = []
    for pfn in sorted(writable):
        page = host.pages.get(pfn)
        if page is not None and not page.dirty:
            violations.append(Violation("N8", f"pfn {pfn} mapped writable, host page clean"))
    return violations
