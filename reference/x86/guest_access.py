"""A guest instruction on a vCPU with shadow paging: the hardware, the fault, the emulator.

The guest's load or store names a guest *virtual* address. The hardware translates it
through the vCPU's TLB, and on a miss walks the shadow tables from the vCPU's root (never
the guest's own tables), setting the A bit (and D on a store) of the leaf as it goes and
caching what it found. A miss or a refused right is a page fault, which goes to KVM
(paging_tmpl.fname_page_fault); KVM either fixed the shadow tables (the instruction runs
again), injected the guest's own #PF (the model's guest has no handler: the vCPU shuts
down), or asks for the instruction to be emulated: an access with no memslot or a store
to a READONLY one (MMIO), or a store to a page KVM keeps read-only because it holds a
guest page table. The emulator translates the address through the guest's tables,
writes guest memory itself, and tells the shadow MMU (kvm_mmu_track_write).

An MMIO SPTE (MMIO caching on) is present to the hardware but sets a reserved address
bit: the access faults with PFERR_RSVD, and KVM first tries handle_mmio_page_fault, which
emulates at once when the SPTE's generation is current (the emulator then sends a page that
matches the vCPU's cached MMIO translation straight to the VMM).

The emulator does not know every instruction. When it fails on a store to a write-protected
page, KVM may instead stop shadowing the page and let the CPU run the instruction again
(unprotect and retry); the same fault at the same instruction a second time is not retried
but reported (KVM_EXIT_INTERNAL_ERROR), or seed 002's loop would never end: the retry's
own fault can shadow the page again when it is a table on the path to itself.

kernel: arch/x86/kvm/x86.c:vcpu_enter_guest, x86_emulate_instruction, emulator_read_write,
emulator_read_write_onepage, emulator_write_phys, kvm_unprotect_and_retry_on_failure;
arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_fault, handle_mmio_page_fault,
kvm_mmu_write_protect_fault, __kvm_mmu_unprotect_gfn_and_retry; the hardware page walk
(SDM vol. 3, 4.10)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from errno import ENOSPC

from kvmspec.reference.concurrency import KernelOp, run_to_completion
from kvmspec.reference.guest_memory import MmioExit, emulator_read_write
from kvmspec.reference.host import HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.vcpu import KvmVcpu
from kvmspec.reference.x86.guest_walk import X86Exception, walk_addr_generic
from kvmspec.reference.x86.lpage import kvm_pages_per_hpage
from kvmspec.reference.x86.mmio_spte import (
    check_mmio_spte,
    get_mmio_spte,
    get_mmio_spte_access,
    get_mmio_spte_gfn,
    is_mmio_spte,
    mmio_access_allowed,
    vcpu_cache_mmio_info,
    vcpu_match_mmio_gva,
)
from kvmspec.reference.x86.mmu_page import ShadowMmuState, shadow_of
from kvmspec.reference.x86.paging import (
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    pt_index,
)
from kvmspec.reference.x86.paging_tmpl import KvmGuestMemory, PageFaultResult, fname_page_fault
from kvmspec.reference.x86.pvm_top_level import pvm_sync_faulting_entry
from kvmspec.reference.x86.roots import vcpu_enter_guest
from kvmspec.reference.x86.set_spte import RetPf
from kvmspec.reference.x86.spte import is_last_spte, is_shadow_present_pte, spte_to_pfn
from kvmspec.reference.x86.tlb import TlbEntry, VcpuMmu
from kvmspec.reference.x86.unsync import kvm_mmu_invlpg
from kvmspec.reference.x86.zap import kvm_mmu_track_write, kvm_mmu_unprotect_gfn
from kvmspec.spec.uapi.constants import PAGE_SHIFT, PAGE_SIZE

MAX_FAULTS_PER_ACCESS = 8
"""More faults than this for one instruction is no progress: a finding (unless something
the fault waits for, an invalidation or an INVALID slot, is still open)."""


class Outcome(enum.Enum):
    DONE = "done"
    MMIO = "mmio"
    EFAULT = "efault"
    """KVM_RUN fails with EFAULT (the host cannot provide the page)."""
    ENOSPC = "enospc"
    """KVM_RUN fails with ENOSPC: the VM is at its shadow-page limit and every page it holds
    is a root in use (mmu_pages.py)."""
    SHUTDOWN = "shutdown"
    """The guest's walk failed: its #PF has no handler (FINDINGS 5.1)."""
    RETRY = "retry"
    """Still faulting while an invalidation or a memslot update is open."""
    EMULATION_FAILED = "emulation_failed"
    """KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_EMULATION): the instruction had to be
    emulated, the emulator failed, and retrying it could not help."""
    DIRTY_RING_FULL = "dirty_ring_full"


