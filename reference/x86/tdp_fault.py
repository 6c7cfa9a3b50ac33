"""A guest access on the TDP MMU: the hardware walk, the TLB, and the page fault.

With TDP the hardware translates guest-physical addresses through KVM's tables directly;
the guest's own page tables are the hardware's business (the model's TDP guest runs with
gva = gpa, so it has none). A vCPU's access goes through its TLB, else a walk from its
root that sets the leaf's A bit (and D on a store: an atomic update KVM may race with) and
fills the TLB. A miss, or a store through a read-only leaf, is an EPT violation, which
says whether the walk found a leaf giving some access (a permission fault) or none. It is
handled by :func:`kvm_tdp_page_fault`:

0. the fast path (:func:`fast_page_fault`), without mmu_lock: a store to a leaf that lost
   W on purpose (dirty logging write-protected it, keeping it MMU-writable) gets W back,
   and an access to an access-tracked leaf (aged without A/D bits) gets R and X back, each
   with one compare-and-exchange; anything else goes on to
1. resolve the pfn with the generic protocol (:func:`kvm_mmu_faultin_pfn`: the notifier
   sequence snapshot, the memslot, the host page);
2. take mmu_lock for *read*; give up if the root was invalidated or an invalidation
   covered the gfn since the snapshot (is_page_fault_stale);
3. walk down to the leaf (:func:`kvm_tdp_mmu_map`), linking a new table wherever one is
   missing, and set the leaf; every link and the leaf are set by compare-and-exchange, so
   a fault that loses a race to another (or meets a frozen SPTE) retries from the guest.

Not modelled: huge leaves (the model's TDP faults map 4K; nothing here splits a huge
SPTE), MMIO SPTEs (an access without a slot is emulated every time), instruction fetches,
prefetching and the NX huge page mitigation.

kernel: arch/x86/kvm/mmu/mmu.c:kvm_tdp_page_fault, kvm_tdp_mmu_page_fault,
is_page_fault_stale, fast_page_fault; arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_map,
tdp_mmu_link_sp, tdp_mmu_map_handle_target_level; Documentation/virt/kvm/locking.rst,
"Fast page fault" (v6.18)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmspec.reference.concurrency import KernelOp, Preempt, WaitUntil, run_to_completion
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.guest_memory import Part, emulator_read_write
from kvmspec.reference.host import HostMm, HostPage, get_page
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import (
    mmu_invalidate_retry_gfn,
    mmu_invalidate_retry_gfn_unsafe,
)
from kvmspec.reference.page_fault import (
    MAX_FAULTS_PER_ACCESS,
    Fault,
    GuestAccess,
    kvm_release_faultin_page,
)
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86.paging import (
    ACC_ALL,
    PG_LEVEL_4K,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    pt_index,
)
from kvmspec.reference.x86.spte import (
    SHADOW_NONPRESENT_VALUE,
    SpteMasks,
    is_access_allowed,
    is_access_track_spte,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    leaf_spte_change_needs_tlb_flush,
    make_nonleaf_spte,
    make_spte,
    restore_acc_track_spte,
    spte_ad_enabled,
    spte_to_pfn,
)
from kvmspec.reference.x86.tdp_iter import (
    ReadSide,
    TdpIter,
    TdpMmuPage,
    TdpPtep,
    for_each_tdp_pte_min_level,
)
from kvmspec.reference.x86.tdp_mmu import _flush, tdp_mmu_set_spte_atomic
from kvmspec.reference.x86.tdp_mmu_roots import TdpMmuState, TdpVcpu, kvm_mmu_load
from kvmspec.reference.x86.tlb import TlbEntry
from kvmspec.spec.uapi.constants import PAGE_SHIFT, PAGE_SIZE


class RetPf(enum.Enum):
    """enum ret_pf as the TDP MMU's fault returns it (paging_tmpl.RetPf is the shadow
    MMU's, with its write-protection outcome), and the EFAULT KVM_RUN fails with."""

    RETRY = "retry"
    """Enter the guest again: the fault lost a race, or something it waits for is open."""
    EMULATE = "emulate"
    """No slot, or a store to a READONLY one: the instruction is emulated (MMIO)."""
    FIXED = "fixed"
    SPURIOUS = "spurious"
    """Another vCPU installed the same SPTE first."""
    EFAULT = "efault"
    INVALID = "invalid"
    """The fast path could not settle the fault: the full fault path must run."""


