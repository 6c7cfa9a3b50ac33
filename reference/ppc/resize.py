"""Resizing the hashed page table: KVM_PPC_RESIZE_HPT_PREPARE and KVM_PPC_RESIZE_HPT_COMMIT.

A guest that grows or shrinks its memory may ask (through the H_RESIZE_HPT_* hypercalls,
which userspace turns into these two ioctls) for a table of another order. PREPARE starts
allocating the new table in a work item and answers "come back in 100 ms" until it is
ready (then 0, or the allocation's error). COMMIT stops the vCPUs (``mmu_ready`` cleared,
every vCPU kicked out), moves the entries, swaps the tables and lets the vCPUs run again.

What moves is fixed by P10: only the entries the guest marked BOLTED. Every entry of the old
table is first unmapped as a notifier would (made ABSENT, tlbie'd, R and C harvested, off
its rmap chain); then a bolted one is rehashed to its group in the new table (same slot in
the group, same primary or secondary hash), ABSENT, to be faulted in again; the others
are simply not copied, which the guest expects (Linux rebuilds them on demand). Two bolted
entries that meet in the same slot of a smaller table are an ENOSPC: nothing is swapped.

The swap happens under mmu_lock, and the old table is freed only after an SRCU grace
period, so a vCPU fault that was still looking at it finishes first (and, seeing
``mmu_ready`` clear, retries on the new one). The rest of the VM sees the old table or the
new one, never a mixture.

kvm->lock serialises the ioctls and the work item; the model runs each in one step, except
the commit's grace period.

kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_vm_ioctl_resize_hpt_prepare,
kvm_vm_ioctl_resize_hpt_commit, resize_hpt_prepare_work, resize_hpt_allocate,
resize_hpt_rehash, resize_hpt_rehash_hpte, resize_hpt_pivot, resize_hpt_release,
kvmppc_set_hpt (v6.18)
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EBUSY, EINVAL, EIO, ENOSPC, ENXIO
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp
from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    PPC_MAX_HPT_ORDER,
    PPC_MIN_HPT_ORDER,
    KvmHptInfo,
    kvmppc_allocate_hpt,
    lock_hpte,
    lock_rmap,
    slot_rmap,
    unlock_hpte,
    unlock_rmap,
)
from kvmspec.reference.ppc.hpt_mmu import kvm_hpt
from kvmspec.reference.ppc.hpte import (
    HPTE_V_1TB_SEG,
    HPTE_V_ABSENT,
    HPTE_V_AVPN,
    HPTE_V_AVPN_SHIFT,
    HPTE_V_BOLTED,
    HPTE_V_HVLOCK,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
    hpte_rpn,
    kvmppc_actual_pgsz,
    kvmppc_hpte_base_page_shift,
)
from kvmspec.reference.ppc.rmap_walk import kvmppc_unmap_hpte

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm

RESIZE_HPT_ESTIMATE_MS = 100
"""PREPARE's answer while the new table is being allocated: try again in that many ms."""


@dataclass(slots=True)
class KvmResizeHpt:
    """struct kvm_resize_hpt: the order asked for, the state of the preparation (-EBUSY
    while the work item runs, then 0 or its error) and the new table once allocated (the
    old one after the pivot, until it is released)."""

    order: int
    error: int = -EBUSY
    hpt: KvmHptInfo | None = None


def kvmppc_set_hpt(kvm: Kvm, info: KvmHptInfo) -> None:
    """Make ``info`` the VM's table. The MMIO cache generation starts again at 0.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_set_hpt (v6.18)
    """
    mmu = kvm_hpt(kvm)
    mmu.mmio_update = 0
    mmu.hpt = info


def resize_hpt_release(kvm: Kvm, resize: KvmResizeHpt | None) -> None:
    """Forget ``resize``: free its table unless its work item still runs (that one frees
    it when it sees it is no longer the VM's pending resize).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_release (v6.18)
    """
    if resize is None:
        return
    if resize.error != -EBUSY:
        resize.hpt = None
    mmu = kvm_hpt(kvm)
    if mmu.resize_hpt is resize:
        mmu.resize_hpt = None


def resize_hpt_prepare_work(kvm: Kvm, resize: KvmResizeHpt) -> None:
    """The work item PREPARE queued: allocate the new table (if the request is still the
    pending one) and record the outcome.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_prepare_work,
    resize_hpt_allocate (v6.18)
    """
    mmu = kvm_hpt(kvm)
    if kvm.warn_on(resize.error != -EBUSY, "P10", "resize work ran twice"):
        return
    err = 0
    if mmu.resize_hpt is resize:
        errno, hpt = kvmppc_allocate_hpt(resize.order)
        err = -errno
        resize.hpt = hpt
    resize.error = err
    if mmu.resize_hpt is not resize:
        resize_hpt_release(kvm, resize)


