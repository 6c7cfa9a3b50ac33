"""The arm64 stage-2 fault path, and a guest access that takes it.

A guest access walks stage 2 in hardware (:mod:`~kvmspec.reference.arm64.hw_access`). When
the walk faults, the vCPU exits to KVM with the abort's syndrome: the IPA, the fault status
(translation, access flag or permission) and its level, whether it was a write, an
instruction fetch, or a read or write of the guest's own stage-1 tables (S1PTW).
:func:`kvm_handle_guest_abort` decides what to do:

* an IPA beyond the host's physical range is a size fault for the guest, one beyond the
  VM's IPA space an abort;
* no usable slot (none, or INVALID while it is deleted or moved), or a write to a READONLY
  slot: an instruction fetch or a stage-1 walk there gets an abort injected (userspace has
  no syndrome to emulate it with); anything else is MMIO, for userspace to emulate;
* an access-flag fault sets AF in place (hardware without FEAT_HAFDBS);
* anything else is :func:`user_mem_abort`: resolve the host page behind the IPA, then,
  under mmu_lock taken for *read* (faults on different IPAs run in parallel, their tables
  updated with compare-and-exchange), check the notifier sequence and install: relax the
  permissions of the leaf in place when the fault came from a leaf of the size the fault
  would map, else map. Blocks only where the slot allows them (A4), pages only while the
  slot logs dirty pages, device memory never executable (A6). A writable mapping marks
  the page dirty in the slot's log.

The paths are generators that yield where another CPU may run, as page_fault.py's do.

kernel: arch/arm64/kvm/mmu.c:kvm_handle_guest_abort, user_mem_abort, handle_access_fault,
kvm_is_write_fault, fault_supports_stage2_huge_mapping, transparent_hugepage_adjust,
get_vma_page_shift, memslot_is_logging, kvm_fault_lock; arch/arm64/kvm/mmio.c:io_mem_abort
(v6.18)
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from kvmspec.reference.arm64.descriptors import KVM_PGTABLE_LAST_LEVEL, KvmPgtableProt
from kvmspec.reference.arm64.hw_access import guest_access as hw_guest_access
from kvmspec.reference.arm64.mmu import Arm64Mmu
from kvmspec.reference.arm64.pgtable import KvmMmuMemoryCache, KvmPgtableWalkFlags
from kvmspec.reference.arm64.stage2 import (
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_mkyoung,
    kvm_pgtable_stage2_relax_perms,
)
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.dirty_log import mark_page_dirty_in_slot
from kvmspec.reference.gfn_to_hva import gfn_to_hva_memslot_prot, kvm_is_error_hva
from kvmspec.reference.host import LEVEL_PMD, Device, HostMm, Vma, get_page
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.memslot import KvmMemorySlot
from kvmspec.reference.mmu_notifier import mmu_invalidate_retry
from kvmspec.reference.page_fault import MAX_FAULTS_PER_ACCESS, kvm_release_faultin_page
from kvmspec.reference.vcpu import KvmVcpu

KVM_IPA_LIMIT = 48
"""The host's physical address range (ID_AA64MMFR0_EL1.PARange as KVM sanitises it): an
IPA at or beyond 2^48 is a size fault whatever the VM's own IPA size."""

KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40
"""How full a top-up leaves a vCPU's page cache (the generic default)."""

FAULT_FLAGS = KvmPgtableWalkFlags.HANDLE_FAULT | KvmPgtableWalkFlags.SHARED
"""A fault walks the tables under the read lock, and stops at the first EAGAIN."""


class AbortOutcome(enum.Enum):
    """What kvm_handle_guest_abort ends with."""

    RESUME = "resume"
    """Handled (mapped, relaxed, AF set, or given up for a retry): the guest runs again."""
    MMIO = "mmio"
    """KVM_EXIT_MMIO: userspace emulates the access."""
    INJECT_DABT = "inject_dabt"
    INJECT_PABT = "inject_pabt"
    INJECT_SIZE_FAULT = "inject_size_fault"
    EFAULT = "efault"
    """The host could not provide the page: the vCPU ioctl fails with EFAULT."""


