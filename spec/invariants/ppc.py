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

``check_mmio_cache`` (P7's other half): a vCPU's MMIO cache entry stamped with the current
``mmio_update`` is one the fault path will trust without looking at the table, so the table
must still hold that MMIO entry for its address.

``check_hpt_resize`` (P10) compares the guest's view of the table before and after a resize
commit: exactly the BOLTED entries, each once; or, when the commit failed, the old table.
"""

from __future__ import annotations

from collections import Counter

from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    KVMPPC_RMAP_INDEX,
    KVMPPC_RMAP_LOCK,
    KVMPPC_RMAP_PRESENT,
    chain_members,
    hpt_hash,
    hpte_encode_v,
    hpte_valid_in_hardware,
    slot_rmap,
)
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.ppc.hpte import (
    HPTE_GR_RESERVED,
    HPTE_R_C,
    HPTE_R_R,
    HPTE_R_RPN,
    HPTE_V_1TB_SEG,
    HPTE_V_ABSENT,
    HPTE_V_AVPN,
    HPTE_V_BOLTED,
    HPTE_V_HVLOCK,
    HPTE_V_LARGE,
    HPTE_V_SECONDARY,
    HPTE_V_SOFTWARE,
    HPTE_V_VALID,
    hpte_guest_view,
    hpte_is_writable,
    hpte_rpn,
    is_mmio_hpte,
    kvmppc_actual_pgsz,
)
from kvmspec.spec.invariants import Violation

GuestEntries = dict[int, tuple[int, int]]
"""The guest's view of every entry in use, by index: what H_READ returns for it."""

NO_HPTE_OUTSIDE_SLOTS = "S000-NO-HPTE-OUTSIDE-SLOTS"
STALE_MMIO_CACHE = "stale MMIO cache"
"""How P7 violations of the MMIO cache begin (the kernel has known ways to leave one: see
tests/test_ppc_fault.py)."""


def usable_slot(kvm: Kvm, gfn: int) -> KvmMemorySlot | None:
    """The memslot through which a new reference to ``gfn`` may exist: present and not
    INVALID (an INVALID slot is still found, so references can be removed: seed 000)."""
    slot = kvm.memslots(0).search_memslots(gfn)
    return slot if slot is not None and not slot.invalid else None


def check_hpt(
    kvm: Kvm, mmu: HptMmu, host: HostMm, views: GuestEntries | None = None
) -> list[Violation]:
    """Every HPT invariant the model can check between operations (see the module).
    ``views`` is the guest's H_READ of every entry in use (:func:`hpt_guest_entries`), if
    the caller has it already.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_add_revmap_chain,
    remove_revmap_chain, kvmppc_do_h_enter, kvmppc_h_read; arch/powerpc/kvm/
    book3s_64_mmu_hv.c:kvmppc_unmap_hpte, kvmppc_core_flush_memslot_hv (v6.18)
    """
    hpt, shift = mmu.hpt, kvm.profile.page_shift
    if views is None:
        views = hpt_guest_entries(mmu)
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
            view_v, view_r = views[index]
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


def check_mmio_cache(kvm: Kvm, mmu: HptMmu) -> list[Violation]:
    """P7: every vCPU's MMIO cache entry stamped with the current ``mmio_update`` still
    describes an MMIO entry the table holds for its address (in either group of its hash,
    same "v", same "r", and the same guest "r" but for R and C, which H_CLEAR_REF/MOD may
    change without invalidating the cache).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hpte_hv_fault, mmio_cache_search;
    arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_book3s_hv_page_fault (v6.18)
    """
    hpt = mmu.hpt
    found = []
    compare = HPTE_V_1TB_SEG | HPTE_V_AVPN | HPTE_V_SECONDARY | HPTE_V_LARGE
    rc = HPTE_R_R | HPTE_R_C
    for vcpu_id, vcpu in sorted(mmu.vcpu_arch.items()):
        for entry in vcpu.mmio_cache:
            if entry.segment is None or entry.mmio_update != mmu.mmio_update:
                continue
            group = hpt_hash(hpt, entry.segment, entry.eaddr)
            want = hpte_encode_v(entry.segment, entry.eaddr)
            candidates = [
                (index, want)
                for index in range(group * HPTES_PER_GROUP, (group + 1) * HPTES_PER_GROUP)
            ] + [
                (index, want | HPTE_V_SECONDARY)
                for index in range(
                    (group ^ hpt.mask) * HPTES_PER_GROUP, ((group ^ hpt.mask) + 1) * HPTES_PER_GROUP
                )
            ]
            held = any(
                hpt.v(index) & compare == key
                and hpt.v(index) & ~HPTE_V_HVLOCK == entry.hpte_v
                and hpt.r(index) == entry.hpte_r
                and is_mmio_hpte(hpt.v(index), hpt.r(index))
                and (hpt.rev_entry(index).guest_rpte ^ entry.rpte) & ~rc == 0
                for index, key in candidates
            )
            if not held:
                found.append(
                    Violation(
                        "P7",
                        f"{STALE_MMIO_CACHE}: vCPU {vcpu_id}'s entry for ea {entry.eaddr:#x} "
                        f"(stamp {entry.mmio_update}) is current, the HPT no longer holds it",
                    )
                )
    return found


def hpt_guest_entries(mmu: HptMmu) -> GuestEntries:
    """The guest's view of every entry in use in the current table: what H_READ of each
    returns (hpte_guest_view is its view of one entry)."""
    hpt = mmu.hpt
    return {
        index: hpte_guest_view(v, r, hpt.rev_entry(index).guest_rpte)
        for index, (v, r) in sorted(hpt.hptes.items())
        if v & (HPTE_V_VALID | HPTE_V_ABSENT)
    }


def _without_rc(entries: GuestEntries, bolted_only: bool) -> Counter[tuple[int, int]]:
    rc = HPTE_R_R | HPTE_R_C
    return Counter(
        (v, r & ~rc) for v, r in entries.values() if not bolted_only or v & HPTE_V_BOLTED
    )


def check_hpt_resize(
    before: GuestEntries, before_order: int, order: int, ret: int, kvm: Kvm, mmu: HptMmu
) -> list[Violation]:
    """P10, after a KVM_PPC_RESIZE_HPT_COMMIT to ``order`` that returned ``ret``, given the
    guest's view of the table just before it (``before``, of ``before_order``).

    Success: the table has the new order, and its entries are exactly the bolted ones of
    before, each once (R and C aside: the commit harvests them). Failure: the old table is
    still the VM's, every entry the guest had still there (the rehash only unmapped them).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_vm_ioctl_resize_hpt_commit,
    resize_hpt_rehash_hpte (v6.18)
    """
    after = _without_rc(hpt_guest_entries(mmu), bolted_only=False)
    if ret == 0:
        expected = _without_rc(before, bolted_only=True)
        if mmu.hpt.order != order:
            return [Violation("P10", f"commit to order {order} left order {mmu.hpt.order}")]
    else:
        expected = _without_rc(before, bolted_only=False)
        if mmu.hpt.order != before_order:
            return [Violation("P10", f"failed commit ({ret}) changed the table's order")]
    found = []
    for v, r in sorted((after - expected).elements()):
        found.append(Violation("P10", f"resize kept entry v={v:#x} r={r:#x}, not bolted"))
    for v, r in sorted((expected - after).elements()):
        found.append(Violation("P10", f"resize lost entry v={v:#x} r={r:#x}"))
    return found
