"""Dirty tracking from the inside (D1, D8, D10): checks for MMUs that expose translations.

The whole of dirty logging rests on one fact: a guest can write a page without KVM seeing it
only through a writable translation, so every writable translation of a logged slot must
already be on record (its bitmap bit set, or an entry for it in a ring that has not been
reset). If GET_DIRTY_LOG cleared a bit without write-protecting the page and flushing the
TLBs first (D2), or CLEAR did (D3), or enabling logging left old writable translations in
place, a writable translation without a record appears, and this check finds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.kvm import Kvm
from kvmspec.spec.invariants import Violation
from kvmspec.spec.uapi.constants import KVM_DIRTY_LOG_INITIALLY_SET


def _ring_entries(kvm: Kvm) -> set[tuple[int, int]]:
    """(slot, offset) of every ring entry not yet reset: KVM's record of those pages."""
    entries = set()
    for vcpu in kvm.vcpus.values():
        ring = vcpu.dirty_ring
        if ring is None:
            continue
        for place in ring.places_in_use():
            entry = ring.entries[place]
            entries.add((entry.slot, entry.offset))
    return entries


def writable_gfns_recorded(kvm: Kvm, writable: Iterable[tuple[int, int]]) -> Iterator[Violation]:
    """D1 for any MMU: each (address space, gfn) given, a gfn the guest can write through a
    translation, is recorded as dirty if its slot is logged. It holds whenever no memslot
    update is in flight: switching logging on publishes the logged slot first and
    write-protects it at commit, before the ioctl returns (kvm_mmu_slot_apply_flags); the
    VMM cannot harvest in between. Except in a VM with rings under
    KVM_DIRTY_LOG_INITIALLY_SET, where switching logging on protects nothing and a ring has
    no "initially set" bitmap to stand in: a known kernel finding
    (corpus/conformance/x86_64-linux-6.18-pvm/s4-dirty-ring-initially-set-loses-a-write.jsonl),
    which this check lets pass."""
    if kvm.dirty_ring_size and kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
        return
    ring_entries: set[tuple[int, int]] | None = None
    for as_id, gfn in writable:
        slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
        if slot is None or not slot.dirty_logging:
            continue
        offset = gfn - slot.base_gfn
        if slot.dirty_bitmap is not None and slot.dirty_bitmap.test_bit(offset):
            continue
        if ring_entries is None:
            ring_entries = _ring_entries(kvm)
        if (as_id << 16 | slot.id, offset) in ring_entries:
            continue
        yield Violation("D1", f"gfn {gfn:#x} of logged slot {slot.id} writable, not recorded")


def check_writable_translations_logged(kvm: Kvm, mmu: FlatMmu) -> Iterator[Violation]:
    """D1 on the flat MMU: a gfn with a writable translation, in the table or in any vCPU's
    TLB (which the hardware writes through without looking at the table)."""
    writable = {key: None for key, pte in mmu.ptes.items() if pte.writable}
    for tlb in mmu.tlbs.values():
        writable.update((key, None) for key, pte in tlb.items() if pte.writable)
    yield from writable_gfns_recorded(kvm, writable)


def check_ring_full_keeps_vcpu_out(
    vcpu_id: int, was_soft_full: bool, ran: bool
) -> Iterator[Violation]:
    """D8: a vCPU whose ring had reached its soft limit did not run the guest access."""
    if was_soft_full and ran:
        yield Violation("D8", f"vcpu {vcpu_id} entered the guest with a soft-full dirty ring")


def check_rings_and_bitmaps(kvm: Kvm) -> Iterator[Violation]:
    """D10: a VM with rings and no backup bitmap has no bitmaps. (A write with no running
    vCPU where the architecture does not allow it is a WARN, reported by
    :func:`kvmspec.spec.invariants.warnings.check_no_warnings`.)"""
    if kvm.dirty_ring_size and not kvm.dirty_ring_with_bitmap:
        for as_id in range(kvm.profile.nr_address_spaces):
            for slot in kvm.memslots(as_id).id_hash.values():
                if slot.dirty_bitmap is not None:
                    yield Violation("D10", f"slot {slot.id} has a bitmap in a ring-only VM")
