"""The guest's page-table hypercalls: H_ENTER, H_REMOVE, H_BULK_REMOVE, H_PROTECT, H_READ,
H_CLEAR_REF and H_CLEAR_MOD.

An HPT guest never writes the hashed page table: it asks the hypervisor to. KVM checks each
request, translates the guest-physical page into a host one (or leaves the entry ABSENT when
it has none, or for MMIO), keeps the guest's own "r" word in the reverse map, and links
every valid entry into the rmap chain of its page. Each call returns a PAPR status (H_*),
exactly as the kernel's real-mode handlers do, and what the guest reads back is always the
guest's view (P4): never HVLOCK, ABSENT or the host's addresses.

Three rules run through every call:

* an entry is changed only under its HVLOCK (P1), taken by a spin or a try-lock;
* R and C are read only after the entry was invalidated and the tlbie completed (P3, P6),
  and then folded into the guest's view, the rmap word and the dirty bitmap;
* nothing here ever makes an entry *more* permissive than the host allows: H_ENTER writes
  an entry read-only when the host page is (P9), ABSENT when an MMU-notifier invalidation
  ran meanwhile (P5), and H_PROTECT never turns a valid read-only entry writable (P8).

Only H_ENTER can race with the host in the model: it yields between reading the host's page
table and taking the rmap lock, which is where an invalidation can slip in. The others run
in one step, as they do in the kernel with interrupts off and every lock they need held.
Radix guests (H_FUNCTION for all of these) are not modelled yet.

kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_do_h_enter, kvmppc_do_h_remove,
kvmppc_h_bulk_remove, kvmppc_h_protect, kvmppc_h_read, kvmppc_h_clear_ref,
kvmppc_h_clear_mod, kvmppc_set_dirty_from_hpte; arch/powerpc/include/asm/hvcall.h (v6.18)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp, Preempt
from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import LEVEL_PMD, PROT_READ
from kvmspec.reference.mmu_notifier import mmu_invalidate_retry
from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    KVMPPC_RMAP_RC_SHIFT,
    KVMPPC_RMAP_REFERENCED,
    KvmHptInfo,
    hpte_write_r,
    hpte_write_v,
    kvmppc_add_revmap_chain,
    kvmppc_update_dirty_map,
    lock_hpte,
    lock_rmap,
    remove_revmap_chain,
    revmap_for_hpte,
    rmap_write,
    slot_is_aligned,
    slot_rmap,
    try_lock_hpte,
    unlock_hpte,
    unlock_rmap,
)
from kvmspec.reference.ppc.hpt_mmu import kvm_hpt
from kvmspec.reference.ppc.hpte import (
    HPTE_GR_RESERVED,
    HPTE_R_C,
    HPTE_R_G,
    HPTE_R_I,
    HPTE_R_KEY,
    HPTE_R_KEY_HI,
    HPTE_R_KEY_LO,
    HPTE_R_M,
    HPTE_R_N,
    HPTE_R_PP,
    HPTE_R_PP0,
    HPTE_R_R,
    HPTE_R_RPN,
    HPTE_R_W,
    HPTE_V_ABSENT,
    HPTE_V_HVLOCK,
    HPTE_V_VALID,
    KEY_MMIO,
    hpte_cache_flags_ok,
    hpte_guest_view,
    hpte_is_writable,
    hpte_make_readonly,
    is_mmio_hpte,
    kvmppc_actual_pgsz,
)
from kvmspec.reference.ppc.rmap_walk import kvmppc_clear_ref_hpte, kvmppc_invalidate_hpte
from kvmspec.reference.ppc.tlb import do_tlbies

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm
    from kvmspec.reference.kvm import Kvm

# PAPR return codes.
H_SUCCESS = 0
H_FUNCTION = -2
H_PARAMETER = -4
H_PTEG_FULL = -6
H_NOT_FOUND = -7

# Flags (IBM bit numbering: bit 0 is the most significant).
H_EXACT = 1 << (63 - 24)
"""H_ENTER: use exactly this slot of the group, or fail with H_PTEG_FULL."""
H_READ_4 = 1 << (63 - 26)
"""H_READ: return the four entries of the aligned quad."""
H_AVPN = 1 << (63 - 32)
"""H_REMOVE, H_PROTECT: act only if the entry's AVPN equals the argument."""
H_ANDCOND = 1 << (63 - 33)
"""H_REMOVE: act only if the entry's "v" AND the argument is zero."""

