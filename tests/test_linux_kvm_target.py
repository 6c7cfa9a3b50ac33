"""The linux-kvm target: it reports what this machine's KVM does, in the reference's words.

The differential rows replay the measurements of
shared/kvm-reference/linux-kvm-here/FINDINGS.md (sections 3, 4 and 6) on both targets: each
row's observations must be identical, and its last one must be what FINDINGS.md recorded.
Tests that need /dev/kvm are marked ``kvm`` and skip, with the reason, where it cannot be
opened.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence

import pytest

from kvmspec.fuzz.ops import (
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
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.fuzz.targets.linux_kvm import LinuxKvmTarget
from kvmspec.fuzz.targets.reference import ReferenceTarget
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE
from kvmspec.spec.uapi.constants import CAPABILITIES

PG = 4096
LOG, RO, GMEM = 1, 2, 4
U64 = 1 << 64
TOP52 = 1 << 52
ALL_ONES = U64 - 1
HOST = RegionAddr("host")
KERNEL_HVA = 0xFFFF888000000000
MANUAL = "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
RING = "KVM_CAP_DIRTY_LOG_RING"
RING_ACQ_REL = "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"


def at(offset: int) -> RegionAddr:
    return RegionAddr("host", offset)


def region(
    slot: int, gpa: int, size: int, hva: RegionAddr | int = HOST, flags: int = 0
) -> SetUserMemoryRegion:
    return SetUserMemoryRegion(slot, flags, gpa, size, hva)


def region2(
    slot: int,
    gpa: int,
    size: int,
    hva: RegionAddr | int = HOST,
    flags: int = GMEM,
    gmem: str | int = "g",
    offset: int = 0,
) -> SetUserMemoryRegion2:
    return SetUserMemoryRegion2(slot, flags, gpa, size, hva, gmem, offset)


def delete(slot: int) -> SetUserMemoryRegion:
    return region(slot, 0, 0, 0)


def ok(**extra: object) -> Observation:
    return {"errno": 0, **extra}


def err(name: str) -> Observation:
    return {"errno": name}


def open_kvm() -> LinuxKvmTarget:
    """A fresh linux-kvm target, or a skip that says why there is none."""
    try:
        return LinuxKvmTarget(DEFAULT_PROFILE)
    except TargetUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def kvm_target() -> Iterator[LinuxKvmTarget]:
    target = open_kvm()
    try:
        yield target
    finally:
        target.close()


def both(ops: Sequence[Operation]) -> tuple[list[Observation], list[Observation]]:
    """Apply ``ops`` to a fresh reference and a fresh linux-kvm target: (model, kernel)."""
    kernel_target = open_kvm()
    model_target = ReferenceTarget(DEFAULT_PROFILE)
    try:
        model = [model_target.apply(op) for op in ops]
        kernel = [kernel_target.apply(op) for op in ops]
    finally:
        kernel_target.close()
        model_target.close()
    return model, kernel


# --------------------------------------------------------------------------- rows

SETUP: list[Operation] = [Mmap("host", 64 << 20)]
BASE = region(0, 0x100000, 16 * PG)  # FINDINGS.md section 3: slot 0, 16 pages at 1 MiB
SLOT1 = region(1, 0x200000, 16 * PG, at(0x100000))

Row = tuple[str, list[Operation], Observation]

MEMSLOT_ROWS: list[Row] = [
    ("create BASE", [BASE], ok()),
    ("overlap", [BASE, region(1, 0x108000, 16 * PG, at(0x100000))], err("EEXIST")),
    ("containing", [BASE, region(1, 0, 2 << 20, at(0x200000))], err("EEXIST")),
    ("adjacent", [BASE, region(1, 0x110000, 16 * PG, at(0x100000))], ok()),
    ("aliasing hva", [BASE, region(1, 0x200000, 16 * PG)], ok()),
    ("identical re-submit", [BASE, BASE], ok()),
    ("grow", [BASE, region(0, 0x100000, 32 * PG)], err("EINVAL")),
    ("shrink", [BASE, region(0, 0x100000, 8 * PG)], err("EINVAL")),
    ("change hva", [BASE, region(0, 0x100000, 16 * PG, at(PG))], err("EINVAL")),
    ("MOVE", [BASE, region(0, 0x200000, 16 * PG)], ok()),
    ("MOVE by one page", [BASE, region(0, 0x101000, 16 * PG)], ok()),
    ("MOVE onto slot 1", [BASE, SLOT1, region(0, 0x208000, 16 * PG)], err("EEXIST")),
    ("LOG on", [BASE, region(0, 0x100000, 16 * PG, flags=LOG)], ok()),
    ("LOG off", [region(0, 0x100000, 16 * PG, flags=LOG), BASE], ok()),
    ("MOVE and LOG on", [BASE, region(0, 0x200000, 16 * PG, flags=LOG)], ok()),
    ("READONLY on", [BASE, region(0, 0x100000, 16 * PG, flags=RO)], err("EINVAL")),
    ("READONLY off", [region(0, 0x100000, 16 * PG, flags=RO), BASE], err("EINVAL")),
    ("create READONLY|LOG", [region(0, 0x100000, 16 * PG, flags=RO | LOG)], ok()),
    ("delete, same gpa/hva", [BASE, region(0, 0x100000, 0)], ok()),
    ("delete, gpa=hva=0", [BASE, delete(0)], ok()),
    ("delete, other gpa, LOG", [BASE, region(0, 0x5000000, 0, at(PG), LOG)], ok()),
    ("delete, flag bit 5", [BASE, region(0, 0x100000, 0, flags=1 << 5)], err("EINVAL")),
    ("delete, unaligned gpa", [BASE, region(0, 0x100800, 0)], err("EINVAL")),
    ("delete, unaligned hva", [BASE, region(0, 0x100000, 0, at(0x800))], err("EINVAL")),
    ("delete missing slot", [BASE, delete(5)], err("EINVAL")),
    ("delete twice", [BASE, delete(0), delete(0)], err("EINVAL")),
    ("re-create elsewhere", [BASE, delete(0), region(0, 0x300000, 16 * PG, at(PG))], ok()),
    ("unaligned gpa", [region(0, 0x100800, 16 * PG)], err("EINVAL")),
    ("unaligned size", [region(0, 0x100000, 16 * PG + 0x800)], err("EINVAL")),
    ("unaligned hva", [region(0, 0x100000, 16 * PG, at(0x800))], err("EINVAL")),
    ("size 0, new slot", [region(0, 0x100000, 0)], err("EINVAL")),
    ("gpa 0", [region(0, 0, PG)], ok()),
    ("slot 32763", [region(32763, 0x100000, PG)], ok()),
    ("slot 32764", [region(32764, 0x100000, PG)], err("EINVAL")),
    ("slot 32767", [region(32767, 0x100000, PG)], err("EINVAL")),
    ("slot 65535", [region(65535, 0x100000, PG)], err("EINVAL")),
    ("as_id 1", [region(0x10000, 0x100000, PG)], err("EINVAL")),
    ("as_id 0xffff", [region(0xFFFF0000, 0x100000, PG)], err("EINVAL")),
    ("GUEST_MEMFD through v1", [region(0, 0x100000, PG, flags=GMEM)], err("EINVAL")),
    ("flag bit 3", [region(0, 0x100000, PG, flags=1 << 3)], err("EINVAL")),
    ("flag bit 16", [region(0, 0x100000, PG, flags=1 << 16)], err("EINVAL")),
    ("flag bit 31", [region(0, 0x100000, PG, flags=1 << 31)], err("EINVAL")),
    ("gpa+size wraps", [region(0, U64 - PG, 2 * PG)], err("EINVAL")),
    ("ends at 2^64", [region(0, U64 - PG, PG)], err("EINVAL")),
    ("gpa 2^48", [region(0, 1 << 48, PG)], ok()),
    ("last 52-bit gfn", [region(0, TOP52 - PG, PG)], ok()),
    ("crosses 2^52", [region(0, TOP52 - PG, 2 * PG)], err("EINVAL")),
    ("gpa 2^52", [region(0, TOP52, PG)], err("EINVAL")),
    ("gpa 2^63", [region(0, 1 << 63, PG)], err("EINVAL")),
    ("hva 0", [region(0, 0x100000, PG, 0)], ok()),
    (
        "hva PROT_NONE",
        [Mmap("none", 1 << 20, "none"), region(0, 0x100000, 16 * PG, RegionAddr("none"))],
        ok(),
    ),
    ("last user page", [region(0, 0x100000, PG, 0x7FFFFFFFE000)], ok()),
    ("hva TASK_SIZE_MAX", [region(0, 0x100000, PG, 0x7FFFFFFFF000)], err("EINVAL")),
    (
        "hva range crosses TASK_SIZE_MAX",
        [region(0, 0x100000, 2 * PG, 0x7FFFFFFFE000)],
        err("EINVAL"),
    ),
    ("kernel hva", [region(0, 0x100000, PG, KERNEL_HVA)], err("EINVAL")),
    ("non-canonical hva", [region(0, 0x100000, PG, 0x800000000000)], err("EINVAL")),
    ("hva 2^63", [region(0, 0x100000, PG, 1 << 63)], err("EINVAL")),
    ("hva bit 62", [region(0, 0x100000, PG, at(1 << 62))], err("EINVAL")),
    ("1 GiB", [region(0, 1 << 32, 1 << 30)], ok()),
    ("64 GiB", [region(0, 1 << 40, 64 << 30, 0x100000000000)], ok()),
    ("2^31 pages", [region(0, 1 << 44, (1 << 31) * PG, 0x100000000000)], err("EINVAL")),
    ("2^44 bytes", [region(0, 1 << 44, 1 << 44, 0x100000000000)], err("EINVAL")),
    ("2^47 bytes", [region(0, 1 << 44, 1 << 47, PG)], err("EINVAL")),
    # Which errno wins when an input has two faults.
    ("overlap + unaligned gpa", [BASE, region(1, 0x108800, 16 * PG)], err("EINVAL")),
    ("overlap + unaligned hva", [BASE, region(1, 0x108000, 16 * PG, at(0x800))], err("EINVAL")),
    ("overlap + bad flag", [BASE, region(1, 0x108000, 16 * PG, flags=1 << 3)], err("EINVAL")),
    ("overlap + slot 32764", [BASE, region(32764, 0x108000, 16 * PG)], err("EINVAL")),
    ("overlap + as_id 1", [BASE, region(0x10001, 0x108000, 16 * PG)], err("EINVAL")),
    ("overlap + kernel hva", [BASE, region(1, 0x108000, 16 * PG, KERNEL_HVA)], err("EINVAL")),
    (
        "grow into slot 1",
        [BASE, region(1, 0x110000, 16 * PG, at(0x100000)), region(0, 0x100000, 32 * PG)],
        err("EINVAL"),
    ),
    ("MOVE + READONLY", [BASE, region(0, 0x200000, 16 * PG, flags=RO)], err("EINVAL")),
    (
        "overlap + beyond 2^52",
        [region(1, TOP52 - 2 * PG, PG), region(2, TOP52 - 2 * PG, 4 * PG)],
        err("EEXIST"),
    ),
    (
        "MOVE onto slot 1 + beyond 2^52",
        [BASE, region(1, TOP52 - 2 * PG, PG), region(0, TOP52 - 2 * PG, 16 * PG)],
        err("EEXIST"),
    ),
    ("delete missing + unaligned hva", [region(5, 0, 0, at(0x800))], err("EINVAL")),
    # The kernel packs mappings; the end of one region must still not be another's start.
    # (Traces can no longer say this, but an Operation built in code can.)
    (
        "past the end of a region is not the next one",
        [
            Mmap("r0", PG),
            Mmap("r1", PG),
            region(0, 0, PG, RegionAddr("r0")),
            region(0, 0, PG, RegionAddr("r1", PG), LOG),
        ],
        err("EINVAL"),
    ),
]

LOG100 = region(0, 0x100000, 100 * PG, flags=LOG)
TAIL = (1 << 36) - 1  # bits of pages 64..99

DIRTY_ROWS: list[Row] = [
    ("GET, fresh LOG slot", [LOG100, GetDirtyLog(0)], ok(bitmap=[0, 0])),
    (
        "GET, 16-page slot",
        [region(0, 0x100000, 16 * PG, flags=LOG), GetDirtyLog(0)],
        ok(bitmap=[0]),
    ),
    ("GET, no LOG", [BASE, GetDirtyLog(0)], err("ENOENT")),
    ("GET, missing slot", [GetDirtyLog(7)], err("ENOENT")),
    ("GET, slot 32764", [GetDirtyLog(32764)], err("EINVAL")),
    ("GET, as_id 1", [LOG100, GetDirtyLog(0x10000)], err("EINVAL")),
    ("GET after delete", [LOG100, delete(0), GetDirtyLog(0)], err("ENOENT")),
    ("GET after LOG off", [LOG100, region(0, 0x100000, 100 * PG), GetDirtyLog(0)], err("ENOENT")),
    ("CLEAR without manual protect", [LOG100, ClearDirtyLog(0, 0, 100, (ALL_ONES,) * 2)], ok()),
    ("CLEAR, no LOG", [BASE, ClearDirtyLog(0, 0, 16)], err("ENOENT")),
    ("CLEAR, missing slot", [ClearDirtyLog(3, 0, 64)], err("ENOENT")),
    ("CLEAR, slot 32764", [ClearDirtyLog(32764, 0, 64)], err("EINVAL")),
    ("CLEAR, as_id 1", [LOG100, ClearDirtyLog(0x10000, 0, 64)], err("EINVAL")),
    ("manual protect 0", [EnableCap(MANUAL, (0,))], ok()),
    ("manual protect 1", [EnableCap(MANUAL, (1,))], ok()),
    ("manual protect 3", [EnableCap(MANUAL, (3,))], ok()),
    ("manual protect 2", [EnableCap(MANUAL, (2,))], err("EINVAL")),
    ("manual protect 4", [EnableCap(MANUAL, (4,))], err("EINVAL")),
    ("manual protect flags 1", [EnableCap(MANUAL, (1,), flags=1)], err("EINVAL")),
    ("manual protect after LOG slot", [LOG100, EnableCap(MANUAL, (1,))], ok()),
    ("manual protect changed", [EnableCap(MANUAL, (1,)), EnableCap(MANUAL, (3,))], ok()),
    ("manual protect after vCPU", [CreateVcpu(0), EnableCap(MANUAL, (3,))], ok()),
    (
        "INITIALLY_SET",
        [EnableCap(MANUAL, (3,)), LOG100, GetDirtyLog(0)],
        ok(bitmap=[ALL_ONES, TAIL]),
    ),
]

INITIALLY_SET = [EnableCap(MANUAL, (3,)), LOG100]


def clear_row(name: str, clear: ClearDirtyLog, expect: Observation) -> Row:
    return (name, [*INITIALLY_SET, clear, GetDirtyLog(0)], expect)


DIRTY_ROWS += [
    clear_row("CLEAR 0,64", ClearDirtyLog(0, 0, 64, (ALL_ONES,)), ok(bitmap=[0, TAIL])),
    clear_row("CLEAR 0,100", ClearDirtyLog(0, 0, 100, (ALL_ONES,) * 2), ok(bitmap=[0, 0])),
    clear_row("CLEAR 64,36", ClearDirtyLog(0, 64, 36, (ALL_ONES,)), ok(bitmap=[ALL_ONES, 0])),
    clear_row("CLEAR 0,0", ClearDirtyLog(0, 0, 0, ()), ok(bitmap=[ALL_ONES, TAIL])),
    clear_row(
        "CLEAR with a mask",
        ClearDirtyLog(0, 0, 100, (0x5555555555555555,) * 2),
        ok(bitmap=[ALL_ONES ^ 0x5555555555555555, TAIL ^ (0x5555555555555555 & TAIL)]),
    ),
    clear_row(
        "CLEAR, missing words are 0",
        ClearDirtyLog(0, 0, 100, (1,)),
        ok(bitmap=[ALL_ONES - 1, TAIL]),
    ),
    ("CLEAR first_page 1", [*INITIALLY_SET, ClearDirtyLog(0, 1, 63, (ALL_ONES,))], err("EINVAL")),
    ("CLEAR 0,1", [*INITIALLY_SET, ClearDirtyLog(0, 0, 1, (1,))], err("EINVAL")),
    ("CLEAR 64,64", [*INITIALLY_SET, ClearDirtyLog(0, 64, 64, (ALL_ONES,))], err("EINVAL")),
    ("CLEAR 128,0", [*INITIALLY_SET, ClearDirtyLog(0, 128, 0)], err("EINVAL")),
    ("CLEAR 0,101", [*INITIALLY_SET, ClearDirtyLog(0, 0, 101, (ALL_ONES,) * 2)], err("EINVAL")),
    ("CLEAR 0,128", [*INITIALLY_SET, ClearDirtyLog(0, 0, 128, (ALL_ONES,) * 2)], err("EINVAL")),
    ("CLEAR 0,2^32-1", [*INITIALLY_SET, ClearDirtyLog(0, 0, (1 << 32) - 1)], err("EINVAL")),
    (
        "INITIALLY_SET, LOG on later",
        [EnableCap(MANUAL, (3,)), region(0, 0x100000, 100 * PG), LOG100, GetDirtyLog(0)],
        ok(bitmap=[ALL_ONES, TAIL]),
    ),
    (
        "MOVE keeps the bitmap",
        [
            *INITIALLY_SET,
            ClearDirtyLog(0, 0, 64, (ALL_ONES,)),
            region(0, 0x800000, 100 * PG, flags=LOG),
            GetDirtyLog(0),
        ],
        ok(bitmap=[0, TAIL]),
    ),
    (
        "LOG off and on reallocates",
        [
            *INITIALLY_SET,
            ClearDirtyLog(0, 0, 64, (ALL_ONES,)),
            region(0, 0x100000, 100 * PG),
            LOG100,
            GetDirtyLog(0),
        ],
        ok(bitmap=[ALL_ONES, TAIL]),
    ),
    ("ring 4096", [EnableCap(RING, (4096,))], ok()),
    ("ring 65536", [EnableCap(RING, (65536,))], ok()),
    ("ring 1 MiB", [EnableCap(RING, (1 << 20,))], ok()),
    ("ACQ_REL ring 4096", [EnableCap(RING_ACQ_REL, (4096,))], ok()),
    ("ring 0", [EnableCap(RING, (0,))], err("EINVAL")),
    ("ring 16", [EnableCap(RING, (16,))], err("EINVAL")),
    ("ring 2048", [EnableCap(RING, (2048,))], err("EINVAL")),
    ("ring 4112", [EnableCap(RING, (4112,))], err("EINVAL")),
    ("ring 2 MiB", [EnableCap(RING, (2 << 20,))], err("E2BIG")),
    ("ring twice", [EnableCap(RING, (4096,)), EnableCap(RING, (4096,))], err("EINVAL")),
    (
        "ring then ACQ_REL",
        [EnableCap(RING, (4096,)), EnableCap(RING_ACQ_REL, (4096,))],
        err("EINVAL"),
    ),
    ("ring after vCPU", [CreateVcpu(0), EnableCap(RING, (4096,))], err("EINVAL")),
    ("ring after LOG slot", [LOG100, EnableCap(RING, (4096,))], ok()),
    ("GET with a ring", [LOG100, EnableCap(RING, (4096,)), GetDirtyLog(0)], err("ENXIO")),
    (
        "CLEAR with a ring",
        [LOG100, EnableCap(RING, (4096,)), ClearDirtyLog(0, 0, 64)],
        err("ENXIO"),
    ),
    ("reset without a ring", [ResetDirtyRings()], err("EINVAL")),
    ("reset with a ring", [EnableCap(RING, (4096,)), ResetDirtyRings()], ok(result=0)),
    (
        "reset with a ring and vCPUs",
        [EnableCap(RING, (4096,)), CreateVcpu(0), CreateVcpu(1), ResetDirtyRings()],
        ok(result=0),
    ),
    ("create vCPU", [CreateVcpu(0)], ok()),
    ("duplicate vCPU id", [CreateVcpu(3), CreateVcpu(3)], err("EEXIST")),
    ("vCPU id 4096", [CreateVcpu(4096)], err("EINVAL")),
    ("vCPU id 4095", [CreateVcpu(4095)], ok()),
]

GMEM_2M = CreateGuestMemfd("g", 2 << 20)
BOUND = [GMEM_2M, region2(4, 0x400000, 2 << 20)]

GMEM_ROWS: list[Row] = [
    ("create flags 0", [CreateGuestMemfd("g", 2 << 20, 0)], ok()),
    ("create flags MMAP", [CreateGuestMemfd("g", 2 << 20, 1)], ok()),
    ("create flags INIT_SHARED", [CreateGuestMemfd("g", 2 << 20, 2)], ok()),
    ("create flags 3", [CreateGuestMemfd("g", 2 << 20, 3)], ok()),
    ("create flags 4", [CreateGuestMemfd("g", 2 << 20, 4)], err("EINVAL")),
    ("create flags bit 63", [CreateGuestMemfd("g", 2 << 20, 1 << 63)], err("EINVAL")),
    ("create size 0", [CreateGuestMemfd("g", 0, 1)], err("EINVAL")),
    ("create size 100", [CreateGuestMemfd("g", 100, 1)], err("EINVAL")),
    ("create 1 TiB", [CreateGuestMemfd("g", 1 << 40, 1)], ok()),
    ("REGION2, plain slot", [region2(0, 0x100000, 16 * PG, flags=0, gmem=0)], ok()),
    (
        "REGION2, plain slot overlap",
        [BASE, region2(1, 0x108000, 16 * PG, flags=0, gmem=0)],
        err("EEXIST"),
    ),
    ("bind", BOUND, ok()),
    (
        "bind a flags-0 gmem",
        [CreateGuestMemfd("g", 2 << 20, 0), region2(4, 0x400000, 2 << 20)],
        ok(),
    ),
    ("bind with hva 0", [GMEM_2M, region2(4, 0x400000, 2 << 20, 0)], ok()),
    ("bind with a kernel hva", [GMEM_2M, region2(4, 0x400000, 2 << 20, KERNEL_HVA)], err("EINVAL")),
    ("range already bound", [*BOUND, region2(5, 0x800000, 2 << 20)], err("EINVAL")),
    (
        "half range already bound",
        [*BOUND, region2(5, 0x800000, 1 << 20, offset=1 << 20)],
        err("EINVAL"),
    ),
    ("unaligned offset", [GMEM_2M, region2(4, 0x400000, 1 << 20, offset=0x800)], err("EINVAL")),
    ("offset+size > file", [GMEM_2M, region2(4, 0x400000, 2 << 20, offset=PG)], err("EINVAL")),
    ("GUEST_MEMFD|LOG", [GMEM_2M, region2(4, 0x400000, 2 << 20, flags=GMEM | LOG)], err("EINVAL")),
    (
        "GUEST_MEMFD|READONLY",
        [GMEM_2M, region2(4, 0x400000, 2 << 20, flags=GMEM | RO)],
        err("EINVAL"),
    ),
    ("fd not open", [region2(4, 0x400000, 2 << 20, gmem=9999)], err("EBADF")),
    ("fd 0 stands for a closed fd", [region2(4, 0x400000, 2 << 20, gmem=0)], err("EBADF")),
    ("failed gmem name", [CreateGuestMemfd("g", 100), region2(4, 0x400000, 2 << 20)], err("EBADF")),
    (
        "gmem overlap",
        [*BOUND, CreateGuestMemfd("h", 2 << 20), region2(5, 0x400000, 2 << 20, gmem="h")],
        err("EEXIST"),
    ),
    ("bad fd + overlap", [*BOUND, region2(5, 0x400000, 2 << 20, gmem=9999)], err("EEXIST")),
    ("bad fd + unaligned gpa", [region2(5, 0x400800, 2 << 20, gmem=9999)], err("EINVAL")),
    ("gmem slot MOVE", [*BOUND, region2(4, 0x800000, 2 << 20)], err("EINVAL")),
    ("gmem slot flags-only", [*BOUND, region2(4, 0x400000, 2 << 20, flags=0)], err("EINVAL")),
    ("gmem slot identical re-set", [*BOUND, region2(4, 0x400000, 2 << 20)], err("EINVAL")),
    ("gmem slot delete", [*BOUND, delete(4)], ok()),
    (
        "delete through REGION2, GUEST_MEMFD, fd not open",
        [LOG100, region2(0, 0, 0, 0, gmem=9999)],
        ok(),
    ),
    ("re-bind after delete", [*BOUND, delete(4), region2(4, 0x400000, 2 << 20)], ok()),
    (
        "plain slot made gmem",
        [GMEM_2M, region(1, 0x400000, 2 << 20), region2(1, 0x400000, 2 << 20)],
        err("EINVAL"),
    ),
    ("gmem slot GET_DIRTY_LOG", [*BOUND, GetDirtyLog(4)], err("ENOENT")),
]

CAP_ROWS: list[Row] = [(name, [CheckExtension(name)], {}) for name in sorted(CAPABILITIES)]

# Rows where the reference disagrees with this machine's kernel (id -> the reason); each is
# an xfail(strict=True) until the model is fixed. None on Linux 6.18 here.
DIVERGENT: dict[str, str] = {}

ROWS = [
    pytest.param(
        name,
        ops,
        expect,
        id=name,
        marks=[pytest.mark.xfail(strict=True, reason=DIVERGENT[name])] if name in DIVERGENT else [],
    )
    for name, ops, expect in MEMSLOT_ROWS + DIRTY_ROWS + GMEM_ROWS + CAP_ROWS
]


@pytest.mark.kvm
@pytest.mark.parametrize(("name", "ops", "expect"), ROWS)
def test_reference_and_kernel_agree(name: str, ops: list[Operation], expect: Observation) -> None:
    model, kernel = both([*SETUP, *ops])
    assert model == kernel, name
    if expect:
        assert kernel[-1] == expect, f"{name}: FINDINGS.md recorded {expect}"


@pytest.mark.kvm
def test_check_extension_answers_every_capability(kvm_target: LinuxKvmTarget) -> None:
    for name in CAPABILITIES:
        observation = kvm_target.apply(CheckExtension(name))
        assert observation["errno"] == 0 and observation["result"] >= 0, name
    nr_memslots = DEFAULT_PROFILE.user_mem_slots
    assert kvm_target.apply(CheckExtension("KVM_CAP_NR_MEMSLOTS")) == ok(result=nr_memslots)


# --------------------------------------------------------------------------- availability


def test_missing_device_is_unavailable_with_the_reason() -> None:
    with pytest.raises(TargetUnavailable) as raised:
        LinuxKvmTarget(DEFAULT_PROFILE, device="/nonexistent")
    assert str(raised.value) == "/nonexistent: No such file or directory"


def test_a_device_that_is_not_kvm_is_unavailable() -> None:
    with pytest.raises(TargetUnavailable, match=r"^/dev/null: KVM_GET_API_VERSION: "):
        LinuxKvmTarget(DEFAULT_PROFILE, device="/dev/null")


def test_a_profile_of_another_architecture_is_unavailable() -> None:
    with pytest.raises(TargetUnavailable, match="arm64"):
        LinuxKvmTarget(ARM64)


def test_unavailable_targets_leave_no_descriptor_open() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for device in ("/nonexistent", "/dev/null"):
        with pytest.raises(TargetUnavailable):
            LinuxKvmTarget(DEFAULT_PROFILE, device=device)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.kvm
def test_make_target_builds_it() -> None:
    try:
        target = make_target("linux-kvm", DEFAULT_PROFILE)
    except TargetUnavailable as exc:
        pytest.skip(str(exc))
    try:
        assert target.name == "linux-kvm"
        assert target.apply(CheckExtension("KVM_CAP_USER_MEMORY")) == ok(result=1)
    finally:
        target.close()


# --------------------------------------------------------------------------- resources


@pytest.mark.kvm
def test_close_is_idempotent_and_final(kvm_target: LinuxKvmTarget) -> None:
    kvm_target.apply(Mmap("host", 1 << 20))
    kvm_target.close()
    kvm_target.close()
    with pytest.raises(ValueError, match="closed"):
        kvm_target.apply(CheckExtension("KVM_CAP_USER_MEMORY"))


@pytest.mark.kvm
def test_close_unmaps_every_region(kvm_target: LinuxKvmTarget) -> None:
    for name, prot in (("a", "rw"), ("b", "r"), ("c", "none")):
        assert kvm_target.apply(Mmap(name, 3 << 20, prot)) == ok()
    starts = [kvm_target.resolve(RegionAddr(name)) for name in "abc"]
    kvm_target.close()
    with open("/proc/self/maps") as maps:
        mapped = {int(line.split("-", 1)[0], 16) for line in maps}
    assert not mapped.intersection(starts)


def _random_ops(rng: random.Random, count: int) -> list[Operation]:
    """A VMM's worth of every operation kind, some failing, on 16 slots in 4 MiB of guest."""
    ops: list[Operation] = [Mmap("host", 4 << 20), CreateGuestMemfd("g", 2 << 20)]
    while len(ops) < count:
        slot = rng.randrange(16)
        gpa = rng.randrange(1024) * PG
        size = rng.choice((0, PG, 4 * PG, 64 * PG))
        kind = rng.randrange(12)
        if kind < 5:
            hva = at(rng.randrange(512) * PG)
            ops.append(region(slot, gpa, size, hva, rng.choice((0, LOG, RO, LOG | RO))))
        elif kind == 5:
            gmem = rng.choice(("g", "g2", 12345))
            ops.append(region2(slot, gpa, size, at(0), gmem=gmem, offset=rng.choice((0, PG))))
        elif kind == 6:
            ops.append(GetDirtyLog(slot))
        elif kind == 7:
            ops.append(ClearDirtyLog(slot, 0, rng.choice((0, 4, 64)), (ALL_ONES,)))
        elif kind == 8:
            ops.append(rng.choice((CreateGuestMemfd("g2", 1 << 20), Mmap("m", 1 << 20))))
        elif kind == 9:
            ops.append(CreateVcpu(rng.randrange(4)))
        elif kind == 10:
            ops.append(
                rng.choice((EnableCap(MANUAL, (rng.randrange(4),)), EnableCap(RING, (4096,))))
            )
        else:
            ops.append(rng.choice((ResetDirtyRings(), CheckExtension("KVM_CAP_NR_MEMSLOTS"))))
    return ops