@dataclass(frozen=True, slots=True)
class ShadowAccess:
    outcome: Outcome
    data: bytes = b""
    mmio: MmioExit | None = None
    exception: X86Exception | None = None


def hardware_translate(
    mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, gva: int, write: bool
) -> TlbEntry | int:
    """The CPU translating ``gva`` for a user-mode access (the guest runs at CPL3): the
    TLB, else a walk of the shadow tables that fills the TLB. Returns the entry, or the
    page-fault error code.
    """
    error_code = PFERR_USER_MASK | (PFERR_WRITE_MASK if write else 0)
    vpn = gva >> PAGE_SHIFT
    entry = vcpu_mmu.tlb.get(vpn)
    if entry is not None and (entry.writable or not write):
        return entry
    vcpu_mmu.tlb.pop(vpn, None)  # a faulting translation is not kept
    sp = vcpu_mmu.root.sp
    if sp is None:
        return error_code
    rights = PT_WRITABLE_MASK | PT_USER_MASK
    # Under PVM the top level may come from the vCPU's own copy (pvm_top_level.py).
    table = sp.spt if vcpu_mmu.top_level is None else vcpu_mmu.top_level
    while True:
        index = pt_index(gva, sp.role.level)
        spte = table.get(index, 0)
        if is_mmio_spte(mmu.masks, spte):
            # Present, with a reserved address bit: a reserved-bit fault.
            return error_code | PFERR_PRESENT_MASK | PFERR_RSVD_MASK
        if not spte & PT_PRESENT_MASK or not is_shadow_present_pte(spte):
            return error_code
        rights &= spte
        if is_last_spte(spte, sp.role.level):
            break
        sp = mmu.sp_by_pfn[spte_to_pfn(spte)]
        table = sp.spt
    if not rights & PT_USER_MASK or (write and not rights & PT_WRITABLE_MASK):
        return error_code | PFERR_PRESENT_MASK
    # The hardware sets A (and D for a store) in the leaf, atomically, outside mmu_lock.
    accessed = spte | mmu.masks.accessed_mask | (mmu.masks.dirty_mask if write else 0)
    sp.set_spte(index, accessed)
    # A huge leaf maps its frame: the page's offset inside it comes from the address.
    offset = vpn & (kvm_pages_per_hpage(sp.role.level) - 1)
    entry = TlbEntry(spte_to_pfn(spte) + offset, bool(rights & PT_WRITABLE_MASK))
    vcpu_mmu.tlb[vpn] = entry
    return entry


def handle_mmio_page_fault(kvm: Kvm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, addr: int) -> RetPf:
    """A reserved-bit fault at ``addr``: look at the SPTE the hardware stopped at. An MMIO
    SPTE of the current generation, with no memslot update in progress, means emulate (the
    translation is cached for the emulator). A stale one goes down the normal fault path
    (INVALID), which overwrites it (X11). Anything else was zapped meanwhile: retry.

    kernel: arch/x86/kvm/mmu/mmu.c:handle_mmio_page_fault (v6.18)
    """
    root = vcpu_mmu.root.sp
    if root is None:
        return RetPf.RETRY
    spte = get_mmio_spte(mmu, root, addr)
    if not is_mmio_spte(mmu.masks, spte):
        return RetPf.RETRY
    if not check_mmio_spte(kvm.memslots(0).generation, spte):
        return RetPf.INVALID
    gfn = get_mmio_spte_gfn(mmu.masks, spte)
    access = get_mmio_spte_access(mmu.masks, spte)
    vcpu_cache_mmio_info(kvm, mmu, vcpu_mmu.vcpu_id, addr, gfn, access)
    return RetPf.EMULATE


