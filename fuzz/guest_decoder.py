"""A decoder for sessions that run a guest: memslots, guest accesses, the VMM's own memory
actions and dirty logging, all within the rules of a trace with guest operations.

Where :mod:`kvmspec.fuzz.decoder` explores the whole memslot uAPI (any slot id, any address,
raw host addresses), this one keeps memslots small, low in guest-physical memory and backed
by the session's own regions, so that every operation it makes is one the trace parser
accepts with guest operations (:mod:`kvmspec.fuzz.guest_layout`) and the real kernel can run
it: the guest stays clear of the harness's private slot, and every address the guest or the
VMM touches is memory of the trace. In exchange it reaches what the memslot decoder cannot:
guest loads and stores through the MMU, MMIO exits, EFAULT from the VMM's mappings, and
dirty logging fed by real guest writes, which the memory and dirty-log contracts judge on
any target.
"""

from __future__ import annotations

from typing import Protocol

from kvmspec.fuzz.decoder import Chooser, SessionView, pick
from kvmspec.fuzz.ops import (
    ClearDirtyLog,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostRead,
    HostWrite,
    MadviseDontneed,
    Mmap,
    MmapFixed,
    Mprotect,
    Munmap,
    Operation,
    RegionAddr,
    ResetDirtyRings,
    SetUserMemoryRegion,
)
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

PAGE = 4096
REGION = "ram"
REGION_PAGES = 64
"""The one region the guest's slots live in: small, so aliases and reuse are common."""
SLOT_IDS = (0, 1, 2, 3)
SLOT_GPAS = (0x100000, 0x104000, 0x110000, 0x200000, 0x800000)
SLOT_PAGES = (1, 4, 16)
UNBACKED_GPAS = (0x0, 0x40000000, 0x7000_0000_0000)
"""Places no slot of this decoder covers: accesses there are MMIO exits."""
SLOT_FLAGS = (0, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)
ACCESS_OFFSETS = (0, 8, PAGE // 2, PAGE - 4)
"""Offsets of an access in its page: PAGE - 4 with 8 bytes spans two pages."""
VALUES = (1, 0x5A, 0xFFFF, 0x1122_3344, 0x1122_3344_5566_7788)
VCPUS = (0, 1)


class GuestSessionView(SessionView, Protocol):
    @property
    def vcpus(self) -> set[int]:
        """The vCPUs created so far (a guest operation must name one)."""


_KINDS = (
    "memslot",
    "memslot",
    "memslot",
    "guest_write",
    "guest_write",
    "guest_write",
    "guest_write",
    "guest_read",
    "guest_read",
    "guest_read",
    "host",
    "host",
    "get_dirty_log",
    "clear_dirty_log",
    "ring",
    "setup",
)


def _region_offset(chooser: Chooser, pages: int) -> int:
    """A page offset in the region where ``pages`` pages still fit."""
    return PAGE * chooser.below(REGION_PAGES - pages + 1)


def _memslot(chooser: Chooser, view: GuestSessionView) -> Operation:
    """CREATE, MOVE, a flags change, or DELETE of a small slot backed by the region."""
    slot = pick(chooser, SLOT_IDS)
    request = view.slot_requests.get((0, slot))
    roll = chooser.below(4)
    if request is not None and roll == 0:
        return SetUserMemoryRegion(slot, 0, 0, 0, 0)  # delete
    if request is not None and roll == 1:
        flags = request.flags ^ pick(chooser, (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY))
        return SetUserMemoryRegion(
            slot, flags, request.guest_phys_addr, request.memory_size, request.userspace_addr
        )
    pages = pick(chooser, SLOT_PAGES)
    return SetUserMemoryRegion(
        slot,
        pick(chooser, SLOT_FLAGS),
        pick(chooser, SLOT_GPAS),
        pages * PAGE,
        RegionAddr(REGION, _region_offset(chooser, pages)),
    )


def _guest_gpa(chooser: Chooser, view: GuestSessionView) -> int:
    """Mostly inside a slot the VMM created, sometimes where there is none."""
    if view.slot_requests and chooser.below(5):
        request = view.slot_requests[pick(chooser, sorted(view.slot_requests))]
        page = chooser.below(request.memory_size // PAGE)
        return request.guest_phys_addr + page * PAGE + pick(chooser, ACCESS_OFFSETS)
    return pick(chooser, UNBACKED_GPAS) + pick(chooser, ACCESS_OFFSETS)


def _host(chooser: Chooser) -> Operation:
    """The VMM on its own memory: a store, a load, or a change of one page's mapping."""
    offset = PAGE * chooser.below(REGION_PAGES) + pick(chooser, (0, 8))
    page = offset - offset % PAGE
    which = chooser.below(8)
    if which < 3:
        return HostWrite(REGION, pick(chooser, (1, 8)), pick(chooser, VALUES) & 0xFF, offset)
    if which < 5:
        return HostRead(REGION, 8, offset)
    if which == 5:
        return MadviseDontneed(REGION, PAGE, page)
    if which == 6:
        return Mprotect(REGION, PAGE, pick(chooser, ("none", "r", "rw", "rw")), page)
    if chooser.below(2):
        return Munmap(REGION, PAGE, page)
    return MmapFixed(REGION, PAGE, page)


def _setup(chooser: Chooser) -> Operation:
    """Capabilities (before the vCPUs, as the ring requires) and the vCPUs."""
    which = chooser.below(5)
    if which == 0:
        return EnableCap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (pick(chooser, (1, 3)),))
    if which == 1:
        return EnableCap("KVM_CAP_DIRTY_LOG_RING", (pick(chooser, (4096, 65536)),))
    return CreateVcpu(pick(chooser, VCPUS))


def decode_guest_operation(chooser: Chooser, view: GuestSessionView) -> Operation:
    """The next operation of a guest session, from the chooser's answers."""
    if REGION not in view.region_sizes:
        return Mmap(REGION, REGION_PAGES * PAGE, "rw")
    kind = pick(chooser, _KINDS)
    vcpus = sorted(view.vcpus)
    if not vcpus and kind in ("guest_write", "guest_read", "ring"):
        kind = "setup"
    if kind == "memslot":
        return _memslot(chooser, view)
    if kind in ("guest_write", "guest_read"):
        gpa = _guest_gpa(chooser, view)
        size = pick(chooser, (1, 2, 4, 8))
        vcpu = pick(chooser, vcpus)
        if kind == "guest_read":
            return GuestRead(gpa, size, vcpu)
        value = pick(chooser, VALUES) & ((1 << 8 * size) - 1)
        return GuestWrite(gpa, size, value, vcpu)
    if kind == "host":
        return _host(chooser)
    if kind in ("get_dirty_log", "clear_dirty_log") and view.slot_requests:
        as_id, slot = pick(chooser, sorted(view.slot_requests))
        if kind == "get_dirty_log":
            return GetDirtyLog(as_id << 16 | slot)
        npages = view.slot_requests[(as_id, slot)].memory_size // PAGE
        mask = pick(chooser, (1, 0b1010, (1 << 64) - 1))
        return ClearDirtyLog(as_id << 16 | slot, 0, npages, (mask,))
    if kind == "ring":
        if chooser.below(2):
            return HarvestDirtyRing(pick(chooser, vcpus))
        return ResetDirtyRings()
    return _setup(chooser)