@dataclass(frozen=True, slots=True)
class GuestAbort:
    """The syndrome KVM reads (ESR_EL2 and HPFAR_EL2): the IPA, the fault status code
    (``translation``, ``access_flag`` or ``permission``) and the level it names, WnR, and
    whether it is an instruction abort or came from the guest's stage-1 walk."""

    ipa: int
    fsc: str
    level: int
    write: bool
    iabt: bool = False
    s1ptw: bool = False


def kvm_is_write_fault(abort: GuestAbort) -> bool:
    """A stage-1 walk counts as a write only on a permission fault (the walker updating the
    guest's AF or dirty bits); otherwise guest tables in a READONLY slot would be refused.

    kernel: arch/arm64/include/asm/kvm_emulate.h:kvm_is_write_fault (v6.18)
    """
    if abort.s1ptw:
        return abort.fsc == "permission"
    if abort.iabt:
        return False
    return abort.write


def kvm_vcpu_trap_is_exec_fault(abort: GuestAbort) -> bool:
    """kernel: arch/arm64/include/asm/kvm_emulate.h:kvm_vcpu_trap_is_exec_fault (v6.18)"""
    return abort.iabt and not abort.s1ptw


def kvm_handle_guest_abort(
    kvm: Kvm, mmu: Arm64Mmu, host: HostMm, vcpu: KvmVcpu, abort: GuestAbort
) -> KernelOp[AbortOutcome]:
    """Route one stage-2 abort (see the module's docstring).

    kernel: arch/arm64/kvm/mmu.c:kvm_handle_guest_abort (v6.18)
    """
    if abort.fsc == "translation":
        if abort.ipa >= 1 << KVM_IPA_LIMIT:
            return AbortOutcome.INJECT_SIZE_FAULT
        if abort.ipa >= 1 << mmu.ia_bits:
            return AbortOutcome.INJECT_PABT if abort.iabt else AbortOutcome.INJECT_DABT
    srcu = kvm.srcu.read_lock()
    try:
        shift = kvm.profile.page_shift
        gfn = abort.ipa >> shift
        memslot = kvm.memslots(0).gfn_to_memslot(gfn)
        hva, writable = gfn_to_hva_memslot_prot(memslot, gfn, shift)
        write_fault = kvm_is_write_fault(abort)
        if kvm_is_error_hva(hva) or (write_fault and not writable):
            if abort.iabt:
                return AbortOutcome.INJECT_PABT
            if abort.s1ptw:
                return AbortOutcome.INJECT_DABT
            return AbortOutcome.MMIO  # io_mem_abort, with a valid syndrome
        assert memslot is not None
        if abort.fsc == "access_flag":
            handle_access_fault(kvm, mmu, abort.ipa)
            return AbortOutcome.RESUME
        ret = yield from user_mem_abort(kvm, mmu, host, vcpu, abort, memslot, hva)
        if ret == -errno.ENOEXEC:
            return AbortOutcome.INJECT_PABT
        if ret:
            return AbortOutcome.EFAULT
        return AbortOutcome.RESUME
    finally:
        kvm.srcu.read_unlock(srcu)


def handle_access_fault(kvm: Kvm, mmu: Arm64Mmu, ipa: int) -> None:
    """Set AF on the leaf (no FEAT_HAFDBS: the hardware faulted instead of setting it).

    kernel: arch/arm64/kvm/mmu.c:handle_access_fault (v6.18)
    """
    with kvm.mmu_lock.read():
        if mmu.pgt is not None:
            run_to_completion(kvm_pgtable_stage2_mkyoung(mmu.pgt, ipa, FAULT_FLAGS))


