"""The harness's guest on the real KVM: one load or store per guest operation.

FINDINGS.md section 5.1 found that on this machine a 64-bit vCPU at CPL 3 runs natively on
KVM's shadow MMU, so its loads and stores take the real page-fault path: SPTEs, dirty-log
write protection, MMU notifiers, MMIO exits. (A CPL 0 guest would be emulated and bypass the
MMU.) This module puts vCPUs in that mode and runs one instruction per guest operation.

The guest's memory is the harness's private slot (:mod:`kvmspec.fuzz.guest_layout`):

=================  ======================================================================
PRIVATE_GPA        the code page: one stub per access (load or store of 1, 2, 4, 8 bytes),
                   and at +0x800 a TSS whose I/O bitmap lets CPL 3 use port 0x10
+ 0x1000           the PML4
+ 0x2000 ...       page-directory-pointer tables and page directories, handed out in order
=================  ======================================================================

Guest virtual addresses equal guest physical ones (below GPA_LIMIT, 2^47), mapped in 2 MiB
pages whose entries have U/S set and Accessed and Dirty preset, so KVM never writes them.
An entry is only ever added, never changed once present: KVM notices guest writes to the
page tables it shadows, but not writes through the host mapping (FINDINGS.md 5.6), so a
changed entry could leave the guest with a stale translation. Adding one is safe: a
not-present entry is never cached, and the fault that follows reads the new entry.

Each stub is ``<access> [rdi]; out 0x10, al; jmp $``. A guest operation loads RIP, RDI (the
address) and RAX (the value) with KVM_SET_REGS and calls KVM_RUN until the OUT exit. MMIO
exits on the way are recorded and answered with zeroes, and the vCPU is re-entered. Any
other ending (KVM_RUN failing with EFAULT, the dirty-ring-full exit) abandons the stub: the
next operation loads fresh registers, so the guest always continues.

Struct layouts and ioctl numbers: include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/
kvm.h (v6.18), checked on this machine in FINDINGS.md section 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading
from dataclasses import dataclass
from typing import Any

from kvmspec.fuzz.guest_layout import PRIVATE_GPA, PRIVATE_SIZE
from kvmspec.fuzz.ops import Observation
from kvmspec.fuzz.targets.syscalls import (
    IOC_NONE,
    IOC_READ,
    IOC_RW,
    IOC_WRITE,
    ioc,
    ioctl,
    ioctl_errno,
    mmap_shared,
    munmap,
)
from kvmspec.spec.uapi.constants import errno_name

# --------------------------------------------------------------------------- the uAPI

_REGS = struct.Struct("<18Q")  # struct kvm_regs: rax ... r15, rip, rflags
_RAX, _RDI, _RIP, _RFLAGS = 0, 5, 16, 17  # indexes in kvm_regs
_SEGMENT = struct.Struct("<QIHBBBBBBBBBx")  # struct kvm_segment
_SREGS_SIZE = 312  # struct kvm_sregs: cs ds es fs gs ss tr ldt, gdt idt, cr0 ...
_TR = 6 * _SEGMENT.size
_CR0, _CR3, _CR4, _EFER = 224, 240, 248, 264
_CPUID_HEADER = struct.Struct("<II")  # struct kvm_cpuid2: nent, padding; then the entries
_CPUID_ENTRY_SIZE = 40  # struct kvm_cpuid_entry2
_CPUID_MAX_ENTRIES = 256

KVM_GET_VCPU_MMAP_SIZE = ioc(IOC_NONE, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = ioc(IOC_RW, 0x05, _CPUID_HEADER.size)
KVM_RUN = ioc(IOC_NONE, 0x80, 0)
KVM_GET_REGS = ioc(IOC_READ, 0x81, _REGS.size)
KVM_SET_REGS = ioc(IOC_WRITE, 0x82, _REGS.size)
KVM_GET_SREGS = ioc(IOC_READ, 0x83, _SREGS_SIZE)
KVM_SET_SREGS = ioc(IOC_WRITE, 0x84, _SREGS_SIZE)
KVM_SET_CPUID2 = ioc(IOC_WRITE, 0x90, _CPUID_HEADER.size)
_NO_ARG = ctypes.c_ulong(0)

# struct kvm_run: exit_reason at 8, the exit's union at 32.
_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_AT, _EXIT_AT = 8, 32
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_MMIO_DATA_AT = _EXIT_AT + 8
KVM_EXIT_IO, KVM_EXIT_MMIO = 2, 6
EXIT_NAMES = {
    0: "unknown",
    1: "exception",
    5: "hlt",
    8: "shutdown",
    9: "fail_entry",
    17: "internal_error",
    31: "dirty_ring_full",
    38: "memory_fault",
}
"""How an access that ended with another exit reports it (``"exit"``). Of these only
dirty_ring_full is expected; any other is a finding."""

# The dirty ring is mapped from the vCPU fd at page KVM_DIRTY_LOG_PAGE_OFFSET (x86: 64).
DIRTY_RING_OFFSET = 64 * 4096
_DIRTY_GFN = struct.Struct("<IIQ")  # struct kvm_dirty_gfn: flags, slot, offset
KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET = 1, 2

# --------------------------------------------------------------------------- the guest

DONE_PORT = 0x10
_DONE = bytes((0xE6, DONE_PORT, 0xEB, 0xFE))  # out 0x10, al; jmp $
_CODE = {
    (True, 1): bytes((0x88, 0x07)),  # mov [rdi], al
    (True, 2): bytes((0x66, 0x89, 0x07)),  # mov [rdi], ax
    (True, 4): bytes((0x89, 0x07)),  # mov [rdi], eax
    (True, 8): bytes((0x48, 0x89, 0x07)),  # mov [rdi], rax
    (False, 1): bytes((0x8A, 0x07)),  # mov al, [rdi]
    (False, 2): bytes((0x66, 0x8B, 0x07)),  # mov ax, [rdi]
    (False, 4): bytes((0x8B, 0x07)),  # mov eax, [rdi]
    (False, 8): bytes((0x48, 0x8B, 0x07)),  # mov rax, [rdi]
}
STUBS = {key: 16 * index for index, key in enumerate(_CODE)}
"""(write, size) -> the offset of its stub in the code page."""

# A 64-bit TSS in the code page. At CPL 3, OUT consults its I/O permission bitmap, which
# starts right after the 104-byte TSS (the u16 at 0x66 says where); 8 zero bytes allow ports
# 0-63, and the segment limit ends there.
_TSS = 0x800
_TSS_IOMAP_BASE = 0x68
_TSS_LIMIT = _TSS_IOMAP_BASE + 8 - 1

_PML4 = 0x1000
_FIRST_TABLE = 0x2000
_P, _RW, _US, _A, _D, _PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
_TABLE_ENTRY = _P | _RW | _US | _A | _D
_LARGE_PAGE = _TABLE_ENTRY | _PS
_LARGE_SHIFT = 21

# The CPL 3 long-mode recipe of FINDINGS.md 5.1.
_CR0_VALUE = 0x80050033  # PG AM WP NE ET MP PE
_CR4_VALUE = 0x20  # PAE
_EFER_VALUE = 0x500  # LMA LME
_RFLAGS_VALUE = 0x202  # IF, and the always-one bit
_CODE_SEGMENT = (0x33, 11, 1, 0)  # selector, type (execute/read, accessed), l, db
_DATA_SEGMENT = (0x2B, 3, 0, 1)  # selector, type (read/write, accessed), l, db

WATCHDOG_SECONDS = 2.0
"""A stub takes microseconds; a KVM_RUN still running after this is interrupted (EINTR)."""


def _code_page() -> bytes:
    """The stubs and the TSS."""
    page = bytearray(4096)
    for key, offset in STUBS.items():
        code = _CODE[key] + _DONE
        page[offset : offset + len(code)] = code
    struct.pack_into("<H", page, _TSS + 0x66, _TSS_IOMAP_BASE)
    return bytes(page)


class GuestPageTables:
    """The guest's code and 4-level page tables in the private slot's memory at ``hva``,
    grown one 2 MiB page at a time. An entry, once written, is never changed."""

    def __init__(self, hva: int) -> None:
        self.hva = hva
        self._next_table = _FIRST_TABLE
        self._tables: dict[tuple[int, ...], int] = {(): _PML4}  # indexes -> offset
        self._mapped: set[int] = set()  # 2 MiB page numbers
        ctypes.memmove(hva, _code_page(), 4096)
        self.map(PRIVATE_GPA)

    def map(self, gpa: int) -> None:
        """Make the 2 MiB page holding ``gpa`` present, identity-mapped."""
        large = gpa >> _LARGE_SHIFT
        if large in self._mapped:
            return
        pml4_index, pdpt_index = (gpa >> 39) & 511, (gpa >> 30) & 511
        pdpt = self._table((pml4_index,), _PML4, pml4_index)
        directory = self._table((pml4_index, pdpt_index), pdpt, pdpt_index)
        self._write_entry(directory, large & 511, large << _LARGE_SHIFT | _LARGE_PAGE)
        self._mapped.add(large)

    def _table(self, path: tuple[int, ...], parent: int, index: int) -> int:
        """The table at ``path``; a new one is taken from the pool (fresh anonymous memory,
        so all zero: no entry present) and linked from entry ``index`` of ``parent``."""
        table = self._tables.get(path)
        if table is None:
            if self._next_table >= PRIVATE_SIZE:
                # The parser's MAX_GIGABYTES keeps a trace well below this.
                raise RuntimeError("the guest's page-table pool is exhausted")
            table = self._next_table
            self._next_table += 4096
            self._tables[path] = table
            self._write_entry(parent, index, (PRIVATE_GPA + table) | _TABLE_ENTRY)
        return table

    def _write_entry(self, table: int, index: int, value: int) -> None:
        ctypes.memmove(self.hva + table + 8 * index, struct.pack("<Q", value), 8)


@dataclass
class GuestVcpu:
    """A vCPU in 64-bit CPL 3: its fd, its kvm_run mapping and a register buffer."""

    fd: int
    run: int
    run_size: int
    regs: ctypes.Array[ctypes.c_char]

    def read_run(self, fmt: struct.Struct, offset: int) -> tuple[Any, ...]:
        """Unpack ``fmt`` at ``offset`` in kvm_run."""
        return fmt.unpack(ctypes.string_at(self.run + offset, fmt.size))


@dataclass
class _MmioExit:
    gpa: int
    length: int
    write: bool
    data: bytes


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGALRM only has to interrupt KVM_RUN (which then fails with EINTR)."""


