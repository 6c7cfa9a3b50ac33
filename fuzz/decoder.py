"""One decoder from choices to operations, shared by Atheris and Hypothesis.

The decoder asks a :class:`Chooser` for small integers and turns them into an operation that
fits the session so far: it mostly modifies slots that exist, maps regions before using them,
and draws every number from :mod:`kvmspec.fuzz.boundaries`. Atheris feeds it raw bytes
(:class:`BytesChooser`); the state machines feed it Hypothesis draws, so Hypothesis can shrink a
failure to the fewest, smallest choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from kvmspec.fuzz import boundaries as b
from kvmspec.fuzz.ops import (
    Address,
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    Mmap,
    Operation,
    RegionAddr,
    ResetDirtyRings,
    SetNrMmuPages,
    SetUserMemoryRegion,
    SetUserMemoryRegion2,
)
from kvmspec.spec.uapi.constants import (
    CAPABILITIES,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
)

T = TypeVar("T")
RegionOp = SetUserMemoryRegion | SetUserMemoryRegion2


class Chooser(Protocol):
    def below(self, n: int) -> int:
        """An integer in [0, n)."""


class BytesChooser:
    """Choices read from a byte string; when it runs out, every choice is 0."""

    __slots__ = ("data", "position")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        data, position = self.data, self.position
        if n <= 256:  # one byte
            self.position = position + 1
            return data[position] % n if position < len(data) else 0
        chunk = data[position : position + 2]
        self.position = position + 2
        return int.from_bytes(chunk, "little") % n if chunk else 0

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.data)


class SessionView(Protocol):
    """What the decoder may know: what a VMM knows from its own successful requests."""

    region_sizes: dict[str, int]
    """The regions mapped so far, in mapping order, with their sizes."""
    gmems: list[str]
    slot_requests: dict[tuple[int, int], RegionOp]
    large_slots: bool

    @property
    def steps(self) -> int:
        """How many operations the session has applied (makes new names unique)."""


def pick(chooser: Chooser, options: Sequence[T]) -> T:
    return options[chooser.below(len(options))]


_KINDS = (
    "create",
    "create",
    "create",
    "modify",
    "modify",
    "modify",
    "delete",
    "delete",
    "region2",
    "create_guest_memfd",
    "get_dirty_log",
    "get_dirty_log",
    "clear_dirty_log",
    "clear_dirty_log",
    "enable_cap",
    "enable_cap",
    "check_extension",
    "create_vcpu",
    "reset_dirty_rings",
    "mmap",
    "set_nr_mmu_pages",
)


def _slot_number(chooser: Chooser) -> int:
    slot_id = pick(chooser, b.SLOT_IDS)
    as_bits = b.SLOT_AS_BITS[0] if chooser.below(8) else pick(chooser, b.SLOT_AS_BITS)
    return as_bits | slot_id


def _known_or_new_slot(chooser: Chooser, view: SessionView) -> int:
    if view.slot_requests and chooser.below(4):
        as_id, slot_id = pick(chooser, sorted(view.slot_requests))
        return as_id << 16 | slot_id
    return _slot_number(chooser)


def _address(chooser: Chooser, view: SessionView) -> Address:
    if view.region_sizes and chooser.below(6):
        region = pick(chooser, list(view.region_sizes))
        size = view.region_sizes[region]
        return RegionAddr(region, pick(chooser, [o for o in b.REGION_OFFSETS if o < size]))
    return pick(chooser, b.RAW_HVAS)


def _size(chooser: Chooser, view: SessionView) -> int:
    roll = chooser.below(10)
    if roll < 7:
        return pick(chooser, b.SMALL_SIZES)
    if roll < 9 or not view.large_slots:
        return pick(chooser, b.EDGE_SIZES)
    return pick(chooser, b.LARGE_SIZES)


def _gpa(chooser: Chooser, view: SessionView) -> int:
    """A boundary address, or one placed just before, at or after a known slot."""
    if view.slot_requests and chooser.below(2):
        request = view.slot_requests[pick(chooser, sorted(view.slot_requests))]
        start, size = request.guest_phys_addr, request.memory_size
        return pick(chooser, (start, start + size, max(start - size, 0), start + b.PAGE))
    return pick(chooser, b.GPAS)


def _create(chooser: Chooser, view: SessionView) -> Operation:
    return SetUserMemoryRegion(
        slot=_slot_number(chooser),
        flags=pick(chooser, b.FLAGS[:4]) if chooser.below(4) else pick(chooser, b.FLAGS),
        guest_phys_addr=_gpa(chooser, view),
        memory_size=_size(chooser, view),
        userspace_addr=_address(chooser, view),
    )


def _modify(chooser: Chooser, view: SessionView) -> Operation:
    """Re-submit a known slot with one change (move, flags, nothing, size, hva or READONLY),
    and sometimes a LOG toggle on top: a MOVE that changes logging too, or a flags change
    undone into an identical re-submit."""
    if not view.slot_requests:
        return _create(chooser, view)
    request = view.slot_requests[pick(chooser, sorted(view.slot_requests))]
    gpa, size, flags = request.guest_phys_addr, request.memory_size, request.flags
    address = request.userspace_addr
    variant = chooser.below(6)
    if variant == 0:
        gpa = _gpa(chooser, view)
    elif variant == 1:
        flags ^= KVM_MEM_LOG_DIRTY_PAGES
    elif variant == 3:
        size *= 2
    elif variant == 4:
        address = _address(chooser, view)
    elif variant == 5:
        flags ^= KVM_MEM_READONLY
    if chooser.below(4) == 0:
        flags ^= KVM_MEM_LOG_DIRTY_PAGES
    if isinstance(request, SetUserMemoryRegion2):
        return SetUserMemoryRegion2(
            request.slot, flags, gpa, size, address, request.guest_memfd, request.guest_memfd_offset
        )
    return SetUserMemoryRegion(request.slot, flags, gpa, size, address)


def _delete(chooser: Chooser, view: SessionView) -> Operation:
    slot = _known_or_new_slot(chooser, view)
    flags = 0 if chooser.below(4) else pick(chooser, b.FLAGS)
    return SetUserMemoryRegion(slot, flags, 0 if chooser.below(3) else _gpa(chooser, view), 0, 0)


def _region2(chooser: Chooser, view: SessionView) -> Operation:
    gmem: str | int = pick(chooser, view.gmems) if view.gmems else b.CLOSED_FDS[0]
    if chooser.below(5) == 0:
        gmem = b.CLOSED_FDS[0]
    flags = KVM_MEM_GUEST_MEMFD if chooser.below(4) else pick(chooser, b.FLAGS)
    return SetUserMemoryRegion2(
        slot=_slot_number(chooser),
        flags=flags,
        guest_phys_addr=_gpa(chooser, view),
        memory_size=pick(chooser, b.SMALL_SIZES) if chooser.below(4) else _size(chooser, view),
        userspace_addr=_address(chooser, view) if chooser.below(2) else 0,
        guest_memfd=gmem,
        guest_memfd_offset=pick(chooser, b.GMEM_OFFSETS),
    )


def _enable_cap(chooser: Chooser) -> Operation:
    which = chooser.below(5)
    if which == 0:
        return EnableCap(
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (pick(chooser, b.MANUAL_PROTECT_ARGS),)
        )
    if which in (1, 2):
        cap = "KVM_CAP_DIRTY_LOG_RING" if which == 1 else "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
        return EnableCap(cap, (pick(chooser, b.RING_SIZES),))
    if which == 3:
        return EnableCap("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", (), pick(chooser, (0, 1)))
    return EnableCap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", (1,), flags=1)


def decode_operation(chooser: Chooser, view: SessionView) -> Operation:
    """The next operation for this session, from the chooser's answers."""
    kind = pick(chooser, _KINDS)
    if kind == "mmap" or (not view.region_sizes and chooser.below(2)):
        return Mmap(
            f"r{view.steps}", pick(chooser, b.MMAP_SIZES), pick(chooser, ("rw", "rw", "r", "none"))
        )
    if kind == "create":
        return _create(chooser, view)
    if kind == "modify":
        return _modify(chooser, view)
    if kind == "delete":
        return _delete(chooser, view)
    if kind == "region2":
        return _region2(chooser, view)
    if kind == "create_guest_memfd":
        return CreateGuestMemfd(
            f"g{view.steps}", pick(chooser, b.GMEM_SIZES), pick(chooser, b.GMEM_FLAGS)
        )
    if kind == "get_dirty_log":
        return GetDirtyLog(_known_or_new_slot(chooser, view))
    if kind == "clear_dirty_log":
        # One word or two: a bitmap shorter than num_pages spans reads as zeros beyond its end.
        nr_words = 1 + chooser.below(2)
        masks = (0, 1, 0x5555_5555_5555_5555, (1 << 64) - 1)
        words = tuple(pick(chooser, masks) for _ in range(nr_words))
        return ClearDirtyLog(
            _known_or_new_slot(chooser, view),
            pick(chooser, b.FIRST_PAGES),
            pick(chooser, b.NUM_PAGES),
            words,
        )
    if kind == "enable_cap":
        if chooser.below(8) == 0:
            return EnableCap("KVM_CAP_DISABLE_QUIRKS2", (KVM_X86_QUIRK_SLOT_ZAP_ALL,))
        return _enable_cap(chooser)
    if kind == "check_extension":
        return CheckExtension(pick(chooser, sorted(CAPABILITIES)))
    if kind == "create_vcpu":
        return CreateVcpu(pick(chooser, b.VCPU_IDS))
    if kind == "set_nr_mmu_pages":
        return SetNrMmuPages(pick(chooser, b.NR_MMU_PAGES))
    return ResetDirtyRings()