def kvm_mmu_page_fault(
    kvm: Kvm,
    host: HostMm,
    mmu: ShadowMmuState,
    vcpu_mmu: VcpuMmu,
    vcpu: KvmVcpu,
    addr: int,
    error_code: int,
) -> KernelOp[PageFaultResult]:
    """KVM's page-fault exit: a reserved-bit fault tries the MMIO path first; what it does
    not settle goes to the shadow fault (FNAME(page_fault)).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_fault (v6.18)
    """
    if error_code & PFERR_RSVD_MASK:
        ret = handle_mmio_page_fault(kvm, mmu, vcpu_mmu, addr)
        if ret is not RetPf.INVALID:
            return PageFaultResult(ret)
    mmu.stat["pf_taken"] += 1
    return (yield from fname_page_fault(kvm, host, mmu, vcpu_mmu, vcpu, addr, error_code))


Part = tuple[int, int, int]
"""One page's share of an access: (gva, offset into the access, length)."""


def _page_parts(gva: int, size: int) -> list[Part]:
    first = min(size, PAGE_SIZE - gva % PAGE_SIZE)
    parts = [(gva, 0, first)]
    if first < size:
        parts.append((gva + first, first, size - first))
    return parts


def kvm_mmu_write_protect_fault(vcpu_mmu: VcpuMmu, rip: int, addr: int) -> bool:
    """A store hit a write-protected page: may a failed emulation unprotect and retry? Not
    when this very instruction was retried at this very address already; otherwise the
    guard is reset (the model's guest never runs nested, which also forbids retrying).

    kernel: arch/x86/kvm/mmu/mmu.c:kvm_mmu_write_protect_fault (v6.18)
    """
    if vcpu_mmu.last_retry_eip == rip and vcpu_mmu.last_retry_addr == addr:
        return False
    vcpu_mmu.last_retry_eip = 0
    vcpu_mmu.last_retry_addr = 0
    return True


def kvm_mmu_unprotect_gfn_and_retry(
    kvm: Kvm, host: HostMm, mmu: ShadowMmuState, vcpu_mmu: VcpuMmu, rip: int, addr: int
) -> None:
    """The emulator failed on a store at guest virtual ``addr``: stop shadowing the page it
    writes (translated through the guest's tables) and remember the instruction and
    address, so that the same fault is not retried twice. The kernel retries even when
    nothing was unprotected: another vCPU may have done it.

    kernel: arch/x86/kvm/mmu/mmu.c:__kvm_mmu_unprotect_gfn_and_retry;
    arch/x86/kvm/x86.c:kvm_unprotect_and_retry_on_failure (v6.18)
    """
    if mmu.indirect_shadow_pages:
        walk = run_to_completion(
            walk_addr_generic(
                KvmGuestMemory(kvm, host), vcpu_mmu.mode, vcpu_mmu.cr3, addr, PFERR_WRITE_MASK
            )
        )
        if not isinstance(walk, X86Exception):
            kvm_mmu_unprotect_gfn(kvm, mmu, walk.gfn)
    vcpu_mmu.last_retry_eip = rip
    vcpu_mmu.last_retry_addr = addr