class GuestRunner:
    """The guest of one VM: its page tables, and the vCPUs it runs on.

    ``device`` is the KVM device (for the system ioctls a vCPU needs); ``private_hva`` is
    the memory of the private slot, which the caller has already registered with the VM.
    """

    def __init__(self, device: str, private_hva: int) -> None:
        self.tables = GuestPageTables(private_hva)
        self.vcpus: dict[int, GuestVcpu] = {}
        self._cpuid = ctypes.create_string_buffer(
            _CPUID_HEADER.size + _CPUID_MAX_ENTRIES * _CPUID_ENTRY_SIZE
        )
        _CPUID_HEADER.pack_into(self._cpuid, 0, _CPUID_MAX_ENTRIES, 0)
        system_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            code, self._run_size = ioctl_errno(system_fd, KVM_GET_VCPU_MMAP_SIZE)
            _check(code, "KVM_GET_VCPU_MMAP_SIZE")
            code, _ = ioctl_errno(system_fd, KVM_GET_SUPPORTED_CPUID, self._cpuid)
            _check(code, "KVM_GET_SUPPORTED_CPUID")
        finally:
            os.close(system_fd)

    def close(self) -> None:
        """Unmap every kvm_run (the vCPU fds belong to the target)."""
        for vcpu in self.vcpus.values():
            munmap(vcpu.run, vcpu.run_size)
        self.vcpus.clear()

    def vcpu(self, vcpu_id: int, fd: int) -> GuestVcpu:
        """The vCPU ``vcpu_id`` (descriptor ``fd``), put in 64-bit CPL 3 on first use.
        Failures here are the machine's, not the trace's: they raise OSError."""
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is not None:
            return vcpu
        code, run = mmap_shared(fd, self._run_size, 0)
        _check(code, "mmap of kvm_run")
        vcpu = GuestVcpu(fd, run, self._run_size, ctypes.create_string_buffer(_REGS.size))
        self.vcpus[vcpu_id] = vcpu
        _check(ioctl_errno(fd, KVM_SET_CPUID2, self._cpuid)[0], "KVM_SET_CPUID2")
        sregs = ctypes.create_string_buffer(_SREGS_SIZE)
        _check(ioctl_errno(fd, KVM_GET_SREGS, sregs)[0], "KVM_GET_SREGS")
        # The CPL is the DPL of CS and SS; it can only be chosen before the first KVM_RUN.
        for index in range(6):  # cs, ds, es, fs, gs, ss
            selector, kind, long_mode, db = _CODE_SEGMENT if index == 0 else _DATA_SEGMENT
            # base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable
            segment = (0, 0xFFFFFFFF, selector, kind, 1, 3, db, 1, long_mode, 1, 0, 0)
            _SEGMENT.pack_into(sregs, index * _SEGMENT.size, *segment)
        tr = list(_SEGMENT.unpack_from(sregs, _TR))
        tr[0], tr[1] = PRIVATE_GPA + _TSS, _TSS_LIMIT
        _SEGMENT.pack_into(sregs, _TR, *tr)
        struct.pack_into("<Q", sregs, _CR0, _CR0_VALUE)
        struct.pack_into("<Q", sregs, _CR3, PRIVATE_GPA + _PML4)
        struct.pack_into("<Q", sregs, _CR4, _CR4_VALUE)
        struct.pack_into("<Q", sregs, _EFER, _EFER_VALUE)
        _check(ioctl_errno(fd, KVM_SET_SREGS, sregs)[0], "KVM_SET_SREGS")
        return vcpu

    def access(self, vcpu: GuestVcpu, gpa: int, size: int, value: int | None) -> Observation:
        """One guest load (``value`` None) or store of ``size`` bytes at ``gpa``: the
        observation of a guest operation (see docs/trace-format.md)."""
        self.tables.map(gpa)
        self.tables.map(gpa + size - 1)
        write = value is not None
        registers = [0] * 18
        registers[_RAX] = value or 0  # a load of fewer than 8 bytes keeps the rest zero
        registers[_RDI] = gpa  # guest virtual == guest physical
        registers[_RIP] = PRIVATE_GPA + STUBS[(write, size)]
        registers[_RFLAGS] = _RFLAGS_VALUE
        _REGS.pack_into(vcpu.regs, 0, *registers)
        code, _ = ioctl_errno(vcpu.fd, KVM_SET_REGS, vcpu.regs)
        if code:
            return {"errno": errno_name(code)}
        mmio: list[_MmioExit] = []
        while True:
            code = _run(vcpu)
            if code:
                return {"errno": errno_name(code)}
            (reason,) = vcpu.read_run(_EXIT_REASON, _EXIT_REASON_AT)
            if reason == KVM_EXIT_MMIO:
                mmio.append(_answer_mmio(vcpu))
                continue
            if reason == KVM_EXIT_IO and vcpu.read_run(_IO, _EXIT_AT)[2] == DONE_PORT:
                break
            return {"errno": 0, "exit": EXIT_NAMES.get(reason, str(reason))}
        if mmio:
            return _mmio_observation(mmio)
        if write:
            return {"errno": 0, "exit": "none"}
        code, _ = ioctl_errno(vcpu.fd, KVM_GET_REGS, vcpu.regs)
        if code:
            return {"errno": errno_name(code)}
        loaded: int = _REGS.unpack(vcpu.regs)[_RAX]
        return {"errno": 0, "exit": "none", "value": loaded & ((1 << (8 * size)) - 1)}


