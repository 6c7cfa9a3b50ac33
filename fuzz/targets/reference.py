"""The reference model as a target: each operation runs the model's kernel path to
completion and reports the same observation the real kernel would."""

from __future__ import annotations

from kvmspec.fuzz.ops import (
    Address,
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    Mmap,
    Observation,
    Operation,
    RegionAddr,
    ResetDirtyRings,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.reference.capabilities import kvm_vm_ioctl_check_extension, kvm_vm_ioctl_enable_cap
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.dirty_log import (
    kvm_clear_dirty_log_protect,
    kvm_get_dirty_log_protect,
    kvm_vm_ioctl_reset_dirty_pages,
)
from kvmspec.reference.guest_memfd import GmemFile, kvm_gmem_create
from kvmspec.reference.host import PROTECTIONS, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.kvm_main import kvm_vm_ioctl_set_memory_region
from kvmspec.reference.vcpu import kvm_vm_ioctl_create_vcpu
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import CAPABILITIES, U64_MAX, errno_name
from kvmspec.spec.uapi.memslot_rules import MemoryRegion


def _result(errno: int, **extra: object) -> Observation:
    observation: Observation = {"errno": errno_name(errno)}
    if not errno:
        observation.update(extra)
    return observation


class ReferenceTarget:
    """One model VM plus the VMM's host address space, driven by operations."""

    name = "reference"

    def __init__(self, profile: PlatformProfile) -> None:
        self.profile = profile
        self.kvm = Kvm(profile)
        self.host = HostMm(profile.page_size, profile.user_address_limit)
        self.regions: dict[str, int] = {}
        self.gmems: dict[str, GmemFile] = {}

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
        if isinstance(op, CreateVcpu):
            return _result(kvm_vm_ioctl_create_vcpu(kvm, op.id))
        if isinstance(op, ResetDirtyRings):
            errno, count = run_to_completion(kvm_vm_ioctl_reset_dirty_pages(kvm))
            return _result(errno, result=count)
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
