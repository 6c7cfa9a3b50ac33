"""The system calls the linux-kvm target makes, through libc and ctypes.

Each wrapper returns the errno (0 on success) instead of raising, because for the target a
failing call is an observation, not an error. ioctl numbers are built with ``_IOC`` of
<asm-generic/ioctl.h>; the constants are x86-64 Linux's.
"""

from __future__ import annotations

import ctypes
import errno
import os

from kvmspec.spec.uapi.constants import U64_MAX

_libc = ctypes.CDLL(None, use_errno=True)

# No argtypes for ioctl: every call passes a ready-made c_ulong request and a ctypes buffer
# (by pointer) or c_ulong value, which ctypes hands over without a per-call conversion.
ioctl = _libc.ioctl
ioctl.restype = ctypes.c_int

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

_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_IOVEC_P = ctypes.POINTER(_Iovec)
_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _call in (_process_vm_readv, _process_vm_writev):
    _call.argtypes = (
        ctypes.c_int,
        _IOVEC_P,
        ctypes.c_ulong,
        _IOVEC_P,
        ctypes.c_ulong,
        ctypes.c_ulong,
    )
    _call.restype = ctypes.c_ssize_t

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
PROTECTIONS = {"none": PROT_NONE, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = U64_MAX  # (void *)-1 as ctypes returns it
MADV_DONTNEED = 4
# MAP_NORESERVE: like the model's host, which has no commit limit, a large writable region
# must not be refused by overcommit accounting; KVM never looks at it before a guest runs.
ANON_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE


def ioc(direction: int, nr: int, size: int) -> ctypes.c_ulong:
    """_IOC(dir, KVMIO, nr, size) of <asm-generic/ioctl.h> (dir 1 = write, 2 = read), as the
    C unsigned long that ioctl takes."""
    return ctypes.c_ulong((direction << 30) | (size << 16) | (0xAE << 8) | nr)


IOC_NONE, IOC_WRITE, IOC_READ, IOC_RW = 0, 1, 2, 3

IoctlArg = ctypes.c_ulong | ctypes.Array[ctypes.c_char]
_NO_ARG = ctypes.c_ulong(0)


def ioctl_errno(fd: int, request: ctypes.c_ulong, arg: IoctlArg = _NO_ARG) -> tuple[int, int]:
    """ioctl(fd, request, arg) -> (errno, result); arg is a value or a struct buffer."""
    result: int = ioctl(fd, request, arg)
    if result < 0:
        return ctypes.get_errno(), 0
    return 0, result


def mmap_anon(size: int, prot: int, address: int = 0, flags: int = 0) -> tuple[int, int]:
    """mmap(address or NULL, size, prot, private anonymous | flags): (errno, address).
    ``address`` is a hint unless ``flags`` has MAP_FIXED."""
    result = _mmap(address or None, size, prot, ANON_FLAGS | flags, -1, 0)
    if result is None or result == MAP_FAILED:
        return ctypes.get_errno() or errno.ENOMEM, 0
    return 0, result


def mmap_shared(fd: int, size: int, offset: int) -> tuple[int, int]:
    """mmap(NULL, size, read|write, MAP_SHARED, fd, offset): (errno, address)."""
    result = _mmap(None, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    if result is None or result == MAP_FAILED:
        return ctypes.get_errno() or errno.ENOMEM, 0
    return 0, result


def _errno_of(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


def munmap(address: int, length: int) -> int:
    return _errno_of(_munmap(address, length))


def mprotect(address: int, length: int, prot: int) -> int:
    return _errno_of(_mprotect(address, length, prot))


def madvise(address: int, length: int, advice: int) -> int:
    return _errno_of(_madvise(address, length, advice))


def copy_to_process(address: int, data: bytes) -> int:
    """Store ``data`` at ``address`` in this process, as a user store would, but reporting
    EFAULT where a store would raise SIGSEGV (no mapping, or one without write permission).

    process_vm_writev() on our own pid checks each page's protection like a user access (it
    does not force, as /proc/self/mem would). It copies page by page in address order; a
    partial copy is EFAULT, with the bytes before the bad page written, as a store that
    faults half way through a memcpy would leave them.
    """
    buffer = ctypes.create_string_buffer(data, len(data))
    local = _Iovec(ctypes.addressof(buffer), len(data))
    remote = _Iovec(address, len(data))
    done = _process_vm_writev(os.getpid(), local, 1, remote, 1, 0)
    if done < 0:
        return ctypes.get_errno()
    return 0 if done == len(data) else errno.EFAULT


def copy_from_process(address: int, size: int) -> tuple[int, bytes]:
    """Load ``size`` bytes at ``address`` in this process: (0, bytes), or (EFAULT, b"") where
    a load would raise SIGSEGV. The counterpart of :func:`copy_to_process`."""
    buffer = ctypes.create_string_buffer(size)
    local = _Iovec(ctypes.addressof(buffer), size)
    remote = _Iovec(address, size)
    done = _process_vm_readv(os.getpid(), local, 1, remote, 1, 0)
    if done < 0:
        return ctypes.get_errno(), b""
    if done != size:
        return errno.EFAULT, b""
    return 0, buffer.raw
