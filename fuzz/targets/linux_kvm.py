"""The real kernel as a target: each operation becomes one ioctl (or mmap) on a fresh VM.

The target opens ``/dev/kvm``, creates one VM of type 0 (KVM_X86_DEFAULT_VM) and turns every
operation into the system call a VMM would make, through libc's ``ioctl``/``mmap``/``munmap``
called with ctypes. Its observations have exactly the form of the reference target's, so the
two can be compared operation by operation.

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
from kvmspec.fuzz.targets.base import TargetUnavailable
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    errno_name,
)

# --------------------------------------------------------------------------- libc

_libc = ctypes.CDLL(None, use_errno=True)

# No argtypes for ioctl: every call passes a ready-made c_ulong request and a ctypes buffer
# (by pointer) or c_ulong value, which ctypes hands over without a per-call conversion.
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_mmap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x10, 0x20, 0x4000
MAP_FAILED = U64_MAX  # (void *)-1 as ctypes returns it
_PROTECTIONS = {"none": PROT_NONE, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}
# MAP_NORESERVE: like the model's host, which has no commit limit, a large writable region
# must not be refused by overcommit accounting; KVM never looks at it before a guest runs.
_ANON_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
REGION_ALIGN = 2 << 20
"""Regions start on a 2 MiB boundary and have at least 2 MiB of reserved, inaccessible
address space on each side, as in the model's host (:mod:`kvmspec.reference.host`)."""


def _mmap_anon(size: int, prot: int, fixed: int = 0) -> tuple[int, int]:
    """mmap(fixed or NULL, size, prot, private anonymous): (errno, address)."""
    address = _mmap(fixed or None, size, prot, _ANON_FLAGS | (MAP_FIXED if fixed else 0), -1, 0)
    if address is None or address == MAP_FAILED:
        return ctypes.get_errno() or errno.ENOMEM, 0
    return 0, address


