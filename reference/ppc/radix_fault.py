"""The radix guest's page fault, and the hardware access that raises it.

A guest access whose gpa has no leaf in the partition-scoped tree, or a store through a
read-only leaf, traps to KVM (a hypervisor data storage interrupt). KVM then:

1. finds the memslot: none, or an INVALID one (being deleted or moved), is emulated MMIO;
2. snapshots mmu_invalidate_seq, then resolves the host page (this may sleep);
3. under mmu_lock, reads the host PTE again, unless an invalidation ran meanwhile (then the
   guest simply retries): it gives the host page size and the write permission;
4. chooses the leaf level: a 2 MiB or 1 GiB leaf only when the slot is not dirty-logged,
   the host maps a page of exactly that size, and gpa and hva agree modulo it (R1);
   otherwise a base page, taken from inside the host's huge page;
5. builds the leaf: R (and execute) always, write permission only from a writable host PTE,
   and C set with it (a writable leaf is dirty from birth, which is how dirty logging sees
   pages the guest writes without faulting again);
6. installs it under mmu_lock, retrying if an invalidation ran since step 2 (N4).

The kernel does not check that a huge leaf stays inside the slot: only the congruence of
gpa and hva. A slot that covers part of a congruent host huge page gets a leaf that also
maps the gpas next to it (the invariant checker reports that as M13/N4).

The fault is a generator yielding where other CPUs may run, so a test can race it with an
MMU-notifier invalidation or a memslot flush. ``radix_guest_access`` is the hardware: the
TLB, the tree walk that sets R and C, and the retry loop around the fault.

Book3S HV refuses READONLY memslots (has_readonly_mem is False), so the kernel's branch for
a store to one (a DSI to the guest) is not modelled; nor is the R/C-setting assist
(kvmppc_hv_handle_set_rc): the modelled hardware always sets R and C itself.

kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_radix_page_fault,
kvmppc_book3s_instantiate_page; arch/powerpc/include/asm/kvm_book3s_64.h:find_kvm_host_pte
(v6.18)
"""

from __future__ import annotations

from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import LEVEL_NONE, LEVEL_PMD, HostMm, HostPte, get_page
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import mmu_invalidate_retry
from kvmspec.reference.page_fault import MAX_FAULTS_PER_ACCESS, Fault, kvm_release_faultin_page
from kvmspec.reference.ppc.radix_mmu import kvm_radix
from kvmspec.reference.ppc.radix_pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_EXEC,
    _PAGE_PRESENT,
    _PAGE_PTE,
    _PAGE_READ,
    _PAGE_WRITE,
    PMD_SHIFT,
    PUD_SHIFT,
    TlbEntry,
    find_kvm_secondary_pte,
    kvmppc_create_pte,
    kvmppc_radix_update_pte,
    leaf_shift,
    pte_rpn_mask,
)


def find_kvm_host_pte(kvm: Kvm, host: HostMm, mmu_seq: int, hva: int) -> tuple[HostPte, int] | None:
    """The host PTE at ``hva`` and the shift of the page it maps, read under mmu_lock; None
    if an invalidation ran since ``mmu_seq`` (the PTE may be changing) or nothing is mapped.
    For a huge page the PTE is the huge page's: its pfn is the first page's.

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:find_kvm_host_pte (v6.18)
    """
    if mmu_invalidate_retry(kvm, mmu_seq):
        return None
    level = host.mapping_level(hva)
    pte = host.lookup(hva)
    if level == LEVEL_NONE or pte is None:
        return None
    if level != LEVEL_PMD:
        return pte, kvm.profile.page_shift
    page_in_huge = (hva % host.hpage_size) // host.page_size
    shift = host.hpage_size.bit_length() - 1
    return HostPte(pte.pfn - page_in_huge, pte.writable, pte.young, pte.dirty), shift


def kvmppc_radix_leaf_level(
    gpa: int, hva: int, host_shift: int, page_shift: int, dirty_logging: bool
) -> int:
    """The level of the leaf for a fault at ``gpa`` backed at ``hva`` by a host page of
    ``host_shift``: 2 (1 GiB) or 1 (2 MiB) when the slot is not logged, the host page is
    exactly that size and gpa and hva agree within it; else 0, a base page. (A 1 GiB host
    page whose addresses agree only within 2 MiB still gets base pages: the kernel compares
    the host page size with each level's for equality.)

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_instantiate_page (v6.18)
    """
    page_size = 1 << page_shift
    if dirty_logging:
        return 0
    for level, shift in ((2, PUD_SHIFT), (1, PMD_SHIFT)):
        congruent = (gpa & ((1 << shift) - page_size)) == (hva & ((1 << shift) - page_size))
        if host_shift == shift and congruent:
            return level
    return 0