def memslot_is_logging(memslot: KvmMemorySlot) -> bool:
    """A slot logs dirty pages when it has a bitmap and can be written (a READONLY slot's
    pages never get dirty through the guest).

    kernel: arch/arm64/kvm/mmu.c:memslot_is_logging (v6.18)
    """
    return memslot.dirty_bitmap is not None and not memslot.readonly


def fault_supports_stage2_huge_mapping(
    memslot: KvmMemorySlot, hva: int, map_size: int, page_shift: int
) -> bool:
    """A4's memslot half: a block of ``map_size`` may map ``hva`` only when the slot's gpa
    and hva agree modulo the block size (else the block would map the wrong pages), and
    the block around ``hva`` lies wholly inside the slot.

    kernel: arch/arm64/kvm/mmu.c:fault_supports_stage2_huge_mapping (v6.18)
    """
    if map_size == 1 << page_shift:
        return True
    gpa_start = memslot.base_gfn << page_shift
    uaddr_start = memslot.userspace_addr
    uaddr_end = uaddr_start + (memslot.npages << page_shift)
    if gpa_start % map_size != uaddr_start % map_size:
        return False
    first = -(-uaddr_start // map_size) * map_size
    last = uaddr_end - uaddr_end % map_size
    return first <= hva < last


def get_vma_page_shift(host: HostMm, vma: Vma, hva: int) -> int:
    """The largest mapping the VMA can back at ``hva``: a page for ordinary memory (a THP is
    found later, under the lock); for device memory (VM_PFNMAP) a PUD or PMD block when the
    physical address agrees with ``hva`` modulo the block and the block lies in the VMA.

    kernel: arch/arm64/kvm/mmu.c:get_vma_page_shift (v6.18)
    """
    page_shift = host.page_size.bit_length() - 1
    if not isinstance(vma.backing, Device):
        return page_shift
    pa = (vma.backing.first_pfn + vma.pgoff) * host.page_size + (hva - vma.start)
    pmd_shift = host.hpage_size.bit_length() - 1
    for shift in (pmd_shift + pmd_shift - page_shift, pmd_shift):
        size = 1 << shift
        inside = hva - hva % size >= vma.start and -(-hva // size) * size <= vma.end
        if hva % size == pa % size and inside:
            return shift
    return page_shift


def transparent_hugepage_adjust(
    host: HostMm, memslot: KvmMemorySlot, hva: int, pfn: int, ipa: int, page_shift: int
) -> tuple[int, int, int]:
    """(mapping size, pfn, ipa): a PMD block over a THP the host maps with a PMD, both
    addresses aligned down, when the slot allows the block; else a page.

    kernel: arch/arm64/kvm/mmu.c:transparent_hugepage_adjust (v6.18)
    """
    size = host.hpage_size
    allowed = fault_supports_stage2_huge_mapping(memslot, hva, size, page_shift)
    if allowed and host.mapping_level(hva) == LEVEL_PMD:
        nr = size >> page_shift
        return size, pfn - pfn % nr, ipa - ipa % size
    return 1 << page_shift, pfn, ipa


def kvm_mmu_topup_memory_cache(mmu: Arm64Mmu, vcpu: KvmVcpu) -> KvmMmuMemoryCache:
    """The vCPU's page cache, filled before the lock when it holds fewer pages than one
    walk from the PGD to a page may need (kvm_mmu_cache_min_pages: a table per level below
    the start).

    kernel: arch/arm64/kvm/mmu.c:kvm_mmu_cache_min_pages; virt/kvm/kvm_main.c:
    kvm_mmu_topup_memory_cache (v6.18)
    """
    cache = mmu.vcpu_memcaches.setdefault(vcpu.vcpu_id, KvmMmuMemoryCache(0))
    assert mmu.pgt is not None
    if cache.nobjs < KVM_PGTABLE_LAST_LEVEL - mmu.pgt.geometry.start_level:
        cache.nobjs = KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
    return cache


def user_mem_abort(
    kvm: Kvm,
    mmu: Arm64Mmu,
    host: HostMm,
    vcpu: KvmVcpu,
    abort: GuestAbort,
    memslot: KvmMemorySlot,
    hva: int,
) -> KernelOp[int]:
    """Resolve a translation or permission fault on RAM or device memory: 0 (installed, or
    given up because the notifier sequence moved: the guest faults again), -EFAULT, or
    -ENOEXEC (an execution fault on device memory: an abort for the guest).

    kernel: arch/arm64/kvm/mmu.c:user_mem_abort (v6.18)
    """
    shift = kvm.profile.page_shift
    page_size = 1 << shift
    pgt = mmu.pgt
    assert pgt is not None, "a vCPU runs only while its stage 2 exists"
    fault_is_perm = abort.fsc == "permission"
    fault_granule = pgt.geometry.kvm_granule_size(abort.level)
    write_fault = kvm_is_write_fault(abort)
    exec_fault = kvm_vcpu_trap_is_exec_fault(abort)
    if fault_is_perm and not write_fault and not exec_fault:
        return -errno.EFAULT  # a read permission fault: stage 2 never maps unreadable RAM
    logging_active = memslot_is_logging(memslot)
    memcache = mmu.vcpu_memcaches.setdefault(vcpu.vcpu_id, KvmMmuMemoryCache(0))
    if not fault_is_perm or (logging_active and write_fault):
        memcache = kvm_mmu_topup_memory_cache(mmu, vcpu)

    # Under the mmap lock: what the VMA allows.
    vma = host.find_vma(hva)
    if vma is None:
        return -errno.EFAULT
    force_pte = logging_active
    vma_shift = shift if logging_active else get_vma_page_shift(host, vma, hva)
    vma_pagesize = 1 << vma_shift
    while vma_pagesize > page_size and not fault_supports_stage2_huge_mapping(
        memslot, hva, vma_pagesize, shift
    ):
        vma_pagesize >>= shift - 3  # a PUD falls back to a PMD, a PMD to a page
        force_pte = vma_pagesize == page_size
    ipa = abort.ipa
    if vma_pagesize > page_size:
        ipa -= ipa % vma_pagesize
    gfn = ipa >> shift
    device = isinstance(vma.backing, Device)

    # Snapshot the sequence before dropping the mmap lock: anything the VMA or the pfn
    # told us is stale if an invalidation ends after this.
    mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("user_mem_abort: sequence snapshot taken, resolving the pfn")
    gfn_hva = memslot.userspace_addr + ((gfn - memslot.base_gfn) << shift)
    fault_errno, host_pte = host.fault_in(gfn_hva, write_fault)
    if fault_errno or host_pte is None:
        return -errno.EFAULT
    pfn = host_pte.pfn
    writable = host_pte.writable and not memslot.readonly
    page = host.pages.get(pfn)
    if page is not None:
        get_page(page)
    if not device and logging_active and not write_fault:
        writable = False  # map read-only, so the first write faults and is logged
    if exec_fault and device:
        if page is not None:
            kvm_release_faultin_page(host, page, unused=True, dirty=False)
        return -errno.ENOEXEC
    yield Preempt("user_mem_abort: pfn resolved, taking mmu_lock")

    ret = 0
    with kvm.mmu_lock.read():
        if mmu_invalidate_retry(kvm, mmu_seq):
            ret = -errno.EAGAIN
        else:
            # The kernel aligns fault_ipa down to the mapping size as it did ipa, so the
            # leaf goes where the pfn resolved for ipa belongs.
            fault_ipa = ipa
            if vma_pagesize == page_size and not (force_pte or device):
                if fault_is_perm and fault_granule > page_size:
                    vma_pagesize = fault_granule
                else:
                    vma_pagesize, pfn, fault_ipa = transparent_hugepage_adjust(
                        host, memslot, hva, pfn, fault_ipa, shift
                    )
            prot = KvmPgtableProt.R
            if writable:
                prot |= KvmPgtableProt.W
            if exec_fault:
                prot |= KvmPgtableProt.X
            if device:
                prot |= KvmPgtableProt.DEVICE
            if fault_is_perm and vma_pagesize == fault_granule:
                ret = yield from kvm_pgtable_stage2_relax_perms(pgt, fault_ipa, prot, FAULT_FLAGS)
            else:
                ret = yield from kvm_pgtable_stage2_map(
                    pgt, fault_ipa, vma_pagesize, pfn << shift, prot, memcache, FAULT_FLAGS
                )
        if page is not None:
            kvm_release_faultin_page(host, page, unused=bool(ret), dirty=writable)
    if writable and not ret:
        mark_page_dirty_in_slot(kvm, memslot, gfn, vcpu)
    return 0 if ret == -errno.EAGAIN else ret


@dataclass(frozen=True, slots=True)
class Arm64Access:
    """How a guest access ended: DONE with the bytes a load read, or the abort outcome that
    stopped it (RESUME means it was still faulting: an invalidation or a memslot update it
    has to wait for was open)."""

    outcome: AbortOutcome | None
    data: bytes = b""

    @property
    def done(self) -> bool:
        return self.outcome is None


ACCESS_KINDS = ("load", "store", "fetch", "s1ptw")
"""A data load or store, an instruction fetch, a read by the guest's stage-1 walker."""


def guest_access(
    kvm: Kvm,
    mmu: Arm64Mmu,
    host: HostMm,
    vcpu_id: int,
    ipa: int,
    kind: str,
    data: bytes = b"",
    size: int = 8,
) -> Arm64Access:
    """One guest access of ``kind`` (:data:`ACCESS_KINDS`) at ``ipa``, within one page: a
    store writes ``data``, the others read ``size`` bytes. The hardware walks; on an abort
    KVM's handler runs and the guest retries, up to MAX_FAULTS_PER_ACCESS times.

    kernel: arch/arm64/kvm/arm.c:kvm_arch_vcpu_ioctl_run; arch/arm64/kvm/handle_exit.c:
    kvm_handle_guest_abort's callers (v6.18)
    """
    write = kind == "store"
    fetch = kind == "fetch"
    vcpu = kvm.vcpus[vcpu_id]
    for _ in range(MAX_FAULTS_PER_ACCESS):
        pgt = mmu.pgt
        assert pgt is not None, "the guest runs only while its stage 2 exists"
        if ipa >= 1 << mmu.ia_bits:
            # Beyond the input size: the walk faults at its start level.
            level = pgt.geometry.start_level
            fsc, pa = "translation", None
        else:
            result = run_to_completion(hw_guest_access(pgt, vcpu_id, ipa, write, fetch))
            fsc, level, pa = result.fault or "", result.level, result.pa
        if pa is not None and not fsc:
            return Arm64Access(None, _transfer(host, pa, data if write else None, size))
        abort = GuestAbort(ipa, fsc, level, write, iabt=fetch, s1ptw=kind == "s1ptw")
        outcome = run_to_completion(kvm_handle_guest_abort(kvm, mmu, host, vcpu, abort))
        if outcome is not AbortOutcome.RESUME:
            return Arm64Access(outcome)
    slot = kvm.memslots(0).gfn_to_memslot(ipa >> kvm.profile.page_shift)
    if kvm.mmu_invalidate_in_progress or (slot is not None and slot.invalid):
        return Arm64Access(AbortOutcome.RESUME)
    raise AssertionError(f"guest {kind} at IPA {ipa:#x} made no progress")


def _transfer(host: HostMm, pa: int, data: bytes | None, size: int) -> bytes:
    """Move the bytes through the host physical address the walk reached."""
    pfn, offset = divmod(pa, host.page_size)
    if data is not None:
        host.memory.write(pfn, offset, data)
        return b""
    return host.memory.read(pfn, offset, size)