@dataclass(slots=True)
class KvmPageFault:
    """struct kvm_page_fault, the fields the TDP MMU uses."""

    gfn: int
    write: bool
    present: bool = False
    """PFERR_PRESENT_MASK: the CPU's walk found a leaf giving some access (a permission
    fault), rather than none (a missing or access-tracked SPTE)."""
    slot: KvmMemorySlot | None = None
    pfn: int = 0
    map_writable: bool = False
    mmu_seq: int = 0
    page: HostPage | None = None
    """The page's reference held by the fault (the kernel's refcounted_page)."""
    goal_level: int = PG_LEVEL_4K
    """The level of the leaf kvm_tdp_mmu_map installs (always 4K in the model)."""


def kvm_mmu_faultin_pfn(kvm: Kvm, host: HostMm, fault: KvmPageFault) -> KernelOp[RetPf | None]:
    """Resolve the fault's gfn to a host page, with the generic exclusion protocol; None
    (RET_PF_CONTINUE) when ``fault`` holds the pfn and a reference to its page. No slot,
    or a store to a READONLY one: EMULATE. A slot being deleted or moved, or an open
    invalidation of the gfn: RETRY. The host cannot provide the page: EFAULT.

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_faultin_pfn, __kvm_mmu_faultin_pfn,
    kvm_handle_error_pfn, kvm_handle_noslot_fault (v6.18)
    """
    fault.mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("TDP fault: sequence snapshot taken")
    slot = fault.slot
    if slot is None:
        return RetPf.EMULATE
    if slot.invalid or mmu_invalidate_retry_gfn_unsafe(kvm, fault.mmu_seq, fault.gfn):
        return RetPf.RETRY
    hva, _ = gfn_to_hva_many(slot, fault.gfn, fault.write, PAGE_SHIFT)
    if kvm_is_error_hva(hva):
        return RetPf.EMULATE
    yield Preempt("TDP fault: resolving the pfn (get_user_pages may sleep)")
    # get_user_pages may itself fire an MMU notifier (a copy on write), whose handler
    # spins on mmu_lock: the model's host runs it in this same step, so the step waits.
    lock = kvm.mmu_lock
    if lock.readers or lock.writer:
        yield WaitUntil(
            "get_user_pages: mmu_lock is held", lambda: not lock.readers and not lock.writer
        )
    errno, host_pte = host.fault_in(hva, fault.write)
    if errno or host_pte is None:
        return RetPf.EFAULT
    fault.pfn = host_pte.pfn
    fault.map_writable = host_pte.writable and not slot.readonly
    fault.page = host.pages.get(fault.pfn)  # None: the zero page, never refcounted
    if fault.page is not None:
        get_page(fault.page)
    yield Preempt("TDP fault: pfn resolved, taking mmu_lock")
    return None


def tdp_mmu_link_sp(kvm: Kvm, mmu: TdpMmuState, it: TdpIter, sp: TdpMmuPage) -> int:
    """Link a new (empty) table where the iterator stands, by compare-and-exchange; it
    counts as a TDP MMU page only once linked. 0 or EBUSY.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_link_sp (v6.18)
    """
    spte = make_nonleaf_spte(mmu.masks, sp.pfn, ad_disabled=not mmu.masks.ad_enabled)
    ret = tdp_mmu_set_spte_atomic(kvm, mmu, it, spte)
    if ret:
        return ret
    mmu.tdp_mmu_pages += 1
    return 0