def kvmppc_book3s_instantiate_page(
    kvm: Kvm, host: HostMm, gpa: int, memslot: KvmMemorySlot, writing: bool
) -> KernelOp[Fault]:
    """Resolve the host page for ``gpa`` and install a leaf for it: MAPPED, RETRY (the
    guest takes the fault again: an invalidation ran, or the host PTE is gone) or EFAULT
    (the host cannot provide the page).

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_instantiate_page (v6.18)
    """
    pgt = kvm_radix(kvm).pgtable
    page_shift = pgt.page_shift
    gfn = gpa >> page_shift

    mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("radix fault: sequence snapshot taken")

    # __kvm_faultin_pfn: may sleep. The reference it takes keeps the page until the end.
    hva = __gfn_to_hva_memslot(memslot, gfn, page_shift)
    errno, faulted = host.fault_in(hva, writing)
    if errno or faulted is None:
        return Fault.EFAULT
    page = host.pages.get(faulted.pfn)  # None for the zero page and device memory
    if page is not None:
        get_page(page)
    yield Preempt("radix fault: page resolved, reading the host PTE under mmu_lock")

    installed = False
    pte = 0
    try:
        with kvm.mmu_lock.write():
            found = find_kvm_host_pte(kvm, host, mmu_seq, hva)
        if found is None:
            return Fault.RETRY
        host_pte, host_shift = found
        level = kvmppc_radix_leaf_level(gpa, hva, host_shift, page_shift, memslot.dirty_logging)
        shift = leaf_shift(level, page_shift)
        # A leaf smaller than the host page maps the one page of it that backs gpa.
        hpa = (host_pte.pfn << page_shift) | (hva & ((1 << host_shift) - 1) & ~((1 << shift) - 1))
        pte = _PAGE_PRESENT | _PAGE_PTE | _PAGE_READ | _PAGE_EXEC | _PAGE_ACCESSED
        pte |= hpa & pte_rpn_mask(page_shift)
        if host_pte.writable:
            # Writable only from a writable host PTE, and born dirty: the guest will write
            # without faulting again, so the first harvest must report the page.
            pte |= _PAGE_WRITE | _PAGE_DIRTY
        yield Preempt("radix fault: leaf built, taking mmu_lock to install it")

        with kvm.mmu_lock.write():
            if mmu_invalidate_retry(kvm, mmu_seq):
                return Fault.RETRY
            kvmppc_create_pte(kvm, pgt, pte, gpa, level)
            installed = True
        return Fault.MAPPED
    finally:
        if page is not None:
            kvm_release_faultin_page(
                host, page, unused=not installed, dirty=bool(pte & _PAGE_WRITE)
            )


def kvmppc_book3s_radix_page_fault(
    kvm: Kvm, host: HostMm, gpa: int, writing: bool
) -> KernelOp[Fault]:
    """A hypervisor data storage interrupt on ``gpa``: MMIO when no usable slot holds it
    (none, or one being deleted or moved), otherwise the outcome of instantiating the page.
    The memslots are read inside an SRCU read section, as in every fault.

    kernel: arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_radix_page_fault (v6.18)
    """
    srcu = kvm.srcu.read_lock()
    try:
        memslot = kvm.memslots(0).gfn_to_memslot(gpa >> kvm.profile.page_shift)
        if memslot is None or memslot.invalid:
            return Fault.MMIO
        return (yield from kvmppc_book3s_instantiate_page(kvm, host, gpa, memslot, writing))
    finally:
        kvm.srcu.read_unlock(srcu)


def radix_hardware_access(kvm: Kvm, gpa: int, write: bool) -> int | None:
    """The MMU translating a load or store at ``gpa``: the host pfn, or None when it traps
    to the hypervisor (no leaf, or a store through a read-only one).

    A TLB hit needs nothing from the tree, except the first store through an entry that
    has not set C yet: the hardware then sets C in the leaf. A miss walks the tree, sets R
    (and C for a store) in the leaf, and caches the translation.
    """
    pgt = kvm_radix(kvm).pgtable
    gfn = gpa >> pgt.page_shift
    entry: TlbEntry | None = pgt.tlb.get(gfn)
    if entry is not None and (not write or (entry.writable and entry.dirty)):
        return entry.pfn
    if entry is not None:
        del pgt.tlb[gfn]  # a store that needs the tree walks it again
    leaf = find_kvm_secondary_pte(pgt, gpa)
    if leaf is None or (write and not leaf.pte & _PAGE_WRITE):
        return None
    kvmppc_radix_update_pte(leaf, 0, _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0))
    pte = leaf.pte
    first_pfn = (pte & pte_rpn_mask(pgt.page_shift)) >> pgt.page_shift
    pfn = first_pfn + ((gpa - leaf.gpa) >> pgt.page_shift)
    pgt.tlb[gfn] = TlbEntry(pfn, bool(pte & _PAGE_WRITE), bool(pte & _PAGE_DIRTY))
    return pfn


def radix_guest_access(
    kvm: Kvm, host: HostMm, gpa: int, data: bytes | None, size: int = 1
) -> tuple[Fault, bytes]:
    """A guest load (``data`` None, ``size`` bytes) or store of ``data`` at ``gpa``, within
    one base page: (MAPPED, the bytes loaded or b""), or MMIO / EFAULT / RETRY.

    Each trap runs the page fault to completion and the access is tried again, at most
    MAX_FAULTS_PER_ACCESS times; still trapping after that is reported as RETRY (the guest
    would keep faulting while something the fault waits for, such as an invalidation, is
    open).
    """
    write = data is not None
    page_size = kvm.profile.page_size
    for _ in range(MAX_FAULTS_PER_ACCESS):
        pfn = radix_hardware_access(kvm, gpa, write)
        if pfn is not None:
            if data is not None:
                host.memory.write(pfn, gpa % page_size, data)
                return Fault.MAPPED, b""
            return Fault.MAPPED, host.memory.read(pfn, gpa % page_size, size)
        outcome = run_to_completion(kvmppc_book3s_radix_page_fault(kvm, host, gpa, write))
        if outcome in (Fault.MMIO, Fault.EFAULT):
            return outcome, b""
    return Fault.RETRY, b""
