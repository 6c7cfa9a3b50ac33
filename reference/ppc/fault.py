"""The HPT guest's faults: the real-mode handler, the virtual-mode page fault, and MMIO.

An HPT guest's access traps to the hypervisor in two ways: no hardware-valid entry
translates the address (a "no HPTE" fault), or the one that does refuses the access (a
protection fault). Either may be the guest's own business (it never entered a translation,
or entered a read-only one), or KVM's: the entry is ABSENT because the host took the page
away (a notifier, a slot flush, an HPT resize) or because it is emulated MMIO (absent, with
storage key 31), or it is read-only in hardware because the host page was (P9).

KVM sorts that out in two steps:

* :func:`kvmppc_hpte_hv_fault`, in real mode with interrupts off: find the guest's entry
  for the address with the hash search (ABSENT entries count), check the guest's own
  permissions against the guest's view of the entry, and either reflect the interrupt to
  the guest (its fault), retry (the entry became valid meanwhile), or pass the fault up to
  virtual mode, remembering what it read. An MMIO entry is cached per vCPU, stamped with
  ``mmio_update``: the next access to it skips the hash search, for as long as the stamp is
  current (P7).
* :func:`kvmppc_book3s_hv_page_fault`, in virtual mode: the address is emulated MMIO if no
  usable memslot holds it (none, or INVALID: no new reference to a slot being deleted or
  moved, seed 000); otherwise resolve the host page (which may sleep), and install it with
  the entry's lock and the rmap lock held, *only* if no invalidation ran since the sequence
  snapshot (P5) and the entry still holds what real mode read. It is writable only if the
  host page is (P9). Anything that changed means "retry the instruction".

:func:`kvmppc_hpt_guest_access` plays the processor and the exit handler around them: the
hardware table walk, the trap, the two handlers, and re-execution.

Storage keys (the AMR) and problem state are simplified: the guest runs privileged with
Ks = 0 and Kp = 1, and its AMR allows every key.

kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hpte_hv_fault, mmio_cache_search,
next_mmio_cache_entry; arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_book3s_hv_page_fault,
kvmppc_hv_emulate_mmio; arch/powerpc/kvm/book3s_hv.c:kvmppc_handle_exit_hv;
arch/powerpc/include/asm/kvm_book3s_64.h:hpte_read_permission, hpte_write_permission (v6.18)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from errno import EFAULT
from typing import TYPE_CHECKING

from kvmspec.reference.concurrency import KernelOp, Preempt, WaitUntil
from kvmspec.reference.gfn_to_hva import __gfn_to_hva_memslot
from kvmspec.reference.host import LEVEL_PMD, get_page, put_page
from kvmspec.reference.mmu_notifier import mmu_invalidate_retry
from kvmspec.reference.ppc.hpt import (
    HPTES_PER_GROUP,
    KVMPPC_RMAP_RC_SHIFT,
    KvmHptInfo,
    Segment,
    hpt_hash,
    hpte_encode_v,
    hpte_write_r,
    hpte_write_v,
    kvmppc_add_revmap_chain,
    kvmppc_hv_find_lock_hpte,
    lock_hpte,
    lock_rmap,
    slot_rmap,
    unlock_hpte,
    unlock_rmap,
)
from kvmspec.reference.ppc.hpt_mmu import kvm_hpt
from kvmspec.reference.ppc.hpte import (
    HPTE_R_C,
    HPTE_R_G,
    HPTE_R_I,
    HPTE_R_KEY_HI,
    HPTE_R_M,
    HPTE_R_N,
    HPTE_R_PP,
    HPTE_R_PP0,
    HPTE_R_R,
    HPTE_R_RPN,
    HPTE_R_W,
    HPTE_V_1TB_SEG,
    HPTE_V_ABSENT,
    HPTE_V_AVPN,
    HPTE_V_HVLOCK,
    HPTE_V_LARGE,
    HPTE_V_SECONDARY,
    HPTE_V_VALID,
    KEY_MMIO,
    PP_RWRW,
    PP_RWRX,
    PP_RXRX,
    hpte_cache_flags_ok,
    hpte_is_writable,
    hpte_make_readonly,
    kvmppc_actual_pgsz,
    kvmppc_hpte_base_page_shift,
)
from kvmspec.reference.ppc.rmap_walk import kvmppc_invalidate_hpte
from kvmspec.reference.ppc.tlb import hardware_access

if TYPE_CHECKING:
    from kvmspec.reference.host import HostMm
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.memslot import KvmMemorySlot

# DSISR bits of a data storage interrupt (SRR1 bits of an instruction one, same positions).
DSISR_NOHPTE = 0x4000_0000
"""No translation was found (SRR1_ISI_NOPT for instruction fetches)."""
DSISR_PROTFAULT = 0x0800_0000
"""The translation refused the access (SRR1_ISI_PROT)."""
DSISR_ISSTORE = 0x0200_0000
SRR1_ISI_N_G_OR_CIP = 0x1000_0000
"""An instruction fetch from a no-execute or guarded page."""

RESUME_GUEST = 0
"""Re-enter the guest: it re-executes the instruction."""
RESUME_HOST = 2
"""Exit to userspace (here: KVM_EXIT_MMIO for an emulated access)."""

MMIO_HPTE_CACHE_SIZE = 4
MAX_FAULTS_PER_ACCESS = 8
"""An access needing more faults than this makes no progress: the model asserts."""


def hpte_read_permission(pp: int, key: int) -> bool:
    """May the guest read through protection ``pp`` with segment key ``key``?

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_read_permission (v6.18)
    """
    if key:
        return PP_RWRX <= pp <= PP_RXRX
    return True


def hpte_write_permission(pp: int, key: int) -> bool:
    """May the guest write through protection ``pp`` with segment key ``key``?

    kernel: arch/powerpc/include/asm/kvm_book3s_64.h:hpte_write_permission (v6.18)
    """
    if key:
        return pp == PP_RWRW
    return pp <= PP_RWRW


# -- per-vCPU state ----------------------------------------------------------------------------


@dataclass(slots=True)
class MmioHpteCacheEntry:
    """struct mmio_hpte_cache_entry: an MMIO entry real mode found, for the address's page
    and segment, valid while ``mmio_update`` is the VM's current one. A never-used entry
    has no segment, so it matches nothing."""

    hpte_v: int = 0
    hpte_r: int = 0
    rpte: int = 0
    pte_index: int = 0
    eaddr: int = 0
    segment: Segment | None = None
    slb_base_pshift: int = 12
    mmio_update: int = 0


@dataclass(slots=True)
class HptVcpuArch:
    """The fault-related part of ``vcpu->arch`` for an HPT guest: what real mode found for
    virtual mode (``pgfault_*``), the MMIO cache (a ring of four), and the last MMIO exit
    (gpa, is_store) for userspace."""

    vcpu_id: int
    mmio_cache: list[MmioHpteCacheEntry] = field(
        default_factory=lambda: [MmioHpteCacheEntry() for _ in range(MMIO_HPTE_CACHE_SIZE)]
    )
    mmio_cache_index: int = 0
    pgfault_addr: int = -1
    pgfault_index: int = -1
    pgfault_hpte: tuple[int, int] = (0, 0)
    pgfault_cache: MmioHpteCacheEntry | None = None
    mmio_exit: tuple[int, bool] | None = None


def kvmppc_hv_vcpu(kvm: Kvm, vcpu_id: int) -> HptVcpuArch:
    """The HPT fault state of vCPU ``vcpu_id`` (created zeroed on first use, as the kernel
    allocates the vCPU zeroed)."""
    vcpus = kvm_hpt(kvm).vcpu_arch
    if vcpu_id not in vcpus:
        vcpus[vcpu_id] = HptVcpuArch(vcpu_id)
    return vcpus[vcpu_id]


def mmio_cache_search(
    vcpu: HptVcpuArch, eaddr: int, segment: Segment, mmio_update: int
) -> MmioHpteCacheEntry | None:
    """The cached MMIO entry for ``eaddr``'s page in ``segment``, stamped ``mmio_update``.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:mmio_cache_search (v6.18)
    """
    for entry in vcpu.mmio_cache:
        if entry.mmio_update != mmio_update:
            continue
        pshift = entry.slb_base_pshift
        if entry.eaddr >> pshift == eaddr >> pshift and entry.segment == segment:
            return entry
    return None


def next_mmio_cache_entry(vcpu: HptVcpuArch) -> MmioHpteCacheEntry:
    """The cache slot to overwrite next (round robin).

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:next_mmio_cache_entry (v6.18)
    """
    entry = vcpu.mmio_cache[vcpu.mmio_cache_index]
    vcpu.mmio_cache_index = (vcpu.mmio_cache_index + 1) % MMIO_HPTE_CACHE_SIZE
    return entry


# -- real mode --------------------------------------------------------------------------------


def kvmppc_hpte_hv_fault(
    kvm: Kvm, vcpu: HptVcpuArch, addr: int, segment: Segment, status: int, data: bool
) -> int:
    """The real-mode handler of a storage interrupt at ``addr``: the DSISR (SRR1) to reflect
    to the guest when the fault is the guest's own, 0 to retry the instruction, -1 to pass
    the fault to virtual mode, -2 to do that for emulated MMIO (load the instruction).

    A no-HPTE fault searches VALID and ABSENT entries (after trying the MMIO cache); a
    protection fault only VALID ones (none left: the entry went away, retry). The guest's
    permissions are judged on the guest's view of the entry (``guest_rpte``), not on the
    hardware's, which KVM may have made read-only or absent.

    kernel: arch/powerpc/kvm/book3s_hv_rm_mmu.c:kvmppc_hpte_hv_fault (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpt = mmu.hpt
    valid = HPTE_V_VALID
    cache_entry = None
    mmio_update = 0
    if status & DSISR_NOHPTE:
        valid |= HPTE_V_ABSENT
        mmio_update = mmu.mmio_update
        cache_entry = mmio_cache_search(vcpu, addr, segment, mmio_update)
    if cache_entry is not None:
        index, v, r, gr = (
            cache_entry.pte_index,
            cache_entry.hpte_v,
            cache_entry.hpte_r,
            cache_entry.rpte,
        )
    else:
        index = kvmppc_hv_find_lock_hpte(kvm, hpt, segment, addr, valid)
        if index < 0:
            # No entry: really the guest's no-HPTE fault; or a protection fault whose entry
            # went away meanwhile, so the retry will see what is there now.
            return status if status & DSISR_NOHPTE else 0
        v = hpt.v(index) & ~HPTE_V_HVLOCK
        r = hpt.r(index)
        gr = hpt.rev_entry(index).guest_rpte
        unlock_hpte(kvm, hpt, index, v)

    if status & DSISR_NOHPTE and v & HPTE_V_VALID:
        return 0  # made valid by someone else since the trap

    pp = gr & (HPTE_R_PP0 | HPTE_R_PP)
    key = 0  # privileged state, Ks = 0
    status &= ~DSISR_NOHPTE
    if not data:
        if gr & (HPTE_R_N | HPTE_R_G):
            return status | SRR1_ISI_N_G_OR_CIP
        if not hpte_read_permission(pp, key):
            return status | DSISR_PROTFAULT
    elif status & DSISR_ISSTORE:
        if not hpte_write_permission(pp, key):
            return status | DSISR_PROTFAULT
    elif not hpte_read_permission(pp, key):
        return status | DSISR_PROTFAULT

    vcpu.pgfault_addr = addr
    vcpu.pgfault_index = index
    vcpu.pgfault_hpte = (v, r)
    vcpu.pgfault_cache = cache_entry

    if r & KEY_MMIO == KEY_MMIO:
        if cache_entry is None:
            cache_entry = next_mmio_cache_entry(vcpu)
            cache_entry.eaddr = addr
            cache_entry.slb_base_pshift = segment.base_shift
            cache_entry.pte_index = index
            cache_entry.hpte_v = v
            cache_entry.hpte_r = r
            cache_entry.rpte = gr
            cache_entry.segment = segment
            cache_entry.mmio_update = mmio_update
        if data:
            return -2
    return -1


# -- virtual mode -----------------------------------------------------------------------------


def kvmppc_hv_emulate_mmio(vcpu: HptVcpuArch, gpa: int, is_store: bool) -> int:
    """Emulate the access as MMIO: exit to userspace with the address.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_hv_emulate_mmio (v6.18)
    """
    vcpu.mmio_exit = (gpa, is_store)
    return RESUME_HOST


def kvmppc_book3s_hv_page_fault(
    kvm: Kvm, host: HostMm, vcpu: HptVcpuArch, ea: int, dsisr: int
) -> KernelOp[int]:
    """The virtual-mode fault for what real mode found: RESUME_GUEST (mapped, or retry),
    RESUME_HOST (emulated MMIO) or -EFAULT (the host has no usable page).

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_book3s_hv_page_fault (v6.18)
    """
    # The vCPU runs its exits inside an SRCU read section: a memslot update or an HPT
    # resize cannot free what the fault looks at until it is done.
    srcu = kvm.srcu.read_lock()
    try:
        return (yield from _kvmppc_book3s_hv_page_fault(kvm, host, vcpu, ea, dsisr))
    finally:
        kvm.srcu.read_unlock(srcu)


def _kvmppc_book3s_hv_page_fault(
    kvm: Kvm, host: HostMm, vcpu: HptVcpuArch, ea: int, dsisr: int
) -> KernelOp[int]:
    mmu = kvm_hpt(kvm)
    shift = kvm.profile.page_shift
    page_size = 1 << shift
    is_store = bool(dsisr & DSISR_ISSTORE)
    if ea != vcpu.pgfault_addr:
        return RESUME_GUEST
    cache = vcpu.pgfault_cache
    if cache is not None and mmu.mmio_update == cache.mmio_update:
        r = cache.rpte
        psize = kvmppc_actual_pgsz(vcpu.pgfault_hpte[0], r)
        gpa = (r & HPTE_R_RPN & ~(psize - 1)) | (ea & (psize - 1))
        return kvmppc_hv_emulate_mmio(vcpu, gpa, is_store)

    # Re-read the entry under its lock; anything changed since real mode: retry.
    hpt = mmu.hpt  # the table stays allocated while this SRCU reader runs
    index = vcpu.pgfault_index
    rev = hpt.rev_entry(index)
    lock_hpte(hpt, index)
    hpte_v = hpt.v(index) & ~HPTE_V_HVLOCK
    hpte_r = hpt.r(index)
    r = guest_r = rev.guest_rpte
    unlock_hpte(kvm, hpt, index, hpte_v)
    if (hpte_v, hpte_r) != vcpu.pgfault_hpte:
        return RESUME_GUEST

    psize = kvmppc_actual_pgsz(hpte_v, r)
    gpa_base = r & HPTE_R_RPN & ~(psize - 1)
    gfn_base = gpa_base >> shift
    gpa = gpa_base | (ea & (psize - 1))
    gfn = gpa >> shift
    memslot = kvm.memslots(0).gfn_to_memslot(gfn)
    if memslot is None or memslot.invalid:
        # No usable slot: emulated MMIO. An INVALID slot is on its way out; mapping its
        # page now would create a reference the slot flush may already have passed.
        return kvmppc_hv_emulate_mmio(vcpu, gpa, is_store)
    if gfn_base < memslot.base_gfn:
        return -EFAULT  # H_ENTER's alignment check makes this impossible

    mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("HV page fault: sequence snapshot taken, resolving the host page")

    # __kvm_faultin_pfn: a store needs a writable page (breaking copy-on-write); a load
    # takes the page as it is, writable only if the host already maps it so.
    hva = __gfn_to_hva_memslot(memslot, gfn, shift)
    errno, faulted = host.fault_in(hva, is_store)
    if errno or faulted is None:
        return -EFAULT
    write_ok = is_store or faulted.writable
    page = host.pages.get(faulted.pfn)
    if page is not None:
        get_page(page)
    try:
        yield Preempt("HV page fault: host page resolved, reading the host PTE")

        # The address and size come from the host's page table, read now: the page gup
        # returned may already have been unmapped (the sequence check below sees that).
        pte = host.lookup(hva)
        if pte is None:
            return RESUME_GUEST  # gone for a moment (an invalidation): retry
        huge = host.mapping_level(hva) == LEVEL_PMD
        pte_size = host.hpage_size if huge else page_size
        is_ci = host.memory.device_of(pte.pfn) is not None
        if psize > pte_size:
            return -EFAULT
        hpa = pte.pfn << shift  # the host page of hva (a huge page's subpage already)
        if not hpte_cache_flags_ok(r, is_ci):
            if is_ci:
                return -EFAULT
            # Emulated devices may be mapped cache-inhibited; make them cacheable.
            r = (r & ~(HPTE_R_W | HPTE_R_I | HPTE_R_G)) | HPTE_R_M
        # The host address replaces the guest's; the guest's bits below the page stay.
        mask_size = max(psize, page_size)
        r = (r & HPTE_R_KEY_HI) | (r & ~(HPTE_R_PP0 - mask_size)) | (hpa & ~(mask_size - 1))
        if hpte_is_writable(r) and not write_ok:
            r = hpte_make_readonly(r)  # P9
        yield Preempt("HV page fault: host PTE read, taking the HPTE lock")
        return _install(kvm, hpt, index, (hpte_v, hpte_r, guest_r), r, memslot, gfn_base, mmu_seq)
    finally:
        if page is not None:
            put_page(host, page)


def _install(
    kvm: Kvm,
    hpt: KvmHptInfo,
    index: int,
    read: tuple[int, int, int],
    r: int,
    memslot: KvmMemorySlot,
    gfn_base: int,
    mmu_seq: int,
) -> int:
    """The end of the virtual-mode fault, under the entry's lock: make the entry VALID with
    "r", unless the HPT is being resized, the entry changed since it was ``read``, or an
    invalidation ran since ``mmu_seq`` (P5, under the rmap lock). RESUME_GUEST either way.

    kernel: arch/powerpc/kvm/book3s_64_mmu_hv.c:kvmppc_book3s_hv_page_fault (v6.18)
    """
    mmu = kvm_hpt(kvm)
    hpte_v, hpte_r, guest_r = read
    lock_hpte(hpt, index)
    if (
        not mmu.mmu_ready
        or hpt.v(index) & ~HPTE_V_HVLOCK != hpte_v
        or hpt.r(index) != hpte_r
        or hpt.rev_entry(index).guest_rpte != guest_r
    ):
        # A resize is running (its commit stopped the vCPUs), or the entry changed.
        unlock_hpte(kvm, hpt, index, hpt.v(index))
        return RESUME_GUEST
    new_v = (hpte_v & ~HPTE_V_ABSENT) | HPTE_V_VALID
    rmap = slot_rmap(memslot)
    offset = gfn_base - memslot.base_gfn
    lock_rmap(rmap, offset)
    if mmu_invalidate_retry(kvm, mmu_seq):
        unlock_rmap(rmap, offset)
        unlock_hpte(kvm, hpt, index, hpt.v(index))
        return RESUME_GUEST
    # The hardware starts with R/C only where the rmap has them already.
    r &= (rmap.get(offset) >> KVMPPC_RMAP_RC_SHIFT) | ~(HPTE_R_R | HPTE_R_C)
    if hpt.v(index) & HPTE_V_VALID:
        # Valid already (a protection upgrade): on its chain; invalidate before rewriting,
        # keeping the R and C the hardware set.
        unlock_rmap(rmap, offset)
        hpte_write_v(kvm, hpt, index, hpt.v(index) | HPTE_V_ABSENT)
        kvmppc_invalidate_hpte(kvm, hpt, mmu.tlbs, index)
        r |= hpt.r(index) & (HPTE_R_R | HPTE_R_C)
    else:
        kvmppc_add_revmap_chain(kvm, hpt, rmap, offset, index)
    hpte_write_r(kvm, hpt, index, r)
    unlock_hpte(kvm, hpt, index, new_v)
    return RESUME_GUEST


# -- the processor and the exit handler ------------------------------------------------------


class Access(enum.Enum):
    DONE = "done"
    GUEST_INTERRUPT = "guest_interrupt"
    MMIO = "mmio"
    EFAULT = "efault"


@dataclass(frozen=True, slots=True)
class HptAccess:
    """How a guest access ended: DONE through HPT entry ``index``; GUEST_INTERRUPT with
    the DSISR the guest receives; MMIO with the exit's ``gpa``; EFAULT (KVM_RUN fails)."""

    outcome: Access
    index: int = -1
    dsisr: int = 0
    gpa: int = -1


def hardware_find_hpte(hpt: KvmHptInfo, segment: Segment, ea: int) -> int:
    """The processor's table walk: the first hardware-valid entry for ``ea`` in its
    primary group, then its secondary one, or -1. Software bits (HVLOCK, ABSENT) mean
    nothing to it; only V does."""
    compare = HPTE_V_1TB_SEG | HPTE_V_AVPN | HPTE_V_SECONDARY | HPTE_V_LARGE
    want = hpte_encode_v(segment, ea)
    group = hpt_hash(hpt, segment, ea)
    for secondary in (False, True):
        if secondary:
            want |= HPTE_V_SECONDARY
            group ^= hpt.mask
        for index in range(group * HPTES_PER_GROUP, (group + 1) * HPTES_PER_GROUP):
            v = hpt.v(index)
            if (
                v & HPTE_V_VALID
                and v & compare == want
                and kvmppc_hpte_base_page_shift(v, hpt.r(index)) == segment.base_shift
            ):
                return index
    return -1


def kvmppc_hpt_guest_access(
    kvm: Kvm, host: HostMm, vcpu_id: int, segment: Segment, ea: int, write: bool
) -> KernelOp[HptAccess]:
    """One guest data access at effective address ``ea`` in ``segment``, re-executed after
    every fault KVM resolves, as the vCPU's run loop does.

    The processor translates through a hardware-valid entry (setting R, and C for a store).
    Otherwise it traps: real mode decides; virtual mode maps the page or emulates MMIO; a
    fault for the guest ends the access with the interrupt the guest receives. A vCPU does
    not enter the guest while an HPT resize is being committed (``mmu_ready`` clear).

    kernel: arch/powerpc/kvm/book3s_hv.c:kvmppc_handle_exit_hv, kvmppc_vcpu_run_hv (v6.18)
    """
    vcpu = kvmppc_hv_vcpu(kvm, vcpu_id)
    mmu = kvm_hpt(kvm)
    for _ in range(MAX_FAULTS_PER_ACCESS):
        if not mmu.mmu_ready:
            yield WaitUntil("vCPU entry waits for the HPT resize", lambda: mmu.mmu_ready)
        index = hardware_find_hpte(mmu.hpt, segment, ea)
        if index >= 0 and hardware_access(mmu.hpt, mmu.tlbs, vcpu_id, index, write):
            return HptAccess(Access.DONE, index=index)
        status = DSISR_ISSTORE if write else 0
        status |= DSISR_NOHPTE if index < 0 else DSISR_PROTFAULT
        ret = kvmppc_hpte_hv_fault(kvm, vcpu, ea, segment, status, data=True)
        if ret == 0:
            continue
        if ret > 0:
            return HptAccess(Access.GUEST_INTERRUPT, dsisr=ret)
        yield Preempt("HV fault: real mode passed the fault up to virtual mode")
        result = yield from kvmppc_book3s_hv_page_fault(kvm, host, vcpu, ea, status)
        if result == RESUME_HOST:
            assert vcpu.mmio_exit is not None
            return HptAccess(Access.MMIO, gpa=vcpu.mmio_exit[0])
        if result < 0:
            return HptAccess(Access.EFAULT)
    raise AssertionError(f"guest access at {ea:#x}: no progress in {MAX_FAULTS_PER_ACCESS} faults")
