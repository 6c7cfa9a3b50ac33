"""The black-box memory contract: what guest accesses must observe, from outside.

Stated over operations and observations only (it imports nothing from the reference), so it
judges any implementation that reports guest accesses:

* **coherence** (C-COHERENCE): a guest load returns the last value stored at that
  guest-physical address, by the guest or through the host mapping behind it, or zero once
  the host dropped the page (MADV_DONTNEED, munmap);
* **MMIO** (C-MMIO): an access with no memslot, or a store to a READONLY slot, exits as MMIO,
  and the store changes nothing;
* **EFAULT** (C-EFAULT): an access to a slot whose host address has no mapping, or a mapping
  without the permission the access needs, fails with EFAULT;
* **notifier exclusion** (C-NOTIFIER-EXCLUSION, the outside view of N4 and N5): while the host
  is invalidating the page behind a gfn, no access to that gfn completes (the vCPU keeps
  faulting and retrying), so no access can use a page the host is taking away;
* **RAM**: any other access completes.

The contract keeps the VMM's view of memory by host address (several gfns may alias one host
page, and the host may write it directly), its mappings and their protections, and learns the
memslot layout from :class:`~kvmspec.spec.contracts.MemslotUapiContract`.

Where the kernel is deliberately loose the contract says so rather than being silently weak:

* while any invalidation is open, any access may retry: KVM records only the union of the
  open ranges, which can cover more than the host's exact ranges;
* an access to the old or new range of a memslot update in flight may retry (x86) or exit as
  MMIO (arm64, POWER) while the slot is INVALID; such loads are not judged, and the harness
  makes no stores there (which hva they reach is not determined until the update ends);
* a vCPU whose dirty ring is full exits before it runs the access.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.spec.contracts import ContractViolation, MemslotUapiContract
from kvmspec.spec.uapi.constants import KVM_MEM_READONLY

MAPPED, MMIO, EFAULT, RETRY, RING_FULL = "mapped", "mmio", "efault", "retry", "dirty_ring_full"
PROT_READ, PROT_WRITE = 1, 2
UNKNOWN = -1
"""A protection the contract cannot know."""


@dataclass
class MemoryCoherenceContract:
    """Byte values by host address, the VMM's mappings, and the windows where it is loose."""

    memslots: MemslotUapiContract
    values: dict[int, int | None] = field(default_factory=dict)
    """Byte values by host address; None marks a byte whose value the harness cannot know
    (an access the contract does not judge wrote it, or did not)."""
    mappings: list[tuple[int, int, int]] | None = None
    """The VMM's mapped ranges (start, end, prot), disjoint. None: not tracked (every slot
    is assumed to be backed by read-write memory)."""
    invalidating: list[tuple[int, int]] = field(default_factory=list)
    """Host ranges between their invalidation start and end."""
    updating: list[tuple[int, int]] = field(default_factory=list)
    """gpa ranges memslot updates in flight may change (old and new place); the harness
    keeps it current."""

    # -- what the VMM and the host do ---------------------------------------------------------

    def on_host_map(self, start: int, end: int, prot: int) -> None:
        """mmap, or mprotect of a mapped range: [start, end) now has ``prot``."""
        self._carve(start, end)
        self.mappings = sorted([*(self.mappings or []), (start, end, prot)])

    def on_host_unmap(self, start: int, end: int) -> None:
        """munmap: the range is gone, and reads as zero if it is ever mapped again."""
        self._carve(start, end)
        self.on_host_drop(start, end)

    def _carve(self, start: int, end: int) -> None:
        kept = []
        for lo, hi, prot in self.mappings or []:
            if hi <= start or end <= lo:
                kept.append((lo, hi, prot))
                continue
            if lo < start:
                kept.append((lo, start, prot))
            if end < hi:
                kept.append((end, hi, prot))
        self.mappings = sorted(kept)

    def on_host_unknown(self, start: int, end: int) -> None:
        """Something changed [start, end) that the contract cannot follow (an mprotect that
        failed half-way): from now on any access there may complete or fault, with any
        value."""
        self._carve(start, end)
        self.mappings = sorted([*(self.mappings or []), (start, end, UNKNOWN)])
        self.on_bytes_unknown(start, end)

    def on_bytes_unknown(self, start: int, end: int) -> None:
        for hva in range(start, end):
            self.values[hva] = None

    def prot_at(self, hva: int) -> int | None:
        """The protection at ``hva`` (UNKNOWN if it cannot be told), or None when nothing is
        mapped there."""
        if self.mappings is None:
            return PROT_READ | PROT_WRITE
        for lo, hi, prot in self.mappings:
            if lo <= hva < hi:
                return prot
        return None

    def on_host_write(self, hva: int, value: int, size: int = 1) -> None:
        """The VMM stored ``value`` (``size`` bytes, little-endian) at ``hva``."""
        for index, byte in enumerate(value.to_bytes(size, "little")):
            self.values[hva + index] = byte

    def on_host_read(self, hva: int, value: int, size: int = 1) -> list[ContractViolation]:
        """The VMM loaded ``value``: what the guest and the VMM stored there last."""
        wanted = self._known(hva, size)
        if wanted is not None and wanted != value:
            return [
                ContractViolation("C-COHERENCE", f"host load {hva:#x} gave {value}, not {wanted}")
            ]
        return []

    def _known(self, hva: int, size: int) -> int | None:
        """The little-endian value of [hva, hva + size), or None if a byte is unknown."""
        found = [self.values.get(hva + index, 0) for index in range(size)]
        if any(byte is None for byte in found):
            return None
        return int.from_bytes(bytes(byte for byte in found if byte is not None), "little")

    def on_host_drop(self, start: int, end: int) -> None:
        """MADV_DONTNEED or munmap: the pages read as zero afterwards."""
        for hva in [h for h in self.values if start <= h < end]:
            del self.values[hva]

    def on_invalidate_start(self, start: int, end: int) -> None:
        self.invalidating.append((start, end))

    def on_invalidate_end(self, start: int, end: int) -> None:
        self.invalidating.remove((start, end))

    def in_update(self, gpa: int) -> bool:
        """Is ``gpa`` in the old or new range of a memslot update in flight?"""
        return any(lo <= gpa < hi for lo, hi in self.updating)

    # -- what guest accesses must observe -----------------------------------------------------

    def _slot_of(self, gpa: int) -> tuple[int, int] | None:
        """(hva of ``gpa``, the slot's flags), or None when no slot covers it."""
        shift = self.memslots.profile.page_shift
        gfn = gpa >> shift
        for (as_id, _slot_id), view in self.memslots.slots.items():
            if as_id == 0 and view.base_gfn <= gfn < view.base_gfn + view.npages:
                hva = view.userspace_addr + ((gfn - view.base_gfn) << shift) + gpa % (1 << shift)
                return hva, view.flags
        return None

    def _expected(self, gpa: int, write: bool) -> tuple[set[str], str, int | None]:
        """(the outcomes allowed, the rule they come from, the hva the access reaches)."""
        found = self._slot_of(gpa)
        may_retry = {RETRY} if self.invalidating else set()
        if self.memslots.ring_size:
            may_retry.add(RING_FULL)
        if found is None:
            return {MMIO} | may_retry, "C-MMIO", None
        hva, flags = found
        if write and flags & KVM_MEM_READONLY:
            return {MMIO} | may_retry, "C-MMIO", None
        page = hva - hva % self.memslots.profile.page_size
        if any(lo <= page < hi for lo, hi in self.invalidating):
            return {RETRY} | may_retry, "C-NOTIFIER-EXCLUSION", None
        prot = self.prot_at(hva)
        needed = PROT_WRITE if write else PROT_READ
        if prot == UNKNOWN:
            return {MAPPED, EFAULT} | may_retry, "C-EFAULT", hva
        if prot is None or not prot & needed:
            return {EFAULT} | may_retry, "C-EFAULT", None
        return {MAPPED} | may_retry, "C-MMIO", hva

    def on_guest_store(
        self, gpa: int, value: int, outcome: str, size: int = 1
    ) -> list[ContractViolation]:
        """A store of ``value`` (``size`` bytes, within one page) at ``gpa`` ended with
        ``outcome``. The harness makes none inside a memslot update in flight."""
        allowed, rule, hva = self._expected(gpa, write=True)
        if outcome not in allowed:
            wanted = " or ".join(sorted(allowed))
            return [ContractViolation(rule, f"store to {gpa:#x}: {outcome}, not {wanted}")]
        if outcome == MAPPED and hva is not None:
            self.on_host_write(hva, value, size)
        return []

    def on_guest_load(
        self, gpa: int, outcome: str, value: int | None, size: int = 1
    ) -> list[ContractViolation]:
        """A load of ``size`` bytes (within one page) at ``gpa`` ended with ``outcome``,
        reading ``value`` if it completed."""
        if self.in_update(gpa):
            return []  # the slot may be INVALID: retry, MMIO, or the old mapping (see above)
        allowed, rule, hva = self._expected(gpa, write=False)
        if outcome not in allowed:
            wanted = " or ".join(sorted(allowed))
            return [ContractViolation(rule, f"load from {gpa:#x}: {outcome}, not {wanted}")]
        if outcome == MAPPED and hva is not None:
            wanted_value = self._known(hva, size)
            if wanted_value is not None and value != wanted_value:
                return [
                    ContractViolation(
                        "C-COHERENCE", f"load {gpa:#x} gave {value}, not {wanted_value}"
                    )
                ]
        return []

    def on_unjudged_store(self, gpa: int, size: int) -> None:
        """A store the contract does not judge (one that spans two pages, which KVM may
        complete in part): the bytes it may have written become unknown."""
        page_size = self.memslots.profile.page_size
        address = gpa
        while address < gpa + size:
            found = self._slot_of(address)
            page_end = address - address % page_size + page_size
            if found is not None:
                hva = found[0]
                self.on_bytes_unknown(hva, hva + min(page_end, gpa + size) - address)
            address = page_end
