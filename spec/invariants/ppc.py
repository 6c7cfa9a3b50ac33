"""White-box invariants of the POWER Book3S HV hashed page table (INVENTORY C.6, seed 000).

``check_hpt`` rebuilds what the HPT's bookkeeping should say from the table itself and
compares, between operations (no hypercall or rmap walk in the middle of its work):

* P1: no HPTE lock (HVLOCK) and no rmap lock bit is left held;
* P2: every rmap chain is a well-formed circular list, an empty rmap names no head, no
  HPTE is on two chains, an HPTE that is not valid in hardware is on none, and every valid
  one is on the chain of its own gfn;
* P4: the guest's view (H_READ) of every entry it entered shows no software bit and its
  own real address, never the host's;
* P5: once the operation ended, a valid HPTE maps the page the host maps at its gfn;
* P6: no vCPU's TLB still caches an entry that has been invalidated (the tlbie completed);
* P7: an emulated-MMIO entry is never valid in hardware;
* P9: a writable HPTE sits over a writable host page, in a slot that is not READONLY;
* seed 000: no valid HPTE maps a gfn outside every usable (present, not INVALID) memslot;
* and every WARN the model recorded (unlocked HPTE or rmap writes are P1's).
"""

from __future__ import annotations

from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.ppc.hcalls import kvmppc_h_read
from kvmspec.reference.ppc.hpt import (
    KVMPPC_RMAP_INDEX,
    KVMPPC_RMAP_LOCK,
    KVMPPC_RMAP_PRESENT,
    chain_members,
    hpte_valid_in_hardware,
    slot_rmap,
)
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.ppc.hpte import (
    HPTE_GR_RESERVED,
    HPTE_R_RPN,
    HPTE_V_ABSENT,
    HPTE_V_HVLOCK,
    HPTE_V_SOFTWARE,
    HPTE_V_VALID,
    hpte_is_writable,
    hpte_rpn,
    is_mmio_hpte,
    kvmppc_actual_pgsz,
)
from kvmspec.spec.invariants import Violation

NO_HPTE_OUTSIDE_SLOTS = "S000-NO-HPTE-OUTSIDE-SLOTS"


def usable_slot(kvm: Kvm, gfn: int) -> KvmMemorySlot | None:
    """The memslot through which a new reference to ``gfn`` may exist: present and not
    INVALID (an INVALID slot is still found, so references can be removed: seed 000)."""
    slot = kvm.memslots(0).search_memslots(gfn)
    return slot if slot is not None and not slot.invalid else None


def check_hpt(kvm: Kvm, mmu: HptMmu, host: HostMm) -> list[Violation]:
    """Every HPT invariant the model can check between operations (see the module).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_add_revmap_chain,
    remove_revmap_chain, kvmppc_do_h_enter, kvmppc_h_read; arch/powerpc/kvm/
    book3s_64_mmu_hv.c:kvmppc_unmap_hpte, kvmppc_core_flush_memslot_hv (v6.18)
    """
    hpt, shift = mmu.hpt, kvm.profile.page_shift
    found = [Violation(rule, f"WARN: {message}") for rule, message in kvm.warnings]
    chained: dict[int, tuple[KvmMemorySlot, int]] = {}
    for slot in kvm.memslots(0):
        rmap = slot_rmap(slot)
        for offset, word in rmap.words.items():
            if word & KVMPPC_RMAP_LOCK:
                found.append(Violation("P1", f"rmap word {slot.id}:{offset} left locked"))
            if not word & KVMPPC_RMAP_PRESENT and word & KVMPPC_RMAP_INDEX:
                found.append(Violation("P2", f"empty chain {slot.id}:{offset} still names a head"))
            for index in chain_members(hpt, word):
                rev = hpt.rev_entry(index)
                if hpt.rev_entry(rev.forw).back != index:
                    found.append(
                        Violation("P2", f"chain {slot.id}:{offset} broken after {index:#x}")
                    )
                if index in chained:
                    found.append(Violation("P2", f"HPTE {index:#x} on two chains"))
                chained[index] = (slot, offset)
    for index, (v, r) in sorted(hpt.hptes.items()):
        if v & HPTE_V_HVLOCK:
            found.append(Violation("P1", f"HPTE {index:#x} left locked"))
        guest_r = hpt.rev_entry(index).guest_rpte
        if v & (HPTE_V_VALID | HPTE_V_ABSENT):
            view_v, view_r = kvmppc_h_read(kvm, 0, index)[1][0]
            if view_v & HPTE_V_SOFTWARE or view_r & HPTE_GR_RESERVED:
                found.append(Violation("P4", f"H_READ of {index:#x} shows software bits"))
            if (view_r ^ guest_r) & HPTE_R_RPN:
                found.append(Violation("P4", f"H_READ of {index:#x} shows a host address"))
        if is_mmio_hpte(v, r) and v & HPTE_V_VALID:
            found.append(Violation("P7", f"MMIO HPTE {index:#x} is valid"))
        if not hpte_valid_in_hardware(hpt, index):
            if index in chained:
                found.append(Violation("P2", f"HPTE {index:#x} is on a chain but not valid"))
            continue
        psize = kvmppc_actual_pgsz(v, guest_r)
        gfn = hpte_rpn(guest_r, psize, shift)
        owner = usable_slot(kvm, gfn)
        if owner is None:
            found.append(
                Violation(
                    NO_HPTE_OUTSIDE_SLOTS,
                    f"valid HPTE {index:#x} maps gfn {gfn:#x}, in no usable slot",
                )
            )
            continue
        if chained.get(index) != (owner, gfn - owner.base_gfn):
            found.append(
                Violation("P2", f"valid HPTE {index:#x} is not on the chain of gfn {gfn:#x}")
            )
        host_pte = host.lookup(__gfn_to_hva_memslot(owner, gfn, shift))
        if host_pte is None or (r & HPTE_R_RPN) >> shift != host_pte.pfn:
            found.append(
                Violation("P5", f"valid HPTE {index:#x} maps a page the host no longer maps there")
            )
        elif hpte_is_writable(r) and not host_pte.writable:
            found.append(Violation("P9", f"HPTE {index:#x} is writable, the host page is not"))
        if hpte_is_writable(r) and owner.readonly:
            found.append(Violation("P9", f"HPTE {index:#x} is writable in read-only {owner}"))
    for index in sorted(mmu.tlbs.cached()):
        if not hpt.v(index) & HPTE_V_VALID:
            found.append(Violation("P6", f"a TLB still caches invalidated HPTE {index:#x}"))
    return found
