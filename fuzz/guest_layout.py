"""Where the harness's guest lives in guest-physical memory, and what a trace with guest
operations may do. The trace parser and both targets read these numbers, so they agree.

A guest operation (``guest_read``, ``guest_write``) runs a real instruction on the linux-kvm
target: a CPL 3 64-bit guest (FINDINGS.md section 5.1) whose code and page tables must live
in guest memory that the trace cannot touch. The harness therefore owns one memslot:

* **slot id** ``private_slot_id(profile)``: the last user slot (32763 on x86), address space 0;
* **guest-physical range** [PRIVATE_GPA, PRIVATE_END): the last 16 MiB below 1 TiB, a range
  every profile's gfn limit accepts (arm64's default IPA space is 40 bits);
* **backing**: 16 MiB of anonymous memory the target maps for it; no flags (never logged);
* **created** by the first guest operation of the trace, just before that operation runs.
  The reference target creates the same slot at the same moment, so memslot answers (EEXIST
  for an overlap, the slot count) stay the same on both targets.

The rules for a trace with at least one guest operation, checked by the parser
(:func:`kvmspec.fuzz.trace.parse_lines`):

1. no memslot operation names the private slot id (it would move or delete the guest's code);
2. before the first guest operation, no memslot operation overlaps the private range (the
   private slot could not be created); afterwards an overlap is an ordinary EEXIST;
3. a guest access lies below GPA_LIMIT and outside the private range;
4. the accesses reach at most MAX_GIGABYTES distinct 1 GiB ranges (the guest's page tables
   grow inside the private slot and are never freed);
5. the guest can only reach the trace's own memory: a slot's host range lies inside the
   region it names, or a raw ``userspace_addr`` range lies where no mapping can be (below
   MMAP_MIN_ADDR, or at or above the profile's user address limit);
6. the regions total at most MAX_REGION_BYTES, so every region fits the linux-kvm target's
   region window. This one binds a trace with host operations too: their addresses are
   region + offset, and a region whose mmap failed counts from 0, so with small regions no
   such address can be the harness's own memory.
"""

from __future__ import annotations

from kvmspec.spec.platforms import PlatformProfile

PRIVATE_SIZE = 16 << 20
PRIVATE_GPA = (1 << 40) - PRIVATE_SIZE
PRIVATE_END = PRIVATE_GPA + PRIVATE_SIZE

GPA_LIMIT = 1 << 47
"""Guest accesses end at or below 2^47: the guest maps guest virtual == guest physical in the
lower canonical half of its 4-level address space. Beyond it nothing works on this machine:
under this PVM a CPL 3 access in the upper half (at 0xffff800000000000) shut the guest down,
and MAXPHYADDR is 48, so a guest PTE at or above 2^48 is a reserved-bit fault that shuts the
guest down as well (FINDINGS.md 5.3)."""

MAX_GIGABYTES = 1024
"""Distinct 1 GiB ranges the guest operations of one trace may reach (each costs the guest a
page directory, and at most one page-directory-pointer table, in the private slot)."""

MAX_REGION_BYTES = 1 << 45
"""The ``mmap`` regions of a trace with guest operations total at most 32 TiB, so that all of
them fit the window where the linux-kvm target places regions, far below any memory of the
harness's own (see :mod:`kvmspec.fuzz.targets.linux_kvm`)."""

MMAP_MIN_ADDR = 0x10000
"""No process can map below this address (vm.mmap_min_addr's default)."""

ACCESS_SIZES = (1, 2, 4, 8)


def private_slot_id(profile: PlatformProfile) -> int:
    """The id of the harness's slot: the last user slot id of the profile (address space 0)."""
    return profile.user_mem_slots - 1


def overlaps_private(gpa: int, size: int) -> bool:
    """Does [gpa, gpa + size) intersect the private range?"""
    return gpa < PRIVATE_END and gpa + size > PRIVATE_GPA


def gigabytes(gpa: int, size: int) -> set[int]:
    """The 1 GiB ranges (gpa >> 30) that an access of ``size`` bytes at ``gpa`` touches."""
    return {gpa >> 30, (gpa + size - 1) >> 30}
