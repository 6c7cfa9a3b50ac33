"""The hardware side of the HPT: each vCPU's TLB, the R and C bits, and tlbie.

The processor translates through an entry only while its V bit is set (ABSENT is a software
bit the hardware ignores; KVM clears V whenever it sets ABSENT). It caches the translation in
the TLB and sets R in the entry on the first access, C on the first store. Those updates are
not synchronous with the instructions: until an entry has been invalidated *and* a tlbie for
it has completed, the hardware may still write R or C into it. So KVM always clears V, runs
the tlbie, and only then reads R and C (P3, P6).

The model keeps that window open on purpose: a store through a TLB entry that has not set C
yet leaves C *pending* in the TLB entry, and the tlbie writes it back before dropping the
entry. Code that read C before its tlbie would lose that store's dirty bit, which the tests
catch. Which tlbie form KVM uses (global tlbie, or a local tlbiel plus a deferred flush of
the other cores) is abstracted: every tlbie here reaches every vCPU's TLB.

kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:do_tlbies, global_invalidates,
kvmppc_invalidate_hpte, kvmppc_clear_ref_hpte (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmspec.reference.ppc.hpt import KvmHptInfo
from kvmspec.reference.ppc.hpte import HPTE_R_C, HPTE_R_R, HPTE_V_VALID, hpte_is_writable


@dataclass(slots=True)
class TlbEntry:
    """A cached translation of one HPT entry: whether it allows stores, whether C is set
    for it already, and the R/C bits the hardware has yet to write back."""

    writable: bool
    changed: bool
    pending_rc: int = 0


class HptTlbs:
    """Every vCPU's TLB: vCPU id -> HPT index -> cached translation."""

    __slots__ = ("tlbs",)

    def __init__(self) -> None:
        self.tlbs: dict[int, dict[int, TlbEntry]] = {}

    def cached(self) -> set[int]:
        """The HPT entries some TLB still caches."""
        return {index for tlb in self.tlbs.values() for index in tlb}


def hardware_access(hpt: KvmHptInfo, tlbs: HptTlbs, vcpu_id: int, index: int, write: bool) -> bool:
    """A guest load or store through HPT entry ``index`` (the hash lookup already done).
    True if it completed, False if it faulted to the hypervisor (no valid entry, or a store
    the protection refuses).

    A TLB miss walks the table: the entry must be valid, and the walk sets R (and C for a
    store) in it at once. A TLB hit needs nothing from the table; a first store through a
    hit owes the entry its C bit, which the hardware writes back later (at the latest when
    a tlbie for the entry completes).
    """
    tlb = tlbs.tlbs.setdefault(vcpu_id, {})
    entry = tlb.get(index)
    if entry is None:
        v, r = hpt.v(index), hpt.r(index)
        if not v & HPTE_V_VALID or (write and not hpte_is_writable(r)):
            return False
        hpt.store(index, v, r | HPTE_R_R | (HPTE_R_C if write else 0))
        tlb[index] = TlbEntry(writable=hpte_is_writable(r), changed=write)
        return True
    if write and not entry.writable:
        tlb.pop(index)  # a faulting translation is not kept
        return False
    if write and not entry.changed:
        entry.changed = True
        entry.pending_rc |= HPTE_R_C
    return True


def do_tlbies(hpt: KvmHptInfo, tlbs: HptTlbs, indexes: list[int]) -> None:
    """tlbie for each of ``indexes``, then wait for completion: every R/C update the
    hardware still owed the entries lands in them, and no TLB caches them any more.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:do_tlbies (v6.18)
    """
    for tlb in tlbs.tlbs.values():
        for index in indexes:
            entry = tlb.pop(index, None)
            if entry is not None and entry.pending_rc:
                hpt.store(index, hpt.v(index), hpt.r(index) | entry.pending_rc)


def flush_all_tlbs(hpt: KvmHptInfo, tlbs: HptTlbs) -> None:
    """Every vCPU drops every translation (what a TLB flush request does on entry)."""
    do_tlbies(hpt, tlbs, sorted(tlbs.cached()))