def _check(code: int, what: str) -> None:
    if code:
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _run(vcpu: GuestVcpu) -> int:
    """KVM_RUN once: its errno. A watchdog interrupts a run that does not come back (on the
    main thread only, where Python can take the signal)."""
    if threading.current_thread() is not threading.main_thread():
        result: int = ioctl(vcpu.fd, KVM_RUN, _NO_ARG)
        return ctypes.get_errno() if result < 0 else 0
    previous = signal.signal(signal.SIGALRM, _ignore_signal)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
    try:
        result = ioctl(vcpu.fd, KVM_RUN, _NO_ARG)
        return ctypes.get_errno() if result < 0 else 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _answer_mmio(vcpu: GuestVcpu) -> _MmioExit:
    """Record an MMIO exit. A load is answered with zeroes: the VMM fills kvm_run's
    mmio.data, which the next KVM_RUN hands to the guest."""
    gpa, data, length, is_write = vcpu.read_run(_MMIO, _EXIT_AT)
    if not is_write:
        ctypes.memset(vcpu.run + _MMIO_DATA_AT, 0, 8)
    return _MmioExit(gpa, length, bool(is_write), bytes(data[:length]) if is_write else b"")


def _mmio_observation(exits: list[_MmioExit]) -> Observation:
    """The MMIO part of one access. The kernel emulates the instruction and exits once per
    page fragment (at most 8 bytes each); the fragments of one access are contiguous, so
    they are reported as one range. A load's ``data`` is empty: the data went in."""
    return {
        "errno": 0,
        "exit": "mmio",
        "gpa": exits[0].gpa,
        "len": sum(e.length for e in exits),
        "write": exits[0].write,
        "data": b"".join(e.data for e in exits).hex(),
    }


