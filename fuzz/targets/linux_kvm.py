"""The real kernel as a target: each operation becomes one ioctl (or mmap) on a fresh VM.

The target opens ``/dev/kvm``, creates one VM of type 0 (KVM_X86_DEFAULT_VM) and turns every
operation into the system call a VMM would make, through libc's ``ioctl``/``mmap``/``munmap``
called with ctypes (:mod:`kvmspec.fuzz.targets.syscalls`). Its observations have exactly the
form of the reference target's, so the two can be compared operation by operation.

Guest operations run the CPL3 guest of :mod:`kvmspec.fuzz.targets.kvm_guest`; the first one
creates the harness's private slot (:mod:`kvmspec.fuzz.guest_layout`). Host operations act on
the target's own regions, which it places in a window of the address space the kernel never
fills with the process's other mappings (REGION_WINDOW_TOP), so that a hole a trace munmaps
is never reused for the harness's memory, where a guest write could reach it. The VMM's own
loads and stores go through process_vm_readv/writev, so a fault is EFAULT, not SIGSEGV.

A VMM has no ioctl that reads memslots back, so the target keeps what a VMM keeps: the
address of each host region, the descriptor of each guest_memfd, and the page count of each
slot it created (KVM_GET_DIRTY_LOG needs a user buffer of the slot's bitmap size). Every
buffer the kernel writes or reads is placed right in front of an inaccessible guard page, so
that a wrong size can only ever turn into EFAULT, never into a write over Python's memory.

Two black-box probes, :meth:`LinuxKvmTarget.covered` and
:meth:`LinuxKvmTarget.dirty_bitmap_bytes`, read memslot facts the uAPI does not report.

ioctl numbers and struct layouts: include/uapi/linux/kvm.h (v6.18), checked on this machine in
shared/kvm-reference/linux-kvm-here/FINDINGS.md section 1.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from typing import Any

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE, private_slot_id
from kvmspec.fuzz.ops import (
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
    MmapFixed,
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
from kvmspec.fuzz.targets.base import TargetUnavailable
from kvmspec.fuzz.targets.kvm_guest import DirtyRingReader, GuestRunner
from kvmspec.fuzz.targets.syscalls import (
    IOC_NONE,
    IOC_RW,
    IOC_WRITE,
    MADV_DONTNEED,
    MAP_FIXED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    PROTECTIONS,
    copy_from_process,
    copy_to_process,
    ioc,
    ioctl,
    ioctl_errno,
    madvise,
    mmap_anon,
    mprotect,
    munmap,
)
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    errno_name,
)

# --------------------------------------------------------------------------- regions

REGION_ALIGN = 2 << 20
"""Regions start on a 2 MiB boundary and have at least 2 MiB of reserved, inaccessible
address space on each side, as in the model's host (:mod:`kvmspec.reference.host`)."""
REGION_WINDOW_TOP = 1 << 46
"""Regions are placed top-down below 64 TiB. The kernel puts everything else of this process
(the executable, its heap, libraries, other mappings) at 85 TiB and above, and fills its own
free space from the top, so it never reaches this window while other space is left. That
matters once guests run: a hole a trace munmaps inside a region must never be reused for the
harness's own memory, or a guest write through a slot over the hole would land in it."""