def tdp_mmu_map_handle_target_level(
    kvm: Kvm, mmu: TdpMmuState, vcpu: KvmVcpu | None, fault: KvmPageFault, it: TdpIter
) -> KernelOp[RetPf]:
    """Set the leaf. make_spte builds it from the pfn and the host's writability (a
    writable leaf of a dirty-logged slot logs the gfn now, before the exchange: a fault
    that then loses the race leaves a redundant dirty bit, which the dirty log allows).
    An identical leaf is SPURIOUS; a lost exchange is RETRY; replacing a present SPTE
    that was a link, or that loses MMU-writable, needs a TLB flush.

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:tdp_mmu_map_handle_target_level;
    arch/x86/kvm/mmu/spte.c:make_spte (v6.18)
    """
    assert fault.slot is not None
    made = make_spte(
        mmu.masks,
        level=it.level,
        ad_disabled=not mmu.masks.ad_enabled,
        pte_access=ACC_ALL,
        pfn=fault.pfn,
        old_spte=it.old_spte,
        prefetch=False,
        synchronizing=False,
        host_writable=fault.map_writable,
    )
    if is_writable_pte(made.spte):
        mark_page_dirty_in_slot(kvm, fault.slot, it.gfn, vcpu)
    if made.spte == it.old_spte:
        return RetPf.SPURIOUS
    yield Preempt("kvm_tdp_mmu_map: leaf built, exchanging it")
    if tdp_mmu_set_spte_atomic(kvm, mmu, it, made.spte):
        return RetPf.RETRY
    if is_shadow_present_pte(it.old_spte) and (
        not is_last_spte(it.old_spte, it.level)
        or kvm.warn_on(
            leaf_spte_change_needs_tlb_flush(mmu.masks, it.old_spte, made.spte),
            "X3",
            "a fault took MMU-writable away",
        )
    ):
        _flush(kvm)
    return RetPf.FIXED


def kvm_tdp_mmu_map(
    kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu, vcpu: KvmVcpu | None, fault: KvmPageFault
) -> KernelOp[RetPf]:
    """Walk the vCPU's root towards the fault's gfn: a frozen SPTE on the way means another
    thread is zapping there (RETRY); a missing table is allocated and linked (a lost link
    frees it again and RETRYs); at the goal level the leaf is set. Runs with mmu_lock
    held for read, inside an RCU read section (the caller holds both).

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_map (v6.18)
    """
    root = vcpu_mmu.root
    assert root is not None
    actor = mmu.new_actor(f"fault(vcpu {vcpu_mmu.vcpu_id})")
    for it in for_each_tdp_pte_min_level(
        mmu.tables, actor, root, PG_LEVEL_4K, fault.gfn, fault.gfn + 1
    ):
        if is_frozen_spte(it.old_spte):
            return RetPf.RETRY
        if it.level == fault.goal_level:
            return (yield from tdp_mmu_map_handle_target_level(kvm, mmu, vcpu, fault, it))
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            continue
        # The model never maps huge leaves, so the entry here is empty (or MMIO).
        sp = mmu.tables.alloc_page(it.level - 1, it.gfn, root.as_id, it.sptep)
        yield Preempt("kvm_tdp_mmu_map: table allocated, linking it")
        if tdp_mmu_link_sp(kvm, mmu, it, sp):
            mmu.tables.free_page(sp, kvm.rcu)  # never reachable: no grace period needed
            return RetPf.RETRY
    return RetPf.RETRY


def is_page_fault_stale(kvm: Kvm, vcpu_mmu: TdpVcpu, fault: KvmPageFault) -> bool:
    """Under mmu_lock: the vCPU's root was invalidated (a fast zap), or an invalidation
    covering the gfn ran since the snapshot.

    kernel: arch/x86/kvm/mmu/mmu.c:is_page_fault_stale (v6.18)
    """
    root = vcpu_mmu.root
    if root is None or root.invalid:
        return True
    return fault.slot is not None and mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn)


# -- the fast page fault ----------------------------------------------------------------------

FAST_PF_ACTOR = "fast_page_fault"
"""How the fast path names itself in the TDP tables' history (spec/invariants/x86_tdp.py
checks its writes: X16)."""
FAST_PF_RETRIES = 4
"""How many failed exchanges the fast path retries before it leaves the fault to the full
path."""


def page_fault_can_be_fast(masks: SpteMasks, fault: KvmPageFault) -> bool:
    """Could the fast path settle this fault? A fault that found no usable leaf only without
    A/D bits (the leaf may be access-tracked); a permission fault only on a store (W may be
    restorable). The kernel first turns away reserved-bit faults (MMIO SPTEs) and private
    memory mismatches, neither of which the model's TDP MMU has.

    kernel: arch/x86/kvm/mmu/mmu.c:page_fault_can_be_fast (v6.18)
    """
    if not fault.present:
        return not masks.ad_enabled
    return fault.write


