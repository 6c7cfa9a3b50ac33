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
from dataclasses import dataclass

from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.guest_memory import MmioExit, Part, emulator_read_write
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
        with kvm.mmu_lock.write():
            if mmu_invalidate_retry_gfn(kvm, seq, gfn):
                return Fault.RETRY

            # 6. Install; a writable mapping is logged as dirty when it is created, since
            # writes through it will not fault again.
            mmu.map(kvm, as_id, gfn, pfn, writable)
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


@dataclass(frozen=True, slots=True)
class GuestAccess:
    """How a guest instruction's access ended: the outcome, a completed load's bytes, and
    the MMIO exit when the outcome is MMIO."""

    outcome: Fault
    data: bytes = b""
    mmio: MmioExit | None = None


def guest_access(
    kvm: Kvm, host: HostMm, vcpu_id: int, gpa: int, data: bytes | None, size: int = 1
) -> tuple[Fault, bytes]:
    """A guest load (``data`` None, ``size`` bytes) or store at ``gpa``: (MAPPED, bytes read
    or b"") or the outcome that stopped the access. :func:`guest_instruction` tells more."""
    access = guest_instruction(kvm, host, vcpu_id, gpa, data, size)
    return access.outcome, access.data


def guest_instruction(
    kvm: Kvm, host: HostMm, vcpu_id: int, gpa: int, data: bytes | None, size: int = 1
) -> GuestAccess:
    """One guest instruction that loads ``size`` bytes at ``gpa`` (``data`` None) or stores
    ``data`` there; up to 8 bytes, which may cross into the next page.

    The hardware translates every page of the access through the vCPU's TLB before any byte
    moves, the lower page first. A miss, or a store through a read-only translation, faults;
    the fault handler runs and the guest is entered again, up to MAX_FAULTS_PER_ACCESS
    times. Each entry first checks the dirty ring: once a fault's write filled it to the
    soft limit, the vCPU exits with DIRTY_RING_FULL before the instruction runs again, and
    the store is not done (measured: the write that publishes the 192nd entry of a 256-entry
    ring exits and leaves memory unchanged). A fault that ends in EFAULT stops the access
    with nothing moved; one that ends in MMIO has the instruction emulated
    (:func:`_emulate`).

    kernel: arch/x86/kvm/x86.c:vcpu_enter_guest; virt/kvm/dirty_ring.c:
    kvm_dirty_ring_check_request; arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_fault (v6.18)
    """
    mmu = kvm.arch
    assert isinstance(mmu, FlatMmu)
    as_id = 0
    write = data is not None
    parts = _page_parts(gpa, len(data) if data is not None else size, kvm.profile.page_size)
    vcpu = kvm.vcpus.get(vcpu_id)
    for _ in range(MAX_FAULTS_PER_ACCESS):
        # Entering the guest: a soft-full ring keeps the vCPU out until userspace harvests
        # and resets it (the exit repeats until then).
        if vcpu is not None and vcpu.dirty_ring is not None and vcpu.dirty_ring.soft_full():
            return GuestAccess(Fault.DIRTY_RING_FULL)
        faulting = None
        for part_gpa, _start, _length in parts:
            entry = mmu.translate(vcpu_id, as_id, part_gpa >> kvm.profile.page_shift)
            if entry is None or (write and not entry.writable):
                faulting = part_gpa
                break
        if faulting is None:
            return _transfer(kvm, host, vcpu_id, parts, data)
        mmu.drop_faulting_entry(vcpu_id, as_id, faulting >> kvm.profile.page_shift)
        outcome = run_to_completion(kvm_page_fault(kvm, host, as_id, faulting, write, vcpu))
        if outcome == Fault.EFAULT:
            return GuestAccess(Fault.EFAULT)
        if outcome == Fault.MMIO:
            access = _emulate(kvm, host, vcpu, parts, data)
            # Re-entering to complete the MMIO exit checks the ring as well.
            if vcpu is not None and vcpu.dirty_ring is not None and vcpu.dirty_ring.soft_full():
                return GuestAccess(Fault.DIRTY_RING_FULL)
            return access
    # Still retrying. That is progress deferred, not lost, while something the fault must
    # wait for is open: an invalidation of the page, or an update of its memslot (INVALID);
    # the vCPU keeps faulting until it ends. Otherwise the access is livelocked: a finding.
    for part_gpa, _start, _length in parts:
        slot = kvm.memslots(as_id).gfn_to_memslot(part_gpa >> kvm.profile.page_shift)
        if kvm.mmu_invalidate_in_progress or (slot is not None and slot.invalid):
            return GuestAccess(Fault.RETRY)
    raise AssertionError(f"guest access to {gpa:#x} made no progress")


def _page_parts(gpa: int, size: int, page_size: int) -> list[Part]:
    """Split [gpa, gpa + size) at the page boundary: one part, or two."""
    first = min(size, page_size - gpa % page_size)
    parts = [(gpa, 0, first)]
    if first < size:
        parts.append((gpa + first, first, size - first))
    return parts


def _transfer(
    kvm: Kvm, host: HostMm, vcpu_id: int, parts: list[Part], data: bytes | None
) -> GuestAccess:
    """Every page is translated: the bytes move through the translations' pfns."""
    mmu = kvm.arch
    assert isinstance(mmu, FlatMmu)
    page_size = kvm.profile.page_size
    loaded = b""
    for part_gpa, start, length in parts:
        entry = mmu.translate(vcpu_id, 0, part_gpa // page_size)
        assert entry is not None
        page = host.pages.get(entry.pfn)
        offset = part_gpa % page_size
        if data is not None:
            assert page is not None
            if page.data is None:
                page.data = bytearray(page_size)
            page.data[offset : offset + length] = data[start : start + length]
        elif page is None or page.data is None:
            loaded += bytes(length)
        else:
            loaded += bytes(page.data[offset : offset + length])
    return GuestAccess(Fault.MAPPED, loaded)


def _emulate(
    kvm: Kvm, host: HostMm, vcpu: KvmVcpu | None, parts: list[Part], data: bytes | None
) -> GuestAccess:
    """x86 emulates an instruction whose fault ended in MMIO (see emulator_read_write: the
    parts KVM's own copy can reach move, the rest is one MMIO exit).

    kernel: arch/x86/kvm/x86.c:x86_emulate_instruction (v6.18)
    """
    loaded, mmio = emulator_read_write(kvm, host, vcpu, parts, data)
    if mmio is None:
        return GuestAccess(Fault.MAPPED, loaded)
    return GuestAccess(Fault.MMIO, b"", mmio)
