"""The operation vocabulary: what a trace, a fuzzer or a state machine can ask a target to do.

Each operation is a frozen dataclass whose fields carry the kernel's own struct field names.
``to_json`` gives the trace-line form (``{"op": NAME, ...}``); :mod:`kvmspec.fuzz.trace`
parses it back with full validation. An observation is a plain JSON-compatible dict:
``{"errno": 0}`` on success or ``{"errno": "EEXIST"}`` on failure, plus result fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

Observation = dict[str, Any]
JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RegionAddr:
    """A host virtual address inside a named ``mmap`` region: the region's start + offset."""

    region: str
    offset: int = 0

    def to_json(self) -> JsonObject:
        return {"region": self.region, "offset": self.offset}


Address = RegionAddr | int
"""A ``userspace_addr``: a place in a named region, or a raw integer (for invalid ones)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """Base of every operation. ``NAME`` is the ``"op"`` value of its trace line."""

    NAME: ClassVar[str] = ""

    def to_json(self) -> JsonObject:
        line: JsonObject = {"op": self.NAME}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, RegionAddr):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = list(value)
            line[field.name] = value
        return line


@dataclass(frozen=True, slots=True)
class Mmap(Operation):
    """Anonymous private host memory, named ``region`` (``prot``: "r", "rw" or "none")."""

    NAME: ClassVar[str] = "mmap"
    region: str
    size: int
    prot: str = "rw"


@dataclass(frozen=True, slots=True)
class SetUserMemoryRegion(Operation):
    """KVM_SET_USER_MEMORY_REGION."""

    NAME: ClassVar[str] = "set_user_memory_region"
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: Address


@dataclass(frozen=True, slots=True)
class SetUserMemoryRegion2(Operation):
    """KVM_SET_USER_MEMORY_REGION2. ``guest_memfd`` names a ``create_guest_memfd`` result, or
    is an integer descriptor that is not open (to exercise EBADF)."""

    NAME: ClassVar[str] = "set_user_memory_region2"
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: Address
    guest_memfd: str | int = 0
    guest_memfd_offset: int = 0


@dataclass(frozen=True, slots=True)
class CreateGuestMemfd(Operation):
    """KVM_CREATE_GUEST_MEMFD; on success the file is known as ``gmem`` from then on."""

    NAME: ClassVar[str] = "create_guest_memfd"
    gmem: str
    size: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class GetDirtyLog(Operation):
    """KVM_GET_DIRTY_LOG; observation ``{"errno": 0, "bitmap": [u64 words]}``."""

    NAME: ClassVar[str] = "get_dirty_log"
    slot: int


@dataclass(frozen=True, slots=True)
class ClearDirtyLog(Operation):
    """KVM_CLEAR_DIRTY_LOG; word 0 of ``bitmap`` covers ``first_page``."""

    NAME: ClassVar[str] = "clear_dirty_log"
    slot: int
    first_page: int
    num_pages: int
    bitmap: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EnableCap(Operation):
    """KVM_ENABLE_CAP on the VM fd; ``cap`` is a KVM_CAP_* name."""

    NAME: ClassVar[str] = "enable_cap"
    cap: str
    args: tuple[int, ...] = ()
    flags: int = 0


@dataclass(frozen=True, slots=True)
class CheckExtension(Operation):
    """KVM_CHECK_EXTENSION on the VM fd; observation ``{"errno": 0, "result": N}``."""

    NAME: ClassVar[str] = "check_extension"
    cap: str


@dataclass(frozen=True, slots=True)
class SetNrMmuPages(Operation):
    """KVM_SET_NR_MMU_PAGES on the VM fd: x86's shadow-page limit, passed as the ioctl's
    argument itself (at least 64)."""

    NAME: ClassVar[str] = "set_nr_mmu_pages"
    nr_mmu_pages: int


@dataclass(frozen=True, slots=True)
class CreateVcpu(Operation):
    """KVM_CREATE_VCPU."""

    NAME: ClassVar[str] = "create_vcpu"
    id: int = 0


@dataclass(frozen=True, slots=True)
class ResetDirtyRings(Operation):
    """KVM_RESET_DIRTY_RINGS; observation ``{"errno": 0, "result": entries reset}``."""

    NAME: ClassVar[str] = "reset_dirty_rings"


# --------------------------------------------------------------------------- the guest
#
# A guest operation runs one instruction in the harness's guest (see kvmspec.fuzz.guest_layout
# for the memory it reserves). Its observation is {"errno": 0, "exit": ...}: "none" when the
# access completed (a load adds "value"), "mmio" with the MMIO exit's gpa, len, write and
# data, or "dirty_ring_full"; or {"errno": "EFAULT"} when KVM_RUN itself failed.


@dataclass(frozen=True, slots=True)
class GuestWrite(Operation):
    """The guest stores ``value`` (``size`` bytes, little-endian) at guest-physical ``gpa``."""

    NAME: ClassVar[str] = "guest_write"
    gpa: int
    size: int
    value: int
    vcpu: int = 0


@dataclass(frozen=True, slots=True)
class GuestRead(Operation):
    """The guest loads ``size`` bytes at guest-physical ``gpa``."""

    NAME: ClassVar[str] = "guest_read"
    gpa: int
    size: int
    vcpu: int = 0


@dataclass(frozen=True, slots=True)
class HarvestDirtyRing(Operation):
    """The VMM reads ``vcpu``'s dirty ring: every entry published since the last harvest, as
    ``{"errno": 0, "entries": [[slot, offset], ...]}``, each flagged for the next
    KVM_RESET_DIRTY_RINGS."""

    NAME: ClassVar[str] = "harvest_dirty_ring"
    vcpu: int = 0


# --------------------------------------------------------------------------- the host
#
# The VMM acting on its own memory, addressed inside a named ``mmap`` region. Errors are the
# errno of the system call (or EFAULT where a plain load or store would fault).


@dataclass(frozen=True, slots=True)
class HostWrite(Operation):
    """The VMM stores ``value`` (``size`` bytes, little-endian) at ``offset`` in ``region``."""

    NAME: ClassVar[str] = "host_write"
    region: str
    size: int
    value: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class HostRead(Operation):
    """The VMM loads ``size`` bytes at ``offset`` in ``region``: ``{"errno": 0, "value": V}``."""

    NAME: ClassVar[str] = "host_read"
    region: str
    size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class MadviseDontneed(Operation):
    """madvise(region + offset, length, MADV_DONTNEED)."""

    NAME: ClassVar[str] = "madvise_dontneed"
    region: str
    length: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Mprotect(Operation):
    """mprotect(region + offset, length, prot) (``prot``: "r", "rw" or "none")."""

    NAME: ClassVar[str] = "mprotect"
    region: str
    length: int
    prot: str
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Munmap(Operation):
    """munmap(region + offset, length)."""

    NAME: ClassVar[str] = "munmap"
    region: str
    length: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class MmapFixed(Operation):
    """mmap(region + offset, length, prot, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS): fresh
    zeroed memory replaces that part of the region (the region keeps its name)."""

    NAME: ClassVar[str] = "mmap_fixed"
    region: str
    length: int
    offset: int = 0
    prot: str = "rw"


GUEST_OPERATIONS = (GuestWrite, GuestRead)
"""The operations that run the guest (and create the harness's private slot first)."""
HostOperation = HostWrite | HostRead | MadviseDontneed | Mprotect | Munmap | MmapFixed
HOST_OPERATIONS = (HostWrite, HostRead, MadviseDontneed, Mprotect, Munmap, MmapFixed)
"""The operations on a part of a named region."""

OPERATIONS: dict[str, type[Operation]] = {
    cls.NAME: cls
    for cls in (
        Mmap,
        SetUserMemoryRegion,
        SetUserMemoryRegion2,
        CreateGuestMemfd,
        GetDirtyLog,
        ClearDirtyLog,
        EnableCap,
        CheckExtension,
        SetNrMmuPages,
        CreateVcpu,
        ResetDirtyRings,
        GuestWrite,
        GuestRead,
        HarvestDirtyRing,
        HostWrite,
        HostRead,
        MadviseDontneed,
        Mprotect,
        Munmap,
        MmapFixed,
    )
}