def kvm_tdp_mmu_fast_pf_get_last_sptep(
    mmu: TdpMmuState, root: TdpMmuPage, gfn: int, actor: str
) -> tuple[TdpPtep, int]:
    """The last SPTE a lockless walk of ``root`` towards ``gfn`` reads, and its value: the
    4K leaf, or the non-present entry where the walk stopped (the model's TDP leaves are
    all 4K, and nothing changes the tables during the walk itself).

    kernel: arch/x86/kvm/mmu/tdp_mmu.c:kvm_tdp_mmu_fast_pf_get_last_sptep (v6.18)
    """
    last = TdpPtep(root, pt_index(gfn << PAGE_SHIFT, root.level)), SHADOW_NONPRESENT_VALUE
    for it in for_each_tdp_pte_min_level(mmu.tables, actor, root, PG_LEVEL_4K, gfn, gfn + 1):
        last = it.sptep, it.old_spte
    return last


def fast_pf_fix_direct_spte(
    kvm: Kvm,
    mmu: TdpMmuState,
    vcpu: KvmVcpu | None,
    fault: KvmPageFault,
    sptep: TdpPtep,
    old_spte: int,
    new_spte: int,
    actor: str,
) -> bool:
    """Replace ``old_spte`` by ``new_spte`` with a compare-and-exchange: False if the SPTE
    changed since the walk read it (a zap, the CPU setting A/D, another fix). No
    bookkeeping (handle_changed_spte): only permission and tracking bits change. Granting W
    logs the gfn dirty now; D stays clear, so a PML log may record the page again on the
    store itself, which is harmless.

    kernel: arch/x86/kvm/mmu/mmu.c:fast_pf_fix_direct_spte (v6.18)
    """
    if mmu.tables.cmpxchg_spte(sptep, old_spte, new_spte, actor) != old_spte:
        return False
    if is_writable_pte(new_spte) and not is_writable_pte(old_spte):
        mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, vcpu)
    return True


def fast_page_fault(
    kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu, vcpu: KvmVcpu | None, fault: KvmPageFault
) -> KernelOp[RetPf]:
    """Try to settle ``fault`` without mmu_lock, inside an RCU read section only (so no
    table the walk reads is freed under it): FIXED, SPURIOUS (the leaf already allows the
    access: another vCPU fixed it, or a TLB was flushed lazily), or INVALID (the full path
    must run). Only a present leaf is fixed, and only in its permission bits: W is given
    back only to an MMU-writable SPTE (so never over a page the host or a READONLY slot
    maps read-only), R and X only from the bits access tracking saved. Between the read
    and the exchange another CPU may run; a zap there makes the exchange fail, and the
    walk, retried, finds nothing to fix: a zapped SPTE never comes back (X16).

    kernel: arch/x86/kvm/mmu/mmu.c:fast_page_fault, walk_shadow_page_lockless_begin
    (v6.18)
    """
    masks = mmu.masks
    if not page_fault_can_be_fast(masks, fault):
        return RetPf.INVALID
    root = vcpu_mmu.root  # the vCPU holds a reference to it
    assert root is not None
    actor = mmu.new_actor(f"{FAST_PF_ACTOR}(vcpu {vcpu_mmu.vcpu_id})")
    rcu = kvm.rcu.read_lock()
    try:
        for _ in range(1 + FAST_PF_RETRIES):
            sptep, spte = kvm_tdp_mmu_fast_pf_get_last_sptep(mmu, root, fault.gfn, actor)
            if not is_shadow_present_pte(spte):
                return RetPf.INVALID
            if is_access_allowed(masks, spte, write=fault.write, fetch=False):
                return RetPf.SPURIOUS
            new_spte = spte
            if not masks.ad_enabled and is_access_track_spte(masks, spte):
                new_spte = restore_acc_track_spte(masks, new_spte) | masks.accessed_mask
            if fault.write and is_mmu_writable_spte(masks, spte):
                new_spte |= PT_WRITABLE_MASK
            if new_spte == spte or not is_access_allowed(
                masks, new_spte, write=fault.write, fetch=False
            ):
                return RetPf.INVALID
            yield Preempt("fast page fault: SPTE read, compare-and-exchange next")
            if fast_pf_fix_direct_spte(kvm, mmu, vcpu, fault, sptep, spte, new_spte, actor):
                return RetPf.FIXED
        return RetPf.INVALID
    finally:
        kvm.rcu.read_unlock(rcu)


