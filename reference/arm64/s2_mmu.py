"""One VMID's translation state outside the tables: the CPU features stage 2 uses, each
vCPU's TLB, and the TLB invalidations KVM issues.

The TLB caches what a hardware walk found: one entry per leaf (a page or a whole block),
holding the descriptor as it was when cached. Nothing but a TLBI removes an entry, so a
descriptor changed without one leaves the vCPU using the old translation: that window is
what break-before-make closes. A TLBI also completes every hardware walk in flight that
could have used the old entries (the DSB after it waits for them); the model makes such a
walk start over (see :mod:`~kvmspec.reference.arm64.hw_access`).

Walk caches (intermediate table entries cached by the MMU) are not modelled: every walk
reads each level from memory.

kernel: arch/arm64/include/asm/kvm_host.h:struct kvm_s2_mmu;
arch/arm64/kvm/hyp/vhe/tlb.c:__kvm_tlb_flush_vmid_ipa, __kvm_tlb_flush_vmid_ipa_nsh,
__kvm_tlb_flush_vmid_range, __kvm_tlb_flush_vmid; arch/arm64/kvm/hyp/pgtable.c:
kvm_tlb_flush_vmid_range (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.reference.arm64.history import Stage2History, Tlbi


@dataclass(frozen=True, slots=True)
class Stage2Features:
    """The CPU features that change stage-2 behaviour (the arm64 profile's options)."""

    ha: bool = True
    """FEAT_HAFDBS with VTCR_EL2.HA: the hardware sets AF itself; without it an access to
    an entry with AF clear takes an access-flag fault and KVM sets AF (handle_access_fault)."""
    hd: bool = False
    """VTCR_EL2.HD: a write to a DBM descriptor sets its W bit instead of faulting. KVM
    v6.18 leaves it off; the model can turn it on to check that aging keeps dirty state."""
    fwb: bool = True
    """FEAT_S2FWB: stage 2 forces write-back, so mapping normal memory needs no cache
    clean first (stage2_has_fwb)."""
    tlb_range: bool = True
    """FEAT_TLBIRANGE: range invalidations exist; without it a range costs the whole VMID."""


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """A cached leaf: the IPA range [ipa, ipa + size) maps to [pa, pa + size) with the
    descriptor ``pte``'s permissions."""

    ipa: int
    size: int
    pa: int
    pte: int


@dataclass(slots=True)
class InFlightWalk:
    """A hardware walk that has started and not finished; a TLBI makes it start over."""

    ipa: int
    restart: bool = False


@dataclass(slots=True)
class KvmS2Mmu:
    """struct kvm_s2_mmu: the VMID's TLBs (vCPU id -> leaf IPA -> entry), its walks in
    flight, and the record the TLBIs are appended to."""

    features: Stage2Features
    history: Stage2History
    tlbs: dict[int, dict[int, TlbEntry]] = field(default_factory=dict)
    walks_in_flight: list[InFlightWalk] = field(default_factory=list)

    def tlb_lookup(self, vcpu_id: int, ipa: int) -> TlbEntry | None:
        for entry in self.tlbs.get(vcpu_id, {}).values():
            if entry.ipa <= ipa < entry.ipa + entry.size:
                return entry
        return None

    def tlb_fill(self, vcpu_id: int, entry: TlbEntry) -> None:
        self.tlbs.setdefault(vcpu_id, {})[entry.ipa] = entry

    def _invalidate(self, kind: str, start: int, size: int | None) -> None:
        tlbi = Tlbi(kind, start, size)
        for tlb in self.tlbs.values():
            stale = [ipa for ipa, e in tlb.items() if tlbi.covers(e.ipa, e.size)]
            for ipa in stale:
                del tlb[ipa]
        for walk in self.walks_in_flight:
            if tlbi.covers(walk.ipa, 1):
                walk.restart = True
        self.history.events.append(tlbi)


def __kvm_tlb_flush_vmid_ipa(mmu: KvmS2Mmu, ipa: int, level: int | None) -> None:
    """Invalidate the leaf that translates ``ipa`` on every CPU (inner shareable), at any
    level: ``level`` is only a hint to the hardware (the TTL field).

    kernel: arch/arm64/kvm/hyp/vhe/tlb.c:__kvm_tlb_flush_vmid_ipa (v6.18)
    """
    mmu._invalidate("vmid_ipa", ipa, 1)


def __kvm_tlb_flush_vmid_ipa_nsh(mmu: KvmS2Mmu, ipa: int, level: int | None) -> None:
    """The non-shareable variant, for relaxing permissions after a fault: the kernel
    invalidates the local CPU only, because an entry elsewhere can only be more restrictive
    (it costs another fault, not correctness). The model, which does not know the local
    CPU, invalidates every vCPU's entry; it records the kind so the difference stays
    visible.

    kernel: arch/arm64/kvm/hyp/vhe/tlb.c:__kvm_tlb_flush_vmid_ipa_nsh (v6.18)
    """
    mmu._invalidate("vmid_ipa_nsh", ipa, 1)


def __kvm_tlb_flush_vmid(mmu: KvmS2Mmu) -> None:
    """Invalidate every stage-2 translation of the VMID.

    kernel: arch/arm64/kvm/hyp/vhe/tlb.c:__kvm_tlb_flush_vmid (v6.18)
    """
    mmu._invalidate("vmid", 0, None)


def kvm_tlb_flush_vmid_range(mmu: KvmS2Mmu, addr: int, size: int) -> None:
    """Invalidate [addr, addr + size): one range TLBI with FEAT_TLBIRANGE, the whole VMID
    without it.

    kernel: arch/arm64/kvm/hyp/pgtable.c:kvm_tlb_flush_vmid_range (v6.18)
    """
    if not mmu.features.tlb_range:
        __kvm_tlb_flush_vmid(mmu)
        return
    mmu._invalidate("vmid_range", addr, size)