@pytest.mark.kvm
def test_ten_thousand_operations_leave_the_descriptor_count_unchanged() -> None:
    open_kvm().close()  # skip early where there is no KVM
    rng = random.Random(20261121)
    before = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    applied = 0
    for _ in range(50):
        target = open_kvm()
        try:
            for op in _random_ops(rng, 200):
                observation = target.apply(op)
                assert "errno" in observation
                applied += 1
        finally:
            target.close()
    assert applied == 10_000
    assert len(os.listdir("/proc/self/fd")) == before
    assert time.monotonic() - started < 20


# --------------------------------------------------------------------------- probes and guards


@pytest.mark.kvm
def test_covered_probe(kvm_target: LinuxKvmTarget) -> None:
    kvm_target.apply(Mmap("host", 1 << 20))
    assert kvm_target.apply(BASE) == ok()
    assert kvm_target.covered(0x100000)
    assert kvm_target.covered(0x10F123)
    assert not kvm_target.covered(0x110000)
    assert not kvm_target.covered(0xFF000)
    # The probe slot is gone again: the ranges it tried are still free.
    assert kvm_target.apply(region(1, 0x110000, PG)) == ok()
    assert kvm_target.apply(region(0, 0x200000, 16 * PG)) == ok()  # MOVE
    assert not kvm_target.covered(0x100000)
    assert kvm_target.covered(0x20F000)
    with pytest.raises(OSError):
        kvm_target.covered(U64 - PG)  # a slot there would wrap