def kvm_tdp_page_fault(
    kvm: Kvm,
    host: HostMm,
    mmu: TdpMmuState,
    vcpu_mmu: TdpVcpu,
    vcpu: KvmVcpu | None,
    gpa: int,
    write: bool,
    present: bool = False,
) -> KernelOp[RetPf]:
    """An EPT violation at ``gpa``, a permission fault if ``present`` (see the module
    docstring).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_tdp_mmu_page_fault, kvm_mmu_finish_page_fault
    (v6.18)
    """
    srcu = kvm.srcu.read_lock()
    try:
        gfn = gpa >> PAGE_SHIFT
        fault = KvmPageFault(gfn, write, present)
        fault.slot = kvm.memslots(0).gfn_to_memslot(gfn)
        ret = yield from fast_page_fault(kvm, mmu, vcpu_mmu, vcpu, fault)
        if ret is not RetPf.INVALID:
            return ret
        error = yield from kvm_mmu_faultin_pfn(kvm, host, fault)
        if error is not None:
            return error
        ret = RetPf.RETRY
        side = ReadSide(kvm.rcu, kvm.mmu_lock)
        try:
            yield from side.wait_for_writer()
            side.enter()
            if not is_page_fault_stale(kvm, vcpu_mmu, fault):
                ret = yield from kvm_tdp_mmu_map(kvm, mmu, vcpu_mmu, vcpu, fault)
        finally:
            side.leave()
            if fault.page is not None:
                kvm_release_faultin_page(
                    host, fault.page, unused=ret is RetPf.RETRY, dirty=fault.map_writable
                )
        return ret
    finally:
        kvm.srcu.read_unlock(srcu)


# -- the hardware -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EptViolation:
    """The VM exit of an access the CPU could not complete. ``present``: its walk found a
    leaf that gives some access (the exit qualification's R/W/X bits), so a store was
    refused by a read-only leaf; otherwise the walk found no usable leaf."""

    present: bool


def tdp_hardware_walk(mmu: TdpMmuState, root: TdpMmuPage, gfn: int) -> tuple[TdpPtep, int] | None:
    """The CPU's walk of ``root`` for ``gfn``: the leaf and its SPTE, or None when an entry
    on the way gives no access (not present, or an access-tracked leaf: R, W and X clear;
    the upper levels always give all three)."""
    sp, level = root, root.level
    while True:
        ptep = TdpPtep(sp, pt_index(gfn << PAGE_SHIFT, level))
        spte = mmu.tables.read_spte(ptep, "hardware")
        # Bit 0 is P (legacy) or R (EPT): an access-tracked SPTE has it clear.
        if not is_shadow_present_pte(spte) or not spte & PT_PRESENT_MASK:
            return None
        if is_last_spte(spte, level):
            return ptep, spte
        child = mmu.tables.spte_to_child_pt(spte, level)
        assert child is not None
        sp, level = child, level - 1


def tdp_hardware_translate(
    kvm: Kvm, mmu: TdpMmuState, vcpu_mmu: TdpVcpu, vcpu: KvmVcpu | None, gfn: int, write: bool
) -> TlbEntry | EptViolation:
    """The CPU translating ``gfn``: the TLB, else a walk from the vCPU's root that sets A
    (and D for a store) in the leaf with an atomic OR, if the leaf has A/D bits, and fills
    the TLB; or an EPT violation. With PML, a store that sets D in a leaf of a dirty-logged
    slot logs the gfn (the CPU appends it to the PML buffer, which KVM drains into the
    dirty log; the model logs at once).
    """
    entry = vcpu_mmu.tlb.get(gfn)
    if entry is not None and (entry.writable or not write):
        return entry
    vcpu_mmu.tlb.pop(gfn, None)
    root = vcpu_mmu.root
    assert root is not None  # entering the guest loaded one
    found = tdp_hardware_walk(mmu, root, gfn)
    if found is None:
        return EptViolation(present=False)
    ptep, spte = found
    if write and not is_writable_pte(spte):
        return EptViolation(present=True)
    dirty = bool(spte & mmu.masks.dirty_mask)
    if spte_ad_enabled(spte):
        bits = mmu.masks.accessed_mask | (mmu.masks.dirty_mask if write else 0)
        if spte & bits != bits:
            mmu.tables.set_bits_atomic(ptep, bits, "hardware")
            if write and not dirty and mmu.pml:
                mark_page_dirty_in_slot(kvm, kvm.memslots(0).gfn_to_memslot(gfn), gfn, vcpu)
        dirty |= write
    # The TLB caches the dirty state: a store through an entry cached clean walks again
    # to set D (and log it, with PML). Without A/D bits W alone tells.
    writable = is_writable_pte(spte) and (dirty or not spte_ad_enabled(spte))
    entry = TlbEntry(spte_to_pfn(spte), writable)
    vcpu_mmu.tlb[gfn] = entry
    return entry