def guest_instruction(
    kvm: Kvm,
    host: HostMm,
    vcpu_id: int,
    gva: int,
    data: bytes | None,
    size: int = 1,
    *,
    rip: int = 0,
    fetch: bool = False,
    emulatable: bool = True,
) -> ShadowAccess:
    """One guest instruction at ``rip`` that loads ``size`` bytes at ``gva`` (``data``
    None) or stores ``data`` there (up to 8 bytes, possibly across a page boundary). Every
    page is translated before any byte moves; each fault is handled and the guest entered
    again. ``fetch`` makes the CPU fetch the instruction first, translating ``rip``'s page
    through the same shadow tables: a fault there maps the code page (and prefetches its
    neighbours) like any read. ``emulatable`` False is an instruction KVM's emulator fails
    on: a fault that needs emulation then unprotects and retries once (stores to
    write-protected pages) or ends in EMULATION_FAILED.

    kernel: arch/x86/kvm/x86.c:vcpu_enter_guest, x86_emulate_instruction;
    arch/x86/kvm/mmu/mmu.c:kvm_mmu_page_fault (v6.18)
    """
    mmu = shadow_of(kvm)
    vcpu = kvm.vcpus[vcpu_id]
    vcpu_mmu = mmu.vcpu_mmu(vcpu_id)
    write = data is not None
    parts = _page_parts(gva, len(data) if data is not None else size)
    for _ in range(MAX_FAULTS_PER_ACCESS):
        if vcpu.dirty_ring is not None and vcpu.dirty_ring.soft_full():
            return ShadowAccess(Outcome.DIRTY_RING_FULL)
        entered = vcpu_enter_guest(kvm, host, mmu, vcpu_mmu, KvmGuestMemory(kvm, host))
        if entered < 0:
            # The only way the entry fails: no shadow page was left for the root.
            assert entered == -ENOSPC, entered
            return ShadowAccess(Outcome.ENOSPC)
        if not entered:
            continue  # a request came in on the way: serve it first
        entries: list[TlbEntry] = []
        fault: tuple[int, int] | None = None
        if fetch:
            # Modelled as the read it is to the shadow MMU: the guest's code is executable,
            # and the SPTE a fetch fault makes for it is the one a read fault makes.
            code = hardware_translate(mmu, vcpu_mmu, rip, False)
            if isinstance(code, int):
                fault = (rip, code)
        # The data's pages, once the instruction is in hand.
        for part_gva, _start, _length in parts if fault is None else []:
            found = hardware_translate(mmu, vcpu_mmu, part_gva, write)
            if isinstance(found, int):
                fault = (part_gva, found)
                break
            entries.append(found)
        if fault is None:
            return _transfer(host, parts, entries, data)
        op = kvm_mmu_page_fault(kvm, host, mmu, vcpu_mmu, vcpu, fault[0], fault[1])
        result = run_to_completion(op)
        # Under PVM the fault also copies its top-level entry (pvm_top_level.py).
        pvm_sync_faulting_entry(vcpu_mmu, fault[0])
        if result.exception is not None:
            return ShadowAccess(Outcome.SHUTDOWN, exception=result.exception)
        if result.ret is RetPf.EFAULT:
            return ShadowAccess(Outcome.EFAULT)
        if result.ret is RetPf.ENOSPC:
            return ShadowAccess(Outcome.ENOSPC)
        if result.ret in (RetPf.EMULATE, RetPf.WRITE_PROTECTED):
            mmu.stat["pf_emulate"] += 1
            allow_retry = result.ret is RetPf.WRITE_PROTECTED and kvm_mmu_write_protect_fault(
                vcpu_mmu, rip, fault[0]
            )
            if emulatable:
                return _emulate(kvm, host, mmu, vcpu_mmu, vcpu, parts, data)
            if not allow_retry:
                return ShadowAccess(Outcome.EMULATION_FAILED)
            kvm_mmu_unprotect_gfn_and_retry(kvm, host, mmu, vcpu_mmu, rip, fault[0])
    for part_gva, _start, _length in parts:
        walk = run_to_completion(
            walk_addr_generic(KvmGuestMemory(kvm, host), vcpu_mmu.mode, vcpu_mmu.cr3, part_gva, 0)
        )
        slot = None if isinstance(walk, X86Exception) else kvm.memslots(0).gfn_to_memslot(walk.gfn)
        if kvm.mmu_invalidate_in_progress or (slot is not None and slot.invalid):
            return ShadowAccess(Outcome.RETRY)
    raise AssertionError(f"guest access to {gva:#x} made no progress")


