"""KVM's private pages in the VMM's memory: the APIC-access page and the EPT identity map.

Some pages KVM needs for itself live at fixed guest-physical addresses in *private*
memslots (ids above every id userspace may use), backed by memory KVM maps into the VMM's
address space with an ordinary mmap (__x86_set_memory_region). Seed 004 is the thread that
stopped KVM from pinning them: a pinned page cannot migrate, which blocks memory hot-remove.
Unpinned, each is a page like any other. When the host moves it, the MMU notifier zaps the
SPTEs that map it and the next access faults the new page in.

The EPT identity-map page needs nothing more: KVM never holds its host address, the guest's
CR3 holds its guest-physical address, and the hardware reaches it through the MMU.

The APIC-access page needs one thing more. The VMCS holds its *host physical* address
(APIC_ACCESS_ADDR): an access that the MMU translates to that address is an APIC access,
not a memory access. So when the page's mapping is invalidated, kvm_unmap_gfn_range asks
every vCPU to reload the address (KVM_REQ_APIC_PAGE_RELOAD), and each does, before its
next entry, by resolving the page again through the slot as a fault would. The reload reads
the notifier sequence first and writes the address only if no invalidation touched the gfn
since; otherwise it asks itself to try again, so no vCPU enters the guest with the address
of a page the host took away.

What the model leaves out: the APIC virtualization itself (a guest access to the page is a
memory access through the shadow MMU here), APICv inhibition (which deletes the slot),
nested guests, and the TSS slot (vmx_set_tss_addr), which follows the identity map's
pattern and has no user in the model (the guests run in long mode).

kernel: arch/x86/kvm/x86.c:__x86_set_memory_region, kvm_vcpu_reload_apic_access_page,
vcpu_enter_guest; arch/x86/kvm/lapic.c:kvm_alloc_apic_access_page;
arch/x86/kvm/vmx/vmx.c:vmx_set_apic_access_page_addr, vmx_vcpu_create, vmx_vcpu_reset,
init_rmode_identity_map; arch/x86/kvm/mmu/mmu.c:kvm_unmap_gfn_range (v6.18)
"""

from __future__ import annotations

from errno import EEXIST
from typing import TYPE_CHECKING

from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import KernelOp, Preempt, run_to_completion
from kvmspec.reference.gfn_to_hva import gfn_to_hva_many, kvm_is_error_hva
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm, get_page, put_page
from kvmspec.reference.host_pages import MemFile
from kvmspec.reference.mmu_notifier import mmu_invalidate_retry_gfn
from kvmspec.spec.uapi.constants import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from kvmspec.reference.kvm import Kvm
    from kvmspec.reference.x86.shadow_mmu import ShadowMmu
    from kvmspec.reference.x86.tlb import VcpuMmu

APIC_DEFAULT_PHYS_BASE = 0xFEE00000
"""Where the local APIC sits in guest-physical memory, and so the APIC-access page."""
VMX_EPT_IDENTITY_PAGETABLE_ADDR = 0xFFFBC000
"""The default guest-physical address of the EPT identity map (KVM_SET_IDENTITY_MAP_ADDR
moves it)."""

KVM_REQ_APIC_PAGE_RELOAD = "apic_page_reload"
"""Load the APIC-access page's current host address into the VMCS before entering."""

_IDENTITY_PDE_FLAGS = 0x1 | 0x2 | 0x4 | 0x20 | 0x40 | 0x80
"""_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_PSE."""


def private_memslot_id(kvm: Kvm, name: str) -> int:
    """The id of the x86 private slot the kernel calls ``name`` (APIC_ACCESS_PAGE_PRIVATE_MEMSLOT
    and friends: KVM_USER_MEM_SLOTS plus 0, 1 or 2, as the profile lists them)."""
    return dict(kvm.profile.internal_slots)[name]


def apic_access_page_slot(kvm: Kvm) -> int:
    """APIC_ACCESS_PAGE_PRIVATE_MEMSLOT."""
    return private_memslot_id(kvm, "APIC_ACCESS_PAGE_PRIVATE_MEMSLOT")


def __x86_set_memory_region(
    kvm: Kvm, host: HostMm, slot_id: int, gpa: int, size: int
) -> tuple[int, int]:
    """Create private slot ``slot_id`` in every address space: (errno, hva). The slot gets
    fresh memory mapped into the VMM, MAP_SHARED | MAP_ANONYMOUS (a shmem file nobody else
    opens, so a fork's copy-on-write never gives the VMM a different page than KVM's).
    Nothing is faulted in and nothing pinned: the pages come on first use and may move.
    Creating a slot that exists is EEXIST. (The kernel also deletes the slots this way when
    the VM is destroyed, which the model does not do.)

    kernel: arch/x86/kvm/x86.c:__x86_set_memory_region (v6.18)
    """
    slot = kvm.memslots(0).id_to_memslot(slot_id)
    if slot is not None and slot.npages:
        return EEXIST, 0
    shmem = MemFile(f"kvm private slot {slot_id}", size)
    errno, hva = host.mmap(size, PROT_READ | PROT_WRITE, backing=shmem)
    if errno:
        return errno, 0
    for as_id in range(kvm.profile.nr_address_spaces):
        errno = run_to_completion(
            kvm_main.kvm_set_internal_memslot(kvm, slot_id | as_id << 16, gpa, size, hva)
        )
        if errno:
            return errno, 0
    return 0, hva