# H_BULK_REMOVE: each request is a control word (type, flags, index) and an argument.
H_BULK_REMOVE_REQUEST = 1 << 62
H_BULK_REMOVE_END = 3 << 62
H_BULK_REMOVE_RESPONSE = 2 << 62
H_BULK_REMOVE_SUCCESS = 0
H_BULK_REMOVE_NOT_FOUND = 1 << 60
H_BULK_REMOVE_PARM = 2 << 60
H_BULK_REMOVE_RC = 3 << 58
"""The R and C bits of a removed entry, in the response."""
H_BULK_REMOVE_ABSOLUTE = 0
H_BULK_REMOVE_ANDCOND = 1 << 56
H_BULK_REMOVE_AVPN = 2 << 56
H_BULK_REMOVE_PTEX = (1 << 56) - 1
H_BULK_REMOVE_MAX_BATCH = 4


def kvmppc_do_h_enter(
    kvm: Kvm, host: HostMm, flags: int, pte_index: int, pteh: int, ptel: int
) -> KernelOp[tuple[int, int]]:
    """H_ENTER: enter the guest's entry (``pteh``, ``ptel``) in the group of ``pte_index``
    (its first free slot, or exactly that slot with H_EXACT). Returns (status, the index
    used).

    The entry is VALID with the host page's address when the page is in a usable memslot
    and the host maps it; read-only if the host page is (P9); ABSENT if the host does not
    map it yet, or if an invalidation ran since the sequence snapshot (P5, checked under
    the rmap lock); ABSENT with key 31 for an address in no usable slot, emulated MMIO
    (P7). H_PARAMETER for an unsupported page size, a page that does not fit its slot's
    alignment or the host page, cache-inhibited host memory mapped cacheable, or an index
    past the table; H_PTEG_FULL when no slot is free.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_do_h_enter (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    shift = kvm.profile.page_shift
    psize = kvmppc_actual_pgsz(pteh, ptel)
    if not psize:
        return H_PARAMETER, 0
    writing = hpte_is_writable(ptel)
    pteh &= ~(HPTE_V_HVLOCK | HPTE_V_ABSENT | HPTE_V_VALID)
    ptel &= ~HPTE_GR_RESERVED
    g_ptel = ptel

    # Snapshot before looking at the host's page table: an invalidation after this point
    # is seen by the check under the rmap lock.
    mmu_seq = kvm.mmu_invalidate_seq

    gpa = (ptel & HPTE_R_RPN) & ~(psize - 1)
    gfn = gpa >> shift
    memslot = kvm.memslots(0).search_memslots(gfn)
    if memslot is None or memslot.invalid:
        # Emulated MMIO: an absent entry marked with key 31.
        pteh |= HPTE_V_ABSENT
        ptel |= KEY_MMIO
    else:
        if not slot_is_aligned(memslot, psize, shift):
            return H_PARAMETER, 0
        hva = __gfn_to_hva_memslot(memslot, gfn, shift)
        found = _find_linux_pte(host, hva)
        pa = None
        is_ci = False
        if found is not None:
            host_pte_size, pfn, is_ci = found
            if host_pte_size < psize:
                return H_PARAMETER, 0
            if pfn is not None:
                host_writable = _read_update_linux_pte(host, hva, writing)
                if writing and not host_writable:
                    ptel = hpte_make_readonly(ptel)  # P9
                pa = (pfn << shift) | (gpa & ((1 << shift) - 1))
        ptel &= HPTE_R_KEY | HPTE_R_PP0 | (psize - 1)
        if pa is not None:
            ptel |= pa
            pteh |= HPTE_V_VALID
        else:
            pteh |= HPTE_V_ABSENT
            ptel &= ~HPTE_R_KEY
        if found is not None and not hpte_cache_flags_ok(ptel, is_ci):
            if is_ci:
                return H_PARAMETER, 0
            # Emulated devices may be mapped cache-inhibited; make them cacheable.
            ptel = (ptel & ~(HPTE_R_W | HPTE_R_I | HPTE_R_G)) | HPTE_R_M
    yield Preempt("H_ENTER: host PTE read, looking for a free slot")

    if pte_index >= hpt.npte:
        return H_PARAMETER, 0
    index = _lock_free_slot(kvm, hpt, flags, pte_index)
    if index < 0:
        return H_PTEG_FULL, 0

    hpt.rev_entry(index).guest_rpte = g_ptel  # the guest's view of "r"
    if pteh & HPTE_V_VALID:
        assert memslot is not None
        rmap = slot_rmap(memslot)
        offset = gfn - memslot.base_gfn
        lock_rmap(rmap, offset)
        if mmu_invalidate_retry(kvm, mmu_seq):
            # The page may be gone already: enter the entry absent (P5).
            pteh = (pteh | HPTE_V_ABSENT) & ~HPTE_V_VALID
            ptel &= ~HPTE_R_KEY
            unlock_rmap(rmap, offset)
        else:
            kvmppc_add_revmap_chain(kvm, hpt, rmap, offset, index)
            # Let the hardware start with R/C only where the rmap has them already.
            rcbits = rmap.get(offset) >> KVMPPC_RMAP_RC_SHIFT
            ptel &= rcbits | ~(HPTE_R_R | HPTE_R_C)
    hpte_write_r(kvm, hpt, index, ptel)
    unlock_hpte(kvm, hpt, index, pteh)
    return H_SUCCESS, index


def _find_linux_pte(host: HostMm, hva: int) -> tuple[int, int | None, bool] | None:
    """The host's mapping of ``hva``: (its size, the pfn or None when not present or
    PROT_NONE, cache-inhibited), or None when the host has no page table for it. The model
    has a page table exactly where a page was mapped, so None and "not present" coincide
    except for PROT_NONE."""
    pte = host.lookup(hva)
    if pte is None:
        return None
    size = host.hpage_size if host.mapping_level(hva) == LEVEL_PMD else host.page_size
    vma = host.find_vma(hva)
    present = vma is not None and bool(vma.prot & PROT_READ)
    is_ci = host.memory.device_of(pte.pfn) is not None
    return size, pte.pfn if present else None, is_ci


def _read_update_linux_pte(host: HostMm, hva: int, writing: bool) -> bool:
    """Mark the host mapping young (and dirty for a writable entry the host allows):
    the guest is about to use it. Returns whether the host mapping is writable.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:kvmppc_read_update_linux_pte (v6.18)
    """
    if host.mapping_level(hva) == LEVEL_PMD:
        entry = host.pmds[hva - hva % host.hpage_size]
    else:
        entry = host.ptes[hva - hva % host.page_size]
    entry.young = True
    if writing and entry.writable:
        entry.dirty = True
    return bool(entry.writable)


def _lock_free_slot(kvm: Kvm, hpt: KvmHptInfo, flags: int, pte_index: int) -> int:
    """Lock a free entry (neither VALID nor ABSENT) for H_ENTER: the first of the group, or
    exactly ``pte_index`` with H_EXACT. -1 when there is none."""
    busy = HPTE_V_HVLOCK | HPTE_V_VALID | HPTE_V_ABSENT
    if flags & H_EXACT:
        candidates = [pte_index]
    else:
        first = pte_index & ~(HPTES_PER_GROUP - 1)
        candidates = list(range(first, first + HPTES_PER_GROUP))
    for index in candidates:
        if not hpt.v(index) & HPTE_V_VALID and try_lock_hpte(hpt, index, busy):
            return index
    # The try-locks do not retry, so a free slot may have been missed because it was
    # locked for a moment: lock each one for real and look again.
    for index in candidates:
        lock_hpte(hpt, index)
        v = hpt.v(index)
        if not v & (HPTE_V_VALID | HPTE_V_ABSENT):
            return index
        unlock_hpte(kvm, hpt, index, v)
    return -1


def kvmppc_do_h_remove(kvm: Kvm, flags: int, pte_index: int, avpn: int) -> tuple[int, int, int]:
    """H_REMOVE: free entry ``pte_index`` if it is in use and passes the H_AVPN or
    H_ANDCOND test. Returns (status, "v", "r") with the guest's view of the removed entry:
    ABSENT reads as VALID, "r" is the guest's with the R and C the hardware set (read after
    the tlbie, P3). H_NOT_FOUND when the entry is free or the test fails.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_do_h_remove (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    if pte_index >= hpt.npte:
        return H_PARAMETER, 0, 0
    lock_hpte(hpt, pte_index)
    pte = hpt.v(pte_index)
    pte_r = hpt.r(pte_index)
    if (
        not pte & (HPTE_V_ABSENT | HPTE_V_VALID)
        or (flags & H_AVPN and (pte & ~0x7F) != avpn)
        or (flags & H_ANDCOND and pte & avpn)
    ):
        unlock_hpte(kvm, hpt, pte_index, pte)
        return H_NOT_FOUND, 0, 0

    v = pte & ~HPTE_V_HVLOCK
    if v & HPTE_V_VALID:
        hpte_write_v(kvm, hpt, pte_index, v & ~HPTE_V_VALID)
        do_tlbies(hpt, mmu.tlbs, [pte_index])
        # R and C are final only now that the tlbie has completed.
        remove_revmap_chain(kvm, hpt, pte_index, v, hpt.r(pte_index))
    r = hpt.rev_entry(pte_index).guest_rpte & ~HPTE_GR_RESERVED
    unlock_hpte(kvm, hpt, pte_index, 0)
    if is_mmio_hpte(v, pte_r):
        mmu.mmio_update += 1
    view_v, _ = hpte_guest_view(v, pte_r, r)
    return H_SUCCESS, view_v, r


def kvmppc_h_bulk_remove(kvm: Kvm, args: list[int]) -> tuple[int, list[int]]:
    """H_BULK_REMOVE: up to four removals, given as (control, argument) pairs in ``args``
    (eight words). Each control word is answered in place: success with the removed
    entry's R and C, not found, or a parameter error (which also stops the call with
    H_PARAMETER). A control of type END stops early. Valid entries are invalidated
    together, with one batch of tlbies, before their R and C are read (P3).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_bulk_remove (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    args = list(args)
    ret = H_SUCCESS
    batch: list[tuple[int, int]] = []  # (argument slot, entry index), locked and invalid
    for i in range(H_BULK_REMOVE_MAX_BATCH):
        j = 2 * i
        pte_index = args[j] & H_BULK_REMOVE_PTEX
        request = args[j] >> 62
        condition = (args[j] >> 56) & 3
        if request == H_BULK_REMOVE_END >> 62:
            break  # no more requests
        if request != 1 or condition == 3 or pte_index >= hpt.npte:
            args[j] = H_BULK_REMOVE_RESPONSE | H_BULK_REMOVE_PARM | condition << 56 | pte_index
            ret = H_PARAMETER
            break
        lock_hpte(hpt, pte_index)
        hp0, hp1 = hpt.v(pte_index), hpt.r(pte_index)
        found = False
        if hp0 & (HPTE_V_ABSENT | HPTE_V_VALID):
            if condition == 0:
                found = True
            elif condition == 1:
                found = not hp0 & args[j + 1]
            else:
                found = (hp0 & ~0x7F) == args[j + 1]
        if not found:
            unlock_hpte(kvm, hpt, pte_index, hp0)
            args[j] = H_BULK_REMOVE_RESPONSE | H_BULK_REMOVE_NOT_FOUND | condition << 56 | pte_index
            continue
        args[j] = H_BULK_REMOVE_RESPONSE | H_BULK_REMOVE_SUCCESS | condition << 56 | pte_index
        rev = hpt.rev_entry(pte_index)
        if not hp0 & HPTE_V_VALID:
            # Absent: nothing for the hardware to forget; R and C are the guest view's.
            args[j] |= (rev.guest_rpte & (HPTE_R_R | HPTE_R_C)) << (56 - 5)
            unlock_hpte(kvm, hpt, pte_index, 0)
            if is_mmio_hpte(hp0, hp1):
                mmu.mmio_update += 1
            continue
        hpte_write_v(kvm, hpt, pte_index, hp0 & ~HPTE_V_VALID)  # stays locked
        batch.append((j, pte_index))

    if batch:
        do_tlbies(hpt, mmu.tlbs, [pte_index for _, pte_index in batch])
        # Read the "r" words after the tlbies, for their final R and C.
        for j, pte_index in batch:
            remove_revmap_chain(kvm, hpt, pte_index, hpt.v(pte_index), hpt.r(pte_index))
            rcbits = hpt.rev_entry(pte_index).guest_rpte & (HPTE_R_R | HPTE_R_C)
            args[j] |= rcbits << (56 - 5)
            unlock_hpte(kvm, hpt, pte_index, 0)
    return ret, args


def kvmppc_h_protect(kvm: Kvm, flags: int, pte_index: int, avpn: int) -> int:
    """H_PROTECT: set an entry's protection (pp0, pp, N) and storage key from ``flags``,
    in the guest's view and, for a valid entry, in the hardware's: invalidated and tlbie'd
    first if it changes, keeping the R and C the hardware set. A valid read-only entry never
    becomes writable here (P8): the write traps, and the fault path asks the host first.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_protect (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    if pte_index >= hpt.npte:
        return H_PARAMETER
    lock_hpte(hpt, pte_index)
    pte_v = hpt.v(pte_index)
    v = pte_v
    if not v & (HPTE_V_ABSENT | HPTE_V_VALID) or (flags & H_AVPN and (v & ~0x7F) != avpn):
        unlock_hpte(kvm, hpt, pte_index, pte_v)
        return H_NOT_FOUND

    pte_r = hpt.r(pte_index)
    bits = (flags << 55) & HPTE_R_PP0
    bits |= (flags << 48) & HPTE_R_KEY_HI
    bits |= flags & (HPTE_R_PP | HPTE_R_N | HPTE_R_KEY_LO)
    mask = HPTE_R_PP0 | HPTE_R_PP | HPTE_R_N | HPTE_R_KEY_HI | HPTE_R_KEY_LO
    rev = hpt.rev_entry(pte_index)
    rev.guest_rpte = (rev.guest_rpte & ~mask) | bits

    if v & HPTE_V_VALID:
        r = (pte_r & ~mask) | bits
        if hpte_is_writable(r) and not hpte_is_writable(pte_r):
            r = hpte_make_readonly(r)  # P8
        if r != pte_r:
            hpte_write_v(kvm, hpt, pte_index, (pte_v & ~HPTE_V_VALID) | HPTE_V_ABSENT)
            do_tlbies(hpt, mmu.tlbs, [pte_index])
            # Do not lose the R and C the hardware set before the tlbie.
            hpte_write_r(kvm, hpt, pte_index, r | (hpt.r(pte_index) & (HPTE_R_R | HPTE_R_C)))
    unlock_hpte(kvm, hpt, pte_index, pte_v)
    if is_mmio_hpte(v, pte_r):
        mmu.mmio_update += 1
    return H_SUCCESS


def kvmppc_h_read(kvm: Kvm, flags: int, pte_index: int) -> tuple[int, list[tuple[int, int]]]:
    """H_READ: the guest's view of entry ``pte_index``, or with H_READ_4 of the four
    entries of its aligned quad (P4: no software bit, no host address in a used entry).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_read (v6.18)
    """
    hpt = kvm_hpt(kvm).hpt
    if pte_index >= hpt.npte:
        return H_PARAMETER, []
    count = 1
    if flags & H_READ_4:
        pte_index &= ~3
        count = 4
    entries = []
    for index in range(pte_index, pte_index + count):
        guest_rpte = hpt.rev_entry(index).guest_rpte
        entries.append(hpte_guest_view(hpt.v(index), hpt.r(index), guest_rpte))
    return H_SUCCESS, entries


def kvmppc_h_clear_ref(kvm: Kvm, flags: int, pte_index: int) -> tuple[int, int]:
    """H_CLEAR_REF: return the entry's guest "r" with its R and C as they were, and clear
    R: in the guest's view, and in the hardware entry (with a tlbie) if it was set there,
    in which case the page's rmap word remembers it as REFERENCED for the host's aging.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_clear_ref (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    if pte_index >= hpt.npte:
        return H_PARAMETER, 0
    rev = hpt.rev_entry(pte_index)
    lock_hpte(hpt, pte_index)
    v, r = hpt.v(pte_index), hpt.r(pte_index)
    if not v & (HPTE_V_VALID | HPTE_V_ABSENT):
        unlock_hpte(kvm, hpt, pte_index, v)
        return H_NOT_FOUND, 0
    gr = rev.guest_rpte
    rev.guest_rpte &= ~HPTE_R_R
    if v & HPTE_V_VALID:
        gr |= r & (HPTE_R_R | HPTE_R_C)
        if r & HPTE_R_R:
            kvmppc_clear_ref_hpte(kvm, hpt, mmu.tlbs, pte_index)
            slot, gfn = revmap_for_hpte(kvm, v, gr)
            if slot is not None:
                rmap = slot_rmap(slot)
                offset = gfn - slot.base_gfn
                lock_rmap(rmap, offset)
                rmap_write(kvm, rmap, offset, rmap.get(offset) | KVMPPC_RMAP_REFERENCED)
                unlock_rmap(rmap, offset)
    unlock_hpte(kvm, hpt, pte_index, v)
    return H_SUCCESS, gr


def kvmppc_h_clear_mod(kvm: Kvm, flags: int, pte_index: int) -> tuple[int, int]:
    """H_CLEAR_MOD: return the entry's guest "r" with its R and C, and clear C. For a
    valid entry the hardware's C is made stable first (absent, invalidated, tlbie'd), then
    moved into the slot's dirty bitmap: the guest clearing C must not hide the write from
    the host's dirty log (P3).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_h_clear_mod,
    kvmppc_set_dirty_from_hpte (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    if pte_index >= hpt.npte:
        return H_PARAMETER, 0
    rev = hpt.rev_entry(pte_index)
    lock_hpte(hpt, pte_index)
    v = hpt.v(pte_index)
    if not v & (HPTE_V_VALID | HPTE_V_ABSENT):
        unlock_hpte(kvm, hpt, pte_index, v)
        return H_NOT_FOUND, 0
    gr = rev.guest_rpte
    rev.guest_rpte &= ~HPTE_R_C
    if v & HPTE_V_VALID:
        # Temporarily absent, so that C is stable.
        hpte_write_v(kvm, hpt, pte_index, v | HPTE_V_ABSENT)
        kvmppc_invalidate_hpte(kvm, hpt, mmu.tlbs, pte_index)
        r = hpt.r(pte_index)
        gr |= r & (HPTE_R_R | HPTE_R_C)
        if r & HPTE_R_C:
            hpte_write_r(kvm, hpt, pte_index, r & ~HPTE_R_C)
            slot, gfn = revmap_for_hpte(kvm, v, gr)
            kvmppc_update_dirty_map(kvm, slot, gfn, kvmppc_actual_pgsz(v, gr))
    unlock_hpte(kvm, hpt, pte_index, v)
    return H_SUCCESS, gr
