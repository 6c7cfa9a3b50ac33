"""The page-fault protocol every architecture shares, and a guest access that uses it.

A guest touches a gpa that its MMU cannot translate (or cannot write). KVM then:

1. snapshots ``mmu_invalidate_seq`` (before anything that may sleep);
2. looks up the memslot: none is MMIO; an INVALID slot (being deleted or moved) is retried
   on x86 and treated as MMIO on arm64 and POWER; a write to a READONLY slot is MMIO;
3. resolves the pfn from the host (may sleep): an address with no VMA or too little
   protection is EFAULT; a page the host maps read-only is mapped read-only;
4. takes mmu_lock;
5. retries if an invalidation covering the gfn ran since the snapshot (N4), because the pfn
   it resolved may already be gone;
6. installs the translation through the architecture;
7. releases the page, and marks it dirty when the mapping is writable (dirty logging).

The fault is a generator: it yields where another CPU (a notifier, a memslot update) may run,
so the harness can interleave it with them; run alone it behaves like the kernel's code.

kernel: include/linux/kvm_host.h:mmu_invalidate_retry_gfn; virt/kvm/kvm_main.c:
mark_page_dirty_in_slot, __gfn_to_hva_many, hva_to_pfn; arch/x86/kvm/mmu/mmu.c:
kvm_mmu_page_fault, kvm_faultin_pfn, is_page_fault_stale (the same protocol on every
architecture) (v6.18)
"""

from __future__ import annotations

import enum

from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import HostMm, HostPage, get_page, put_page
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import (
    mmu_invalidate_retry_gfn,
    mmu_invalidate_retry_gfn_unsafe,
)
from kvmspec.reference.vcpu import KvmVcpu

MAX_FAULTS_PER_ACCESS = 8
"""A guest access that needs more faults than this does not make progress: a finding."""


class Fault(enum.Enum):
    DIRTY_RING_FULL = "dirty_ring_full"
    MAPPED = "mapped"
    RETRY = "retry"
    MMIO = "mmio"
    EFAULT = "efault"


def kvm_page_fault(
    kvm: Kvm, host: HostMm, as_id: int, gpa: int, write: bool, vcpu: KvmVcpu | None = None
) -> KernelOp[Fault]:
    """Handle one fault on ``gpa`` with the flat MMU: MAPPED, RETRY, MMIO or EFAULT.
    ``vcpu`` is the vCPU that faulted (its dirty ring logs the write), if it was created."""
    # The whole fault reads the memslots inside an SRCU read section: a memslot update
    # cannot finish (and free what the fault looked at) until the fault is done.
    srcu = kvm.srcu.read_lock()
    try:
        return (yield from _kvm_page_fault(kvm, host, as_id, gpa, write, vcpu))
    finally:
        kvm.srcu.read_unlock(srcu)


def _kvm_page_fault(
    kvm: Kvm, host: HostMm, as_id: int, gpa: int, write: bool, vcpu: KvmVcpu | None
) -> KernelOp[Fault]:
    mmu = kvm.arch
    assert isinstance(mmu, FlatMmu)
    shift = kvm.profile.page_shift
    gfn = gpa >> shift

    # 1. Snapshot the invalidation sequence before anything can sleep.
    seq = kvm.mmu_invalidate_seq
    yield Preempt("fault: sequence snapshot taken")

    # 2. The memslot decides MMIO, retry or RAM.
    slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
    if slot is not None and slot.invalid:
        return Fault.RETRY if kvm.profile.invalid_slot_fault == "retry" else Fault.MMIO
    hva, _ = gfn_to_hva_many(slot, gfn, write, shift)
    if slot is None or kvm_is_error_hva(hva):
        return Fault.MMIO

    # The lockless pre-check: while an invalidation covering the gfn is open, resolving a
    # pfn is wasted work (it would be retried anyway), and would only contend with the host.
    if mmu_invalidate_retry_gfn_unsafe(kvm, seq, gfn):
        return Fault.RETRY

    # 3. Resolve the pfn from the host; this may sleep. The fault holds a reference to the
    # page from here to step 7, so the page cannot be freed (or migrated) under it.
    yield Preempt("fault: resolving the pfn (get_user_pages may sleep)")
    errno, host_pte = host.fault_in(hva, write)
    if errno or host_pte is None:
        return Fault.EFAULT
    pfn = host_pte.pfn
    page = host.pages.get(pfn)  # None for the shared zero page, which is never refcounted
    if page is not None:
        get_page(page)
    writable = write or (host_pte.writable and not slot.readonly)
    mapped = False
    try:
        yield Preempt("fault: pfn resolved, taking mmu_lock")

        # 4-5. Under mmu_lock: give up if an invalidation covering the gfn ran meanwhile (N4).
        if mmu_invalidate_retry_gfn(kvm, seq, gfn):
            return Fault.RETRY

        # 6. Install; a writable mapping is logged as dirty when it is created, since writes
        # through it will not fault again.
        mmu.map(as_id, gfn, pfn, writable)
        mapped = True
        if writable:
            mark_page_dirty_in_slot(kvm, slot, gfn, vcpu)
        return Fault.MAPPED
    finally:
        # 7. Release the page (N8).
        if page is not None:
            kvm_release_faultin_page(host, page, unused=not mapped, dirty=mapped and writable)