def _mmap_region(size: int, prot: int, below: int) -> tuple[int, int, tuple[int, int]]:
    """A region for an Mmap operation: (errno, address, (reservation start, length)), placed
    just below ``below`` if that space is free.

    The kernel packs anonymous mappings next to each other, so ``region + size`` would be
    the start of the region mapped before it; the model leaves a gap. To keep "an offset
    past the end of one region" from meaning "inside another" on one target only, each
    region is mapped inside a PROT_NONE reservation with a 2 MiB guard on both sides. The
    errno is still the kernel's: a size it refuses is refused by one of the two mmaps.
    """
    span = -(-size // REGION_ALIGN) * REGION_ALIGN + 3 * REGION_ALIGN
    if span > U64_MAX:
        span = size  # no reservation can be that large: let mmap itself refuse the size
    hint = below - span if span < below else 0  # a hint; the kernel chooses if it is taken
    code, reserved = mmap_anon(span, PROT_NONE, hint)
    if code:
        return code, 0, (0, 0)
    start = -(-(reserved + REGION_ALIGN) // REGION_ALIGN) * REGION_ALIGN
    code, address = mmap_anon(size, prot, start, MAP_FIXED)
    if code:
        munmap(reserved, span)
        return code, 0, (0, 0)
    return 0, address, (reserved, span)


# --------------------------------------------------------------------------- ioctls


_NONE, _W, _RW = IOC_NONE, IOC_WRITE, IOC_RW

# struct kvm_userspace_memory_region {u32 slot; u32 flags; u64 guest_phys_addr;
#                                     u64 memory_size; u64 userspace_addr;}
_REGION = struct.Struct("<IIQQQ")
_REGION_SIZE = 32
# struct kvm_userspace_memory_region2 {... as above; u64 guest_memfd_offset; u32 guest_memfd;
#                                      u32 pad1; u64 pad2[14];}: the pads stay zero.
_REGION2 = struct.Struct("<IIQQQQI")
_REGION2_SIZE = 160
# struct kvm_dirty_log {u32 slot; u32 padding1; void *dirty_bitmap;}
_DIRTY_LOG = struct.Struct("<I4xQ")
# struct kvm_clear_dirty_log {u32 slot; u32 num_pages; u64 first_page; void *dirty_bitmap;}
_CLEAR_DIRTY_LOG = struct.Struct("<IIQQ")
# struct kvm_enable_cap {u32 cap; u32 flags; u64 args[4]; u8 pad[64];}
_ENABLE_CAP = struct.Struct("<II4Q")
_ENABLE_CAP_SIZE = 104
# struct kvm_create_guest_memfd {u64 size; u64 flags; u64 reserved[6];}
_CREATE_GMEM = struct.Struct("<QQ")
_CREATE_GMEM_SIZE = 64

KVM_API_VERSION = 12
KVM_GET_API_VERSION = ioc(_NONE, 0x00, 0)
KVM_CREATE_VM = ioc(_NONE, 0x01, 0)
KVM_CHECK_EXTENSION = ioc(_NONE, 0x03, 0)
KVM_CREATE_VCPU = ioc(_NONE, 0x41, 0)
KVM_SET_NR_MMU_PAGES = ioc(_NONE, 0x44, 0)
KVM_GET_DIRTY_LOG = ioc(_W, 0x42, _DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = ioc(_W, 0x46, _REGION_SIZE)
KVM_SET_USER_MEMORY_REGION2 = ioc(_W, 0x49, _REGION2_SIZE)
KVM_ENABLE_CAP = ioc(_W, 0xA3, _ENABLE_CAP_SIZE)
KVM_CLEAR_DIRTY_LOG = ioc(_RW, 0xC0, _CLEAR_DIRTY_LOG.size)
KVM_RESET_DIRTY_RINGS = ioc(_NONE, 0xC7, 0)
KVM_CREATE_GUEST_MEMFD = ioc(_RW, 0xD4, _CREATE_GMEM_SIZE)

_VM_TYPE_DEFAULT = ctypes.c_ulong(0)  # KVM_X86_DEFAULT_VM, the only type this kernel has
_NR_MEMSLOTS = ctypes.c_ulong(CAPABILITIES["KVM_CAP_NR_MEMSLOTS"])


def _bitmap_bytes(npages: int) -> int:
    """kvm_dirty_bitmap_bytes(): one bit per page, in whole 64-bit words."""
    return (npages + 63) // 64 * 8


def _result(code: int) -> Observation:
    """The observation of a call that returns nothing else: ``{"errno": 0}`` or the name."""
    return {"errno": errno_name(code)}


_DIRTY_RING_CAPS = ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL")


# --------------------------------------------------------------------------- user buffers


class _GuardedBuffer:
    """User memory the kernel copies bitmaps to or from, ending at a PROT_NONE guard page.

    :meth:`place` hands out the last ``nbytes`` before the guard, so a kernel access beyond
    what the target sized (a slot the target misjudged) faults into EFAULT instead of writing
    over the process. The mapping is reused, and replaced only when a larger one is needed.
    """

    __slots__ = ("_base", "_capacity")

    def __init__(self) -> None:
        self._base = 0
        self._capacity = 0

    def place(self, nbytes: int) -> int:
        """The address of ``nbytes`` usable bytes that end exactly at the guard page."""
        if nbytes > self._capacity or not self._base:
            self._grow(nbytes)
        return self._base + self._capacity - nbytes

    def _grow(self, nbytes: int) -> None:
        self.release()
        capacity = max(PAGE_SIZE, -(-nbytes // PAGE_SIZE) * PAGE_SIZE)
        code, base = mmap_anon(capacity + PAGE_SIZE, PROT_READ | PROT_WRITE)
        if code:
            raise MemoryError(f"cannot map a {capacity}-byte bitmap buffer: {os.strerror(code)}")
        code = mprotect(base + capacity, PAGE_SIZE, PROT_NONE)
        if code:
            munmap(base, capacity + PAGE_SIZE)
            raise MemoryError(f"mprotect of a guard page: {os.strerror(code)}")
        self._base, self._capacity = base, capacity

    def release(self) -> None:
        if self._base:
            munmap(self._base, self._capacity + PAGE_SIZE)
            self._base, self._capacity = 0, 0


def _read_words(address: int, nbytes: int) -> list[int]:
    """The little-endian u64 words at ``address`` (x86-64 is little-endian, so native)."""
    words: list[int] = memoryview(ctypes.string_at(address, nbytes)).cast("Q").tolist()
    return words


# --------------------------------------------------------------------------- the target


class LinuxKvmTarget:
    """One VM of the running kernel's KVM, driven by operations.

    ``device`` is the KVM device to open; tests point it elsewhere to simulate a machine
    without KVM. Raises :class:`TargetUnavailable` with a one-line reason when the device
    cannot be opened or the VM cannot be created, and for a profile that is not x86-64 (the
    ioctl numbers and struct layouts here are x86-64's).
    """

    name = "linux-kvm"

    def __init__(self, profile: PlatformProfile, device: str = "/dev/kvm") -> None:
        if profile.arch != "x86_64":
            raise TargetUnavailable(
                f"profile {profile.name} is {profile.arch}, but linux-kvm drives this machine's "
                "x86-64 KVM"
            )
        self.profile = profile
        self.device = device
        self.vm_fd = -1
        try:
            system_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise TargetUnavailable(f"{device}: {error.strerror}") from None
        try:
            code, version = ioctl_errno(system_fd, KVM_GET_API_VERSION)
            if code:
                raise TargetUnavailable(f"{device}: KVM_GET_API_VERSION: {os.strerror(code)}")
            if version != KVM_API_VERSION:
                raise TargetUnavailable(f"{device}: KVM API version {version}, not 12")
            code, vm_fd = ioctl_errno(system_fd, KVM_CREATE_VM, _VM_TYPE_DEFAULT)
            if code:
                raise TargetUnavailable(f"{device}: KVM_CREATE_VM: {os.strerror(code)}")
        finally:
            # The VM keeps KVM alive; the system fd is not needed any more.
            os.close(system_fd)
        self.vm_fd = vm_fd

        self._regions: dict[str, int] = {}  # region name -> start address
        self._mappings: list[tuple[int, int]] = []  # (start, length) of every reservation
        self._next_region_top = REGION_WINDOW_TOP
        self._gmems: dict[str, int] = {}  # guest_memfd name -> descriptor
        self._gmem_fds: list[int] = []  # every guest_memfd created, for close()
        self._vcpus: dict[int, int] = {}  # vCPU id -> descriptor
        self._ring_bytes = 0  # the dirty ring's size, once KVM_ENABLE_CAP accepted one
        self._rings: dict[int, DirtyRingReader] = {}  # vCPU id -> its mapped ring
        self._guest: GuestRunner | None = None  # created by the first guest operation
        self.private_hva = 0  # the memory of the harness's private slot, once created
        self._slot_pages: dict[int, int] = {}  # slot (as_id << 16 | id) -> npages
        self._closed_fd = 4096  # a descriptor number believed closed; see _closed_descriptor
        self._scratch = 0  # one page, the hva of the probe slot
        self._nr_memslots = 0
        self._bitmap = _GuardedBuffer()
        # Argument structs, allocated once and reused: only the fields are packed per call.
        self._region = ctypes.create_string_buffer(_REGION_SIZE)
        self._region2 = ctypes.create_string_buffer(_REGION2_SIZE)
        self._arg = ctypes.create_string_buffer(_ENABLE_CAP_SIZE)  # the largest of the rest
        self._arg_addr = ctypes.addressof(self._arg)
        self._handlers: dict[type[Operation], Callable[[Any], Observation]] = {
            Mmap: self._mmap,
            SetUserMemoryRegion: self._set_user_memory_region,
            SetUserMemoryRegion2: self._set_user_memory_region2,
            CreateGuestMemfd: self._create_guest_memfd,
            GetDirtyLog: self._get_dirty_log,
            ClearDirtyLog: self._clear_dirty_log,
            EnableCap: self._enable_cap,
            CheckExtension: self._check_extension,
            SetNrMmuPages: self._set_nr_mmu_pages,
            CreateVcpu: self._create_vcpu,
            ResetDirtyRings: self._reset_dirty_rings,
            GuestWrite: self._guest_access,
            GuestRead: self._guest_access,
            HarvestDirtyRing: self._harvest_dirty_ring,
            HostWrite: self._host_write,
            HostRead: self._host_read,
            MadviseDontneed: self._madvise_dontneed,
            Mprotect: self._mprotect,
            Munmap: self._munmap,
            MmapFixed: self._mmap_fixed,
        }

    def __enter__(self) -> LinuxKvmTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the protocol

    def apply(self, op: Operation) -> Observation:
        """Perform ``op`` on the VM; kernel errors are observations, never exceptions."""
        if self.vm_fd < 0:
            raise ValueError("apply() on a closed linux-kvm target")
        handler = self._handlers.get(type(op))
        if handler is None:
            raise TypeError(f"linux-kvm target cannot apply {op!r}")
        return handler(op)

    def close(self) -> None:
        """Release every vCPU, guest_memfd, the VM and every mapping. Safe to call again."""
        if self.vm_fd < 0:
            return
        if self._guest is not None:
            self._guest.close()
            self._guest = None
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        for fd in [*self._vcpus.values(), *self._gmem_fds, self.vm_fd]:
            os.close(fd)
        self._vcpus.clear()
        self._gmem_fds.clear()
        self._gmems.clear()
        self.vm_fd = -1
        for address, size in self._mappings:
            munmap(address, size)
        self._mappings.clear()
        self._regions.clear()
        if self._scratch:
            munmap(self._scratch, PAGE_SIZE)
            self._scratch = 0
        if self.private_hva:
            munmap(self.private_hva, PRIVATE_SIZE)
            self.private_hva = 0
        self._bitmap.release()

    def resolve(self, address: Address) -> int:
        """The host virtual address a ``userspace_addr`` stands for (mod 2^64). A region
        whose mmap failed has no address; it counts from 0."""
        if isinstance(address, RegionAddr):
            return (self._regions.get(address.region, 0) + address.offset) & U64_MAX
        return address

    # ------------------------------------------------------------------ operations

    def _mmap(self, op: Mmap) -> Observation:
        code, address, reservation = _mmap_region(
            op.size, PROTECTIONS[op.prot], self._next_region_top
        )
        if code:
            return _result(code)
        self._mappings.append(reservation)
        self._next_region_top = min(self._next_region_top, reservation[0])
        self._regions[op.region] = address
        return {"errno": 0}

    def _set_user_memory_region(self, op: SetUserMemoryRegion) -> Observation:
        _REGION.pack_into(
            self._region,
            0,
            op.slot,
            op.flags,
            op.guest_phys_addr,
            op.memory_size,
            self.resolve(op.userspace_addr),
        )
        if ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region) < 0:
            return _result(ctypes.get_errno())
        self._track(op.slot, op.memory_size)
        return {"errno": 0}

    def _set_user_memory_region2(self, op: SetUserMemoryRegion2) -> Observation:
        gmem = op.guest_memfd
        fd = self._gmems.get(gmem) if isinstance(gmem, str) else None
        if fd is None:
            # An integer, or a name whose creation failed: a descriptor that is not open.
            fd = self._closed_descriptor()
        _REGION2.pack_into(
            self._region2,
            0,
            op.slot,
            op.flags,
            op.guest_phys_addr,
            op.memory_size,
            self.resolve(op.userspace_addr),
            op.guest_memfd_offset,
            fd,
        )
        if ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION2, self._region2) < 0:
            return _result(ctypes.get_errno())
        self._track(op.slot, op.memory_size)
        return {"errno": 0}

    def _track(self, slot: int, memory_size: int) -> None:
        """Record an accepted region change as a VMM would: a size of 0 deleted the slot; on
        an existing slot only MOVE and flag changes are accepted, which keep npages."""
        if memory_size == 0:
            self._slot_pages.pop(slot, None)
        elif slot not in self._slot_pages:
            self._slot_pages[slot] = memory_size >> PAGE_SHIFT

    def _create_guest_memfd(self, op: CreateGuestMemfd) -> Observation:
        _CREATE_GMEM.pack_into(self._arg, 0, op.size, op.flags)
        ctypes.memset(self._arg_addr + _CREATE_GMEM.size, 0, _CREATE_GMEM_SIZE - _CREATE_GMEM.size)
        code, fd = ioctl_errno(self.vm_fd, KVM_CREATE_GUEST_MEMFD, self._arg)
        if code:
            return _result(code)
        # The kernel opens a guest_memfd without O_CLOEXEC (the VM and vCPU fds have it).
        os.set_inheritable(fd, False)
        self._gmem_fds.append(fd)
        self._gmems[op.gmem] = fd
        return {"errno": 0}

    def _get_dirty_log(self, op: GetDirtyLog) -> Observation:
        npages = self._slot_pages.get(op.slot)
        # A slot the target does not know still goes to the kernel, for its errno.
        nbytes = _bitmap_bytes(npages) if npages is not None else 8
        address = self._bitmap.place(nbytes)
        _DIRTY_LOG.pack_into(self._arg, 0, op.slot, address)
        if ioctl(self.vm_fd, KVM_GET_DIRTY_LOG, self._arg) < 0:
            return _result(ctypes.get_errno())
        return {"errno": 0, "bitmap": _read_words(address, nbytes)}

    def _clear_dirty_log(self, op: ClearDirtyLog) -> Observation:
        # The kernel reads ALIGN(num_pages, 64) / 8 bytes, but only after checking the range
        # against the slot; a request it will refuse gets the words the operation carries.
        nwords = (op.num_pages + 63) // 64
        npages = self._slot_pages.get(op.slot)
        if npages is None or op.num_pages > npages:
            nwords = min(nwords, len(op.bitmap))
        address = self._bitmap.place(nwords * 8)
        words = op.bitmap[:nwords]
        ctypes.memmove(address, struct.pack(f"<{len(words)}Q", *words), len(words) * 8)
        ctypes.memset(address + len(words) * 8, 0, (nwords - len(words)) * 8)
        _CLEAR_DIRTY_LOG.pack_into(self._arg, 0, op.slot, op.num_pages, op.first_page, address)
        if ioctl(self.vm_fd, KVM_CLEAR_DIRTY_LOG, self._arg) < 0:
            return _result(ctypes.get_errno())
        return {"errno": 0}

    def _enable_cap(self, op: EnableCap) -> Observation:
        args = op.args + (0,) * (4 - len(op.args))
        _ENABLE_CAP.pack_into(self._arg, 0, CAPABILITIES[op.cap], op.flags, *args)
        ctypes.memset(self._arg_addr + _ENABLE_CAP.size, 0, _ENABLE_CAP_SIZE - _ENABLE_CAP.size)
        if ioctl(self.vm_fd, KVM_ENABLE_CAP, self._arg) < 0:
            return _result(ctypes.get_errno())
        if op.cap in _DIRTY_RING_CAPS:
            self._ring_bytes = args[0]
        return {"errno": 0}

    def _check_extension(self, op: CheckExtension) -> Observation:
        code, result = ioctl_errno(
            self.vm_fd, KVM_CHECK_EXTENSION, ctypes.c_ulong(CAPABILITIES[op.cap])
        )
        if code:
            return _result(code)
        return {"errno": 0, "result": result}

    def _set_nr_mmu_pages(self, op: SetNrMmuPages) -> Observation:
        # The limit is the argument itself, not a pointer to it.
        code, _ = ioctl_errno(self.vm_fd, KVM_SET_NR_MMU_PAGES, ctypes.c_ulong(op.nr_mmu_pages))
        return _result(code)

    def _create_vcpu(self, op: CreateVcpu) -> Observation:
        code, fd = ioctl_errno(self.vm_fd, KVM_CREATE_VCPU, ctypes.c_ulong(op.id))
        if code:
            return _result(code)
        self._vcpus[op.id] = fd
        return {"errno": 0}

    def _reset_dirty_rings(self, op: ResetDirtyRings) -> Observation:
        code, count = ioctl_errno(self.vm_fd, KVM_RESET_DIRTY_RINGS)
        if code:
            return _result(code)
        return {"errno": 0, "result": count}

    # ------------------------------------------------------------------ the guest

    def _guest_access(self, op: GuestWrite | GuestRead) -> Observation:
        """Run the guest's load or store (:mod:`kvmspec.fuzz.targets.kvm_guest`). The first
        guest operation creates the harness's private slot; if the VM refuses it (a trace
        applied without the parser's checks), the operation answers that errno."""
        fd = self._vcpus.get(op.vcpu)
        if fd is None:
            return _result(errno.EBADF)  # the vCPU was never created: no fd to run
        if self._guest is None:
            code = self._start_guest()
            if code:
                return _result(code)
        assert self._guest is not None
        vcpu = self._guest.vcpu(op.vcpu, fd)
        value = op.value if isinstance(op, GuestWrite) else None
        return self._guest.access(vcpu, op.gpa, op.size, value)

    def _start_guest(self) -> int:
        """Map the private slot's memory, register the slot, build the guest: the errno."""
        code, self.private_hva = mmap_anon(PRIVATE_SIZE, PROT_READ | PROT_WRITE)
        if code:
            return code
        slot = private_slot_id(self.profile)
        _REGION.pack_into(self._region, 0, slot, 0, PRIVATE_GPA, PRIVATE_SIZE, self.private_hva)
        code, _ = ioctl_errno(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region)
        if code:
            munmap(self.private_hva, PRIVATE_SIZE)
            self.private_hva = 0
            return code
        self._track(slot, PRIVATE_SIZE)
        self._guest = GuestRunner(self.device, self.private_hva)
        return 0

    def _harvest_dirty_ring(self, op: HarvestDirtyRing) -> Observation:
        """Read the vCPU's ring. A VM without a ring has nothing to map: EINVAL, the answer
        KVM_RESET_DIRTY_RINGS gives then; a vCPU that was never created has no fd: EBADF."""
        fd = self._vcpus.get(op.vcpu)
        if fd is None:
            return _result(errno.EBADF)
        if not self._ring_bytes:
            return _result(errno.EINVAL)
        ring = self._rings.get(op.vcpu)
        if ring is None:
            ring = self._rings[op.vcpu] = DirtyRingReader(fd, self._ring_bytes)
        return {"errno": 0, "entries": ring.harvest()}

    # ------------------------------------------------------------------ the host

    def _host_address(self, op: HostOperation) -> int:
        """Where a host operation acts: its region's start plus its offset."""
        return self.resolve(RegionAddr(op.region, op.offset))

    def _host_write(self, op: HostWrite) -> Observation:
        data = op.value.to_bytes(op.size, "little")
        return _result(copy_to_process(self._host_address(op), data))

    def _host_read(self, op: HostRead) -> Observation:
        code, data = copy_from_process(self._host_address(op), op.size)
        if code:
            return _result(code)
        return {"errno": 0, "value": int.from_bytes(data, "little")}

    def _madvise_dontneed(self, op: MadviseDontneed) -> Observation:
        return _result(madvise(self._host_address(op), op.length, MADV_DONTNEED))

    def _mprotect(self, op: Mprotect) -> Observation:
        return _result(mprotect(self._host_address(op), op.length, PROTECTIONS[op.prot]))

    def _munmap(self, op: Munmap) -> Observation:
        return _result(munmap(self._host_address(op), op.length))

    def _mmap_fixed(self, op: MmapFixed) -> Observation:
        code, _ = mmap_anon(op.length, PROTECTIONS[op.prot], self._host_address(op), MAP_FIXED)
        return _result(code)

    def _closed_descriptor(self) -> int:
        """A descriptor number that is not open in this process, so that the kernel's fget()
        fails with EBADF. Checked with fstat on every use: the number stays the same unless
        something has opened it since."""
        fd = self._closed_fd
        while True:
            try:
                os.fstat(fd)
            except OSError as error:
                if error.errno == errno.EBADF:
                    self._closed_fd = fd
                    return fd
            fd += 1

    # ------------------------------------------------------------------ black-box probes

    def covered(self, gpa: int) -> bool:
        """Black-box probe: does some memslot cover the page of ``gpa``?

        KVM cannot list memslots, so this asks the way FINDINGS.md section 3 does: create a
        one-page slot at that page with a spare slot id. EEXIST means an existing slot
        overlaps it; success means none does, and the probe slot is deleted again. Any other
        error (an address no slot can have) raises OSError.
        """
        if self.vm_fd < 0:
            raise ValueError("covered() on a closed linux-kvm target")
        if not self._scratch:
            code, self._scratch = mmap_anon(PAGE_SIZE, PROT_READ | PROT_WRITE)
            if code:
                raise OSError(code, f"scratch page: {os.strerror(code)}")
        if not self._nr_memslots:
            _, self._nr_memslots = ioctl_errno(self.vm_fd, KVM_CHECK_EXTENSION, _NR_MEMSLOTS)
        spare = self._nr_memslots - 1
        while spare in self._slot_pages:
            spare -= 1
        page = gpa & ~(PAGE_SIZE - 1)
        _REGION.pack_into(self._region, 0, spare, 0, page, PAGE_SIZE, self._scratch)
        code, _ = ioctl_errno(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region)
        if code == errno.EEXIST:
            return True
        if code:
            raise OSError(code, f"covered({gpa:#x}): {errno_name(code)}")
        _REGION.pack_into(self._region, 0, spare, 0, page, 0, self._scratch)
        code, _ = ioctl_errno(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region)
        if code:
            raise OSError(code, f"covered({gpa:#x}): deleting the probe slot: {errno_name(code)}")
        return False

    def dirty_bitmap_bytes(self, slot: int) -> int | None:
        """Black-box probe: how many bitmap bytes KVM_GET_DIRTY_LOG writes for ``slot``, that
        is ALIGN(npages, 64) / 8; None when the ioctl fails (no such slot, no LOG_DIRTY, a
        dirty ring).

        It does not use the target's own record of the slot: the bitmap is read into a
        buffer filled with a pattern, and the bytes the kernel changed are counted. A bitmap
        byte can equal the pattern, so this is done twice with two complementary patterns,
        and the end of the write is the last byte that differed in either run. The buffer
        starts at one page and doubles while the kernel's write runs into the guard page.
        Like any GET, without manual protection it harvests (clears) the dirty bits.
        """
        if self.vm_fd < 0:
            raise ValueError("dirty_bitmap_bytes() on a closed linux-kvm target")
        probe = _GuardedBuffer()
        capacity = PAGE_SIZE
        try:
            while True:
                written = 0
                for pattern in (0xAA, 0x55):
                    address = probe.place(capacity)
                    ctypes.memset(address, pattern, capacity)
                    _DIRTY_LOG.pack_into(self._arg, 0, slot, address)
                    code, _ = ioctl_errno(self.vm_fd, KVM_GET_DIRTY_LOG, self._arg)
                    if code:
                        break
                    data = ctypes.string_at(address, capacity)
                    changed = len(data.rstrip(bytes((pattern,))))
                    written = max(written, changed)
                if code == errno.EFAULT and capacity < _bitmap_bytes(1 << 32):
                    capacity *= 2
                    continue
                if code:
                    return None
                return -(-written // 8) * 8
        finally:
            probe.release()