def tdp_guest_access(
    kvm: Kvm,
    host: HostMm,
    mmu: TdpMmuState,
    vcpu_id: int,
    gpa: int,
    data: bytes | None,
    size: int = 8,
) -> GuestAccess:
    """One guest instruction on the TDP MMU that loads ``size`` bytes at ``gpa`` (``data``
    None) or stores ``data`` there (up to 8 bytes, possibly across a page boundary), with
    the same outcomes as page_fault.guest_instruction. Entering the guest handles the
    vCPU's requests and loads a root; every page is translated before any byte moves; each
    EPT violation is handled and the guest entered again, a bounded number of times. An
    access without a slot, or a store to a READONLY one, is emulated (no MMIO SPTEs).

    kernel: arch/x86/kvm/x86.c:vcpu_enter_guest, x86_emulate_instruction;
    arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_fault (v6.18)
    """
    vcpu = kvm.vcpus.get(vcpu_id)
    vcpu_mmu = mmu.vcpu_mmu(vcpu_id)
    write = data is not None
    length = len(data) if data is not None else size
    first = min(length, PAGE_SIZE - gpa % PAGE_SIZE)
    parts = [(gpa, 0, first)]
    if first < length:
        parts.append((gpa + first, first, length - first))
    for _ in range(MAX_FAULTS_PER_ACCESS):
        if vcpu is not None and vcpu.dirty_ring is not None and vcpu.dirty_ring.soft_full():
            return GuestAccess(Fault.DIRTY_RING_FULL)
        kvm_mmu_load(kvm, mmu, vcpu_mmu, 0)
        entries: list[TlbEntry] = []
        violation = None
        for part_gpa, _start, _length in parts:
            found = tdp_hardware_translate(kvm, mmu, vcpu_mmu, vcpu, part_gpa >> PAGE_SHIFT, write)
            if isinstance(found, EptViolation):
                violation = found
                break
            entries.append(found)
        if violation is None:
            return _transfer(host, parts, entries, data)
        faulting = parts[len(entries)][0]
        op = kvm_tdp_page_fault(kvm, host, mmu, vcpu_mmu, vcpu, faulting, write, violation.present)
        ret = run_to_completion(op)
        if ret is RetPf.EFAULT:
            return GuestAccess(Fault.EFAULT)
        if ret is RetPf.EMULATE:
            loaded, mmio = emulator_read_write(kvm, host, vcpu, parts, data)
            if mmio is None:
                return GuestAccess(Fault.MAPPED, loaded)
            return GuestAccess(Fault.MMIO, b"", mmio)
    for part_gpa, _start, _length in parts:
        slot = kvm.memslots(0).gfn_to_memslot(part_gpa >> PAGE_SHIFT)
        if kvm.mmu_invalidate_in_progress or (slot is not None and slot.invalid):
            return GuestAccess(Fault.RETRY)
    raise AssertionError(f"guest access to {gpa:#x} made no progress")


def _transfer(
    host: HostMm, parts: list[Part], entries: list[TlbEntry], data: bytes | None
) -> GuestAccess:
    """Every page is translated: the bytes move through the translations' pfns."""
    loaded = b""
    for (part_gpa, start, length), entry in zip(parts, entries, strict=True):
        offset = part_gpa % PAGE_SIZE
        if data is not None:
            host.memory.write(entry.pfn, offset, data[start : start + length])
        else:
            loaded += host.memory.read(entry.pfn, offset, length)
    return GuestAccess(Fault.MAPPED, loaded)