def kvm_release_faultin_page(host: HostMm, page: HostPage, unused: bool, dirty: bool) -> None:
    """Drop the fault's reference. A page mapped writable is marked dirty now, while the
    reference is still held: the guest may write it at any moment without KVM seeing the
    write, so the host must treat it as dirty (write it back, not discard it) from here on.
    An unused page (the fault retried) is released clean.

    kernel: include/linux/kvm_host.h:kvm_release_faultin_page; virt/kvm/kvm_main.c:
    kvm_release_page_dirty, kvm_set_page_dirty (v6.18)
    """
    if dirty and not unused:
        page.dirty = True
    put_page(host, page)


def guest_access(
    kvm: Kvm, host: HostMm, vcpu_id: int, gpa: int, data: bytes | None, size: int = 1
) -> tuple[Fault, bytes]:
    """A guest load (``data`` None, ``size`` bytes) or store at ``gpa`` within one page.

    The hardware translates through the vCPU's TLB; a miss or a write through a read-only
    translation faults, and the access is tried again, up to MAX_FAULTS_PER_ACCESS times.
    Returns (MAPPED, bytes read or b"") or the outcome that stopped the access (an MMIO or
    EFAULT exit, the dirty-ring-full exit before the guest is entered, or RETRY when the
    vCPU is still faulting because an invalidation or a memslot update is in progress).
    """
    mmu = kvm.arch
    assert isinstance(mmu, FlatMmu)
    write = data is not None
    as_id = 0
    gfn = gpa >> kvm.profile.page_shift
    vcpu = kvm.vcpus.get(vcpu_id)
    # Entering the guest: a soft-full dirty ring keeps the vCPU out until userspace harvests
    # and resets it (kvm_dirty_ring_check_request; the exit repeats until then).
    if vcpu is not None and vcpu.dirty_ring is not None and vcpu.dirty_ring.soft_full():
        return Fault.DIRTY_RING_FULL, b""
    for _ in range(MAX_FAULTS_PER_ACCESS):
        entry = mmu.translate(vcpu_id, as_id, gfn)
        if entry is not None and (entry.writable or not write):
            page = host.pages.get(entry.pfn)
            offset = gpa % kvm.profile.page_size
            if write:
                assert page is not None and data is not None
                if page.data is None:
                    page.data = bytearray(kvm.profile.page_size)
                page.data[offset : offset + len(data)] = data
                return Fault.MAPPED, b""
            if page is None or page.data is None:
                return Fault.MAPPED, bytes(size)
            return Fault.MAPPED, bytes(page.data[offset : offset + size])
        mmu.drop_faulting_entry(vcpu_id, as_id, gfn)
        outcome = run_to_completion(kvm_page_fault(kvm, host, as_id, gpa, write, vcpu))
        if outcome in (Fault.MMIO, Fault.EFAULT):
            return outcome, b""
    # Still retrying. That is progress deferred, not lost, while something the fault must
    # wait for is open: an invalidation of the page, or an update of its memslot (INVALID);
    # the vCPU keeps faulting until it ends. Otherwise the access is livelocked: a finding.
    slot = kvm.memslots(as_id).gfn_to_memslot(gfn)
    if kvm.mmu_invalidate_in_progress or (slot is not None and slot.invalid):
        return Fault.RETRY, b""
    raise AssertionError(f"guest access to {gpa:#x} made no progress")