def _mmap_region(size: int, prot: int) -> tuple[int, int, tuple[int, int]]:
    """A region for an Mmap operation: (errno, address, (reservation start, length)).

    The kernel packs anonymous mappings next to each other, so ``region + size`` would be
    the start of the region mapped before it; the model leaves a gap. To keep "an offset
    past the end of one region" from meaning "inside another" on one target only, each
    region is mapped inside a PROT_NONE reservation with a 2 MiB guard on both sides. The
    errno is still the kernel's: a size it refuses is refused by one of the two mmaps.
    """
    span = -(-size // REGION_ALIGN) * REGION_ALIGN + 3 * REGION_ALIGN
    if span > U64_MAX:
        span = size  # no reservation can be that large: let mmap itself refuse the size
    code, reserved = _mmap_anon(span, PROT_NONE)
    if code:
        return code, 0, (0, 0)
    start = -(-(reserved + REGION_ALIGN) // REGION_ALIGN) * REGION_ALIGN
    code, address = _mmap_anon(size, prot, fixed=start)
    if code:
        _munmap(reserved, span)
        return code, 0, (0, 0)
    return 0, address, (reserved, span)


# --------------------------------------------------------------------------- ioctls


def _ioc(direction: int, nr: int, size: int) -> ctypes.c_ulong:
    """_IOC(dir, KVMIO, nr, size) of <asm-generic/ioctl.h> (dir 1 = write, 2 = read), as the
    C unsigned long that ioctl takes."""
    return ctypes.c_ulong((direction << 30) | (size << 16) | (0xAE << 8) | nr)


_NONE, _W, _RW = 0, 1, 3

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
KVM_GET_API_VERSION = _ioc(_NONE, 0x00, 0)
KVM_CREATE_VM = _ioc(_NONE, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(_NONE, 0x03, 0)
KVM_CREATE_VCPU = _ioc(_NONE, 0x41, 0)
KVM_GET_DIRTY_LOG = _ioc(_W, 0x42, _DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = _ioc(_W, 0x46, _REGION_SIZE)
KVM_SET_USER_MEMORY_REGION2 = _ioc(_W, 0x49, _REGION2_SIZE)
KVM_ENABLE_CAP = _ioc(_W, 0xA3, _ENABLE_CAP_SIZE)
KVM_CLEAR_DIRTY_LOG = _ioc(_RW, 0xC0, _CLEAR_DIRTY_LOG.size)
KVM_RESET_DIRTY_RINGS = _ioc(_NONE, 0xC7, 0)
KVM_CREATE_GUEST_MEMFD = _ioc(_RW, 0xD4, _CREATE_GMEM_SIZE)

_VM_TYPE_DEFAULT = ctypes.c_ulong(0)  # KVM_X86_DEFAULT_VM, the only type this kernel has
_NR_MEMSLOTS = ctypes.c_ulong(CAPABILITIES["KVM_CAP_NR_MEMSLOTS"])

_IoctlArg = ctypes.c_ulong | ctypes.Array[ctypes.c_char]
_NO_ARG = ctypes.c_ulong(0)


def _ioctl_errno(fd: int, request: ctypes.c_ulong, arg: _IoctlArg = _NO_ARG) -> tuple[int, int]:
    """ioctl(fd, request, arg) -> (errno, result); arg is a value or a struct buffer."""
    result: int = _ioctl(fd, request, arg)
    if result < 0:
        return ctypes.get_errno(), 0
    return 0, result


def _bitmap_bytes(npages: int) -> int:
    """kvm_dirty_bitmap_bytes(): one bit per page, in whole 64-bit words."""
    return (npages + 63) // 64 * 8


def _failure(code: int) -> Observation:
    return {"errno": errno_name(code)}


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
        code, base = _mmap_anon(capacity + PAGE_SIZE, PROT_READ | PROT_WRITE)
        if code:
            raise MemoryError(f"cannot map a {capacity}-byte bitmap buffer: {os.strerror(code)}")
        if _mprotect(base + capacity, PAGE_SIZE, PROT_NONE):
            _munmap(base, capacity + PAGE_SIZE)
            raise MemoryError(f"mprotect of a guard page: {os.strerror(ctypes.get_errno())}")
        self._base, self._capacity = base, capacity

    def release(self) -> None:
        if self._base:
            _munmap(self._base, self._capacity + PAGE_SIZE)
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
        self.vm_fd = -1
        try:
            system_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise TargetUnavailable(f"{device}: {error.strerror}") from None
        try:
            code, version = _ioctl_errno(system_fd, KVM_GET_API_VERSION)
            if code:
                raise TargetUnavailable(f"{device}: KVM_GET_API_VERSION: {os.strerror(code)}")
            if version != KVM_API_VERSION:
                raise TargetUnavailable(f"{device}: KVM API version {version}, not 12")
            code, vm_fd = _ioctl_errno(system_fd, KVM_CREATE_VM, _VM_TYPE_DEFAULT)
            if code:
                raise TargetUnavailable(f"{device}: KVM_CREATE_VM: {os.strerror(code)}")
        finally:
            # The VM keeps KVM alive; the system fd is not needed any more.
            os.close(system_fd)
        self.vm_fd = vm_fd

        self._regions: dict[str, int] = {}  # region name -> start address
        self._mappings: list[tuple[int, int]] = []  # (start, length) of every reservation
        self._gmems: dict[str, int] = {}  # guest_memfd name -> descriptor
        self._gmem_fds: list[int] = []  # every guest_memfd created, for close()
        self._vcpu_fds: list[int] = []
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
            CreateVcpu: self._create_vcpu,
            ResetDirtyRings: self._reset_dirty_rings,
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
        for fd in self._vcpu_fds + self._gmem_fds + [self.vm_fd]:
            os.close(fd)
        self._vcpu_fds.clear()
        self._gmem_fds.clear()
        self._gmems.clear()
        self.vm_fd = -1
        for address, size in self._mappings:
            _munmap(address, size)
        self._mappings.clear()
        self._regions.clear()
        if self._scratch:
            _munmap(self._scratch, PAGE_SIZE)
            self._scratch = 0
        self._bitmap.release()

    def resolve(self, address: Address) -> int:
        """The host virtual address a ``userspace_addr`` stands for (mod 2^64). A region
        whose mmap failed has no address; it counts from 0."""
        if isinstance(address, RegionAddr):
            return (self._regions.get(address.region, 0) + address.offset) & U64_MAX
        return address

    # ------------------------------------------------------------------ operations

    def _mmap(self, op: Mmap) -> Observation:
        code, address, reservation = _mmap_region(op.size, _PROTECTIONS[op.prot])
        if code:
            return _failure(code)
        self._mappings.append(reservation)
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
        if _ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region) < 0:
            return _failure(ctypes.get_errno())
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
        if _ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION2, self._region2) < 0:
            return _failure(ctypes.get_errno())
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
        code, fd = _ioctl_errno(self.vm_fd, KVM_CREATE_GUEST_MEMFD, self._arg)
        if code:
            return _failure(code)
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
        if _ioctl(self.vm_fd, KVM_GET_DIRTY_LOG, self._arg) < 0:
            return _failure(ctypes.get_errno())
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
        if _ioctl(self.vm_fd, KVM_CLEAR_DIRTY_LOG, self._arg) < 0:
            return _failure(ctypes.get_errno())
        return {"errno": 0}

    def _enable_cap(self, op: EnableCap) -> Observation:
        args = op.args + (0,) * (4 - len(op.args))
        _ENABLE_CAP.pack_into(self._arg, 0, CAPABILITIES[op.cap], op.flags, *args)
        ctypes.memset(self._arg_addr + _ENABLE_CAP.size, 0, _ENABLE_CAP_SIZE - _ENABLE_CAP.size)
        if _ioctl(self.vm_fd, KVM_ENABLE_CAP, self._arg) < 0:
            return _failure(ctypes.get_errno())
        return {"errno": 0}

    def _check_extension(self, op: CheckExtension) -> Observation:
        code, result = _ioctl_errno(
            self.vm_fd, KVM_CHECK_EXTENSION, ctypes.c_ulong(CAPABILITIES[op.cap])
        )
        if code:
            return _failure(code)
        return {"errno": 0, "result": result}

    def _create_vcpu(self, op: CreateVcpu) -> Observation:
        code, fd = _ioctl_errno(self.vm_fd, KVM_CREATE_VCPU, ctypes.c_ulong(op.id))
        if code:
            return _failure(code)
        self._vcpu_fds.append(fd)
        return {"errno": 0}

    def _reset_dirty_rings(self, op: ResetDirtyRings) -> Observation:
        code, count = _ioctl_errno(self.vm_fd, KVM_RESET_DIRTY_RINGS)
        if code:
            return _failure(code)
        return {"errno": 0, "result": count}

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
            code, self._scratch = _mmap_anon(PAGE_SIZE, PROT_READ | PROT_WRITE)
            if code:
                raise OSError(code, f"scratch page: {os.strerror(code)}")
        if not self._nr_memslots:
            _, self._nr_memslots = _ioctl_errno(self.vm_fd, KVM_CHECK_EXTENSION, _NR_MEMSLOTS)
        spare = self._nr_memslots - 1
        while spare in self._slot_pages:
            spare -= 1
        page = gpa & ~(PAGE_SIZE - 1)
        _REGION.pack_into(self._region, 0, spare, 0, page, PAGE_SIZE, self._scratch)
        code, _ = _ioctl_errno(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region)
        if code == errno.EEXIST:
            return True
        if code:
            raise OSError(code, f"covered({gpa:#x}): {errno_name(code)}")
        _REGION.pack_into(self._region, 0, spare, 0, page, 0, self._scratch)
        code, _ = _ioctl_errno(self.vm_fd, KVM_SET_USER_MEMORY_REGION, self._region)
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
                    code, _ = _ioctl_errno(self.vm_fd, KVM_GET_DIRTY_LOG, self._arg)
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
