"""The reference model as a target: each operation runs the model's kernel path to
completion and reports the same observation the real kernel would.

The VM's MMU is the profile's, as far as the model has it (:func:`make_arch`): the x86
shadow MMU (:mod:`kvmspec.reference.x86`) for a profile whose ``mmu`` is ``"shadow"`` (the
default profile, this machine's KVM), else the minimal flat MMU
(:mod:`kvmspec.reference.flat_mmu`). Its MMU notifier is registered with the model's host
address space, so host operations reach KVM the way the VMM's system calls reach the
kernel's. Guest operations take the MMU's own path: on the shadow MMU, a CPL 3 guest with
the linux-kvm guest's page tables (:mod:`kvmspec.fuzz.targets.shadow_guest`); on the flat
MMU, the generic page-fault path with guest virtual == guest physical
(:func:`kvmspec.reference.page_fault.guest_instruction`).
"""

from __future__ import annotations

from errno import EBADF, EFAULT, EINVAL, ENOMEM, ENOSPC

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE, private_slot_id
from kvmspec.fuzz.ops import (
    HOST_OPERATIONS,
    Address,
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostOperation,
    HostRead,
    HostWrite,
    MadviseDontneed,
    Mmap,
    Mprotect,
    Munmap,
    Observation,
    Operation,
    RegionAddr,
    ResetDirtyRings,
    SetNrMmuPages,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.fuzz.targets.shadow_guest import ShadowGuest
from kvmspec.reference.arch import KvmArch
from kvmspec.reference.arch_vm_ioctl import kvm_arch_vm_ioctl_set_nr_mmu_pages
from kvmspec.reference.capabilities import kvm_vm_ioctl_check_extension, kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import (
    kvm_clear_dirty_log_protect,
    kvm_get_dirty_log_protect,
    kvm_vm_ioctl_reset_dirty_pages,
)
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.guest_memfd import GmemFile, kvm_gmem_create
from kvmspec.reference.guest_memory import MmioExit
from kvmspec.reference.host import PROTECTIONS, HostMm, Vma
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.kvm_main import kvm_vm_ioctl_set_memory_region
from kvmspec.reference.mmu_notifier import KvmMmuNotifier
from kvmspec.reference.page_fault import Fault, GuestAccess, guest_instruction
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.reference.x86.guest_access import Outcome, ShadowAccess
from kvmspec.reference.x86.shadow_mmu import ShadowMmu
from kvmspec.reference.x86.spte import spte_masks_for_profile
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import CAPABILITIES, U64_MAX, errno_name
from kvmspec.spec.uapi.memslot_rules import MemoryRegion


def _result(errno: int, **extra: object) -> Observation:
    observation: Observation = {"errno": errno_name(errno)}
    if not errno:
        observation.update(extra)
    return observation


def make_arch(profile: PlatformProfile) -> KvmArch:
    """The MMU of a model VM for ``profile``: the shadow MMU where the profile's KVM uses
    shadow paging, else the flat MMU (the TDP, stage-2 and HPT models run in their own
    harnesses, not behind traces yet)."""
    if profile.mmu == "shadow":
        return ShadowMmu(
            spte_masks_for_profile(profile), pvm_top_level_copy=profile.pvm_top_level_copy
        )
    return FlatMmu()


class ReferenceTarget:
    """One model VM plus the VMM's host address space, driven by operations."""

    name = "reference"

    def __init__(self, profile: PlatformProfile) -> None:
        self.profile = profile
        self.kvm = Kvm(profile, make_arch(profile))
        self.host = HostMm(profile.page_size, profile.user_address_limit)
        self.host.notifier = KvmMmuNotifier(self.kvm)
        self.regions: dict[str, int] = {}
        self.gmems: dict[str, GmemFile] = {}
        self.private_hva = 0  # the memory of the harness's private slot, once created
        self.guest: ShadowGuest | None = None  # on the shadow MMU, once the slot exists

    def close(self) -> None:
        """The model holds no outside resources."""

    def resolve(self, address: Address) -> int:
        """The host address of a ``userspace_addr`` (mod 2^64). A region whose mmap failed
        has no address; it counts from 0, as on every target."""
        if isinstance(address, RegionAddr):
            return (self.regions.get(address.region, 0) + address.offset) & U64_MAX
        return address

    def apply(self, op: Operation) -> Observation:
        kvm = self.kvm
        if isinstance(op, Mmap):
            errno, hva = self.host.mmap(op.size, PROTECTIONS[op.prot])
            if not errno:
                self.regions[op.region] = hva
            return _result(errno)
        if isinstance(op, SetUserMemoryRegion | SetUserMemoryRegion2):
            return _result(self._set_region(op))
        if isinstance(op, CreateGuestMemfd):
            errno, file = kvm_gmem_create(kvm, op.size, op.flags)
            if file is not None:
                self.gmems[op.gmem] = file
            return _result(errno)
        if isinstance(op, GetDirtyLog):
            errno, words = run_to_completion(kvm_get_dirty_log_protect(kvm, op.slot))
            return _result(errno, bitmap=words)
        if isinstance(op, ClearDirtyLog):
            return _result(
                run_to_completion(
                    kvm_clear_dirty_log_protect(
                        kvm, op.slot, op.first_page, op.num_pages, list(op.bitmap)
                    )
                )
            )
        if isinstance(op, EnableCap):
            return _result(kvm_vm_ioctl_enable_cap(kvm, CAPABILITIES[op.cap], op.flags, op.args))
        if isinstance(op, CheckExtension):
            return _result(0, result=kvm_vm_ioctl_check_extension(kvm, CAPABILITIES[op.cap]))
        if isinstance(op, SetNrMmuPages):
            return _result(
                run_to_completion(kvm_arch_vm_ioctl_set_nr_mmu_pages(kvm, op.nr_mmu_pages))
            )
        if isinstance(op, CreateVcpu):
            return _result(kvm_vm_ioctl_create_vcpu(kvm, op.id))
        if isinstance(op, ResetDirtyRings):
            errno, count = run_to_completion(kvm_vm_ioctl_reset_dirty_pages(kvm))
            return _result(errno, result=count)
        if isinstance(op, GuestWrite | GuestRead):
            return self._guest_access(op)
        if isinstance(op, HarvestDirtyRing):
            return self._harvest_dirty_ring(op)
        if isinstance(op, HOST_OPERATIONS):
            return self._host_operation(op)
        raise TypeError(f"reference target cannot apply {op!r}")

    def _set_region(self, op: SetUserMemoryRegion | SetUserMemoryRegion2) -> int:
        version = 1
        gmem_offset = 0
        gmem_file = None
        if isinstance(op, SetUserMemoryRegion2):
            version = 2
            gmem_offset = op.guest_memfd_offset
            # An integer descriptor stands for one that is not open.
            if isinstance(op.guest_memfd, str):
                gmem_file = self.gmems.get(op.guest_memfd)
        region = MemoryRegion(
            slot=op.slot,
            flags=op.flags,
            guest_phys_addr=op.guest_phys_addr,
            memory_size=op.memory_size,
            userspace_addr=self.resolve(op.userspace_addr),
            guest_memfd_offset=gmem_offset,
        )
        return run_to_completion(
            kvm_vm_ioctl_set_memory_region(self.kvm, region, version, gmem_file)
        )

    # -- the guest ------------------------------------------------------------------------------

    def _guest_access(self, op: GuestWrite | GuestRead) -> Observation:
        """The guest's load or store, through the model's fault path. As on linux-kvm, the
        first guest operation creates the harness's private slot (its errno, if refused)."""
        if op.vcpu not in self.kvm.vcpus:
            return _result(EBADF)  # the vCPU was never created: no fd to run
        if not self.private_hva:
            errno = self._start_guest()
            if errno:
                return _result(errno)
        data = op.value.to_bytes(op.size, "little") if isinstance(op, GuestWrite) else None
        if self.guest is not None:
            shadow = self.guest.access(op.vcpu, op.gpa, op.size, data)
            return _shadow_observation(shadow, loaded=data is None)
        access = guest_instruction(self.kvm, self.host, op.vcpu, op.gpa, data, op.size)
        return _guest_observation(access, loaded=data is None)

    def _start_guest(self) -> int:
        """The private slot of kvmspec.fuzz.guest_layout, over 16 MiB of host memory. The
        guest's code and page tables live there on linux-kvm; on the shadow MMU the model's
        guest puts its page tables there too (it needs no code), on the flat MMU nothing."""
        errno, hva = self.host.mmap(PRIVATE_SIZE, PROTECTIONS["rw"])
        if errno:
            return errno
        region = MemoryRegion(private_slot_id(self.profile), 0, PRIVATE_GPA, PRIVATE_SIZE, hva)
        errno = run_to_completion(kvm_vm_ioctl_set_memory_region(self.kvm, region, 1))
        if not errno:
            self.private_hva = hva
            if isinstance(self.kvm.arch, ShadowMmu):
                self.guest = ShadowGuest(self.kvm, self.host, hva)
        return errno

    def _harvest_dirty_ring(self, op: HarvestDirtyRing) -> Observation:
        """The VMM reads the vCPU's ring (EBADF without the vCPU, EINVAL without a ring, as
        on linux-kvm)."""
        vcpu = self.kvm.vcpus.get(op.vcpu)
        if vcpu is None:
            return _result(EBADF)
        if vcpu.dirty_ring is None:
            return _result(EINVAL)
        return _result(0, entries=[[e.slot, e.offset] for e in vcpu.dirty_ring.harvest()])

    # -- the host -------------------------------------------------------------------------------

    def _host_operation(self, op: HostOperation) -> Observation:
        """The VMM's system call or access on [region + offset, ...), in the model's host."""
        host = self.host
        start = self.resolve(RegionAddr(op.region, op.offset))
        if isinstance(op, HostWrite):
            return _result(_store(host, start, op.value.to_bytes(op.size, "little")))
        if isinstance(op, HostRead):
            errno, data = _load(host, start, op.size)
            return _result(errno, value=int.from_bytes(data, "little"))
        if isinstance(op, MadviseDontneed):
            return _result(host.madvise_dontneed(start, op.length))
        if isinstance(op, Mprotect):
            return _result(host.mprotect(start, op.length, PROTECTIONS[op.prot]))
        if isinstance(op, Munmap):
            return _result(host.munmap(start, op.length))
        return _result(_mmap_fixed(host, start, op.length, PROTECTIONS[op.prot]))


def _guest_observation(access: GuestAccess, loaded: bool) -> Observation:
    """A guest operation's observation, in the form linux-kvm reports (docs/trace-format.md);
    ``loaded`` says the access was a load, whose completion reports the value."""
    if access.outcome == Fault.EFAULT:
        return _result(EFAULT)  # KVM_RUN failed
    if access.outcome == Fault.DIRTY_RING_FULL:
        return {"errno": 0, "exit": "dirty_ring_full"}
    if access.outcome == Fault.MMIO:
        assert access.mmio is not None
        return _mmio_observation(access.mmio)
    # Run alone, an access never meets an open invalidation or an INVALID slot: no RETRY.
    assert access.outcome == Fault.MAPPED, access
    if loaded:
        return {"errno": 0, "exit": "none", "value": int.from_bytes(access.data, "little")}
    return {"errno": 0, "exit": "none"}


def _shadow_observation(access: ShadowAccess, loaded: bool) -> Observation:
    """A guest operation's observation from the shadow MMU's outcome, in the form linux-kvm
    reports. SHUTDOWN (the guest's walk failed, and the guest has no #PF handler) is what
    linux-kvm reports as the shutdown exit; no access a trace may make should end so."""
    if access.outcome is Outcome.EFAULT:
        return _result(EFAULT)  # KVM_RUN failed
    if access.outcome is Outcome.ENOSPC:
        return _result(ENOSPC)  # KVM_RUN failed: no shadow page left to recycle
    if access.outcome is Outcome.DIRTY_RING_FULL:
        return {"errno": 0, "exit": "dirty_ring_full"}
    if access.outcome is Outcome.SHUTDOWN:
        return {"errno": 0, "exit": "shutdown"}
    if access.outcome is Outcome.MMIO:
        assert access.mmio is not None
        return _mmio_observation(access.mmio)
    # Run alone, an access never meets an open invalidation or an INVALID slot: no RETRY.
    assert access.outcome is Outcome.DONE, access
    if loaded:
        return {"errno": 0, "exit": "none", "value": int.from_bytes(access.data, "little")}
    return {"errno": 0, "exit": "none"}


def _mmio_observation(mmio: MmioExit) -> Observation:
    """An MMIO exit as linux-kvm reports it: a load's ``data`` is empty."""
    data = mmio.data or b""
    return {
        "errno": 0,
        "exit": "mmio",
        "gpa": mmio.gpa,
        "len": mmio.length,
        "write": mmio.data is not None,
        "data": data.hex(),
    }


def _pieces(host: HostMm, start: int, size: int) -> list[tuple[int, int]]:
    """[start, start + size) split at page boundaries: (address, length) pairs."""
    pieces = []
    while size:
        length = min(size, host.page_size - start % host.page_size)
        pieces.append((start, length))
        start, size = start + length, size - length
    return pieces


def _store(host: HostMm, start: int, data: bytes) -> int:
    """The VMM stores ``data``, page by page in address order; the first page that faults
    ends it with EFAULT, the bytes before it stored (as on linux-kvm)."""
    done = 0
    for address, length in _pieces(host, start, len(data)):
        if host.host_write(address, data[done : done + length]):
            return EFAULT
        done += length
    return 0


def _load(host: HostMm, start: int, size: int) -> tuple[int, bytes]:
    """The VMM loads ``size`` bytes, page by page: (0, bytes) or (EFAULT, b"")."""
    loaded = b""
    for address, length in _pieces(host, start, size):
        errno, data = host.host_read(address, length)
        if errno:
            return EFAULT, b""
        loaded += data
    return 0, loaded


def _mmap_fixed(host: HostMm, start: int, length: int, prot: int) -> int:
    """mmap(start, length, prot, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS): EINVAL for an
    unaligned start or a zero length, ENOMEM past the address space; otherwise whatever was
    mapped there is unmapped first (with its MMU-notifier invalidation), and fresh zeroed
    memory takes its place. (HostMm has no MAP_FIXED; this belongs there.)

    kernel: mm/mmap.c:do_mmap, __get_unmapped_area; mm/vma.c:mmap_region (v6.18)
    """
    if start % host.page_size or length == 0:
        return EINVAL
    end = start + -(-length // host.page_size) * host.page_size
    if end > host.task_size:
        return ENOMEM
    errno = host.munmap(start, end - start)
    assert errno == 0, errno
    host.vmas[start] = Vma(start, end, prot)
    return 0