class DirtyRingReader:
    """A vCPU's dirty ring as a VMM reads it: mapped from the vCPU fd, entries read in order.

    kernel: virt/kvm/dirty_ring.c (the entry protocol), Documentation/virt/kvm/api.rst
    "KVM_CAP_DIRTY_LOG_RING" (v6.18)
    """

    def __init__(self, fd: int, ring_bytes: int) -> None:
        self.entries = ring_bytes // _DIRTY_GFN.size
        code, self.address = mmap_shared(fd, ring_bytes, DIRTY_RING_OFFSET)
        _check(code, "mmap of the dirty ring")
        self.next = 0  # the next entry to look at

    def close(self) -> None:
        munmap(self.address, self.entries * _DIRTY_GFN.size)

    def harvest(self) -> list[list[int]]:
        """Every entry the kernel published (flags DIRTY) since the last harvest, as
        [slot, offset]; each is flagged RESET, for KVM_RESET_DIRTY_RINGS to consume."""
        taken: list[list[int]] = []
        while True:
            address = self.address + (self.next % self.entries) * _DIRTY_GFN.size
            flags, slot, offset = _DIRTY_GFN.unpack(ctypes.string_at(address, _DIRTY_GFN.size))
            if not flags & KVM_DIRTY_GFN_F_DIRTY:
                return taken
            taken.append([slot, offset])
            ctypes.memmove(address, struct.pack("<I", KVM_DIRTY_GFN_F_RESET), 4)
            self.next += 1