def _check_resize_args(kvm: Kvm, flags: int, shift: int) -> int:
    """The checks both ioctls make first: no flags, an HPT guest, an order in range (0
    means "cancel" for PREPARE)."""
    if flags != 0:
        return -EINVAL
    if shift and not PPC_MIN_HPT_ORDER <= shift <= PPC_MAX_HPT_ORDER:
        return -EINVAL
    return 0


def kvm_vm_ioctl_resize_hpt_prepare(kvm: Kvm, flags: int, shift: int) -> int:
    """KVM_PPC_RESIZE_HPT_PREPARE: start (or ask about) a resize to order ``shift``, or
    cancel the pending one with ``shift`` 0. Returns the ioctl's value: 100 (ms) while the
    table is being allocated, 0 when it is ready (or for a cancel), a negative errno
    (EINVAL for bad arguments, or the allocation's error, which also drops the request).
    A request for another order replaces the pending one.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_vm_ioctl_resize_hpt_prepare (v6.18)
    """
    ret = _check_resize_args(kvm, flags, shift)
    if ret:
        return ret
    mmu = kvm_hpt(kvm)
    resize = mmu.resize_hpt
    if resize is not None:
        if resize.order == shift:
            ret = resize.error
            if ret == -EBUSY:
                return RESIZE_HPT_ESTIMATE_MS
            if ret:
                resize_hpt_release(kvm, resize)
            return ret
        resize_hpt_release(kvm, resize)  # not the one asked for: cancel it
    if not shift:
        return 0
    mmu.resize_hpt = KvmResizeHpt(shift)
    return RESIZE_HPT_ESTIMATE_MS


def kvm_vm_ioctl_resize_hpt_commit(kvm: Kvm, flags: int, shift: int) -> KernelOp[int]:
    """KVM_PPC_RESIZE_HPT_COMMIT: switch to the prepared table of order ``shift``. 0 on
    success; -EINVAL for bad arguments; -ENXIO when no resize of that order is pending;
    the preparation's state when it is not ready (-EBUSY) or failed; -ENOSPC when two
    bolted entries collide in the new table (the old table stays, its entries unmapped).
    The request is dropped in every case but the bad arguments.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvm_vm_ioctl_resize_hpt_commit (v6.18)
    """
    ret = _check_resize_args(kvm, flags, shift)
    if ret:
        return ret
    mmu = kvm_hpt(kvm)
    resize = mmu.resize_hpt
    if kvm.warn_on(not mmu.mmu_ready, "P10", "resize commit with the MMU not ready"):
        resize_hpt_release(kvm, resize)
        return -EIO
    # Stop the vCPUs: none enters the guest (or installs an entry) until this is over.
    mmu.mmu_ready = False
    try:
        if resize is None or resize.order != shift:
            return -ENXIO
        if resize.error:
            return resize.error
        ret = resize_hpt_rehash(kvm, resize)
        if ret:
            return ret
        yield from resize_hpt_pivot(kvm, resize)
        return 0
    finally:
        mmu.mmu_ready = True
        resize_hpt_release(kvm, resize)


def resize_hpt_rehash(kvm: Kvm, resize: KvmResizeHpt) -> int:
    """Rehash every entry of the current table into the new one: 0, or the first error.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_rehash (v6.18)
    """
    old = kvm_hpt(kvm).hpt
    # Entries never written are free; the kernel visits all npte of them for nothing.
    for index in sorted(old.hptes):
        ret = resize_hpt_rehash_hpte(kvm, resize, index)
        if ret:
            return ret
    return 0