@pytest.mark.kvm
def test_dirty_bitmap_bytes_probe(kvm_target: LinuxKvmTarget) -> None:
    kvm_target.apply(Mmap("host", 8 << 20))
    kvm_target.apply(EnableCap(MANUAL, (3,)))  # every bit set: a word can equal the pattern
    for slot, npages, expected in ((0, 16, 8), (1, 100, 16), (2, 64, 8), (3, 65, 16)):
        gpa = (slot + 1) << 24
        assert kvm_target.apply(region(slot, gpa, npages * PG, flags=LOG)) == ok()
        assert kvm_target.dirty_bitmap_bytes(slot) == expected
    big = region(4, 1 << 32, 1 << 30, 0x100000000000, LOG)  # 262144 pages: 32 KiB of bitmap
    assert kvm_target.apply(big) == ok()
    assert kvm_target.dirty_bitmap_bytes(4) == 32768
    assert kvm_target.dirty_bitmap_bytes(9) is None
    assert kvm_target.apply(region(5, 0x100000, PG)) == ok()
    assert kvm_target.dirty_bitmap_bytes(5) is None  # no LOG_DIRTY


@pytest.mark.kvm
def test_bitmap_buffers_are_sized_from_accepted_requests(kvm_target: LinuxKvmTarget) -> None:
    kvm_target.apply(Mmap("host", 8 << 20))
    kvm_target.apply(region(0, 0x100000, 100 * PG, flags=LOG))
    kvm_target.apply(region(0, 0x100000, 200 * PG, flags=LOG))  # EINVAL: npages stays 100
    assert kvm_target.apply(GetDirtyLog(0)) == ok(bitmap=[0, 0])
    kvm_target.apply(region(0, 0x900000, 100 * PG, flags=LOG))  # MOVE keeps npages
    assert kvm_target.apply(GetDirtyLog(0)) == ok(bitmap=[0, 0])
    kvm_target.apply(delete(0))
    kvm_target.apply(region(0, 0x100000, 1000 * PG, flags=LOG))
    assert kvm_target.apply(GetDirtyLog(0)) == ok(bitmap=[0] * 16)


@pytest.mark.kvm
def test_a_misjudged_bitmap_size_faults_instead_of_overwriting(
    kvm_target: LinuxKvmTarget,
) -> None:
    kvm_target.apply(Mmap("host", 8 << 20))
    kvm_target.apply(region(0, 0x100000, 1000 * PG, flags=LOG))
    kvm_target._slot_pages.clear()  # pretend the target lost track of the slot
    assert kvm_target.apply(GetDirtyLog(0)) == err("EFAULT")
    assert kvm_target.apply(ClearDirtyLog(0, 0, 1000, (ALL_ONES,))) == err("EFAULT")


@pytest.mark.kvm
def test_an_open_descriptor_number_in_a_trace_still_means_a_closed_one(
    kvm_target: LinuxKvmTarget,
) -> None:
    kvm_target.apply(Mmap("host", 8 << 20))
    kvm_target.apply(CreateGuestMemfd("g", 2 << 20))
    open_fd = kvm_target._gmems["g"]
    assert kvm_target.apply(region2(1, 0x400000, 2 << 20, gmem=open_fd)) == err("EBADF")
    assert kvm_target.apply(region2(1, 0x400000, 2 << 20, gmem="g")) == ok()
