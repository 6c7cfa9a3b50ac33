"""White-box invariants of the POWER radix MMU (INVENTORY A9, C.6 R1, and the generic N4, N5,
M13 as they apply to the partition-scoped tree), checked between operations.

``check_radix`` walks every leaf and TLB entry and replays the recent unmap and harvest
events:

* R1, first half: a huge leaf (2 MiB or 1 GiB) sits in a slot that is not dirty-logged, its
  gpa and hva agree modulo its size, and the host maps a page at least that large there;
* M13: every leaf lies inside one usable (present, not INVALID) memslot, so none survives a
  DELETE or MOVE, and no huge leaf reaches past its slot's edge;
* N4: once no invalidation is open, every leaf maps the page the host maps at its gfn's hva,
  and is writable only if the host PTE is;
* N5: no leaf and no TLB entry maps a gfn whose host range is being invalidated;
* P6 (the tlbie discipline, radix form): no TLB entry is more permissive than the tree: it
  translates through a present leaf to the same pfn, may store only if the leaf is writable,
  and believes C is set only if the leaf's C is set (else stores through it would dirty the
  page without C, invisible to the next harvest);
* R1, second half: every report of a dirty page comes after the tlbie that followed the
  clearing of its C bit (C cleared -> tlbie -> reported);
* and every WARN the model recorded.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import LEVEL_PMD, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import kvm_hva_range_to_gfn_ranges
from kvmspec.reference.ppc.radix_mmu import RadixMmu
from kvmspec.reference.ppc.radix_pgtable import (
    _PAGE_DIRTY,
    _PAGE_WRITE,
    HarvestEvent,
    RadixLeaf,
    RadixPgtable,
    find_kvm_secondary_pte,
    leaves_in,
    pte_rpn_mask,
)
from kvmspec.spec.invariants import Violation

RADIX_GPA_SPACE = 1 << 52


def check_radix(kvm: Kvm, mmu: RadixMmu, host: HostMm) -> list[Violation]:
    """Every radix invariant the model can check between operations (see the module).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_instantiate_page,
    kvmppc_create_pte, kvmppc_unmap_pte, kvm_radix_test_clear_dirty,
    kvmppc_radix_flush_memslot (v6.18)
    """
    pgt = mmu.pgtable
    found = [Violation(rule, f"WARN: {message}") for rule, message in kvm.warnings]
    invalidated = _invalidated_gfns(kvm, host)
    for leaf in leaves_in(pgt, 0, RADIX_GPA_SPACE):
        found.extend(check_leaf(kvm, pgt, host, leaf, invalidated))
    found.extend(check_tlb(pgt, invalidated))
    found.extend(check_harvest_order(pgt.events))
    return found


def _invalidated_gfns(kvm: Kvm, host: HostMm) -> list[tuple[int, int]]:
    """The gfn ranges whose host memory is between an invalidation's start and end."""
    return [
        (gfn_range.start, gfn_range.end)
        for start, end in host.invalidating
        for gfn_range in kvm_hva_range_to_gfn_ranges(kvm, start, end)
    ]


def _usable_slot(kvm: Kvm, gfn: int) -> KvmMemorySlot | None:
    slot = kvm.memslots(0).search_memslots(gfn)
    return slot if slot is not None and not slot.invalid else None


def check_leaf(
    kvm: Kvm,
    pgt: RadixPgtable,
    host: HostMm,
    leaf: RadixLeaf,
    invalidated: list[tuple[int, int]],
) -> list[Violation]:
    """R1's level rules, M13, N4 and N5 for one leaf."""
    shift = pgt.page_shift
    gfn, npages = leaf.gpa >> shift, leaf.size >> shift
    where = f"leaf gpa {leaf.gpa:#x} ({leaf.size >> 10} KiB)"
    found = []
    if any(lo < gfn + npages and gfn < hi for lo, hi in invalidated):
        found.append(Violation("N5", f"{where} maps a gfn that is being invalidated"))
    slot = _usable_slot(kvm, gfn)
    if slot is None or gfn + npages > slot.end_gfn:
        found.append(Violation("M13", f"{where} maps gfns outside every usable memslot"))
        return found
    hva = __gfn_to_hva_memslot(slot, gfn, shift)
    if npages > 1:
        if slot.dirty_logging:
            found.append(Violation("R1", f"{where} in dirty-logged slot {slot.id}"))
        if hva % leaf.size:
            found.append(Violation("R1", f"{where} over hva {hva:#x}: not congruent"))
        if host.mapping_level(hva) != LEVEL_PMD or host.hpage_size < leaf.size:
            found.append(Violation("R1", f"{where} larger than the host page at {hva:#x}"))
    if kvm.mmu_invalidate_in_progress:
        return found  # mid-invalidation the host may already have changed its PTEs
    host_pte = host.lookup(hva)
    leaf_pfn = (leaf.pte & pte_rpn_mask(shift)) >> shift
    if host_pte is None or host_pte.pfn != leaf_pfn:
        host_pfn = None if host_pte is None else host_pte.pfn
        found.append(Violation("N4", f"{where} maps pfn {leaf_pfn}, the host {host_pfn}"))
    elif leaf.pte & _PAGE_WRITE and not host_pte.writable:
        found.append(Violation("N4", f"{where} writable over a read-only host page"))
    return found


def check_tlb(pgt: RadixPgtable, invalidated: list[tuple[int, int]]) -> list[Violation]:
    """P6 and N5 for the TLB: nothing cached is more than the tree allows."""
    shift = pgt.page_shift
    found = []
    for gfn, entry in pgt.tlb.items():
        where = f"TLB entry for gfn {gfn:#x}"
        if any(lo <= gfn < hi for lo, hi in invalidated):
            found.append(Violation("N5", f"{where} survives an invalidation"))
        leaf = find_kvm_secondary_pte(pgt, gfn << shift)
        if leaf is None:
            found.append(Violation("P6", f"{where} has no leaf: an unmap without tlbie"))
            continue
        pte = leaf.pte
        pfn = ((pte & pte_rpn_mask(shift)) >> shift) + (gfn - (leaf.gpa >> shift))
        if entry.pfn != pfn:
            found.append(Violation("P6", f"{where} maps pfn {entry.pfn}, the leaf {pfn}"))
        if entry.writable and not pte & _PAGE_WRITE:
            found.append(Violation("P6", f"{where} writable, the leaf read-only"))
        if entry.dirty and not pte & _PAGE_DIRTY:
            found.append(Violation("P6", f"{where} caches C that the leaf lost: no tlbie"))
    return found


def check_harvest_order(events: Iterable[HarvestEvent]) -> list[Violation]:
    """R1's second half over the recorded events: between the clearing of a page's C bit
    and the report of the page dirty, a tlbie covering it must have completed."""
    awaiting_tlbie: list[tuple[int, int]] = []
    found = []
    for event in events:
        start, end = event.gfn, event.gfn + event.npages
        if event.kind == "c_cleared":
            awaiting_tlbie.append((start, end))
        elif event.kind == "tlbie":
            awaiting_tlbie = [(lo, hi) for lo, hi in awaiting_tlbie if not start <= lo < end]
        elif any(lo < end and start < hi for lo, hi in awaiting_tlbie):
            found.append(
                Violation("R1", f"gfns {start:#x}+{end - start} reported before their tlbie")
            )
    return found
