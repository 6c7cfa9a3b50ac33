"""The black-box memory contract: what guest accesses must observe, from outside.

Stated over operations and observations only (it imports nothing from the reference), so it
judges any implementation that reports guest accesses:

* **coherence**: a guest load returns the last value stored at that guest-physical address,
  by the guest or through the host mapping behind it, or zero once the host dropped the page
  (MADV_DONTNEED);
* **MMIO**: an access with no memslot, or a store to a READONLY slot, exits as MMIO, and the
  store changes nothing;
* **RAM**: any other access to a slot backed by readable, writable host memory completes.

The contract keeps the VMM's view of memory by host address (several gfns may alias one
host page, and the host may write it directly), and learns the memslot layout from
:class:`~kvmspec.spec.contracts.MemslotUapiContract`.

Where the kernel is deliberately loose the contract says so: an access racing a memslot
update may retry (x86) or exit as MMIO (arm64, POWER) while the slot is INVALID, so the
harness only judges accesses made while no update is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmspec.spec.contracts import ContractViolation, MemslotUapiContract
from kvmspec.spec.uapi.constants import KVM_MEM_READONLY

MAPPED, MMIO = "mapped", "mmio"


@dataclass
class MemoryCoherenceContract:
    """Byte values by host address, as the VMM and its guest wrote them."""

    memslots: MemslotUapiContract
    values: dict[int, int] = field(default_factory=dict)

    def _slot_of(self, gpa: int) -> tuple[int, int] | None:
        """(hva of ``gpa``, the slot's flags), or None when no slot covers it."""
        shift = self.memslots.profile.page_shift
        gfn = gpa >> shift
        for (as_id, _slot_id), view in self.memslots.slots.items():
            if as_id == 0 and view.base_gfn <= gfn < view.base_gfn + view.npages:
                hva = view.userspace_addr + ((gfn - view.base_gfn) << shift) + gpa % (1 << shift)
                return hva, view.flags
        return None

    def on_host_write(self, hva: int, value: int) -> None:
        self.values[hva] = value

    def on_host_drop(self, start: int, end: int) -> None:
        """MADV_DONTNEED or munmap: the pages read as zero afterwards."""
        for hva in [h for h in self.values if start <= h < end]:
            del self.values[hva]

    def on_guest_store(self, gpa: int, value: int, outcome: str) -> list[ContractViolation]:
        found = self._slot_of(gpa)
        expected = MMIO if found is None or found[1] & KVM_MEM_READONLY else MAPPED
        if outcome != expected:
            return [ContractViolation("C-MMIO", f"store to {gpa:#x}: {outcome}, not {expected}")]
        if found is not None and expected == MAPPED:
            self.values[found[0]] = value
        return []

    def on_guest_load(self, gpa: int, outcome: str, value: int | None) -> list[ContractViolation]:
        found = self._slot_of(gpa)
        expected = MMIO if found is None else MAPPED
        if outcome != expected:
            return [ContractViolation("C-MMIO", f"load from {gpa:#x}: {outcome}, not {expected}")]
        if found is not None and value != self.values.get(found[0], 0):
            wanted = self.values.get(found[0], 0)
            return [ContractViolation("C-COHERENCE", f"load {gpa:#x} gave {value}, not {wanted}")]
        return []