def guest_invlpg(kvm: Kvm, host: HostMm, vcpu_id: int, gva: int) -> None:
    """The guest flushes ``gva`` from its TLB with INVLPG, which KVM intercepts with shadow
    paging: the vCPU's TLB entry goes, and the page's SPTE in an unsync table is synced with
    the guest PTE (unsync.py).

    kernel: arch/x86/kvm/vmx/vmx.c:handle_invlpg; arch/x86/kvm/mmu/mmu.c:kvm_mmu_invlpg
    (v6.18)
    """
    mmu = shadow_of(kvm)
    kvm_mmu_invlpg(kvm, mmu, KvmGuestMemory(kvm, host), mmu.vcpu_mmu(vcpu_id), gva)


def _transfer(
    host: HostMm, parts: list[Part], entries: list[TlbEntry], data: bytes | None
) -> ShadowAccess:
    """Every page is translated: the bytes move through the translations' pfns."""
    loaded = b""
    for (part_gva, start, length), entry in zip(parts, entries, strict=True):
        offset = part_gva % PAGE_SIZE
        if data is not None:
            host.memory.write(entry.pfn, offset, data[start : start + length])
        else:
            loaded += host.memory.read(entry.pfn, offset, length)
    return ShadowAccess(Outcome.DONE, loaded)


def _emulate(
    kvm: Kvm,
    host: HostMm,
    mmu: ShadowMmuState,
    vcpu_mmu: VcpuMmu,
    vcpu: KvmVcpu,
    parts: list[Part],
    data: bytes | None,
) -> ShadowAccess:
    """x86_emulate_instruction for a load or store: translate each page through the
    guest's tables, then move the bytes with KVM's own guest-memory copy; a store tells
    the shadow MMU which guest PTE it may have changed. A page that copy cannot reach
    (no slot, a READONLY slot for a store, a host address that faults) is an MMIO
    fragment for the VMM; the fragments form one exit.

    kernel: arch/x86/kvm/x86.c:emulator_read_write_onepage, emulator_write_phys;
    arch/x86/kvm/mmu/page_track.c:kvm_page_track_write (v6.18)
    """
    access = PFERR_USER_MASK | (PFERR_WRITE_MASK if data is not None else 0)
    mem = KvmGuestMemory(kvm, host)
    physical: list[Part] = []
    cached: list[Part] = []  # pages the vCPU's MMIO cache sends to the VMM untranslated
    for part_gva, start, length in parts:
        info = vcpu_match_mmio_gva(kvm, mmu, vcpu_mmu.vcpu_id, part_gva)
        if info is not None and mmio_access_allowed(info, data is not None):
            cached.append((info.gfn << PAGE_SHIFT | part_gva % PAGE_SIZE, start, length))
            continue
        walk = run_to_completion(
            walk_addr_generic(mem, vcpu_mmu.mode, vcpu_mmu.cr3, part_gva, access)
        )
        if isinstance(walk, X86Exception):
            return ShadowAccess(Outcome.SHUTDOWN, exception=walk)
        physical.append((walk.gpa, start, length))

    def written(gpa: int, length: int) -> None:
        kvm_mmu_track_write(kvm, mmu, gpa, length)

    loaded, mmio = emulator_read_write(kvm, host, vcpu, physical, data, written)
    if cached:
        # The fragments of one access form one exit, in the access's order.
        fragments = list(cached)
        if mmio is not None:
            start = next(start for gpa, start, _length in physical if gpa == mmio.gpa)
            fragments.append((mmio.gpa, start, mmio.length))
        fragments.sort(key=lambda part: part[1])
        gpa, first, _length = fragments[0]
        length = sum(part[2] for part in fragments)
        mmio = MmioExit(gpa, length, data[first : first + length] if data is not None else None)
    if mmio is None:
        return ShadowAccess(Outcome.DONE, loaded)
    return ShadowAccess(Outcome.MMIO, b"", mmio)