def resize_hpt_new_index(v: int, r: int, index: int, old_order: int, new_order: int) -> int:
    """Where entry ``index`` of a table of ``old_order`` goes in one of ``new_order``.

    The entry does not say its virtual address, but enough of it: the AVPN holds the VSID
    and the address bits from 23 up, and for pages under 8 MiB the bits between the page
    size and bit 23 come back from the group it sits in (hash = VSID XOR page number, so
    page number = group XOR VSID, within the old mask). A 1 TiB segment folds its VSID as
    the hash does. The slot within the group and the primary/secondary choice stay.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_rehash_hpte (v6.18)
    """
    old_mask = (1 << (old_order - 7)) - 1
    new_mask = (1 << (new_order - 7)) - 1
    pshift = kvmppc_hpte_base_page_shift(v, r)
    avpn = ((v & HPTE_V_AVPN) >> HPTE_V_AVPN_SHIFT) & ~(((1 << pshift) - 1) >> 23)
    pteg = index // HPTES_PER_GROUP
    if v & HPTE_V_SECONDARY:
        pteg = ~pteg
    if v & HPTE_V_1TB_SEG:
        offset = (avpn & 0x1FFFF) << 23
        vsid = avpn >> 17
        folded = vsid ^ (vsid << 25)
        if pshift < 23:
            offset |= ((folded ^ pteg) & old_mask) << pshift
        hash_ = folded ^ (offset >> pshift)
    else:
        offset = (avpn & 0x1F) << 23
        vsid = avpn >> 5
        if pshift < 23:
            offset |= ((vsid ^ pteg) & old_mask) << pshift
        hash_ = vsid ^ (offset >> pshift)
    new_pteg = (~hash_ if v & HPTE_V_SECONDARY else hash_) & new_mask
    return new_pteg * HPTES_PER_GROUP + index % HPTES_PER_GROUP


def resize_hpt_rehash_hpte(kvm: Kvm, resize: KvmResizeHpt, idx: int) -> int:
    """Unmap entry ``idx`` of the current table and, if it is BOLTED, copy it (ABSENT) to
    its place in the new table: 0, -EIO for an entry of no known page size, -ENOSPC when a
    bolted entry already holds that place.

    The unmap finds the page's slot even when it is INVALID, as every removal must (seed
    000). A non-bolted entry stays in the old table, which is about to be dropped.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_rehash_hpte (v6.18)
    """
    mmu = kvm_hpt(kvm)
    old = mmu.hpt
    new = resize.hpt
    assert new is not None
    if not old.v(idx) & (HPTE_V_VALID | HPTE_V_ABSENT):
        return 0  # the vCPUs are stopped: nothing can make a free entry used now
    lock_hpte(old, idx)
    vpte = old.v(idx)
    try:
        # Copied before the unmap below folds the hardware's R and C into the old entry's
        # guest_rpte: the moved entry gets the copy without them (a kernel finding, P4).
        guest_rpte = old.rev_entry(idx).guest_rpte
        apsize = kvmppc_actual_pgsz(vpte, guest_rpte)
        if not apsize:
            return -EIO
        if vpte & HPTE_V_VALID:
            gfn = hpte_rpn(guest_rpte, apsize, kvm.profile.page_shift)
            memslot = kvm.memslots(0).search_memslots(gfn)
            if memslot is not None:
                rmap = slot_rmap(memslot)
                offset = gfn - memslot.base_gfn
                lock_rmap(rmap, offset)
                kvmppc_unmap_hpte(kvm, old, mmu.tlbs, idx, memslot, rmap, gfn)
                unlock_rmap(rmap, offset)
        vpte = old.v(idx)
        kvm.warn_on(bool(vpte & HPTE_V_VALID), "P10", f"HPTE {idx:#x} still valid after unmap")
        if not vpte & HPTE_V_BOLTED:
            return 0
        rpte = old.r(idx)
        new_idx = resize_hpt_new_index(vpte, rpte, idx, old.order, new.order)
        replace_vpte = new.v(new_idx)
        if replace_vpte & (HPTE_V_VALID | HPTE_V_ABSENT):
            kvm.warn_on(new.order >= old.order, "P10", "collision in a larger table")
            if replace_vpte & HPTE_V_BOLTED:
                return -ENOSPC  # two bolted entries, one place
            # A non-bolted entry there is dropped (the model never copies one).
        new.store(new_idx, vpte & ~HPTE_V_HVLOCK, rpte)  # the old one is locked, not the copy
        new.rev_entry(new_idx).guest_rpte = guest_rpte
        return 0
    finally:
        unlock_hpte(kvm, old, idx, old.v(idx))


def resize_hpt_pivot(kvm: Kvm, resize: KvmResizeHpt) -> KernelOp[None]:
    """Swap the tables under mmu_lock, then wait out the SRCU readers that may still use
    the old one (vCPU faults), so that it can be freed.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:resize_hpt_pivot (v6.18)
    """
    mmu = kvm_hpt(kvm)
    assert resize.hpt is not None
    with kvm.mmu_lock.write():
        old = mmu.hpt
        kvmppc_set_hpt(kvm, resize.hpt)
        resize.hpt = old
    yield from kvm.srcu.synchronize("resize_hpt_pivot: old HPT readers")