def kvm_alloc_apic_access_page(kvm: Kvm, host: HostMm, mmu: ShadowMmu) -> int:
    """Create the APIC-access page's private slot, one page at APIC_DEFAULT_PHYS_BASE, once
    per VM (the first vCPU does it). The page is neither faulted in nor pinned here: the
    first access or address load brings it, and the host may migrate it like any page (seed
    004; the code of the thread's time took a reference that kept it in place).

    kernel: arch/x86/kvm/lapic.c:kvm_alloc_apic_access_page (v6.18)
    """
    if mmu.apic_access_memslot_enabled:
        return 0
    errno, _hva = __x86_set_memory_region(
        kvm, host, apic_access_page_slot(kvm), APIC_DEFAULT_PHYS_BASE, PAGE_SIZE
    )
    if errno:
        return errno
    mmu.apic_access_memslot_enabled = True
    return 0


def vmx_vcpu_create(kvm: Kvm, host: HostMm, mmu: ShadowMmu, vcpu_id: int) -> int:
    """What creating and resetting a VMX vCPU does about the APIC-access page: make sure the
    VM has one, then ask the vCPU to load its address before it first enters the guest.
    Call it after KVM_CREATE_VCPU succeeded for ``vcpu_id``.

    kernel: arch/x86/kvm/vmx/vmx.c:vmx_vcpu_create, vmx_vcpu_reset (v6.18)
    """
    errno = kvm_alloc_apic_access_page(kvm, host, mmu)
    if errno:
        return errno
    mmu.vcpu_mmu(vcpu_id).requests.add(KVM_REQ_APIC_PAGE_RELOAD)
    return 0


def vmx_set_apic_access_page_addr(kvm: Kvm, host: HostMm, vcpu_mmu: VcpuMmu) -> KernelOp[None]:
    """Load the APIC-access page's host physical address into the vCPU's VMCS.

    The page is found through the private slot, as a fault finds a page: read the notifier
    sequence, resolve the host page for writing (faulting it in if needed), then under
    mmu_lock write the address only if no invalidation touched the gfn meanwhile; if one
    did, the page just found may already be gone, so the vCPU asks itself to reload again
    (it will not enter the guest before that). The reference taken to resolve the page is
    dropped at once: nothing keeps the page in place. No slot (or one being deleted): nothing
    to load. A failed resolution leaves the address as it was.

    kernel: arch/x86/kvm/vmx/vmx.c:vmx_set_apic_access_page_addr (v6.18)
    """
    gfn = APIC_DEFAULT_PHYS_BASE >> PAGE_SHIFT
    slot = kvm.memslots(0).id_to_memslot(apic_access_page_slot(kvm))
    if slot is None or slot.invalid:
        return
    mmu_seq = kvm.mmu_invalidate_seq
    yield Preempt("APIC-access reload: sequence snapshot taken")
    hva, _ = gfn_to_hva_many(slot, gfn, True, PAGE_SHIFT)
    if kvm_is_error_hva(hva):
        return
    errno, host_pte = host.fault_in(hva, write=True)
    if errno or host_pte is None:
        return
    page = host.memory.page(host_pte.pfn)
    assert page is not None, "KVM's own shmem mapping always maps a real page"
    get_page(page)
    yield Preempt("APIC-access reload: page resolved, taking mmu_lock")
    with kvm.mmu_lock.read():
        if mmu_invalidate_retry_gfn(kvm, mmu_seq, gfn):
            vcpu_mmu.requests.add(KVM_REQ_APIC_PAGE_RELOAD)
        else:
            vcpu_mmu.apic_access_addr = host_pte.pfn << PAGE_SHIFT
        # kvm_release_page_clean, still under mmu_lock: not pinned, the notifier tells us
        # when it moves.
        put_page(host, page)


def kvm_vcpu_reload_apic_access_page(kvm: Kvm, host: HostMm, vcpu_mmu: VcpuMmu) -> None:
    """KVM_REQ_APIC_PAGE_RELOAD, served before entering the guest (the local APIC is
    always in the kernel here).

    kernel: arch/x86/kvm/x86.c:kvm_vcpu_reload_apic_access_page (v6.18)
    """
    run_to_completion(vmx_set_apic_access_page_addr(kvm, host, vcpu_mmu))


def init_rmode_identity_map(kvm: Kvm, host: HostMm, mmu: ShadowMmu) -> int:
    """Create the EPT identity map's private slot (one page at
    VMX_EPT_IDENTITY_PAGETABLE_ADDR) and fill it: 1024 32-bit 4 MiB entries mapping the
    first 4 GiB onto itself, the page table a real-mode guest runs on under EPT without
    unrestricted guest. KVM writes it through the VMM's mapping, as the VMM would, and keeps
    neither a reference nor an address of the page: the guest reaches it by guest-physical
    address, so a migrated page is found again by the next fault (seed 004). (The kernel
    builds it only with EPT and without unrestricted guest; the model has it on request.)

    kernel: arch/x86/kvm/vmx/vmx.c:init_rmode_identity_map (v6.18)
    """
    if mmu.ept_identity_pagetable_done:
        return 0
    errno, hva = __x86_set_memory_region(
        kvm,
        host,
        private_memslot_id(kvm, "IDENTITY_PAGETABLE_PRIVATE_MEMSLOT"),
        VMX_EPT_IDENTITY_PAGETABLE_ADDR,
        PAGE_SIZE,
    )
    if errno:
        return errno
    table = b"".join(
        ((i << 22) | _IDENTITY_PDE_FLAGS).to_bytes(4, "little") for i in range(PAGE_SIZE // 4)
    )
    errno = host.host_write(hva, table)
    if errno:
        return errno
    mmu.ept_identity_pagetable_done = True
    return 0
